import tracemalloc

import numpy as np
import pytest

from pipeline.images import BadImage, load_rgb, phash64
from tests.badfiles import EXPECTED, make_bad_folder, upright_rotation_target


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_folder(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", [n for n, s in EXPECTED.items() if s not in ("ok", "unsupported_extension")])
def test_bad_files_raise_with_reason(bad, name):
    with pytest.raises(BadImage) as e:
        load_rgb(bad / name, min_side=64)
    assert e.value.reason == EXPECTED[name]
    assert e.value.message


@pytest.mark.parametrize("name", [n for n, s in EXPECTED.items() if s == "ok"])
def test_odd_modes_become_rgb_uint8(bad, name):
    rgb, meta = load_rgb(bad / name, min_side=64)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert (meta.height, meta.width) == rgb.shape[:2]


def test_bomb_rejected_without_allocating_pixels(bad):
    tracemalloc.start()
    with pytest.raises(BadImage, match="pixel_bomb"):
        load_rgb(bad / "bomb.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak} bytes: pixels were allocated"


def test_exif_rotation_applied(bad):
    rgb, meta = load_rgb(bad / "rotated.jpg")
    assert meta.exif_orientation == 6
    target = upright_rotation_target()
    assert rgb.shape == target.shape
    assert np.abs(rgb.astype(int) - target).mean() < 8  # JPEG noise only


def test_sixteen_bit_scaled_not_clipped(bad):
    rgb, meta = load_rgb(bad / "gray16.png")
    assert meta.orig_mode.startswith("I")
    assert rgb.min() == 0 and rgb.max() == 255
    assert 100 < rgb.mean() < 155  # a linear ramp, not saturated


def test_alpha_composited_on_white(bad):
    rgb, _ = load_rgb(bad / "rgba.png")
    assert (rgb[:10, :10] == 255).all()


def test_phash_stable_under_reencode_and_resize(sample_raw):
    import io

    from PIL import Image

    rgb, _ = load_rgb(sample_raw / "sample/obama/obama.jpg")
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2)).save(buf, "JPEG", quality=60)
    from pipeline.images import decode_bytes

    small, _ = decode_bytes(buf.getvalue())
    other, _ = load_rgb(sample_raw / "sample/obama/obama2.jpg")
    d_copy = bin(phash64(rgb) ^ phash64(small)).count("1")
    d_other = bin(phash64(rgb) ^ phash64(other)).count("1")
    assert d_copy <= 4 and d_other > 12
