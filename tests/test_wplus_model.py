"""e4e W+ encoder: official checkpoint layout round trip, forward semantics, random-init path."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from pipeline.config import WPlusConfig
from pipeline.models import wplus

# Official e4e / pSp encoder: IR-SE-50 backbone + 18 GradualStyleBlocks + 2 lateral convs.
OFFICIAL_ENCODER_PARAMS = 267_136_704


def _faces(n: int, size: int = 300, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A random encoder written exactly like e4e's Coach saves `e4e_ffhq_encode.pt`."""
    net = wplus.build_random(seed=123).eval()
    latent_avg = torch.randn(18, 512, generator=torch.Generator().manual_seed(5))
    state = {f"encoder.{k}": v for k, v in net.state_dict().items()}
    # a few StyleGAN2 generator keys, which the encoder loader must skip
    state["decoder.style.1.weight"] = torch.randn(512, 512)
    state["decoder.input.input"] = torch.randn(1, 512, 4, 4)
    state["decoder.to_rgb1.conv.weight"] = torch.randn(1, 3, 512, 1, 1)
    opts = {"encoder_type": "Encoder4Editing", "output_size": 1024, "stylegan_size": 1024,
            "start_from_latent_avg": True, "dataset_type": "ffhq_encode", "checkpoint_path": None}
    path = tmp_path_factory.mktemp("e4e") / "e4e_ffhq_encode.pt"
    torch.save({"state_dict": state, "latent_avg": latent_avg, "opts": opts}, path)
    return path, net, latent_avg


def test_architecture_matches_official_layout(official_ckpt):
    net = official_ckpt[1]
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_ENCODER_PARAMS
    assert net.style_count == 18 and len(net.body) == 24
    expected = {
        "input_layer.0.weight": (64, 3, 3, 3),
        "input_layer.2.weight": (64,),  # PReLU
        "body.0.res_layer.1.weight": (64, 64, 3, 3),
        "body.0.res_layer.5.fc1.weight": (4, 64, 1, 1),  # SE, reduction 16
        "body.3.shortcut_layer.0.weight": (128, 64, 1, 1),
        "body.23.res_layer.5.fc2.weight": (512, 32, 1, 1),
        "styles.0.convs.0.weight": (512, 512, 3, 3),
        "styles.0.linear.weight": (512, 512),
        "styles.0.linear.bias": (512,),
        "latlayer1.weight": (512, 256, 1, 1),
        "latlayer2.weight": (512, 128, 1, 1),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "body.0.shortcut_layer.0.weight" not in sd  # same-width units use a (1, stride) max-pool
    # head depth: coarse 16x16 -> 4 convs, middle 32x32 -> 5, fine 64x64 -> 6 (conv+LeakyReLU pairs)
    assert [len(net.styles[i].convs) // 2 for i in (0, 2, 3, 6, 7, 17)] == [4, 4, 5, 5, 6, 6]
    assert wplus.Encoder4Editing(50, 256).style_count == 14


def test_official_checkpoint_roundtrip(official_ckpt):
    path, net, latent_avg = official_ckpt
    ck = wplus.read_checkpoint(path)
    own = net.state_dict()
    assert set(ck.encoder_state) == set(own)  # every encoder key maps, no decoder key leaks in
    assert all(ck.encoder_state[k].shape == own[k].shape for k in own)
    assert ck.stylegan_size == 1024 and ck.latent_avg.shape == (18, 512)

    enc = wplus.load(WPlusConfig(checkpoint=str(path), batch_size=2), device="cpu")
    assert enc.info.weights_real is True and enc.info.license == "MIT (e4e)"
    assert enc.info.fingerprint == wplus.file_fingerprint(path)
    # weights equal: same output as the in-memory model plus latent_avg (small input keeps it fast)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        ref = net(x) + latent_avg
    assert torch.allclose(enc.encode_tensor(x), ref, atol=1e-5)

    # real-size path: uint8 faces of any size -> resize to 256 -> (2, 18, 512) float32
    faces = _faces(2)
    w = enc.encode(faces)
    assert w.shape == (2, 18, 512) and w.dtype == np.float32 and np.isfinite(w).all()
    assert not np.allclose(w[0], w[1])  # the two faces get different codes
    # encode() = net(preprocess(faces)) + latent_avg, batched (checked at 64 px to stay fast)
    enc.cfg = WPlusConfig(checkpoint=str(path), input_size=64, batch_size=1)
    with torch.inference_mode():
        ref = (net(wplus.preprocess(faces, 64)) + latent_avg).numpy()
    np.testing.assert_allclose(enc.encode(faces), ref, atol=1e-5)


def _small_ckpt(tmp_path, **over):
    ck = {"state_dict": {"encoder.latlayer1.bias": torch.zeros(512), "decoder.style.1.bias": torch.zeros(512)},
          "latent_avg": torch.arange(512.0), "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 1024}}
    ck.update(over)
    p = tmp_path / "small.pt"
    torch.save(ck, p)
    return p


def test_latent_avg_forms(tmp_path):
    got = wplus.read_checkpoint(_small_ckpt(tmp_path)).latent_avg  # (512,) is broadcast to 18 rows
    assert got.shape == (18, 512) and torch.equal(got, torch.arange(512.0).expand(18, 512))
    assert wplus.read_checkpoint(_small_ckpt(tmp_path, latent_avg=None)).latent_avg is None
    off = {"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": False}
    assert wplus.read_checkpoint(_small_ckpt(tmp_path, opts=off)).latent_avg is None
    with pytest.raises(wplus.WPlusError, match="latent_avg has shape"):
        wplus.read_checkpoint(_small_ckpt(tmp_path, latent_avg=torch.zeros(14, 512)))


def test_codes_are_w0_plus_offsets():
    """e4e: row 0 is w0 and every other row is w0 + delta_i; with zero offset heads all rows equal."""
    net = wplus.build_random(seed=1).eval()
    for head in net.styles[1:]:
        torch.nn.init.zeros_(head.linear.weight)
        torch.nn.init.zeros_(head.linear.bias)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        w = net(x)
        w0 = net.styles[0](net.features(x)[2])
    assert torch.allclose(w, w0[:, None].expand(1, 18, 512))


def test_mismatched_checkpoint_is_rejected(tmp_path, official_ckpt):
    net = official_ckpt[1]
    state = dict(net.state_dict())
    del state["latlayer1.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(wplus.WPlusError, match=r"1 missing \['latlayer1.weight'\], 1 unexpected"):
        wplus.load_encoder_state(net, state)
    state = dict(net.state_dict())
    state["latlayer2.bias"] = torch.zeros(3)
    with pytest.raises(wplus.WPlusError, match="1 mis-shaped"):
        wplus.load_encoder_state(net, state)
    psp = {"encoder_type": "GradualStyleEncoder", "stylegan_size": 1024}
    with pytest.raises(wplus.WPlusError, match="only 'Encoder4Editing'"):
        wplus.read_checkpoint(_small_ckpt(tmp_path, opts=psp))
    with pytest.raises(wplus.WPlusError, match="no 'encoder"):
        wplus.read_checkpoint(_small_ckpt(tmp_path, state_dict={"decoder.x": torch.zeros(1)}))
    with pytest.raises(wplus.WPlusError, match="not found"):
        wplus.read_checkpoint(tmp_path / "missing.pt")


def test_random_init_is_loud_and_deterministic(caplog):
    with caplog.at_level(logging.WARNING, logger="persona.models"):
        enc = wplus.load(WPlusConfig(checkpoint=None, batch_size=1), device="cpu")
    assert enc.info.weights_real is False
    assert any("RANDOM WEIGHTS" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert enc.info.fingerprint == wplus.text_fingerprint(
        "e4e-random", {"encoder_type": "Encoder4Editing", "num_layers": 50, "mode": "ir_se",
                       "stylegan_size": 1024}, wplus.RANDOM_INIT_SEED)
    # fixed seed: a second build has identical weights
    a = enc.net.styles[5].linear.weight
    b = wplus.build_random().styles[5].linear.weight
    assert torch.equal(a, b)


def test_preprocess_and_whitening():
    face = np.full((512, 512, 3), 255, np.uint8)
    face[:, :256] = 0
    x = wplus.preprocess([face], 256)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert math.isclose(float(x.min()), -1.0) and math.isclose(float(x.max()), 1.0)
    keep = np.zeros((512, 512), np.uint8)
    keep[:100] = 255
    out = wplus.whiten_background(face, keep)
    assert (out[:100] == face[:100]).all() and (out[100:] == 255).all()
    with pytest.raises(wplus.WPlusError):
        wplus.preprocess([face[..., :2]], 256)


class _Payload:
    """What a malicious checkpoint carries: unpickling it creates `marker` (it could run anything)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_that_needs_unpickling_is_refused_not_run(tmp_path):
    import argparse

    marker = tmp_path / "pwned"
    path = tmp_path / "e4e_evil.pt"
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "opts": _Payload(str(marker))}, path)
    with pytest.raises(wplus.WPlusError, match="refusing to load") as e:
        wplus.read_checkpoint(path)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert "convert it once" in str(e.value) and "weights_only" in str(e.value)
    # opts as an argparse.Namespace (some e4e forks) is plain data: allowed
    ns = tmp_path / "ns.pt"
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "opts": argparse.Namespace(encoder_type="Encoder4Editing")}, ns)
    assert vars(wplus._torch_load(ns)["opts"]) == {"encoder_type": "Encoder4Editing"}
