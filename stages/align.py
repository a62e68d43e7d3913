"""align: detect faces, landmarks, FFHQ quad, aligned 512 crop and in-the-wild crop per face.

One input image -> one row per detected face, keyed `<image_id[:16]>-<index>` (faces ordered
left to right, top to bottom). Faces whose FFHQ quad side is below `align.min_face_size` pixels get
`too_small`; faces whose quad lies more than `align.max_border_cut` outside the image get
`cut_by_border`; a face without landmarks gets `no_landmarks`; an image without any face gets one
row `<image16>-x` with `no_face`. Only `ok` faces get crops (blobs `face.jpg`, `wild.jpg`) and the
dense mesh (`mesh.npy`, original-image pixels).
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np
import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import AlignConfig, IngestConfig, section_hash
from pipeline.images import encode_jpeg, encode_npy, load_rgb
from pipeline.models import align as geom
from pipeline.plugins import Member, Stage
from pipeline.stage import Context, StageSpec, model_columns, prepare, run_item_stage, write_metrics
from pipeline.store import BlobStore, read_table, status_counts

log = logging.getLogger("persona.align")

COLUMNS = {
    "image_id": pa.string(), "identity": pa.string(), "identity_label": pa.string(), "source": pa.string(),
    "path": pa.string(), **model_columns("detector"), "face_index": pa.int64(), "bbox": pa.string(),
    "score": pa.float64(), "lm5": pa.string(), "quad": pa.string(), "quad_side": pa.float64(),
    "outside": pa.float64(), "face_blob": pa.string(), "wild_blob": pa.string(), "mesh_blob": pa.string(),
    "align_matrix": pa.string(), "wild_matrix": pa.string(), "lm5_aligned": pa.string(),
}


def _r(a, nd: int = 3):
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


def wild_matrix(quad: np.ndarray, scale: float, size: int) -> np.ndarray:
    """3x3 map original-image pixels -> in-the-wild crop pixels (same map as `geom.wild_crop`)."""
    cx, cy, side = geom.wild_box(quad, scale)
    s = size / side
    bx0, by0 = cx + 0.5 - side / 2.0, cy + 0.5 - side / 2.0
    return np.array([[s, 0, (0.5 - bx0) * s - 0.5], [0, s, (0.5 - by0) * s - 0.5], [0, 0, 1.0]])


def align_image(item: dict, rgb: np.ndarray, faces: list, cfg: AlignConfig, blobs: BlobStore, det_info) -> list[dict]:
    """Rows for every face of one image (pure apart from blob writes)."""
    h, w = rgb.shape[:2]
    base = {
        "image_id": item["image_id"],
        "identity": item["identity"],
        "identity_label": item["identity_label"],
        "source": item["source"],
        "path": item["path"],
        "detector_model": det_info.name,
        "detector_fingerprint": det_info.fingerprint,
        "detector_weights_real": det_info.weights_real,
    }
    if not faces:
        return [{**base, "key": f"{item['image_id'][:16]}-x", "face_index": -1, "status": "no_face",
                 "error": f"{det_info.name} found no face"}]
    order = sorted(range(len(faces)), key=lambda i: (round(float(faces[i].bbox[0])), round(float(faces[i].bbox[1]))))
    rows = []
    for idx, fi in enumerate(order[: cfg.max_faces]):
        f = faces[fi]
        key = f"{item['image_id'][:16]}-{idx}"
        row = {**base, "key": key, "face_index": idx, "status": "ok", "error": "",
               "bbox": _r(f.bbox, 2), "score": round(float(f.score), 4)}
        if f.lm5 is None or getattr(f, "landmarks_source", "") == "detector":
            # MediaPipe: the mesh failed on this detection (often a false face); its 5 points would
            # be guesses, so the face is recorded, not aligned.
            rows.append({**row, "status": "no_landmarks", "error": "no dense landmarks for this detection"})
            continue
        lm5 = np.asarray(f.lm5, dtype=np.float64)
        quad = geom.ffhq_quad(lm5)
        side = geom.quad_side(quad)
        frac_out = geom.quad_fraction_outside(quad, w, h)
        row.update(lm5=_r(lm5), quad=_r(quad), quad_side=round(float(side), 2), outside=round(float(frac_out), 4))
        if side < cfg.min_face_size:
            rows.append({**row, "status": "too_small", "error": f"quad side {side:.1f}px < min_face_size {cfg.min_face_size}"})
            continue
        if frac_out > cfg.max_border_cut:
            rows.append({**row, "status": "cut_by_border", "error": f"{frac_out:.0%} of the face crop lies outside the image"})
            continue
        aligned, tf = geom.align_face(rgb, quad, cfg.output_size, cfg.transform_size)
        wild, _ = geom.wild_crop(rgb, quad, cfg.wild_scale, cfg.wild_size)
        ck = item["cache_key"]
        row["face_blob"] = blobs.put(ck, f"{key}.face.jpg", encode_jpeg(aligned, 95))
        row["wild_blob"] = blobs.put(ck, f"{key}.wild.jpg", encode_jpeg(wild, 95))
        if f.mesh is not None:
            row["mesh_blob"] = blobs.put(ck, f"{key}.mesh.npy", encode_npy(np.asarray(f.mesh, dtype=np.float32)))
        row["align_matrix"] = _r(tf.matrix, 8)
        row["wild_matrix"] = _r(wild_matrix(quad, cfg.wild_scale, cfg.wild_size), 8)
        row["lm5_aligned"] = _r(tf.forward(lm5))
        rows.append(row)
    return rows


class _AlignWorker:
    def __init__(self, cfg: AlignConfig, ingest_cfg: IngestConfig, stage_dir: str):
        from pipeline.models import faces

        self.cfg, self.ingest_cfg = cfg, ingest_cfg
        self.det = faces.load(cfg)
        self.blobs = BlobStore(stage_dir)

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        out = []
        for it in batch:
            path = os.fsdecode(it["path_raw"]) if it.get("path_raw") else it["path"]  # exact bytes of the name
            rgb, _ = load_rgb(path, self.ingest_cfg.max_pixels, self.ingest_cfg.max_bytes)
            out.append(align_image(it, rgb, self.det.detect(rgb), self.cfg, self.blobs, self.det.info))
        return out


def detector_info(cfg: AlignConfig):
    """The configured detector's ModelInfo, from its weight files (the detector is not built here)."""
    from pipeline.models import faces

    return faces.model_info(cfg)


def run(ctx: Context) -> dict:
    cfg = ctx.params.align
    store = prepare(ctx, "align")
    src = read_table(ctx.root, "dedup", ok_only=True)
    inputs = [
        {"key": r["image_id"], "sig": r["sig"], **{c: r[c] for c in ("image_id", "identity", "identity_label", "source", "path", "path_raw")}}
        for r in src.to_dict("records")
    ]
    info = detector_info(cfg)
    spec = StageSpec("align", code_fingerprint(__name__), section_hash(cfg), COLUMNS, fingerprint=info.fingerprint,
                     batch_size=cfg.batch_size)
    factory = functools.partial(_AlignWorker, cfg, ctx.params.ingest, str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    faces_rows = table[table["face_index"] >= 0]
    images_no_face = int((table["status"] == "no_face").sum())
    images_failed = int(((table["face_index"].isna()) & (table["status"] != "ok")).sum())
    metrics = {
        "images_in": len(inputs),
        "images_with_faces": int(faces_rows["image_id"].nunique()),
        "images_no_face": images_no_face,
        "images_failed": images_failed,
        "faces_detected": int(len(faces_rows)),
        "faces_by_status": status_counts(faces_rows),
        "detector": {"name": info.name, "fingerprint": info.fingerprint, "weights_real": info.weights_real},
    }
    assert metrics["images_in"] == metrics["images_with_faces"] + images_no_face + images_failed, "images in != out"
    write_metrics(ctx.metrics_path("align"), metrics)
    return stats.as_dict()


STAGE = Stage(
    name="align", run=run, after=("dedup",), section="align", shard="base", model="detector",
    members=(Member("jpg", "wild_blob"), Member("face.jpg", "face_blob", role="grid")),
    meta=(("identity", "identity"), ("identity_label", "identity_label"), ("source", "source"),
          ("image_id", "image_id"), ("face_index", "face_index"), ("bbox", "bbox"), ("landmarks", "lm5"),
          ("landmarks_aligned", "lm5_aligned"), ("quad", "quad"), ("score", "score")),
)
