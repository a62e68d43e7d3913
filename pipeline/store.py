"""Content-addressed item store: one folder per stage (DESIGN.md section 2).

Layout of `<root>/<stage>/`:
    parts/part-NNNNNN.parquet   journal of computed rows, each committed by an atomic rename
    blobs/<ck[:2]>/<ck>/<name>  binary outputs (crops, masks, arrays), addressed by cache key
    table.parquet               the stage's output: current rows, one per item key, sorted
    .tmp/                       temp files of blob and part writes (renamed into place; emptied at
                                the start and end of every run, so a kill leaves nothing behind)
and `<root>/runs/<stage>.json`: what the last run did (computed / cached counts, seconds, nodes).
The run report lives outside the stage folder: its timings change every run, and the stage folder
is a DVC output whose hash must change only when the results do.

A row's `cache_key` = hash(stage, item key, upstream signature, code fingerprint, params hash, model
fingerprint). A part's presence is the completion marker of every input in it, so a killed run keeps
its finished parts and the rerun computes only what is missing. An input committed again (a retried
failure of the run) is represented by its latest commit. Parts and table follow the stage's explicit
Arrow schema, and `table.parquet` holds no cache keys or timings: the same inputs give the same bytes
however the work was split into parts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .faults import crash_point
from .storage import RemotePath, is_remote, spath

PART_RE = re.compile(r"^part-(\d{6})\.parquet$")
FIRST_COLUMNS = ["key", "status", "error"]
TMP_RE = re.compile(r"^\..+\.tmp$")  # temp files of atomic_write_bytes: .<name>.<random>.tmp


def hash_key(*parts: Any, length: int = 32) -> str:
    """sha256 over the parts joined by NUL, hex-truncated."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))  # file names that are not valid UTF-8
        h.update(b"\x00")
    return h.hexdigest()[:length]


def atomic_write_bytes(path: "str | os.PathLike | RemotePath", data: bytes, tmp_dir: "str | os.PathLike | None" = None) -> None:
    """Write `data` to `path` via a temp file, fsync, rename (object stores: one PUT, which is
    atomic). The temp file is `.<name>.<random>.tmp` in `path`'s folder, or in `tmp_dir` (same
    filesystem), which a store empties at the start of a run."""
    if is_remote(path):
        spath(path).write_bytes(data)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    where = Path(tmp_dir) if tmp_dir is not None else p.parent
    if tmp_dir is not None:
        where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=where)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("rename")
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def table_schema(columns: Mapping[str, pa.DataType], extra: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """A stage table's explicit schema: key, status, error (strings) first, then `sig` and the
    stage's `columns` sorted by name (plus `extra`, e.g. the journal's cache_key)."""
    cols = {"sig": pa.string(), **dict(columns), **dict(extra or {})}
    clash = [c for c in FIRST_COLUMNS if c in cols]
    if clash:
        raise ValueError(f"columns {clash} are the framework's; do not declare them")
    return pa.schema([pa.field(c, pa.string()) for c in FIRST_COLUMNS] + [pa.field(c, cols[c]) for c in sorted(cols)])


def _cell(v: Any, t: pa.DataType) -> Any:
    """A Python value for an Arrow column of type `t` (NaN -> null, numpy -> Python, nested -> JSON)."""
    if v is None:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if pa.types.is_string(t) and isinstance(v, (list, dict, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


def arrow_table(rows: "Iterable[Mapping[str, Any]] | pd.DataFrame", schema: pa.Schema) -> pa.Table:
    """Rows (dicts or a DataFrame) as an Arrow table of exactly `schema`; a column that is not in
    the schema is an error (every stage declares what it writes)."""
    if isinstance(rows, pd.DataFrame):
        return _arrow_from_frame(rows, schema)
    rows = list(rows)
    names = set(schema.names)
    for r in rows:
        unknown = sorted(set(r) - names)
        if unknown:
            raise ValueError(f"columns {unknown} are not in the schema ({', '.join(schema.names)})")
    arrays = []
    for f in schema:
        try:
            arrays.append(pa.array([_cell(r.get(f.name), f.type) for r in rows], type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"column '{f.name}' does not fit {f.type}: {e}") from e
    return pa.Table.from_arrays(arrays, schema=schema)


def _arrow_from_frame(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """`arrow_table` for a DataFrame: column by column (vectorised), a column that does not convert
    as is (nested values, numpy scalars in objects) cell by cell."""
    unknown = sorted(set(df.columns) - set(schema.names))
    if unknown:
        raise ValueError(f"columns {unknown} are not in the schema ({', '.join(schema.names)})")
    arrays = []
    for f in schema:
        col = df[f.name] if f.name in df.columns else pd.Series([None] * len(df), dtype=object)
        try:
            arrays.append(pa.array(col, type=f.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            try:
                arrays.append(pa.array([_cell(v, f.type) for v in col], type=f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
                raise ValueError(f"column '{f.name}' does not fit {f.type}: {e}") from e
    return pa.Table.from_arrays(arrays, schema=schema)


def infer_schema(rows: list[Mapping[str, Any]]) -> pa.Schema:
    """A schema from the values themselves (tools and tests that write rows without a stage)."""
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (list, dict, tuple))).any():
            df[col] = df[col].map(lambda v: None if v is None else json.dumps(v, sort_keys=True))
    t = pa.Table.from_pandas(df, preserve_index=False)
    cols = {f.name: (pa.string() if pa.types.is_null(f.type) else f.type) for f in t.schema
            if f.name not in FIRST_COLUMNS and f.name != "sig"}
    return table_schema(cols)


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


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic parquet bytes: no pandas metadata, one row group, zstd."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(None), sink, compression="zstd", use_dictionary=True,
                   write_statistics=True, row_group_size=max(1, table.num_rows))
    return sink.getvalue().to_pybytes()


def write_table(rows: "Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table", path: "str | os.PathLike | RemotePath",
                schema: pa.Schema, tmp_dir: "str | os.PathLike | None" = None) -> None:
    """Rows as parquet of exactly `schema`, atomically renamed into place."""
    table = rows.select(schema.names).cast(schema) if isinstance(rows, pa.Table) else arrow_table(rows, schema)
    atomic_write_bytes(path, parquet_bytes(table), tmp_dir)


def write_parquet_atomic(df: pd.DataFrame, path: "str | os.PathLike | RemotePath") -> None:
    """A DataFrame as parquet with its inferred schema (no stage schema: tools and tests)."""
    write_table(df, path, infer_schema(df.to_dict("records")))


class BlobStore:
    """Blobs of one stage, addressed by (cache key, name). Picklable: workers write blobs directly."""

    def __init__(self, stage_dir: "str | os.PathLike | RemotePath"):
        self.dir = spath(stage_dir) / "blobs"

    def relpath(self, cache_key: str, name: str) -> str:
        return f"blobs/{cache_key[:2]}/{cache_key}/{name}"

    def put(self, cache_key: str, name: str, data: bytes) -> str:
        """Write a blob atomically (its temp file in the stage's `.tmp/`); returns its relative path."""
        rel = self.relpath(cache_key, name)
        tmp = None if is_remote(self.dir) else self.dir.parent / ".tmp"
        atomic_write_bytes(self.dir.parent / rel, data, tmp)
        return rel

    def path(self, rel: str) -> "Path | RemotePath":
        return self.dir.parent / rel

    def get(self, rel: str) -> bytes:
        return (self.dir.parent / rel).read_bytes()


class ItemStore:
    """Journal + output table of one stage. `schema` is the stage's table schema (`table_schema`);
    None infers it from the rows (tools and tests; every stage run declares one)."""

    def __init__(self, root: "str | os.PathLike | RemotePath", stage: str, schema: pa.Schema | None = None):
        self.root = spath(root)
        self.stage = stage
        self.dir = self.root / stage
        self.parts_dir = self.dir / "parts"
        self.blobs = BlobStore(self.dir)
        self.table_path = self.dir / "table.parquet"
        self.report_path = self.root / "runs" / f"{stage}.json"
        self.schema = schema

    @property
    def part_schema(self) -> pa.Schema:
        assert self.schema is not None
        return self.schema.append(pa.field("cache_key", pa.string()))

    @property
    def tmp_dir(self) -> Path | None:
        """Where temp files of this store's writes go (None on object stores: one PUT each)."""
        return None if is_remote(self.dir) else self.dir / ".tmp"

    # ---- leftovers of a killed run
    def clean_temps(self) -> list[str]:
        """Remove temp files a killed run left: `.tmp/`, `.*.tmp` in the stage folder and parts/, and
        this stage's run-report temps. Only one run of a stage at a time may use its folder."""
        if is_remote(self.dir):
            return []
        removed = []
        if self.tmp_dir.exists():
            removed += [str(p) for p in self.tmp_dir.rglob("*") if p.is_file()]
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for d, prefix in ((self.dir, ""), (self.parts_dir, ""), (self.report_path.parent, f".{self.report_path.name}.")):
            if d.is_dir():
                for p in d.iterdir():
                    if TMP_RE.match(p.name) and p.name.startswith(prefix) and p.is_file():
                        p.unlink()
                        removed.append(str(p))
        return removed

    # ---- journal
    def part_paths(self) -> list:
        if not is_remote(self.parts_dir) and not self.parts_dir.exists():
            return []
        return sorted(p for p in self.parts_dir.iterdir() if PART_RE.match(p.name))

    def journal(self) -> pd.DataFrame:
        """(part, cache_key, key, status) of every committed row, in commit order."""
        frames = []
        for i, p in enumerate(self.part_paths()):
            t = read_parquet(p, columns=["cache_key", "key", "status"]).to_pandas()
            t.insert(0, "part", i)
            frames.append(t)
        if not frames:
            return pd.DataFrame({"part": pd.Series(dtype="int64"), "cache_key": pd.Series(dtype=object),
                                 "key": pd.Series(dtype=object), "status": pd.Series(dtype=object)})
        return pd.concat(frames, ignore_index=True)

    def done(self) -> set[str]:
        """Cache keys of every committed input (its part exists)."""
        return set(self.journal()["cache_key"])

    def results(self, transient: Iterable[str] = ()) -> dict[str, tuple[bool, int]]:
        """cache key -> (its latest commit is a `transient` status, commits with a transient status).
        A transient status records a failure of the run (retried), not a verdict about the input."""
        j = self.journal()
        if j.empty:
            return {}
        j["bad"] = j["status"].isin(set(transient))
        last = j[j["part"] == j.groupby("cache_key")["part"].transform("max")]
        last_bad = last.groupby("cache_key")["bad"].any()
        fails = j.drop_duplicates(["cache_key", "part"]).groupby("cache_key")["bad"].sum()
        return {ck: (bool(last_bad[ck]), int(fails[ck])) for ck in last_bad.index}

    def commit(self, rows: list[dict]) -> Path | None:
        """Append rows as the next part; the rename is the commit."""
        if not rows:
            return None
        for r in rows:
            if "cache_key" not in r or "key" not in r:
                raise ValueError("every row needs 'key' and 'cache_key'")
        if self.schema is None:
            self.schema = infer_schema([{k: v for k, v in r.items() if k != "cache_key"} for r in rows])
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        existing = self.part_paths()
        idx = int(PART_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
        path = self.parts_dir / f"part-{idx:06d}.parquet"
        write_table(rows, path, self.part_schema, self.tmp_dir)  # temp file + rename; one PUT in an object store
        crash_point("commit")
        return path

    def read_parts(self) -> pd.DataFrame:
        frames = [read_parquet(p).to_pandas() for p in self.part_paths()]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=["key", "status", "error", "cache_key"])
        return pd.concat(frames, ignore_index=True)

    # ---- output
    def consolidate(self, current_cache_keys: Iterable[str]) -> pd.DataFrame:
        """Write table.parquet from the latest commit of every current cache key; return it.

        Only the parts holding a current key are read in full (older parts, of older code, may
        follow an older schema)."""
        current = set(current_cache_keys)
        j = self.journal()
        j = j[j["cache_key"].isin(current)]
        j = j[j["part"] == j.groupby("cache_key")["part"].transform("max")]
        paths = self.part_paths()
        if self.schema is None:  # no declared schema (tools, tests): the one the parts were written with
            if len(j):
                first = read_parquet(paths[j["part"].iloc[0]]).schema
                self.schema = first.remove(first.get_field_index("cache_key"))
            else:
                self.schema = table_schema({})
        tables = []
        for part in sorted(set(j["part"])):
            t = read_parquet(paths[part])
            wanted = set(j.loc[j["part"] == part, "cache_key"])
            t = t.filter(pa.array([ck in wanted for ck in t.column("cache_key").to_pylist()], type=pa.bool_()))
            tables.append(t.select(self.schema.names).cast(self.schema))
        crash_point("consolidate")
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        # one row per item key (the latest), sorted by key
        keys = table.column("key").to_pylist()
        last = {k: i for i, k in enumerate(keys)}
        idx = sorted(last.values(), key=lambda i: keys[i])
        table = table.take(pa.array(idx, type=pa.int64()))
        self.dir.mkdir(parents=True, exist_ok=True)
        write_table(table, self.table_path, self.schema, self.tmp_dir)
        crash_point("table")
        return table.to_pandas()

    def table(self) -> pd.DataFrame:
        if not self.table_path.exists():
            raise FileNotFoundError(
                f"{self.table_path} does not exist: run the '{self.stage}' stage first"
            )
        return read_parquet(self.table_path).to_pandas()

    def write_report(self, stats: dict) -> None:
        """The run report (`<root>/runs/<stage>.json`: outside the stage folder, see module doc)."""
        atomic_write_json(self.report_path, stats)

    def report(self) -> dict:
        p = self.report_path
        return json.loads(p.read_text()) if p.exists() else {}


def read_table(root: "str | os.PathLike | RemotePath", stage: str, ok_only: bool = False) -> pd.DataFrame:
    """An upstream stage's output table (optionally only rows with status 'ok')."""
    df = ItemStore(root, stage).table()
    return df[df["status"] == "ok"].reset_index(drop=True) if ok_only else df


def read_table_rows(root: "str | os.PathLike | RemotePath", stage: str) -> list[dict]:
    """An upstream stage's output table as plain Python rows (types as stored: ints stay ints)."""
    store = ItemStore(root, stage)
    if not store.table_path.exists():
        store.table()  # the FileNotFoundError with its message
    return read_parquet(store.table_path).to_pylist()


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    """{'ok': n, '<reason>': n, ...}; `duplicate_of:<id>` is counted as 'duplicate'."""
    if df.empty:
        return {}
    s = df["status"].astype(str).str.replace(r"^duplicate_of:.*$", "duplicate", regex=True)
    return {k: int(v) for k, v in sorted(s.value_counts().items())}
