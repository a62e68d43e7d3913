"""Face2Diffusion (Shiohara & Yamasaki, CVPR 2024): identity + expression -> two pseudo-word embeddings
in the CLIP text space, trained with class-guided denoising regularisation. The authors' repository is
inference only; the paper is the reference.

Conditioner `F2DMapper`: two independent MLPs f_map^1, f_map^2, each 2 x [Linear, Dropout 0.1,
LeakyReLU 0.2] + Linear to the text width (768 on SD 1.5), over v = [v_id, v_exp]; they give S1*, S2*.
  v_id   identity: `arcface` (default; the shards' real w600k_mbf 512-d `id.npy`, the paper's
         ablation "works, scores lower") or `msid` (the paper's MSID ViT on the 112 px ArcFace crop,
         `training.adapters.msid`, 1536-d; the authors' released checkpoint from
         `conditioner.msid_checkpoint`, else random from `msid_seed` and tagged weights_real false).
  v_exp  expression: the shards' `expr.npy` (the `expression` stage: by default a pose-normalised
         23-term MediaPipe mesh descriptor, NOT the paper's 64-d 3DMM vector; or precomputed vectors),
         standardised with the training set's per-term mean / std (buffers computed once before
         training by `calibrate`, kept in the adapter, so reference photos are standardised alike),
         or the learned null vector (zero-initialised, `null_expr`) where `expr_mask` is 0. Training
         replaces it with p `expression_drop` = 0.2 (a per-sample draw); generation and evaluation use
         the null vector unless an expression is given.
Injection `PseudoWordInjection` (`training.adapters.pseudo_words`): S1*, S2* overwrite the text
encoder's input embeddings (after token + position embedding) at the identifier "f l" (the authors'
S*), the rest of the CLIP text transformer runs, the UNet is untouched.
Objective (phase `main`), CGDR: L = ||eps_hat(z_t, "a photo of S*") - (eps * M + eps_hat_c * (1 - M))||^2,
eps_hat_c the frozen model's prediction for "a photo of a person" (an extra pass without gradient),
M the face mask (1 on the face). Only the mappers (and the null vector) train: lr 1e-5, batch 32,
horizontal flip only; 100k iterations on FFHQ in the paper.
Inference (paper): Euler ancestral, 30 steps, CFG 7 (params `generate.methods.face2diffusion`;
`persona evaluate` keeps its own protocol, the same for every method, so their results compare).
A text-side injection conditions the prompt embedding, computed once per image: `delay_steps` (a
delayed identity start) has no effect on it.

Decisions where the paper is silent or the project differs (each a param):
- identity backend `arcface` by default (no MSID weights offline); `msid` loads the checkpoint.
- expression: the mesh descriptor (`expression.backend: landmarks`) instead of a 3DMM; the paper's
  64-d vectors fit through `expression.backend: precomputed` + `conditioner.expression_dim: 64`.
- M: the shards' `face_mask.png` on the aligned face (hull of the MediaPipe mesh, eroded and
  blurred; 255 = face, so M = face_mask / 255); the paper uses a face-parsing mask.
- training images: the FFHQ-aligned faces (`face.jpg`), like FFHQ; mirrored with p `hflip` 0.5
  together with the mask, the 112 px crop and the expression (right / left descriptor terms
  swapped: `pipeline.models.expression.FLIP`; precomputed vectors are kept as they are).
- no identity / text condition dropout (the paper has none): `dropout` 0 / 0 / 0.
- MLP hidden width: the identity width (the authors' mapper: 1536 for MSID; 512 for ArcFace).
- expression standardisation: mean / std over up to `calibration_faces` training faces, evenly spaced.
- several reference photos: ArcFace embeddings are averaged (weighted) and renormalised; for `msid`
  the references' aligned 112 px crops are averaged pixel-wise before the encoder (exact for one
  reference, the paper's setting; an approximation otherwise).
- prompts written for any method (evaluation, `persona generate`) get the identifier in place of
  their first "a person" / "a face" / ... (`prompt`), or in front when they name none.
- expression controllability (evaluation): face i generated with face i+1's shard expression (the
  first prompt, the first seed), its mesh descriptor vs that reference's, RMS over the terms in the
  training set's standardised units (lower = closer; the same with the null expression is given
  for comparison); missing where no face with a mesh is detected, or the adapter's expression
  vectors are not the mesh descriptor.

Generation: `persona generate --method face2diffusion --ref face.jpg --prompt "a photo of f l smiling"
[--expression-ref smile.jpg | --expression null]`; also `--input expression=VEC.npy` (a raw vector in
the training data's units, e.g. a precomputed 3DMM code).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.digests import sha256_array, sha256_file
from pipeline.models import expression as expr_model
from pipeline.shard_reader import SCALE_KEY
from training import methods
from training.adapters.pseudo_words import PseudoWordInjection
from training.losses import cgdr_target, mask_to_latent, noise_mse
from training.methods.base import DropoutConfig, Identity, Method, MethodFlag, Phase, PhaseConfig, Prepared, mix
from training.references import ReferenceKit, register_member
from training.transforms import aligned_face

log = logging.getLogger("persona.face2diffusion")

IDENTIFIER = "f l"  # the authors' S* ("The identifier S* should be represented as 'f l'")
CLASS_PROMPT = "a photo of a person"
ARCFACE_DIM = 512
CROP = 112
EXPR_MEMBER = "expr.npy"
ID_MEMBER = "id.npy"
INPUT_KEYS = ("id", "face", "expr", "expr_mask")
# the first phrase naming the subject in a prompt written for any method (replaced by the identifier)
SUBJECT = re.compile(r"\b(?:an?|the)\s+(?:person|face|man|woman|boy|girl|child|human)\b", re.IGNORECASE)


# ============================================================================================
# conditioner


class MapperMLP(nn.Module):
    """f_map^i: 2 x [Linear, Dropout, LeakyReLU] + Linear to the text width."""

    def __init__(self, in_dim: int, hidden: int, width: int, dropout: float = 0.1, slope: float = 0.2, layers: int = 2):
        super().__init__()
        blocks, d = [], in_dim
        for _ in range(layers):
            blocks.append(nn.Sequential(nn.Linear(d, hidden), nn.Dropout(dropout), nn.LeakyReLU(slope)))
            d = hidden
        self.layers = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.layers(x))


class F2DMapper(nn.Module):
    """(identity || expression or null) -> (B, tokens, width) pseudo-word embeddings (module doc).

    Inputs: "id" (B, 512) ArcFace (identity `arcface`), "face" (B, 3, 112, 112) uint8 ArcFace crop
    (identity `msid`), "expr" (B, expr_dim) raw expression vector, "expr_mask" (B,) 1 = use it,
    0 = the null vector."""

    def __init__(self, width: int, tokens: int = 2, identity: Literal["arcface", "msid"] = "arcface",
                 expr_dim: int = expr_model.DIM, hidden: Optional[int] = None, dropout: float = 0.1, slope: float = 0.2,
                 msid_checkpoint: Optional[str] = None, msid_sha256: Optional[str] = None, msid_seed: int = 0,
                 expression_source: Optional[str] = None):
        super().__init__()
        if identity not in ("arcface", "msid"):
            raise ValueError(f"identity must be arcface or msid, got {identity!r}")
        from training.adapters.msid import OUT_DIM

        self.width, self.tokens, self.identity, self.expr_dim = int(width), int(tokens), identity, int(expr_dim)
        self.id_dim = ARCFACE_DIM if identity == "arcface" else OUT_DIM
        self.hidden = int(hidden or self.id_dim)
        self.dropout, self.slope = float(dropout), float(slope)
        self.msid_checkpoint, self.msid_sha256, self.msid_seed = msid_checkpoint, msid_sha256, int(msid_seed)
        self.expression_source = expression_source  # what made the expression vectors (set by calibration)
        self.mappers = nn.ModuleList([MapperMLP(self.id_dim + self.expr_dim, self.hidden, self.width, self.dropout, self.slope)
                                      for _ in range(self.tokens)])
        self.null_expr = nn.Parameter(torch.zeros(self.expr_dim))
        self.register_buffer("expr_mean", torch.zeros(self.expr_dim))
        self.register_buffer("expr_std", torch.ones(self.expr_dim))
        object.__setattr__(self, "_msid", None)  # frozen feature extractor: not a submodule, not in the state dict

    def config(self) -> dict:
        return {"width": self.width, "tokens": self.tokens, "identity": self.identity, "expr_dim": self.expr_dim,
                "hidden": self.hidden, "dropout": self.dropout, "slope": self.slope,
                "msid_checkpoint": self.msid_checkpoint, "msid_sha256": self.msid_sha256, "msid_seed": self.msid_seed,
                "expression_source": self.expression_source}

    def weights_real(self) -> dict[str, bool]:
        """Models this conditioner runs itself (recorded with the adapter)."""
        return {"msid": bool(self.msid_checkpoint)} if self.identity == "msid" else {}

    # ---------------------------------------------------------------- parts
    def msid(self, device: torch.device) -> nn.Module:
        """The frozen MSID encoder (loaded on first use; the checkpoint's sha256 checked)."""
        if self._msid is None:
            from training.adapters.msid import load_msid

            if self.msid_checkpoint and self.msid_sha256 and sha256_file(self.msid_checkpoint) != self.msid_sha256:
                raise RuntimeError(f"MSID checkpoint {self.msid_checkpoint} differs from the one this adapter was "
                                   f"trained with (sha256 {self.msid_sha256[:12]})")
            enc, _ = load_msid(self.msid_checkpoint, self.msid_seed)
            object.__setattr__(self, "_msid", enc)
        if next(self._msid.parameters()).device != device:
            self._msid.to(device)
        return self._msid

    def identity_features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, id_dim) v_id: the ArcFace input, or MSID of the 112 px crop (no gradient)."""
        dtype = self.null_expr.dtype
        if self.identity == "arcface":
            return inputs["id"].to(dtype)
        face = inputs["face"]
        with torch.no_grad():
            x = face.to(self.null_expr.device, torch.float32) / 127.5 - 1.0
            return self.msid(x.device)(x).to(dtype)

    def expression(self, inputs: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        """(B, expr_dim) v_exp: the standardised expression where expr_mask is 1, the null vector elsewhere."""
        mask = inputs["expr_mask"].to(self.null_expr.device, self.null_expr.dtype).reshape(batch, 1)
        e = inputs["expr"].to(self.null_expr.device, self.null_expr.dtype).reshape(batch, -1)
        if e.shape[1] != self.expr_dim:
            if bool((mask != 0).any()):
                raise ValueError(f"expression vectors of length {e.shape[1]}; this adapter was trained on "
                                 f"{self.expr_dim}-d ones ({self.expression_source or 'unknown source'})")
            e = torch.zeros(batch, self.expr_dim, device=mask.device, dtype=mask.dtype)
        z = (e - self.expr_mean) / self.expr_std
        return torch.where(mask > 0.5, z, self.null_expr.expand(batch, -1))

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        v_id = self.identity_features(inputs)
        x = torch.cat([v_id, self.expression(inputs, v_id.shape[0])], dim=-1)
        return torch.stack([m(x) for m in self.mappers], dim=1)

    def null_inputs(self, inputs: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """No identity (zeros) and the null expression for the samples of `drop` (B,)."""
        out = {}
        for k, v in inputs.items():
            keep = (~drop).to(v.device).view(-1, *([1] * (v.ndim - 1)))
            out[k] = v * keep.to(v.dtype)
        return out

    @torch.no_grad()
    def set_statistics(self, mean: np.ndarray, std: np.ndarray, floor: float = 1e-4) -> None:
        """The training set's per-term expression mean / std (std floored at `floor`)."""
        m = torch.as_tensor(np.asarray(mean, np.float64), dtype=self.expr_mean.dtype)
        s = torch.as_tensor(np.maximum(np.asarray(std, np.float64), floor), dtype=self.expr_std.dtype)
        if m.shape != (self.expr_dim,) or s.shape != (self.expr_dim,):
            raise ValueError(f"expression statistics of shape {tuple(m.shape)}, expected ({self.expr_dim},)")
        self.expr_mean.copy_(m)
        self.expr_std.copy_(s)

    def standardise(self, e: np.ndarray) -> np.ndarray:
        """Raw expression vectors (..., expr_dim) -> the units the mappers see."""
        mean, std = self.expr_mean.detach().cpu().numpy(), self.expr_std.detach().cpu().numpy()
        return (np.asarray(e, np.float64) - mean) / std


# ============================================================================================
# inputs: shard / reference samples -> conditioner inputs


def face_crop(sample: dict) -> np.ndarray:
    """(3, 112, 112) uint8 ArcFace crop of a sample's aligned face (its aligned 5 landmarks; a plain
    resize of the aligned face when they are unusable, e.g. synthetic samples)."""
    from pipeline.models.align import arcface_align

    face = np.asarray(sample["face.jpg"])
    if face.ndim == 2:
        face = np.stack([face] * 3, -1)
    face = np.ascontiguousarray(face[..., :3])
    lm = np.asarray((sample.get("json") or {}).get("landmarks_aligned") or [], dtype=np.float64)
    lm = lm * (sample.get(SCALE_KEY) or {}).get("face.jpg", 1.0)  # in the stored frame; the decode may be reduced
    if lm.shape == (5, 2) and np.all(np.isfinite(lm)) and float(np.hypot(*(lm[1] - lm[0]))) >= 4.0:
        crop = arcface_align(face, lm, CROP)
    else:
        from PIL import Image

        crop = np.asarray(Image.fromarray(face).resize((CROP, CROP), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


def is_mesh_descriptor(sample: dict) -> bool:
    """Whether the sample's expr.npy is the mesh descriptor (so a mirrored face permutes it by FLIP)."""
    m = ((sample.get("json") or {}).get("models") or {}).get("expression") or {}
    e = sample.get(EXPR_MEMBER)
    return str(m.get("name", "")).startswith(f"mediapipe-{expr_model.VERSION}") and e is not None \
        and np.asarray(e).shape == (expr_model.DIM,)


def expression_keep(draws, p: float) -> torch.Tensor:
    """(B,) bool: keep the sample's expression (False: the null vector replaces it), one uniform per
    sample from its own generator (`training.step.SampleDraws`), dropped with probability p."""
    return draws.rand(()) >= float(p)


# ============================================================================================
# params


@dataclass
class F2DConditionerConfig:
    """`train.methods.face2diffusion.conditioner:`"""

    identity: Literal["arcface", "msid"] = "arcface"
    msid_checkpoint: Optional[str] = None  # the authors' MSID weights (.pt state dict); null: random, tagged
    msid_seed: int = 0  # random MSID init without a checkpoint
    expression_dim: int = expr_model.DIM  # 23 (mesh descriptor); `expression.precomputed.dim` for precomputed vectors
    hidden: Optional[int] = None  # MLP width; null: the identity width (512 ArcFace, 1536 MSID)
    dropout: float = 0.1
    slope: float = 0.2  # LeakyReLU negative slope
    calibration_faces: int = 10000  # training faces (evenly spaced) for the expression mean / std


def _no_dropout() -> DropoutConfig:
    return DropoutConfig(image=0.0, text=0.0, both=0.0)


@dataclass
class MainConfig(PhaseConfig):
    """`train.methods.face2diffusion.main:` CGDR on aligned faces; only the mappers train."""

    max_steps: int = 100_000  # paper: 100k iterations on FFHQ
    batch_size: int = 32  # paper
    lr: float = 1e-5  # paper
    dropout: DropoutConfig = field(default_factory=_no_dropout)
    prompt: str = f"a photo of {IDENTIFIER}"  # p (must hold the identifier)
    class_prompt: str = CLASS_PROMPT  # p_c
    expression_drop: float = 0.2  # p of the null expression vector
    hflip: float = 0.5  # p of a horizontal flip (the paper's only augmentation)


@dataclass
class F2DConfig:
    identifier: str = IDENTIFIER
    conditioner: F2DConditionerConfig = field(default_factory=F2DConditionerConfig)
    main: MainConfig = field(default_factory=MainConfig)

    def validate(self, path: str = "train.methods.face2diffusion") -> None:
        m, c = self.main, self.conditioner
        if not self.identifier.strip():
            raise ConfigError(f"{path}.identifier: give the identifier words (e.g. 'f l')")
        if self.identifier not in m.prompt:
            raise ConfigError(f"{path}.main.prompt {m.prompt!r} lacks the identifier {self.identifier!r}")
        if not (0 <= m.expression_drop <= 1 and 0 <= m.hflip <= 1):
            raise ConfigError(f"{path}.main: expression_drop and hflip in [0, 1]")
        if c.expression_dim < 1 or c.calibration_faces < 1:
            raise ConfigError(f"{path}.conditioner: expression_dim, calibration_faces >= 1")


# ============================================================================================
# the phase


class Main(Phase):
    name = "main"
    config = MainConfig
    trains = ("conditioner",)
    members = ("face.jpg", "face_mask.png", "json")

    def decode_sizes(self, cfg: MainConfig, resolution: int) -> dict[str, int]:
        # the ArcFace crop (eyes 35 px apart in 112) of an aligned face (eyes about a quarter of its side
        # apart): from a >= 224 px decode each crop pixel still spans more than one source pixel, so a
        # 512 px face decodes at 1/2 scale (`face_crop` scales the landmarks by SCALE_KEY)
        return {"face.jpg": max(resolution, 2 * CROP)}

    def example(self, sample: dict, *, resolution: int, cfg: MainConfig, rng: np.random.Generator) -> dict:
        u = rng.random(4)
        flip = bool(u[0] < cfg.hflip)
        image = aligned_face(sample["face.jpg"], resolution)
        m = torch.from_numpy(np.asarray(sample["face_mask.png"], dtype=np.float32) / 255.0)
        m = m[..., 0] if m.ndim == 3 else m
        mask = torch.nn.functional.interpolate(m[None, None], size=(resolution, resolution), mode="area")[0]
        ins = own_inputs(sample)
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
            ins["face"] = np.ascontiguousarray(ins["face"][..., ::-1])
            if is_mesh_descriptor(sample):
                ins["expr"] = expr_model.flip(ins["expr"]).astype(np.float32)
        return {"image": image, "mask": mask, "prompt": cfg.prompt,
                **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ins.items()}}

    def val_prompt(self, sample: dict, cfg: MainConfig) -> str:
        return cfg.prompt

    def loss(self, ctx, cfg: MainConfig) -> dict[str, torch.Tensor]:
        mask_e = ctx.inputs["expr_mask"]
        keep = expression_keep(ctx.draws, cfg.expression_drop).to(mask_e.device, mask_e.dtype)
        ctx.inputs = {**ctx.inputs, "expr_mask": mask_e * keep.view(-1, *([1] * (mask_e.ndim - 1)))}
        with torch.no_grad():  # eps_hat_c: the frozen model on the class prompt (no identity)
            eps_c = ctx.unet(None, scale=0.0, prompts=[cfg.class_prompt] * len(ctx.batch["prompt"]))
        eps = ctx.predict()  # the gradient-carrying pass last
        m = mask_to_latent(ctx.batch["mask"], tuple(eps.shape[-2:])).to(eps.device)
        target = cgdr_target(ctx.target, eps_c, m)
        return {"loss": noise_mse(eps, target),
                "face": noise_mse(eps * m, ctx.target * m), "background": noise_mse(eps * (1 - m), eps_c * (1 - m))}


def own_inputs(sample: dict) -> dict[str, np.ndarray]:
    """A training sample's conditioner inputs with its OWN expression (expr_mask 1)."""
    e = np.asarray(sample[EXPR_MEMBER], dtype=np.float32)
    v = np.asarray(sample[ID_MEMBER], dtype=np.float32)
    return {"id": (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32), "face": face_crop(sample),
            "expr": e, "expr_mask": np.float32(1.0)}


# ============================================================================================
# the method


def load_vector(path: str) -> np.ndarray:
    v = np.load(path, allow_pickle=False).astype(np.float32)
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise ValueError(f"{path}: an expression vector must be a finite 1-d array, got shape {v.shape}")
    return v


class Face2Diffusion(Method):
    name = "face2diffusion"
    conditioner = F2DMapper
    injection = PseudoWordInjection
    config = F2DConfig
    phases = {"main": Main()}
    needs = (ID_MEMBER, EXPR_MEMBER)
    input_keys = INPUT_KEYS
    flags = (
        MethodFlag("--expression-ref", "input", "expression_ref", "PHOTO",
                   "a photo whose expression the generated face takes (its mesh descriptor)"),
        MethodFlag("--expression", "option", "expression", "null",
                   "null: the learned null expression (the default; the prompt decides the expression)"),
    )

    def conditioner_config(self, cfg: F2DConfig, comps) -> dict:
        c = cfg.conditioner
        tokens = len(PseudoWordInjection.token_ids(comps.tokenizer, cfg.identifier))
        return {"width": int(comps.text_encoder.config.hidden_size), "tokens": tokens, "identity": c.identity,
                "expr_dim": c.expression_dim, "hidden": c.hidden, "dropout": c.dropout, "slope": c.slope,
                "msid_checkpoint": c.msid_checkpoint if c.identity == "msid" else None,
                "msid_sha256": sha256_file(c.msid_checkpoint) if c.identity == "msid" and c.msid_checkpoint else None,
                "msid_seed": c.msid_seed}

    def injection_config(self, cfg: F2DConfig, comps) -> dict:
        return {"identifier": cfg.identifier}

    def calibrate(self, conditioner: F2DMapper, source, cfg: F2DConfig) -> dict:
        """The training set's expression mean / std into the conditioner's buffers."""
        n = len(source)
        k = min(n, cfg.conditioner.calibration_faces)
        idx = sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())) if n else []
        vecs, sources = [], set()
        for i in idx:
            s = source.get(i, (EXPR_MEMBER, "json"))
            if EXPR_MEMBER not in s:
                raise ValueError(f"face2diffusion: training sample {s.get('__key__')} has no {EXPR_MEMBER} "
                                 "(add the expression stage to the shards)")
            vecs.append(np.asarray(s[EXPR_MEMBER], np.float64).reshape(-1))
            m = ((s.get("json") or {}).get("models") or {}).get("expression") or {}
            sources.add(str(m.get("name") or "unknown"))
        if not vecs:
            raise ValueError("face2diffusion: no training samples to calibrate the expression statistics on")
        dims = {v.shape[0] for v in vecs}
        if dims != {conditioner.expr_dim}:
            raise ValueError(f"face2diffusion: the shards' expression vectors are {sorted(dims)}-d, the conditioner "
                             f"expects {conditioner.expr_dim} (train.methods.face2diffusion.conditioner.expression_dim)")
        a = np.stack(vecs)
        conditioner.set_statistics(a.mean(0), a.std(0))
        conditioner.expression_source = ",".join(sorted(sources))
        return {"expression": {"faces": len(vecs), "source": conditioner.expression_source,
                               "mean": np.round(a.mean(0), 5).tolist(), "std": np.round(a.std(0), 5).tolist()}}

    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        """References of one identity -> the inference default: their identity, the NULL expression."""
        e = mix([np.asarray(s[ID_MEMBER], dtype=np.float32) for s in samples], weights)
        crops = [face_crop(s).astype(np.float32) for s in samples]
        face = np.clip(np.round(mix(crops, weights)), 0, 255).astype(np.uint8)
        dim = next((np.asarray(s[EXPR_MEMBER]).shape[0] for s in samples if EXPR_MEMBER in s), expr_model.DIM)
        return {"id": (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32), "face": face,
                "expr": np.zeros(dim, np.float32), "expr_mask": np.float32(0.0)}

    def prepare(self, identity: Identity, files: Mapping[str, str], options: Mapping[str, str],
                kit: ReferenceKit) -> Prepared:
        unknown = sorted(set(files) - {"expression_ref", "expression"}) + sorted(set(options) - {"expression"})
        if unknown:
            raise ValueError(f"face2diffusion: unknown --input/--option {unknown} (inputs: expression_ref=PHOTO, "
                             "expression=VEC.npy; option: expression=null)")
        if "expression" in options and options["expression"] != "null":
            raise ValueError(f"face2diffusion: --expression {options['expression']!r}: only 'null' (or give "
                             "--expression-ref PHOTO / --input expression=VEC.npy)")
        given = [k for k in ("expression_ref", "expression") if k in files] + (["expression=null"] if "expression" in options else [])
        if len(given) > 1:
            raise ValueError(f"face2diffusion: give one expression, not {given}")
        if not identity.references:
            raise ValueError("face2diffusion: give reference photo(s) (--ref)")
        samples = kit.samples(identity.references, (ID_MEMBER,))
        ins = self.inputs(samples, identity.weights)
        record: dict = {"references": kit.records(identity.references), "weights": identity.weights}
        if "expression_ref" in files:
            ref = kit.samples([files["expression_ref"]], (EXPR_MEMBER,))[0]
            ins["expr"], ins["expr_mask"] = np.asarray(ref[EXPR_MEMBER], np.float32), np.float32(1.0)
            record["expression"] = {"kind": "reference", "path": files["expression_ref"],
                                    "sha256": sha256_file(files["expression_ref"]), "terms": list(expr_model.TERMS),
                                    "descriptor": np.round(ins["expr"], 5).tolist(), "sha256_descriptor": sha256_array(ins["expr"])}
        elif "expression" in files:
            ins["expr"], ins["expr_mask"] = load_vector(files["expression"]), np.float32(1.0)
            record["expression"] = {"kind": "file", "path": files["expression"], "sha256": sha256_file(files["expression"])}
        else:
            record["expression"] = {"kind": "null"}
        return Prepared(ins, record)

    def prompt(self, prompt: str, adapter) -> str:
        ident = getattr(adapter.injection, "identifier", IDENTIFIER)
        if re.search(rf"(?<!\w){re.escape(ident)}(?!\w)", prompt):
            return prompt
        new, n = SUBJECT.subn(ident, prompt, count=1)
        return new if n else f"{ident}, {prompt}"

    def evaluation_metrics(self, run) -> dict[str, dict]:
        from training.evaluate import missing, value

        return {"expression_distance": expression_controllability(run, value, missing)}


def expression_controllability(run, value, missing) -> dict:
    """See the module doc: face i with face i+1's expression vs that expression, standardised RMS."""
    cond = run.generator.adapter.conditioner
    faces = run.faces
    why_not = None
    if not str(cond.expression_source or "").startswith(f"mediapipe-{expr_model.VERSION}") or cond.expr_dim != expr_model.DIM:
        why_not = (f"the adapter's expression vectors ({cond.expression_source or 'unknown'}, {cond.expr_dim}-d) are not "
                   "the mesh descriptor: a generated face's expression cannot be measured in their units")
    elif len(faces) < 2:
        why_not = "needs >= 2 evaluation faces (each takes the next face's expression)"
    elif getattr(run.scorer, "detector", None) is None:
        why_not = "the scorer has no face detector"
    if why_not:
        return missing(why_not, 0, lower_is_better=True)
    n = len(faces)
    ref = [np.asarray(faces[(i + 1) % n].sample[EXPR_MEMBER], np.float32) for i in range(n)]
    conds = [{**run.inputs[i], "expr": ref[i], "expr_mask": np.float32(1.0)} for i in range(n)]
    seed = run.cfg.seed
    imgs = run.generate(conds, [run.prompts[0]] * n, [seed] * n)
    null_imgs = [run.images[run.jobs.index((i, 0, seed))] for i in range(n)]

    def measured(img) -> Optional[np.ndarray]:
        from training.references import largest_face

        f = largest_face(run.scorer.detector.detect(np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
        if f is None or getattr(f, "mesh", None) is None:
            return None
        try:
            return expr_model.descriptor(f.mesh)
        except expr_model.BadMesh:
            return None

    def rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((cond.standardise(a) - cond.standardise(b)) ** 2)))

    d_ref, d_null, per_face = [], [], []
    for i in range(n):
        g, b = measured(imgs[i]), measured(null_imgs[i])
        row = {"key": faces[i].key, "reference": faces[(i + 1) % n].key,
               "distance": None if g is None else round(rms(g, ref[i]), 5),
               "distance_null": None if b is None else round(rms(b, ref[i]), 5)}
        per_face.append(row)
        if g is not None:
            d_ref.append(row["distance"])
        if b is not None:
            d_null.append(row["distance_null"])
    if not d_ref:
        return missing("no face with a mesh detected in any image generated with a reference expression "
                       "(the expression descriptor needs the MediaPipe face mesh)", n, lower_is_better=True,
                       per_face=per_face)
    return value(float(np.mean(d_ref)), len(d_ref), lower_is_better=True, generated=n,
                 null_expression=float(np.mean(d_null)) if d_null else None, per_face=per_face,
                 units="RMS over the mesh-descriptor terms, training-set standardised",
                 protocol="face i with face i+1's expression; first prompt, first seed")


def _mesh_expression(kit: ReferenceKit, faces) -> list[np.ndarray]:
    """The expression stage's mesh descriptor of reference faces (their MediaPipe mesh)."""
    out = []
    for f in faces:
        if getattr(f, "mesh", None) is None:
            raise ValueError(f"reference {f.path}: the detector gave no face mesh (the expression descriptor needs "
                             "MediaPipe's: align.detector mediapipe)")
        out.append(expr_model.descriptor(f.mesh))
    return out


register_member(EXPR_MEMBER, _mesh_expression)
METHOD = methods.register(Face2Diffusion())
