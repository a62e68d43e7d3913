"""The method seam: methods defined in this file alone go through the generic training, adapter
file, generation, evaluation and registry code unchanged.

- "toy": a linear conditioner on the shard's `id.npy` x decoupled attention; identity-grouped batches
  (2 identities x 2 faces), a step-dependent identity dropout, a loss term over the batch's groups.
- "toytext": an injection into the TEXT ENCODER's input embeddings at an identifier token (the
  Face2Diffusion shape), with an extra frozen UNet pass on a class prompt masked by the face mask.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models.diffusion import build_random
from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training import methods
from training.adapter import load_adapter, read_adapter_file
from training.adapters import DecoupledAttention, Injection
from training.data import IdentityGroupedSampler
from training.losses import mask_to_latent, noise_mse
from training.methods.base import Method, Phase, PhaseConfig, mix
from training.transforms import aligned_face

from tests.test_training import make_params


# ============================================================================================
# "toy": linear on id.npy x decoupled attention


class IdLinear(nn.Module):
    """(B, 512) identity embedding -> (B, T, D) tokens."""

    def __init__(self, cross_dim: int, num_tokens: int = 2, in_dim: int = 512):
        super().__init__()
        self.cross_dim, self.num_tokens, self.in_dim = cross_dim, num_tokens, in_dim
        self.proj = nn.Linear(in_dim, cross_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_dim)

    def config(self) -> dict:
        return {"cross_dim": self.cross_dim, "num_tokens": self.num_tokens, "in_dim": self.in_dim}

    def forward(self, inputs) -> torch.Tensor:
        x = inputs["id"].to(self.proj.weight.dtype)
        return self.norm(self.proj(x).view(x.shape[0], self.num_tokens, self.cross_dim))


@dataclass
class ToyPhaseConfig(PhaseConfig):
    l_group: float = 0.1
    drop_start: float = 0.9  # identity dropout at step 0, falling linearly to drop_end at drop_steps
    drop_end: float = 0.05
    drop_steps: int = 4


@dataclass
class ToyConfig:
    tokens: int = 2
    main: ToyPhaseConfig = field(default_factory=ToyPhaseConfig)


class ToyMain(Phase):
    name = "main"
    config = ToyPhaseConfig
    members = ("face.jpg",)

    def sampler(self, cfg):
        return IdentityGroupedSampler(identities=2, per_identity=2)

    def example(self, sample, *, resolution, cfg, rng):
        return {"image": aligned_face(sample["face.jpg"], resolution), "prompt": "a photo of a face"}

    def dropout(self, cfg, step):
        f = min(1.0, step / max(1, cfg.drop_steps))
        return cfg.drop_start + f * (cfg.drop_end - cfg.drop_start), 0.0, 0.0

    def loss(self, ctx, cfg):
        rec = noise_mse(ctx.predict(), ctx.target)
        tok = ctx.tokens({"id": ctx.batch["id"].float()}).mean(1)  # the undropped identities
        g = ctx.batch["group"]
        same = (g[:, None] == g[None, :]) & ~torch.eye(len(g), dtype=torch.bool, device=g.device)
        group = ((tok[:, None] - tok[None, :]) ** 2).mean(-1)[same].mean()
        return {"loss": rec + cfg.l_group * group, "rec": rec, "group": group}


class Toy(Method):
    name = "toy"
    conditioner = IdLinear
    injection = DecoupledAttention
    config = ToyConfig
    phases = {"main": ToyMain()}
    needs = ("id.npy",)
    input_keys = ("id",)

    def conditioner_config(self, cfg, comps):
        return {"cross_dim": comps.cross_attention_dim, "num_tokens": cfg.tokens}

    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        e = mix([s["id.npy"] for s in samples], weights)
        return {"id": (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)}


# ============================================================================================
# "toytext": the identity replaces the text encoder's input embedding of an identifier token


IDENTIFIER = "*"


class TextEmbeddingHook(Injection):
    """Overwrites the text encoder's token embeddings at the identifier token with the tokens
    (B, 1, D_text); scale s mixes (1 - s) * original + s * tokens (0: the base text encoder)."""

    conditions_text = True

    def __init__(self, identifier: str = IDENTIFIER, scale: float = 1.0):
        super().__init__(scale)
        self.identifier = identifier
        self.gate = nn.Parameter(torch.ones(()))  # a trainable tensor of the injection (its state dict)
        object.__setattr__(self, "_hook", None)

    def config(self) -> dict:
        return {"identifier": self.identifier}

    @property
    def installed(self) -> bool:
        return self._hook is not None

    def install(self, target: Any, *, dtype=None) -> "TextEmbeddingHook":
        ids = target.tokenizer(self.identifier).input_ids
        token_id = int(ids[1])  # after <bos>
        emb = target.text_encoder.get_input_embeddings()

        def hook(module, args, output):
            s = self.state.scale
            mask = args[0] == token_id
            if s == 0.0 or not bool(mask.any()):
                return None
            tok = self.state.for_batch(output.shape[0])[:, :1].to(output.dtype)
            new = (1 - s) * output + s * self.gate * tok.expand_as(output)
            return torch.where(mask[..., None], new, output)

        object.__setattr__(self, "_hook", emb.register_forward_hook(hook))
        self.gate.data = self.gate.data.to(emb.weight.device)
        return self

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            object.__setattr__(self, "_hook", None)


@dataclass
class TextPhaseConfig(PhaseConfig):
    l_class: float = 1.0


@dataclass
class TextConfig:
    main: TextPhaseConfig = field(default_factory=TextPhaseConfig)


class TextMain(Phase):
    name = "main"
    config = TextPhaseConfig
    members = ("face.jpg", "face_mask.png")

    def example(self, sample, *, resolution, cfg, rng):
        m = torch.from_numpy(np.asarray(sample["face_mask.png"], dtype=np.float32) / 255.0)[None, None]
        mask = torch.nn.functional.interpolate(m, size=(resolution, resolution), mode="area")[0]
        return {"image": aligned_face(sample["face.jpg"], resolution), "mask": mask, "prompt": f"a photo of {IDENTIFIER}"}

    def loss(self, ctx, cfg):
        eps = ctx.predict()
        with torch.no_grad():  # the class prompt, no identity: an extra frozen pass
            eps_c = ctx.unet(None, scale=0.0, prompts=["a photo of a person"] * len(ctx.batch["prompt"]))
        m = mask_to_latent(ctx.batch["mask"], tuple(eps.shape[-2:])).to(eps.device)
        target = ctx.target * m + eps_c * (1 - m)
        return {"loss": noise_mse(eps, target), "class": noise_mse(eps * (1 - m), eps_c * (1 - m))}


class ToyText(Method):
    name = "toytext"
    conditioner = IdLinear
    injection = TextEmbeddingHook
    config = TextConfig
    phases = {"main": TextMain()}
    needs = ("id.npy",)
    input_keys = ("id",)

    def conditioner_config(self, cfg, comps):
        return {"cross_dim": int(comps.text_encoder.config.hidden_size), "num_tokens": 1}

    def inputs(self, samples, weights=None):
        return Toy.inputs(self, samples, weights)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    methods.register(Toy())
    methods.register(ToyText())
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _params(tmp: Path, method: str, **main) -> dict:
    p = make_params(tmp, method=method, main={"max_steps": 3, "batch_size": 4, "log_every": 1, **main})
    p["train"]["methods"].pop("wplus")
    return p


# ============================================================================================


def test_a_method_defined_outside_the_package_trains_saves_loads_generates_evaluates_registers(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from training.evaluate import evaluate, evaluate_config
    from training.generate import Generator
    from training.registry import Registry, RegistryConfig
    from training.sampling import make_pipeline, sample
    from training.train import train

    class Seen(Callback):
        def __init__(self):
            self.batches, self.metrics = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches.append({"group": batch["group"].tolist(), "key": list(batch["key"])})
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("loss")})

    seen = Seen()
    res = train(_params(tmp_path, "toy"), "toy", "main", callbacks=[seen])
    assert res["global_step"] == 3 and res["phase"] == "main"
    # identity-grouped batches: 2 identities x 2 faces, labelled by global group index
    assert [b["group"] for b in seen.batches] == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]
    assert all(set(m) == {"loss", "loss_rec", "loss_group"} for m in seen.metrics)
    plots = tmp_path / "plots" / "train_toy_main"  # one DVC plot per logged series, every term of the method
    assert {f.name for f in plots.glob("*.csv")} >= {"loss.csv", "loss_rec.csv", "loss_group.csv", "lr.csv"}
    rows = (plots / "loss_group.csv").read_text().splitlines()
    assert rows[0] == "step,loss_group" and len(rows) == 4

    # the file alone rebuilds the method
    path = Path(res["adapter"])
    tensors, meta = read_adapter_file(path)
    assert (meta["method"], meta["phase"]) == ("toy", "main") and json.loads(meta["conditioner"])["num_tokens"] == 2
    assert {k.split(".")[0] for k in tensors} == {"conditioner", "injection"}
    ad = load_adapter(path)
    assert type(ad.conditioner) is IdLinear and type(ad.injection) is DecoupledAttention

    # generation through the generic Generator (a diffusers pipeline); scale 0 = the base pipeline
    gen = Generator.load(str(path.parent), device="cpu", dtype="fp32")
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    kw = dict(steps=2, guidance=3.0, scheduler="dpm++")
    img = gen.sample([[{"id": emb}]], ["a face"], [1], **kw)[0]
    other = gen.sample([[{"id": -emb}]], ["a face"], [1], **kw)[0]
    base = sample(make_pipeline(build_random("tiny", device="cpu").freeze()), None, None, ["a face"], [1], **kw)[0]
    assert not np.array_equal(img, other)
    assert np.array_equal(gen.sample([[{"id": emb}]], ["a face"], [1], scale=0.0, **kw)[0], base)

    # evaluation and registration of any method
    shards = tmp_path / "shards"
    samples = synthetic_samples(4, identities=2, seed=7, encoded=True)
    write_tar(shards / "val" / "val-000000.tar", (encoded_members(s) for s in samples))

    class NoFaces:  # stands in for the detector + ArcFace (tested in test_evaluate.py)
        models = {"detector": {"fingerprint": "none", "weights_real": False}}

        def detect_embed(self, images):
            return [None] * len(images)

        def embed_aligned(self, images, lm5s):
            return np.zeros((len(images), 512), np.float32)

    cfg = evaluate_config({"shards": str(shards), "prompts": ["a face"], "steps": 1, "device": "cpu", "references": 2,
                           "images_out": str(tmp_path / "eval" / "{method}"), "metrics_out": str(tmp_path / "ev_{method}.json"),
                           "report_out": str(tmp_path / "report_{method}.json"),
                           "grid_out": str(tmp_path / "grid.png"), "control": {"enabled": False}})
    ev = evaluate(cfg, generator=gen, scorer=NoFaces(), log_mlflow=False)
    assert ev["method"] == "toy" and (tmp_path / "report_toy.json").is_file() and len(ev["samples"]) == 2
    assert all(str(tmp_path / "eval" / "toy") in s["file"] for s in ev["samples"])
    reg = Registry(RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
                                  artifact_location=str(tmp_path / "mlartifacts")))
    out = reg.register(path.parent, evaluation=ev)
    assert out["name"] == "persona-toy" and out["tags"]["method"] == "toy" and out["tags"]["phase"] == "main"


def test_a_text_encoder_injection_trains_through_the_text_encoder(tmp_path):
    from training.generate import Generator
    from training.sampling import make_pipeline, sample
    from training.step import seed_of
    from training.train import train

    res = train(_params(tmp_path, "toytext", batch_size=2), "toytext", "main")
    assert res["global_step"] == 3 and {"loss_class"} <= set(res["metrics"])
    tensors, meta = read_adapter_file(res["adapter"])
    assert json.loads(meta["injection"]) == {"identifier": IDENTIFIER} and "injection.gate" in tensors
    # gradients reached the conditioner through the (frozen) text encoder: its weights moved from the init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of("idlinear-init", 0) % (2**63))
        init = IdLinear(cross_dim=32, num_tokens=1)
    assert not torch.equal(tensors["conditioner.proj.weight"], init.proj.weight)
    assert not torch.equal(tensors["injection.gate"], torch.ones(()))

    gen = Generator.load(str(Path(res["adapter"]).parent), device="cpu", dtype="fp32")
    emb = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    kw = dict(steps=2, guidance=3.0)
    prompt = [f"a photo of {IDENTIFIER}"]
    base = sample(make_pipeline(build_random("tiny", device="cpu").freeze()), None, None, prompt, [0], **kw)[0]
    assert np.array_equal(gen.sample([[{"id": emb}]], prompt, [0], scale=0.0, **kw)[0], base)
    assert not np.array_equal(gen.sample([[{"id": emb}]], prompt, [0], **kw)[0], base)
