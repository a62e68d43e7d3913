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
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .faults import crash_point
from .storage import RemotePath, is_remote, spath

PART_RE = re.compile(r"^part-(\d{6})\.parquet$")
FIRST_COLUMNS = ["key", "status", "error"]
JOURNAL_COLUMNS = ("cache_key", "key", "status")
JOURNAL_RE = re.compile(r"^journal-(\d{6})-(\d{6})\.parquet$")  # index files of the journal (compact_journal)
JOURNAL_GROUP = 64  # parts per journal index file
CONSOLIDATE_GROUP = 65536  # rows per row group of table.parquet (and per bucket of consolidate)
PARQUET_OPTIONS = dict(compression="zstd", use_dictionary=True, write_statistics=True)
TMP_RE = re.compile(r"^\..+\.tmp$")  # temp files of atomic_write_bytes: .<name>.<random>.tmp


def hash_key(*parts: Any, length: int = 32) -> str:
    """sha256 over the parts joined by NUL, hex-truncated."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))  # file names that are not valid UTF-8
        h.update(b"\x00")
    return h.hexdigest()[:length]


def atomic_write_bytes(path: "str | os.PathLike | RemotePath", data: bytes, tmp_dir: "str | os.PathLike | None" = None,
                       sync: bool = True) -> None:
    """Write `data` to `path` via a temp file, fsync, rename (object stores: one PUT, which is
    atomic). The temp file is `.<name>.<random>.tmp` in `path`'s folder, or in `tmp_dir` (same
    filesystem), which a store empties at the start of a run. `sync=False` skips the per-file fsync:
    the file's filesystem is remembered and made durable by the next `sync_written()` (one `syncfs`
    for many files: the blobs of a batch)."""
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
            if sync:
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
    if not sync:
        _UNSYNCED.add(str(p.parent))


# Folders holding files written with sync=False since the last sync_written() (per process).
_UNSYNCED: set[str] = set()


def _syncfs(folder: str) -> bool:
    """syncfs(2) on the filesystem of `folder` (Linux); False where it is not available."""
    import ctypes

    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        fn = _LIBC.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


_LIBC = None


def sync_written() -> int:
    """Make every file written with `atomic_write_bytes(sync=False)` in this process durable: one
    `syncfs` per filesystem (an fsync of each folder where syncfs is missing). The runtime calls
    it after every batch, before the batch's results reach the driver's commit, so a committed part
    never names a blob that a power cut could lose. Returns the number of filesystems synced."""
    if not _UNSYNCED:
        return 0
    folders, seen = sorted(_UNSYNCED), set()
    _UNSYNCED.clear()
    for d in folders:
        try:
            dev = os.stat(d).st_dev
        except FileNotFoundError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        if not _syncfs(d):  # pragma: no cover - non-Linux
            os.sync()
    return len(seen)


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


def read_parquet(path: "str | os.PathLike | RemotePath", columns: list[str] | None = None,
                 small: bool = False) -> pa.Table:
    """A parquet file from local disk or an object store. `small`: a part (a few hundred rows) read
    in this thread through `ParquetFile` (several times cheaper per file than `read_table`, whose
    dataset machinery and thread pool cost more than such a file's data)."""
    src = pa.BufferReader(spath(path).read_bytes()) if is_remote(path) else path
    if small:
        return pq.ParquetFile(src).read(columns=columns, use_threads=False)
    return pq.read_table(src, columns=columns)


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
        """Write a blob atomically (its temp file in the stage's `.tmp/`); returns its relative path.
        Not fsynced one by one: the runtime makes a batch's blobs durable at once (`sync_written`)."""
        rel = self.relpath(cache_key, name)
        tmp = None if is_remote(self.dir) else self.dir.parent / ".tmp"
        atomic_write_bytes(self.dir.parent / rel, data, tmp, sync=False)
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
        self._next_part: int | None = None  # number of the next part (listed once, then counted)

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

    def _listing(self) -> tuple[dict[int, Any], dict[tuple[int, int], Any]]:
        """({part number: path}, {(first, last) part number: journal index file}) in one listing."""
        if not is_remote(self.parts_dir) and not self.parts_dir.exists():
            return {}, {}
        parts, index = {}, {}
        for p in self.parts_dir.iterdir():
            m = PART_RE.match(p.name)
            if m:
                parts[int(m.group(1))] = p
            else:
                m = JOURNAL_RE.match(p.name)
                if m:
                    index[(int(m.group(1)), int(m.group(2)))] = p
        self._next_part = max(parts) + 1 if parts else 0
        return dict(sorted(parts.items())), index

    def part_count(self) -> int:
        """The number of the next part (= parts committed, numbered from 0), from the counter."""
        if self._next_part is None:
            existing = self.part_paths()
            self._next_part = _part_number(existing[-1]) + 1 if existing else 0
        return self._next_part

    def journal_table(self, columns: tuple[str, ...] = JOURNAL_COLUMNS) -> pa.Table:
        """`part` (int32, the part's number), `row` (int32, row in its part) and `columns` (of
        cache_key, key, status) of every committed row, in commit order, as one Arrow table.

        Read from the journal index files (`journal-FIRST-LAST.parquet`: these columns of JOURNAL_GROUP
        consecutive parts, written by `compact_journal` at the end of a run) where they cover a group
        of parts that all exist, and from the parts themselves (in parallel, these columns only)
        elsewhere: about a hundred files for millions of rows instead of thousands."""
        parts, index = self._listing()
        cols = list(columns)
        strings = pa.schema([pa.field(c, pa.string()) for c in cols])
        empty = pa.schema([pa.field("part", pa.int32()), pa.field("row", pa.int32())] + list(strings))
        if not parts:
            return empty.empty_table()
        jobs: list[tuple[str, Any, int]] = []  # ("index", file, first) / ("part", file, number)
        covered: set[int] = set()
        for (a, b), f in sorted(index.items()):
            if all(k in parts for k in range(a, b + 1)) and not covered & set(range(a, b + 1)):
                jobs.append(("index", f, a))
                covered.update(range(a, b + 1))
        jobs += [("part", f, k) for k, f in parts.items() if k not in covered]
        jobs.sort(key=lambda j: j[2])

        def read(job) -> pa.Table:
            kind, f, k = job
            if kind == "index":
                t = read_parquet(f, columns=["part", "row"] + cols, small=True)
                return pa.Table.from_arrays([t.column("part").cast(pa.int32()), t.column("row").cast(pa.int32())]
                                            + [t.column(c).cast(pa.string()) for c in cols], schema=empty)
            t = read_parquet(f, columns=cols, small=True).select(cols).cast(strings)
            n = t.num_rows
            return pa.Table.from_arrays([pa.array(np.full(n, k, dtype=np.int32)), pa.array(np.arange(n, dtype=np.int32))]
                                        + [t.column(c) for c in cols], schema=empty)

        if len(jobs) > 4:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
                tables = list(ex.map(read, jobs))
        else:
            tables = [read(j) for j in jobs]
        return pa.concat_tables(tables)

    def compact_journal(self) -> int:
        """Write a journal index file for every complete group of JOURNAL_GROUP consecutive parts
        that has none (derived data: a pure function of parts that never change; written atomically;
        ignored when one of its parts is gone). Returns the number of files written."""
        parts, index = self._listing()
        have = {a for a, _ in index}
        groups = [g for g in range(0, (max(parts) + 1) // JOURNAL_GROUP if parts else 0)
                  if g * JOURNAL_GROUP not in have and all(k in parts for k in range(g * JOURNAL_GROUP, (g + 1) * JOURNAL_GROUP))]
        if not groups:
            return 0
        j = self.journal_table()
        part = j.column("part").to_numpy()
        for g in groups:
            a, b = g * JOURNAL_GROUP, (g + 1) * JOURNAL_GROUP - 1
            sel = np.flatnonzero((part >= a) & (part <= b))
            t = j.take(pa.array(sel, type=pa.int64()))
            write_table(t, self.parts_dir / f"journal-{a:06d}-{b:06d}.parquet", t.schema, self.tmp_dir)
        return len(groups)

    def journal(self) -> pd.DataFrame:
        """(part, cache_key, key, status) of every committed row, in commit order."""
        return self.journal_table().drop(["row"]).to_pandas()

    def done(self) -> set[str]:
        """Cache keys of every committed input (its part exists)."""
        return set(self.journal_table(("cache_key",)).column("cache_key").to_pylist())

    def index(self, transient: Iterable[str] = ()) -> "JournalIndex":
        """What the journal says about every committed input, vectorised (see `JournalIndex`)."""
        return JournalIndex(self.journal_table(("cache_key", "status")), transient)

    def results(self, transient: Iterable[str] = ()) -> dict[str, tuple[bool, int]]:
        """cache key -> (its latest commit is a `transient` status, commits with a transient status).
        A transient status records a failure of the run (retried), not a verdict about the input."""
        ix = self.index(transient)
        return dict(zip(ix.keys.to_pylist(), zip(ix.last_bad.tolist(), ix.fails.tolist())))

    def commit(self, rows: list[dict]) -> Path | None:
        """Append rows as the next part; the rename is the commit. The part number comes from a
        counter (the folder is listed once per store object, not on every commit)."""
        if not rows:
            return None
        for r in rows:
            if "cache_key" not in r or "key" not in r:
                raise ValueError("every row needs 'key' and 'cache_key'")
        if self.schema is None:
            self.schema = infer_schema([{k: v for k, v in r.items() if k != "cache_key"} for r in rows])
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        path = self.parts_dir / f"part-{self.part_count():06d}.parquet"
        write_table(rows, path, self.part_schema, self.tmp_dir)  # temp file + rename; one PUT in an object store
        self._next_part += 1
        crash_point("commit")
        return path

    def read_parts(self) -> pd.DataFrame:
        frames = [read_parquet(p).to_pandas() for p in self.part_paths()]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=["key", "status", "error", "cache_key"])
        return pd.concat(frames, ignore_index=True)

    # ---- output
    def consolidate(self, current_cache_keys: Iterable[str], columns: list[str] | None = None,
                    read_back: bool = True) -> pd.DataFrame | None:
        """Write table.parquet from the latest commit of every current cache key; return it (its
        `columns`, all by default; nothing with `read_back=False`).

        Streaming, in bounded memory whatever the number of rows: the journal's key columns say which
        row of which part is current and where it goes in key order; the parts holding current rows
        are then read one at a time (older parts, of older code, may follow an older schema: they
        are never read in full), their current rows go to key-range buckets (Arrow IPC temp files in
        `.tmp/`, `CONSOLIDATE_GROUP` rows each), and each bucket, sorted, becomes one row group of
        the table. The row groups depend only on the number of rows: the same rows give the same
        bytes however they were split into parts."""
        current = pa.array(sorted(set(current_cache_keys)), type=pa.string())
        j = self.journal_table(("cache_key", "key"))
        sel = _current_rows(j, current)  # part, row, pos (position in the key-sorted table)
        paths, _ = self._listing()  # part number -> file
        if self.schema is None:  # no declared schema (tools, tests): the one the parts were written with
            if sel.num_rows:
                first = read_parquet(paths[sel.column("part")[0].as_py()]).schema
                self.schema = first.remove(first.get_field_index("cache_key"))
            else:
                self.schema = table_schema({})
        schema = self.schema
        n = sel.num_rows
        group = CONSOLIDATE_GROUP
        tmp_root = self.tmp_dir if self.tmp_dir is not None else Path(tempfile.gettempdir())
        tmp_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".consolidate.", suffix=".tmp", dir=tmp_root))
        try:
            buckets = _Buckets(work, schema, n, group)
            part_of = sel.column("part").to_numpy()
            rows_of = sel.column("row").to_numpy()
            pos_of = sel.column("pos").to_numpy()
            order = np.argsort(part_of, kind="stable")
            bounds = np.flatnonzero(np.diff(part_of[order])) + 1
            for chunk in np.split(order, bounds) if n else []:
                part = int(part_of[chunk[0]])
                t = read_parquet(paths[part], small=True)
                t = t.select(schema.names).cast(schema)
                take = rows_of[chunk]
                buckets.add(t.take(pa.array(take, type=pa.int64())), pos_of[chunk])
            crash_point("consolidate")
            self.dir.mkdir(parents=True, exist_ok=True)
            remote = is_remote(self.table_path)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.table_path.name}.", suffix=".tmp", dir=work if remote else tmp_root)
            os.close(fd)
            try:
                with pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as w:
                    for t in buckets.sorted_groups():
                        w.write_table(t, row_group_size=max(1, t.num_rows))
                    if n == 0:
                        w.write_table(schema.empty_table())
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                crash_point("rename")
                if remote:
                    self.table_path.put_file(tmp)  # one PUT: atomic
                else:
                    os.replace(tmp, self.table_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        crash_point("table")
        if not read_back:
            return None
        return read_parquet(self.table_path, columns=columns).to_pandas()

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




def _part_number(path) -> int:
    return int(PART_RE.match(path.name).group(1))


class JournalIndex:
    """The journal's verdict per committed input, as arrays (no Python object per input).

    `keys`: the distinct cache keys (Arrow); per key `last_bad` (its latest commit has a transient
    status) and `fails` (commits with a transient status). `lookup(cache_keys)` gives, for any cache
    keys, their position in `keys` (-1: never committed)."""

    def __init__(self, j: pa.Table, transient: Iterable[str] = ()):
        ck = j.column("cache_key").combine_chunks() if j.num_rows else pa.array([], type=pa.string())
        enc = pc.dictionary_encode(ck)
        self.keys: pa.Array = enc.dictionary
        codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        part = j.column("part").to_numpy().astype(np.int64) if j.num_rows else np.zeros(0, np.int64)
        status = j.column("status") if j.num_rows else pa.array([], type=pa.string())
        bad = pc.is_in(status, value_set=pa.array(sorted(set(transient)), type=pa.string())).to_numpy(zero_copy_only=False) \
            if j.num_rows else np.zeros(0, bool)
        bad = np.asarray(bad, dtype=bool)
        n = len(self.keys)
        last = np.full(n, -1, dtype=np.int64)
        np.maximum.at(last, codes, part)
        self.last_bad = np.zeros(n, dtype=bool)
        at_last = part == last[codes]
        self.last_bad[codes[at_last & bad]] = True
        # commits (parts) with a transient status, per key: distinct (key, part) pairs among bad rows
        pairs = np.unique(codes[bad] * (int(part.max(initial=0)) + 1) + part[bad])
        self.fails = np.bincount(pairs // (int(part.max(initial=0)) + 1), minlength=n).astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, cache_keys: "Sequence[str] | pa.Array") -> np.ndarray:
        """Positions of `cache_keys` in `keys` (-1 where never committed)."""
        arr = cache_keys if isinstance(cache_keys, pa.Array) else pa.array(list(cache_keys), type=pa.string())
        idx = pc.index_in(arr, value_set=self.keys)
        return np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _current_rows(j: pa.Table, current: pa.Array) -> pa.Table:
    """(part, row, pos) of the rows of table.parquet: of the journal rows whose cache key is current,
    those of the latest commit of their key; then per item key the last such row in commit order;
    `pos` is its position in key order."""
    if j.num_rows == 0:
        return pa.table({"part": pa.array([], pa.int32()), "row": pa.array([], pa.int32()), "pos": pa.array([], pa.int64())})
    keep = pc.is_in(j.column("cache_key"), value_set=current)
    j = j.filter(keep)
    if j.num_rows == 0:
        return pa.table({"part": pa.array([], pa.int32()), "row": pa.array([], pa.int32()), "pos": pa.array([], pa.int64())})
    enc = pc.dictionary_encode(j.column("cache_key").combine_chunks())
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    part = j.column("part").to_numpy().astype(np.int64)
    last = np.full(len(enc.dictionary), -1, dtype=np.int64)
    np.maximum.at(last, codes, part)
    latest = np.flatnonzero(part == last[codes])
    j = j.take(pa.array(latest, type=pa.int64()))
    # one row per item key: the last in commit order (part, row) wins
    kenc = pc.dictionary_encode(j.column("key").combine_chunks())
    kcodes = kenc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((j.column("row").to_numpy(), j.column("part").to_numpy()))
    lastrow = np.full(len(kenc.dictionary), -1, dtype=np.int64)
    lastrow[kcodes[order]] = order  # later assignments win: the last row in commit order
    j = j.take(pa.array(lastrow, type=pa.int64()))
    by_key = pc.sort_indices(j.column("key")).to_numpy()
    pos = np.empty(j.num_rows, dtype=np.int64)
    pos[by_key] = np.arange(j.num_rows, dtype=np.int64)
    return pa.table({"part": j.column("part"), "row": j.column("row"), "pos": pa.array(pos)})


class _Buckets:
    """Rows of a table routed to key-order buckets of `group` positions (Arrow IPC temp files),
    flushed when the buffered rows exceed a budget; `sorted_groups()` yields each bucket in order."""

    BUDGET = 64 * 1024 * 1024  # buffered bytes before the largest bucket is flushed

    def __init__(self, folder: Path, schema: pa.Schema, n: int, group: int):
        self.folder, self.schema, self.group = folder, schema.append(pa.field("__pos", pa.int64())), group
        self.count = (n + group - 1) // group
        self.buf: dict[int, list[pa.Table]] = {}
        self.size: dict[int, int] = {}
        self.writers: dict[int, Any] = {}

    def add(self, rows: pa.Table, pos: np.ndarray) -> None:
        b = pos // self.group
        rows = rows.append_column("__pos", pa.array(pos, type=pa.int64()))
        order = np.argsort(b, kind="stable")
        bs = b[order]
        cuts = np.flatnonzero(np.diff(bs)) + 1
        for idx in np.split(order, cuts):
            k = int(b[idx[0]])
            t = rows.take(pa.array(idx, type=pa.int64()))
            self.buf.setdefault(k, []).append(t)
            self.size[k] = self.size.get(k, 0) + t.nbytes
        while sum(self.size.values()) > self.BUDGET:
            self._flush(max(self.size, key=self.size.get))

    def _flush(self, k: int) -> None:
        if k not in self.writers:
            sink = pa.OSFile(str(self.folder / f"bucket-{k:06d}.arrow"), "wb")
            self.writers[k] = (sink, pa.ipc.new_stream(sink, self.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")))
        for t in self.buf.pop(k, []):
            self.writers[k][1].write_table(t)
        self.size.pop(k, None)

    def sorted_groups(self) -> Iterator[pa.Table]:
        for k in list(self.buf):
            if k in self.writers:
                self._flush(k)
        for _, (sink, w) in self.writers.items():
            w.close()
            sink.close()
        for k in range(self.count):
            parts = list(self.buf.pop(k, []))
            if k in self.writers:
                with pa.memory_map(str(self.folder / f"bucket-{k:06d}.arrow")) as src:
                    parts.append(pa.ipc.open_stream(src).read_all())
            t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            t = t.take(pc.sort_indices(t.column("__pos")))
            yield t.drop(["__pos"]).combine_chunks()


def read_table(root: "str | os.PathLike | RemotePath", stage: str, ok_only: bool = False,
               columns: list[str] | None = None) -> pd.DataFrame:
    """An upstream stage's output table (optionally only rows with status 'ok'; only `columns`)."""
    store = ItemStore(root, stage)
    if columns is None:
        df = store.table()
    else:
        if not store.table_path.exists():
            store.table()  # the FileNotFoundError with its message
        cols = list(dict.fromkeys(list(columns) + (["status"] if ok_only else [])))
        df = read_parquet(store.table_path, columns=cols).to_pandas()
    if ok_only:
        df = df[df["status"] == "ok"].reset_index(drop=True)
        if columns is not None and "status" not in columns:
            df = df.drop(columns=["status"])
    return df


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
    s = df["status"].astype(str)
    counts: dict[str, int] = {}
    for k, v in s.value_counts().items():  # counted per distinct status, then merged
        k = "duplicate" if k.startswith("duplicate_of:") else k
        counts[k] = counts.get(k, 0) + int(v)
    return dict(sorted(counts.items()))
