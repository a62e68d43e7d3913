"""Training image transforms shared by the methods' examples: pure functions of the sample and the
uniforms drawn for it.

Images come from the shard reader as uint8 arrays (RGB HxWx3); examples are (3, R, R) float32 in
[-1, 1]; masks (1, R, R) float32 in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance


@dataclass
class ImageAugConfig:
    """In-the-wild augmentation: colour jitter, rotation, square crops keeping the whole face."""

    brightness: float = 0.2  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0  # shift in turns, uniform in [-h, h] (the W+ authors used 0)
    rotation: float = 10.0  # degrees, uniform in [-r, r]; a rotation that cuts the face is undone
    min_crop_scale: float = 0.6  # crop side >= this * image side where the face allows it
    min_face_fraction: float = 0.15  # face box side >= this * crop side (small faces get tighter crops)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, H, W) float32 in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def rgb(a: np.ndarray) -> Image.Image:
    im = Image.fromarray(a)
    return im if im.mode == "RGB" else im.convert("RGB")


def aligned_face(face: np.ndarray, res: int) -> torch.Tensor:
    """An aligned face (uint8 HxWx3) -> (3, res, res) in [-1, 1] (bicubic resize, no augmentation)."""
    im = rgb(face)
    if im.size != (res, res):
        im = im.resize((res, res), Image.Resampling.BICUBIC)
    return to_tensor(im)


def face_box(mask: np.ndarray, threshold: int = 128) -> Optional[tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1), end-exclusive, of mask >= threshold; None when empty."""
    ys, xs = np.nonzero(mask >= threshold)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def choose_crop(
    width: int, height: int, box: Optional[tuple[int, int, int, int]], u: Sequence[float],
    min_scale: float = 0.6, min_face_fraction: float = 0.15,
) -> tuple[int, int, int]:
    """Square crop (x0, y0, side) inside a width x height image that contains `box` entirely.

    u: three uniforms in [0, 1) (side, x, y). The side is drawn from
    [max(face side, min_scale * S), min(S, face side / min_face_fraction)] (S = min(width, height)),
    so the face is never cut and never smaller than `min_face_fraction` of the crop (unless the
    image itself is that small). Without a face box: a crop of side in [min_scale * S, S].
    """
    S = min(width, height)
    if box is None:
        side = int(round(min_scale * S + u[0] * (S - min_scale * S)))
        side = max(1, min(S, side))
        return int(u[1] * (width - side + 1)), int(u[2] * (height - side + 1)), side
    x0, y0, x1, y1 = box
    f = max(x1 - x0, y1 - y0)
    if f >= S:  # the face does not fit in any square crop: the largest one, centred on it
        side = S
    else:
        lo = max(f, math.ceil(min_scale * S))
        hi = S if min_face_fraction <= 0 else max(f, min(S, int(f / min_face_fraction)))
        lo = min(lo, hi)  # small face: tighter than min_scale so it keeps min_face_fraction
        side = min(hi, lo + int(u[0] * (hi - lo + 1)))
    # offsets keeping the box inside: x <= x0 and x + side >= x1, within the image
    xa, xb = max(0, x1 - side), min(x0, width - side)
    ya, yb = max(0, y1 - side), min(y0, height - side)
    if xb < xa:
        xa = xb = max(0, min(width - side, (x0 + x1 - side) // 2))
    if yb < ya:
        ya = yb = max(0, min(height - side, (y0 + y1 - side) // 2))
    return xa + int(u[1] * (xb - xa + 1)), ya + int(u[2] * (yb - ya + 1)), side


def jitter(im: Image.Image, aug: ImageAugConfig, u: Sequence[float]) -> Image.Image:
    """Brightness, contrast, saturation factors 1 + a * (2u - 1); hue shift h * (2u - 1) turns."""
    if aug.brightness:
        im = ImageEnhance.Brightness(im).enhance(1 + aug.brightness * (2 * u[0] - 1))
    if aug.contrast:
        im = ImageEnhance.Contrast(im).enhance(1 + aug.contrast * (2 * u[1] - 1))
    if aug.saturation:
        im = ImageEnhance.Color(im).enhance(1 + aug.saturation * (2 * u[2] - 1))
    if aug.hue:
        shift = int(round(aug.hue * (2 * u[3] - 1) * 256)) % 256
        if shift:
            h, s, v = im.convert("HSV").split()
            h = h.point(lambda x: (x + shift) % 256)
            im = Image.merge("HSV", (h, s, v)).convert("RGB")
    return im


def wild_crop(image: np.ndarray, face_mask: np.ndarray, res: int, aug: Optional[ImageAugConfig],
              u: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """In-the-wild image + its face mask (uint8, 255 = face) -> ((3, res, res) image, (1, res, res)
    M = 1 - mask / 255, 1 = NON-face), with rotation, a square crop containing the whole face (from
    the mask's bounding box) and colour jitter. `u`: 8 uniforms (rotation, crop side/x/y, jitter x4);
    aug None = the centred full square, no jitter (validation)."""
    img = rgb(image)
    mask = Image.fromarray(np.asarray(face_mask, dtype=np.uint8))
    if mask.mode != "L":
        mask = mask.convert("L")
    if mask.size != img.size:
        mask = mask.resize(img.size, Image.Resampling.BILINEAR)
    W, H = img.size
    if aug is not None and aug.rotation:
        angle = aug.rotation * (2 * u[0] - 1)
        m0 = np.asarray(mask, dtype=np.float32).sum()
        rmask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
        if m0 == 0 or np.asarray(rmask, dtype=np.float32).sum() >= 0.97 * m0:  # the face stays inside
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
            mask = rmask
    if aug is not None:
        box = face_box(np.asarray(mask))
        x, y, s = choose_crop(W, H, box, u[1:4], aug.min_crop_scale, aug.min_face_fraction)
    else:
        s = min(W, H)
        x, y = (W - s) // 2, (H - s) // 2
    img, mask = img.crop((x, y, x + s, y + s)), mask.crop((x, y, x + s, y + s))
    if s != res:
        img = img.resize((res, res), Image.Resampling.BICUBIC)
        mask = mask.resize((res, res), Image.Resampling.BILINEAR)
    if aug is not None:
        img = jitter(img, aug, u[4:8])
    m = 1.0 - torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return to_tensor(img), m.clamp_(0, 1)
