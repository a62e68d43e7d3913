"""The item-stage runner every per-item stage uses (reader -> workers -> writer).

A stage supplies its inputs (rows with `key` and the upstream `sig`), a picklable worker factory and
what identifies its results (`StageSpec`: code fingerprint, params hash, model fingerprint, output
columns). The runner:
1. removes the temp files a killed run left, computes each input's cache key and skips the ones whose
   latest committed result is final;
2. maps the rest over the Ray actor pool (`runtime.map_batches`);
3. commits results as parquet parts every `part_size` inputs (and at least every 30 s), so a kill
   loses at most the batches in flight;
4. consolidates the current rows into `table.parquet` (the stage's explicit Arrow schema) and writes
   the run report `<root>/runs/<stage>.json` (`in == sum(out)`).

A result with a status in `runtime.TRANSIENT` (`error`: an exception; `worker_crashed`) is a failure
of the run, not a verdict about the input: it is committed and reported, and computed again by the
next run, until `runtime.max_attempts` commits have failed; then it is final, its error saying so with
the attempt count. Verdicts (`decode_error`, `no_face`, ...) are final at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import Params, RuntimeConfig
from .faults import crash_point
from .runtime import TRANSIENT, Factory, map_batches, runs_inline
from .storage import RemotePath, spath
from .store import ItemStore, atomic_write_json, hash_key, status_counts, table_schema

log = logging.getLogger("persona.stage")


@dataclass
class Context:
    """Where a stage reads and writes: the item store root and the DVC metrics folder."""

    params: "Params"
    root: "Path | RemotePath"  # local / NFS folder or an fsspec URL (pipeline/storage.py)
    metrics_dir: "Path | RemotePath"  # DVC metrics (local under DVC; a URL works outside it)

    @classmethod
    def make(cls, params: "Params", root: str | Path | None = None, metrics_dir: str | Path | None = None) -> "Context":
        r = spath(root if root is not None else params.data_root)
        return cls(params, r, spath(metrics_dir) if metrics_dir is not None else Path("metrics"))

    def metrics_path(self, stage: str) -> "Path | RemotePath":
        return self.metrics_dir / f"{stage}.json"

    def store(self, stage: str) -> ItemStore:
        return ItemStore(self.root, stage)


@dataclass
class StageSpec:
    """What identifies a stage's results and what it writes.

    `code`: `pipeline.codefp.code_fingerprint(<stage module>)`; `params_hash`: `section_hash` of the
    params it reads; `fingerprint`: its model's (weights) fingerprint; `columns`: its output columns
    besides key, status, error, sig (the explicit Arrow schema of its parts and table)."""

    name: str
    code: str
    params_hash: str
    columns: Mapping[str, pa.DataType]
    fingerprint: str = "none"
    batch_size: int = 16
    num_gpus: float = 0.0

    @property
    def schema(self) -> pa.Schema:
        return table_schema(self.columns)


@dataclass
class RunStats:
    stage: str
    inputs: int
    computed: int
    cached: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    retrying: int = 0  # failures of the run this time, to be computed again by the next run
    failed: int = 0  # failures of the run that used their last attempt (final)

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "inputs": self.inputs,
            "computed": self.computed,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
            "retrying": self.retrying,
            "failed": self.failed,
        }


def cache_key(spec: StageSpec, item_key: str, upstream_sig: str) -> str:
    return hash_key(spec.name, item_key, upstream_sig, spec.code, spec.params_hash, spec.fingerprint)


def prepare(ctx: Context, stage: str) -> ItemStore:
    """The stage's store, with what a killed run left removed (temp files; its metrics temps)."""
    store = ctx.store(stage)
    removed = store.clean_temps()
    m = ctx.metrics_path(stage)
    for d in (m.parent, m.parent / REPORTS) if isinstance(m, Path) else ():
        for p in d.glob(f".{m.name}.*.tmp") if d.is_dir() else ():
            p.unlink()
            removed.append(str(p))
    if removed:
        log.info("%s: removed %d temp file(s) of an interrupted run", stage, len(removed))
    return store


def _attempt_note(row: dict, attempt: int, max_attempts: int) -> None:
    final = attempt >= max_attempts
    row["error"] = (f"{row.get('error') or ''} [attempt {attempt} of {max_attempts}: "
                    + ("final]" if final else "retried by the next run]"))


def run_item_stage(
    spec: StageSpec,
    store: ItemStore,
    inputs: list[dict],
    factory: Factory | Callable[[], Callable],
    runtime: RuntimeConfig,
    commit_every_s: float = 30.0,
) -> tuple[pd.DataFrame, RunStats]:
    """Compute the missing inputs of a stage, commit them, and return the consolidated table.

    Each input dict needs `key` and may carry `sig` (the upstream row signature). The worker gets
    the input dicts with `cache_key` added and must return, per input, a list of output rows, each
    with `key`, `status` and `error` and only columns of `spec.columns`. The runner adds `cache_key`
    and, unless the row carries its own content signature, `sig` to every row.
    """
    t0 = time.perf_counter()
    store.schema = spec.schema
    store.clean_temps()
    for it in inputs:
        it["cache_key"] = cache_key(spec, it["key"], it.get("sig", ""))
    index = store.index(TRANSIENT)  # vectorised over the journal: no Python object per committed input
    pos = index.lookup([it["cache_key"] for it in inputs])
    max_attempts = runtime.max_attempts
    committed = pos >= 0
    safe = np.where(committed, pos, 0)
    final = committed & (~index.last_bad[safe] | (index.fails[safe] >= max_attempts)) if len(index) else committed
    fails_of = {inputs[i]["cache_key"]: int(index.fails[pos[i]]) for i in np.flatnonzero(committed & ~final)}
    todo = [it for it, f in zip(inputs, final) if not f]
    retried = len(fails_of)
    log.info("%s: %d inputs, %d cached, %d to compute%s", spec.name, len(inputs), len(inputs) - len(todo),
             len(todo), f" ({retried} failed before: retried)" if retried else "")

    # In-process below runtime.inline_below; a previous in-process run that died (a crash, a kill)
    # leaves its marker: this run isolates the items on actors instead.
    marker = _inline_marker(store)
    inline = runs_inline(runtime, len(todo), spec.num_gpus)
    if inline and runtime.executor != "local" and marker is not None and marker.exists():
        log.warning("%s: the last in-process run did not finish: computing on Ray actors this time", spec.name)
        inline = False
    if inline and marker is not None and runtime.executor != "local":
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))

    buffer: list[dict] = []
    pending_inputs = 0
    last_commit = time.monotonic()
    run_info: dict = {}
    retrying = failed = 0
    for batch, outs in map_batches(
        factory, todo, spec.batch_size, runtime, num_gpus=spec.num_gpus, desc=spec.name, stats=run_info,
        inline=inline,
    ):
        crash_point("result")
        for item, rows in zip(batch, outs):
            if not rows:
                rows = [{"key": item["key"], "status": "error", "error": "worker returned no row"}]
            if any(r.get("status") in TRANSIENT for r in rows):
                attempt = fails_of.get(item["cache_key"], 0) + 1
                for r in rows:
                    if r.get("status") in TRANSIENT:
                        _attempt_note(r, attempt, max_attempts)
                if attempt >= max_attempts:
                    failed += 1
                else:
                    retrying += 1
            for r in rows:
                r.setdefault("error", "")
                r["cache_key"] = item["cache_key"]
                r.setdefault("sig", hash_key(item["cache_key"], r["key"]))
                buffer.append(r)
            pending_inputs += 1
        if pending_inputs >= runtime.part_size or time.monotonic() - last_commit > commit_every_s:
            store.commit(buffer)
            buffer, pending_inputs, last_commit = [], 0, time.monotonic()
    store.commit(buffer)
    if marker is not None and marker.exists():
        marker.unlink()

    current = sorted(it["cache_key"] for it in inputs)
    state = _table_state(store, current)
    if todo or store.report().get("table_state") != state or not store.table_path.exists():
        table = store.consolidate(current)
    else:  # nothing committed since the table was written for exactly these inputs
        log.info("%s: table.parquet is current", spec.name)
        table = store.table()
    store.compact_journal()  # the next run reads its journal from ~1/64 of the files
    if store.tmp_dir is not None and store.tmp_dir.exists():
        store.clean_temps()
    stats = RunStats(
        stage=spec.name,
        inputs=len(inputs),
        computed=len(todo),
        cached=len(inputs) - len(todo),
        seconds=time.perf_counter() - t0,
        counts=status_counts(table),
        retrying=retrying,
        failed=failed,
    )
    store.write_report({**stats.as_dict(), "nodes": run_info.get("nodes", {}),
                        "executor": "in-process" if inline else "ray", "table_state": state})
    if retrying:
        log.warning("%s: %d item(s) failed for reasons of the run (not of the input); they are recorded "
                    "and will be computed again by the next run", spec.name, retrying)
    log.info("%s: done in %.1fs: %s", spec.name, stats.seconds, stats.counts)
    return table, stats


def _inline_marker(store: ItemStore) -> "Path | None":
    """`<root>/runs/.<stage>.inline`: present while an in-process run computes (local stores)."""
    return None if isinstance(store.report_path, RemotePath) else store.report_path.parent / f".{store.stage}.inline"


def _table_state(store: ItemStore, current: list[str]) -> dict:
    """What table.parquet was consolidated from: the journal's length and the current cache keys."""
    h = hashlib.sha256()
    for ck in current:
        h.update(ck.encode())
        h.update(b"\x00")
    return {"parts": store.part_count(), "inputs": h.hexdigest()[:32]}


REPORTS = "reports"  # <metrics dir>/reports/<stage>.json: the whole metrics dict, names and lists included


def numbers_only(d: Any) -> Any:
    """The numeric leaves (int, float, bool) of a nested dict, in its structure; None when there are none."""
    if isinstance(d, (int, float)):
        return d
    if isinstance(d, dict):
        out = {k: v for k, v in ((k, numbers_only(v)) for k, v in d.items()) if v is not None}
        return out or None
    return None


def write_metrics(path, metrics: dict) -> None:
    """The DVC metrics file: numbers only (counts, no timings: deterministic), so revisions and
    experiments compare column by column; the whole dict (model names, fingerprints, lists) goes to
    `reports/<name>` beside it."""
    atomic_write_json(path, numbers_only(metrics) or {})
    atomic_write_json(path.parent / REPORTS / path.name, metrics)


def join_inputs(ctx: Context, base: str, also: tuple[str, ...] = (), columns: tuple[str, ...] = ()) -> list[dict]:
    """Inputs of a per-row stage: the `ok` rows of stage `base`, joined by key with the `ok` rows of
    the `also` stages.

    Each input carries `key`, a `sig` combining the upstream signatures, and the requested columns
    (`<stage>.<column>` names are taken from that stage's table, bare names from `base`).
    """
    from .store import read_table

    df = read_table(ctx.root, base, ok_only=True)
    keep = ["key", "sig"] + [c for c in columns if "." not in c]
    df = df[[c for c in keep if c in df.columns]].copy()
    for stage in also:
        other = read_table(ctx.root, stage, ok_only=True)
        cols = [c.split(".", 1)[1] for c in columns if c.startswith(stage + ".")]
        other = other[["key", "sig"] + cols].rename(columns={"sig": f"sig_{stage}", **{c: f"{stage}.{c}" for c in cols}})
        df = df.merge(other, on="key", how="inner")
        df["sig"] = [hash_key(a, b) for a, b in zip(df["sig"], df[f"sig_{stage}"])]
        df = df.drop(columns=[f"sig_{stage}"])
    df = df.sort_values("key", kind="mergesort")
    return df.to_dict("records")


def face_metrics(stage: str, inputs: list[dict], table: pd.DataFrame, info=None, **extra) -> dict:
    """Counts for a per-face stage (faces in == sum of statuses) plus the model identity."""
    counts = status_counts(table)
    m = {"faces_in": len(inputs), "by_status": counts, **extra}
    if info is not None:
        m["model"] = {"name": info.name, "fingerprint": info.fingerprint, "weights_real": info.weights_real}
    if sum(counts.values()) != len(inputs):
        raise AssertionError(f"{stage}: {len(inputs)} faces in but {sum(counts.values())} rows out")
    return m


def model_columns(prefix: str) -> dict[str, pa.DataType]:
    """The model-identity columns `<prefix>_model`, `_fingerprint`, `_weights_real` (see Stage.model)."""
    return {f"{prefix}_model": pa.string(), f"{prefix}_fingerprint": pa.string(), f"{prefix}_weights_real": pa.bool_()}


def array_columns(prefix: str) -> dict[str, pa.DataType]:
    """The columns `array_rows` writes: `<prefix>_blob` plus the model identity."""
    return {f"{prefix}_blob": pa.string(), **model_columns(prefix)}


def array_rows(batch: list[dict], arrays, blobs, prefix: str, info) -> list[list[dict]]:
    """One `ok` row per input holding its array as a float32 `.npy` blob plus the model identity.

    Columns: `<prefix>_blob`, `<prefix>_model`, `<prefix>_fingerprint`, `<prefix>_weights_real`.
    """
    import numpy as np

    from .images import encode_npy

    return [
        [{
            "key": it["key"], "status": "ok", "error": "",
            f"{prefix}_blob": blobs.put(it["cache_key"], f"{it['key']}.{prefix}.npy", encode_npy(np.asarray(a, dtype=np.float32))),
            f"{prefix}_model": info.name, f"{prefix}_fingerprint": info.fingerprint, f"{prefix}_weights_real": info.weights_real,
        }]
        for it, a in zip(batch, arrays)
    ]
