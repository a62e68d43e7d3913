"""Safe image decoding and perceptual hashing.

`load_rgb` is the single way Persona turns a file into pixels: it checks the file before decoding
(size, header, pixel count against decompression bombs), decodes, applies the EXIF orientation and
converts every mode (CMYK, palette, 16-bit, grayscale, alpha) to 8-bit RGB. Failures raise
`BadImage` with a reason code that stages record per item.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own pixel limit before decoding; PIL's global check is kept as a second guard.
Image.MAX_IMAGE_PIXELS = 300_000_000

# Reason codes recorded in item rows.
EMPTY_FILE = "empty_file"
FILE_TOO_LARGE = "file_too_large"
NOT_AN_IMAGE = "not_an_image"
DECODE_ERROR = "decode_error"
PIXEL_BOMB = "pixel_bomb"
TOO_SMALL = "too_small"
UNSUPPORTED_MODE = "unsupported_mode"


class BadImage(Exception):
    """An input file that cannot become an RGB image; `reason` is the recorded reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class ImageMeta:
    width: int  # after EXIF orientation, pixels
    height: int
    format: str
    orig_mode: str
    exif_orientation: int  # 1 = upright; 2..8 = transposed on load
    frames: int = 1
    notes: list[str] = field(default_factory=list)


def _to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB. Alpha is composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        arr = arr.astype(np.float64)
        hi = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        notes.append(f"{mode}->8bit")
        return np.repeat(arr8[..., None], 3, axis=2) if arr8.ndim == 2 else arr8[..., :3]
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip(np.round((arr - lo) * scale), 0, 255).astype(np.uint8)
        notes.append("F->8bit")
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("alpha->white")
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("CMYK", "L", "1", "YCbCr", "LAB", "HSV"):
        if mode == "CMYK":
            notes.append("cmyk->rgb")
        return np.asarray(img.convert("RGB"))
    try:
        return np.asarray(img.convert("RGB"))
    except Exception as e:  # pragma: no cover - exotic modes
        raise BadImage(UNSUPPORTED_MODE, f"cannot convert mode {mode}: {e}") from e


def load_rgb(
    path: str | os.PathLike,
    max_pixels: int = 64_000_000,
    max_bytes: int = 64_000_000,
    min_side: int = 1,
) -> tuple[np.ndarray, ImageMeta]:
    """Decode `path` to (HxWx3 uint8 RGB upright, meta) or raise BadImage.

    The pixel limit is checked from the header, before any pixel is allocated.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise BadImage(DECODE_ERROR, f"cannot stat: {e}") from e
    if size == 0:
        raise BadImage(EMPTY_FILE, "file has zero bytes")
    if size > max_bytes:
        raise BadImage(FILE_TOO_LARGE, f"{size} bytes > limit {max_bytes}")
    data = p.read_bytes()
    return decode_bytes(data, max_pixels=max_pixels, min_side=min_side)


def decode_bytes(
    data: bytes, max_pixels: int = 64_000_000, min_side: int = 1
) -> tuple[np.ndarray, ImageMeta]:
    """Like `load_rgb`, from bytes already in memory."""
    if not data:
        raise BadImage(EMPTY_FILE, "file has zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise BadImage(NOT_AN_IMAGE, "not a recognised image format") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(PIXEL_BOMB, str(e)) from e
        except Exception as e:
            raise BadImage(DECODE_ERROR, f"{type(e).__name__}: {e}") from e
        w, h = img.size
        if w <= 0 or h <= 0:
            raise BadImage(DECODE_ERROR, f"invalid size {w}x{h}")
        if w * h > max_pixels:
            raise BadImage(PIXEL_BOMB, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
        fmt = img.format or "?"
        orig_mode = img.mode
        frames = int(getattr(img, "n_frames", 1) or 1)
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(PIXEL_BOMB, str(e)) from e
        except Exception as e:
            raise BadImage(DECODE_ERROR, f"{type(e).__name__}: {e}") from e
    notes: list[str] = []
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        orientation = 1
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        notes.append(f"exif_orientation={orientation}")
    if frames > 1:
        notes.append(f"first of {frames} frames")
    rgb = np.ascontiguousarray(_to_rgb(img, notes))
    hh, ww = rgb.shape[:2]
    if min(hh, ww) < min_side:
        raise BadImage(TOO_SMALL, f"{ww}x{hh} smaller than min_side {min_side}")
    return rgb, ImageMeta(ww, hh, fmt, orig_mode, orientation, frames, notes)


def phash64(rgb: np.ndarray, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """DCT perceptual hash (hash_size**2 bits, 64 by default) of an RGB image, as an unsigned int.

    Grayscale -> resize to (hash_size*highfreq_factor)^2 with Lanczos -> 2-D DCT-II -> keep the
    top-left hash_size x hash_size block -> bit = coefficient > median of that block.
    """
    from scipy.fft import dct

    n = hash_size * highfreq_factor
    gray = Image.fromarray(rgb).convert("L").resize((n, n), Image.Resampling.LANCZOS)
    a = np.asarray(gray, dtype=np.float64)
    coeffs = dct(dct(a, axis=0, norm="ortho"), axis=1, norm="ortho")[:hash_size, :hash_size]
    bits = (coeffs > np.median(coeffs)).ravel()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Deterministic baseline JPEG bytes of an RGB array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, optimize=False, subsampling=0)
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a uint8 array (HxW or HxWx3)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of an image Persona wrote itself -> numpy array (RGB or L)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def encode_npy(arr: np.ndarray) -> bytes:
    """`np.save` bytes of an array (the format of every `.npy` blob and shard member)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    return buf.getvalue()
