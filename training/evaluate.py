"""Evaluate an adapter on held-out identities: generate, score, compare with a real-photo control.

Evaluation set: the labeled faces of the shards' `split` (default val; identity-disjoint from
training), identities sorted by name, at most `max_identities`, the first `faces_per_identity`
faces (by key) of each, read with the one shard reader (`pipeline.shard_reader`); or, when the
adapter names its evaluation faces (adapter.json `phase_record.evaluation_faces`, e.g. a
per-identity fine-tune's held-out photos of its identity), exactly those faces, from any split.
lambda (`scale`) unset: the adapter's default (adapter.json `scale`, set by its method). Any method:
a face's conditioner inputs are the method's `inputs(references)` of its shard members (the face
itself, or its first `references` faces of the same identity), its reference image `face.jpg`.
Each face x each prompt x `num_images` seeds is generated with the adapter (the `generate` code
path: diffusers pipeline, scheduler, CFG, lambda, delay; batched). The evaluation-set id hashes the
faces, their conditioner inputs, the protocol (prompts, seeds, scheduler, steps, guidance, lambda,
delay, size, references) and the scoring models, so two results are comparable exactly when their
ids are equal (the registry's promotion gate checks this).

Output paths may hold "{method}" (filled with the adapter's method). Generated images go to
`images_out/<identity slug>/<key slug>-pNN-seedS.png`: identities and keys come from shard
metadata, so they are made into safe file names (`slug`) and every path is checked to stay inside
`images_out` (`contained`).

Metrics (every entry is {"value": number | null, "n": count, ...}; one that cannot be computed has
"value": null and "missing": "<reason>", never a made-up number):
  identity_similarity           ArcFace cosine(reference, generated), 0 where no face is detected
                                in the generated image (as the papers do); mean over images
  identity_similarity_detected  the same over the images with a detected face only
  face_detection_rate           fraction of generated images with a detected face
  clip_t                        CLIP cosine(image, prompt) (needs `clip_model`, a local CLIP folder)
  lpips                         LPIPS(reference face, generated image), lower = closer (needs
                                `lpips_backbone`: torchvision alexnet / vgg16 / squeezenet1_1
                                ImageNet state_dict; the LPIPS linear heads ship with torchmetrics)
  fid                           Frechet distance between Inception-v3 pool features of the reference
                                faces and the generated images (needs `fid_inception`: torchvision
                                inception_v3 ImageNet state_dict; not comparable with published FIDs,
                                which use the TF Inception, and unreliable for small n)
  <method's own>                what `Method.extra_metrics(images, samples, references)` adds (e.g.
                                the Identity Encoder's generation_diversity)
  control_same_identity         the CONTROL: ArcFace cosine between two real photos of the same
  control_different_identity    person / of different people, over the shards' labeled faces of
                                all splits: what "same person" looks like to this ArcFace

Methods: the model sees `Method.prompt(prompt, adapter)` of each evaluation prompt (e.g. with the
method's identifier word; recorded per sample as `model_prompt` when it differs, and part of the
evaluation-set id then); CLIP-T scores the prompt as written. `Method.evaluation_metrics(EvalRun)`
adds method-specific metrics (same {"value", "n", "missing"} form) beside the generic ones.

Reference embeddings: ArcFace of `face.jpg` aligned with the shard's `landmarks_aligned`; the
shard's `id.npy` when those landmarks are unusable. Generated images: the largest detected face
with real landmarks (`training.references.largest_face`, params `align.detector`), ArcFace-aligned
from its 5 landmarks.

Outputs: `metrics_out` (the DVC metrics: numbers only, `{"<metric>": value}` for each metric that has
one, so revisions and experiments compare), `report_out` (the full report: adapter, evaluation set,
every metric with its count or the reason it is missing, control details, scorers, per-image samples,
warnings), `grid_out` (reference | generated per prompt, one row per face), the images under
`images_out`, and MLflow: the metrics `eval.<name>`, tags and the files, logged to the adapter's
training run (adapter.json mlflow.run_id) when it exists on the tracking server, else to a new run;
when the adapter's MLflow model (adapter.json mlflow.model_id) is there, the metrics are the model's
(MLflow 3 model metrics), and the evaluation set is the run's dataset input (context `evaluation`,
digest = the evaluation-set id) the metrics refer to. With random weights anywhere (the tiny demo model, a random e4e) the
results say `weights_real: false` and carry a warning: identity similarity 0 and detection rate 0
are then the honest values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np

from pipeline.config import ConfigError, Params
from pipeline.devices import resolve_device
from training.sections import section_config
from training.references import largest_face

log = logging.getLogger("persona.evaluate")

FORMAT = "persona-evaluate/1"
DEFAULT_PROMPTS = [
    "a photo of a face",
    "a close-up photo of a person smiling",
    "a portrait of a person wearing sunglasses on a beach",
]
LPIPS_TV_MODELS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
RANDOM_WARNING = ("RANDOM WEIGHTS in {names}: these numbers measure nothing about identity preservation "
                  "(the tiny demo model draws no faces, so similarity 0 and detection 0 are the honest values)")


# ============================================================================================
# config (`evaluate:` section)


@dataclass
class ControlConfig:
    enabled: bool = True
    max_identities: int = 100  # labeled identities read for the control (sorted by name)
    max_faces_per_identity: int = 8


@dataclass
class EvalMlflowConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # null -> $MLFLOW_TRACKING_URI, else adapter.json's, else sqlite:///mlruns.db
    experiment: Optional[str] = None  # for a new run; null -> adapter.json's experiment, else persona-eval
    artifact_location: str = "mlartifacts"  # artifact root of a NEW experiment on a local store


@dataclass
class EvaluateConfig:
    adapter: Optional[str] = None  # folder with adapter.json, or models:/<name>@<alias> (wins over `adapters`)
    adapters: dict[str, str] = field(default_factory=dict)  # method -> its adapter (`persona evaluate --method M`; DVC foreach)
    shards: str = "data/shards"
    split: str = "val"
    max_identities: int = 8
    faces_per_identity: int = 1
    references: int = 1  # faces of the identity given to the method as references (the evaluated face first)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    num_images: int = 1  # seeds per face x prompt
    seed: int = 0
    scheduler: Literal["ddim", "euler_a", "dpm++"] = "ddim"
    steps: int = 25
    guidance: float = 7.5
    scale: Optional[float] = None  # lambda; null -> the adapter's default (adapter.json scale, set by its method)
    delay_steps: int = 0
    negative_prompt: str = ""
    resolution: Optional[int] = None  # null -> the adapter's training resolution (else the UNet's native size)
    batch_size: int = 4  # images per sampling batch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    clip_model: Optional[str] = None  # local CLIP folder (CLIPModel + CLIPProcessor), e.g. ViT-L/14
    lpips_backbone: Optional[str] = None  # torchvision ImageNet state_dict of the lpips_net backbone
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    fid_inception: Optional[str] = None  # torchvision inception_v3 ImageNet state_dict
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics_out: str = "metrics/evaluate_{method}.json"  # DVC metrics: numbers only
    report_out: str = "eval/{method}/report.json"  # the full report (samples, reasons, warnings)
    grid_out: str = "plots/evaluate_{method}_grid.png"
    images_out: str = "eval/{method}/images"
    grid_tile: int = 128
    mlflow: EvalMlflowConfig = field(default_factory=EvalMlflowConfig)


def evaluate_config(params: Params | Mapping[str, Any] | None = None, overrides: Optional[Mapping[str, Any]] = None) -> EvaluateConfig:
    """Validate the `evaluate:` section (Params, raw dict or None) with top-level key overrides."""
    cfg = section_config(EvaluateConfig, params, "evaluate", overrides)
    if not cfg.prompts:
        raise ConfigError("evaluate.prompts: give at least one prompt")
    for k in ("max_identities", "faces_per_identity", "references", "num_images", "steps", "batch_size", "grid_tile"):
        if getattr(cfg, k) < 1:
            raise ConfigError(f"evaluate.{k} must be >= 1")
    if cfg.delay_steps < 0:
        raise ConfigError("evaluate.delay_steps must be >= 0")
    return cfg


def adapter_for(cfg: EvaluateConfig, method: Optional[str] = None) -> str:
    """The adapter to evaluate: `adapter`, else `adapters[method]` (or the only entry of `adapters`)."""
    if cfg.adapter:
        return cfg.adapter
    if method is not None:
        if method not in cfg.adapters:
            raise ConfigError(f"evaluate.adapters has no entry for method '{method}' (has: {sorted(cfg.adapters)})")
        return cfg.adapters[method]
    if len(cfg.adapters) == 1:
        return next(iter(cfg.adapters.values()))
    raise ConfigError("evaluate: give --adapter, or --method M with evaluate.adapters[M]")


def for_method(cfg: EvaluateConfig, method: str) -> EvaluateConfig:
    """The config with "{method}" filled in in its output paths."""
    import dataclasses

    return dataclasses.replace(cfg, **{k: getattr(cfg, k).replace("{method}", method)
                                       for k in ("metrics_out", "report_out", "grid_out", "images_out")})


# ============================================================================================
# file names from shard metadata


def slug(text: str, max_len: int = 64) -> str:
    """A safe single path component for an identity or key from shard metadata: [A-Za-z0-9._-]
    only, no leading dot; when anything had to change (or it is too long), a short hash of the
    original is appended so different names never collide."""
    import re

    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).lstrip("._")[:max_len]
    if s != str(text) or not s:
        s = f"{s or 'x'}-{hashlib.sha256(str(text).encode()).hexdigest()[:8]}"
    return s


def contained(root: Path, *parts: str) -> Path:
    """root / parts, refused (ValueError) unless it stays inside root."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"refusing to write {path}: outside the output folder {base}")
    return path


# ============================================================================================
# metric values


def value(v: float, n: int, **extra: Any) -> dict:
    return {"value": float(v), "n": int(n), **extra}


def missing(reason: str, n: int = 0, **extra: Any) -> dict:
    return {"value": None, "missing": reason, "n": int(n), **extra}


def numeric_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The metrics that have a finite value (what the DVC metrics file holds)."""
    out = {}
    for k, m in metrics.items():
        v = m.get("value")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


# ============================================================================================
# faces: detection + ArcFace


def usable_lm5(lm5: Any, min_eye_distance: float = 4.0) -> Optional[np.ndarray]:
    """(5, 2) landmarks whose eyes are at least `min_eye_distance` px apart, else None."""
    try:
        a = np.asarray(lm5, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.shape != (5, 2) or not np.all(np.isfinite(a)):
        return None
    return a if float(np.hypot(*(a[1] - a[0]))) >= min_eye_distance else None


class FaceScorer:
    """Detector (params.align) + ArcFace (params.identity): images -> unit embeddings or None."""

    def __init__(self, detector: Any, arcface: Any):
        self.detector = detector
        self.arcface = arcface

    @classmethod
    def load(cls, params: Params) -> "FaceScorer":
        from pipeline.models import faces, identity

        return cls(faces.load(params.align), identity.load(params.identity))

    def close(self) -> None:
        for m in (self.detector, self.arcface):
            close = getattr(m, "close", None)
            if close:
                close()

    @property
    def models(self) -> dict:
        return {"detector": self.detector.info.as_dict(), "arcface": self.arcface.info.as_dict()}

    def embed_aligned(self, images: Sequence[np.ndarray], lm5s: Sequence[np.ndarray]) -> np.ndarray:
        """Images with known 5-point landmarks -> (N, 512) unit embeddings."""
        from pipeline.models.align import arcface_align

        crops = [arcface_align(np.ascontiguousarray(im[..., :3]), lm) for im, lm in zip(images, lm5s)]
        return self.arcface.embed(crops) if crops else np.zeros((0, 512), np.float32)

    def detect_embed(self, images: Sequence[np.ndarray]) -> list[Optional[np.ndarray]]:
        """Largest detected face of each image -> (512,) unit embedding, or None when no face."""
        out: list[Optional[np.ndarray]] = [None] * len(images)
        idx, crops_img, lms = [], [], []
        for i, im in enumerate(images):
            rgb = np.ascontiguousarray(im[..., :3]).astype(np.uint8)
            face = largest_face(self.detector.detect(rgb))
            lm = None if face is None else usable_lm5(face.lm5, 1.0)
            if lm is not None:
                idx.append(i)
                crops_img.append(rgb)
                lms.append(lm)
        if idx:
            embs = self.embed_aligned(crops_img, lms)
            for i, e in zip(idx, embs):
                out[i] = e
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


# ============================================================================================
# the control: real photo vs real photo


def identity_control(identities: Sequence[str], embeddings: np.ndarray, keys: Optional[Sequence[str]] = None,
                     with_pairs: bool = False) -> dict:
    """Cosine over all pairs of faces of the same identity vs pairs of different identities.

    identities: (N,) labels; embeddings: (N, D). Returns {"same_identity": metric,
    "different_identity": metric[, "pairs": [(id_a, id_b, key_a, key_b, cos), ...]]}; a side
    without pairs is missing (e.g. no identity with >= 2 faces).
    """
    ids = list(identities)
    e = np.asarray(embeddings, dtype=np.float64).reshape(len(ids), -1)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(ids))]
    if len(ids):
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sims = e @ e.T if len(ids) else np.zeros((0, 0))
    lab = np.asarray(ids, dtype=object)
    iu, ju = np.triu_indices(len(ids), k=1)
    same = lab[iu] == lab[ju] if len(iu) else np.zeros(0, bool)
    vals = sims[iu, ju] if len(iu) else np.zeros(0)
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for x in ids:
        counts[x] = counts.get(x, 0) + 1
    multi = sum(1 for c in counts.values() if c >= 2)
    for name, sel, why in (
        ("same_identity", same, "no identity has >= 2 faces"),
        ("different_identity", ~same, "fewer than 2 identities"),
    ):
        v = vals[sel]
        if v.size == 0:
            out[name] = missing(why, 0, identities=len(counts))
        else:
            out[name] = value(v.mean(), int(v.size), min=float(v.min()), max=float(v.max()), std=float(v.std()),
                              identities=multi if name == "same_identity" else len(counts))
    if with_pairs:
        out["pairs"] = [(ids[i], ids[j], keys[i], keys[j], float(sims[i, j])) for i, j in zip(iu, ju)]
    return out


def control_from_photos(photos: Mapping[str, Sequence[str | os.PathLike]], scorer: FaceScorer,
                        with_pairs: bool = True) -> dict:
    """The control on raw photos ({identity: [paths]}): the largest face of each photo is detected,
    ArcFace-aligned and embedded; photos without a face are listed under "no_face"."""
    from pipeline.images import load_rgb

    ids, keys, imgs = [], [], []
    for ident in sorted(photos):
        for p in photos[ident]:
            rgb, _ = load_rgb(p)
            ids.append(ident)
            keys.append(str(p))
            imgs.append(rgb)
    embs = scorer.detect_embed(imgs)
    keep = [i for i, e in enumerate(embs) if e is not None]
    out = identity_control([ids[i] for i in keep], np.stack([embs[i] for i in keep]) if keep else np.zeros((0, 512)),
                           [keys[i] for i in keep], with_pairs=with_pairs)
    out["no_face"] = [keys[i] for i, e in enumerate(embs) if e is None]
    return out


# ============================================================================================
# shards -> evaluation faces


@dataclass
class EvalFace:
    key: str
    identity: str
    face: np.ndarray  # aligned face (H, W, 3) uint8
    meta: dict
    sample: dict  # the decoded shard members read (the method's `needs`, face.jpg, id.npy, json)
    id_emb: Optional[np.ndarray] = None  # shard id.npy


def labeled_faces(shards: str | os.PathLike, splits: Sequence[str], max_identities: int, max_per_identity: int,
                  need: Sequence[str] = (), keys: Optional[Sequence[str]] = None) -> list[EvalFace]:
    """The first `max_per_identity` faces (by key) of the first `max_identities` identities (by
    name) among the faces holding `need` (+ face.jpg, json) (only those in `keys` when given), read
    with the one shard reader."""
    from pipeline.shard_reader import ShardIndex, shard_urls

    members = tuple(dict.fromkeys(("face.jpg", "json", *need)))
    by_id: dict[str, list[tuple[str, ShardIndex, int]]] = {}
    for split in splits:
        try:
            urls = shard_urls(shards, split)
        except ValueError:
            urls = []
        if not urls:
            continue
        index = ShardIndex(urls, members)
        for i in range(len(index)):
            if keys is not None and index.key(i) not in keys:
                continue
            ident = index.identity(i)
            if ident is not None:
                by_id.setdefault(ident, []).append((index.key(i), index, i))
    out = []
    for ident in sorted(by_id)[:max_identities]:
        for key, index, i in sorted(by_id[ident], key=lambda t: t[0])[:max_per_identity]:
            s = index.get(i, (*members, "id.npy"))
            face = s["face.jpg"]
            if face.ndim == 2:
                face = np.stack([face] * 3, -1)
            out.append(EvalFace(key=key, identity=ident, face=np.ascontiguousarray(face[..., :3]), meta=s["json"],
                                sample=s, id_emb=np.asarray(s["id.npy"], np.float32) if "id.npy" in s else None))
    return out


def reference_embeddings(faces: Sequence[EvalFace], scorer: FaceScorer) -> tuple[list[Optional[np.ndarray]], dict]:
    """ArcFace of each reference face: from `landmarks_aligned`, else the shard id.npy, else detection."""
    embs: list[Optional[np.ndarray]] = [None] * len(faces)
    src = {"landmarks_aligned": 0, "shard_id": 0, "detected": 0, "none": 0}
    with_lm = [(i, lm) for i, f in enumerate(faces) if (lm := usable_lm5(f.meta.get("landmarks_aligned"))) is not None]
    if with_lm:
        e = scorer.embed_aligned([faces[i].face for i, _ in with_lm], [lm for _, lm in with_lm])
        for (i, _), v in zip(with_lm, e):
            embs[i] = v
            src["landmarks_aligned"] += 1
    rest = [i for i, v in enumerate(embs) if v is None]
    need_detect = []
    for i in rest:
        if faces[i].id_emb is not None and np.linalg.norm(faces[i].id_emb) > 0:
            embs[i] = faces[i].id_emb / np.linalg.norm(faces[i].id_emb)
            src["shard_id"] += 1
        else:
            need_detect.append(i)
    if need_detect:
        for i, v in zip(need_detect, scorer.detect_embed([faces[i].face for i in need_detect])):
            embs[i] = v
            src["detected" if v is not None else "none"] += 1
    return embs, src


def control_from_shards(shards: str | os.PathLike, scorer: FaceScorer, cfg: ControlConfig) -> dict:
    faces = labeled_faces(shards, ("train", "val"), cfg.max_identities, cfg.max_faces_per_identity)
    embs, src = reference_embeddings(faces, scorer)
    keep = [i for i, e in enumerate(embs) if e is not None]
    out = identity_control([faces[i].identity for i in keep],
                           np.stack([embs[i] for i in keep]) if keep else np.zeros((0, 512)),
                           [faces[i].key for i in keep])
    out["embedding_sources"] = src
    out["faces"] = len(keep)
    return out


# ============================================================================================
# optional metrics: CLIP-T, LPIPS, FID


def _folder_fingerprint(path: Path) -> str:
    from pipeline.models.base import file_fingerprint, text_fingerprint

    if path.is_file():
        return file_fingerprint(path)
    return text_fingerprint(*[(p.relative_to(path).as_posix(), file_fingerprint(p)) for p in sorted(path.rglob("*")) if p.is_file()])


def clip_t(images: Sequence[np.ndarray], prompts: Sequence[str], folder: Optional[str], device: str = "auto",
           batch_size: int = 16) -> dict:
    """Mean CLIP cosine(image, prompt) with a local CLIP folder (missing without one)."""
    if not folder:
        return missing("no CLIP checkpoint configured (evaluate.clip_model: a local CLIP folder, e.g. ViT-L/14)")
    p = Path(folder)
    if not p.exists():
        return missing(f"CLIP folder {folder} does not exist")
    if not images:
        return missing("no generated images")
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    dev = resolve_device(device)
    model = CLIPModel.from_pretrained(str(p), local_files_only=True).to(dev).eval()
    proc = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
    sims = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            ims = [Image.fromarray(np.ascontiguousarray(im[..., :3])) for im in images[s:s + batch_size]]
            inp = proc(text=list(prompts[s:s + batch_size]), images=ims, return_tensors="pt", padding=True, truncation=True)
            inp = {k: v.to(dev) for k, v in inp.items()}
            out = model(**inp)
            ie = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            te = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            sims.append((ie * te).sum(-1).cpu())
    v = torch.cat(sims).numpy()
    return value(v.mean(), len(v), model=str(p), fingerprint=_folder_fingerprint(p))


def _to_tensor(images: Sequence[np.ndarray], size: int):
    """uint8 images -> (N, 3, size, size) float32 in [0, 1] (bilinear resize)."""
    import torch
    import torch.nn.functional as F

    ts = [torch.from_numpy(np.ascontiguousarray(im[..., :3])).permute(2, 0, 1).float()[None] / 255.0 for im in images]
    return torch.cat([F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True) for t in ts])


def load_lpips(backbone: str, net: str = "alex"):
    """LPIPS (torchmetrics' network and bundled linear heads) with the backbone read from a local
    torchvision state_dict (never downloaded)."""
    import torch
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    m = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
    tv = getattr(torchvision.models, LPIPS_TV_MODELS[net])(weights=None)
    tv.load_state_dict(torch.load(backbone, map_location="cpu", weights_only=True))
    feats = tv.features
    # torchmetrics keeps the backbone's `features[i]` modules, named str(i), in slice1..N (alex, vgg)
    # or in the ModuleList `slices` (squeeze)
    slices = [c for n, c in m.net.named_children() if n.startswith("slice") and n[5:].isdigit()] + list(getattr(m.net, "slices", []))
    loaded = 0
    for sl in slices:
        for idx, sub in sl.named_children():
            sub.load_state_dict(feats[int(idx)].state_dict())
            loaded += sum(1 for _ in sub.parameters())
    if loaded == 0:
        raise RuntimeError(f"LPIPS {net}: found no backbone layers to load (torchmetrics layout changed?)")
    return m.eval()


def lpips_metric(refs: Sequence[np.ndarray], gens: Sequence[np.ndarray], backbone: Optional[str], net: str = "alex",
                 device: str = "auto", size: int = 224) -> dict:
    """Mean LPIPS(reference, generated) (lower = more similar); missing without a backbone file."""
    if not backbone:
        return missing(f"no LPIPS backbone configured (evaluate.lpips_backbone: torchvision {LPIPS_TV_MODELS[net]} "
                       "ImageNet state_dict; downloads are not allowed)", lower_is_better=True)
    if not Path(backbone).is_file():
        return missing(f"LPIPS backbone {backbone} does not exist", lower_is_better=True)
    if not gens:
        return missing("no generated images", lower_is_better=True)
    import torch

    dev = resolve_device(device)
    m = load_lpips(backbone, net).to(dev)
    with torch.no_grad():
        d = m(_to_tensor(refs, size).to(dev) * 2 - 1, _to_tensor(gens, size).to(dev) * 2 - 1).flatten().cpu().numpy()
    return value(d.mean(), len(d), lower_is_better=True, net=net, fingerprint=_folder_fingerprint(Path(backbone)))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    lam, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(lam, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017).

    Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))) (a symmetric PSD matrix: eigh, stable for
    the singular covariances of small samples, unlike a general matrix square root).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid_from_features(fa: np.ndarray, fb: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to feature sets (Na, D) and (Nb, D) (unbiased
    covariances). With fewer samples than dimensions it works in sample space: Tr (S1 S2)^(1/2) is
    the sum of the singular values of Xa Xb^T / sqrt((Na - 1)(Nb - 1)), X the centred features
    (the nonzero eigenvalues of S1 S2 are those of A A^T) - exact, and O(N^2 D) instead of O(D^3)."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    na, nb, d = len(fa), len(fb), fa.shape[1]
    if na < 2 or nb < 2:
        raise ValueError("fid_from_features: need >= 2 samples per side")
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    if min(na, nb) > d:
        return frechet_distance(mu_a, np.cov(fa, rowvar=False), mu_b, np.cov(fb, rowvar=False))
    xa, xb = fa - mu_a, fb - mu_b
    tr_a, tr_b = float((xa ** 2).sum() / (na - 1)), float((xb ** 2).sum() / (nb - 1))
    tr_sqrt = float(np.linalg.svd(xa @ xb.T / np.sqrt((na - 1) * (nb - 1)), compute_uv=False).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + tr_a + tr_b - 2 * tr_sqrt)


def load_inception(weights: str, device: str = "auto"):
    """torchvision Inception-v3 from a local ImageNet state_dict, fc removed: (N, 3, 299, 299) -> (N, 2048)."""
    import torch
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.fc = torch.nn.Identity()
    return net.to(resolve_device(device)).eval()


def inception_features(images: Sequence[np.ndarray], net: Any, batch_size: int = 16) -> np.ndarray:
    """(N, 2048) float64 pool features (inputs resized to 299, ImageNet-normalised)."""
    import torch

    dev = next(net.parameters()).device
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = (_to_tensor(images[s:s + batch_size], 299).to(dev) - mean) / std
            out.append(net(x).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def fid_metric(refs: Sequence[np.ndarray], gens: Sequence[np.ndarray], weights: Optional[str], device: str = "auto") -> dict:
    if not weights:
        return missing("no Inception weights configured (evaluate.fid_inception: torchvision inception_v3 "
                       "ImageNet state_dict; downloads are not allowed)", lower_is_better=True)
    if not Path(weights).is_file():
        return missing(f"Inception weights file {weights} does not exist", lower_is_better=True)
    if len(refs) < 2 or len(gens) < 2:
        return missing(f"FID needs >= 2 images per side (have {len(refs)} references, {len(gens)} generated)",
                       lower_is_better=True)
    net = load_inception(weights, device)
    d = fid_from_features(inception_features(refs, net), inception_features(gens, net))
    return value(d, len(gens), references=len(refs), lower_is_better=True, fingerprint=_folder_fingerprint(Path(weights)),
                 note="torchvision Inception-v3; small n: indicative only")


# ============================================================================================
# grid


def comparison_grid(rows: Sequence[tuple[str, np.ndarray, Sequence[tuple[np.ndarray, str]]]], prompts: Sequence[str],
                    tile: int = 128) -> np.ndarray:
    """Rows (label, reference, [(generated, caption), ...]) -> uint8 grid: reference | one column per image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    ncol = 1 + max((len(g) for _, _, g in rows), default=0)
    head, cap = 28, 14
    canvas = Image.new("RGB", (ncol * tile, head + len(rows) * (tile + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ["reference"] + [p for p in prompts]
    per_prompt = max(1, (ncol - 1) // max(1, len(prompts)))
    for c in range(ncol):
        t = titles[0] if c == 0 else titles[1 + min((c - 1) // per_prompt, len(prompts) - 1)]
        for j, line in enumerate(textwrap.wrap(t, max(4, tile // 6))[:2]):
            draw.text((c * tile + 2, 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    for r, (label, ref, gens) in enumerate(rows):
        y = head + r * (tile + cap)
        for c, (img, caption) in enumerate([(ref, label)] + list(gens)):
            im = Image.fromarray(np.ascontiguousarray(img[..., :3])).resize((tile, tile), Image.Resampling.BICUBIC)
            canvas.paste(im, (c * tile, y))
            draw.text((c * tile + 2, y + tile + 1), caption[: tile // 6], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


# ============================================================================================
# MLflow


def eval_dataset(results: Mapping[str, Any]):
    """The evaluation set as an MLflow dataset (metadata): name `eval-set`, digest its id, source the shards."""
    from training.tracking import DIGEST_LEN, shards_dataset

    es = results["eval_set"]
    ds = shards_dataset(es["shards"], "none", {}, ())
    ds._name, ds._digest = "eval-set", str(es["id"])[:DIGEST_LEN]
    return ds


def logged_model(client, model_id: Optional[str]):
    """The logged model `model_id` on the client's server, or None (absent, deleted, or no id)."""
    from mlflow.exceptions import MlflowException

    if not model_id:
        return None
    try:
        return client.get_logged_model(model_id)
    except MlflowException:
        return None


def log_metrics_on(client, run_id: str, values: Mapping[str, float], step: int, *, model_id: Optional[str] = None,
                   results: Optional[Mapping[str, Any]] = None, prefix: str = "eval.") -> None:
    """`prefix<name>` = value on run `run_id` (and on its logged model `model_id`: MLflow 3 model metrics),
    for the evaluation set of `results` (logged as the run's dataset input, context `evaluation`)."""
    from mlflow.entities import DatasetInput, InputTag, Metric

    ts = int(time.time() * 1000)
    ds = None
    if results is not None:
        ds = eval_dataset(results)
        client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[
            InputTag("mlflow.data.context", "evaluation")])])
    client.log_batch(run_id, metrics=[
        Metric(f"{prefix}{k}", float(v), ts, int(step), model_id=model_id, dataset_name=ds.name if ds else None,
               dataset_digest=ds.digest if ds else None) for k, v in values.items()])


def log_to_mlflow(results: dict, files: Sequence[Path], cfg: EvalMlflowConfig, adapter_meta: Mapping[str, Any]) -> dict:
    """Log `eval.<metric>` values (on the adapter's MLflow model when it is there), tags and `files`
    to the adapter's run (or a new run)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    ml = adapter_meta.get("mlflow") or {}
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ml.get("tracking_uri") or "sqlite:///mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    run_id, new = ml.get("run_id"), False
    try:
        if not run_id or client.get_run(run_id).info.lifecycle_stage == "deleted":
            run_id = None
    except MlflowException:
        run_id = None
    model = logged_model(client, ml.get("model_id")) if run_id else None
    if run_id is None:
        name = cfg.experiment or ml.get("experiment") or "persona-eval"
        exp = client.get_experiment_by_name(name)
        remote = uri.split(":", 1)[0] in ("http", "https", "databricks")
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=None if remote else str(Path(cfg.artifact_location).resolve()))
        run_id = client.create_run(exp_id, run_name="evaluate", tags={"persona.kind": "evaluate"}).info.run_id
        new = True
    step = int(adapter_meta.get("global_step") or 0)
    log_metrics_on(client, run_id, numeric_metrics(results["metrics"]), step,
                   model_id=model.model_id if model is not None else None, results=results)
    tags = [RunTag("eval.set", results["eval_set"]["id"]), RunTag("eval.weights_real", str(results["weights_real"]).lower()),
            RunTag("eval.adapter_sha256", results["adapter"]["sha256"])]
    tags += [RunTag(f"eval.missing.{k}", str(m["missing"])[:4000]) for k, m in results["metrics"].items() if m.get("value") is None]
    if not results["weights_real"]:
        tags.append(RunTag("eval.warning", results.get("warning", "random weights")[:4000]))
    client.log_batch(run_id, tags=tags)
    for f in files:
        if Path(f).is_file():
            client.log_artifact(run_id, str(f), "evaluation")
    if new:
        client.set_terminated(run_id)
    return {"tracking_uri": uri, "run_id": run_id, "new_run": new, "model_id": model.model_id if model else None}


# ============================================================================================
# the evaluation


@dataclass
class EvalRun:
    """What a method's `evaluation_metrics` hook sees of an evaluation (scorer still open)."""

    cfg: EvaluateConfig
    generator: Any  # training.generate.Generator (its .adapter, .method)
    faces: list  # [EvalFace]
    inputs: list  # conditioner inputs per face (Method.inputs of its references)
    jobs: list  # (face index, prompt index, seed) per generated image
    images: list  # generated (H, W, 3) uint8 images, one per job
    prompts: list  # the prompts the model saw (Method.prompt of cfg.prompts)
    scorer: Any  # FaceScorer (.detector, .arcface) or a stand-in
    size: int

    def generate(self, conditionings: Sequence[Mapping[str, np.ndarray]], prompts: Sequence[str],
                 seeds: Sequence[int]) -> list[np.ndarray]:
        """One image per (conditioner inputs, model prompt, seed) with the evaluation's sampler
        settings, in batches of cfg.batch_size."""
        c, out = self.cfg, []
        for s in range(0, len(prompts), c.batch_size):
            sl = slice(s, s + c.batch_size)
            out.extend(self.generator.sample([[inp] for inp in conditionings[sl]], list(prompts[sl]), list(seeds[sl]),
                                             scheduler=c.scheduler, negative_prompt=c.negative_prompt, steps=c.steps,
                                             guidance=c.guidance, scale=c.scale, delay_steps=c.delay_steps,
                                             height=self.size, width=self.size))
        return out


def eval_set_id(faces: Sequence[EvalFace], inputs: Sequence[Mapping[str, np.ndarray]], cfg: EvaluateConfig, size: int,
                scorer_models: Mapping[str, Any], model_prompts: Optional[Sequence[str]] = None) -> str:
    """Hash of the faces, their conditioner inputs, the protocol (with the prompts the model saw,
    when the method rewrote them) and the scoring models."""
    h = hashlib.sha256()
    for f, inp in zip(faces, inputs):
        h.update(f"{f.key}\x00{f.identity}\x00".encode())
        for name in sorted(inp):
            h.update(f"{name}\x00".encode() + np.ascontiguousarray(inp[name], dtype=np.float32).tobytes())
    proto = {"split": cfg.split, "prompts": list(cfg.prompts), "num_images": cfg.num_images, "seed": cfg.seed,
             "scheduler": cfg.scheduler, "steps": cfg.steps, "guidance": cfg.guidance, "scale": cfg.scale,
             "delay_steps": cfg.delay_steps, "negative_prompt": cfg.negative_prompt, "size": size,
             "references": cfg.references, "scorers": {k: v.get("fingerprint") for k, v in scorer_models.items()}}
    if model_prompts is not None and list(model_prompts) != list(cfg.prompts):
        proto["model_prompts"] = list(model_prompts)
    h.update(json.dumps(proto, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def evaluate(
    cfg: EvaluateConfig,
    params: Optional[Params] = None,
    *,
    generator: Any = None,
    scorer: Optional[FaceScorer] = None,
    log_mlflow: Optional[bool] = None,
    face_keys: Optional[Sequence[str]] = None,
    method_metrics: bool = True,
) -> dict:
    """Run the evaluation; writes metrics_out, grid_out, images; logs to MLflow. Returns the results.

    `face_keys`: score exactly these face keys of `cfg.split` (still at most max_identities x
    faces_per_identity), whatever faces the adapter names (`persona compare` scores every method on
    one set). `method_metrics` False skips the method's own metrics (`extra_metrics`,
    `evaluation_metrics`), e.g. for the points of a lambda sweep."""
    from pipeline.images import encode_png
    from training.generate import Generator

    t0 = time.perf_counter()
    params = params or Params()
    gen = generator or Generator.load(adapter_for(cfg), device=cfg.device, dtype=cfg.dtype)
    method = gen.method
    cfg = for_method(cfg, method.name)
    if cfg.scale is None:
        cfg = dataclasses.replace(cfg, scale=gen.default_scale)
    size = int(cfg.resolution or gen.default_size)
    # an adapter may name the faces it is scored on (`Phase.record` "evaluation_faces", e.g. a
    # per-identity fine-tune: its identity's held-out photos), from any split
    only = (gen.resolved.meta.get("phase_record") or {}).get("evaluation_faces")
    if face_keys is not None:
        loaded = labeled_faces(cfg.shards, (cfg.split,), cfg.max_identities, max(cfg.faces_per_identity, cfg.references),
                               need=method.needs, keys=set(face_keys))
        per_identity = cfg.faces_per_identity
    elif only:
        cfg = dataclasses.replace(cfg, split="adapter:evaluation_faces")
        loaded = labeled_faces(cfg.shards, ("train", "val"), len(only), len(only), need=method.needs, keys=set(only))
        per_identity = len(only)
    else:
        loaded = labeled_faces(cfg.shards, (cfg.split,), cfg.max_identities, max(cfg.faces_per_identity, cfg.references),
                               need=method.needs)
        per_identity = cfg.faces_per_identity
    if not loaded:
        raise RuntimeError(f"no labeled faces with {', '.join(method.needs) or 'faces'} in split '{cfg.split}' of {cfg.shards}"
                           + (f" among the adapter's evaluation faces {sorted(only)[:4]}" if only else ""))
    by_id: dict[str, list[EvalFace]] = {}
    for f in loaded:
        by_id.setdefault(f.identity, []).append(f)
    faces, inputs = [], []
    for ident, group in by_id.items():
        for j, f in enumerate(group[:per_identity]):
            refs = [f] + [g for g in group if g is not f][:cfg.references - 1]
            faces.append(f)
            inputs.append(method.inputs([r.sample for r in refs]))
    own_scorer = scorer is None
    scorer = scorer or FaceScorer.load(params)
    model_prompts = [method.prompt(p, gen.adapter) for p in cfg.prompts]
    try:
        ref_embs, ref_src = reference_embeddings(faces, scorer)
        jobs = [(fi, pi, cfg.seed + k) for fi in range(len(faces)) for pi in range(len(cfg.prompts)) for k in range(cfg.num_images)]
        run = EvalRun(cfg, gen, faces, inputs, jobs, [], model_prompts, scorer, size)
        images: list[np.ndarray] = run.generate([inputs[fi] for fi, _, _ in jobs], [model_prompts[pi] for _, pi, _ in jobs],
                                                [seed for _, _, seed in jobs])
        run.images = images
        gen_embs = scorer.detect_embed(images)
        run_metrics = dict(method.evaluation_metrics(run) or {}) if method_metrics else {}
        control = control_from_shards(cfg.shards, scorer, cfg.control) if cfg.control.enabled else None
        scorer_models = scorer.models
    finally:
        if own_scorer:
            scorer.close()

    img_dir = Path(cfg.images_out)
    samples, sims, sims_det = [], [], []
    for (fi, pi, seed), img, ge in zip(jobs, images, gen_embs):
        f, re = faces[fi], ref_embs[fi]
        sim = None if re is None else (0.0 if ge is None else cosine(re, ge))
        if sim is not None:
            sims.append(sim)
            if ge is not None:
                sims_det.append(sim)
        path = contained(img_dir, slug(f.identity), f"{slug(f.key)}-p{pi:02d}-seed{seed}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(img))
        samples.append({"identity": f.identity, "key": f.key, "prompt": cfg.prompts[pi], "prompt_index": pi, "seed": seed,
                        "file": str(path), "face_detected": ge is not None,
                        "identity_similarity": None if sim is None else round(sim, 6),
                        **({"model_prompt": model_prompts[pi]} if model_prompts[pi] != cfg.prompts[pi] else {})})
    n = len(images)
    detected = sum(1 for e in gen_embs if e is not None)
    no_ref = sum(1 for e in ref_embs if e is None)
    metrics: dict[str, dict] = {
        "identity_similarity": value(_mean(sims), len(sims), no_face_counts_as=0.0) if sims
        else missing("no reference face could be embedded", n),
        "identity_similarity_detected": value(_mean(sims_det), len(sims_det)) if sims_det
        else missing("no face detected in any generated image", n),
        "face_detection_rate": value(detected / n, n),
    }
    refs_per_image = [faces[fi].face for fi, _, _ in jobs]
    metrics["clip_t"] = clip_t(images, [cfg.prompts[pi] for _, pi, _ in jobs], cfg.clip_model, cfg.device)
    metrics["lpips"] = lpips_metric(refs_per_image, images, cfg.lpips_backbone, cfg.lpips_net, cfg.device)
    metrics["fid"] = fid_metric([f.face for f in faces], images, cfg.fid_inception, cfg.device)
    extra = method.extra_metrics(images, samples, refs_per_image) if method_metrics else {}
    clash = sorted(set(extra) & (set(metrics) | {"control_same_identity", "control_different_identity"}))
    if clash:
        raise ValueError(f"method '{method.name}': extra_metrics() redefines the evaluation's own metric(s) {clash}")
    metrics.update(extra)
    if control is not None:
        metrics["control_same_identity"] = control["same_identity"]
        metrics["control_different_identity"] = control["different_identity"]
    else:
        metrics["control_same_identity"] = missing("control disabled (evaluate.control.enabled)")
        metrics["control_different_identity"] = missing("control disabled (evaluate.control.enabled)")
    clash = sorted(set(run_metrics) & set(metrics))
    if clash:
        raise ValueError(f"method '{method.name}': evaluation_metrics() returned metric name(s) the evaluation "
                         f"or extra_metrics() already has: {clash}")
    metrics.update(run_metrics)

    weights = dict(gen.weights_real)
    for name, info in scorer_models.items():
        weights[f"scorer.{name}"] = bool(info.get("weights_real"))
    for f in faces:  # the models that made the shard members (a model counts as real only if every face says so)
        for stage, m in (f.meta.get("models") or {}).items():
            if m:
                weights[f"shards.{stage}"] = weights.get(f"shards.{stage}", True) and bool(m.get("weights_real"))
    random_names = sorted(k for k, v in weights.items() if not v)
    real = not random_names

    eid = eval_set_id(faces, inputs, cfg, size, scorer_models, model_prompts)
    results = {
        "format": FORMAT,
        "weights_real": real,
        "random_weights": random_names,
        "method": method.name,
        "adapter": gen.resolved.as_record(),
        "base_model": gen.base,
        "eval_set": {"id": eid, "shards": str(cfg.shards), "split": cfg.split, "identities": sorted({f.identity for f in faces}),
                     "faces": [f.key for f in faces], "prompts": list(cfg.prompts), "num_images": cfg.num_images,
                     "seed": cfg.seed, "scheduler": cfg.scheduler, "steps": cfg.steps, "guidance": cfg.guidance,
                     "lambda": cfg.scale, "delay_steps": cfg.delay_steps, "negative_prompt": cfg.negative_prompt,
                     "size": size, "references": cfg.references},
        "metrics": metrics,
        "control": None if control is None else {k: v for k, v in control.items() if k not in ("same_identity", "different_identity")},
        "reference_embeddings": {**ref_src, "unembedded": no_ref},
        "scorers": scorer_models,
        "samples": samples,
        "seconds": None,
    }
    if not real:
        results["warning"] = RANDOM_WARNING.format(names=", ".join(random_names))
        log.warning("!!! %s !!!", results["warning"])

    rows = []
    for fi, f in enumerate(faces):
        gens = [(img, f"{'' if s['identity_similarity'] is None else format(s['identity_similarity'], '.2f')}"
                 f"{'' if s['face_detected'] else ' no face'}")
                for (fj, _, _), img, s in zip(jobs, images, samples) if fj == fi]
        rows.append((f.identity, f.face, gens))
    grid_path = Path(cfg.grid_out)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    grid_path.write_bytes(encode_png(comparison_grid(rows, cfg.prompts, cfg.grid_tile)))
    results["grid"] = str(grid_path)
    results["seconds"] = round(time.perf_counter() - t0, 3)
    out, report = Path(cfg.metrics_out), Path(cfg.report_out)
    results["metrics_file"], results["report_file"] = str(out), str(report)
    for p in (out, report):
        p.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(numeric_metrics(metrics), indent=2, sort_keys=True) + "\n")
    report.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))

    do_log = cfg.mlflow.enabled if log_mlflow is None else log_mlflow
    if do_log:
        results["mlflow"] = log_to_mlflow(results, [report, out, grid_path], cfg.mlflow, gen.resolved.meta)
        report.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    return results


def summary(results: Mapping[str, Any]) -> str:
    """Human-readable metric table."""
    lines = [f"evaluation set {results['eval_set']['id']} ({len(results['eval_set']['faces'])} faces x "
             f"{len(results['eval_set']['prompts'])} prompts x {results['eval_set']['num_images']} seeds)"]
    for k, m in results["metrics"].items():
        v = "null" if m.get("value") is None else f"{m['value']:.4f}"
        lines.append(f"  {k:30s} {v:>8s}  n={m.get('n', 0)}" + (f"  missing: {m['missing']}" if m.get("value") is None else ""))
    if not results.get("weights_real"):
        lines.append(f"  WARNING: {results.get('warning')}")
    return "\n".join(lines)
