"""Hybrid guidance (FaceStudio, Yan et al. 2023): Linear(CLIP style || ArcFace) x region-masked
decoupled cross-attention x noise MSE with independent style / face dropout.

Condition (paper 3.1): e = Linear(CLIP_V(style image) || ArcFace(face)) -> `tokens` identity tokens
(`HybridLinear`; the paper's single linear layer, no norm by default). The style image is the
in-the-wild crop with the face greyed out, the face is the same photo's aligned face: shard members
`clip.npy` (the `clip_image` stage: the concatenated CLIP vision embeddings) and `id.npy` (ArcFace).

Injection: `training.adapters.region_attention.RegionAttention`: decoupled identity cross-attention
(new K/V per layer, IP-Adapter style) that, given several identities and their regions, confines
each person's region to its identity's tokens (paper 3.2, Eq. 2); `outside` sets what positions in
no region attend to (`all` | `mean` | `none`).

Phase `main` (paper 3.3, 4.1): reconstruction of the in-the-wild crop (`jpg`) with the noise MSE.
The style and the face inputs are dropped independently per sample, with p `style_dropout` (0.64)
and `face_dropout` (0.1): a dropped style zeroes the CLIP part, a dropped face the ArcFace part
(the paper zeroes the face embedding of non-human images the same way). The draws come from the
sample's own generator (`ctx.draws`), after the step's standard draws. Trains the Linear and the
identity attention, the UNet frozen (an adapter, this project's default); `train_unet: true` trains
the UNet too, as the paper does (the paper: lr 1e-6 for both, 8 x A100, batch 256, 100k steps).

Generation (`Method.prepare`):
- identity mixing (3.2): `--ref a.jpg --ref b.jpg --mix 0.3,0.7` -> both inputs mixed by the weights
  (e_f = sum b_i e_f^i for the face; the style embedding is mixed by the same weights unless a style
  photo is given). Weights (1, 0) give identity a alone, exactly.
- the style comes from, in order: `--input style=PHOTO` (the photo, every face greyed out), the
  request's content photo (`--content`, img2img; every face greyed out, shared by all identities, as
  the paper's non-human regions assume), else each reference's own style image (as in training).
- several people: `--content group.jpg --ref a.jpg --ref b.jpg` (generic): identity i gets person i
  of the content photo (left to right, or `--assign`); the injection keeps each to its region.
- text path (3.1): `--text-guidance A --style-text "TEXT"`: a prior maps TEXT's CLIP text embedding
  to a CLIP image embedding e_t, mixed with the style embedding as A e_t + (1 - A) e_i before the
  (shared, affine) Linear, which equals mixing the conditions a e_t + (1 - a) e_i. Needs a local
  prior (`text_prior`: a diffusers `KandinskyPriorPipeline` folder whose image embedding has the
  conditioner's `clip_dim`; `--option text_prior=DIR` overrides); without one `--text-guidance` is
  refused. Not used in training (the paper's neither).

Decisions where the paper is silent (params, defaults): tokens 4; no LayerNorm; the ArcFace input
unnormalised after mixing (the paper mixes embeddings linearly); training prompts = the shard's
caption, else empty (`prompt: caption`; the paper trains without text); generic condition dropout
image 0 / text 0.05 / both 0 (the style/face dropouts above replace the identity dropout); the
reconstruction target is the whole in-the-wild crop resized (no augmentation: the inputs describe
exactly that crop); outside-region policy `all`; a region position belongs to the identity whose
mask covers most of its cell at that UNet level, if >= half of it. Data (params `clip_image`,
`instances`): the style image greys the face (`mask.png`) to 127; each CLIP model's embedding is
L2-normalised before the concatenation; `clip_dim` 1792 = ViT-L/14 768 + RN101 512 + ViT-B/32 512
(transformers' CLIP is ViT-only: any ViT CLIP folders; the demo's tiny random model gives 16);
person instance masks (`inst.png`, in the in-the-wild crop's frame, `face_index + 1` per pixel) split
the selfie person mask among the photo's faces by box seeds + a body distance
(`pipeline.models.instances`); the text prior's embedding is L2-normalised like the style's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError, to_dict
from pipeline.digests import sha256_array, sha256_file
from training import methods
from training.adapters.region_attention import OUTSIDE, RegionAttention
from training.losses import noise_mse
from training.methods.base import DropoutConfig, Identity, Method, MethodFlag, Phase, PhaseConfig, Prepared, mix
from training.references import ReferenceKit, largest_face, register_member
from training.transforms import aligned_face

CLIP_KEY, FACE_KEY = "clip", "face"  # conditioner inputs
CLIP_MEMBER, FACE_MEMBER = "clip.npy", "id.npy"  # the shard members they come from
FACE_DIM = 512
VAL_PROMPT = "a photo of a person"


# ============================================================================================
# conditioner


class HybridLinear(nn.Module):
    """(clip (B, clip_dim), face (B, 512)) -> (B, tokens, cross_dim): one Linear over the
    concatenation (paper 3.1), reshaped to tokens; optional LayerNorm per token."""

    def __init__(self, cross_dim: int, clip_dim: int, face_dim: int = FACE_DIM, tokens: int = 4, norm: bool = False):
        super().__init__()
        self.cross_dim, self.clip_dim, self.face_dim, self.num_tokens, self.use_norm = cross_dim, clip_dim, face_dim, tokens, norm
        self.proj = nn.Linear(clip_dim + face_dim, cross_dim * tokens)
        self.norm = nn.LayerNorm(cross_dim) if norm else None

    def config(self) -> dict:
        return {"cross_dim": self.cross_dim, "clip_dim": self.clip_dim, "face_dim": self.face_dim,
                "tokens": self.num_tokens, "norm": self.use_norm}

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        c, f = inputs[CLIP_KEY], inputs[FACE_KEY]
        if c.shape[-1] != self.clip_dim or f.shape[-1] != self.face_dim:
            raise ValueError(f"hybrid_guidance: inputs clip {tuple(c.shape)} / face {tuple(f.shape)}, the conditioner "
                             f"takes clip_dim {self.clip_dim} / face {self.face_dim} (train.methods.hybrid_guidance."
                             "conditioner.clip_dim must be the sum of the clip_image models' projection dims)")
        dt = self.proj.weight.dtype
        x = torch.cat([c.to(dt), f.to(dt)], dim=-1)
        tok = self.proj(x).view(x.shape[0], self.num_tokens, self.cross_dim)
        return self.norm(tok) if self.norm is not None else tok


def drop_inputs(inputs: Mapping[str, torch.Tensor], drop_style: torch.Tensor, drop_face: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs with the CLIP part zeroed for the (B,) bool `drop_style` rows and the ArcFace part
    for `drop_face` rows."""
    out = dict(inputs)
    for key, drop in ((CLIP_KEY, drop_style), (FACE_KEY, drop_face)):
        v = inputs[key]
        out[key] = v * (~drop).to(device=v.device, dtype=v.dtype).view(-1, *([1] * (v.ndim - 1)))
    return out


def input_dropout(draws: Any, p_style: float, p_face: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_style, drop_face), (B,) bool each, independent: two uniforms per sample from its own
    generator (`training.step.SampleDraws.rand`)."""
    u = draws.rand((2,))
    return u[:, 0] < p_style, u[:, 1] < p_face


# ============================================================================================
# params: train.methods.hybrid_guidance


@dataclass
class ConditionerConfig:
    clip_dim: int = 1792  # sum of the clip_image models' projection dims (paper: ViT-L/14 768 + RN101 512 + ViT-B/32 512)
    tokens: int = 4  # identity tokens
    norm: bool = False  # LayerNorm per token (the paper: a linear layer only)


@dataclass
class MainConfig(PhaseConfig):
    """`train.methods.hybrid_guidance.main:` reconstruction of the in-the-wild crop."""

    dropout: DropoutConfig = field(default_factory=lambda: DropoutConfig(image=0.0, text=0.05, both=0.0))
    style_dropout: float = 0.64  # paper 4.1
    face_dropout: float = 0.1  # paper 4.1
    train_unet: bool = False  # true: the UNet trains too (the paper; set lr: 1.0e-6 as it does)
    prompt: Literal["caption", "empty"] = "caption"  # training prompt: the shard caption (else empty), or always empty


@dataclass
class HybridGuidanceConfig:
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    outside: Literal["all", "mean", "none"] = "all"  # positions in no person's region (several identities)
    text_prior: Optional[str] = None  # local KandinskyPriorPipeline folder: enables --text-guidance
    main: MainConfig = field(default_factory=MainConfig)

    def validate(self, path: str = "train.methods.hybrid_guidance") -> None:
        m = self.main
        if not (0 <= m.style_dropout <= 1 and 0 <= m.face_dropout <= 1):
            raise ConfigError("train.methods.hybrid_guidance.main: style_dropout and face_dropout in [0, 1]")
        if self.conditioner.clip_dim < 1 or self.conditioner.tokens < 1:
            raise ConfigError("train.methods.hybrid_guidance.conditioner: clip_dim and tokens >= 1")
        if self.outside not in OUTSIDE:
            raise ConfigError(f"train.methods.hybrid_guidance.outside: one of {OUTSIDE}")


# ============================================================================================
# phase


def caption_or_empty(sample: dict, cfg: MainConfig) -> str:
    txt = sample.get("txt")
    return txt.strip() if cfg.prompt == "caption" and isinstance(txt, str) else ""


class Main(Phase):
    name = "main"
    config = MainConfig
    trains = ("conditioner", "injection")
    members = ("jpg", "txt")

    def trainable(self, cfg: MainConfig) -> tuple[str, ...]:
        return self.trains + (("unet",) if cfg.train_unet else ())

    def decode_sizes(self, cfg: MainConfig, resolution: int) -> dict[str, int]:
        return {"jpg": resolution}

    def example(self, sample: dict, *, resolution: int, cfg: MainConfig, rng: np.random.Generator) -> dict:
        return {"image": aligned_face(sample["jpg"], resolution), "prompt": caption_or_empty(sample, cfg)}

    def val_prompt(self, sample: dict, cfg: MainConfig) -> str:
        return caption_or_empty(sample, cfg) or VAL_PROMPT

    def loss(self, ctx, cfg: MainConfig) -> dict[str, torch.Tensor]:
        drop_style, drop_face = input_dropout(ctx.draws, cfg.style_dropout, cfg.face_dropout)
        inputs = drop_inputs(ctx.inputs, drop_style.to(ctx.device), drop_face.to(ctx.device))
        eps = ctx.unet(ctx.tokens(inputs), scale=1.0)
        return {"loss": noise_mse(eps, ctx.target)}


# ============================================================================================
# the method


def _float(options: Mapping[str, str], key: str) -> float:
    try:
        return float(options[key])
    except ValueError:
        raise ValueError(f"hybrid_guidance: --{key.replace('_', '-')} must be a number, got {options[key]!r}") from None


def _method_config(kit: ReferenceKit) -> HybridGuidanceConfig:
    from training.config import train_params

    return train_params(kit.params).method(METHOD.name)


class HybridGuidance(Method):
    name = "hybrid_guidance"
    conditioner = HybridLinear
    injection = RegionAttention
    config = HybridGuidanceConfig
    phases = {"main": Main()}
    needs = (CLIP_MEMBER, FACE_MEMBER)
    input_keys = (CLIP_KEY, FACE_KEY)
    flags = (
        MethodFlag("--text-guidance", "option", "text_guidance", "ALPHA", "alpha of the text path (needs a text prior)"),
        MethodFlag("--style-text", "option", "style_text", "TEXT", "the text the prior maps"),
        MethodFlag("--text-prior", "option", "text_prior", "DIR",
                   "a KandinskyPriorPipeline folder (default: train.methods.hybrid_guidance.text_prior)"),
    )

    def conditioner_config(self, cfg: HybridGuidanceConfig, comps) -> dict:
        c = cfg.conditioner
        return {"cross_dim": comps.cross_attention_dim, "clip_dim": c.clip_dim, "face_dim": FACE_DIM,
                "tokens": c.tokens, "norm": c.norm}

    def injection_config(self, cfg: HybridGuidanceConfig, comps) -> dict:
        return {"outside": cfg.outside}

    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        if any(CLIP_MEMBER not in s for s in samples):
            raise KeyError(f"hybrid_guidance needs the {CLIP_MEMBER} member (the clip_image stage) in every sample "
                           "(train.synthetic samples have none: train on shards)")
        return {CLIP_KEY: mix([np.asarray(s[CLIP_MEMBER], dtype=np.float32) for s in samples], weights),
                FACE_KEY: mix([np.asarray(s[FACE_MEMBER], dtype=np.float32) for s in samples], weights)}

    def prepare(self, identity: Identity, files: Mapping[str, str], options: Mapping[str, str],
                kit: ReferenceKit) -> Prepared:
        known = {f.target: f.flag for f in self.flags if f.kind == "option"}
        unknown = sorted(set(files) - {"style"}) + sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"hybrid_guidance: unknown input/option {unknown} (inputs: style=PHOTO; options: "
                             f"{', '.join(known.values())})")
        if not identity.references:
            raise ValueError("hybrid_guidance: give reference photo(s) (--ref)")
        samples = kit.samples(identity.references, self.needs)
        inputs = self.inputs(samples, identity.weights)
        record: dict[str, Any] = {"references": kit.records(identity.references), "weights": identity.weights,
                                  "clip_image": to_dict(kit.params.clip_image), **kit.settings()}
        style = files.get("style") or getattr(kit, "content", None)
        if style:
            inputs[CLIP_KEY] = style_embedding(kit, style)
            record["style"] = {"photo": str(style), "sha256": sha256_file(style),
                               "source": "--input style" if files.get("style") else "content photo"}
        else:
            record["style"] = {"source": "references"}
        if "text_guidance" in options or "style_text" in options:
            inputs[CLIP_KEY], record["text"] = self._text_path(inputs[CLIP_KEY], options, kit)
        record["inputs_sha256"] = {k: sha256_array(v) for k, v in inputs.items()}
        return Prepared(inputs, record)

    def evaluation_metrics(self, run) -> dict[str, dict]:
        from training.evaluate import missing, value

        return region_identity(run, value, missing)

    def _text_path(self, clip: np.ndarray, options: Mapping[str, str], kit: ReferenceKit) -> tuple[np.ndarray, dict]:
        folder = options.get("text_prior") or _method_config(kit).text_prior
        if not folder:
            raise ValueError("hybrid_guidance: --text-guidance needs a text prior, and none is configured: set "
                             "train.methods.hybrid_guidance.text_prior (a local KandinskyPriorPipeline folder whose "
                             "image embedding matches the clip_image models) or pass --text-prior DIR")
        if "text_guidance" not in options or "style_text" not in options:
            raise ValueError("hybrid_guidance: the text path takes --text-guidance A and --style-text TEXT together")
        alpha = _float(options, "text_guidance")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"hybrid_guidance: --text-guidance must be in [0, 1], got {alpha}")
        e_t, info = text_embedding(kit, folder, options["style_text"], clip.shape[-1])
        mixed = (alpha * e_t.astype(np.float64) + (1.0 - alpha) * clip.astype(np.float64)).astype(np.float32)
        return mixed, {"alpha": alpha, "text": options["style_text"], "prior": info,
                       "style_sha256": sha256_array(clip), "text_sha256": sha256_array(e_t)}


# ============================================================================================
# evaluation: per-region identity of two-person images

PAIR_PROMPT = "a photo of two people side by side"


def half_regions(height: int, width: int) -> torch.Tensor:
    """(2, H, W) float masks: the left and the right half of the image (identity 0 left, 1 right)."""
    m = torch.zeros(2, height, width)
    m[0, :, : width // 2] = 1.0
    m[1, :, width // 2:] = 1.0
    return m


def faces_by_half(faces: Sequence[Any], width: int) -> list[Optional[Any]]:
    """The largest face (bbox area) with real landmarks whose 5-point centre is in the left / right
    half: [left or None, right or None] (the detector-only fallback faces are skipped, as
    `training.references.largest_face` does)."""
    out: list[Optional[Any]] = [None, None]
    for f in faces:
        if f.lm5 is None or getattr(f, "landmarks_source", "") == "detector":
            continue
        k = 0 if float(np.mean(np.asarray(f.lm5, np.float64)[:, 0])) < width / 2 else 1
        area = float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        if out[k] is None or area > float((out[k].bbox[2] - out[k].bbox[0]) * (out[k].bbox[3] - out[k].bbox[1])):
            out[k] = f
    return out


def region_identity(run, value, missing) -> dict[str, dict]:
    """Multi-person identity (FaceStudio's several identities in one image): for each evaluation face
    i, one image of two people, face i confined to the left half and face i+1 to the right (the
    region-masked injection), `PAIR_PROMPT`, the evaluation's first seed and sampler. Per region: the
    ArcFace cosine between the region's identity (its reference embedding) and the largest face
    detected with its centre in that region, 0 where there is none (as `identity_similarity`);
    `region_identity_similarity` is the mean over regions, `..._detected` over regions with a face."""
    from training.evaluate import reference_embeddings, usable_lm5

    faces, n = run.faces, len(run.faces)
    if n < 2:
        why = "needs >= 2 evaluation faces (two identities per image)"
        return {"region_identity_similarity": missing(why), "region_identity_similarity_detected": missing(why)}
    detector = getattr(run.scorer, "detector", None)
    if detector is None:
        why = "the scorer has no face detector"
        return {"region_identity_similarity": missing(why), "region_identity_similarity_detected": missing(why)}
    pairs = [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]
    refs, _ = reference_embeddings(faces, run.scorer)
    c, size = run.cfg, run.size
    regions = half_regions(size, size)
    prompt = run.generator.method.prompt(PAIR_PROMPT, run.generator.adapter)
    images = []
    for s in range(0, len(pairs), c.batch_size):
        chunk = pairs[s:s + c.batch_size]
        images.extend(run.generator.sample([[run.inputs[i], run.inputs[j]] for i, j in chunk], [prompt] * len(chunk),
                                           [c.seed] * len(chunk), scheduler=c.scheduler, negative_prompt=c.negative_prompt,
                                           steps=c.steps, guidance=c.guidance, scale=c.scale, delay_steps=c.delay_steps,
                                           height=size, width=size,
                                           regions=regions[None].expand(len(chunk), -1, -1, -1).contiguous()))
    sims, sims_det, rows = [], [], []
    for (i, j), img in zip(pairs, images):
        rgb = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
        found = faces_by_half(detector.detect(rgb), rgb.shape[1])
        row = {"left": faces[i].key, "right": faces[j].key, "similarity": []}
        for k, (ident, f) in enumerate(zip((i, j), found)):
            lm = None if f is None else usable_lm5(f.lm5, 1.0)
            if refs[ident] is None:
                row["similarity"].append(None)
                continue
            if lm is None:
                sims.append(0.0)
                row["similarity"].append(None)
                continue
            e = run.scorer.embed_aligned([rgb], [lm])[0]
            sim = float(np.dot(refs[ident], e) / max(np.linalg.norm(refs[ident]) * np.linalg.norm(e), 1e-12))
            sims.append(sim)
            sims_det.append(sim)
            row["similarity"].append(round(sim, 6))
        rows.append(row)
    protocol = "face i left, face i+1 right (half-image regions); first seed; prompt " + repr(PAIR_PROMPT)
    out = {"region_identity_similarity": value(float(np.mean(sims)), len(sims), no_face_counts_as=0.0, images=len(images),
                                               protocol=protocol, pairs=rows) if sims
           else missing("no reference face could be embedded", len(images))}
    out["region_identity_similarity_detected"] = (
        value(float(np.mean(sims_det)), len(sims_det), protocol=protocol) if sims_det
        else missing("no face detected in either person's region of any two-person image", len(sims)))
    return out


# ============================================================================================
# reference photos -> clip.npy; style photos; the text prior


def _encoder(kit: ReferenceKit):
    from pipeline.models import clip

    return kit.model("clip", lambda: clip.load(kit.params.clip_image, device=kit.device))


def _clip_of_references(kit: ReferenceKit, faces) -> list[np.ndarray]:
    """clip.npy of reference photos: each photo's largest face's style image (its in-the-wild crop
    with the face greyed out, as the clip_image stage makes it) through the configured CLIP models."""
    from pipeline.images import load_rgb
    from pipeline.models.clip import wild_style

    a, m, c = kit.params.align, kit.params.masks, kit.params.clip_image
    styles = []
    for f in faces:
        rgb, _ = load_rgb(f.path)
        face = largest_face(kit.detector.detect(rgb))
        styles.append(wild_style(rgb, face, a.wild_scale, a.wild_size, m.erode_at_1024, m.blur_at_1024, c.fill))
    return list(_encoder(kit).embed(styles))


def style_embedding(kit: ReferenceKit, photo: str) -> np.ndarray:
    """The CLIP embedding of a whole style / content photo with every face greyed out."""
    from pipeline.images import load_rgb
    from pipeline.models.clip import photo_style

    a, m, c = kit.params.align, kit.params.masks, kit.params.clip_image
    rgb, _ = load_rgb(photo)
    faces = [f for f in kit.detector.detect(rgb) if f.lm5 is not None and getattr(f, "landmarks_source", "") != "detector"]
    return _encoder(kit).embed([photo_style(rgb, faces, a.wild_scale, a.wild_size, m.erode_at_1024, m.blur_at_1024,
                                            c.fill)])[0]


def text_embedding(kit: ReferenceKit, folder: str, text: str, dim: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The prior's CLIP image embedding of `text` ((dim,) float32, L2-normalised like the clip_image
    embeddings when `clip_image.normalize`) and what to record about the prior."""
    from pathlib import Path

    from diffusers import KandinskyPriorPipeline

    from pipeline.models.clip import tree_fingerprint

    p = Path(folder).expanduser()
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"hybrid_guidance: text prior {p} is not a diffusers pipeline folder (no model_index.json)")
    pipe = kit.model(f"prior:{p}", lambda: KandinskyPriorPipeline.from_pretrained(str(p), local_files_only=True))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        e = pipe(text, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").image_embeds[0].float()
    if e.shape[-1] != dim:
        raise ValueError(f"hybrid_guidance: the text prior gives {e.shape[-1]}-d image embeddings, the conditioner takes "
                         f"clip_dim {dim} (the prior must match the clip_image models)")
    if not bool(torch.isfinite(e).all()) or float(e.norm()) == 0.0:
        raise ValueError(f"hybrid_guidance: the text prior {p} gives a zero or non-finite embedding")
    if kit.params.clip_image.normalize:
        e = e / e.norm()
    return e.cpu().numpy().astype(np.float32), {"folder": str(p), "fingerprint": tree_fingerprint(p),
                                                "seed": seed}


register_member(CLIP_MEMBER, _clip_of_references)
METHOD = methods.register(HybridGuidance())
