"""Small changes cost seconds: `dvc repro` of the data stages on the bundled sample, full vs one new
photo vs nothing new, in one run.

A DVC project is laid out under `benchmarks/_work/incremental/proj` exactly like `make demo`'s (this
checkout's dvc.yaml, params.yaml, pipeline/, stages/, training/, pyproject.toml; the sample photos of
`persona sample`), then:
1. `dvc repro shards`: a full build of the data stages (sample .. shards);
2. `dvc repro shards` again, nothing changed (no-op), `--noop-repeats` times;
3. one new photo (a mirrored copy of obama2.jpg, re-encoded: new bytes, a face) -> `dvc repro shards`;
4. `persona build` with nothing to compute (every stage returns without Ray or a model load).
Each command's wall seconds and its CPU seconds (its process tree, from the kernel's child
accounting: Ray workers started by a stage are counted when they exit with it), every stage's own
report (`data/runs/<stage>.json`: computed, cached, executor, seconds) and the per-process fixed cost
(`persona --help`: interpreter + imports; `dvc --version`). Targets: the one-photo rebuild <= 20% of
the full build (wall, same run); the no-op < 10 s.

    python -m benchmarks.incremental [--noop-repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import table, write_result
from benchmarks.workload import ROOT, WORK, quiet

TARGET_RATIO = 0.20
TARGET_NOOP_S = 10.0
STAGE_LINE = re.compile(r"^\[(\w+)\] inputs=(\d+) computed=(\d+) cached=(\d+) .* in ([\d.]+)s", re.M)


def env(proj: Path) -> dict:
    e = {**os.environ, "PYTHONPATH": str(proj), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
         "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    for k in ("RAY_ADDRESS",):
        e.pop(k, None)
    return e


def project(work: Path) -> Path:
    """A fresh DVC project of this checkout, with the sample photos (make demo's layout)."""
    proj = work / "proj"
    shutil.rmtree(work, ignore_errors=True)
    proj.mkdir(parents=True)
    for f in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(ROOT / f, proj / f)
    for d in ("pipeline", "stages", "training"):
        shutil.copytree(ROOT / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    cache = next((c for c in (ROOT / "tests" / ".cache", ROOT / "data" / "cache") if list(c.glob("*.tar.gz"))), None)
    (proj / "data" / "cache").mkdir(parents=True)
    if cache is not None:
        for f in cache.glob("*.tar.gz"):
            shutil.copy(f, proj / "data" / "cache" / f.name)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, env=env(proj), check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=proj, env=env(proj), check=True)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "sample"], cwd=proj, env=env(proj), check=True,
                   capture_output=True)
    return proj


def timed(cmd: list[str], proj: Path, log: Path) -> dict:
    """Run a command in the project; wall and CPU seconds (the command's process tree) and its output."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=proj, env=env(proj), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(p.stdout + "\n---- stderr\n" + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log}:\n{p.stderr[-3000:]}")
    stages = {m.group(1): {"inputs": int(m.group(2)), "computed": int(m.group(3)), "cached": int(m.group(4)),
                           "seconds": float(m.group(5))} for m in STAGE_LINE.finditer(p.stdout)}
    ran = re.findall(r"Running stage '([^']+)'", p.stdout)
    return {"wall_s": round(wall, 2), "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 2),
            "stages_run": ran, "stages": stages}


def reports(proj: Path) -> dict:
    out = {}
    for p in sorted((proj / "data" / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        out[p.stem] = {k: r.get(k) for k in ("inputs", "computed", "cached", "seconds", "executor") if k in r}
    return out


def add_photo(proj: Path) -> str:
    from PIL import Image

    new = proj / "data" / "raw" / "sample" / "obama" / "obama_mirrored.jpg"
    Image.open(proj / "data/raw/sample/obama/obama2.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new, quality=92)
    return str(new.relative_to(proj))


def fixed_costs(proj: Path, log: Path) -> dict:
    """Per-process costs a stage run pays whatever it computes (median of 3)."""
    out = {}
    for name, cmd in (("persona_help", [sys.executable, "-m", "pipeline.cli", "--help"]),
                      ("python_pass", [sys.executable, "-c", "pass"]),
                      ("dvc_version", ["dvc", "--version"]),
                      ("dvc_status", ["dvc", "status"])):
        walls = sorted(timed(cmd, proj, log)["wall_s"] for _ in range(3))
        out[name] = walls[1]
    imp = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "--help"], cwd=proj, env=env(proj),
                         capture_output=True, text=True).stderr
    top = []
    for line in imp.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S.*)$", line)
        if m and m.group(3).strip().count(".") == 0:
            top.append((int(m.group(2)) / 1e6, m.group(3).strip()))
    out["persona_startup_imports_s"] = {n: round(s, 3) for s, n in sorted(top, reverse=True)[:6]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-repeats", type=int, default=3)
    args = ap.parse_args()
    quiet()
    work = WORK / "incremental"
    logs = work.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_set = time.perf_counter()
    proj = project(work)
    set_s = time.perf_counter() - t_set

    full = timed(["dvc", "repro", "shards"], proj, logs / "incremental-full.log")
    full["reports"] = reports(proj)
    noops = [timed(["dvc", "repro", "shards"], proj, logs / "incremental-noop.log") for _ in range(args.noop_repeats)]
    noop = sorted(noops, key=lambda r: r["wall_s"])[len(noops) // 2]
    added = add_photo(proj)
    one = timed(["dvc", "repro", "shards"], proj, logs / "incremental-one-photo.log")
    one["reports"] = reports(proj)
    build_noop = timed([sys.executable, "-m", "pipeline.cli", "build"], proj, logs / "incremental-build-noop.log")
    build_noop["reports"] = reports(proj)
    fixed = fixed_costs(proj, logs / "incremental-fixed.log")

    ratio = one["wall_s"] / full["wall_s"]
    ratio_cpu = one["cpu_s"] / full["cpu_s"] if full["cpu_s"] else None
    targets = {f"one_photo_le_{TARGET_RATIO:.0%}_of_full": ratio <= TARGET_RATIO,
               f"noop_lt_{TARGET_NOOP_S:g}s": noop["wall_s"] < TARGET_NOOP_S}
    n_stages = len(one["stages_run"])
    result = {
        "workload": {"photos": "the bundled sample (data/raw: 9 photos)", "added": added,
                     "project_setup_seconds": round(set_s, 1), "dvc_targets": "shards (and every data stage before it)"},
        "full_build": full,
        "noop": {"median": noop, "all_wall_s": [r["wall_s"] for r in noops]},
        "one_new_photo": one,
        "persona_build_nothing_to_compute": build_noop,
        "fixed_costs_median_wall_s": fixed,
        "ratio_one_photo_to_full_wall": round(ratio, 4),
        "ratio_one_photo_to_full_cpu": None if ratio_cpu is None else round(ratio_cpu, 4),
        "targets": targets,
        "where_the_one_photo_rebuild_goes": (
            f"{n_stages} DVC stages ran ({', '.join(one['stages_run'])}); the stages' own seconds sum to "
            f"{sum(s['seconds'] for s in one['stages'].values()):.1f} s of the {one['wall_s']} s; the rest is one "
            f"process start per stage (`persona --help` {fixed['persona_help']} s wall each: interpreter + imports) "
            f"and DVC hashing each stage's outputs ({fixed['dvc_status']} s per `dvc status`)"),
        "where_the_noop_goes": (
            f"no stage runs: `dvc repro` checks the hashes of every dependency and output (`dvc status` "
            f"{fixed['dvc_status']} s, of which DVC's own start {fixed['dvc_version']} s); no persona process starts"),
    }
    missed = {}
    if not targets[f"one_photo_le_{TARGET_RATIO:.0%}_of_full"]:
        own = sum(st["seconds"] for st in one["stages"].values())
        floor = own + n_stages * fixed["persona_help"]
        dvc_s = max(0.0, one["wall_s"] - floor)
        per_stage = fixed["persona_help"] + dvc_s / n_stages  # one interpreter + DVC's work, per DVC stage
        one_proc = one["wall_s"] - (n_stages - 1) * per_stage
        full_proc = full["wall_s"] - (len(full["stages_run"]) - 1) * per_stage
        missed["one_photo"] = (
            f"{one['wall_s']} s vs a {full['wall_s']} s full build ({ratio:.1%}): "
            + result["where_the_one_photo_rebuild_goes"]
            + f". For one item a stage's own seconds are mostly its set-up (model loading), which a full build pays "
            f"once as well. One process per DVC stage costs at least the stages' own seconds plus one interpreter "
            f"start per stage: {own:.1f} + {n_stages} x {fixed['persona_help']} = {floor:.1f} s "
            f"({floor / full['wall_s']:.0%} of the full build); the other {dvc_s:.1f} s ({dvc_s / n_stages:.1f} s per "
            f"stage) is DVC's own work around each stage (checking and hashing its deps and outputs, writing dvc.lock). "
            f"What would fix it: running the data steps in one process and one DVC stage, i.e. `persona build` (one "
            f"interpreter, one Ray session, warm actors) as a single DVC stage with every item store as its output "
            f"(by these figures about {one_proc:.0f} s, against a full build that saves the same per-stage costs: "
            f"{one_proc / full_proc:.0%}); the item stores keep the "
            f"per-item incrementality, and what is lost is `dvc repro <step>` and the per-step DAG in `dvc dag`")
    if not targets[f"noop_lt_{TARGET_NOOP_S:g}s"]:
        missed["noop"] = (f"{noop['wall_s']} s: " + result["where_the_noop_goes"] + ". What would fix it: DVC's "
                          "own hashing is the cost; fewer, larger DVC outputs (the item stores' tables instead of "
                          "their folders) would shorten it")
    if missed:
        result["missed"] = missed
    path = write_result("incremental", result)
    rows = [("full data build", full["wall_s"], full["cpu_s"], len(full["stages_run"]), ""),
            ("no-op dvc repro (median)", noop["wall_s"], noop["cpu_s"], len(noop["stages_run"]), ""),
            ("one new photo", one["wall_s"], one["cpu_s"], n_stages, f"{ratio:.1%} of full"),
            ("persona build, nothing new", build_noop["wall_s"], build_noop["cpu_s"], "-", "")]
    print(table(rows, ("run", "wall s", "cpu s", "stages run", "")))
    for s, r in one["stages"].items():
        print(f"  {s}: computed {r['computed']} of {r['inputs']} in {r['seconds']} s "
              f"({one['reports'].get(s, {}).get('executor', '-')})")
    print(f"targets met: {sum(targets.values())}/{len(targets)} -> {path}")


if __name__ == "__main__":
    main()
