"""PIDiff (Gu et al.): per-identity fine-tuning of a W+ mapping network x Style Cross-Attention,
with W+ style mixing at inference. A composition of parts that already exist:

    conditioner  `WProj` (training/adapters/wproj.py): the e4e W+ code (18, 512) of the aligned,
                 background-masked face -> 4 tokens of the cross-attention width (the paper's mapping
                 network F, 2.2.2; same shape as the W+ Adapter's)
    injection    `ResidualAttention` (training/adapters/residual_attention.py) = the paper's SCA
                 (2.2.3): its query is the text cross-attention's output, K/V come from F(w+), output
                 f_text + lambda * f_SCA, W_q', W_k', W_v' initialised from the layer's text W_q, W_k, W_v
    objective    one phase, `personalize`: noise MSE (Eq. 5) on ONE identity's photos; only the SCA
                 projections and F train (2.2.4); lambda = 1 in training, 0.4 by default at
                 inference (3.4.8; `inference_scale`)

The personalize phase (3.1, 3.4.1-3.4.2): the identity's aligned faces (`face.jpg`), batch 4, 600
steps, AdamW lr 1e-4 wd 0.01; the visual prompt dropped with p 0.5 and the text with p 0.3,
independently (so: identity only 0.35, text only 0.15, both 0.15 of the generic dropout cases);
Gaussian noise on W+; prompts from templates such as "an image of S*", "a cropped photo of S*".
One run per identity (`Phase.per_identity`): `persona personalize --method pidiff --identity NAME`
(training/personalize.py; `--all-identities` fans out over Ray). The phase binds to the shards
(`Phase.bind`): it reads the identity's faces from both splits (an identity is in one of them), holds
out the last `holdout` of them (by key) for evaluation, and refuses an identity with fewer than
`min_photos` usable faces (a `DataVerdict`).

Decisions where the paper is silent (each a param, default as given):
- W+ noise: sigma = `noise_sigma` (0.05) x the per-dimension std of W+ over the training set, i.e.
  the identity's training photos (the set this fine-tune trains on; population std, ddof 0; zero
  with a single photo). Drawn per sample (`ctx.draws`); a dropped visual prompt stays the null code.
- Style mixing (2.2.2, 3.4.7): rows [0:`style_split`] of W+ from the style image, rows
  [`style_split`:18] from the identity image; `style_split` 8 (`--option split=N` per request).
- Initialisation `init`: `base` = W' from the text W (the injection's own init) and F at random (the
  paper), or a trained W+ Adapter (`models:/persona-wplus@champion`, a folder or a file; its WProj
  and attention must have PIDiff's shapes). Recorded in adapter.json `phase_record.init` and tagged
  `base_adapter` in the registry.
- S*: a fixed rare token string (`token`, default "sks"), written into the prompt templates in place
  of "S*"; it is not trained (only SCA and F are).
- Held-out photos (`holdout`, default 1): the last of the identity's faces by key, only when the
  identity keeps at least `min_photos` (default 4) for training; an identity with exactly
  `min_photos` faces trains on all of them and is evaluated on them (`phase_record.held_out` empty).
- Training image: the aligned face (`face.jpg`, what e4e sees), not the in-the-wild crop.

Generation (`Method.prepare`): reference photo(s) of the identity -> e4e -> W+ (weighted mean over
photos), or `--input wplus=CODE.npy`; `--style-ref PHOTO` (= `--input style=PHOTO`; a photo or a W+
.npy) mixes rows [0:split] from the style and [split:18] from the identity; the record keeps both
sources and the split, and the mixed code is saved with the image, so `--from-json` re-runs it to
the same pixels.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.config import ConfigError, to_dict
from pipeline.digests import sha256_array, sha256_file
from training import methods
from training.adapters.residual_attention import ResidualAttention
from training.adapters.wproj import WProj
from training.losses import noise_mse
from training.methods.base import (DataVerdict, DropoutConfig, Identity, Method, MethodFlag, Phase, PhaseConfig, Prepared,
                                   mix)
from training.methods.wplus import KEY, MEMBER, W_SHAPE, WProjConfig, load_code
from training.references import ReferenceKit
from training.step import seed_of
from training.transforms import aligned_face

TOKEN_PLACEHOLDER = "S*"
# 2.2.1 names the first two ("and so on"); the rest are Textual Inversion-style templates of the same kind
PROMPT_TEMPLATES: tuple[str, ...] = (
    "an image of S*",
    "a cropped photo of S*",
    "a photo of S*",
    "a close-up photo of S*",
    "a good photo of S*",
    "a portrait of S*",
    "a bright photo of S*",
    "a rendition of S*",
)
STYLE_REF_INPUT = "style"  # `persona generate --style-ref PHOTO` fills this input (`PIDiff.flags`)
ALIAS_SUFFIX = "-champion"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ============================================================================================
# params: train.methods.pidiff


@dataclass
class PersonalizeConfig(PhaseConfig):
    """`train.methods.pidiff.personalize:` one identity's fine-tune (generic keys + PIDiff's own)."""

    identity: Optional[str] = None  # the identity (shards `json.identity`); set by `persona personalize --identity`
    min_photos: int = 4  # fewer usable faces of the identity: refused (DataVerdict)
    holdout: int = 1  # faces kept out of training for evaluation (only beyond min_photos)
    visual_dropout: float = 0.5  # P(visual prompt dropped), independent of the text's
    text_dropout: float = 0.3  # P(text prompt dropped)
    noise_sigma: float = 0.05  # W+ noise = noise_sigma x per-dim std of the training W+ codes
    token: str = "sks"  # S*: a fixed rare token (not trained)
    prompts: list[str] = field(default_factory=lambda: list(PROMPT_TEMPLATES))  # "S*" -> token
    init: Optional[str] = "base"  # base | models:/persona-wplus@champion | adapter folder / file
    # paper values of the generic keys
    max_steps: int = 600
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    # the generic dropout cases are derived from visual_dropout / text_dropout (must stay 0 here)
    dropout: DropoutConfig = field(default_factory=lambda: DropoutConfig(0.0, 0.0, 0.0))


@dataclass
class PIDiffConfig:
    conditioner: WProjConfig = field(default_factory=WProjConfig)  # F: same shape as the W+ Adapter's WProj
    style_split: int = 8  # style mixing: W+ rows [0:split] from the style image, [split:18] from the identity
    inference_scale: float = 0.4  # lambda at inference when generate / evaluate leave it unset (paper 3.4.8)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)

    def validate(self, path: str = "train.methods.pidiff") -> None:
        p = self.personalize
        where = f"{path}.personalize"
        if p.init == "base":  # the paper's init: a fresh adapter (W' from the text W, F random)
            p.init = None
        if not 0 < self.style_split < W_SHAPE[0]:
            raise ConfigError(f"train.methods.pidiff.style_split: a row in 1..{W_SHAPE[0] - 1}, got {self.style_split}")
        if self.inference_scale < 0:
            raise ConfigError("train.methods.pidiff.inference_scale must be >= 0")
        if not (0 <= p.visual_dropout <= 1 and 0 <= p.text_dropout <= 1):
            raise ConfigError(f"{where}: visual_dropout and text_dropout are probabilities in [0, 1]")
        if (p.dropout.image, p.dropout.text, p.dropout.both) != (0.0, 0.0, 0.0):
            raise ConfigError(f"{where}.dropout: derived from visual_dropout / text_dropout (independent); leave it out")
        if p.min_photos < 1 or p.holdout < 0 or p.noise_sigma < 0:
            raise ConfigError(f"{where}: min_photos >= 1, holdout >= 0, noise_sigma >= 0")
        if not p.token.strip() or any(c.isspace() for c in p.token):
            raise ConfigError(f"{where}.token: one word (the S* pseudo-word), got {p.token!r}")
        if not p.prompts or any(TOKEN_PLACEHOLDER not in t for t in p.prompts):
            raise ConfigError(f"{where}.prompts: templates that each hold '{TOKEN_PLACEHOLDER}'")
        if p.identity is not None and not str(p.identity).strip():
            raise ConfigError(f"{where}.identity: empty")
        if not self.conditioner.groups or any(len(g) != 2 or g[1] <= g[0] for g in self.conditioner.groups):
            raise ConfigError("train.methods.pidiff.conditioner.groups: a list of [start, end) W+ row ranges")


# ============================================================================================
# pure helpers


def identity_slug(identity: str, max_len: int = 80) -> str:
    """A file-name and MLflow-alias safe form of an identity name: [A-Za-z0-9_-] only, no leading or
    trailing '_'/'-'; when anything had to change, a short hash of the name is appended so that
    different names never collide (e.g. 'obama' -> 'obama', 'José Ñ' -> 'Jos_-1a2b3c4d')."""
    text = str(identity)
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")[:max_len]
    if s != text or not s:
        s = f"{s or 'id'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return s


def identity_alias(identity: str) -> str:
    """The registry alias of an identity's current adapter: `<slug>-champion` (MLflow alias rules:
    letters, digits, '_' and '-'; never 'latest' or 'v<N>')."""
    return identity_slug(identity) + ALIAS_SUFFIX


def independent_dropout(p_visual: float, p_text: float) -> tuple[float, float, float]:
    """Independent drops as the generic one-uniform cases (identity only, text only, both):
    (p_v (1 - p_t), p_t (1 - p_v), p_v p_t), so P(visual) = p_v and P(text) = p_t."""
    return p_visual * (1 - p_text), p_text * (1 - p_visual), p_visual * p_text


def prompt_from_template(template: str, token: str) -> str:
    return template.replace(TOKEN_PLACEHOLDER, token)


def style_mix(style: np.ndarray, identity: np.ndarray, split: int) -> np.ndarray:
    """W+ rows [0:split] of `style` and [split:18] of `identity` -> (18, 512) float32 (2.2.2, 3.4.7)."""
    s, i = np.asarray(style, np.float32), np.asarray(identity, np.float32)
    if s.shape != W_SHAPE or i.shape != W_SHAPE:
        raise ValueError(f"style_mix: W+ codes must be {W_SHAPE}, got {s.shape} and {i.shape}")
    if not 0 < split < W_SHAPE[0]:
        raise ValueError(f"style_mix: split must be in 1..{W_SHAPE[0] - 1}, got {split}")
    return np.concatenate([s[:split], i[split:]], axis=0)


def wplus_noise(standard_normal: torch.Tensor, std: torch.Tensor, sigma: float) -> torch.Tensor:
    """The W+ augmentation noise: sigma x per-dimension std x N(0, 1); (B, 18, 512) x (18, 512) -> (B, 18, 512)."""
    return float(sigma) * std.to(standard_normal.device, standard_normal.dtype) * standard_normal


# ============================================================================================
# the identity's data (what `Personalize.bind` derives from the shards)


@dataclass
class IdentityData:
    identity: str
    train_keys: list[str]  # sorted
    held_out_keys: list[str]  # sorted
    wplus_std: np.ndarray  # (18, 512) float32, per-dim std of the training codes
    data_sha256: str  # the training samples' keys, aligned faces, W+ codes and metadata


def identity_data(source: Any, cfg: PersonalizeConfig) -> IdentityData:
    """The identity's faces in `source` -> train / held-out split, W+ statistics and a digest.
    Raises DataVerdict without the identity or with fewer than `min_photos` faces."""
    if not cfg.identity:
        raise ValueError("pidiff.personalize: no identity (persona personalize --identity NAME, or "
                         "--set pidiff.personalize.identity=NAME)")
    groups, _ = source.by_identity()
    idx = groups.get(cfg.identity, [])
    if len(idx) < cfg.min_photos:
        have = f"{len(idx)} usable face(s)" if idx else "no usable faces"
        raise DataVerdict(f"identity '{cfg.identity}': {have} in the shards; personalisation needs at least "
                          f"min_photos={cfg.min_photos} (train.methods.pidiff.personalize.min_photos)",
                          reason="too_few_photos" if idx else "no_photos")
    keyed = sorted((source.key(i), i) for i in idx)
    hold = min(cfg.holdout, len(keyed) - cfg.min_photos)
    train = keyed[:len(keyed) - hold] if hold > 0 else keyed
    held = keyed[len(keyed) - hold:] if hold > 0 else []
    h = hashlib.sha256()
    codes = []
    for key, i in train:
        s = source.get(i, ("face.jpg", MEMBER, "json"))
        w = np.asarray(s[MEMBER], np.float32)
        codes.append(w)
        h.update(key.encode() + b"\x00")
        h.update(np.ascontiguousarray(s["face.jpg"]).tobytes())
        h.update(np.ascontiguousarray(w).tobytes())
        h.update(json.dumps(s.get("json") or {}, sort_keys=True, default=str).encode())
    std = np.std(np.stack(codes), axis=0).astype(np.float32)
    return IdentityData(cfg.identity, [k for k, _ in train], [k for k, _ in held], std, h.hexdigest())


class IdentitySampler:
    """Every training face of the identity once per data epoch, in a per-epoch permutation walked by
    the global position (like `training.data.PlainSampler`, over the identity's faces only; found by
    key, so it works on any source holding them)."""

    def __init__(self, keys: Sequence[str]):
        if not keys:
            raise ValueError("IdentitySampler: no faces")
        self.keys = list(keys)
        self._index: Optional[tuple[Any, list[int]]] = None

    def _indices(self, source) -> list[int]:
        if self._index is None or self._index[0] is not source:
            where = {source.key(i): i for i in range(len(source))}
            missing = [k for k in self.keys if k not in where]
            if missing:
                raise ValueError(f"IdentitySampler: {len(missing)} of the identity's faces are not in this source "
                                 f"(e.g. {missing[0]})")
            self._index = (source, [where[k] for k in self.keys])
        return self._index[1]

    def slots(self, source, b, rank, world, batch_size, seed, rank_source):
        idx = self._indices(source)
        n = len(idx)
        out = []
        for i in range(batch_size):
            g = b * batch_size + i if rank_source else (b * world + rank) * batch_size + i
            epoch, pos = divmod(g, n)
            perm = np.random.default_rng(seed_of("pidiff-identity", seed, epoch, *(("rank", rank, world) if rank_source else ())))
            out.append((idx[int(perm.permutation(n)[pos])], -1))
        return out


# ============================================================================================
# the phase


class Personalize(Phase):
    name = "personalize"
    config = PersonalizeConfig
    trains = ("conditioner", "injection")  # F and the SCA projections; UNet, VAE, text encoder frozen
    members = ("face.jpg", "json")
    splits = ("train", "val")  # an identity is in one of the shards' splits
    per_identity = True

    def __init__(self, data: Optional[IdentityData] = None):
        self.data = data

    def _data(self) -> IdentityData:
        if self.data is None:
            raise RuntimeError("pidiff.personalize: the phase is not bound to the data (Phase.bind)")
        return self.data

    def bind(self, cfg: PersonalizeConfig, source: Any) -> "Personalize":
        return Personalize(identity_data(source, cfg))

    def output_name(self, cfg: PersonalizeConfig) -> str:
        if not cfg.identity:
            raise ValueError("pidiff.personalize: no identity (persona personalize --identity NAME)")
        return identity_slug(cfg.identity)

    def sampler(self, cfg: PersonalizeConfig) -> IdentitySampler:
        return IdentitySampler(self._data().train_keys)

    def decode_sizes(self, cfg: PhaseConfig, resolution: int) -> dict[str, int]:
        return {"face.jpg": resolution}

    def example(self, sample: dict, *, resolution: int, cfg: PersonalizeConfig, rng: np.random.Generator) -> dict:
        u = rng.random(2)
        t = cfg.prompts[min(int(u[0] * len(cfg.prompts)), len(cfg.prompts) - 1)]
        return {"image": aligned_face(sample["face.jpg"], resolution), "prompt": prompt_from_template(t, cfg.token)}

    def val_prompt(self, sample: dict, cfg: PersonalizeConfig) -> str:
        return prompt_from_template("a photo of S*", cfg.token)

    def dropout(self, cfg: PersonalizeConfig, step: int) -> tuple[float, float, float]:
        return independent_dropout(cfg.visual_dropout, cfg.text_dropout)

    def loss(self, ctx, cfg: PersonalizeConfig) -> dict[str, torch.Tensor]:
        w = ctx.inputs[KEY]  # after condition dropout: a dropped visual prompt is the zero (null) code
        std = torch.from_numpy(self._data().wplus_std)
        noise = wplus_noise(ctx.draws.randn(W_SHAPE), std, cfg.noise_sigma).to(w.device, w.dtype)
        w = w + noise * (~ctx.drop_cond).to(w.device, w.dtype).view(-1, 1, 1)
        return {"loss": noise_mse(ctx.unet(ctx.tokens({KEY: w}), scale=1.0), ctx.target)}

    def record(self, cfg: PersonalizeConfig) -> dict[str, Any]:
        d = self._data()
        init = cfg.init or "base"
        return {
            "identity": d.identity,
            "init": init,
            "token": cfg.token,
            "photos": {"train": d.train_keys, "held_out": d.held_out_keys},
            "data_sha256": d.data_sha256,
            "wplus_std_sha256": sha256_array(d.wplus_std),
            "evaluation_faces": d.held_out_keys or d.train_keys,
            "registry": {"tags": {"identity": d.identity, "base_adapter": init, "token": cfg.token,
                                  "held_out": str(len(d.held_out_keys))},
                         "aliases": [identity_alias(d.identity)]},
        }


# ============================================================================================
# the method


def _code_of(path: str, kit: ReferenceKit) -> tuple[np.ndarray, dict]:
    """A W+ code from a photo (the wplus stage's encoder, via the reference kit) or a .npy code."""
    if Path(path).suffix.lower() == ".npy":
        return load_code(path), {"kind": "file", "path": path, "sha256": sha256_file(path)}
    if Path(path).suffix.lower() not in PHOTO_SUFFIXES:
        raise ValueError(f"pidiff: {path}: a photo ({', '.join(PHOTO_SUFFIXES)}) or a W+ code (.npy)")
    (sample,) = kit.samples([path], (MEMBER,))
    return np.asarray(sample[MEMBER], np.float32), {"kind": "photo", **kit.records([path])[0]}


def default_style_split(params: Any) -> int:
    """`train.methods.pidiff.style_split` of the params (the default when the params do not set it)."""
    from training.config import train_params

    try:
        return int(train_params(params).method("pidiff").style_split)
    except Exception:  # noqa: BLE001 - generation must not depend on a valid train section
        return PIDiffConfig().style_split


class PIDiff(Method):
    name = "pidiff"
    conditioner = WProj
    injection = ResidualAttention
    config = PIDiffConfig
    phases = {"personalize": Personalize()}
    needs = (MEMBER,)
    input_keys = (KEY,)
    flags = (
        MethodFlag("--style-ref", "input", STYLE_REF_INPUT, "PHOTO",
                   "style mixing: W+ rows [0:split] from this photo (or a W+ .npy code), the rest from the identity"),
        MethodFlag("--split", "option", "split", "N", "the style-mixing row split (default train.methods.pidiff.style_split)"),
    )

    def conditioner_config(self, cfg: PIDiffConfig, comps) -> dict:
        return {"cross_dim": comps.cross_attention_dim, "groups": cfg.conditioner.groups, "bias": cfg.conditioner.bias,
                "key": KEY}

    def inference_scale(self, cfg: PIDiffConfig) -> float:
        return float(cfg.inference_scale)

    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        return {KEY: mix([np.asarray(s[MEMBER], dtype=np.float32) for s in samples], weights)}

    def prepare(self, identity: Identity, files: Mapping[str, str], options: Mapping[str, str],
                kit: ReferenceKit) -> Prepared:
        unknown = sorted(set(files) - {"wplus", STYLE_REF_INPUT}) + sorted(set(options) - {"split"})
        if unknown:
            raise ValueError(f"pidiff: unknown --input/--option {unknown} (inputs: wplus, style (--style-ref); "
                             "options: split)")
        if bool(identity.references) == ("wplus" in files):
            raise ValueError("pidiff: give reference photo(s) of the identity (--ref) or --input wplus=CODE.npy "
                             "(exactly one of the two)")
        if "wplus" in files:
            w = load_code(files["wplus"])
            record: dict = {"source": {"kind": "file", "path": files["wplus"], "sha256": sha256_file(files["wplus"])}}
        else:
            prepared = super().prepare(identity, {}, {}, kit)
            w = prepared.inputs[KEY]
            record = {"source": {"kind": "references", "weights": identity.weights, **kit.settings(),
                                 "wplus": to_dict(kit.params.wplus)}, **prepared.record}
        if STYLE_REF_INPUT in files:
            split = int(options["split"]) if "split" in options else default_style_split(kit.params)
            style, style_src = _code_of(files[STYLE_REF_INPUT], kit)
            record["style_mix"] = {"split": split, "style_rows": [0, split], "identity_rows": [split, W_SHAPE[0]],
                                   "style": style_src, "style_sha256": sha256_array(style),
                                   "identity_sha256": sha256_array(w)}
            w = style_mix(style, w, split)
        elif "split" in options:
            raise ValueError("pidiff: --option split=N goes with a style reference (--style-ref / --input style=...)")
        return Prepared({KEY: w}, record)


METHOD = methods.register(PIDiff())
