"""`persona personalize --all-identities` on a real two-node Ray cluster on loopback (each node a
`ray start --block` process with one CPU; started and ended by pid, see tests/test_cluster.py):

- the sample's labelled identities, built once for the module with the real data stages (plus a
  second, flipped-and-cropped photo of one identity, so that two identities have enough photos);
- one Ray task per identity with enough photos, one CPU each, so both nodes train at once; the
  identities with too few photos are error rows of the run report, not a crash;
- one task's worker is SIGKILLed mid-run: the other finishes and is registered, the run exits 75
  (retry); the rerun skips the finished identity (same cache key, adapter untouched) and trains
  the killed one from its checkpoint; each identity is one version of persona-pidiff with alias
  <identity>-champion and its identity tag.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import PERSONA, REPO
from tests.test_cluster import _cluster, _local_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SAMPLE_IDENTITIES = {"biden", "eileen_collins", "grace_hopper", "obama", "yao_ming"}
ENOUGH = {"grace_hopper", "obama"}  # >= min_photos (2) faces


@pytest.fixture(scope="module")
def sample_shards(sample_raw, tmp_path_factory) -> Path:
    """The sample's labelled photos (+ one derived photo of grace_hopper) through every data stage."""
    from PIL import Image

    root = tmp_path_factory.mktemp("personalize_data")
    raw = root / "raw"
    shutil.copytree(sample_raw / "sample", raw)
    with Image.open(raw / "grace_hopper" / "grace_hopper.jpg") as im:
        w, h = im.size
        im.convert("RGB").crop((w // 12, h // 16, w - w // 20, h)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
            raw / "grace_hopper" / "grace_hopper_flipped.jpg", quality=92)
    params = root / "build.yaml"
    params.write_text(yaml.safe_dump({"runtime": {"executor": "local", "progress": False},
                                      "ingest": {"sources": [{"name": "sample", "path": str(raw)}]},
                                      "wplus": {"input_size": 128}}))
    r = subprocess.run(PERSONA + ["build", "--params", str(params), "--out", str(root / "data")], cwd=REPO,
                       env=_local_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "data" / "shards"


@pytest.fixture(scope="module")
def two_nodes():
    with _cluster(dashboard=False) as c:
        yield c


def _params(tmp: Path, shards: Path) -> Path:
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({
        "train": {"shards": str(shards), "num_workers": 0, "threads": 1, "out_dir": str(tmp / "models"),
                  "checkpoints_dir": str(tmp / "checkpoints"), "metrics_dir": str(tmp / "metrics"),
                  "plots_dir": str(tmp / "plots"), "sampling": {"num_faces": 1, "steps": 1},
                  "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp / "mlartifacts")},
                  "methods": {"pidiff": {"personalize": {"max_steps": 10, "batch_size": 2, "min_photos": 2,
                                                         "log_every": 1, "checkpoint_every": 2, "keep_last": 10,
                                                         "sample_every": 0}}}},
        "registry": {"tracking_uri": uri, "artifact_location": str(tmp / "mlartifacts")},
        "personalize": {"method": "pidiff", "report": str(tmp / "metrics" / "personalize_{method}_{identity}.json")},
    }))
    return p


def _node_of(pid: int, nodes) -> str | None:
    for n in nodes:
        n.remember_children()
        if pid in n.pids:
            return n.log.stem
    return None


def _tasks(nodes) -> dict[int, tuple[str, str | None]]:
    """Running personalisation tasks: pid -> (process title, node)."""
    out = {}
    for p in psutil.process_iter(["name"]):
        name = p.info["name"] or ""
        if name.startswith("ray::personalize-pidiff-"):
            out[p.pid] = (name, _node_of(p.pid, nodes))
    return out


def test_all_identities_on_two_nodes_kill_one_worker_and_rerun(sample_shards, two_nodes, tmp_path):
    from pipeline.digests import sha256_file
    from training.registry import Registry

    pfile = _params(tmp_path, sample_shards)
    cmd = PERSONA + ["personalize", "--all-identities", "--params", str(pfile)]
    nodes = [two_nodes.head, two_nodes.worker]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ckpt = tmp_path / "checkpoints" / "pidiff" / "obama" / "step=000002.ckpt"
    seen: dict[int, tuple[str, str | None]] = {}
    killed = None
    try:
        t0 = time.monotonic()
        while killed is None:
            assert proc.poll() is None, f"the run ended before the kill:\n{proc.communicate()[0][-5000:]}"
            assert time.monotonic() - t0 < 420, "obama's task wrote no step-2 checkpoint in 420 s"
            seen.update(_tasks(nodes))
            if ckpt.exists():
                (pid,) = [p for p, (name, _) in _tasks(nodes).items() if name == "ray::personalize-pidiff-obama"]
                psutil.Process(pid).send_signal(signal.SIGKILL)  # the worker dies mid-run
                killed = pid
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out[-5000:]  # identities failed for a reason of the run: retry
    assert {name for name, _ in seen.values()} == {f"ray::personalize-pidiff-{i}" for i in ENOUGH}
    assert {node for _, node in seen.values()} == {"head", "worker"}, seen  # both nodes trained at once

    report = json.loads((tmp_path / "metrics" / "personalize_pidiff_all.json").read_text())
    rows = {r["identity"]: r for r in report["rows"]}
    assert set(rows) == SAMPLE_IDENTITIES and report["identities"] == len(report["rows"]) == 5
    assert rows["obama"]["status"] == "error" and rows["obama"]["reason"] == "worker_died" and rows["obama"]["retry"]
    assert rows["grace_hopper"]["status"] == "trained" and rows["grace_hopper"]["global_step"] == 10
    assert rows["grace_hopper"]["registered"]["aliases"] == ["grace_hopper-champion"]
    for ident in SAMPLE_IDENTITIES - ENOUGH:  # clear error rows, not a crash
        r = rows[ident]
        assert r["status"] == "error" and r["reason"] == "too_few_photos" and not r["retry"]
        assert f"identity '{ident}': 1 usable face(s)" in r["error"] and "min_photos=2" in r["error"]
    assert report["retry"] == ["obama"]
    grace = tmp_path / "models" / "pidiff" / "grace_hopper" / "adapter.safetensors"
    before = (sha256_file(grace), grace.stat().st_mtime_ns)
    assert not (tmp_path / "models" / "pidiff" / "obama" / "adapter.safetensors").exists()

    r = subprocess.run(cmd, cwd=tmp_path, env=two_nodes.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    rows2 = {x["identity"]: x for x in json.loads((tmp_path / "metrics" / "personalize_pidiff_all.json").read_text())["rows"]}
    assert rows2["grace_hopper"]["status"] == "skipped"  # not retrained
    assert (sha256_file(grace), grace.stat().st_mtime_ns) == before
    assert rows2["obama"]["status"] == "trained" and rows2["obama"]["global_step"] == 10
    assert rows2["obama"]["resumed_from_step"] >= 2  # from the killed run's checkpoint
    assert {k: rows2[k]["reason"] for k in SAMPLE_IDENTITIES - ENOUGH} == {k: "too_few_photos" for k in SAMPLE_IDENTITIES - ENOUGH}

    reg = Registry(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    versions = reg.list("persona-pidiff")
    assert len(versions) == 2  # one adapter per identity
    for ident in ENOUGH:
        mv = reg.version("persona-pidiff", f"{ident}-champion")
        assert mv.tags["identity"] == ident and mv.tags["base_adapter"] == "base" and mv.tags["git_commit"]
        meta = json.loads((tmp_path / "models" / "pidiff" / ident / "adapter.json").read_text())
        assert mv.tags["adapter_sha256"] == sha256_file(tmp_path / "models" / "pidiff" / ident / "adapter.safetensors")
        assert meta["phase_record"]["identity"] == ident
