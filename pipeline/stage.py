"""The item-stage runner every per-item stage uses (reader -> workers -> writer).

A stage supplies its inputs (rows with `key` and the upstream `sig`), a picklable worker factory and
what identifies its results (version, params hash, model fingerprint). The runner:
1. computes each input's cache key and skips the ones whose part is already committed;
2. maps the rest over the Ray actor pool (`runtime.map_batches`);
3. commits results as parquet parts every `part_size` inputs (and at least every 30 s), so a kill
   loses at most the batches in flight;
4. consolidates the current rows into `table.parquet` and writes counts (`in == sum(out)`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from .config import Params, RuntimeConfig
from .runtime import Factory, map_batches
from .storage import RemotePath, spath
from .store import ItemStore, atomic_write_json, hash_key, status_counts

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
    name: str
    version: str  # bump when the stage's code changes its results
    params_hash: str
    fingerprint: str = "none"  # model fingerprint(s)
    batch_size: int = 16
    num_gpus: float = 0.0


@dataclass
class RunStats:
    stage: str
    inputs: int
    computed: int
    cached: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "inputs": self.inputs,
            "computed": self.computed,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
        }


def cache_key(spec: StageSpec, item_key: str, upstream_sig: str) -> str:
    return hash_key(spec.name, item_key, upstream_sig, spec.version, spec.params_hash, spec.fingerprint)


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
    with `key`, `status` and `error`. The runner adds `cache_key` and, unless the row carries its
    own content signature, `sig` to every row.
    """
    t0 = time.perf_counter()
    for it in inputs:
        it["cache_key"] = cache_key(spec, it["key"], it.get("sig", ""))
    done = store.done()
    todo = [it for it in inputs if it["cache_key"] not in done]
    log.info("%s: %d inputs, %d cached, %d to compute", spec.name, len(inputs), len(inputs) - len(todo), len(todo))

    buffer: list[dict] = []
    pending_inputs = 0
    last_commit = time.monotonic()
    run_info: dict = {}
    for batch, results in map_batches(
        factory, todo, spec.batch_size, runtime, num_gpus=spec.num_gpus, desc=spec.name, stats=run_info
    ):
        for item, rows in zip(batch, results):
            if not rows:
                rows = [{"key": item["key"], "status": "error", "error": "worker returned no row"}]
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

    table = store.consolidate(it["cache_key"] for it in inputs)
    stats = RunStats(
        stage=spec.name,
        inputs=len(inputs),
        computed=len(todo),
        cached=len(inputs) - len(todo),
        seconds=time.perf_counter() - t0,
        counts=status_counts(table),
    )
    store.write_last_run({**stats.as_dict(), "nodes": run_info.get("nodes", {})})
    log.info("%s: done in %.1fs: %s", spec.name, stats.seconds, stats.counts)
    return table, stats


def write_metrics(path, metrics: dict) -> None:
    """DVC metrics file (deterministic: counts only, no timings)."""
    atomic_write_json(path, metrics)


def face_inputs(ctx: Context, also: tuple[str, ...] = (), columns: tuple[str, ...] = ()) -> list[dict]:
    """Inputs of a per-face stage: the `ok` align rows, joined with the `ok` rows of `also` stages.

    Each input carries `key`, a `sig` combining the upstream signatures, and the requested columns
    (`<stage>.<column>` names are taken from that stage's table, bare names from align).
    """
    from .store import read_table

    base = read_table(ctx.root, "align", ok_only=True)
    keep = ["key", "sig"] + [c for c in columns if "." not in c]
    df = base[[c for c in keep if c in base.columns]].copy()
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
