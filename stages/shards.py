"""shards: join all face tables, identity-disjoint train/val split, WebDataset tars + index + grid.

Output folder: `shards.out`, or `<item store root>/shards` when it is null (the default), so DVC
runs write `data/shards` and `persona build --out DIR` writes `DIR/shards`. The writer is
deterministic (same inputs, same bytes) and rewrites every shard when the joined input signature
(every upstream row signature + shard params) changed; otherwise nothing is written.
`computed` = faces in the shards now that were not in the previous run's shards (from
`<out>/samples.tsv`), so one new photo costs `computed == 1`; `cached` = inputs - computed (faces
already in the shards, plus the excluded ones); `counts` = {ok: written, <stage>:<status>: n}. The folder must persist between runs
(DVC `persist: true`) for that count, and for the no-op skip, to hold.
Outputs: tars, `index.json`, `samples.tsv`, `grid.png`, `last_run.json` under the folder; DVC
metrics `metrics/shards.json` (faces in == written + excluded per reason).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.shards import join_tables, previous_keys, shard_metrics, write_shards
from pipeline.stage import Context, write_metrics
from pipeline.storage import RemotePath, spath
from pipeline.store import atomic_write_json

log = logging.getLogger("persona.shards")


def output_dir(ctx: Context) -> "Path | RemotePath":
    """`shards.out` when set, else `<ctx.root>/shards` (local folder or fsspec URL)."""
    out = ctx.params.shards.out
    return spath(out) if out else ctx.root / "shards"


def run(ctx: Context) -> dict:
    t0 = time.perf_counter()
    cfg = ctx.params.shards
    out = output_dir(ctx)
    joined = join_tables(ctx.root, cfg)
    before = previous_keys(out)
    index, rewritten = write_shards(joined, out, cfg)
    metrics = shard_metrics(joined, index)
    write_metrics(ctx.metrics_path("shards"), metrics)
    now = {r["key"] for r in joined.rows}
    computed = len(now - before)
    counts = {"ok": len(now), **{k: len(v) for k, v in joined.excluded.items()}}
    stats = {
        "stage": "shards",
        "inputs": joined.faces_in,
        "computed": computed,
        "cached": joined.faces_in - computed,
        "seconds": round(time.perf_counter() - t0, 3),
        "counts": counts,
        "rewritten": rewritten,
    }
    atomic_write_json(out / "last_run.json", stats)
    log.info("shards: %s -> %s (%s)", metrics["written"], out, "rewritten" if rewritten else "unchanged")
    return stats
