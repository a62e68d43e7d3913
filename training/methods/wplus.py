"""W+ Adapter (Li et al. 2023): WProj conditioner x residual cross-attention x two phases.

Conditioner `WProj` on the shard's `wplus.npy` (the e4e W+ code, (18, 512)): rows grouped [0:4],
[4:8], [8:12], [12:18], each group flattened and mapped by its own Linear, shared LayerNorm -> 4
tokens (7.1 M parameters on SD 1.5). Injection: residual cross-attention in every cross-attention
layer (`training.adapters.residual_attention`, 31.6 M). A dropped identity is the zero W+ code
(WProj's null tokens).

stage1  aligned faces (`face.jpg`) + neutral prompts; trains WProj + the attention; noise MSE.
stage2  in-the-wild crops (`jpg`) + captions (`txt`) + face masks (`mask.png`), with colour jitter,
        rotation and square crops keeping the whole face; starts from stage1, WProj frozen;
        L = L_rec + l_dis * L_dis + l_reg * L_reg (`training.losses.stage2_loss`): eps(aug(w)) and
        eps(lambda = 0) are extra frozen (no-grad) passes; aug = shuffle the codes within the
        device's batch (generator seeded by (seed, step, rank)) and / or per-sample Gaussian noise.

Generation: reference photos -> e4e (the wplus stage's encoder, `wplus` params) -> W+ averaged
(weighted) over the photos; or `--input wplus=CODE.npy` ((18, 512) or (N, 18, 512), averaged);
`--input edit=DIRECTION.npy --option alpha=A` adds A * direction ((18, 512) or (512,) per row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.config import ConfigError, to_dict
from pipeline.digests import sha256_array, sha256_file
from training import methods
from training.adapters.residual_attention import ResidualAttention
from training.adapters.wproj import DEFAULT_GROUPS, WProj
from training.losses import code_augment, stage2_loss
from training.methods.base import Identity, Method, Phase, PhaseConfig, Prepared, mix
from training.references import ReferenceKit, register_member
from training.transforms import ImageAugConfig, aligned_face, wild_crop

W_SHAPE = (18, 512)
KEY = "wplus"  # the conditioner input
MEMBER = "wplus.npy"  # the shard member it comes from

# W+ Adapter supplement, section V: the Stage I prompts.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "a face",
    "a photo of a face",
    "a close-up of a face",
    "a depiction of a face",
    "a good photo of a face",
    "a photography of a face",
    "a cropped photo of a face",
    "a good photography of a face",
    "a close-up photography of a face",
)


def neutral_prompt(u: float) -> str:
    return NEUTRAL_PROMPTS[min(int(u * len(NEUTRAL_PROMPTS)), len(NEUTRAL_PROMPTS) - 1)]


def caption_or_neutral(caption: Optional[str], u: float) -> str:
    """The caption, or a neutral prompt when it is empty."""
    return caption.strip() if caption and caption.strip() else neutral_prompt(u)


# ============================================================================================
# params: train.methods.wplus


@dataclass
class WProjConfig:
    groups: list[list[int]] = field(default_factory=lambda: [list(g) for g in DEFAULT_GROUPS])  # W+ row ranges, one token each
    bias: bool = False  # Linear bias (the authors' release has none)


@dataclass
class Stage1Config(PhaseConfig):
    """`train.methods.wplus.stage1:` aligned faces + neutral prompts; WProj + attention trained."""


@dataclass
class Stage2Config(PhaseConfig):
    """`train.methods.wplus.stage2:` the generic keys + the Stage II objective and augmentation."""

    l_dis: float = 1.5
    l_reg: float = 1.0
    augment: Literal["shuffle", "noise", "both"] = "both"  # W+ augmentation for the disentanglement loss
    noise_sigma: float = 1.0  # Gaussian noise on W+ (W+ units)
    image_aug: ImageAugConfig = field(default_factory=ImageAugConfig)


@dataclass
class WPlusConfig:
    conditioner: WProjConfig = field(default_factory=WProjConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def validate(self, path: str = "train.methods.wplus") -> None:
        """Called by `pipeline.config.build` with this section's dotted path."""
        a = self.stage2.image_aug
        if not (0 < a.min_crop_scale <= 1 and 0 <= a.min_face_fraction <= 1):
            raise ConfigError(f"{path}.stage2.image_aug: min_crop_scale in (0, 1], min_face_fraction in [0, 1]")
        if not self.conditioner.groups or any(len(g) != 2 or g[1] <= g[0] for g in self.conditioner.groups):
            raise ConfigError(f"{path}.conditioner.groups: a list of [start, end) W+ row ranges")


# ============================================================================================
# phases


class Stage1(Phase):
    name = "stage1"
    config = Stage1Config
    trains = ("conditioner", "injection")
    members = ("face.jpg",)

    def decode_sizes(self, cfg: PhaseConfig, resolution: int) -> dict[str, int]:
        return {"face.jpg": resolution}

    def example(self, sample: dict, *, resolution: int, cfg: PhaseConfig, rng: np.random.Generator) -> dict:
        u = rng.random(9)
        return {"image": aligned_face(sample["face.jpg"], resolution), "prompt": neutral_prompt(u[0])}

    def val_prompt(self, sample: dict, cfg: PhaseConfig) -> str:
        return "a photo of a face"


class Stage2(Phase):
    name = "stage2"
    config = Stage2Config
    trains = ("injection",)
    init = "stage1"
    members = ("jpg", "mask.png", "txt")

    def decode_sizes(self, cfg: Stage2Config, resolution: int) -> dict[str, int]:
        # crops are >= min_crop_scale of the image side (tighter only around small faces)
        return {"jpg": int(np.ceil(resolution / cfg.image_aug.min_crop_scale))}

    def example(self, sample: dict, *, resolution: int, cfg: Stage2Config, rng: np.random.Generator) -> dict:
        u = rng.random(9)
        image, mask = wild_crop(sample["jpg"], sample["mask.png"], resolution, cfg.image_aug, u[1:])
        return {"image": image, "mask": mask, "prompt": caption_or_neutral(sample.get("txt"), u[0])}

    def val_prompt(self, sample: dict, cfg: PhaseConfig) -> str:
        return caption_or_neutral(sample.get("txt"), 0.1)

    def loss(self, ctx, cfg: Stage2Config) -> dict[str, torch.Tensor]:
        w = ctx.inputs[KEY]  # after condition dropout: a dropped code is zero
        noise = ctx.draws.randn(w.shape[1:]) if cfg.augment in ("noise", "both") else None
        # the shuffle permutes within this device's batch: drawn per (seed, step, rank), not per sample
        w_aug = code_augment(w.detach().cpu(), cfg.augment, cfg.noise_sigma, generator=ctx.generator("shuffle"),
                             noise=noise).to(w.device)
        w_aug = w_aug * (~ctx.drop_cond).to(w_aug.device, w_aug.dtype).view(-1, 1, 1)  # dropped codes stay null
        with torch.no_grad():
            eps_aug = ctx.unet(ctx.tokens({KEY: w_aug}), scale=1.0)
            eps_base = ctx.unet(None, scale=0.0)
        eps = ctx.predict()
        return stage2_loss(eps, ctx.target, eps_aug, eps_base, ctx.batch["mask"], cfg.l_dis, cfg.l_reg)


# ============================================================================================
# the method


def load_code(path: str) -> np.ndarray:
    """A W+ .npy file: (18, 512) or (N, 18, 512) (averaged) -> (18, 512) float32."""
    w = np.load(path, allow_pickle=False).astype(np.float32)
    if w.ndim == 3:
        w = w.mean(axis=0)
    if w.shape != W_SHAPE:
        raise ValueError(f"{path}: W+ code must be (18, 512) or (N, 18, 512), got {w.shape}")
    return w


def load_direction(path: str) -> np.ndarray:
    """An edit direction .npy: (18, 512), or (512,) applied to every row -> (18, 512) float32."""
    d = np.load(path, allow_pickle=False).astype(np.float32)
    if d.shape == (W_SHAPE[1],):
        d = np.broadcast_to(d, W_SHAPE).copy()
    if d.shape != W_SHAPE:
        raise ValueError(f"{path}: edit direction must be (18, 512) or (512,), got {d.shape}")
    return d


def apply_edit(w: np.ndarray, direction: Optional[np.ndarray], alpha: float) -> np.ndarray:
    """w + alpha * direction (float32); w unchanged when there is no direction or alpha is 0."""
    w = np.asarray(w, dtype=np.float32)
    if direction is None or alpha == 0:
        return w.copy()
    return (w + np.float32(alpha) * np.asarray(direction, dtype=np.float32)).astype(np.float32)


class WPlus(Method):
    name = "wplus"
    conditioner = WProj
    injection = ResidualAttention
    config = WPlusConfig
    phases = {"stage1": Stage1(), "stage2": Stage2()}
    needs = (MEMBER,)
    input_keys = (KEY,)
    stage_aliases = {"1": "stage1", "2": "stage2"}

    def conditioner_config(self, cfg: WPlusConfig, comps) -> dict:
        return {"cross_dim": comps.cross_attention_dim, "groups": cfg.conditioner.groups, "bias": cfg.conditioner.bias,
                "key": KEY}

    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        return {KEY: mix([np.asarray(s[MEMBER], dtype=np.float32) for s in samples], weights)}

    def prepare(self, identity: Identity, files: Mapping[str, str], options: Mapping[str, str],
                kit: ReferenceKit) -> Prepared:
        unknown = sorted(set(files) - {"wplus", "edit"}) + sorted(set(options) - {"alpha"})
        if unknown:
            raise ValueError(f"wplus: unknown --input/--option {unknown} (inputs: wplus, edit; options: alpha)")
        if ("edit" in files) != ("alpha" in options):
            raise ValueError("wplus: --input edit=DIRECTION.npy and --option alpha=A go together")
        w, record = identity_code(self, identity, files, kit)
        if "edit" in files:
            alpha = float(options["alpha"])
            record["edit"] = {"direction": files["edit"], "sha256": sha256_file(files["edit"]), "alpha": alpha}
            record["unedited_sha256"] = sha256_array(w)
            w = apply_edit(w, load_direction(files["edit"]), alpha)
        return Prepared({KEY: w}, record)


def identity_code(method: Method, identity: Identity, files: Mapping[str, str], kit: ReferenceKit) -> tuple[np.ndarray, dict]:
    """The W+ code (18, 512) of an identity for generation: from its reference photos (the wplus
    stage's encoder, mixed by the identity's weights) or from `--input wplus=CODE.npy` (exactly one
    of the two); returns (code, its record). Shared by the methods conditioned on W+ codes."""
    if bool(identity.references) == ("wplus" in files):
        raise ValueError(f"{method.name}: give reference photo(s) of the identity (--ref) or --input wplus=CODE.npy "
                         "(exactly one of the two)")
    if "wplus" in files:
        w = load_code(files["wplus"])
        return w, {"source": {"kind": "file", "path": files["wplus"], "sha256": sha256_file(files["wplus"])}}
    prepared = Method.prepare(method, identity, {}, {}, kit)
    return prepared.inputs[KEY], {"source": {"kind": "references", "weights": identity.weights, **kit.settings(),
                                             "wplus": to_dict(kit.params.wplus)}, **prepared.record}


def _e4e(kit: ReferenceKit, faces) -> list[np.ndarray]:
    """W+ codes of aligned reference faces with the wplus stage's encoder (background masked like it)."""
    from pipeline.models import wplus as e4e

    enc = kit.model("e4e", lambda: e4e.load(kit.params.wplus, device=kit.device))
    codes = enc.encode([f.aligned for f in faces], keep_masks=[f.mask for f in faces])
    return [np.asarray(c, dtype=np.float32) for c in codes]


register_member(MEMBER, _e4e)
METHOD = methods.register(WPlus())
