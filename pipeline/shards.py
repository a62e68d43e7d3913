"""WebDataset shards: join of the per-face tables, deterministic writer, streaming reader.

Writer (`join_tables` -> `write_shards` -> `shard_metrics`)
    The writer knows no stage by name: the shards stage hands it the registered stages
    (`pipeline.plugins.Stage`): the `base` one, whose `ok` rows are the samples (one per face), and
    the ones joined to it by key, each with the members it adds to a sample, the metadata it adds to
    the sample's `json` and the column prefix of its model identity. A face that is missing from, or
    not `ok` in, a joined stage is excluded with reason `<stage>:<status>` (`<stage>:missing`,
    `<stage>:blob_missing`, `<stage>:bad_shape` for rows whose blob is absent or of the wrong shape),
    so faces in == written + sum(excluded). A `required` stage must have a table (else
    FileNotFoundError); an optional one may lack one (caption disabled): the shards are written
    without its members (a text member with a `missing` value gets that value) and the metrics say so.
    Train/val are split BY IDENTITY (the base stage's `identity` metadata): identity i goes to val when
    u(i) = sha256(seed, i) / 2**64 < val_fraction (stable: adding identities never moves others);
    with >= 2 labeled identities and val_fraction > 0 both splits get at least one identity.
    Unlabeled faces (identity null) are always train. Within a split samples are sorted by key
    and cut into `samples_per_shard` tars `<out>/<split>/<split>-NNNNNN.tar`, written member by
    member with `tarfile` (mtime 0, uid/gid 0, empty user/group, mode 0644, USTAR): the same
    inputs give the same bytes. Also `<out>/index.json` (per shard: file, samples, bytes, sha256;
    per split and per identity counts; the member names in order; the input signature, which covers
    every joined row signature, the shard params and the shard stage's code), `<out>/samples.tsv`
    (key, split, shard, identity) and `<out>/grid.png`.

Sample members, in order: the base stage's, then each joined stage's in pipeline order, then `json`
(written last, so a sample cut by a truncated tar is incomplete and dropped by the reader). With the
stages registered today: `jpg` in-the-wild crop (JPEG bytes as made by align), `face.jpg` aligned 512
face, `txt` caption (UTF-8, '' when none), `id.npy` float32 (512,) L2-normalised, `mask.png` face mask
on the in-the-wild crop (uint8, 255 = face), `face_mask.png` face mask on the aligned face,
`wplus.npy` float16 (18, 512), `json` metadata (key, identity, identity_label, source, image_id,
face_index, bbox [x0,y0,x1,y1] px, landmarks 5x2 px, landmarks_aligned 5x2 px in the aligned crop,
quad 4x2 px, score, split, models{stage: {name, fingerprint, weights_real}}).

Reader: `pipeline.shard_reader` (random access for training and evaluation, streaming
    `make_dataset`); `synthetic_samples` builds decoded samples like the reader's in memory.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .config import ShardsConfig, section_hash
from .faults import crash_point
from .images import decode_image, encode_jpeg, encode_png
from .plugins import Member, Stage
from .storage import RemotePath, is_remote, spath
from .store import ItemStore, atomic_write_bytes, atomic_write_json, read_table_rows

log = logging.getLogger("persona.shards")

SPLITS = ("train", "val")
# The reader's view of the sample format (the writer takes its members from the registered stages).
MEMBER_ORDER = ("jpg", "face.jpg", "mask.png", "face_mask.png", "txt", "wplus.npy", "id.npy", "json")
REQUIRED_KEYS = ("jpg", "face.jpg", "json")  # the reader drops samples without these
WPLUS_SHAPE = (18, 512)
ID_SHAPE = (512,)


# ============================================================================================
# join


@dataclass
class Joined:
    """The faces to shard and the accounting of the ones that are not."""

    rows: list[dict]  # one per written face, sorted by key: key, identity, image_id, members, meta, grid
    faces_in: int  # ok rows of the base stage
    excluded: dict[str, list[str]]  # reason -> face keys
    base_rejected: dict[str, int]  # non-ok base rows by status (not faces in: no_face, too_small, ...)
    missing: list[str]  # optional stages without a table
    stages: list[str]  # stages joined to the base
    signature: str  # hash of every joined row signature + params + code
    member_order: list[str]  # member names of a sample, `json` last
    base: str = ""  # the base stage's name


def _py(v: Any) -> Any:
    """numpy / pandas scalars -> plain Python; NaN -> None."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _meta_value(v: Any) -> Any:
    """A metadata value: JSON text ([..] / {..}) parsed, everything else as stored."""
    v = _py(v)
    if isinstance(v, str) and v[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, bytes):
        return None
    return v


def _identity(v: Any) -> str | None:
    v = _py(v)
    return None if v is None or v == "" else str(v)


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """Shape from a .npy header without reading the data (None if not a readable .npy)."""
    try:
        with spath(path).open("rb") as f:
            major, _ = np.lib.format.read_magic(f)
            if major == 1:
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
        return tuple(shape)
    except Exception:
        return None


def _model(stage: Stage, row: dict) -> dict | None:
    """{name, fingerprint, weights_real} of the model that made `row` (None without one)."""
    p = stage.model
    if p is None or _py(row.get(f"{p}_model")) is None:
        return None
    real = _py(row.get(f"{p}_weights_real"))
    return {"name": str(row[f"{p}_model"]), "fingerprint": _py(row.get(f"{p}_fingerprint")),
            "weights_real": None if real is None else bool(real)}


def _table_digest(h: "hashlib._Hash", stage: str, rows: list[dict]) -> None:
    h.update(f"\x01{stage}\x00".encode())
    if rows and "sig" in rows[0]:
        for r in rows:
            h.update(f"{r['key']}\x00{r['status']}\x00{r['sig']}\x00".encode())
    else:  # no per-row signature: hash every value
        for r in rows:
            h.update(("\x00".join(f"{k}={r[k]!r}" for k in sorted(r)) + "\x02").encode())


def params_signature(cfg: ShardsConfig) -> str:
    """Hash of the shard params that change the output bytes (not `out`, not the stage lists, whose
    effect is in the joined tables)."""
    return section_hash(cfg, exclude=("out",))


def member_order(base: Stage, stages: Sequence[Stage]) -> list[str]:
    """Sample member names in tar order: the base stage's, each joined stage's, then `json`."""
    names = [m.name for s in (base, *stages) for m in s.members] + ["json"]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"shard member(s) {dup} are contributed by more than one stage")
    return names


def join_tables(root: str | os.PathLike, base: Stage, stages: Sequence[Stage], required: Iterable[str],
                params_sig: str, code: str = "") -> Joined:
    """Join the base stage's table with the `stages` tables; see the module docstring for the rules.
    `required`: names of the stages whose table must exist; `params_sig` and `code` go into the
    signature (the shard params and the shard stage's code fingerprint)."""
    root = spath(root)
    required = set(required)
    order = member_order(base, stages)
    base_rows = read_table_rows(root, base.name)
    h = hashlib.sha256(f"shards\x00{code}\x00{params_sig}\x00".encode())
    _table_digest(h, base.name, base_rows)
    tables: dict[str, dict[str, dict]] = {}
    missing: list[str] = []
    for stage in stages:
        try:
            rows = read_table_rows(root, stage.name)
        except FileNotFoundError:
            if stage.name in required:
                raise FileNotFoundError(
                    f"shards: the required stage table {root / stage.name / 'table.parquet'} is missing; run the "
                    f"'{stage.name}' stage first, or list '{stage.name}' under shards.optional"
                ) from None
            log.warning("shards: optional stage '%s' has no table; shards are written without it", stage.name)
            missing.append(stage.name)
            h.update(f"\x01{stage.name}\x00missing".encode())
            continue
        _table_digest(h, stage.name, rows)
        tables[stage.name] = {r["key"]: r for r in rows}

    ok = sorted((r for r in base_rows if r["status"] == "ok"), key=lambda r: r["key"])
    rejected: dict[str, int] = {}
    for r in base_rows:
        if r["status"] != "ok":
            rejected[str(r["status"])] = rejected.get(str(r["status"]), 0) + 1
    blobs = {s.name: ItemStore(root, s.name).blobs for s in (base, *stages)}

    def take(stage: Stage, row: dict, members: dict) -> str | None:
        """Add the stage's members of `row` to `members`; the exclusion reason, if any."""
        for m in stage.members:
            v = _py(row.get(m.column))
            if m.kind == "text":
                members[m.name] = (m, "" if v is None else str(v))
                continue
            if not isinstance(v, str) or not v:
                return f"{stage.name}:blob_missing"
            path = blobs[stage.name].path(v)
            if not path.is_file():
                return f"{stage.name}:blob_missing"
            if m.kind == "npy" and m.shape is not None and _npy_shape(path) != tuple(m.shape):
                return f"{stage.name}:bad_shape"
            members[m.name] = (m, path)
        return None

    out: list[dict] = []
    excluded: dict[str, list[str]] = {}
    for a in ok:
        key = a["key"]
        members: dict[str, tuple[Member, Any]] = {}
        meta: dict[str, Any] = {"key": key}
        models: dict[str, Any] = {}
        reason = take(base, a, members)
        per_stage = [(base, a)]
        for stage in stages:
            if reason:
                break
            if stage.name in missing:
                for m in stage.members:
                    if m.kind == "text" and m.missing is not None:
                        members[m.name] = (m, m.missing)
                continue
            r = tables[stage.name].get(key)
            if r is None:
                reason = f"{stage.name}:missing"
                break
            if r.get("status") != "ok":
                reason = f"{stage.name}:{r.get('status')}"
                break
            reason = take(stage, r, members)
            per_stage.append((stage, r))
        if reason:
            excluded.setdefault(reason, []).append(key)
            continue
        for stage, r in per_stage:
            for jk, col in stage.meta:
                meta[jk] = _meta_value(r.get(col))
            if stage.model:
                models[stage.name] = _model(stage, r)
        meta["identity"] = _identity(meta.get("identity"))
        meta["models"] = models
        grid = {}
        for m, v in members.values():
            if m.role:
                grid[m.role] = v
        out.append({"key": key, "identity": meta["identity"], "image_id": meta.get("image_id"),
                    "members": members, "meta": meta, "grid": grid})
    return Joined(
        rows=out,
        faces_in=len(ok),
        excluded={k: excluded[k] for k in sorted(excluded)},
        base_rejected=dict(sorted(rejected.items())),
        missing=missing,
        stages=[s.name for s in stages],
        signature=h.hexdigest()[:32],
        member_order=order,
        base=base.name,
    )


# ============================================================================================
# split


def identity_unit(identity: str, seed: int) -> float:
    """Deterministic number in [0, 1) for an identity: sha256(seed, identity) / 2**64."""
    d = hashlib.sha256(f"{seed}\x00{identity}".encode()).hexdigest()[:16]
    return int(d, 16) / 2.0**64


def split_identities(identities: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """identity -> 'train' | 'val'. With >= 2 identities and val_fraction > 0 both splits are non-empty."""
    ids = sorted(set(identities))
    u = {i: identity_unit(i, seed) for i in ids}
    out = {i: "val" if u[i] < val_fraction else "train" for i in ids}
    if val_fraction > 0 and len(ids) >= 2:
        if "val" not in out.values():
            out[min(ids, key=lambda i: (u[i], i))] = "val"
        if "train" not in out.values():
            out[max(ids, key=lambda i: (u[i], i))] = "train"
    return out


def assign_splits(rows: Sequence[dict], val_fraction: float, seed: int) -> dict[str, str]:
    """face key -> split; unlabeled faces always 'train'."""
    by_id = split_identities((r["identity"] for r in rows if r["identity"] is not None), val_fraction, seed)
    return {r["key"]: "train" if r["identity"] is None else by_id[r["identity"]] for r in rows}


# ============================================================================================
# writer


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _npy_member(raw: bytes, m: Member) -> bytes:
    """A .npy blob as its shard member: cast to the member's dtype, reshaped to its shape."""
    a = np.load(io.BytesIO(raw), allow_pickle=False)
    if m.dtype:
        a = a.astype(m.dtype)
    return _npy_bytes(a.reshape(m.shape) if m.shape else a)


def _npy_as_is(raw: bytes, m: Member) -> bool:
    """Whether a .npy blob already is its member's bytes (np.save format 1.0, C order, the member's
    dtype and shape): then it is copied, not decoded and encoded again."""
    try:
        f = io.BytesIO(raw)
        if np.lib.format.read_magic(f) != (1, 0):
            return False
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    except Exception:
        return False
    return (not fortran and (m.shape is None or tuple(shape) == tuple(m.shape))
            and (not m.dtype or dtype == np.dtype(m.dtype)) and dtype.isnative
            and len(raw) == f.tell() + int(np.prod(shape)) * dtype.itemsize)


def sample_members(row: dict, split: str, order: Sequence[str]) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one face, in `order` (json last)."""
    data: dict[str, bytes] = {}
    for name, (m, v) in row["members"].items():
        if m.kind == "text":
            data[name] = v.encode("utf-8")
        elif m.kind == "npy":
            raw = v.read_bytes()
            data[name] = raw if _npy_as_is(raw, m) else _npy_member(raw, m)
        else:
            data[name] = v.read_bytes()
    data["json"] = _json_bytes({**row["meta"], "split": split})
    return [(f"{row['key']}.{k}", data[k]) for k in order if k in data]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _HashingWriter:
    """A binary file wrapper that hashes what is written through it (sha256) and counts its bytes."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha256.update(b)
        self.size += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


def write_tar(path: "str | os.PathLike | RemotePath", samples: Iterable[list[tuple[str, bytes]]]) -> tuple[int, str, int]:
    """Write samples (lists of (name, bytes)) to a tar atomically; returns (samples, sha256, bytes).
    Object stores: the tar is built in a local temp file and uploaded as one object."""
    dest = spath(path)
    remote = is_remote(dest)
    if remote:
        fd, tmpname = tempfile.mkstemp(prefix=".persona-shard-", suffix=".tar.tmp")
        os.close(fd)
        tmp = Path(tmpname)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    n = 0
    try:
        with open(tmp, "wb") as f:
            hw = _HashingWriter(f)  # the sha256 is computed while writing (no second read of the tar)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for members in samples:
                    for name, data in members:
                        tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        h = hw.sha256
        size = hw.size
        if remote:
            dest.put_file(tmp)
            tmp.unlink()
        else:
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n, h.hexdigest(), size


def _read_index(out: "Path | RemotePath") -> dict | None:
    p = out / "index.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def previous_keys(out: str | os.PathLike) -> set[str]:
    """Face keys of the shards written by the last completed run (empty when none)."""
    p = spath(out) / "samples.tsv"
    if not p.exists():
        return set()
    lines = p.read_text().splitlines()[1:]
    return {ln.split("\t", 1)[0] for ln in lines if ln}


def index_is_current(out: str | os.PathLike, signature: str) -> bool:
    """True when `out` holds a complete run for this input signature (shards present, same sizes)."""
    out = spath(out)
    idx = _read_index(out)
    if not idx or idx.get("signature") != signature:
        return False
    if not (out / "samples.tsv").exists() or not (out / "grid.png").exists():
        return False
    for s in idx.get("shards", []):
        p = out / s["file"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return False
    return True


def _remove_stale(out: "Path | RemotePath", keep: set[str]) -> list[str]:
    removed = []
    for split in SPLITS:
        d = out / split
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            rel = f"{split}/{p.name}"
            stale_tar = p.suffix == ".tar" and rel not in keep
            stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            if p.is_file() and (stale_tar or stale_tmp):
                p.unlink()
                removed.append(rel)
    return removed


def _summary(values: list[int]) -> dict:
    if not values:
        return {"count": 0, "min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    a = np.asarray(values)
    return {"count": int(a.size), "min": int(a.min()), "median": float(np.median(a)),
            "mean": round(float(a.mean()), 3), "max": int(a.max())}


def write_shards(joined: Joined, out: str | os.PathLike, cfg: ShardsConfig, force: bool = False) -> tuple[dict, bool]:
    """Write tars, samples.tsv, grid.png and index.json (last: the completion marker).

    Returns (index, rewritten). Nothing is written when `out` already holds this input signature.
    """
    out = spath(out)
    if not force and index_is_current(out, joined.signature):
        log.info("shards: inputs unchanged (signature %s); keeping %s", joined.signature, out)
        return _read_index(out), False
    if cfg.samples_per_shard < 1:
        raise ValueError("shards.samples_per_shard must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    split_of = assign_splits(joined.rows, cfg.val_fraction, cfg.seed)
    shards: list[dict] = []
    tsv = ["key\tsplit\tshard\tidentity"]
    shard_of: dict[str, str] = {}
    for split in SPLITS:
        rows = [r for r in joined.rows if split_of[r["key"]] == split]  # already sorted by key
        for i in range(0, len(rows), cfg.samples_per_shard):
            chunk = rows[i : i + cfg.samples_per_shard]
            rel = f"{split}/{split}-{i // cfg.samples_per_shard:06d}.tar"
            n, sha, size = write_tar(out / rel, (sample_members(r, split, joined.member_order) for r in chunk))
            crash_point("tar")
            shards.append({"split": split, "file": rel, "samples": n, "bytes": size, "sha256": sha,
                           "first_key": chunk[0]["key"], "last_key": chunk[-1]["key"]})
            for r in chunk:
                shard_of[r["key"]] = rel
    removed = _remove_stale(out, {s["file"] for s in shards})
    if removed:
        log.info("shards: removed %d stale file(s): %s", len(removed), removed)
    for r in joined.rows:
        tsv.append(f"{r['key']}\t{split_of[r['key']]}\t{shard_of[r['key']]}\t{r['identity'] or ''}")

    identities: dict[str, dict] = {}
    for r in joined.rows:
        if r["identity"] is None:
            continue
        d = identities.setdefault(r["identity"], {"split": split_of[r["key"]], "faces": 0, "_images": set()})
        d["faces"] += 1
        d["_images"].add(r["image_id"])
    for d in identities.values():
        d["images"] = len(d.pop("_images"))
    splits = {}
    for split in SPLITS:
        keys = [r for r in joined.rows if split_of[r["key"]] == split]
        splits[split] = {
            "samples": len(keys),
            "shards": sum(1 for s in shards if s["split"] == split),
            "identities": sum(1 for d in identities.values() if d["split"] == split),
            "unlabeled": sum(1 for r in keys if r["identity"] is None),
        }
    index = {
        "signature": joined.signature,
        "params": {k: v for k, v in asdict(cfg).items() if k not in ("out", "required", "optional")},
        "stages": [joined.base, *joined.stages],
        "sample_keys": list(joined.member_order),
        "missing_optional_stages": joined.missing,
        "splits": splits,
        "shards": shards,
        "identities": {k: identities[k] for k in sorted(identities)},
    }
    grid_sig = grid_signature(joined.rows, split_of, cfg.grid_size, cfg.grid_tile)
    index["grid_signature"] = grid_sig
    atomic_write_bytes(out / "samples.tsv", ("\n".join(tsv) + "\n").encode())
    old = _read_index(out)
    if not (old and old.get("grid_signature") == grid_sig and (out / "grid.png").exists()):  # else: same picture
        atomic_write_bytes(out / "grid.png", sample_grid(joined.rows, split_of, cfg.grid_size, cfg.grid_tile))
    crash_point("index")
    atomic_write_json(out / "index.json", index)
    return index, True


def shard_metrics(joined: Joined, index: dict) -> dict:
    """DVC metrics: faces in == written + sum(excluded); identities and images per identity."""
    written = {s: index["splits"][s]["samples"] for s in SPLITS}
    excluded = {k: len(v) for k, v in joined.excluded.items()}
    ids = index["identities"]
    models: dict[str, list] = {}
    for r in joined.rows:
        for stage, m in r["meta"]["models"].items():
            if m is not None and m not in models.setdefault(stage, []):
                models[stage].append(m)
    for stage in models:
        models[stage].sort(key=lambda m: (m["name"], str(m["fingerprint"])))
    metrics = {
        "faces_in": joined.faces_in,
        "written": {**written, "total": sum(written.values())},
        "excluded": excluded,
        "excluded_total": sum(excluded.values()),
        f"{joined.base}_rejected": joined.base_rejected,
        "identities": {s: index["splits"][s]["identities"] for s in SPLITS},
        "unlabeled_faces": {s: index["splits"][s]["unlabeled"] for s in SPLITS},
        "shards": {s: index["splits"][s]["shards"] for s in SPLITS},
        "faces_per_identity": _summary([d["faces"] for d in ids.values()]),
        "images_per_identity": _summary([d["images"] for d in ids.values()]),
        "missing_optional_stages": joined.missing,
        "models": models,
        "all_weights_real": all(m.get("weights_real") is True for ms in models.values() for m in ms),
    }
    if metrics["written"]["total"] + metrics["excluded_total"] != joined.faces_in:
        raise AssertionError(f"shards: {joined.faces_in} faces in != {metrics['written']['total']} written "
                             f"+ {metrics['excluded_total']} excluded")
    return metrics


# ---- sample grid

SPLIT_COLOURS = {"train": (0, 220, 90), "val": (255, 140, 0)}


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        cand = f"{cur} {word}".strip()
        if draw.textlength(cand, font=font) <= width or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def _grid_rows(rows: Sequence[dict], n: int) -> list[dict]:
    """The faces of the grid: up to n, evenly spaced by key."""
    sel = list(rows)
    if len(sel) > n > 0:
        picks = sorted({round(i * (len(sel) - 1) / max(1, n - 1)) for i in range(n)})
        sel = [sel[i] for i in picks]
    return sel[:n] if n > 0 else []


def grid_signature(rows: Sequence[dict], split_of: dict[str, str], n: int = 16, tile: int = 128) -> str:
    """Hash of everything `sample_grid` draws (the bytes of its faces and masks, its texts, identities,
    splits, layout; reads only the up to n faces drawn): equal signatures give the same picture."""
    h = hashlib.sha256(f"grid\x00{n}\x00{tile}".encode())
    for r in _grid_rows(rows, n):
        g = {k: v if isinstance(v, str) else hashlib.sha256(v.read_bytes()).hexdigest() for k, v in r["grid"].items()}
        h.update(_json_bytes([r["key"], r["identity"], split_of[r["key"]], g]))
    return h.hexdigest()[:32]


def sample_grid(rows: Sequence[dict], split_of: dict[str, str], n: int = 16, tile: int = 128) -> bytes:
    """PNG bytes: up to n faces (evenly spaced by key: the `grid` member) with the `grid_mask` member
    tinted in the split colour (green train, orange val) and identity + the `grid_text` member below.
    Deterministic."""
    from PIL import Image, ImageDraw, ImageFont

    sel = _grid_rows(rows, n)
    cols = max(1, math.ceil(math.sqrt(len(sel)))) if sel else 1
    nrows = max(1, math.ceil(len(sel) / cols)) if sel else 1
    font = ImageFont.load_default()
    text_h = 4 * 12 + 4
    canvas = Image.new("RGB", (cols * tile, nrows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(sel):
        g = r["grid"]
        if "grid" in g:
            face = Image.fromarray(decode_image(g["grid"].read_bytes())).convert("RGB")
            face = face.resize((tile, tile), Image.Resampling.BILINEAR)
        else:
            face = Image.new("RGB", (tile, tile), (200, 200, 200))
        arr = np.asarray(face, dtype=np.float32)
        colour = np.array(SPLIT_COLOURS[split_of[r["key"]]], dtype=np.float32)
        if "grid_mask" in g:
            m = Image.fromarray(decode_image(g["grid_mask"].read_bytes())).convert("L")
            a = np.asarray(m.resize((tile, tile), Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255.0 * 0.4
            arr = arr * (1 - a) + colour * a
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        canvas.paste(Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8)), (x, y))
        head = f"{r['identity'] or 'unlabeled'} [{split_of[r['key']]}]"
        lines = [head[:40]] + _wrap(draw, g.get("grid_text") or "(no text)", font, tile - 4, 3)
        for j, ln in enumerate(lines):
            draw.text((x + 2, y + tile + 1 + 12 * j), ln, fill=(0, 0, 0), font=font)
    return encode_png(np.asarray(canvas))


# ============================================================================================
# synthetic samples (cheap training tests)


def synthetic_samples(
    n: int, identities: int = 4, seed: int = 0, size: int = 64, unlabeled: int = 0, encoded: bool = False
) -> list[dict]:
    """n in-memory samples with the shard keys, decoded like `make_dataset(decode=True)` output
    (encoded=True: bytes like tar members). Faces cycle over `identities` ids ('synthetic_000', ...),
    the last `unlabeled` are unlabeled; each identity has its own colour and a unit id embedding
    near its own centre; wplus float16 (18, 512), id float32 (512,)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(identities, 1), ID_SHAPE[0])).astype(np.float32)
    colours = rng.integers(40, 215, size=(max(identities, 1), 3))
    yy, xx = np.mgrid[:size, :size]
    ell = (((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.28)) ** 2) <= 1
    mask = (ell * 255).astype(np.uint8)
    out = []
    for i in range(n):
        labeled = identities > 0 and i < n - unlabeled
        c = i % identities if labeled else None
        ident = f"synthetic_{c:03d}" if labeled else None
        base = colours[c] if labeled else rng.integers(40, 215, size=3)
        noise = rng.integers(-20, 21, size=(size, size, 3))
        face = np.clip(np.where(ell[..., None], base, 255 - base) + noise, 0, 255).astype(np.uint8)
        wild = np.clip(face.astype(np.int16)[::-1] // 2 + 64, 0, 255).astype(np.uint8)
        e = (centres[c] if labeled else rng.standard_normal(ID_SHAPE[0])) + 0.3 * rng.standard_normal(ID_SHAPE[0])
        e = (e / np.linalg.norm(e)).astype(np.float32)
        w = rng.standard_normal(WPLUS_SHAPE).astype(np.float16)
        key = f"{hashlib.sha256(f'synthetic{seed}-{i}'.encode()).hexdigest()[:16]}-0"
        image_id = hashlib.sha256(f"synthetic{seed}-{i}".encode()).hexdigest()
        meta = {"key": key, "identity": ident, "source": "synthetic", "image_id": image_id, "face_index": 0,
                "bbox": [8.0, 8.0, size - 8.0, size - 8.0], "landmarks": [[0.0, 0.0]] * 5,
                "landmarks_aligned": [[0.0, 0.0]] * 5, "quad": [[0.0, 0.0]] * 4, "score": 1.0, "split": "train",
                "models": {s: {"name": "synthetic", "fingerprint": "synthetic", "weights_real": False}
                           for s in ("detector", "caption", "wplus", "identity")}}
        s = {"__key__": key, "jpg": wild, "face.jpg": face, "mask.png": mask, "face_mask.png": mask,
             "txt": f"a photo of {ident or 'a person'}", "wplus.npy": w, "id.npy": e, "json": meta}
        if encoded:
            s = {"__key__": key, "jpg": encode_jpeg(wild), "face.jpg": encode_jpeg(face), "mask.png": encode_png(mask),
                 "face_mask.png": encode_png(mask), "txt": s["txt"].encode(), "wplus.npy": _npy_bytes(w),
                 "id.npy": _npy_bytes(e), "json": _json_bytes(meta)}
        out.append(s)
    return out


def encoded_members(sample: dict) -> list[tuple[str, bytes]]:
    """An encoded sample dict (bytes values) -> tar members in `MEMBER_ORDER` (for `write_tar`)."""
    return [(f"{sample['__key__']}.{k}", sample[k]) for k in MEMBER_ORDER if k in sample]
