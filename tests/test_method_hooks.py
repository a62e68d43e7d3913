"""The generic method hooks (the seam), exercised by a method defined in this file alone:
`Method.calibrate` (data-dependent init of a fresh conditioner, kept in the adapter), a conditioner's
own `weights_real()`, `Method.prompt` (evaluation and generation), `Method.evaluation_metrics`,
`Method.flags` + `persona generate --method` + `generate.methods.<method>` sampling defaults, and the
reference kit's face mesh."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training import methods
from training.adapters import DecoupledAttention
from training.methods.base import Method, MethodFlag, Phase, PhaseConfig, Prepared, mix
from training.transforms import aligned_face

NAME = "hooks"
CALLS = {"calibrate": 0}


class Centred(nn.Module):
    """(B, 512) id -> (B, 1, D): Linear(id - centre); `centre` is a buffer set by calibration."""

    def __init__(self, cross_dim: int):
        super().__init__()
        self.cross_dim = cross_dim
        self.register_buffer("centre", torch.zeros(512))
        self.proj = nn.Linear(512, cross_dim)

    def config(self) -> dict:
        return {"cross_dim": self.cross_dim}

    def weights_real(self) -> dict:
        return {"toy_encoder": False}

    def forward(self, inputs):
        return self.proj(inputs["id"].float() - self.centre)[:, None]


@dataclass
class HookConfig:
    main: PhaseConfig = field(default_factory=lambda: PhaseConfig(max_steps=2, batch_size=2, log_every=1, sample_every=0))
    more: PhaseConfig = field(default_factory=lambda: PhaseConfig(max_steps=1, batch_size=2, log_every=1, sample_every=0))


class Main(Phase):
    name = "main"
    members = ("face.jpg",)

    def example(self, sample, *, resolution, cfg, rng):
        return {"image": aligned_face(sample["face.jpg"], resolution), "prompt": "a face"}


class More(Main):
    name = "more"
    init = "main"


class Hooks(Method):
    name = NAME
    conditioner = Centred
    injection = DecoupledAttention
    config = HookConfig
    phases = {"main": Main(), "more": More()}
    needs = ("id.npy",)
    input_keys = ("id",)
    flags = (MethodFlag("--toy-code", "input", "code", "NPY", "an identity embedding file"),
             MethodFlag("--toy-mode", "option", "mode"))

    def conditioner_config(self, cfg, comps):
        return {"cross_dim": comps.cross_attention_dim}

    def calibrate(self, conditioner, source, cfg):
        CALLS["calibrate"] += 1
        ids = np.stack([source.get(i, ("id.npy",))["id.npy"] for i in range(len(source))])
        conditioner.centre.copy_(torch.from_numpy(ids.mean(0)))
        return {"faces": len(ids)}

    def inputs(self, samples, weights=None):
        return {"id": mix([s["id.npy"] for s in samples], weights)}

    def prepare(self, identity, files, options, kit):
        return Prepared({"id": np.load(files["code"]).astype(np.float32)}, {"files": dict(files), "options": dict(options)})

    def prompt(self, prompt, adapter):
        return prompt.replace("a face", "a hooked face")

    def evaluation_metrics(self, run):
        from training.evaluate import value

        again = run.generate([run.inputs[f] for f, _, _ in run.jobs], [run.prompts[p] for _, p, _ in run.jobs],
                             [s for _, _, s in run.jobs])
        same = all(np.array_equal(a, b) for a, b in zip(again, run.images))
        return {"hook_metric": value(len(run.images), 1, extra_equal=same)}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    methods.register(Hooks())
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _params(tmp: Path) -> dict:
    return {"train": {"synthetic": 8, "num_workers": 0, "threads": 1, "resolution": 64, "out_dir": str(tmp / "models"),
                      "checkpoints_dir": str(tmp / "checkpoints"), "metrics_dir": str(tmp / "metrics"),
                      "plots_dir": str(tmp / "plots"), "mlflow": {"enabled": False},
                      "sampling": {"num_faces": 1, "steps": 1}, "methods": {NAME: {}}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.train import train

    tmp = tmp_path_factory.mktemp("hooks")
    CALLS["calibrate"] = 0
    res = train(_params(tmp), NAME, "main")
    return tmp, res


def test_calibrate_initialises_a_fresh_conditioner_and_the_adapter_keeps_it(trained):
    from training.adapter import load_adapter
    from training.train import train

    tmp, res = trained
    assert CALLS["calibrate"] == 1
    ids = np.stack([s["id.npy"] for s in synthetic_samples(8, seed=0, size=64)])
    ad = load_adapter(res["adapter"])
    assert np.allclose(ad.conditioner.centre.numpy(), ids.mean(0), atol=1e-6)
    assert res["record"]["calibration"] == {"faces": 8}
    assert res["record"]["weights_real"]["conditioner.toy_encoder"] is False
    # a phase starting from an adapter keeps its calibration (no second one)
    more = train(_params(tmp), NAME, "more")
    assert CALLS["calibrate"] == 1 and more["record"]["calibration"] is None
    assert torch.equal(load_adapter(more["adapter"]).conditioner.centre, ad.conditioner.centre)


class _NoFaces:
    models = {"detector": {"fingerprint": "none", "weights_real": False}}

    def detect_embed(self, images):
        return [None] * len(images)

    def embed_aligned(self, images, lm5s):
        return np.zeros((len(images), 512), np.float32)


def _eval_cfg(tmp: Path):
    from training.evaluate import evaluate_config

    shards = tmp / "shards"
    if not shards.exists():
        write_tar(shards / "val" / "val-000000.tar",
                  (encoded_members(s) for s in synthetic_samples(4, identities=2, seed=7, encoded=True)))
    return evaluate_config({"shards": str(shards), "prompts": ["a face", "a portrait"], "steps": 1, "device": "cpu",
                            "images_out": str(tmp / "eval"), "metrics_out": str(tmp / "ev.json"),
                            "grid_out": str(tmp / "grid.png"), "control": {"enabled": False}})


def test_evaluation_uses_the_method_prompts_and_reports_its_metrics(trained, monkeypatch):
    from training.evaluate import evaluate
    from training.generate import Generator

    tmp, res = trained
    gen = Generator.load(str(Path(res["adapter"]).parent), device="cpu", dtype="fp32")
    ev = evaluate(_eval_cfg(tmp), generator=gen, scorer=_NoFaces(), log_mlflow=False)
    by_prompt = {s["prompt"]: s.get("model_prompt") for s in ev["samples"]}
    assert by_prompt == {"a face": "a hooked face", "a portrait": None}
    hm = ev["metrics"]["hook_metric"]
    assert hm["value"] == len(ev["samples"]) == 4 and hm["extra_equal"] is True  # run.generate = the evaluation's sampler
    assert ev["eval_set"]["prompts"] == ["a face", "a portrait"]
    monkeypatch.setattr(Hooks, "prompt", lambda self, p, a: p)
    plain = evaluate(_eval_cfg(tmp), generator=gen, scorer=_NoFaces(), log_mlflow=False)
    assert plain["eval_set"]["id"] != ev["eval_set"]["id"]  # what the model saw is part of the protocol
    monkeypatch.setattr(Hooks, "evaluation_metrics", lambda self, run: {"face_detection_rate": {"value": 1.0, "n": 1}})
    with pytest.raises(ValueError, match="already has"):
        evaluate(_eval_cfg(tmp), generator=gen, scorer=_NoFaces(), log_mlflow=False)


def test_generate_cli_method_flags_method_adapter_and_method_sampling_defaults(trained, monkeypatch):
    from pipeline.cli import main

    tmp, res = trained
    folder = Path(res["adapter"]).parent
    code = tmp / "code.npy"
    np.save(code, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    (tmp / "params.yaml").write_text(yaml.safe_dump({
        "evaluate": {"adapters": {NAME: str(folder), "wplus": str(folder)}},
        "generate": {"steps": 3, "scheduler": "ddim", "methods": {NAME: {"steps": 1, "scheduler": "dpm++"}}}}))
    monkeypatch.chdir(tmp)
    assert main(["generate", "--method", NAME, "--toy-code", str(code), "--toy-mode", "x", "--prompt", "a face",
                 "--out", "a", "--device", "cpu"]) == 0
    rec = json.loads((tmp / "a" / "img-p00-seed0.json").read_text())
    assert rec["conditioning"][0]["files"] == {"code": str(code)} and rec["conditioning"][0]["options"] == {"mode": "x"}
    assert rec["request"] == {"inputs": {"code": str(code)}, "options": {"mode": "x"}}
    assert (rec["steps"], rec["scheduler"]["name"]) == (1, "dpm++")  # generate.methods.hooks over generate
    assert (rec["prompt"], rec["model_prompt"]) == ("a face", "a hooked face")
    assert main(["generate", "--adapter", str(folder), "--input", f"code={code}", "--steps", "2", "--prompt", "a face",
                 "--out", "b", "--device", "cpu"]) == 0
    assert json.loads((tmp / "b" / "img-p00-seed0.json").read_text())["steps"] == 2  # a flag wins
    assert main(["generate", "--from-json", str(tmp / "a" / "img-p00-seed0.json"), "--check"]) == 0
    with pytest.raises(SystemExit, match=r"--toy-codes .*flags of method 'hooks': --toy-code, --toy-mode"):
        main(["generate", "--method", NAME, "--toy-codes", str(code), "--prompt", "a face"])
    with pytest.raises(SystemExit, match="given both"):
        main(["generate", "--method", NAME, "--toy-code", str(code), "--input", f"code={code}", "--prompt", "a face"])
    with pytest.raises(SystemExit, match="holds a 'hooks' adapter, not --method wplus"):
        main(["generate", "--method", "wplus", "--toy-code", str(code), "--prompt", "a face"])


def test_reference_kit_keeps_the_dense_mesh(sample_raw):
    from pipeline.images import load_rgb
    from training.references import ReferenceKit, largest_face

    photo = sample_raw / "sample" / "obama" / "obama.jpg"
    kit = ReferenceKit()
    try:
        f = kit.face(photo)
        det = largest_face(kit.detector.detect(load_rgb(photo)[0]))
    finally:
        kit.close()
    assert f.mesh is not None and f.mesh.shape == (478, 2) and np.allclose(f.mesh, det.mesh)
