"""PIDiff (training/methods/pidiff.py) on the tiny model: the personalize phase's data binding,
dropout, W+ noise and trainable set; style mixing; and `persona personalize` end to end on real
shards written with the pipeline's tar writer (one identity in the val split): train, register per
identity, skip on rerun, refuse too few photos, evaluate on the held-out faces, generate from the
registry alias with a style reference, re-run the record to the same pixels.

The fan-out over a two-node Ray cluster is in tests/test_personalize_cluster.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ConfigError
from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training import methods
from training.config import train_params
from training.methods.base import DataVerdict
from training.methods.pidiff import (IdentityData, Personalize, identity_alias, identity_slug, independent_dropout,
                                     style_mix)

from tests.test_training import make_params


def pidiff_params(tmp: Path, shards: Path, mlflow: bool = False, **personalize) -> dict:
    raw = make_params(tmp, mlflow=mlflow, train={"synthetic": 0, "shards": str(shards)})
    raw["train"]["methods"] = {"pidiff": {"personalize": {
        "max_steps": 2, "batch_size": 2, "min_photos": 3, "holdout": 1, "log_every": 1, "checkpoint_every": 2,
        "sample_every": 0, **personalize}}}
    return raw


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 identities x 4 faces + 2 unlabeled; identity synthetic_002 is in the val split only."""
    root = tmp_path_factory.mktemp("pidiff_shards")
    samples = synthetic_samples(14, identities=3, unlabeled=2, seed=21, size=64, encoded=True)
    val = [s for s in samples if json.loads(s["json"])["identity"] == "synthetic_002"]
    train = [s for s in samples if s not in val]
    write_tar(root / "train" / "train-000000.tar", (encoded_members(s) for s in train))
    write_tar(root / "val" / "val-000000.tar", (encoded_members(s) for s in val))
    return root


def bound(tmp_path, shards, identity="synthetic_002", **personalize):
    from training.data import PersonaDataModule

    tp = train_params(pidiff_params(tmp_path, shards, identity=identity, **personalize))
    m = methods.get("pidiff")
    dm = PersonaDataModule(m, m.phase("personalize"), tp.train, tp.phase("pidiff", "personalize"))
    dm.setup()
    return tp, dm


# ------------------------------------------------------------------------------------- config
def test_paper_defaults_and_validation():
    tp = train_params({})
    c, opts = tp.phase("pidiff", "personalize"), tp.method("pidiff")
    assert (c.max_steps, c.batch_size, c.lr, c.weight_decay, c.optimizer) == (600, 4, 1e-4, 0.01, "adamw")
    assert (c.visual_dropout, c.text_dropout, c.noise_sigma, c.min_photos, c.token) == (0.5, 0.3, 0.05, 4, "sks")
    assert c.init is None  # "base": a fresh adapter (W' from the text W, F random)
    assert (opts.style_split, opts.inference_scale) == (8, 0.4)
    assert methods.get("pidiff").inference_scale(opts) == 0.4
    assert c.prompts[:2] == ["an image of S*", "a cropped photo of S*"]
    for bad, match in ((({"pidiff.personalize.dropout": {"image": 0.1}}), "derived from visual_dropout"),
                       ({"pidiff.style_split": 18}, "style_split"),
                       ({"pidiff.personalize.prompts": ["a photo"]}, "S\\*"),
                       ({"pidiff.personalize.token": "two words"}, "one word")):
        with pytest.raises(ConfigError, match=match):
            train_params({}, bad)


def test_identity_names_become_safe_slugs_and_aliases():
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    assert identity_slug("obama") == "obama" and identity_alias("grace_hopper") == "grace_hopper-champion"
    odd = ["José Ñ", "../../etc", "latest", "v1", "a b", "-x-"]
    slugs = [identity_slug(n) for n in odd]
    assert len(set(slugs)) == len(odd) and all("/" not in s and not s.startswith(("-", ".")) for s in slugs)
    for n in odd:
        _validate_model_alias_name(identity_alias(n))
        _validate_model_alias_name_reserved(identity_alias(n))


# ------------------------------------------------------------------------------------- data
def test_bind_picks_the_identity_holds_out_and_refuses_too_few(tmp_path, shards):
    _, dm = bound(tmp_path, shards)
    d = dm.phase.data
    assert d.identity == "synthetic_002" and len(d.train_keys) == 3 and len(d.held_out_keys) == 1
    assert not set(d.train_keys) & set(d.held_out_keys) and d.held_out_keys[0] > max(d.train_keys)
    seen = {k for b in range(6) for k in dm.dataset(0).batch(b)["key"]}
    assert seen == set(d.train_keys)  # from the val split; never a held-out or another identity's face
    batch = dm.dataset(0).batch(0)
    assert all(p.startswith(("an image of sks", "a cropped photo of sks", "a photo of sks", "a close-up photo of sks",
                             "a good photo of sks", "a portrait of sks", "a bright photo of sks", "a rendition of sks"))
               for p in batch["prompt"])
    rec = dm.phase.record(dm.pcfg)
    assert rec["evaluation_faces"] == d.held_out_keys and rec["init"] == "base"
    assert rec["registry"] == {"tags": {"identity": "synthetic_002", "base_adapter": "base", "token": "sks",
                                        "held_out": "1"}, "aliases": ["synthetic_002-champion"]}
    w = np.stack([dm.train_source.get(dm.train_source.entries.index(e), ("wplus.npy",))["wplus.npy"]
                  for e in dm.train_source.entries if e.key in d.train_keys]).astype(np.float32)
    np.testing.assert_allclose(d.wplus_std, w.std(axis=0), rtol=1e-6)

    # exactly min_photos: all train, none held out (evaluated on its training faces)
    _, dm4 = bound(tmp_path, shards, min_photos=4)
    assert len(dm4.phase.data.train_keys) == 4 and dm4.phase.record(dm4.pcfg)["evaluation_faces"] == dm4.phase.data.train_keys
    with pytest.raises(DataVerdict, match="4 usable face.*min_photos=5") as e:
        bound(tmp_path, shards, min_photos=5)
    assert e.value.reason == "too_few_photos"
    with pytest.raises(DataVerdict, match="no usable faces") as e:
        bound(tmp_path, shards, identity="nobody")
    assert e.value.reason == "no_photos"


def test_dropout_rates_over_2000_draws_within_3_standard_errors():
    """The real path of a training step: per-sample uniforms (SampleDraws.standard, as StepContext
    draws them) -> the phase's dropout cases -> dropout_from_uniform."""
    from training.losses import dropout_from_uniform
    from training.step import SampleDraws

    m = methods.get("pidiff")
    cfg = train_params({}).phase("pidiff", "personalize")
    cases = m.phase("personalize").dropout(cfg, 0)
    assert cases == pytest.approx(independent_dropout(0.5, 0.3))
    assert cases == pytest.approx((0.35, 0.15, 0.15))
    n = 2000
    u = SampleDraws(7, list(range(n))).standard((4, 8, 8), 1000)["u"]
    visual, text = dropout_from_uniform(u, *cases)
    for got, p in ((visual.float().mean(), 0.5), (text.float().mean(), 0.3), ((visual & text).float().mean(), 0.15)):
        se = (p * (1 - p) / n) ** 0.5
        assert abs(float(got) - p) < 3 * se, (float(got), p)


class FakeContext:
    """What Personalize.loss reads of a StepContext; records the W+ codes its tokens come from."""

    def __init__(self, w: torch.Tensor, drop: torch.Tensor):
        from training.step import SampleDraws

        self.inputs = {"wplus": w * (~drop).view(-1, 1, 1)}
        self.drop_cond = drop
        self.draws = SampleDraws(3, list(range(len(w))))
        self.draws.standard((4, 8, 8), 1000)  # the four standard draws come first, as in StepContext
        self.target = torch.zeros(len(w), 4, 8, 8)
        self.seen = None

    def tokens(self, inputs):
        self.seen = inputs["wplus"].clone()
        return torch.zeros(len(self.seen), 4, 8)

    def unet(self, tokens, scale=1.0):
        assert scale == 1.0  # lambda = 1 in training
        return torch.zeros_like(self.target, requires_grad=True)


def test_wplus_noise_has_the_configured_scale():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 2.0, (18, 512)).astype(np.float32)
    std[3] = 0.0  # a dimension without spread gets no noise
    phase = Personalize(IdentityData("x", ["a"], [], std, "0"))
    cfg = train_params({}).phase("pidiff", "personalize")
    B = 16
    w = torch.from_numpy(rng.standard_normal((B, 18, 512)).astype(np.float32))
    drop = torch.zeros(B, dtype=torch.bool)
    drop[:4] = True
    ctx = FakeContext(w, drop)
    phase.loss(ctx, cfg)
    noise = (ctx.seen - ctx.inputs["wplus"])[~drop]
    z = noise / torch.from_numpy(np.where(std > 0, std, 1.0))
    assert torch.all(noise[:, 3] == 0)
    z = torch.cat([z[:, :3], z[:, 4:]], 1)
    assert abs(float(z.std()) - cfg.noise_sigma) < 0.02 * cfg.noise_sigma and abs(float(z.mean())) < 0.002
    assert torch.all(ctx.seen[drop] == 0)  # a dropped visual prompt stays the null code
    ctx2 = FakeContext(w, drop)
    phase.loss(ctx2, cfg)
    assert torch.equal(ctx.seen, ctx2.seen)  # drawn per sample from its own generator: deterministic


def test_only_sca_projections_and_f_receive_gradients(tmp_path, shards):
    from training.module import PersonaModule
    from training.train import build_adapter, load_components

    tp, dm = bound(tmp_path, shards, visual_dropout=0.0, text_dropout=0.0)  # every sample carries its W+ code
    m = methods.get("pidiff")
    comps = load_components(tp.train)
    adapter, init = build_adapter(m, dm.phase, tp, comps)
    assert init is None  # init: base
    module = PersonaModule(m, dm.phase, dm.pcfg, tp.train.seed, comps, adapter)
    module._log_step = lambda parts, batch_size: None
    module.train()
    module.zero_grad(set_to_none=True)
    module.training_step(dm.dataset(0).batch(0), 0).backward()
    with_grad = {id(p) for p in module.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    f = {id(p) for p in adapter.conditioner.parameters()}
    sca = {id(p) for p in adapter.injection.parameters()}
    names = [n for n, _ in adapter.injection.named_parameters()]
    assert f and sca and all(n.split(".")[-2] in ("to_q_w", "to_k_w", "to_v_w") for n in names)
    assert len(names) == 3 * len(adapter.injection.config()["layers"])  # W_q', W_k', W_v' of every SCA
    assert trainable == f | sca  # UNet, VAE, text encoder (and the layers' own to_q/k/v) frozen
    assert with_grad == f | sca


def test_init_from_a_wplus_adapter_folder_or_its_registry_alias(tmp_path, shards):
    """`init:` a trained W+ Adapter: PIDiff starts from its WProj and attention (same shapes), the
    record says which; a models:/ alias is pinned to its version once for every identity of a run."""
    from pipeline.digests import sha256_file
    from training.adapter import read_adapter_file
    from training.personalize import resolve_init
    from training.registry import Registry
    from training.train import build_adapter, load_components, train

    res = train(make_params(tmp_path / "w"), "wplus", "stage1", fast_dev_run=True)
    folder = Path(res["adapter"]).parent
    tensors, _ = read_adapter_file(res["adapter"])
    tp, dm = bound(tmp_path, shards, init=str(folder))
    m = methods.get("pidiff")
    adapter, init = build_adapter(m, dm.phase, tp, load_components(tp.train))
    assert init == folder / "adapter.safetensors"
    for k, v in adapter.conditioner.state_dict().items():
        assert torch.equal(v, tensors[f"conditioner.{k}"])
    for k, v in adapter.injection.state_dict().items():
        assert torch.equal(v, tensors[f"injection.{k}"])
    assert dm.phase.record(dm.pcfg)["init"] == str(folder)
    assert dm.phase.record(dm.pcfg)["registry"]["tags"]["base_adapter"] == str(folder)

    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    Registry(tracking_uri=uri).register(folder, alias="champion")
    pinned = resolve_init("models:/persona-wplus@champion", tracking_uri=uri)
    assert pinned["use"] == "models:/persona-wplus/1" and pinned["spec"] == "models:/persona-wplus@champion"
    assert pinned["sha256"] == sha256_file(folder / "adapter.safetensors")
    assert resolve_init(None) == {"spec": None, "use": None, "sha256": None}


# ------------------------------------------------------------------------------------- style mixing
def test_style_mix_takes_exactly_the_configured_rows(tmp_path):
    from training.generate import Identity
    from training.references import ReferenceKit

    rng = np.random.default_rng(1)
    style, ident = (rng.standard_normal((18, 512)).astype(np.float32) for _ in range(2))
    for k in (1, 8, 17):
        w = style_mix(style, ident, k)
        assert np.array_equal(w[:k], style[:k]) and np.array_equal(w[k:], ident[k:]) and w.shape == (18, 512)
    with pytest.raises(ValueError, match="split"):
        style_mix(style, ident, 0)

    np.save(tmp_path / "style.npy", style)
    np.save(tmp_path / "id.npy", ident)
    m = methods.get("pidiff")
    kit = ReferenceKit()
    files = {"wplus": str(tmp_path / "id.npy"), "style": str(tmp_path / "style.npy")}
    p = m.prepare(Identity(), files, {}, kit)  # default split: train.methods.pidiff.style_split
    assert np.array_equal(p.inputs["wplus"], style_mix(style, ident, 8))
    mixrec = p.record["style_mix"]
    assert mixrec["split"] == 8 and mixrec["style_rows"] == [0, 8] and mixrec["identity_rows"] == [8, 18]
    assert mixrec["style"]["path"] == files["style"] and p.record["source"]["path"] == files["wplus"]
    p3 = m.prepare(Identity(), files, {"split": "3"}, kit)
    assert np.array_equal(p3.inputs["wplus"][:3], style[:3]) and np.array_equal(p3.inputs["wplus"][3:], ident[3:])
    with pytest.raises(ValueError, match="goes with a style reference"):
        m.prepare(Identity(), {"wplus": files["wplus"]}, {"split": "3"}, kit)
    with pytest.raises(ValueError, match="unknown"):
        m.prepare(Identity(), {**files, "edit": "x.npy"}, {}, kit)


# ------------------------------------------------------------------------------------- end to end
def test_personalize_register_skip_refuse_evaluate_generate(tmp_path, shards, monkeypatch, capsys):
    """`persona personalize` (in this process, as the CLI runs it) -> registry version with the
    identity's tags and alias -> rerun skipped -> too few photos refused (exit 1) -> evaluate on the
    held-out face -> `persona generate --adapter models:/persona-pidiff@<identity>-champion
    --style-ref` (lambda 0.4 by default) -> `--from-json` gives the same pixels; `--method pidiff`."""
    from pipeline import cli
    from training.registry import Registry

    monkeypatch.chdir(tmp_path)
    raw = pidiff_params(tmp_path, shards, mlflow=True)
    uri = raw["train"]["mlflow"]["tracking_uri"]
    raw["registry"] = {"tracking_uri": uri, "artifact_location": str(tmp_path / "mlartifacts")}
    raw["personalize"] = {"method": "pidiff"}
    raw["evaluate"] = {"adapters": {"pidiff": "models/pidiff/synthetic_002"}, "steps": 2, "prompts": ["a photo of sks"],
                       "control": {"enabled": False}, "mlflow": {"enabled": False}}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(raw))
    base = ["personalize", "--params", str(pfile), "--method", "pidiff"]

    assert cli.main(base + ["--identity", "synthetic_002", "--from-shards", "--steps", "3", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_002: trained to step 3" in out and "@synthetic_002-champion" in out
    folder = tmp_path / "models" / "pidiff" / "synthetic_002"
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["global_step"] == 3 and meta["scale"] == 0.4 and meta["phase_record"]["identity"] == "synthetic_002"
    ev = json.loads((tmp_path / "metrics" / "evaluate_pidiff_synthetic_002.json").read_text())
    assert ev["eval_set"]["faces"] == meta["phase_record"]["photos"]["held_out"] and ev["eval_set"]["lambda"] == 0.4
    reg = Registry(tracking_uri=uri)
    mv = reg.version("persona-pidiff", "synthetic_002-champion")
    assert mv.tags["identity"] == "synthetic_002" and mv.tags["base_adapter"] == "base"
    assert mv.tags["git_commit"] and mv.tags["shards_hash"] and "evaluated" not in mv.tags
    assert "metric.identity_similarity" in mv.tags
    report = json.loads((tmp_path / "metrics" / "reports" / "personalize_pidiff_synthetic_002.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["trained"]

    sha = (folder / "adapter.safetensors").read_bytes()
    assert cli.main(base + ["--identity", "synthetic_002", "--steps", "3"]) == 0
    assert "synthetic_002: skipped" in capsys.readouterr().out
    assert (folder / "adapter.safetensors").read_bytes() == sha
    assert len(reg.list("persona-pidiff")) == 1  # not registered twice

    assert cli.main(base + ["--identity", "synthetic_000", "--set", "pidiff.personalize.min_photos=9"]) == 1
    cap = capsys.readouterr()
    assert "identity 'synthetic_000': 4 usable face(s)" in cap.err and "min_photos=9" in cap.err
    assert not (tmp_path / "models" / "pidiff" / "synthetic_000").exists()

    # generation from the registry alias, W+ rows 0:8 from a style code, 8:18 from the identity's code
    rng = np.random.default_rng(5)
    np.save(tmp_path / "id.npy", rng.standard_normal((18, 512)).astype(np.float32))
    np.save(tmp_path / "style.npy", rng.standard_normal((18, 512)).astype(np.float32))
    gen = ["generate", "--params", str(pfile), "--tracking-uri", uri, "--prompt", "a photo of sks", "--steps", "2",
           "--input", f"wplus={tmp_path / 'id.npy'}", "--style-ref", str(tmp_path / "style.npy")]
    assert cli.main(gen + ["--adapter", "models:/persona-pidiff@synthetic_002-champion", "--out", "gen"]) == 0
    rec = json.loads((tmp_path / "gen" / "img-p00-seed0.json").read_text())
    assert rec["lambda"] == 0.4 and rec["adapter"]["registry"]["alias"] == "synthetic_002-champion"
    mix = rec["conditioning"][0]["style_mix"]
    assert mix["split"] == 8 and mix["style"]["path"] == str(tmp_path / "style.npy")
    saved = np.load(tmp_path / "gen" / rec["conditioning"][0]["inputs"]["wplus"]["file"])
    assert np.array_equal(saved, style_mix(np.load(tmp_path / "style.npy"), np.load(tmp_path / "id.npy"), 8))
    capsys.readouterr()
    assert cli.main(["generate", "--from-json", str(tmp_path / "gen" / "img-p00-seed0.json"), "--check"]) == 0
    assert "IDENTICAL" in capsys.readouterr().out

    assert cli.main(gen + ["--method", "pidiff", "--lambda", "0.7", "--out", "gen2"]) == 0  # evaluate.adapters.pidiff
    rec2 = json.loads((tmp_path / "gen2" / "img-p00-seed0.json").read_text())
    assert rec2["lambda"] == 0.7 and rec2["adapter"]["path"].endswith("models/pidiff/synthetic_002")
    with pytest.raises(SystemExit, match="holds a 'pidiff' adapter, not --method wplus"):
        cli.main(gen + ["--method", "wplus", "--adapter", str(folder), "--out", "gen3"])


@pytest.mark.slow
def test_personalize_from_a_folder_runs_the_data_stages_first(sample_raw, tmp_path, monkeypatch, capsys):
    """`--images DIR`: the photos go through every data stage (the registered ones, through the
    pipeline's runner) into <work_dir>/<identity>, then the identity trains on those shards; a rerun
    recomputes nothing and skips the training. A name that is no file name gets a safe folder."""
    from pipeline import cli

    monkeypatch.chdir(tmp_path)
    who = "Barack Obama"
    raw = pidiff_params(tmp_path, tmp_path / "unused", min_photos=2)
    raw.update({"runtime": {"executor": "local", "progress": False}, "wplus": {"input_size": 128},
                "personalize": {"method": "pidiff", "work_dir": str(tmp_path / "work"), "register": False}})
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(raw))
    cmd = ["personalize", "--params", str(pfile), "--identity", who, "--images", str(sample_raw / "sample" / "obama")]
    assert cli.main(cmd) == 0
    out = capsys.readouterr().out
    slug = identity_slug(who)
    (report,) = (tmp_path / "metrics" / "reports").glob("personalize_pidiff_*.json")
    named = json.loads(report.read_text())["rows"][0]
    shard_name = named["identity"]  # the ingest stage's safe form of the name
    assert shard_name.startswith("Barack_Obama-") and f"'{who}' is '{shard_name}' in the shards" in out
    assert f"[personalize pidiff] {shard_name}: trained to step 2" in out
    work = tmp_path / "work" / slug
    lines = [json.loads(x) for x in (work / "photos.jsonl").read_text().splitlines()]
    assert [Path(x["path"]).name for x in lines] == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
    assert {x["identity"] for x in lines} == {who}
    assert "[shards] inputs=3 computed=3" in out and (work / "data" / "shards" / "index.json").is_file()
    meta = json.loads((tmp_path / "models" / "pidiff" / identity_slug(shard_name) / "adapter.json").read_text())
    rec = meta["phase_record"]
    assert rec["identity"] == shard_name and len(rec["photos"]["train"]) == 2 and len(rec["photos"]["held_out"]) == 1

    assert cli.main(cmd) == 0
    out = capsys.readouterr().out
    assert "[align] inputs=3 computed=0 cached=3" in out and f"{shard_name}: skipped" in out
