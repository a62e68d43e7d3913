"""Run every benchmark in sequence (one subprocess each) and print a summary of their targets.

Sizes (defaults of each script, chosen so the suite runs in under 25 minutes on 2 free cores):
dedup_scale 1,000,000 hashes; store_scale a 2,000,000-row item store (built once under
benchmarks/_work/, ~3 min); incremental: `dvc repro` of the data stages on the bundled sample (full,
no-op, one new photo); stage_throughput / scaling on a 400-image photo set (built once, ~30 s) plus
dedup on a 100,000-row table, scaling 2 repeats per worker count; gpu_memory / gpu_memory_hybrid only
with CUDA (before loader, which compares with gpu_memory); loader: every registered method phase, 2
passes at 64 px, 1 at 512 px. The suite stops a benchmark that would run past 25 minutes and records
the ones it could not start. Full logs go to benchmarks/_work/logs/. Every result file records the
machine's load average at its start and end (other jobs on the machine slow everything down).

    python -m benchmarks.run_all [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import RESULTS, load_average, table, write_result

# order: the cheap ones and the GPU grids (loader compares with gpu_memory) first, the longest last
BENCHMARKS = ("dedup_scale", "gpu_memory", "gpu_memory_hybrid", "store_scale", "incremental", "stage_throughput",
              "loader", "scaling")
LIMIT_S = 25 * 60
NOISE = ("W0000 ", "I0000 ", "WARNING: All log messages before absl", "INFO: Created TensorFlow",
         "authentication_token_setup")
LOGS = Path(__file__).resolve().parent / "_work" / "logs"


def run(name: str, timeout: float) -> tuple[int, float]:
    """Run one benchmark; echo its output (minus native-library log noise) and keep a full log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    with open(LOGS / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                                start_new_session=True)
        # past the suite's budget the benchmark (and the Ray it started) is stopped: recorded as timed out
        timer = threading.Timer(max(1.0, timeout), lambda: os.killpg(proc.pid, signal.SIGTERM))
        timer.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if not any(n in line for n in NOISE) and "pid=" not in line and "RANDOM WEIGHTS" not in line:
                    print(f"  {line}", end="")
            rc = proc.wait()
        finally:
            timer.cancel()
    return rc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS)
    args = ap.parse_args()
    names = args.only or BENCHMARKS
    t0 = time.perf_counter()
    timings, rows = {}, []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.time()
        left = LIMIT_S - (time.perf_counter() - t0)
        if left < 30:
            timings[name] = {"returncode": None, "seconds": 0.0, "not_run": "the suite's 25-minute budget was spent"}
            rows.append((name, "NOT RUN (budget)", "0", "-", "-"))
            print(f"   {name}: not run (budget spent)", flush=True)
            continue
        rc, dt = run(name, left)
        res = {}
        p = RESULTS / f"{name}.json"
        if p.exists() and p.stat().st_mtime >= started:  # written by this run (not a stale file of an earlier one)
            res = json.loads(p.read_text())
        elif rc == 0:
            rc = -1  # exited without writing its result
        timings[name] = {"returncode": rc, "seconds": round(dt, 1)}
        targets = res.get("targets", {})
        met = "skipped" if res.get("skipped") else f"{sum(bool(v) for v in targets.values())}/{len(targets)}"
        rows.append((name, "ok" if rc == 0 else f"FAILED ({rc})", f"{dt:.0f}", met,
                     ", ".join(k for k, v in targets.items() if not v) or "-"))
        print(f"   {name}: {dt:.0f}s, rc {rc}", flush=True)
    total = time.perf_counter() - t0
    result = {"benchmarks": timings, "total_seconds": round(total, 1), "limit_seconds": LIMIT_S,
              "within_limit": total < LIMIT_S, "targets": {"suite_within_25_minutes": total < LIMIT_S}}
    if total >= LIMIT_S:
        slow = sorted(((t["seconds"], n) for n, t in timings.items()), reverse=True)[:3]
        result["missed"] = {"suite_within_25_minutes": (
            f"{total / 60:.1f} min; the longest: " + ", ".join(f"{n} {s:.0f}s" for s, n in slow)
            + f" (load average at the end {load_average()[0]}). What would fix it: a quiet machine (the benchmarks "
            "share its 2 cores with nothing else), or smaller sizes for the longest benchmarks (their options)")}
    write_result("run_all", result)
    print()
    print(table(rows, ("benchmark", "status", "s", "targets met", "missed")))
    print(f"total {total:.0f}s ({total / 60:.1f} min)")
    if any(t["returncode"] for t in timings.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
