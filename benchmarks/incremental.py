"""Incremental rebuild: full build vs a rebuild after adding 1% new photos.

A hard-linked copy of the `stage_throughput` photo set is built from scratch (ingest, dedup,
align, masks, identity, shards; Ray, one worker per core), then 1% new images (same generator,
new indices) are added and everything is run again, as `dvc repro` would. Each build starts Ray
itself (its start-up is part of the build, measured separately).

Reported: both totals and their ratio (target: rebuild <= 5% of the full build), with and without
the fixed per-run overhead. Fixed overhead = what a run pays whatever the number of items: Ray
start-up, and per Ray stage the time until its actors have loaded their model (process start,
imports, model load: `workload.StageTimer` actor `spawn` + `model_load`). What remains of the
rebuild is the per-item work on the new photos plus the bookkeeping that grows with the whole
data set (reading tables and journals, consolidation, the shard writer), itemised per stage.

    python -m benchmarks.incremental [--n 400] [--percent 1]
"""
from __future__ import annotations

import argparse
import shutil
import time

from benchmarks.common import table, write_result
from benchmarks.workload import (WORK, add_images, context, copy_set, params_for, photo_set, quiet, run_stage,
                                 start_ray, stop_ray)

TARGET = 0.05
STAGES = ("ingest", "dedup", "align", "masks", "identity", "shards")


def build(photos, root) -> dict:
    """One full pipeline run (Ray started and stopped inside); per-stage timings."""
    from stages import align, dedup, identity, ingest, masks, shards

    params = params_for(photos, root, None)
    ctx = context(params, root)
    t0 = time.perf_counter()
    ray_s = start_ray(params)
    stages = {}
    try:
        for name, mod in zip(STAGES, (ingest, dedup, align, masks, identity, shards)):
            r = run_stage(mod, ctx)
            a = r["phases"].get("actor", {})
            fixed = a.get("spawn", 0.0) + a.get("model_load", 0.0)
            stages[name] = {"seconds": round(r["seconds"], 3), "fixed_seconds": round(fixed, 3),
                            "computed": r["stats"].get("computed"), "cached": r["stats"].get("cached"),
                            "inputs": r["stats"].get("inputs"), "phases": r["phases"], "cpu_use": r["cpu"]}
            if name == "shards":
                stages[name]["rewritten"] = r["stats"].get("rewritten")
    finally:
        t1 = time.perf_counter()
        stop_ray()
        stop_s = time.perf_counter() - t1
    total = time.perf_counter() - t0
    fixed = ray_s + stop_s + sum(s["fixed_seconds"] for s in stages.values())
    return {"seconds": round(total, 3), "ray_start_seconds": round(ray_s, 3), "ray_shutdown_seconds": round(stop_s, 3),
            "fixed_seconds": round(fixed, 3), "variable_seconds": round(total - fixed, 3), "stages": stages}


def projection(full: dict, rebuild: dict, n: int, sizes=(4_000, 40_000, 400_000, 4_000_000)) -> dict:
    """Rebuild / full at larger sets, assuming the fixed overhead stays as measured and everything else
    (the work on the new 1%, and the bookkeeping over all items) grows linearly with the set."""
    out = {}
    for m in sizes:
        k = m / n
        out[str(m)] = round((rebuild["fixed_seconds"] + rebuild["variable_seconds"] * k)
                            / (full["fixed_seconds"] + full["variable_seconds"] * k), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images in the photo set")
    ap.add_argument("--percent", type=float, default=1.0, help="new photos added, percent of the set")
    args = ap.parse_args()
    quiet()

    work = WORK / "incremental"
    shutil.rmtree(work, ignore_errors=True)
    photos = copy_set(photo_set(args.n), work / "photos")
    root = work / "data"
    full = build(photos, root)
    k = max(1, round(args.n * args.percent / 100))
    new = add_images(photos, k)
    rebuild = build(photos, root)

    with_ratio = rebuild["seconds"] / full["seconds"]
    without_ratio = rebuild["variable_seconds"] / full["variable_seconds"]
    rows = []
    for s in STAGES:
        f, r = full["stages"][s], rebuild["stages"][s]
        rows.append((s, f["inputs"], f"{f['seconds']:.2f}", r["inputs"], r["computed"], f"{r['seconds']:.2f}",
                     f"{r['fixed_seconds']:.2f}", f"{r['seconds'] - r['fixed_seconds']:.2f}",
                     f"{(r['seconds'] - r['fixed_seconds']) / max(1e-9, f['seconds'] - f['fixed_seconds']):.1%}"))
    rows.append(("ray start + shutdown", "", f"{full['ray_start_seconds'] + full['ray_shutdown_seconds']:.2f}", "", "",
                 f"{rebuild['ray_start_seconds'] + rebuild['ray_shutdown_seconds']:.2f}",
                 f"{rebuild['ray_start_seconds'] + rebuild['ray_shutdown_seconds']:.2f}", "0.00", ""))
    rows.append(("total", "", f"{full['seconds']:.1f}", "", "", f"{rebuild['seconds']:.1f}", f"{rebuild['fixed_seconds']:.1f}",
                 f"{rebuild['variable_seconds']:.1f}", f"{without_ratio:.1%}"))

    targets = {f"rebuild_with_fixed_overhead_le_{TARGET:.0%}": with_ratio <= TARGET,
               f"rebuild_without_fixed_overhead_le_{TARGET:.0%}": without_ratio <= TARGET}
    result = {
        "workload": {"photos": args.n, "added": k, "added_kinds": {x: sum(1 for f in new if f["kind"] == x) for x in {f["kind"] for f in new}}},
        "config": {"executor": "ray", "workers": "one per core", "stages": list(STAGES),
                   "note": "wplus (e4e, no real weights here) and caption (backend none) are not part of these builds"},
        "full_build": full,
        "rebuild": rebuild,
        "ratio_with_fixed_overhead": round(with_ratio, 4),
        "ratio_without_fixed_overhead": round(without_ratio, 4),
        "fixed_overhead_definition": "Ray start-up and shutdown + per Ray stage the actor start (process, imports) and "
                                     "model load; paid by every run whatever the number of new items",
        "projected_ratio_with_fixed_overhead_by_set_size": projection(full, rebuild, args.n),
        "projection": "a linear model, not a measurement: fixed overhead as measured, the rest scaled with the set size",
        "target": f"rebuild after adding {args.percent:g}% photos <= {TARGET:.0%} of the full build",
        "targets": targets,
        "noise": "machine shared with other jobs while measured: compare ratios from the same run, not absolute times",
    }
    result["explanation"] = explain(full, rebuild, with_ratio, without_ratio, k)
    if not all(targets.values()):
        result["missed"] = result["explanation"]
        result["recommended_fixes"] = {
            "fixed overhead": "keep Ray and one actor pool per model family alive across the stages of a run (or run a "
                              "stage in-process when only a few items are new), so a 1% rebuild does not start Ray and "
                              "four sets of actors that import their stack and load their model again",
            "shards": "append new faces to new shards (or rewrite only the shards whose members changed) instead of "
                      "rewriting every tar when any input changed",
        }
    path = write_result("incremental", result)
    print(table(rows, ("stage", "full in", "full s", "rebuild in", "computed", "rebuild s", "fixed s", "rest s", "rest / full rest")))
    print(f"rebuild / full: {with_ratio:.1%} with fixed overhead, {without_ratio:.1%} without (target <= {TARGET:.0%}) -> {path}")
    print("  " + result["explanation"])


def explain(full: dict, rebuild: dict, with_ratio: float, without_ratio: float, k: int) -> str:
    rs = rebuild["stages"]
    rest = {s: rs[s]["seconds"] - rs[s]["fixed_seconds"] for s in STAGES}
    top = sorted(rest.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{s} {v:.2f}s" for s, v in top)
    return (
        f"The rebuild computed only the {k} new photos (see computed per stage), but paid {rebuild['fixed_seconds']:.1f}s of "
        f"fixed overhead (Ray start {rebuild['ray_start_seconds']:.1f}s and shutdown {rebuild['ray_shutdown_seconds']:.1f}s "
        f"+ actor start and model load in each Ray stage), "
        f"the same as the full build, which is {with_ratio:.1%} of a {full['seconds']:.0f}s build at this size; it does "
        f"not shrink with the number of new photos, so the with-overhead ratio falls as the data set grows (see the "
        f"projection). Without it, "
        f"the rebuild is {without_ratio:.1%} of the full build; what remains, largest first: {parts}. shards rewrites every "
        f"tar when any input changed (rewritten={rs['shards'].get('rewritten')}: {rs['shards']['seconds']:.2f}s now vs "
        f"{full['stages']['shards']['seconds']:.2f}s in the full build), every per-item stage re-reads its whole journal and "
        f"rewrites table.parquet, ingest stats every file, and dedup re-runs on all hashes (O(all items) per run); the "
        f"work on the new photos themselves is the actor compute of the rebuild: "
        f"{sum(rs[s]['phases'].get('actor', {}).get('compute', 0) for s in STAGES):.2f}s."
    )


if __name__ == "__main__":
    main()
