"""Builders for a folder of hostile and odd input files (the bad-input contract of every stage)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXPECTED = {  # file -> expected ingest status
    "empty.jpg": "empty_file",
    "truncated.jpg": "decode_error",
    "text.jpg": "not_an_image",
    "bomb.png": "pixel_bomb",
    "cmyk.jpg": "ok",
    "gray16.png": "ok",
    "palette.gif": "ok",
    "rgba.png": "ok",
    "rotated.jpg": "ok",
    "gray.png": "ok",
    "tiny.png": "too_small",
    "notes.txt": "unsupported_extension",
}


def _photo(w: int = 160, h: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    return np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def upright_rotation_target() -> np.ndarray:
    """100 wide x 200 tall: top half red, bottom half blue (what the EXIF-rotated file must become)."""
    u = np.zeros((200, 100, 3), np.uint8)
    u[:100, :, 0] = 255
    u[100:, :, 2] = 255
    return u


def make_bad_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(_photo(400, 300)).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "text.jpg").write_text("this is not an image\n" * 20)
    (root / "bomb.png").write_bytes(png_bomb())
    Image.fromarray(_photo(seed=1)).convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    g16 = (np.linspace(0, 65535, 160 * 120).reshape(120, 160)).astype(np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")
    Image.fromarray(_photo(seed=2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(root / "palette.gif")
    rgba = np.dstack([_photo(seed=3), np.full((120, 160), 128, np.uint8)])
    rgba[:10, :10, 3] = 0  # fully transparent corner -> white
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    stored = Image.fromarray(upright_rotation_target()).rotate(90, expand=True)  # 200 wide x 100 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    stored.save(root / "rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    Image.fromarray(_photo(seed=4)).convert("L").save(root / "gray.png")
    Image.fromarray(_photo(20, 20)).save(root / "tiny.png")
    (root / "notes.txt").write_text("not a photo")
    return root
