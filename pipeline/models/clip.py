"""CLIP image embeddings of style images: one or several CLIP vision encoders, concatenated.

A **style image** is a photo with its face region replaced by grey (`style_image`: the face mask,
255 = face, blends each pixel towards `fill`), so its embedding carries the person's clothes, pose,
background and style but not the face.

`ClipStyleEncoder(cfg)` loads each folder of `cfg.models` as a transformers
`CLIPVisionModelWithProjection` (the folder `save_pretrained` writes: config.json + weights, plus
`preprocessor_config.json` when present; else a `CLIPImageProcessor` at the model's image size with
the OpenAI CLIP mean / std). `embed(images)` runs every model on the same images and concatenates
their projected image embeddings (`image_embeds`), each L2-normalised first when `cfg.normalize`
(so every model weighs the same, whatever its width): (N, sum of projection dims) float32.
FaceStudio (Hybrid guidance) concatenates CLIP ViT-L/14, RN101 and ViT-B/32; transformers' CLIP
is ViT-only, so the list takes any ViT CLIP folders (ViT-L/14: 768, ViT-B/32: 512, ViT-B/16: 512).

No CLIP weights exist offline: with `models: []` the encoder is one tiny CLIP vision model with
random weights built from `TINY_CONFIG` (seeded by `random_seed`), loudly tagged `weights_real:
false`. The fingerprint hashes the weights themselves: the weight files of a folder, the tensors of
the random model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from pipeline.models.base import ModelInfo, announce, file_fingerprint, text_fingerprint

log = logging.getLogger("persona.models.clip")

CLIP_LICENSE = "MIT (OpenAI CLIP) or the checkpoint's own"
# the tiny random CLIP vision model of the demo and the tests (no CLIP weights exist offline)
TINY_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8, "projection_dim": 16}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class ClipImageConfig:
    """params `clip_image:` the CLIP image embedding of each face's style image."""

    models: list[str] = field(default_factory=list)  # local CLIPVisionModelWithProjection folders; [] = tiny random
    random_seed: int = 0  # seed of the tiny random model (models: [])
    fill: int = 127  # grey level the face region is replaced by in the style image
    normalize: bool = True  # L2-normalise each model's embedding before concatenating
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 16
    num_gpus: float = 0.0


def style_image(rgb: np.ndarray, face_mask: np.ndarray, fill: int = 127) -> np.ndarray:
    """HxWx3 uint8 photo + HxW uint8 face mask (255 = face, soft edges) -> the photo with the face
    replaced by grey `fill`: out = rgb * (1 - m) + fill * m, m = mask / 255 (rounded, uint8)."""
    rgb = np.asarray(rgb)
    m = np.asarray(face_mask, dtype=np.float32)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"face mask {m.shape} does not match the image {rgb.shape[:2]}")
    m = (m / 255.0)[..., None]
    out = rgb.astype(np.float32) * (1.0 - m) + float(fill) * m
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def wild_style(rgb: np.ndarray, face: Any, scale: float, size: int, erode_at_1024: int, blur_at_1024: int,
               fill: int = 127) -> np.ndarray:
    """A photo's face (`.lm5`, `.mesh` or None) -> its style image as the stages make it: the
    in-the-wild crop (`align.wild_crop`, side `scale` x the FFHQ quad, `size` px) with the face mask
    (hull of the mesh, or the quad ellipse; eroded, blurred: `masks.hull_mask`) greyed out."""
    from pipeline.models import align as geom
    from pipeline.models.instances import crop_matrix
    from pipeline.models.masks import hull_mask, quad_ellipse_points

    quad = geom.ffhq_quad(np.asarray(face.lm5, dtype=np.float64))
    crop, _ = geom.wild_crop(rgb, quad, scale, size)
    pts = np.asarray(face.mesh, dtype=np.float64) if getattr(face, "mesh", None) is not None else quad_ellipse_points(quad)
    mask = hull_mask(geom.apply_matrix(crop_matrix(quad, scale, size), pts), size, erode_at_1024, blur_at_1024)
    return style_image(crop, mask, fill)


def photo_style(rgb: np.ndarray, faces: Sequence[Any], scale: float, size: int, erode_at_1024: int,
                blur_at_1024: int, fill: int = 127) -> np.ndarray:
    """A whole photo with EVERY face greyed out (each face's crop mask as in `wild_style`, warped
    back to the photo): the style image of a content or style photo."""
    import cv2

    from pipeline.models import align as geom
    from pipeline.models.instances import crop_matrix
    from pipeline.models.masks import hull_mask, quad_ellipse_points

    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    for f in faces:
        if getattr(f, "lm5", None) is None:
            continue
        quad = geom.ffhq_quad(np.asarray(f.lm5, dtype=np.float64))
        m = crop_matrix(quad, scale, size)
        pts = np.asarray(f.mesh, dtype=np.float64) if getattr(f, "mesh", None) is not None else quad_ellipse_points(quad)
        crop_mask = hull_mask(geom.apply_matrix(m, pts), size, erode_at_1024, blur_at_1024)
        back = cv2.warpAffine(crop_mask, np.linalg.inv(m)[:2], (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask = np.maximum(mask, back)
    return style_image(rgb, mask, fill)


def folder_fingerprint(folder: str | Path) -> str:
    """Fingerprint of a CLIP folder: its config and weight files (by content)."""
    p = Path(folder)
    parts = [(n, file_fingerprint(p / n)) for n in ("config.json", *WEIGHT_FILES) if (p / n).is_file()]
    shards = sorted(p.glob("model-*.safetensors")) + sorted(p.glob("pytorch_model-*.bin"))
    parts += [(s.name, file_fingerprint(s)) for s in shards]
    if not any(n != "config.json" for n, _ in parts):
        raise FileNotFoundError(f"CLIP folder {p}: no weights ({', '.join(WEIGHT_FILES[:2])})")
    return text_fingerprint(*parts)


def tree_fingerprint(folder: str | Path) -> str:
    """Fingerprint of every file under a folder (relative names + contents), e.g. a diffusers pipeline."""
    p = Path(folder)
    files = sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise FileNotFoundError(f"{p}: no files")
    return text_fingerprint(*((f.relative_to(p).as_posix(), file_fingerprint(f)) for f in files))


def tiny_model(seed: int = 0):
    """The tiny random `CLIPVisionModelWithProjection` (TINY_CONFIG, weights seeded by `seed`)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CONFIG)).eval()


def _processor(folder: Optional[Path], image_size: int):
    from transformers import CLIPImageProcessor

    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return CLIPImageProcessor(size={"shortest_edge": int(image_size)},
                              crop_size={"height": int(image_size), "width": int(image_size)})


@dataclass
class _Loaded:
    model: Any
    processor: Any
    info: ModelInfo
    dim: int


def _folder(folder: str) -> Path:
    p = Path(folder).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"clip_image.models: {p} is not a CLIP folder (no config.json)")
    return p


def _random_info(seed: int) -> ModelInfo:
    """The tiny random model's ModelInfo without building it: its weights are a function of
    TINY_CONFIG, the seed and the versions of torch (RNG) and transformers (init code), so those are
    hashed (the driver of a stage with nothing to compute imports neither)."""
    from importlib import metadata

    spec = json.dumps(TINY_CONFIG, sort_keys=True)
    return ModelInfo(f"clip-vision-tiny-random-seed{seed}",
                     text_fingerprint("clip-tiny-random", spec, seed, metadata.version("torch"),
                                      metadata.version("transformers")),
                     False, "none (random)", "transformers CLIPVisionConfig (TINY_CONFIG)")


def _folder_info(p: Path) -> ModelInfo:
    return ModelInfo(f"clip-vision:{p.name}", folder_fingerprint(p), True, CLIP_LICENSE, str(p))


def _load_one(folder: Optional[str], seed: int, device) -> _Loaded:
    from transformers import CLIPVisionModelWithProjection

    if folder is None:
        model = tiny_model(seed)
        info = _random_info(seed)
        proc = _processor(None, model.config.image_size)
    else:
        p = _folder(folder)
        info = _folder_info(p)
        model = CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True).eval()
        proc = _processor(p, model.config.image_size)
    announce(info)
    return _Loaded(model.to(device), proc, info, int(model.config.projection_dim))


def combined_info(infos: Sequence[ModelInfo], normalize: bool) -> ModelInfo:
    """One ModelInfo for the concatenation of several encoders (fingerprint over theirs, in order)."""
    return ModelInfo(
        "+".join(i.name for i in infos),
        text_fingerprint(*(i.fingerprint for i in infos), normalize),
        all(i.weights_real for i in infos),
        "; ".join(sorted({i.license for i in infos})),
        "; ".join(i.source for i in infos),
    )


class ClipStyleEncoder:
    """The configured CLIP vision models (module doc). `embed(images)` -> (N, dim) float32."""

    def __init__(self, cfg: Optional[ClipImageConfig] = None, device: Optional[str] = None):
        import torch

        from pipeline.devices import resolve_device

        self.cfg = cfg or ClipImageConfig()
        self.device = resolve_device(device or self.cfg.device)
        folders: list[Optional[str]] = list(self.cfg.models) or [None]
        self.models = [_load_one(f, self.cfg.random_seed, self.device) for f in folders]
        self.dim = sum(m.dim for m in self.models)
        self.info = combined_info([m.info for m in self.models], self.cfg.normalize)
        self._torch = torch

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """HxWx3 uint8 RGB images (any size) -> (N, dim) float32: the models' image embeddings,
        each L2-normalised when `normalize`, concatenated in `models` order."""
        torch = self._torch
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = []
        with torch.inference_mode():
            for m in self.models:
                pix = m.processor(images=[np.asarray(im, dtype=np.uint8) for im in images], return_tensors="pt")["pixel_values"]
                e = m.model(pixel_values=pix.to(self.device, next(m.model.parameters()).dtype)).image_embeds.float()
                if self.cfg.normalize:
                    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                parts.append(e.cpu().numpy())
        return np.concatenate(parts, axis=1).astype(np.float32)

    def close(self) -> None:
        self.models = []


def model_info(cfg: ClipImageConfig) -> ModelInfo:
    """The encoder's ModelInfo without loading any model (a folder's fingerprint hashes its
    files; the tiny random model's, its config, seed and library versions)."""
    infos = [_folder_info(_folder(f)) for f in cfg.models] or [_random_info(cfg.random_seed)]
    return combined_info(infos, cfg.normalize)


def load(cfg: ClipImageConfig, device: Optional[str] = None) -> ClipStyleEncoder:
    return ClipStyleEncoder(cfg, device)
