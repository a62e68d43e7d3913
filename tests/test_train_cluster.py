"""Distributed training with Ray Train (training/cluster.py) on the tiny model, CPU workers:

- 2 DDP workers train the adapter from real shards, each reading only its own shards, and write
  it; their synchronised first-step gradient equals the gradient of ONE training step in ONE
  process on the whole global batch of 2 * B (the two ranks' samples; every random draw is per
  sample, keyed by its global position: `training.step.SampleDraws`);
- a worker killed mid-run: Ray Train restarts the group from the last reported checkpoint and finishes;
- `persona train submit` runs a training job on a local two-node cluster via the Ray Jobs API.

Equal "within float tolerance", not bit for bit: a batch of 2B and two of B sum in different orders.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from tests.conftest import REPO
from tests.test_training import make_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    """An in-process Ray with 2 logical CPUs (one per training worker)."""
    ray = pytest.importorskip("ray")
    was = ray.is_initialized()
    if not was:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    yield ray
    if not was:
        ray.shutdown()


class GradDump(Callback):
    """Saves each rank's (DDP-synchronised, unclipped) trainable gradients before the first optimizer step."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                     if p.requires_grad and p.grad is not None}
            torch.save(grads, Path(self.folder) / f"grads_rank{trainer.global_rank}.pt")


class KillOnce(Callback):
    """Rank 1 dies hard (os._exit) after optimizer step `step`, on the first attempt only (marker file).

    It waits `delay` s first: Ray Train (v2) registers a reported checkpoint when its controller
    collects the report (a poll every 2 s); a report not yet collected dies with the worker group."""

    def __init__(self, marker: str, step: int, delay: float = 5.0):
        self.marker, self.step, self.delay = marker, step, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed\n")
            time.sleep(self.delay)
            os._exit(1)


def test_two_workers_train_and_ddp_gradient_matches_one_process(ray_local, tmp_path):
    from training.cluster import train_distributed
    from training.config import train_params
    from training.losses import dropout_from_uniform
    from training.step import SampleDraws

    from tests.test_training import reference_module, split_shards, step_gradients

    drop = (0.3, 0.3, 0.2)
    where = split_shards(tmp_path / "shards", n_shards=4, per_shard=3)  # 4 shards >= 2 workers: split
    params = make_params(tmp_path, train={"synthetic": 0, "shards": str(tmp_path / "shards")},
                         stage1={"dropout": dict(zip(("image", "text", "both"), drop))})
    res = train_distributed(params, "wplus", "stage1", workers=2, max_steps=2, storage_path=str(tmp_path / "ray"),
                            callback_factories=[functools.partial(GradDump, str(tmp_path))])
    assert res["world_size"] == 2 and res["global_step"] == 2
    adapter = Path(res["adapter"])
    assert adapter.is_file() and json.loads(Path(res["adapter_json"]).read_text())["global_step"] == 2
    assert res["checkpoint"] and any(Path(res["checkpoint"]).glob("step=*.ckpt"))

    g0 = torch.load(tmp_path / "grads_rank0.pt")
    g1 = torch.load(tmp_path / "grads_rank1.pt")
    assert g0 and g0.keys() == g1.keys()
    for n in g0:  # DDP: every rank holds the same averaged gradient
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0)

    # the global batch of step 0: rank 0's and rank 1's batches, read from disjoint shards
    tp = train_params(params)
    module, dm = reference_module(tp, 1)
    B = tp.phase("wplus", "stage1").batch_size
    halves = [dm.dataset(0, r, 2).batch(0) for r in (0, 1)]
    files = sorted(set(where.values()))
    for r, h in enumerate(halves):
        assert {where[k] for k in h["key"]} <= set(files[r::2]), f"rank {r} read outside its shards"
    whole = {k: (torch.cat([h[k] for h in halves]) if torch.is_tensor(halves[0][k]) else
                 halves[0][k] + halves[1][k] if isinstance(halves[0][k], list) else halves[0][k]) for k in halves[0]}
    assert whole["pos"].tolist() == list(range(2 * B)) and len(set(whole["key"])) == 2 * B
    T = module.components.noise_scheduler.config.num_train_timesteps
    u = SampleDraws(tp.train.seed, whole["pos"].tolist()).standard((4, 8, 8), T)["u"]
    di, dt = dropout_from_uniform(u, *drop)
    assert (di | dt).any() and not (di | dt).all()  # dropout varies within the batch

    # ONE process, ONE training step on that whole global batch of 2 * B
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = step_gradients(module, [whole])
    finally:
        torch.set_num_threads(threads)
    assert ref.keys() == g0.keys()
    assert sum(float(v.abs().sum()) for v in ref.values()) > 0
    for n in ref:
        torch.testing.assert_close(g0[n], ref[n], rtol=1e-4, atol=1e-6)


def test_killed_worker_resumes_from_last_reported_checkpoint(ray_local, tmp_path):
    from training.cluster import train_distributed

    params = make_params(tmp_path, stage1={"max_steps": 4, "checkpoint_every": 2})
    marker = tmp_path / "killed.marker"
    res = train_distributed(params, "wplus", "stage1", workers=2, storage_path=str(tmp_path / "ray"), max_failures=1,
                            callback_factories=[functools.partial(KillOnce, str(marker), 3)])
    assert marker.is_file(), "the worker was never killed"
    assert res["global_step"] == 4 and res["done"]
    assert res["resumed_from_step"] == 2, res  # restarted from the checkpoint reported at step 2
    assert Path(res["resumed_from"]).name == "step=000002.ckpt"
    assert Path(res["adapter"]).is_file()
    rec = json.loads(Path(res["adapter_json"]).read_text())
    assert rec["global_step"] == 4
    rows = Path(tmp_path / "plots" / "train_wplus_stage1" / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1, 2, 3]  # history restored: each step once, no gap


# ---------------------------------------------------------------------------------------- Ray Jobs

from tests.test_cluster import cluster  # noqa: E402,F401  (module-scoped two-node cluster fixture)


def _job_wd(tmp: Path) -> Path:
    wd = tmp / "wd"
    for pkg in ("pipeline", "training", "stages"):
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, wd / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return wd


def test_train_submit_runs_job_and_returns_status(cluster, tmp_path, monkeypatch, capsys):  # noqa: F811
    from pipeline import cli, jobs

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    jobs.client(cluster.dashboard, retries_s=60)
    wd = _job_wd(tmp_path)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(make_params(tmp_path)))
    opts = ["--method", "wplus", "--phase", "stage1", "--params", str(pfile), "--address", cluster.dashboard,
            "--working-dir", str(wd), "--max-steps", "2"]
    base = ["train", "submit", *opts]

    capsys.readouterr()
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "[train wplus.stage1] done: step 2" in out  # the job's log, streamed
    assert (tmp_path / "models" / "wplus" / "stage1" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "models" / "wplus" / "stage1" / "adapter.json").read_text())["global_step"] == 2

    # the same command distributed: Ray Train on both nodes of the cluster (the job's RAY_ADDRESS)
    d = tmp_path / "dist"
    assert cli.main(base + ["--workers", "2", "--cpus-per-worker", "0.5", "--storage-path", str(d / "ray"),
                            "--set", f"train.out_dir={d / 'models'}", "--set", f"train.checkpoints_dir={d / 'ck'}"]) == 0
    out = capsys.readouterr().out
    assert "distributed on 2 workers: step 2" in out
    assert (d / "models" / "wplus" / "stage1" / "adapter.safetensors").is_file()

    # an invalid config fails inside the job: non-zero exit (`--submit`: the older spelling)
    assert cli.main(["train", *opts, "--submit", "--set", "train.resolution=12"]) != 0
