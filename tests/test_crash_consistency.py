"""Crash consistency: SIGKILL the model stages at seeded points, rerun, and get the bytes of a clean run.

Each stage of a small build (the labeled sample photos and a folder of bad files) is killed several
times at points drawn from a seeded schedule (`pipeline/faults.py`: while computing, right after a part
commit, during consolidation, between a temp write and its rename, between shard tars, before the
shard index), then run to the end. Every table, metrics file and shard file must equal an
uninterrupted run's, no input may be committed twice, and no temp file may be left.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.badfiles import make_bad_folder
from tests.conftest import PERSONA

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
STAGES = ("ingest", "dedup", "align", "caption", "masks", "identity", "shards")
POINTS = {  # the crash points each stage passes, with the largest count drawn
    "ingest": {"result": 4, "commit": 4, "consolidate": 1, "table": 1, "rename": 6},
    "align": {"result": 3, "commit": 3, "consolidate": 1, "rename": 8},
    "masks": {"result": 3, "commit": 3, "table": 1, "rename": 8},
    "identity": {"result": 3, "commit": 3, "consolidate": 1, "rename": 4},
    "shards": {"tar": 2, "index": 1, "rename": 3},
}
KILLS_PER_STAGE = 3
# kills of one stage run in this order, so that each finds work left at its point
PHASES = ("result", "rename", "commit", "tar", "consolidate", "table", "index")


def _persona_stage(name: str, params: Path, root: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if crash:
        env["PERSONA_CRASH_AT"] = crash
    cmd = PERSONA + ["stage", name, "--params", str(params), "--root", str(root), "--metrics-dir", str(root / "metrics")]
    # own session: whatever the stage started dies with it
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)


def _files(root: Path) -> dict[str, bytes]:
    """Every output that must match: tables, metrics, shard files (not journals, blobs or run reports)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (p.name == "table.parquet" or rel.startswith(("metrics/", "shards/"))):
            out[rel] = p.read_bytes()
    return out


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_rerun_gives_the_clean_bytes(tmp_path, sample_raw):
    make_bad_folder(tmp_path / "bad")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "runtime": {"executor": "local", "part_size": 2, "progress": False},  # a kill shifts part boundaries
        "ingest": {"batch_size": 1, "sources": [{"name": "sample", "path": str(sample_raw / "sample")},
                                                {"name": "bad", "path": str(tmp_path / "bad"), "labeled": False}]},
        "align": {"batch_size": 1}, "masks": {"batch_size": 1}, "identity": {"batch_size": 1},
        "shards": {"samples_per_shard": 2, "required": ["masks", "identity"], "optional": ["caption"],
                   "grid_size": 4, "grid_tile": 32},
    }))
    ref, run = tmp_path / "ref", tmp_path / "run"
    for name in STAGES:
        r = _persona_stage(name, params, ref)
        assert r.returncode == 0, r.stdout + r.stderr

    rng = random.Random(11)
    kills = {}
    for name in STAGES:
        kills[name] = []
        drawn = rng.sample(sorted(POINTS.get(name, {})), min(KILLS_PER_STAGE, len(POINTS.get(name, {}))))
        for point in sorted(drawn, key=PHASES.index):
            crash = f"{point}:{rng.randint(1, POINTS[name][point])}"
            r = _persona_stage(name, params, run, crash)
            assert r.returncode in (-signal.SIGKILL, 0), (name, crash, r.stdout + r.stderr)
            if r.returncode == -signal.SIGKILL:
                kills[name].append(crash)
        r = _persona_stage(name, params, run)
        assert r.returncode == 0, (name, r.stdout + r.stderr)
    assert all(len(kills[n]) == KILLS_PER_STAGE for n in POINTS), kills
    hit = {c.split(":")[0] for ks in kills.values() for c in ks}
    assert {"result", "commit", "rename", "tar", "index"} <= hit and hit & {"consolidate", "table"}, kills

    a, b = _files(ref), _files(run)
    assert sorted(a) == sorted(b) and len(a) > 12
    for rel in a:
        assert a[rel] == b[rel], f"{rel} differs from the uninterrupted run (kills: {kills})"
    for name in STAGES:
        parts = sorted((run / name / "parts").glob("part-*.parquet"))
        if parts:
            journal = pd.concat(pd.read_parquet(p, columns=["cache_key"]).assign(part=i) for i, p in enumerate(parts))
            assert journal.groupby("cache_key")["part"].nunique().max() == 1, f"{name}: an input was committed twice"
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == ".tmp"]
    assert not leftovers, leftovers
