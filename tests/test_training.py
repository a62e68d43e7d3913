"""Training end to end on the tiny model (CPU), with W+ Adapter (the first registered method): the
real `train()` / `persona train` entry point on synthetic and real shards, Stage II from Stage I,
MLflow contents and lineage, SIGKILL + resume giving the same adapter as an uninterrupted run, and
the per-step losses / adapter tensors recorded before training became method compositions."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ConfigError
from pipeline.shards import encoded_members, synthetic_samples, write_tar
from pipeline.shard_reader import MemorySource, ShardIndex
from training import methods
from training.adapter import read_adapter_file
from training.config import train_params
from training.data import Examples, PersonaDataModule, PlainSampler, StepBatches
from training.methods.wplus import NEUTRAL_PROMPTS
from training.tracking import shards_hash
from training.transforms import choose_crop, wild_crop
from training.train import find_checkpoint, prune_checkpoints, train

from tests.conftest import PERSONA, REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def make_params(tmp: Path, mlflow: bool = False, train: dict | None = None, method: str = "wplus", **phases) -> dict:
    """Raw params: tiny model, paths under tmp, small batches; `train` and per-phase dicts (stage1=...,
    stage2=... of `method`) deep-merged on top."""
    small = {"batch_size": 2, "log_every": 1, "checkpoint_every": 2, "sample_every": 0}
    t = {
        "synthetic": 8, "num_workers": 0, "threads": 1, "resolution": 64,
        "out_dir": str(tmp / "models"), "checkpoints_dir": str(tmp / "checkpoints"),
        "metrics_dir": str(tmp / "metrics"), "plots_dir": str(tmp / "plots"),
        "mlflow": {"enabled": mlflow, "tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
                   "artifact_location": str(tmp / "mlartifacts"), "experiment": "test-{method}"},
        "sampling": {"num_faces": 2, "steps": 2},
        "methods": {"wplus": {"stage1": {"max_steps": 4, **small}, "stage2": {"max_steps": 3, **small}}},
    }
    for k, v in (train or {}).items():
        if isinstance(v, dict) and isinstance(t.get(k), dict):
            t[k].update(v)
        else:
            t[k] = v
    for ph, vals in phases.items():
        t["methods"].setdefault(method, {}).setdefault(ph, {}).update(vals)
    return {"train": t}


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    """Tiny REAL shards written with the pipeline's tar writer: 8 train + 2 val samples (128 px)."""
    root = tmp_path_factory.mktemp("shards")
    samples = synthetic_samples(10, identities=5, seed=3, size=128, encoded=True)
    write_tar(root / "train" / "train-000000.tar", (encoded_members(s) for s in samples[:8]))
    write_tar(root / "val" / "val-000000.tar", (encoded_members(s) for s in samples[8:]))
    return root


def wplus_batches(source, stage: int, batch_size: int, seed: int, tp=None, **kw) -> StepBatches:
    """W+ Stage `stage` batches over `source` (default phase configs)."""
    m = methods.get("wplus")
    ph = m.phase(f"stage{stage}")
    tp = tp or train_params({})
    return StepBatches(source, Examples(m, ph, tp.phase("wplus", ph.name), 64), PlainSampler(), batch_size, seed, **kw)


def data_module(tp, stage: int) -> PersonaDataModule:
    m = methods.get("wplus")
    return PersonaDataModule(m, m.phase(f"stage{stage}"), tp.train, tp.phase("wplus", f"stage{stage}"))


# ------------------------------------------------------------------------------------- config
def test_config_strict_and_overrides(tmp_path):
    tp = train_params(make_params(tmp_path), {"wplus.stage2.l_dis": 0.5, "train.resolution": 32})
    s1, s2 = tp.phase("wplus", "stage1"), tp.phase("wplus", "stage2")
    assert s2.l_dis == 0.5 and tp.train.resolution == 32 and s2.l_reg == 1.0
    assert s1.lr == 1e-4 and s1.weight_decay == 0.01 and s1.dropout.both == 0.05
    with pytest.raises(ConfigError, match="unknown key 'train.methods.wplus.stage1.lrr'"):
        train_params({"train": {"methods": {"wplus": {"stage1": {"lrr": 1}}}}})
    with pytest.raises(ConfigError, match="augment"):
        train_params({}, {"wplus.stage2.augment": "flip"})
    with pytest.raises(ConfigError, match="multiple of 8"):
        train_params({"train": {"resolution": 60}})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        train_params({"train": {"methods": {"nope": {}}}})
    with pytest.raises(ConfigError, match="train.runs.x: method 'wplus' has no phase 'stage3'"):
        train_params({"train": {"runs": {"x": {"method": "wplus", "phase": "stage3"}}}})


# ------------------------------------------------------------------------------------- data
def test_choose_crop_always_contains_the_face():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        W, H = int(rng.integers(32, 300)), int(rng.integers(32, 300))
        bw, bh = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
        x0, y0 = int(rng.integers(0, W - bw + 1)), int(rng.integers(0, H - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        scale, frac = float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.0, 0.5))
        x, y, s = choose_crop(W, H, box, rng.random(3), scale, frac)
        assert 1 <= s <= min(W, H) and 0 <= x <= W - s and 0 <= y <= H - s
        if max(bw, bh) <= min(W, H):  # a face that fits is never cut ...
            assert x <= box[0] and y <= box[1] and x + s >= box[2] and y + s >= box[3]
            assert max(bw, bh) >= frac * s - 1e-9  # ... nor smaller than min_face_fraction of the crop


def test_wild_crop_mask_rotation_and_jitter():
    s = synthetic_samples(1, size=128, seed=1)[0]
    aug = train_params({}).phase("wplus", "stage2").image_aug
    outs = [wild_crop(s["jpg"], s["mask.png"], 64, aug, np.random.default_rng(i).random(8)) for i in range(6)]
    for image, mask in outs:
        assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
        assert image.min() >= -1 and image.max() <= 1
        m = mask[0]
        assert 0 <= m.min() and m.max() <= 1
        assert (m < 0.5).any() and (m > 0.5).any()  # face and background both present
    assert not torch.equal(outs[0][0], outs[1][0])  # augmentation varies with the draw
    same = wild_crop(s["jpg"], s["mask.png"], 64, aug, np.random.default_rng(0).random(8))
    assert torch.equal(same[0], outs[0][0]) and torch.equal(same[1], outs[0][1])


def test_batches_depend_only_on_seed_and_step(shards_dir):
    src = ShardIndex([str(shards_dir / "train" / "train-000000.tar")], ("jpg", "mask.png", "txt", "wplus.npy"))
    assert len(src) == 8 and not src.skipped
    a = wplus_batches(src, 2, 3, seed=7)
    b = wplus_batches(src, 2, 3, seed=7, start=5)
    first_b = next(iter(b))
    ref = a.batch(5)
    assert first_b["step"] == 5 and first_b["key"] == ref["key"]
    for k in ("image", "mask", "wplus"):
        assert torch.equal(first_b[k], ref[k])
    # the DataLoader stream (2 workers) is the same sequence of batches
    loader = torch.utils.data.DataLoader(a, batch_size=None, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(4)]
    del it
    assert [g["step"] for g in got] == [0, 1, 2, 3]
    assert all(torch.equal(g["image"], a.batch(i)["image"]) for i, g in enumerate(got))
    # each data epoch visits every sample exactly once; another seed gives another order
    a1 = wplus_batches(src, 1, 2, seed=7)
    keys = [k for i in range(4) for k in a1.batch(i)["key"]]
    assert sorted(keys) == sorted(src.key(i) for i in range(8))
    assert keys != [k for i in range(4) for k in wplus_batches(src, 1, 2, seed=8).batch(i)["key"]]
    # prompts: stage I neutral templates, stage II the caption
    assert set(a1.batch(0)["prompt"]) <= set(NEUTRAL_PROMPTS)
    assert all(p.startswith("a photo of synthetic_") for p in ref["prompt"])
    # train.jpeg_draft: JPEGs decoded at about the training size (128 px stored -> 64 px decoded), same batch layout
    assert src.get(0, ("face.jpg",), {"face.jpg": 64})["face.jpg"].shape == (64, 64, 3)
    assert src.get(0, ("face.jpg",))["face.jpg"].shape == (128, 128, 3)
    m = methods.get("wplus")
    draft = StepBatches(src, Examples(m, m.phase("stage1"), train_params({}).phase("wplus", "stage1"), 64, draft=True),
                        PlainSampler(), 2, seed=7).batch(0)
    exact = a1.batch(0)
    assert draft["key"] == exact["key"] and draft["image"].shape == exact["image"].shape
    assert not torch.equal(draft["image"], exact["image"])


def test_rank_batches_split_the_global_batch_sample_for_sample():
    """World 2 ranks with batch B read exactly the one-process batch of 2B, augmentation included."""
    src = MemorySource(synthetic_samples(8, size=96, seed=4))
    for b in (0, 3):  # 3: a later data epoch (positions 24..27 of 8 samples)
        whole = wplus_batches(src, 2, 4, seed=5).batch(b)
        parts = [wplus_batches(src, 2, 2, seed=5, rank=r, world=2).batch(b) for r in (0, 1)]
        assert whole["pos"].tolist() == list(range(4 * b, 4 * b + 4)) and whole["pos"].dtype == torch.int64
        for k in ("pos", "image", "mask", "wplus"):
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k]), k
        assert parts[0]["key"] + parts[1]["key"] == whole["key"]
        assert parts[0]["prompt"] + parts[1]["prompt"] == whole["prompt"]
        assert not torch.equal(whole["image"][0], wplus_batches(src, 2, 4, seed=6).batch(b)["image"][0])


def test_empty_caption_falls_back_to_a_neutral_prompt():
    samples = synthetic_samples(2, size=64)
    for s in samples:
        s["txt"] = ""
    batch = wplus_batches(MemorySource(samples), 2, 2, seed=0).batch(0)
    assert all(p in NEUTRAL_PROMPTS for p in batch["prompt"])


# ------------------------------------------------------------------------------------- training
def test_fast_dev_run_synthetic_stage1_then_stage2(tmp_path):
    p = make_params(tmp_path)
    r1 = train(p, stage=1, fast_dev_run=True)  # --stage N: W+'s phase aliases
    assert r1["global_step"] == 1 and Path(r1["adapter"]).is_file() and r1["phase"] == "stage1"
    assert r1["record"]["fast_dev_run"] is True and r1["record"]["mlflow"]["run_id"] is None
    r2 = train(p, "wplus", "stage2", fast_dev_run=True)  # starts from stage 1's adapter in out_dir
    assert r2["global_step"] == 1 and r2["record"]["init"]["path"] == r1["adapter"]
    assert set(r2["metrics"]) >= {"loss_rec", "loss_dis", "loss_reg"}
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics").exists()


def test_train_from_real_shards_through_the_datamodule(tmp_path, shards_dir):
    p = make_params(tmp_path, train={"synthetic": 0, "shards": str(shards_dir)})
    tp = train_params(p)
    dm = data_module(tp, 2)
    dm.setup()
    assert dm.describe()["train_samples"] == 8 and dm.describe()["val_samples"] == 2
    assert dm.weights_real() == {f"shards.{s}": False for s in ("detector", "caption", "wplus", "identity")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["mask"].shape == (2, 1, 64, 64)
    assert batch["wplus"].shape == (2, 18, 512) and batch["wplus"].dtype == torch.float32
    val = dm.val_examples()
    assert val["face"].shape == (2, 3, 64, 64) and val["key"] == [ShardIndex(
        [str(shards_dir / "val" / "val-000000.tar")], ()).key(i) for i in range(2)]

    r1 = train(p, "wplus", "stage1", max_steps=3)
    assert r1["global_step"] == 3 and r1["data"]["train_samples"] == 8
    # the DVC plots come from Lightning's CSVLogger: one file per series, every logged step
    rows = (tmp_path / "plots" / "train_wplus_stage1" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [int(r.split(",")[0]) for r in rows[1:]] == [0, 1, 2]
    assert (tmp_path / "checkpoints" / "wplus" / "stage1" / "csv" / "metrics.csv").is_file()
    r2 = train({**p, "train": {**p["train"], "mlflow": {**p["train"]["mlflow"], "enabled": True}}}, "wplus", "stage2",
               max_steps=2)
    plots = tmp_path / "plots" / "train_wplus_stage2"
    assert sorted(f.name for f in plots.iterdir()) == ["loss.csv", "loss_dis.csv", "loss_rec.csv", "loss_reg.csv",
                                                        "lr.csv", "samples_per_sec.csv"]
    assert (tmp_path / "plots" / "train_wplus_stage2_samples.png").is_file()
    assert (plots / "loss_dis.csv").read_text().startswith("step,loss_dis\n0,")
    m = json.loads((tmp_path / "metrics" / "train_wplus_stage2.json").read_text())
    assert m["global_step"] == 2 and np.isfinite(m["loss"]) and m["loss_rec_last10_mean"] > 0 and m["samples_per_s"] > 0
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values()), m  # DVC metrics: numbers
    # the shards are the run's MLflow dataset input (not a DVC output here: digest = the data signature)
    from mlflow import MlflowClient

    run = MlflowClient(p["train"]["mlflow"]["tracking_uri"]).get_run(r2["run_id"])
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "shards" and json.loads(ds.dataset.source)["uri"].endswith(str(shards_dir))
    assert {t.key: t.value for t in ds.tags} == {"mlflow.data.context": "training", "persona.digest": "persona-data-signature",
                                                "persona.train_samples": "8"}
    assert "wplus.npy" in ds.dataset.schema


def test_stage2_from_stage1_tracked_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    p = make_params(tmp_path, mlflow=True, stage1={"sample_every": 2}, stage2={"sample_every": 2})
    r1 = train(p, "wplus", "stage1")
    r2 = train(p, "wplus", "stage2")
    t1, _ = read_adapter_file(r1["adapter"])
    t2, meta2 = read_adapter_file(r2["adapter"])
    assert set(t1) == set(t2)
    wproj = [k for k in t1 if k.startswith("conditioner.")]
    attn = [k for k in t1 if k.startswith("injection.")]
    assert wproj and attn and len(wproj) + len(attn) == len(t1)
    assert all(torch.equal(t1[k], t2[k]) for k in wproj)  # frozen in stage II
    assert any(not torch.equal(t1[k], t2[k]) for k in attn)  # trained in stage II
    assert (meta2["method"], meta2["phase"], meta2["global_step"]) == ("wplus", "stage2", "3")
    assert json.loads(meta2["conditioner"])["cross_dim"] == 32 and json.loads(meta2["base_model"])["preset"] == "tiny"

    rec = json.loads(Path(r2["adapter_json"]).read_text())
    for key in ("method", "phase", "base_model", "conditioner", "injection", "scale", "mlflow", "lineage",
                "weights_real", "global_step", "seed"):
        assert key in rec
    assert rec["method"] == "wplus" and rec["phase"] == "stage2" and rec["global_step"] == 3 and rec["scale"] == 1.0
    assert rec["base_model"] == {"preset": "tiny", "path": None}
    assert rec["conditioner"]["cross_dim"] == 32 and rec["lineage"]["shards_hash"] == "none"
    assert len(rec["lineage"]["git_commit"]) in (40, len("unknown"))
    assert rec["weights_real"]["diffusion.unet"] is False and rec["weights_real"]["diffusion.scheduler"] is True
    assert rec["mlflow"]["run_id"] == r2["run_id"] != r1["run_id"] and rec["mlflow"]["model_id"] == r2["model_id"]
    assert rec["mlflow"]["tracking_uri"] == p["train"]["mlflow"]["tracking_uri"]

    client = MlflowClient(rec["mlflow"]["tracking_uri"])
    run = client.get_run(r2["run_id"])
    assert run.data.tags["method"] == "wplus" and run.data.tags["phase"] == "stage2"
    assert client.get_experiment(run.info.experiment_id).name == "test-wplus"
    assert run.data.tags["git_commit"] == rec["lineage"]["git_commit"]
    assert run.data.tags["shards_hash"] == "none" and run.data.tags["weights_random"] == "true"
    assert run.data.tags["weights_real.diffusion.unet"] == "false"
    assert run.data.params["phase.l_dis"] == "1.5" and run.data.params["phase.augment"] == "both"
    assert run.data.params["phase"] == "stage2" and run.data.params["method.conditioner.bias"] == "False"
    for k in ("loss", "loss_rec", "loss_dis", "loss_reg", "lr"):  # Lightning's logger and LearningRateMonitor
        hist = client.get_metric_history(r2["run_id"], k)
        assert [h.step for h in hist] == [0, 1, 2], k
        assert all(np.isfinite(h.value) for h in hist)
    assert client.get_metric_history(r2["run_id"], "train/device/samples_per_sec")  # ThroughputMonitor
    assert client.get_metric_history(r2["run_id"], "lr")[-1].value == pytest.approx(1e-4)
    assert sorted(a.path for a in client.list_artifacts(r2["run_id"], "plots"))[:2] == ["plots/loss.csv", "plots/loss_dis.csv"]
    grids = sorted(a.path for a in client.list_artifacts(r2["run_id"], "samples"))
    assert grids == ["samples/step_000002.png", "samples/step_000003.png"]
    # the adapter is an MLflow model of the run (pyfunc), holding the adapter files
    model = client.get_logged_model(r2["model_id"])
    assert model.source_run_id == r2["run_id"] and str(model.status) == "READY" and model.tags["phase"] == "stage2"
    assert [o.model_id for o in run.outputs.model_outputs] == [r2["model_id"]]
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=rec["mlflow"]["tracking_uri"]))
    assert (local / "MLmodel").is_file() and (local / "artifacts" / "kit.yaml").is_file()
    got, _ = read_adapter_file(local / "artifacts" / "adapter" / "adapter.safetensors")
    assert torch.equal(got[attn[0]], t2[attn[0]])
    assert json.loads((local / "artifacts" / "adapter" / "adapter.json").read_text())["mlflow"]["model_id"] == r2["model_id"]
    assert str(tmp_path / "mlartifacts") in run.info.artifact_uri  # explicit artifact location
    # stage I's run has no loss_rec (noise MSE only) but the same lineage tags
    run1 = client.get_run(r1["run_id"])
    assert "loss_rec" not in run1.data.metrics and run1.data.tags["phase"] == "stage1"
    assert (tmp_path / "plots" / "train_wplus_stage1_samples.png").is_file()


def reference_module(tp, stage: int):
    """A PersonaModule outside any Trainer (fresh Stage I adapter; logging off) and its DataModule."""
    from training.module import PersonaModule
    from training.train import build_adapter, load_components

    m = methods.get("wplus")
    comps = load_components(tp.train)
    adapter, _ = build_adapter(m, m.phase("stage1"), tp, comps)  # stage II freezes WProj; trains the attention
    ph = m.phase(f"stage{stage}")
    module = PersonaModule(m, ph, tp.phase("wplus", ph.name), tp.train.seed, comps, adapter, "reference")
    module._log_step = lambda parts, batch_size: None
    module.train()
    dm = data_module(tp, stage)
    dm.setup()
    return module, dm


def step_gradients(module, batches: list[dict], weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Trainable gradients of sum_k weight * training_step(batches[k]) (fresh accumulation)."""
    module.zero_grad(set_to_none=True)
    for batch in batches:
        (module.training_step(batch, 0) * weight).backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2])
def test_one_process_step_equals_mean_of_per_rank_half_steps(tmp_path, stage):
    """Draws are per sample (keyed by global position), so the gradient of one step on the global
    batch of 2B equals the mean of the two ranks' half-batch gradients (what DDP computes)."""
    from training.losses import dropout_from_uniform
    from training.step import SampleDraws

    drop = {"dropout": {"image": 0.3, "text": 0.3, "both": 0.2}}
    # stage II: per-sample W+ noise only ("shuffle" permutes within each device's batch, by design)
    tp = train_params(make_params(tmp_path, stage1=drop, stage2={**drop, "augment": "noise"}))
    module, dm = reference_module(tp, stage)
    B = tp.phase("wplus", f"stage{stage}").batch_size
    b = 0

    def global_batch(seed: int) -> dict:
        return wplus_batches(dm.train_source, stage, 2 * B, seed, tp=tp).batch(b)

    whole = global_batch(tp.train.seed)
    # the per-sample dropout path is exercised: image only, text only, and kept both occur in this batch
    T = module.components.noise_scheduler.config.num_train_timesteps
    u = SampleDraws(tp.train.seed, whole["pos"].tolist()).standard((4, 8, 8), T)["u"]
    di, dt = dropout_from_uniform(u, 0.3, 0.3, 0.2)
    assert (di & ~dt).any() and (dt & ~di).any() and not (di | dt).all()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = step_gradients(module, [whole])
        got = step_gradients(module, [dm.dataset(b, r, 2).batch(b) for r in (0, 1)], 0.5)
        other_seed = step_gradients(module, [global_batch(tp.train.seed + 1)])
    finally:
        torch.set_num_threads(threads)
    assert ref and ref.keys() == got.keys()
    assert sum(float(v.abs().sum()) for v in ref.values()) > 0
    for n in ref:  # same math on a different batch split: float rounding only
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(other_seed[n], ref[n], rtol=1e-2, atol=1e-6) for n in ref)


def test_per_sample_draws_depend_on_the_sample_only():
    from training.step import SampleDraws

    shape, wshape = (4, 8, 8), (18, 512)

    def draws(seed, pos, extra=True):
        d = SampleDraws(seed, pos)
        out = d.standard(shape, 1000)
        return {**out, "w_noise": d.randn(wshape)} if extra else out

    all4 = draws(7, [10, 11, 12, 13])
    assert all4["eps"].shape == (4, *shape) and all4["t"].shape == (4,) and all4["w_noise"].shape == (4, *wshape)
    assert all4["t"].dtype == torch.int64 and ((all4["u"] >= 0) & (all4["u"] < 1)).all()
    one = draws(7, [12])  # position 12 alone
    for k in all4:
        assert torch.equal(one[k][0], all4[k][2]), k
    # a loss's later draws leave the standard ones unchanged (they come first)
    no_w = draws(7, [10, 11, 12, 13], extra=False)
    assert "w_noise" not in no_w and all(torch.equal(no_w[k], all4[k]) for k in no_w)
    assert not torch.equal(draws(8, [12])["noise"], one["noise"])
    assert not torch.equal(all4["noise"][0], all4["noise"][1])


def test_gradient_checkpointing_and_ema(tmp_path):
    base = train(make_params(tmp_path / "a"), "wplus", "stage1", max_steps=2)
    gc = train(make_params(tmp_path / "b", stage1={"gradient_checkpointing": True}), "wplus", "stage1", max_steps=2)
    ema = train(make_params(tmp_path / "c", stage1={"ema": 0.9}), "wplus", "stage1", max_steps=2)
    t0, tg, te = (read_adapter_file(r["adapter"])[0] for r in (base, gc, ema))
    assert all(torch.allclose(t0[k], tg[k], atol=1e-6) for k in t0)  # same training, recomputed activations
    assert any(not torch.allclose(t0[k], te[k]) for k in t0)  # exported weights are the EMA
    ck = torch.load(tmp_path / "c" / "checkpoints" / "wplus" / "stage1" / "last.ckpt", weights_only=False)
    assert ck["persona"]["ema"]["num_updates"] == 2
    assert all(k.startswith("adapter.") for k in ck["state_dict"])  # never the frozen UNet


def test_shards_hash_from_dvc_lock(tmp_path, shards_dir):
    import shutil

    shards = tmp_path / "data" / "shards"
    shutil.copytree(shards_dir, shards)
    files = [p for p in shards.rglob("*") if p.is_file()]
    lock = {"schema": "2.0", "stages": {"shards": {"outs": [
        {"path": "data/shards", "hash": "md5", "md5": "abc123.dir", "size": sum(p.stat().st_size for p in files),
         "nfiles": len(files)}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert shards_hash(shards, tmp_path / "dvc.lock") == "abc123.dir"
    assert shards_hash(tmp_path / "elsewhere", tmp_path / "dvc.lock") == "none"
    assert shards_hash(shards, tmp_path / "missing.lock") == "none"
    (shards / "train" / "extra.tar").write_bytes(b"x")  # rewritten outside DVC
    assert shards_hash(shards, tmp_path / "dvc.lock") == "none"


# ------------------------------------------------------------------------------------- resume
def test_find_and_prune_checkpoints(tmp_path):
    assert find_checkpoint(tmp_path) is None
    for n in (4, 8, 12):
        (tmp_path / f"step={n:06d}.ckpt").write_bytes(b"x")
    (tmp_path / "last.ckpt").symlink_to("step=000008.ckpt")  # killed before the link moved to 12
    assert find_checkpoint(tmp_path).name == "step=000012.ckpt"
    (tmp_path / ".step=000016.ckpt.123.tmp").write_bytes(b"partial")
    removed = prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == [".step=000016.ckpt.123.tmp", "step=000004.ckpt"]
    assert sorted(p.name for p in tmp_path.glob("step=*")) == ["step=000008.ckpt", "step=000012.ckpt"]


def _ckpts(d: Path) -> list[Path]:
    return sorted(d.glob("step=*.ckpt"))


def test_sigkill_mid_training_then_resume_equals_uninterrupted(tmp_path):
    steps = 30
    # a logged step at every checkpoint: Lightning logs it after the checkpoint is saved (training.logs.CSVResume)
    sec = {"stage1": {"max_steps": steps, "checkpoint_every": 4, "keep_last": 2, "log_every": 4}}
    # uninterrupted reference (in-process: same code path, 1 thread both ways)
    ref = train(make_params(tmp_path / "ref", **sec), "wplus", "stage1")
    assert ref["global_step"] == steps

    run = tmp_path / "run"
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump(make_params(run, mlflow=True, **sec)))
    cmd = PERSONA + ["train", "--method", "wplus", "--phase", "stage1", "--params", str(run / "params.yaml")]
    ckdir = run / "checkpoints" / "wplus" / "stage1"
    with open(run / "stderr.txt", "w") as err, subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                                                 stderr=err) as proc:
        try:
            deadline = time.monotonic() + 90
            while not _ckpts(ckdir):
                assert proc.poll() is None, f"ended before a checkpoint: {(run / 'stderr.txt').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 90 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None and not _ckpts(ckdir):
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    adapter = run / "models" / "wplus" / "stage1" / "adapter.safetensors"
    assert not adapter.exists(), "the run finished before the kill; nothing was interrupted"
    killed_at = max(int(p.stem.split("=")[1]) for p in _ckpts(ckdir))
    assert 4 <= killed_at < steps
    run_id = json.loads((ckdir / "run.json").read_text())["run_id"]

    out = subprocess.run(cmd + ["--json"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert res["global_step"] == steps and res["resumed_from"] is not None
    assert res["metrics"]["resumed_from_step"] >= killed_at
    assert res["run_id"] == run_id  # the same MLflow run continues

    got, _ = read_adapter_file(adapter)
    want, _ = read_adapter_file(ref["adapter"])
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert len(_ckpts(ckdir)) == 2 and (ckdir / "last.ckpt").resolve().name == f"step={steps:06d}.ckpt"
    # the CSV behind the DVC plots holds every logged step once, with the uninterrupted run's values
    for series in ("loss.csv", "lr.csv"):
        want_rows = (tmp_path / "ref" / "plots" / "train_wplus_stage1" / series).read_text()
        assert (run / "plots" / "train_wplus_stage1" / series).read_text() == want_rows, series
    assert [r.split(",")[0] for r in want_rows.splitlines()[1:]] == [str(s) for s in range(3, steps, 4)]


def test_rerun_of_a_finished_phase_keeps_its_logged_history(tmp_path):
    """DVC reruns a finished phase when an unrelated param of its method changes: it resumes at
    max_steps, trains nothing, and its CSV, plots and metrics still hold every logged step."""
    p = make_params(tmp_path, stage1={"max_steps": 3, "checkpoint_every": 3})
    first = train(p, "wplus", "stage1")
    plots = tmp_path / "plots" / "train_wplus_stage1"
    before = {f.name: f.read_text() for f in plots.glob("loss*.csv")}
    again = train(p, "wplus", "stage1")
    assert again["metrics"]["resumed_from_step"] == 3 and again["global_step"] == 3
    assert {f.name: f.read_text() for f in plots.glob("loss*.csv")} == before and before["loss.csv"].count("\n") == 4
    assert again["metrics"]["loss"] == first["metrics"]["loss"] and again["metrics"]["loss_first"] == first["metrics"]["loss_first"]


def split_shards(root: Path, n_shards: int, per_shard: int, size: int = 64) -> dict[str, str]:
    """Write n_shards train shards (+ one val shard) of synthetic samples; returns key -> train shard file."""
    samples = synthetic_samples(n_shards * per_shard + 2, identities=4, seed=5, size=size, encoded=True)
    where = {}
    for k in range(n_shards):
        chunk = samples[k * per_shard:(k + 1) * per_shard]
        write_tar(root / "train" / f"train-{k:06d}.tar", (encoded_members(s) for s in chunk))
        where.update({s["__key__"]: f"train-{k:06d}.tar" for s in chunk})
    write_tar(root / "val" / "val-000000.tar", (encoded_members(s) for s in samples[-2:]))
    return where


def test_ranks_read_disjoint_shards(tmp_path, caplog):
    """world W with >= W train shards: rank r reads only shards r, r + W, ...; together the ranks
    read every sample once per epoch; each rank's stream is deterministic; the global positions
    (and with them the per-sample draws) are those of the one-process global batch."""
    where = split_shards(tmp_path / "shards", n_shards=4, per_shard=3)
    files = sorted(set(where.values()))
    tp = train_params(make_params(tmp_path, train={"synthetic": 0, "shards": str(tmp_path / "shards")}))
    dm = data_module(tp, 1)
    B = tp.phase("wplus", "stage1").batch_size
    seen = {}
    for r in (0, 1):
        ds = dm.dataset(0, r, 2)
        assert ds.rank_source and len(ds.source) == 6
        own = set(files[r::2])
        keys = [k for b in range(3) for k in ds.batch(b)["key"]]  # 3 steps x B = 6 = one local epoch
        assert {where[k] for k in keys} <= own, f"rank {r} read another rank's shard"
        assert sorted(keys) == sorted(k for k, f in where.items() if f in own)  # each own sample once
        assert dm.dataset(0, r, 2).batch(1)["key"] == ds.batch(1)["key"]  # deterministic
        assert ds.batch(2)["pos"].tolist() == [(2 * 2 + r) * B + i for i in range(B)]
        seen[r] = set(keys)
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(where)

    # fewer shards than workers: every rank indexes all shards, reads disjoint samples, and says so
    split_shards(tmp_path / "one", n_shards=1, per_shard=8)
    tp1 = train_params(make_params(tmp_path, train={"synthetic": 0, "shards": str(tmp_path / "one")}))
    dm1 = data_module(tp1, 1)
    with caplog.at_level("WARNING", logger="persona.training.data"):
        halves = [dm1.dataset(0, r, 2) for r in (0, 1)]
    assert "1 shard(s) for 2 workers" in caplog.text
    assert not any(h.rank_source for h in halves)
    k0, k1 = (h.batch(0)["key"] for h in halves)
    assert len(k0) == len(k1) == B and not set(k0) & set(k1)


# ------------------------------------------------------------------------------------- regression
# Recorded on main 77e22b3 (before training became method compositions), CPU, 1 thread: per-step
# losses and the adapter TENSOR bytes of tiny Stage I (4 steps) and Stage II (3 steps, EMA 0.5) runs on
# real shards. (The file bytes of that code varied between identical runs, its several safetensors metadata
# entries being written in hash order, and the metadata changed with the seam; so the digest covers each
# tensor's shape, dtype and bytes, not the header.)
WPLUS_FIGURES = {
    1: {"tensors": "a535b9d26835b23690c0f92a193ea8856980bbc6c310ce129b67c815ae1c505f",
        "losses": [{"loss": 1.1040441989898682}, {"loss": 1.0340046882629395}, {"loss": 1.0757827758789062},
                   {"loss": 1.1447844505310059}]},
    2: {"tensors": "0da16beb9a2cef38f638a7dfe30dad442ac02e460c016bb5790ae7660a1e6f1b",
        "losses": [{"loss": 1.077720284461975, "loss_dis": 0.0023625222966074944, "loss_rec": 1.0682326555252075,
                    "loss_reg": 0.005943851079791784},
                   {"loss": 1.0294773578643799, "loss_dis": 0.0014715685974806547, "loss_rec": 1.0251375436782837,
                    "loss_reg": 0.002132388763129711},
                   {"loss": 1.0698271989822388, "loss_dis": 0.0002226289507234469, "loss_rec": 1.0680173635482788,
                    "loss_reg": 0.0014759352197870612}]},
}


def tensor_digest(path: Path) -> str:
    """sha256 over the sorted per-tensor sha256(shape, dtype, bytes) of a safetensors file (names aside)."""
    import hashlib

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        parts = sorted(hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode() + t.contiguous().numpy().tobytes()).hexdigest()
                       for t in (f.get_tensor(k) for k in f.keys()))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def test_wplus_losses_and_adapter_tensors_match_the_recorded_figures(tmp_path, shards_dir):
    from lightning.pytorch.callbacks import Callback

    class Losses(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append({k: float(m[k]) for k in sorted(m) if k.startswith("loss")})

    drop = {"image": 0.2, "text": 0.2, "both": 0.1}
    # the figures were recorded with full-size JPEG decoding (draft decoding changes the pixels)
    p = make_params(tmp_path, train={"synthetic": 0, "shards": str(shards_dir), "jpeg_draft": False},
                    stage1={"dropout": drop}, stage2={"dropout": drop, "ema": 0.5})
    for stage in (1, 2):
        rec = Losses()
        r = train(p, "wplus", f"stage{stage}", callbacks=[rec])
        assert rec.rows == WPLUS_FIGURES[stage]["losses"], stage
        assert tensor_digest(Path(r["adapter"])) == WPLUS_FIGURES[stage]["tensors"], stage
