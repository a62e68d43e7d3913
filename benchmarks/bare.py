"""Bare single-process loops: the same decode -> model -> write work as each Persona stage, with no
framework (no Ray, no item store, no parquet journal, no cache keys). The baselines of
`stage_throughput`.

Each function takes its inputs and an output folder, writes one file per output (crop, mask,
array) plus one JSON of rows at the end, and returns {"items", "load_seconds", "loop_seconds"}:
`load_seconds` is the model load, `loop_seconds` the per-item work.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np


def _dump(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, default=str))


def ingest(photos: Path, out: Path, cfg) -> dict:
    """read bytes -> sha256 -> decode (EXIF, mode, pixel limits) -> perceptual hash."""
    from pipeline.images import BadImage, decode_bytes, phash64

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = sorted(p for p in photos.rglob("*") if p.is_file() and p.suffix.lower() in cfg.extensions)
    rows = []
    for p in files:
        data = p.read_bytes()
        row = {"path": str(p), "image_id": hashlib.sha256(data).hexdigest(), "status": "ok"}
        try:
            rgb, meta = decode_bytes(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
            row.update(width=meta.width, height=meta.height, phash=f"{phash64(rgb, cfg.phash_size):016x}")
        except BadImage as e:
            row["status"] = e.reason
        rows.append(row)
    _dump(rows, out / "ingest.json")
    return {"items": len(files), "load_seconds": 0.0, "loop_seconds": time.perf_counter() - t0, "rows": rows}


def dedup(rows: list[dict], out: Path, threshold: int) -> dict:
    """exact (sha256, keep the largest) then near duplicates (multi-index Hamming search)."""
    from pipeline.hashing import clusters_from_pairs, near_duplicate_pairs

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok = [r for r in rows if r["status"] == "ok"]
    ok.sort(key=lambda r: (-(r["width"] * r["height"]), r["path"]))
    seen: dict[str, str] = {}
    uniq = []
    for r in ok:
        if r["image_id"] in seen:
            r["dup"] = seen[r["image_id"]]
        else:
            seen[r["image_id"]] = r["path"]
            uniq.append(r)
    h = np.array([int(r["phash"], 16) for r in uniq], dtype=np.uint64)
    i, j, _ = near_duplicate_pairs(h, threshold)
    labels = clusters_from_pairs(len(uniq), i, j)
    first: dict[int, str] = {}
    kept = []
    for r, lab in zip(uniq, labels):  # uniq is best-first, so the first of a label is kept
        if int(lab) in first:
            r["dup"] = first[int(lab)]
        else:
            first[int(lab)] = r["path"]
            kept.append(r)
    _dump(ok, out / "dedup.json")
    return {"items": len(ok), "load_seconds": 0.0, "loop_seconds": time.perf_counter() - t0, "kept": kept}


def align(paths: list[str], out: Path, cfg, ingest_cfg) -> dict:
    """load_rgb -> detect (MediaPipe) -> FFHQ quad -> align_face + wild_crop -> JPEG files + mesh."""
    from pipeline.images import encode_jpeg, encode_npy, load_rgb
    from pipeline.models import align as geom
    from pipeline.models import faces
    from stages.align import wild_matrix

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    det = faces.load(cfg)
    t1 = time.perf_counter()
    rows = []
    for path in paths:
        rgb, _ = load_rgb(path, ingest_cfg.max_pixels, ingest_cfg.max_bytes)
        h, w = rgb.shape[:2]
        found = det.detect(rgb)
        order = sorted(range(len(found)), key=lambda k: (round(float(found[k].bbox[0])), round(float(found[k].bbox[1]))))
        stem = hashlib.sha256(path.encode()).hexdigest()[:16]
        for idx, fi in enumerate(order[: cfg.max_faces]):
            f = found[fi]
            if f.lm5 is None or f.landmarks_source == "detector":
                continue
            quad = geom.ffhq_quad(f.lm5)
            if geom.quad_side(quad) < cfg.min_face_size or geom.quad_fraction_outside(quad, w, h) > cfg.max_border_cut:
                continue
            aligned, tf = geom.align_face(rgb, quad, cfg.output_size, cfg.transform_size)
            wild, _ = geom.wild_crop(rgb, quad, cfg.wild_scale, cfg.wild_size)
            key = f"{stem}-{idx}"
            (out / f"{key}.face.jpg").write_bytes(encode_jpeg(aligned, 95))
            (out / f"{key}.wild.jpg").write_bytes(encode_jpeg(wild, 95))
            (out / f"{key}.mesh.npy").write_bytes(encode_npy(np.asarray(f.mesh, dtype=np.float32)))
            rows.append({"key": key, "path": path, "quad": quad.tolist(), "align_matrix": tf.matrix.tolist(),
                         "wild_matrix": wild_matrix(quad, cfg.wild_scale, cfg.wild_size).tolist(),
                         "lm5_aligned": tf.forward(f.lm5).tolist(), "lm5": np.asarray(f.lm5).tolist(),
                         "bbox": np.asarray(f.bbox).tolist()})
    det.close()
    _dump(rows, out / "align.json")
    return {"items": len(paths), "faces": len(rows), "load_seconds": t1 - t0, "loop_seconds": time.perf_counter() - t1,
            "rows": rows}


def masks(rows: list[dict], align_dir: Path, out: Path, cfg, output_size: int) -> dict:
    """decode wild crop + mesh -> hull masks (wild, aligned) + selfie segmentation -> 3 PNG files."""
    from pipeline.images import decode_image, encode_png
    from pipeline.models import align as geom
    from pipeline.models import faces
    from pipeline.models.masks import hull_mask

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seg = faces.SelfieSegmenter() if cfg.person_mask else None
    t1 = time.perf_counter()
    for r in rows:
        k = r["key"]
        wild = decode_image((align_dir / f"{k}.wild.jpg").read_bytes())
        pts = np.load(io.BytesIO((align_dir / f"{k}.mesh.npy").read_bytes()))
        mw = hull_mask(geom.apply_matrix(np.asarray(r["wild_matrix"]), pts), wild.shape[0], cfg.erode_at_1024, cfg.blur_at_1024)
        mf = hull_mask(geom.apply_matrix(np.asarray(r["align_matrix"]), pts), output_size, cfg.erode_at_1024, cfg.blur_at_1024)
        (out / f"{k}.mask.png").write_bytes(encode_png(mw))
        (out / f"{k}.face_mask.png").write_bytes(encode_png(mf))
        if seg is not None:
            prob = seg.segment(wild)
            (out / f"{k}.person.png").write_bytes(encode_png(np.round(prob * 255).astype(np.uint8)))
    if seg is not None:
        seg.close()
    return {"items": len(rows), "load_seconds": t1 - t0, "loop_seconds": time.perf_counter() - t1}


def identity(rows: list[dict], align_dir: Path, out: Path, cfg) -> dict:
    """decode aligned face -> ArcFace 112 crop -> ONNX ArcFace (batches of cfg.batch_size) -> .npy files."""
    from pipeline.images import decode_image, encode_npy
    from pipeline.models import align as geom
    from pipeline.models import identity as idm

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = idm.load(cfg)
    t1 = time.perf_counter()
    for s in range(0, len(rows), cfg.batch_size):
        chunk = rows[s : s + cfg.batch_size]
        crops = [geom.arcface_align(decode_image((align_dir / f"{r['key']}.face.jpg").read_bytes()), np.asarray(r["lm5_aligned"]))
                 for r in chunk]
        for r, e in zip(chunk, model.embed(np.stack(crops))):
            (out / f"{r['key']}.id.npy").write_bytes(encode_npy(e.astype(np.float32)))
    return {"items": len(rows), "load_seconds": t1 - t0, "loop_seconds": time.perf_counter() - t1}


def shards(rows: list[dict], dirs: dict[str, Path], out: Path, per_shard: int = 1000) -> dict:
    """read every member file -> tar members (same names and order as Persona's samples)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = sorted(rows, key=lambda r: r["key"])
    members = [("jpg", "align", "wild.jpg"), ("face.jpg", "align", "face.jpg"), ("mask.png", "masks", "mask.png"),
               ("face_mask.png", "masks", "face_mask.png"), ("id.npy", "identity", "id.npy")]
    for s in range(0, len(rows), per_shard):
        with tarfile.open(out / f"train-{s // per_shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for r in rows[s : s + per_shard]:
                k = r["key"]
                data = [(f"{k}.{name}", (dirs[stage] / f"{k}.{fname}").read_bytes()) for name, stage, fname in members]
                data.insert(4, (f"{k}.txt", b""))
                meta = {"key": k, "path": r["path"], "bbox": r["bbox"], "landmarks": r["lm5"], "quad": r["quad"],
                        "landmarks_aligned": r["lm5_aligned"]}
                data.append((f"{k}.json", json.dumps(meta, sort_keys=True).encode()))
                for name, b in data:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(b)
                    tf.addfile(ti, io.BytesIO(b))
    return {"items": len(rows), "load_seconds": 0.0, "loop_seconds": time.perf_counter() - t0}
