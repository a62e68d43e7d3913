"""Content-addressed item store: one folder per stage (DESIGN.md section 2).

Layout of `<root>/<stage>/`:
    parts/part-NNNNNN.parquet   journal of computed rows, each committed by an atomic rename
    blobs/<ck[:2]>/<ck>/<name>  binary outputs (crops, masks, arrays), addressed by cache key
    table.parquet               the stage's output: current rows, one per item key, sorted
    last_run.json               what the last run did (computed / cached counts, seconds)

A row's `cache_key` = hash(stage, item key, upstream signature, stage version, params hash, model
fingerprint). A part's presence is the completion marker of every input in it, so a killed run
keeps its finished parts and the rerun computes only what is missing. `table.parquet` holds no
cache keys or timings: the same inputs give the same bytes however the work was split.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import RemotePath, is_remote, spath

PART_RE = re.compile(r"^part-(\d{6})\.parquet$")
FIRST_COLUMNS = ["key", "status", "error"]


def hash_key(*parts: Any, length: int = 32) -> str:
    """sha256 over the parts joined by NUL, hex-truncated."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def atomic_write_bytes(path: "str | os.PathLike | RemotePath", data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync, rename (object stores:
    one PUT, which is atomic)."""
    if is_remote(path):
        spath(path).write_bytes(data)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def ordered_columns(df: pd.DataFrame) -> pd.DataFrame:
    """key, status, error first, then the rest alphabetically (stable, deterministic files)."""
    first = [c for c in FIRST_COLUMNS if c in df.columns]
    rest = sorted(c for c in df.columns if c not in first)
    return df[first + rest]


def read_parquet(path: "str | os.PathLike | RemotePath", columns: list[str] | None = None) -> pa.Table:
    """A parquet file from local disk or an object store."""
    if is_remote(path):
        return pq.read_table(pa.BufferReader(spath(path).read_bytes()), columns=columns)
    return pq.read_table(path, columns=columns)


def write_parquet_atomic(df: pd.DataFrame, path: "str | os.PathLike | RemotePath") -> None:
    """Deterministic parquet bytes (no index, fixed column order), atomically renamed into place."""
    table = pa.Table.from_pandas(ordered_columns(df).reset_index(drop=True), preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=True, write_statistics=True)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class BlobStore:
    """Blobs of one stage, addressed by (cache key, name). Picklable: workers write blobs directly."""

    def __init__(self, stage_dir: "str | os.PathLike | RemotePath"):
        self.dir = spath(stage_dir) / "blobs"

    def relpath(self, cache_key: str, name: str) -> str:
        return f"blobs/{cache_key[:2]}/{cache_key}/{name}"

    def put(self, cache_key: str, name: str, data: bytes) -> str:
        rel = self.relpath(cache_key, name)
        atomic_write_bytes(self.dir.parent / rel, data)
        return rel

    def path(self, rel: str) -> "Path | RemotePath":
        return self.dir.parent / rel

    def get(self, rel: str) -> bytes:
        return (self.dir.parent / rel).read_bytes()


class ItemStore:
    """Journal + output table of one stage."""

    def __init__(self, root: "str | os.PathLike | RemotePath", stage: str):
        self.root = spath(root)
        self.stage = stage
        self.dir = self.root / stage
        self.parts_dir = self.dir / "parts"
        self.blobs = BlobStore(self.dir)
        self.table_path = self.dir / "table.parquet"

    # ---- journal
    def part_paths(self) -> list:
        if not is_remote(self.parts_dir) and not self.parts_dir.exists():
            return []
        return sorted(p for p in self.parts_dir.iterdir() if PART_RE.match(p.name))

    def done(self) -> set[str]:
        """Cache keys of every committed input (its part exists)."""
        keys: set[str] = set()
        for p in self.part_paths():
            col = read_parquet(p, columns=["cache_key"]).column("cache_key")
            keys.update(col.to_pylist())
        return keys

    def commit(self, rows: list[dict]) -> Path | None:
        """Append rows as the next part; the rename is the commit."""
        if not rows:
            return None
        for r in rows:
            if "cache_key" not in r or "key" not in r:
                raise ValueError("every row needs 'key' and 'cache_key'")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        existing = self.part_paths()
        idx = int(PART_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
        path = self.parts_dir / f"part-{idx:06d}.parquet"
        df = pd.DataFrame(rows)
        for col in df.columns:  # nested values (lists, dicts) are stored as JSON text
            if df[col].map(lambda v: isinstance(v, (list, dict, tuple))).any():
                df[col] = df[col].map(lambda v: None if v is None else json.dumps(v, sort_keys=True))
        write_parquet_atomic(df, path)  # temp file + rename on disk, one PUT in an object store
        return path

    def read_parts(self) -> pd.DataFrame:
        frames = [read_parquet(p).to_pandas() for p in self.part_paths()]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=["key", "status", "error", "cache_key"])
        return pd.concat(frames, ignore_index=True)

    # ---- output
    def consolidate(self, current_cache_keys: Iterable[str]) -> pd.DataFrame:
        """Write table.parquet from the journal rows whose cache key is current; return it."""
        current = set(current_cache_keys)
        parts = self.read_parts()
        rows = parts[parts["cache_key"].isin(current)]
        rows = rows.drop_duplicates(subset=["key"], keep="last")
        rows = rows.sort_values("key", kind="mergesort").drop(columns=["cache_key"])
        rows = rows.reset_index(drop=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(rows, self.table_path)
        return rows

    def table(self) -> pd.DataFrame:
        if not self.table_path.exists():
            raise FileNotFoundError(
                f"{self.table_path} does not exist: run the '{self.stage}' stage first"
            )
        return read_parquet(self.table_path).to_pandas()

    def write_last_run(self, stats: dict) -> None:
        atomic_write_json(self.dir / "last_run.json", stats)

    def last_run(self) -> dict:
        p = self.dir / "last_run.json"
        return json.loads(p.read_text()) if p.exists() else {}


def read_table(root: "str | os.PathLike | RemotePath", stage: str, ok_only: bool = False) -> pd.DataFrame:
    """An upstream stage's output table (optionally only rows with status 'ok')."""
    df = ItemStore(root, stage).table()
    return df[df["status"] == "ok"].reset_index(drop=True) if ok_only else df


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    """{'ok': n, '<reason>': n, ...}; `duplicate_of:<id>` is counted as 'duplicate'."""
    if df.empty:
        return {}
    s = df["status"].astype(str).str.replace(r"^duplicate_of:.*$", "duplicate", regex=True)
    return {k: int(v) for k, v in sorted(s.value_counts().items())}
