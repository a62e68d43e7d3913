"""ingest: every input file -> one row (`ok` or a reason code), with hashes and image facts.

Sources (params `ingest.sources`):
- a folder: files in `<path>/<identity>/...` belong to that identity, files directly in `<path>`
  are unlabeled; `labeled: false` makes every file unlabeled (group photos);
- a manifest: a `.csv` (header `path,identity`) or `.jsonl` ({"path": ..., "identity": ...}); relative
  paths are resolved against the manifest's folder.
The decode work is per file and incremental: a file is recomputed only when its size or mtime
changes. Dotfiles are ignored; every other file gets a row.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging

from pipeline.config import IngestConfig, SourceConfig, section_hash
from pipeline.images import BadImage, FILE_TOO_LARGE, EMPTY_FILE, decode_bytes, phash64
from pipeline.storage import is_remote, list_files, spath
from pipeline.stage import Context, StageSpec, run_item_stage, write_metrics
from pipeline.store import atomic_write_bytes, hash_key

VERSION = "1"
UNSUPPORTED_EXTENSION = "unsupported_extension"
MISSING_FILE = "missing_file"
log = logging.getLogger("persona.ingest")


def _folder_entries(src: SourceConfig) -> list[dict]:
    root = spath(src.path)
    if not root.exists():
        raise FileNotFoundError(f"source '{src.name}': folder {root} does not exist")
    out = []
    for rel, f, size, version in list_files(root, recursive=src.recursive):
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        identity = parts[0] if (src.labeled and len(parts) > 1) else None
        out.append({"path": str(f), "relpath": rel, "identity": identity, "sig": f"{size}:{version}"})
    return out


def _manifest_entries(src: SourceConfig) -> list[dict]:
    mpath = spath(src.path)
    base = mpath.parent
    rows: list[dict] = []
    if mpath.suffix.lower() == ".csv":
        for r in csv.DictReader(io.StringIO(mpath.read_text(), newline="")):
            rows.append({"path": r["path"], "identity": r.get("identity") or None})
    else:
        for n, line in enumerate(mpath.read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{mpath}:{n}: invalid JSON: {e}") from e
                rows.append({"path": r["path"], "identity": r.get("identity") or None})
    out = []
    for r in rows:
        p = spath(r["path"])
        full = p if (is_remote(p) or p.is_absolute()) else base / r["path"]
        out.append({"path": str(full), "relpath": r["path"], "identity": r["identity"] if src.labeled else None})
    return out


def list_inputs(cfg: IngestConfig) -> list[dict]:
    """One input dict per file of every source, sorted, with a stat signature for caching."""
    items = []
    for src in cfg.sources:
        is_manifest = spath(src.path).suffix.lower() in (".csv", ".jsonl")
        entries = _manifest_entries(src) if is_manifest else _folder_entries(src)
        for e in entries:
            sig = e.get("sig")
            if sig is None:
                try:
                    st = spath(e["path"]).stat()
                    sig = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    sig = "missing"
            items.append(
                {
                    "key": hash_key(src.name, e["relpath"], length=16),
                    "sig": sig,
                    "source": src.name,
                    "path": e["path"],
                    "relpath": e["relpath"],
                    "identity": e["identity"],
                }
            )
    items.sort(key=lambda it: it["key"])
    keys = [it["key"] for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("two inputs share a source and relative path; give sources distinct names")
    return items


def ingest_one(item: dict, cfg: IngestConfig, params_hash: str) -> dict:
    """Decode and describe one file. Pure apart from reading the file."""
    row = {
        "key": item["key"],
        "source": item["source"],
        "path": item["path"],
        "relpath": item["relpath"],
        "identity": item["identity"],
        "image_id": None,
        "width": None,
        "height": None,
        "format": None,
        "mode": None,
        "phash": None,
        "notes": "",
        "status": "ok",
        "error": "",
    }
    p = spath(item["path"])
    try:
        if p.suffix.lower() not in cfg.extensions:
            raise BadImage(UNSUPPORTED_EXTENSION, f"extension {p.suffix!r} not in ingest.extensions")
        if not p.exists():
            raise BadImage(MISSING_FILE, "listed file does not exist")
        size = p.stat().st_size
        if size == 0:
            raise BadImage(EMPTY_FILE, "file has zero bytes")
        if size > cfg.max_bytes:
            raise BadImage(FILE_TOO_LARGE, f"{size} bytes > limit {cfg.max_bytes}")
        data = p.read_bytes()
        row["image_id"] = hashlib.sha256(data).hexdigest()
        rgb, meta = decode_bytes(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
        row.update(
            width=meta.width,
            height=meta.height,
            format=meta.format,
            mode=meta.orig_mode,
            notes=";".join(meta.notes),
            phash=f"{phash64(rgb, cfg.phash_size):016x}",
        )
    except BadImage as e:
        row["status"] = e.reason
        row["error"] = e.message
    row["sig"] = hash_key("ingest", row["image_id"] or item["key"], row["status"], VERSION, params_hash)
    return row


class _IngestWorker:
    def __init__(self, cfg: IngestConfig, params_hash: str):
        self.cfg, self.params_hash = cfg, params_hash

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        return [[ingest_one(it, self.cfg, self.params_hash)] for it in batch]


def run(ctx: Context) -> dict:
    params = ctx.params
    cfg = params.ingest
    if not cfg.sources:
        raise ValueError("ingest.sources is empty: add a folder or manifest in params.yaml")
    phash = section_hash(cfg, exclude=("batch_size", "sources"))
    spec = StageSpec("ingest", VERSION, phash, batch_size=cfg.batch_size)
    store = ctx.store("ingest")
    inputs = list_inputs(cfg)
    factory = functools.partial(_IngestWorker, cfg, phash)
    table, stats = run_item_stage(spec, store, inputs, factory, params.runtime)

    bad = table[table["status"] != "ok"][["key", "source", "path", "status", "error"]]
    atomic_write_bytes(store.dir / "quarantine.csv", bad.to_csv(index=False).encode())
    ok = table[table["status"] == "ok"]
    metrics = {
        "files_in": int(len(table)),
        "ok": int(len(ok)),
        "by_status": stats.counts,
        "identities": int(ok["identity"].dropna().nunique()),
        "unlabeled": int(ok["identity"].isna().sum()),
        "by_source": {k: int(v) for k, v in sorted(table["source"].value_counts().items())},
    }
    assert metrics["files_in"] == len(inputs) == sum(stats.counts.values()), "counts in != counts out"
    write_metrics(ctx.metrics_path("ingest"), metrics)
    if len(bad):
        log.warning("ingest: %d file(s) quarantined, see %s", len(bad), store.dir / "quarantine.csv")
    return stats.as_dict()
