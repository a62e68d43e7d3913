"""Identity Encoder (Su et al. 2023, "Identity Encoder for Personalized Diffusion"): a set encoder
over reference faces x decoupled cross-attention x one multitask phase.

Paper facts (sections 3.2-3.3, 4, appendix A) and this project's decisions where it is silent (each
decision is a param; defaults below):

Conditioner `SetEncoder` (`training.adapters.set_encoder`): Enc = an image encoder over the aligned
face (`face.jpg`), randomly initialised (paper); z (z_dim 512) -> Linear + LayerNorm -> 4 tokens in
the UNet's cross-attention width. Enc is configurable (`encoder.backbone`: our GroupNorm ResNet with
`encoder.preset` small (default; ResNet-18 layout at half width, 128 px) or tiny (tests and the CPU
demo, 64 px), or any `torchvision.<architecture>`). Set aggregation E(Y) = sum_j w_j Enc(y_j):
the mean over the N reference faces at inference (Eq. 2, average pooling; weights from
`--ref-weights` give an explicit convex combination), a random convex combination during training
(Eq. 3; the weight distribution is not stated: Dirichlet(`dirichlet_alpha` = 1), i.e. uniform on
the simplex, one draw per group, shared by the group's M faces, each of which is reconstructed from
that same embedding). Conditioner inputs: `faces` (16, 3, 128, 128) uint8 (the references in a
canonical order, so permuting them gives the same inputs and the same floating-point sum; empty
slots have weight 0) and `face_weights` (16,). At most MAX_REFERENCES references (paper: N < 10).

Injection: decoupled cross-attention (`training.adapters.decoupled_attention`, IP-Adapter style),
Stable Diffusion instead of the paper's Diffusion-Autoencoder generator. The UNet is frozen unless
`train_unet: true` (the paper trains its generator jointly).

Objective (one phase, `main`), per batch of K identity groups x M faces + S single faces
(`training.data.IdentityGroupedSampler`; default K 2, M 4 (decision), S = K x M, the paper's "half of
each batch is identity-agnostic"):
    L = L_diff(I_id) + a_id * L_id(I_id) + a_agnostic * L_diff(I_g)        (Eq. 5; a_id = a_agnostic = 0.01)
  L_diff(I_id)  noise MSE of the grouped faces, each conditioned on its group's convex combination
  L_id          soft nearest-neighbour loss (Eq. 4, `training.losses.soft_nearest_neighbour_loss`) over
                the grouped faces' own encodings z_k, L2-normalised (decision), labelled by identity,
                temperature T = `temperature` (1.0; decision), or learned as log T (`learn_temperature`)
  L_diff(I_g)   noise MSE of the single faces, each conditioned on its own encoding (a Diffusion
                Autoencoder); the singles are the shards' unlabelled faces (group photos), or, with
                fewer than `min_unlabeled` of them, any faces (labelled ones too)
  Each term is logged (`loss_diff_id`, `loss_id`, `loss_diff_agnostic`).
Curriculum: "we randomly drop the identity information with probability p, p decreasing linearly
from 1.0 to 0.05 ... the encoder learns meaningful representations through reconstruction": with
`id_drop: own` (default) a dropped grouped face is conditioned on its OWN encoding (reconstruction,
as a single face) instead of its group's identity embedding, so training starts from pure
reconstruction and the encoder learns from step 0; p = `id_drop_start` at step 0 falling linearly to
`id_drop_end` at the last step (`id_drop_steps`, default max_steps). Classifier-free guidance needs
null conditions as well: the generic condition dropout (`dropout: image/text/both`) replaces the
identity by the null identity (z = 0) and / or the prompt by "". With `id_drop: null` the schedule
drives the null-identity dropout itself (`Phase.dropout(cfg, step)`: identity p(step) independent
of text `dropout.text`; `dropout.image` / `dropout.both` must then be 0).
Prompts: the paper's generator has no text; SD gets neutral prompts (`prompts`, one drawn per face).
Schedule: Adam, lr 5e-5, no weight decay (paper: batch 128 at 128 px, 1M steps, 10^4 warm-up steps;
the demo trains a few dozen steps on the tiny model).

Generation: `persona generate --method identity_encoder --ref a.jpg --ref b.jpg [--ref-weights ...]`:
1..MAX_REFERENCES photos, each detected and aligned like the shards' faces, their encodings averaged.
Evaluation adds the paper's generation diversity (`generation_diversity`, via `Method.extra_metrics`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.config import ConfigError
from training import methods
from training.adapters.decoupled_attention import DecoupledAttention
from training.adapters.set_encoder import ENCODER_PRESETS, FACE_SIZE, FACES, WEIGHTS, SetEncoder, encoder_face
from training.data import IdentityGroupedSampler
from training.losses import dirichlet_weights, linear_schedule, soft_nearest_neighbour_loss
from training.methods.base import DropoutConfig, Identity, Method, Phase, PhaseConfig, Prepared
from training.transforms import aligned_face

MAX_REFERENCES = 16  # reference slots of the conditioner inputs (the paper works with N < 10)
MEMBER = "face.jpg"

DEFAULT_PROMPTS = (
    "a photo of a face",
    "a close-up photo of a face",
    "a portrait photo of a person",
    "a cropped photo of a face",
)


# ============================================================================================
# params: train.methods.identity_encoder


@dataclass
class EncoderConfig:
    """`train.methods.identity_encoder.encoder:` Enc and the token projection."""

    backbone: str = "resnet"  # resnet (ours, GroupNorm) | torchvision.<architecture> (e.g. torchvision.resnet18)
    preset: Literal["tiny", "small"] = "small"  # resnet widths / blocks / image_size (set below to override)
    widths: Optional[list[int]] = None  # per stage
    blocks: Optional[list[int]] = None  # basic blocks per stage
    image_size: Optional[int] = None  # px the faces are resized to inside Enc (null: the preset's)
    z_dim: int = 512
    num_tokens: int = 4


@dataclass
class MainConfig(PhaseConfig):
    """`train.methods.identity_encoder.main:` the generic keys + the multitask objective."""

    batch_size: int = 16  # = identities * per_identity + singles
    optimizer: Literal["adamw", "adam"] = "adam"  # paper: Adam
    lr: float = 5.0e-5  # paper
    weight_decay: float = 0.0
    dropout: DropoutConfig = field(default_factory=DropoutConfig)  # null-condition dropout (classifier-free guidance)
    identities: int = 2  # K identity groups per device batch
    per_identity: int = 4  # M faces per group (decision; >= 2)
    singles: Optional[int] = None  # single (identity-agnostic) faces per batch; null: identities * per_identity
    min_unlabeled: Optional[int] = None  # fewer unlabelled faces than this: labelled faces serve as singles too; null: singles
    a_id: float = 0.01  # paper alpha_1
    a_agnostic: float = 0.01  # paper alpha_2
    temperature: float = 1.0  # soft nearest-neighbour T (decision), on L2-normalised z
    learn_temperature: bool = False  # learn log T with the encoder
    dirichlet_alpha: float = 1.0  # convex weights of a group ~ Dirichlet(alpha) (decision)
    id_drop: Literal["own", "null"] = "own"  # a dropped identity: the face's own encoding | the null identity
    id_drop_start: float = 1.0  # paper
    id_drop_end: float = 0.05  # paper
    id_drop_steps: Optional[int] = None  # steps of the linear fall (null: max_steps)
    train_unet: bool = False  # also train the UNet (the paper trains its generator)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))


@dataclass
class IdentityEncoderConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    main: MainConfig = field(default_factory=MainConfig)

    def validate(self, path: str = "train.methods.identity_encoder") -> None:
        where = path
        c, e = self.main, self.encoder
        if c.identities < 1 or c.per_identity < 2:
            raise ConfigError(f"{where}.main: identities >= 1 and per_identity >= 2 (a face needs a same-identity "
                              "partner for the identity loss)")
        if (c.singles is not None and c.singles < 0) or (c.min_unlabeled is not None and c.min_unlabeled < 0):
            raise ConfigError(f"{where}.main: singles and min_unlabeled must be >= 0")
        if c.batch_size != c.identities * c.per_identity + singles(c):
            raise ConfigError(f"{where}.main.batch_size: must be identities x per_identity + singles = "
                              f"{c.identities} x {c.per_identity} + {singles(c)} = "
                              f"{c.identities * c.per_identity + singles(c)}, got {c.batch_size}")
        if min(c.a_id, c.a_agnostic) < 0 or c.temperature <= 0 or c.dirichlet_alpha <= 0:
            raise ConfigError(f"{where}.main: a_id, a_agnostic >= 0; temperature, dirichlet_alpha > 0")
        if not (0 <= c.id_drop_start <= 1 and 0 <= c.id_drop_end <= 1) or (c.id_drop_steps is not None and c.id_drop_steps < 1):
            raise ConfigError(f"{where}.main: id_drop_start / id_drop_end in [0, 1], id_drop_steps >= 1")
        if c.id_drop == "null" and (c.dropout.image or c.dropout.both):
            raise ConfigError(f"{where}.main: with id_drop: null the identity dropout is the id_drop schedule; "
                              "set dropout.image and dropout.both to 0 (dropout.text stays the text dropout)")
        if not c.prompts or not all(isinstance(p, str) and p.strip() for p in c.prompts):
            raise ConfigError(f"{where}.main.prompts: give at least one non-empty prompt")
        if e.backbone != "resnet" and not e.backbone.startswith("torchvision."):
            raise ConfigError(f"{where}.encoder.backbone: resnet or torchvision.<architecture>, got {e.backbone!r}")
        if e.z_dim < 1 or e.num_tokens < 1 or (e.image_size is not None and e.image_size < 8):
            raise ConfigError(f"{where}.encoder: z_dim, num_tokens >= 1, image_size >= 8")


def singles(cfg: MainConfig) -> int:
    """Single faces per batch (default: as many as the grouped ones)."""
    return cfg.identities * cfg.per_identity if cfg.singles is None else int(cfg.singles)


def id_drop_p(cfg: MainConfig, step: int) -> float:
    """The identity-drop probability at optimizer step `step`: id_drop_start at step 0, linear to
    id_drop_end at step id_drop_steps - 1 (default max_steps - 1, the last step) and after."""
    return linear_schedule(cfg.id_drop_start, cfg.id_drop_end, step, cfg.id_drop_steps or cfg.max_steps)


# ============================================================================================
# the phase


def identity_of(sample: Mapping[str, Any]) -> str:
    """The sample's identity label from its `json` ("" when unlabelled)."""
    meta = sample.get("json") or {}
    ident = meta.get("identity") if isinstance(meta, Mapping) else None
    return "" if ident is None else str(ident)


def mix_groups(z: torch.Tensor, group: torch.Tensor, own: torch.Tensor, weights_of) -> torch.Tensor:
    """The condition embedding of every face (B, z_dim): a face of group g (>= 0) not in `own` gets
    sum_j w_j z_j over the faces of g (batch order), w = weights_of(first face's index, group size);
    the others (singles, label -1, and `own` faces) keep their own z."""
    rows = list(z.unbind(0))
    labels = group.tolist()
    for g in sorted({x for x in labels if x >= 0}):
        idx = [i for i, x in enumerate(labels) if x == g]
        w = torch.as_tensor(weights_of(idx[0], len(idx)), dtype=z.dtype, device=z.device)
        zg = (w[:, None] * z[idx]).sum(dim=0)
        for i in idx:
            if not bool(own[i]):
                rows[i] = zg
    return torch.stack(rows)


class Main(Phase):
    name = "main"
    config = MainConfig
    trains = ("conditioner", "injection")
    members = (MEMBER, "json")

    def trainable(self, cfg: MainConfig) -> tuple[str, ...]:
        return self.trains + (("unet",) if cfg.train_unet else ())

    def sampler(self, cfg: MainConfig) -> IdentityGroupedSampler:
        s = singles(cfg)
        return IdentityGroupedSampler(cfg.identities, cfg.per_identity, s,
                                      min_unlabeled=max(1, s) if cfg.min_unlabeled is None else cfg.min_unlabeled)

    def decode_sizes(self, cfg: MainConfig, resolution: int) -> dict[str, int]:
        return {MEMBER: max(resolution, FACE_SIZE)}

    def example(self, sample: dict, *, resolution: int, cfg: MainConfig, rng: np.random.Generator) -> dict:
        u = rng.random(2)
        face = sample[MEMBER]
        prompt = cfg.prompts[min(int(u[0] * len(cfg.prompts)), len(cfg.prompts) - 1)]
        return {"image": aligned_face(face, resolution), "prompt": prompt,
                FACES: torch.from_numpy(encoder_face(face))[None], WEIGHTS: torch.ones(1),
                "identity": identity_of(sample)}

    def val_prompt(self, sample: dict, cfg: MainConfig) -> str:
        return cfg.prompts[0]

    def dropout(self, cfg: MainConfig, step: int) -> tuple[float, float, float]:
        if cfg.id_drop == "null":  # the schedule is the null-identity dropout, independent of the text's
            p, t = id_drop_p(cfg, step), cfg.dropout.text
            return p * (1 - t), t * (1 - p), p * t
        d = cfg.dropout
        return d.image, d.text, d.both

    def plan(self, ctx, cfg: MainConfig) -> tuple[torch.Tensor, list[int]]:
        """The per-face draws after the standard ones, in this order: the curriculum uniform (a
        grouped face takes its own encoding when it is < p(step)), the seed of its group's Dirichlet
        weights (the group uses its first face's). Returns (own (B,) bool, seeds)."""
        u = ctx.draws.rand(())
        seeds = [int(torch.randint(0, 2**62, (), generator=g)) for g in ctx.draws.generators]
        p = id_drop_p(cfg, ctx.global_step) if cfg.id_drop == "own" else 0.0
        return u < p, seeds

    def loss(self, ctx, cfg: MainConfig) -> dict[str, torch.Tensor]:
        b = ctx.batch
        cond = ctx.conditioner
        z = cond.encode(b[FACES][:, 0])  # (B, z_dim): every face's own encoding z_k
        group = b["group"].detach().cpu()
        labelled = group >= 0
        own, seeds = self.plan(ctx, cfg)
        own = own | ~labelled
        c = mix_groups(z, group, own, lambda first, n: dirichlet_weights(n, cfg.dirichlet_alpha, seeds[first]))
        keep = (~ctx.drop_cond).to(c.device, c.dtype)[:, None]  # null-condition dropout: z = 0
        eps = ctx.unet(cond.project(c * keep), scale=1.0)
        per = (eps.float() - ctx.target.float()).pow(2).flatten(1).mean(dim=1)  # (B,) noise MSE per face
        lab = labelled.to(per.device)
        zero = per.sum() * 0.0
        diff_id = per[lab].mean() if bool(lab.any()) else zero
        diff_g = per[~lab].mean() if bool((~lab).any()) else zero
        names = [b["identity"][i] for i in range(len(group)) if bool(labelled[i])]
        index = {n: k for k, n in enumerate(sorted(set(names)))}
        ids = torch.tensor([index[n] for n in names], dtype=torch.long)
        l_id = soft_nearest_neighbour_loss(z[labelled.to(z.device)], ids, cond.temperature) if names else zero
        total = diff_id + cfg.a_id * l_id + cfg.a_agnostic * diff_g
        return {"loss": total, "diff_id": diff_id, "id": l_id, "diff_agnostic": diff_g}


# ============================================================================================
# generation diversity (paper section 4: "computes the mean of each image, and then computes the
# standard deviation of the numbers")


def generation_diversity(images: Sequence[np.ndarray], conditions: Sequence[Any]) -> tuple[Optional[float], int, int]:
    """Mean over conditions (one identity's references + prompt) of the standard deviation (ddof 0)
    of the per-image mean pixel value in [0, 1] over that condition's images (the seeds). Conditions
    with one image are left out. Returns (value or None, conditions counted, images counted)."""
    by: dict[Any, list[float]] = {}
    for img, c in zip(images, conditions):
        by.setdefault(c, []).append(float(np.asarray(img, dtype=np.float64)[..., :3].mean() / 255.0))
    stds = [float(np.std(v)) for v in by.values() if len(v) >= 2]
    n = sum(len(v) for v in by.values() if len(v) >= 2)
    return (float(np.mean(stds)) if stds else None), len(stds), n


# ============================================================================================
# the method


def convex_weights(n: int, weights: Optional[Sequence[float]]) -> np.ndarray:
    """n weights normalised to sum 1 (default equal); non-negative with a positive sum."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"identity_encoder: need {n} non-negative reference weights with a positive sum, got {weights}")
    return w / w.sum()


class IdentityEncoder(Method):
    name = "identity_encoder"
    conditioner = SetEncoder
    injection = DecoupledAttention
    config = IdentityEncoderConfig
    phases = {"main": Main()}
    needs = (MEMBER,)
    input_keys = (FACES, WEIGHTS)
    # no `--stage N` alias: `persona train --stage 1` stays W+'s (an alias two methods declare is ambiguous)

    def conditioner_config(self, cfg: IdentityEncoderConfig, comps) -> dict:
        e = cfg.encoder
        preset = ENCODER_PRESETS[e.preset]
        out = {"cross_dim": comps.cross_attention_dim, "num_tokens": e.num_tokens, "z_dim": e.z_dim,
               "backbone": e.backbone, "image_size": e.image_size or preset["image_size"],
               "temperature": cfg.main.temperature, "learn_temperature": cfg.main.learn_temperature}
        if e.backbone == "resnet":
            out.update(widths=e.widths or preset["widths"], blocks=e.blocks or preset["blocks"])
        return out

    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        """The references of ONE identity -> {"faces": (MAX_REFERENCES, 3, 128, 128) uint8,
        "face_weights": (MAX_REFERENCES,) float32}: faces in a canonical order (by content), weights
        normalised (default equal), empty slots 0."""
        n = len(samples)
        if not 1 <= n <= MAX_REFERENCES:
            raise ValueError(f"identity_encoder: give 1 to {MAX_REFERENCES} reference faces, got {n}")
        w = convex_weights(n, weights)
        faces = [encoder_face(s[MEMBER]) for s in samples]
        order = sorted(range(n), key=lambda i: (hashlib.sha256(faces[i].tobytes()).digest(), float(w[i])))
        out_f = np.zeros((MAX_REFERENCES, 3, FACE_SIZE, FACE_SIZE), np.uint8)
        out_w = np.zeros(MAX_REFERENCES, np.float32)
        for slot, i in enumerate(order):
            out_f[slot], out_w[slot] = faces[i], w[i]
        return {FACES: out_f, WEIGHTS: out_w}

    def prepare(self, identity: Identity, files: Mapping[str, str], options: Mapping[str, str], kit: Any) -> Prepared:
        prepared = super().prepare(identity, files, options, kit)
        prepared.record["weights"] = None if identity.weights is None else [float(x) for x in identity.weights]
        return prepared

    def extra_metrics(self, images: Sequence[np.ndarray], samples: Sequence[Mapping[str, Any]],
                      references: Sequence[np.ndarray]) -> dict[str, dict]:
        from training.evaluate import missing, value

        conds = [(s["identity"], s["key"], s["prompt_index"]) for s in samples]
        v, groups, n = generation_diversity(images, conds)
        if v is None:
            return {"generation_diversity": missing("needs >= 2 images per face and prompt (evaluate.num_images >= 2)",
                                                    len(images))}
        return {"generation_diversity": value(v, n, conditions=groups, higher_is_better=True,
                                              note="std over seeds of per-image mean pixel value in [0, 1], "
                                                   "mean over (face, prompt) (paper section 4)")}


METHOD = methods.register(IdentityEncoder())
