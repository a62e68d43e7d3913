"""ingest: every input file -> one row (`ok` or a reason code), with hashes and image facts.

Sources (params `ingest.sources`):
- a folder: files in `<path>/<identity>/...` belong to that identity, files directly in `<path>`
  are unlabeled; `labeled: false` makes every file unlabeled (group photos);
- a manifest: a `.csv` (header `path,identity`) or `.jsonl` ({"path": ..., "identity": ...}); relative
  paths are resolved against the manifest's folder. A path outside that folder (absolute, `..`,
  another bucket) gets `outside_source` unless the source says `allow_outside: true`.
Identities are made safe once, here: `identity` is a slug (letters, digits, `._-`; a name that needs
changing gets a hash suffix, so distinct names stay distinct), `identity_label` the name as given.
A file is recomputed when its size or mtime, its label or its source's config changes; its row's
`sig` (what later stages key on) covers its bytes, label, source and path, not its mtime. Dotfiles
are ignored; every other entry but a folder gets a row: FIFOs, sockets, devices and broken links get
`not_a_regular_file` (never opened). A name that is not valid UTF-8 is kept losslessly: `path_raw`
holds its bytes, `path` / `relpath` show it with U+FFFD.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat as stat_mod
import unicodedata

import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import IngestConfig, SourceConfig, section_hash
from pipeline.images import BadImage, FILE_TOO_LARGE, EMPTY_FILE, decode_bytes, phash64
from pipeline.plugins import Stage
from pipeline.storage import display_name, is_remote, list_files, raw_name, spath
from pipeline.stage import Context, StageSpec, prepare, run_item_stage, write_metrics
from pipeline.store import atomic_write_bytes, hash_key

UNSUPPORTED_EXTENSION = "unsupported_extension"
MISSING_FILE = "missing_file"
OUTSIDE_SOURCE = "outside_source"
NOT_A_REGULAR_FILE = "not_a_regular_file"
log = logging.getLogger("persona.ingest")

COLUMNS = {
    "source": pa.string(), "path": pa.string(), "path_raw": pa.binary(), "relpath": pa.string(),
    "identity": pa.string(), "identity_label": pa.string(), "image_id": pa.string(),
    "width": pa.int64(), "height": pa.int64(), "format": pa.string(), "mode": pa.string(),
    "phash": pa.string(), "notes": pa.string(),
}
SAFE_IDENTITY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def identity_slug(label: str) -> str:
    """A name safe as a path component and in any table: `label` itself when it is already
    (letters, digits, `._-`, not starting with `.`/`-`, <= 64 chars), else an ASCII rendering plus
    8 hex digits of its hash (distinct labels stay distinct)."""
    if SAFE_IDENTITY.fullmatch(label):
        return label
    nfkd = unicodedata.normalize("NFKD", display_name(label))  # accents -> base letter + combining mark
    ascii_ = "".join(c if ord(c) < 128 else ("" if unicodedata.combining(c) else "_") for c in nfkd)
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_).strip("._-")[:48] or "id"
    return f"{base}-{hash_key('identity', label, length=8)}"


def _folder_entries(src: SourceConfig) -> list[dict]:
    root = spath(src.path)
    if not root.exists():
        raise FileNotFoundError(f"source '{src.name}': folder {root} does not exist")
    out = []
    for rel, f, size, version in list_files(root, recursive=src.recursive, special=True):
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        identity = parts[0] if (src.labeled and len(parts) > 1) else None
        e = {"path": str(f), "relpath": rel, "identity": identity, "sig": f"{size}:{version}"}
        if version.startswith("special:"):
            e["special"] = version.split(":", 1)[1]
        out.append(e)
    return out


def _inside(base, target) -> bool:
    """Whether `target` lies in folder `base` (lexically, after resolving `.` and `..`)."""
    if is_remote(base) or is_remote(target):
        b, t = spath(str(base)), spath(str(target))
        if not (is_remote(b) and is_remote(t)) or b.protocol != t.protocol:
            return False
        bp, tp = posixpath.normpath(b.path), posixpath.normpath(t.path)
        return tp.startswith(bp.rstrip("/") + "/")
    b = os.path.normpath(os.path.abspath(base))
    t = os.path.normpath(os.path.abspath(target))
    return t.startswith(b.rstrip(os.sep) + os.sep)


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
        e = {"path": str(full), "relpath": r["path"], "identity": r["identity"] if src.labeled else None}
        if not src.allow_outside and not _inside(base, full):
            e["outside"] = True
        out.append(e)
    return out


def list_inputs(cfg: IngestConfig) -> list[dict]:
    """One input dict per file of every source, sorted. `sig` (the cache key's input part) covers the
    file's size and mtime, its label and its source's config."""
    items = []
    for src in cfg.sources:
        is_manifest = spath(src.path).suffix.lower() in (".csv", ".jsonl")
        entries = _manifest_entries(src) if is_manifest else _folder_entries(src)
        src_sig = hash_key(json.dumps(dataclasses.asdict(src), sort_keys=True))
        for e in entries:
            sig = e.get("sig")
            if sig is None:
                try:
                    st = spath(e["path"]).stat()
                    sig = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    sig = "missing"
            label = e["identity"]
            slug = identity_slug(label) if label is not None else None
            items.append(
                {
                    "key": hash_key(src.name, e["relpath"], length=16),
                    "sig": hash_key(sig, src_sig, slug, label, e.get("outside", False), e.get("special", "")),
                    "source": src.name,
                    "path": e["path"],
                    "relpath": e["relpath"],
                    "identity": slug,
                    "identity_label": None if label is None else display_name(label),
                    "outside": e.get("outside", False),
                    "special": e.get("special"),
                }
            )
    items.sort(key=lambda it: it["key"])
    keys = [it["key"] for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("two inputs share a source and relative path; give sources distinct names")
    return items


def ingest_one(item: dict, cfg: IngestConfig, params_hash: str, code: str = "") -> dict:
    """Decode and describe one file. Pure apart from reading the file."""
    row = {
        "key": item["key"],
        "source": item["source"],
        "path": display_name(item["path"]),
        "path_raw": raw_name(item["path"]),
        "relpath": display_name(item["relpath"]),
        "identity": item["identity"],
        "identity_label": item.get("identity_label"),
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
        if item.get("outside"):
            raise BadImage(OUTSIDE_SOURCE, "the manifest lists a path outside its folder; set "
                           "`allow_outside: true` on the source to read it")
        if item.get("special"):
            raise BadImage(NOT_A_REGULAR_FILE, f"not a regular file ({item['special']}); not read")
        if p.suffix.lower() not in cfg.extensions:
            raise BadImage(UNSUPPORTED_EXTENSION, f"extension {display_name(p.suffix)!r} not in ingest.extensions")
        if not p.exists():
            raise BadImage(MISSING_FILE, "listed file does not exist")
        st = p.stat()
        if not is_remote(p) and not stat_mod.S_ISREG(st.st_mode):
            raise BadImage(NOT_A_REGULAR_FILE, "not a regular file; not read")
        size = st.st_size
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
    # what later stages key on: the content and everything recorded about it, not the mtime
    row["sig"] = hash_key("ingest", row["image_id"] or item["key"], row["status"], row["identity"],
                          row["identity_label"], row["source"], item["path"], item["relpath"], code, params_hash)
    return row


class _IngestWorker:
    def __init__(self, cfg: IngestConfig, params_hash: str, code: str):
        self.cfg, self.params_hash, self.code = cfg, params_hash, code

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        return [[ingest_one(it, self.cfg, self.params_hash, self.code)] for it in batch]


def run(ctx: Context) -> dict:
    params = ctx.params
    cfg = params.ingest
    if not cfg.sources:
        raise ValueError("ingest.sources is empty: add a folder or manifest in params.yaml")
    # each file's own source config is in its input signature (list_inputs): adding a source
    # recomputes nothing else
    phash = section_hash(cfg, exclude=("batch_size", "sources"))
    code = code_fingerprint(__name__)
    spec = StageSpec("ingest", code, phash, COLUMNS, batch_size=cfg.batch_size)
    store = prepare(ctx, "ingest")
    inputs = list_inputs(cfg)
    factory = functools.partial(_IngestWorker, cfg, phash, code)
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


STAGE = Stage(name="ingest", run=run, section="ingest")
