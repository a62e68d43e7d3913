"""shards: join all face tables, identity-disjoint train/val split, WebDataset tars + index + grid.

Output folder: `shards.out`, or `<item store root>/shards` when it is null (the default), so DVC
runs write `data/shards` and `persona build --out DIR` writes `DIR/shards`. The writer is
deterministic (same inputs, same bytes) and rewrites every shard when the joined input signature
(every upstream row signature + shard params) changed; otherwise nothing is written.
`computed` = faces in the shards now that were not in the previous run's shards (from
`<out>/samples.tsv`), so one new photo costs `computed == 1`; `cached` = inputs - computed (faces
already in the shards, plus the excluded ones); `counts` = {ok: written, <stage>:<status>: n}. The folder must persist between runs
(DVC `persist: true`) for that count, and for the no-op skip, to hold.
What is joined comes from the registered stages (`pipeline.plugins`): the one whose `shard` role is
`base` gives the samples, `shards.required` / `shards.optional` name the stages joined to it (null:
each stage's own role), so a new stage with shard members needs no change here.
Outputs: tars, `index.json`, `samples.tsv`, `grid.png` under the folder; DVC metrics
`metrics/shards.json` (faces in == written + excluded per reason); the run report
`<root>/runs/shards.json`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline import plugins
from pipeline.plugins import Stage
from pipeline.codefp import code_fingerprint
from pipeline.config import ShardsConfig
from pipeline.shards import Joined, join_tables, params_signature, previous_keys, shard_metrics, write_shards
from pipeline.stage import Context, prepare, write_metrics
from pipeline.storage import RemotePath, spath

log = logging.getLogger("persona.shards")


def output_dir(ctx: Context) -> "Path | RemotePath":
    """`shards.out` when set, else `<ctx.root>/shards` (local folder or fsspec URL)."""
    out = ctx.params.shards.out
    return spath(out) if out else ctx.root / "shards"


def plan(cfg: ShardsConfig) -> tuple[plugins.Stage, list[plugins.Stage], list[str]]:
    """(base stage, stages joined to it in pipeline order, names of the required ones)."""
    stages = plugins.data_stages()
    bases = [s for s in stages if s.shard == "base"]
    if len(bases) != 1:
        raise ValueError(f"shards: exactly one registered stage must have shard='base', found {[s.name for s in bases]}")
    joinable = {s.name: s for s in stages if s.shard in ("required", "optional")}
    required = cfg.required if cfg.required is not None else [n for n, s in joinable.items() if s.shard == "required"]
    optional = cfg.optional if cfg.optional is not None else [n for n, s in joinable.items() if s.shard == "optional"]
    unknown = sorted((set(required) | set(optional)) - set(joinable))
    if unknown:
        raise ValueError(f"shards.required/optional: unknown stage(s) {unknown}; choose from {sorted(joinable)}")
    both = sorted(set(required) & set(optional))
    if both:
        raise ValueError(f"shards: stage(s) {both} listed as both required and optional")
    joined = [s for s in stages if s.name in set(required) | set(optional)]
    return bases[0], joined, list(required)


def join(root, cfg: ShardsConfig) -> Joined:
    """The faces to shard from the stage tables under `root` (see `pipeline.shards.join_tables`)."""
    base, stages, required = plan(cfg)
    return join_tables(root, base, stages, required, params_signature(cfg), code_fingerprint(__name__))


def run(ctx: Context) -> dict:
    t0 = time.perf_counter()
    cfg = ctx.params.shards
    store = prepare(ctx, "shards")
    out = output_dir(ctx)
    if isinstance(out, Path) and out.is_dir():  # temp files of a killed run's index / tsv / grid writes
        for p in out.glob(".*.tmp"):
            p.unlink()
    joined = join(ctx.root, cfg)
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
    store.write_report(stats)
    log.info("shards: %s -> %s (%s)", metrics["written"], out, "rewritten" if rewritten else "unchanged")
    return stats


STAGE = Stage(name="shards", run=run, after=(plugins.ALL,), section="shards")
