"""Per-stage throughput of Persona (Ray, 1 worker) vs a bare single-process loop, per core.

Workload: `benchmarks.workload.photo_set(n)` (n images composited from the real sample photos,
~6% exact/near duplicates). Persona runs ingest, dedup, align, masks, identity and shards on an
empty item store with `runtime.executor: ray`, `runtime.workers: 1` (one actor, one core); the
bare loops (`benchmarks.bare`) do the same decode -> model -> write work in this process with no
framework. Both run with OMP_NUM_THREADS=1 (what Ray gives a 1-CPU actor), so ArcFace's
onnxruntime uses one thread in both.

Reported per stage (units: images for ingest/dedup/align, faces for masks/identity/shards):
- per core (the target, >= 0.8): items per CPU-second, Persona vs bare. Persona's CPU = the driver
  process + Ray's system processes + the actor processes (whole-process CPU: Ray worker start,
  imports, model load, batches); bare = this process during the loop (model load included). CPU
  seconds, not wall time, because a shared machine's wall time measures the other jobs too (their
  CPU use during each run is reported as `others_cpu_s`);
- wall: items/s end to end and in the steady state (Persona's result stream between first and last
  batch vs the bare loop without model load), from the same run;
- Persona's phases (setup / startup / stream / finish; actor spawn, model load, batch compute,
  see `workload.StageTimer`), and the break-even size from which the per-run costs are amortised
  to the target.
The Ray start-up (`ray.init`) is measured separately and EXCLUDED from every stage figure. dedup and
shards run in Persona's driver (no actors); dedup is also measured on a 100,000-row table, and
each step of the shard writer is timed on its own.

    python -m benchmarks.stage_throughput [--n 400]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks import bare
from benchmarks.common import table, write_result
from benchmarks.workload import WORK, CpuMeter, context, manifest, params_for, photo_set, quiet, run_stage, start_ray, stop_ray

TARGET = 0.8
STAGES = ("ingest", "dedup", "align", "masks", "identity", "shards")
UNITS = {"ingest": "images", "dedup": "images", "align": "images", "masks": "faces", "identity": "faces", "shards": "faces"}


def run_persona(photos, root, workers: int) -> tuple[dict, float]:
    from stages import align, dedup, identity, ingest, masks, shards

    shutil.rmtree(root, ignore_errors=True)
    params = params_for(photos, root, workers)
    ctx = context(params, root)
    ray_s = start_ray(params)
    out = {}
    try:
        for name, mod in zip(STAGES, (ingest, dedup, align, masks, identity, shards)):
            r = run_stage(mod, ctx)
            st = r["stats"]
            r["items"] = st["counts"].get("ok", 0) if name == "shards" else st["inputs"]
            out[name] = r
    finally:
        stop_ray()
    return out, ray_s


def _cpu(fn, *a):
    with CpuMeter() as m:
        r = fn(*a)
    r["cpu"] = m.result()
    r["cpu_seconds"] = m.c1 - m.c0
    return r


def run_bare(photos, root, params) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    out = {}
    ing = _cpu(bare.ingest, photos, root / "ingest", params.ingest)
    out["ingest"] = ing
    dd = _cpu(bare.dedup, ing.pop("rows"), root / "dedup", params.dedup.hamming_threshold)
    out["dedup"] = dd
    kept = sorted(r["path"] for r in dd.pop("kept"))
    al = _cpu(bare.align, kept, root / "align", params.align, params.ingest)
    out["align"] = al
    rows = al.pop("rows")
    out["masks"] = _cpu(bare.masks, rows, root / "align", root / "masks", params.masks, params.align.output_size)
    out["identity"] = _cpu(bare.identity, rows, root / "align", root / "identity", params.identity)
    dirs = {"align": root / "align", "masks": root / "masks", "identity": root / "identity"}
    out["shards"] = _cpu(bare.shards, rows, dirs, root / "shards", params.shards.samples_per_shard)
    return out


def dedup_rows(n: int, seed: int = 0):
    """An ingest table of n rows (2% exact copies, 2% near copies of earlier hashes) and its bare rows."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    ids = np.array([f"{i:064x}" for i in range(n)], dtype=object)
    src = rng.integers(0, n // 2, size=n)
    kind = rng.random(n)
    exact, near = kind < 0.02, (kind >= 0.02) & (kind < 0.04)
    exact[: n // 2] = near[: n // 2] = False
    ids[exact] = ids[src[exact]]
    h[exact] = h[src[exact]]
    flips = np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64)
    h[near] = h[src[near]] ^ flips[near]
    w = rng.integers(256, 2048, size=n)
    df = pd.DataFrame({
        "key": [f"{i:016x}" for i in range(n)], "status": "ok", "error": "", "sig": [f"s{i}" for i in range(n)],
        "source": "labeled", "path": [f"/photos/{i}.jpg" for i in range(n)], "path_raw": None,
        "relpath": [f"{i}.jpg" for i in range(n)], "identity": [f"id{i % 1000}" for i in range(n)],
        "identity_label": [f"id{i % 1000}" for i in range(n)], "image_id": ids, "width": w, "height": w,
        "phash": [f"{int(x):016x}" for x in h], "format": "JPEG", "mode": "RGB", "notes": "",
    })
    rows = [{"path": p, "image_id": i, "status": "ok", "width": int(a), "height": int(a), "phash": ph}
            for p, i, a, ph in zip(df["path"], df["image_id"], df["width"], df["phash"])]
    return df, rows


def profiled(fn, top: int = 12) -> tuple[object, list[dict]]:
    """fn() under cProfile (CPU clock): its result and the `top` functions by cumulative CPU seconds."""
    import cProfile
    import pstats

    pr = cProfile.Profile(time.process_time)
    pr.enable()
    try:
        out = fn()
    finally:
        pr.disable()
    st = pstats.Stats(pr)
    rows = []
    for (file, line, func), (_, ncalls, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:top]:
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": ncalls, "cpu_s": round(ct, 3),
                     "own_cpu_s": round(tt, 3)})
    return out, rows


def dedup_at_scale(n: int, root, photos) -> dict:
    """Persona's dedup stage vs the bare loop on an ingest table of n rows (no images needed)."""
    from pipeline.store import write_parquet_atomic
    from stages import dedup

    shutil.rmtree(root, ignore_errors=True)
    df, rows = dedup_rows(n)
    (root / "ingest").mkdir(parents=True)
    write_parquet_atomic(df, root / "ingest" / "table.parquet")
    params = params_for(photos, root, 1)
    p = run_stage(dedup, context(params, root))
    b = _cpu(bare.dedup, rows, root / "bare", params.dedup.hamming_threshold)
    b.pop("kept")
    pc = p["cpu"]["this_process_cpu_s"]
    # where the stage's time goes: its public pieces, timed on their own
    import numpy as np

    from pipeline.hashing import near_duplicate_pairs
    from pipeline.store import read_table

    t = time.process_time()
    src = read_table(root, "ingest", ok_only=True)
    t_read = time.process_time() - t
    t = time.process_time()
    dedup.deduplicate(src[["key", "sig"] + dedup.CARRY], params.dedup.hamming_threshold, params.dedup.across_identities)
    t_dedup = time.process_time() - t
    _, profile = profiled(lambda: dedup.run(context(params, root)))
    t = time.process_time()
    near_duplicate_pairs(np.array([int(h, 16) for h in src["phash"]], dtype=np.uint64), params.dedup.hamming_threshold)
    t_search = time.process_time() - t
    rest = pc - t_read - t_dedup
    return {"rows": n, "persona_seconds": round(p["seconds"], 3), "bare_seconds": round(b["loop_seconds"], 3),
            "persona_cpu_seconds": pc, "bare_cpu_seconds": round(b["cpu_seconds"], 3),
            "ratio_per_core": round(b["cpu_seconds"] / pc, 3), "ratio_wall": round(b["loop_seconds"] / p["seconds"], 3),
            "persona_stats": p["stats"],
            "breakdown_cpu_s": {"read_ingest_table": round(t_read, 3), "deduplicate": round(t_dedup, 3),
                                "of_which_hash_search": round(t_search, 3), "rest_of_run": round(rest, 3)},
            "profile_of_a_rerun_cpu_s": profile,
            "where": f"read the ingest table {t_read:.2f} CPU-s (its used columns); deduplicate() {t_dedup:.2f} CPU-s (of "
                     f"which the multi-index hash search {t_search:.2f}, the same as the bare loop's; the rest: array "
                     f"sorts and one Python step per cluster); the rest of run() {rest:.2f} CPU-s: writing table.parquet, "
                     f"clusters.json, metrics and the run report (the row signatures: one hash per distinct status). "
                     f"The bare loop keeps rows as dicts and writes one JSON file"}


def shards_breakdown(root, params) -> dict:
    """Where Persona's shards stage spends its time: each step of `write_shards`, timed on its own."""
    import hashlib
    import io
    import os as _os
    import tarfile

    from pipeline.shards import assign_splits, sample_grid, sample_members
    from stages.shards import join

    cfg = params.shards
    t = time.perf_counter()
    joined = join(root, cfg)
    t_join = time.perf_counter() - t
    split_of = assign_splits(joined.rows, cfg.val_fraction, cfg.seed)
    t = time.perf_counter()
    members = [sample_members(r, split_of[r["key"]], joined.member_order) for r in joined.rows]
    t_members = time.perf_counter() - t
    tmp = root.parent / "breakdown.tar"
    t = time.perf_counter()
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for ms in members:
                for name, data in ms:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        t_tar = time.perf_counter() - t
        t = time.perf_counter()
        f.flush()
        _os.fsync(f.fileno())
        t_fsync = time.perf_counter() - t
    t = time.perf_counter()
    hashlib.sha256(tmp.read_bytes()).hexdigest()
    t_sha = time.perf_counter() - t
    size = tmp.stat().st_size
    tmp.unlink()
    t = time.perf_counter()
    sample_grid(joined.rows, split_of, cfg.grid_size, cfg.grid_tile)
    t_grid = time.perf_counter() - t
    from pipeline.shards import write_shards

    _, profile = profiled(lambda: write_shards(joined, root.parent / "shards-profile", cfg, force=True))
    # the whole stage again in this process (its output removed): no first-run imports or set-up
    from stages import shards as shards_stage

    shutil.rmtree(root / "shards", ignore_errors=True)
    c = time.process_time()
    shards_stage.run(context(params, root))
    rerun_cpu = time.process_time() - c
    return {
        "stage_rerun_cpu_s": round(rerun_cpu, 3),
        "faces": len(joined.rows), "tar_bytes": size,
        "join_tables_s": round(t_join, 3), "read_members_and_reencode_npy_s": round(t_members, 3),
        "tar_write_s": round(t_tar, 3), "fsync_s": round(t_fsync, 3), "sha256_reread_s": round(t_sha, 3),
        "grid_png_s": round(t_grid, 3),
        "profile_of_write_shards_cpu_s": profile,
        "note": "join_tables reads every stage table and stats/reads every blob header; sample_members reads the "
                "blobs (a .npy blob already in its member's dtype and shape is copied, not re-encoded); write_tar "
                "hashes the tar while writing it (sha256_reread_s is what re-reading it cost before); the grid "
                "decodes and draws 16 faces (skipped on a rerun whose grid inputs are unchanged)",
    }


IMPORTS = {"ingest": "stages.ingest", "align": "stages.align, pipeline.models.faces, mediapipe",
           "masks": "stages.masks, pipeline.models.faces, mediapipe", "identity": "stages.identity, pipeline.models.identity",
           "torch (imported by pipeline.models.identity)": "torch"}


def import_seconds() -> dict:
    """Seconds a fresh Python process spends importing what each stage's actor imports."""
    import subprocess
    import sys

    out = {}
    for name, mods in IMPORTS.items():
        code = f"import time; t = time.perf_counter(); import {mods}; print(time.perf_counter() - t)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=WORK.parent.parent)
        try:
            out[name] = round(float(r.stdout.strip().splitlines()[-1]), 3)
        except (ValueError, IndexError):
            out[name] = None
    return out


DONE = {
    "warm actors": "the actor pool is the process's: the stages of one run share its worker processes (process start "
                   "and library imports paid once; `runtime.keep_warm`)",
    "identity import": "pipeline/models/identity.py imports torch only for the IResNet .pth backend (the ONNX default "
                       "no longer pays the torch import)",
    "blob writes": "BlobStore.put no longer fsyncs each blob: the runtime syncs the filesystem once per batch "
                   "(store.sync_written, one syncfs)",
    "dedup": "array operations throughout deduplicate() (one Python step per cluster, none per row), the used columns "
             "of the ingest table only, the previous table's key column only, row signatures hashed once per "
             "distinct status, a compact clusters.json",
    "shards": "the tar's sha256 is computed while writing it (no re-read), .npy blobs already in their member's dtype "
              "and shape are copied, the grid is drawn again only when its inputs changed",
    "align setup": "the detector's fingerprint comes from its model files (faces.model_info): the driver builds no "
                   "MediaPipe graph",
}


def persona_cpu(p: dict) -> float:
    """CPU seconds Persona spent on a stage: driver process + Ray system processes + the actors."""
    c = p["cpu"]
    return c["this_process_cpu_s"] + c["ray_system_cpu_s"] + c["measured_workers_cpu_s"]


def break_even(p: dict, q: dict, target: float = TARGET) -> float | None:
    """Items per run from which Persona's per-core rate reaches `target` x bare (CPU seconds).

    Persona CPU(N) = F + N * a: `a` = actor CPU inside the batch calls per item, F = the rest
    (actor start, imports, model load, driver, Ray system), taken as fixed. Bare CPU(N) = N * b.
    None when the per-item cost alone is above b / target, or the stage has no actors.
    """
    act = p["phases"].get("actor", {})
    if not act.get("items"):
        return None
    a = act["compute_cpu"] / act["items"]
    fixed = persona_cpu(p) - act["compute_cpu"]
    b = q["cpu_seconds"] / q["items"]
    if b - target * a <= 0:
        return None
    return max(0.0, target * fixed / (b - target * a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images in the photo set")
    ap.add_argument("--dedup-rows", type=int, default=100_000, help="rows of the synthetic table for dedup at scale")
    ap.add_argument("--from-raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    quiet()

    t0 = time.perf_counter()
    photos = photo_set(args.n)
    set_seconds = time.perf_counter() - t0
    work = WORK / "stage_throughput"
    raw = work / "raw.json"
    params = params_for(photos, work / "persona", 1)
    if args.from_raw and raw.exists():  # re-render the last measurement (development aid)
        persona, ray_s, b, shards_bd, dedup_big = json.loads(raw.read_text())
    else:
        persona, ray_s = run_persona(photos, work / "persona", workers=1)
        b = run_bare(photos, work / "bare", params)
        shards_bd = shards_breakdown(work / "persona", params)
        dedup_big = dedup_at_scale(args.dedup_rows, work / "dedup_scale", photos)
        dedup_big["imports"] = import_seconds()
        raw.write_text(json.dumps([persona, ray_s, b, shards_bd, dedup_big], default=str))
    imports = dedup_big.pop("imports", {})

    figures, rows, targets = {}, [], {}
    for s in STAGES:
        p, q = persona[s], b[s]
        n = p["items"]
        q_wall = q["load_seconds"] + q["loop_seconds"]
        wall_ratio = (n / p["seconds"]) / (q["items"] / q_wall)
        p_cpu, q_cpu = persona_cpu(p), q["cpu_seconds"]
        core_ratio = (n / p_cpu) / (q["items"] / q_cpu)
        steady = None
        if p["phases"].get("stream_items_per_s"):
            steady = p["phases"]["stream_items_per_s"] / (q["items"] / q["loop_seconds"])
        be = break_even(p, q)
        figures[s] = {
            "unit": UNITS[s],
            "persona": {"items": n, "seconds": round(p["seconds"], 3), "items_per_s": round(n / p["seconds"], 2),
                        "cpu_seconds": round(p_cpu, 3), "items_per_cpu_s": round(n / p_cpu, 2),
                        "phases": p["phases"], "cpu_use": p["cpu"], "stats": p["stats"]},
            "bare": {"items": q["items"], "seconds": round(q_wall, 3), "items_per_s": round(q["items"] / q_wall, 2),
                     "cpu_seconds": round(q_cpu, 3), "items_per_cpu_s": round(q["items"] / q_cpu, 2),
                     "model_load_seconds": round(q["load_seconds"], 3), "loop_seconds": round(q["loop_seconds"], 3),
                     "cpu_use": q["cpu"], **({"faces": q["faces"]} if "faces" in q else {})},
            "ratio_per_core": round(core_ratio, 3),
            "ratio_wall": round(wall_ratio, 3),
            "ratio_wall_steady_state": None if steady is None else round(steady, 3),
            "break_even_items_for_target": None if be is None else int(round(be)),
            "same_items": n == q["items"],
        }
        if s != "dedup":  # dedup's figure is the 100,000-row table below (400 rows: ~60 ms of fixed cost)
            targets[f"{s}_ge_{TARGET}"] = core_ratio >= TARGET
        rows.append((s, UNITS[s], n, f"{p_cpu:.2f}", f"{n / p_cpu:.1f}", f"{q_cpu:.2f}", f"{q['items'] / q_cpu:.1f}",
                     f"{core_ratio:.2f}", f"{wall_ratio:.2f}", "-" if steady is None else f"{steady:.2f}",
                     "-" if be is None else f"{be:.0f}", f"{p['cpu']['others_cpu_s']:.0f}/{q['cpu']['others_cpu_s']:.0f}",
                     "(info)" if s == "dedup" else "yes" if core_ratio >= TARGET else "NO"))
    d = dedup_big
    targets[f"dedup_{args.dedup_rows}_rows_ge_{TARGET}"] = d["ratio_per_core"] >= TARGET
    rows.append((f"dedup, {args.dedup_rows:,} rows", "rows", args.dedup_rows, f"{d['persona_cpu_seconds']:.2f}",
                 f"{args.dedup_rows / d['persona_cpu_seconds']:.0f}", f"{d['bare_cpu_seconds']:.2f}",
                 f"{args.dedup_rows / d['bare_cpu_seconds']:.0f}", f"{d['ratio_per_core']:.2f}", f"{d['ratio_wall']:.2f}",
                 "-", "-", "-", "yes" if d["ratio_per_core"] >= TARGET else "NO"))

    result = {
        "workload": {"photos": str(photos.relative_to(WORK.parent.parent)), **{k: v for k, v in manifest(photos).items() if k != "files"},
                     "set_seconds_this_run": round(set_seconds, 1)},
        "config": {"executor": "ray", "workers": 1, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                   "shards_required": ["masks", "identity"], "note": "wplus (e4e) and caption are not part of this benchmark"},
        "ray_start_seconds": round(ray_s, 2),
        "ray_start_excluded": True,
        "stages": figures,
        "dedup_at_scale": dedup_big,
        "shards_breakdown": shards_bd,
        "fresh_process_import_seconds": imports,
        "fixes_in_this_version": DONE,
        "target": f"Persona items per CPU-second >= {TARGET} x the bare loop's, per stage (end to end at this size: "
                  "actor start, imports, model load, driver and Ray system processes included; ray.init excluded)",
        "why_cpu_seconds": "on a shared machine wall time measures how much CPU the other jobs left (their use is in "
                           "cpu_use.others_cpu_s); CPU seconds per item is the per-core cost either way. "
                           "Wall-clock ratios from the same run are reported beside it (ratio_wall, ratio_wall_steady_state)",
        "targets": targets,
    }
    result["missed"] = explain_misses(figures, targets, shards_bd, dedup_big)
    path = write_result("stage_throughput", result)
    print(table(rows, ("stage", "unit", "items", "persona cpu-s", "/cpu-s", "bare cpu-s", "/cpu-s", "per-core ratio",
                       "wall ratio", "wall steady", "break-even n", "others cpu-s p/b", f">={TARGET}")))
    print(f"ray start {ray_s:.1f}s (excluded); targets met: {sum(targets.values())}/{len(targets)}  -> {path}")
    for s, why in result["missed"].items():
        print(f"  {s}: {why}")


def explain_misses(figures: dict, targets: dict, shards_bd: dict, dedup_big: dict) -> dict:
    """Where the time goes, for every stage below the target (from the measured phases and CPU use)."""
    out = {}
    for s, f in figures.items():
        if targets.get(f"{s}_ge_{TARGET}", True):
            continue
        p, q = f["persona"], f["bare"]
        ph, c = p["phases"], p["cpu_use"]
        a = ph.get("actor", {})
        if a.get("items"):
            fixed = p["cpu_seconds"] - a["compute_cpu"]
            out[s] = (
                f"Persona {p['cpu_seconds']:.1f} CPU-s vs bare {q['cpu_seconds']:.1f} CPU-s for {p['items']} {f['unit']}. "
                f"Inside the batch calls the actor used {a['compute_cpu']:.1f} CPU-s (bare loop {q['cpu_seconds']:.1f}, "
                f"{a['compute_cpu'] / q['cpu_seconds'] - 1:+.0%}: the stage's per-item extras (JSON columns, atomic "
                f"blob writes) plus noise); the other {fixed:.1f} CPU-s are per-run costs: the actor process outside its "
                f"batches {a['process_cpu'] - a['compute_cpu']:.1f} CPU-s (new Ray worker process, importing the stage "
                f"module and its model stack, model load {a.get('model_load', 0):.2f}s wall vs bare {q['model_load_seconds']:.2f}s), "
                f"the driver {c['this_process_cpu_s']:.1f} CPU-s (setup {ph['setup']:.2f}s, commits and consolidation "
                f"{ph['finish']:.2f}s after the last batch) and Ray's own processes {c['ray_system_cpu_s']:.1f} CPU-s. "
                f"At this size the per-run cost is not amortised: the ratio reaches {TARGET} from about "
                f"{f['break_even_items_for_target']} {f['unit']} per run. What would fix it: larger runs (from the "
                f"break-even size above), or, for runs this small, the in-process path (`runtime.inline_below` above "
                f"the run's item count: no worker process and no Ray system processes, the same worker code and bytes), "
                f"which removes about {a['process_cpu'] - a['compute_cpu'] + c['ray_system_cpu_s']:.1f} of those "
                f"CPU-s; the benchmark measures the Ray path on purpose, as a cluster runs it."
            )
        elif s == "shards":
            bd = shards_bd
            rerun = bd["stage_rerun_cpu_s"]
            no_grid = max(min(rerun, p["cpu_seconds"]) - bd["grid_png_s"], 1e-9)
            out[s] = (
                f"Persona {p['cpu_seconds']:.2f} CPU-s vs bare {q['cpu_seconds']:.2f} for {p['items']} faces, all in the driver; "
                f"the stage again in the same process took {rerun:.2f} CPU-s (the first run also imports the declarations "
                f"of every registered stage to plan the join, here caption, wplus, expression, clip_image and instances, "
                f"and computes the code fingerprint). Each step timed alone: join_tables {bd['join_tables_s']}s (reads every stage table, stats "
                f"every blob, reads every .npy header), read members {bd['read_members_and_reencode_npy_s']}s, tar write "
                f"{bd['tar_write_s']}s, fsync {bd['fsync_s']}s, grid.png {bd['grid_png_s']}s (drawn once per change of "
                f"its inputs); the top of the profile is in shards_breakdown.profile_of_write_shards_cpu_s. The bare loop "
                f"only reads the member files and writes the tar (no sha256, no fsync, no index, no grid, no metrics). "
                f"What would fix it: stage declarations read without importing the stage modules, and grid.png drawn by "
                f"a plot step of its own, would leave at most {no_grid:.2f} CPU-s (the rerun without the grid), a ratio "
                f"of about {q['cpu_seconds'] / no_grid:.2f}"
                + (f" (>= {TARGET})." if q["cpu_seconds"] / no_grid >= TARGET else
                   "; the rest is the tars' sha256 for index.json, their fsync, the join and the metrics, which make "
                   "the shards verifiable and durable, so at this size the target is out of reach without them.")
            )
    d = dedup_big
    if not targets.get(f"dedup_{d['rows']}_rows_ge_{TARGET}", True):
        out[f"dedup_{d['rows']}_rows"] = (
            f"Persona {d['persona_cpu_seconds']} CPU-s vs bare {d['bare_cpu_seconds']} on {d['rows']:,} rows. {d['where']}. "
            f"What would fix it: reading the ingest table straight into arrays (no pandas frame) and writing "
            f"clusters.json from arrays; the hash search itself is the bare loop's.")
    return out


if __name__ == "__main__":
    main()
