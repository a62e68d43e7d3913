"""ArcFace identity embeddings: real photos through detect -> lm5 -> arcface_align -> embed;
IResNet .pth loading; InsightFace ONNX input normalisation rule."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import IdentityConfig
from pipeline.models import align as A
from pipeline.models import faces as F
from pipeline.models import identity as I

CACHE = Path(__file__).parent / ".cache" / "face_recognition_images"
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def face_recognition_photos() -> Path:
    """Obama/Biden photos from the face_recognition 1.3.0 sdist, cached under tests/.cache/."""
    if all((CACHE / n).is_file() for n in PHOTOS):
        return CACHE
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "face_recognition==1.3.0", "--no-deps",
               "--no-binary", ":all:", "--timeout", "20", "--retries", "1", "-d", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
            sdist = next(Path(tmp).glob("face_recognition-1.3.0.tar.gz"))
            staging = Path(tmp) / "images"
            staging.mkdir()
            with tarfile.open(sdist) as tar:
                for n in PHOTOS:
                    member = tar.getmember(f"face_recognition-1.3.0/tests/test_images/{n}")
                    with tar.extractfile(member) as src, open(staging / n, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (subprocess.SubprocessError, OSError, StopIteration, KeyError, tarfile.TarError) as e:
            pytest.skip(f"Obama/Biden photos unavailable (pip download of the face_recognition sdist failed: {e})")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        if not all((CACHE / n).is_file() for n in PHOTOS):
            shutil.rmtree(CACHE, ignore_errors=True)
            try:
                staging.rename(CACHE)
            except OSError:  # another process cached it meanwhile
                pass
    return CACHE


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    root = face_recognition_photos()
    return {n.split(".")[0]: np.asarray(Image.open(root / n).convert("RGB")) for n in PHOTOS}


@pytest.fixture(scope="module")
def arcface() -> I.ArcFace:
    return I.load(IdentityConfig())


@pytest.fixture(scope="module")
def crops(photos) -> dict[str, np.ndarray]:
    """112x112 ArcFace crops per detector: {detector: (4, 112, 112, 3)} in PHOTOS order."""
    out = {}
    with F.MediaPipeFaces() as mp_det:
        out["mediapipe"] = np.stack([A.arcface_align(img, mp_det.detect(img)[0].lm5) for img in photos.values()])
    scrfd = F.ScrfdFaces()
    out["scrfd"] = np.stack([A.arcface_align(img, scrfd.detect(img)[0].lm5) for img in photos.values()])
    return out


@pytest.mark.parametrize("detector", ["mediapipe", "scrfd"])
def test_same_person_similar_different_person_not(detector, crops, arcface):
    emb = arcface.embed(crops[detector])
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    obama = [0, 1, 2]
    for i in obama:
        for j in obama:
            if i < j:
                assert sim[i, j] > 0.5, (detector, i, j, sim[i, j])
        assert sim[i, 3] < 0.3, (detector, i, sim[i, 3])


def test_rgb_channel_order_is_the_one_the_network_was_trained_on(crops, arcface):
    """Feeding BGR instead of RGB lowers every same-person similarity: the input is RGB."""
    c = crops["scrfd"][:3]
    rgb = arcface.embed(c)
    bgr = arcface.embed(np.ascontiguousarray(c[..., ::-1]))
    iu = np.triu_indices(3, 1)
    assert ((rgb @ rgb.T)[iu] > (bgr @ bgr.T)[iu]).all()


def test_batching_and_input_forms(crops, arcface):
    c = crops["scrfd"]
    full = arcface.embed(c)
    small = I.ArcFace(batch_size=3)
    np.testing.assert_allclose(small.embed(list(c)), full, atol=1e-5)
    np.testing.assert_allclose(arcface.embed(c[1]), full[1:2], atol=1e-5)
    assert arcface.embed([]).shape == (0, 512)
    with pytest.raises(ValueError):
        arcface.embed(np.zeros((2, 64, 64, 3), np.uint8))
    # explicit path to an insightface ONNX file = the default model
    explicit = I.ArcFace(str(F.insightface_model_dir() / "w600k_mbf.onnx"))
    np.testing.assert_array_equal(explicit.embed(c), full)
    assert arcface.info.weights_real and "non-commercial" in arcface.info.license
    assert arcface.fingerprint == F.file_fingerprint(F.insightface_model_dir() / "w600k_mbf.onnx")
    assert (arcface.input_mean, arcface.input_std) == (127.5, 127.5)


# ------------------------------------------------------------------------------ ONNX norm rule


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(num: int, payload: bytes) -> bytes:
    return _pb_varint(num << 3 | 2) + _pb_varint(len(payload)) + payload


def _fake_onnx(node_names: list[str]) -> bytes:
    nodes = b"".join(_pb_field(1, _pb_field(3, n.encode()) + _pb_field(4, b"Op")) for n in node_names)
    graph = nodes + _pb_field(2, b"g")
    return _pb_varint(1 << 3 | 0) + _pb_varint(7) + _pb_field(7, graph)  # ir_version 7, graph


def test_insightface_input_norm_rule(tmp_path):
    mx = tmp_path / "mx.onnx"
    mx.write_bytes(_fake_onnx(["_minusscalar0", "_mulscalar0", "conv0"]))
    assert I.onnx_first_nodes(mx)[:2] == [("_minusscalar0", "Op"), ("_mulscalar0", "Op")]
    assert I.insightface_input_norm(mx) == (0.0, 1.0)
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(_fake_onnx(["Conv_0", "PRelu_1", "Sub_2"]))
    assert I.insightface_input_norm(plain) == (127.5, 127.5)
    # the bundled model is a PyTorch export without the normalisation nodes
    assert I.insightface_input_norm(F.insightface_model_dir() / "w600k_mbf.onnx") == (127.5, 127.5)


# ------------------------------------------------------------------------------ IResNet .pth


def test_iresnet_architecture_matches_arcface_torch_layout():
    net = I.IResNet(I.IRESNET_LAYERS[50])
    n_params = sum(p.numel() for p in net.parameters())
    assert abs(n_params - 43_590_848) < 1000  # arcface_torch iresnet50: 43.59 M parameters
    keys = set(net.state_dict())
    for k in (
        "conv1.weight", "bn1.running_var", "prelu.weight",
        "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight",
        "layer1.0.conv2.weight", "layer1.0.bn3.running_mean", "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.num_batches_tracked", "layer3.13.conv2.weight", "layer4.2.bn3.weight",
        "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_var",
    ):
        assert k in keys, k
    assert "layer1.1.downsample.0.weight" not in keys and "layer3.14.conv1.weight" not in keys
    assert net.fc.weight.shape == (512, 512 * 7 * 7)
    assert I.iresnet_config_from_state_dict(net.state_dict()) == ((3, 4, 14, 3), 512)


def test_iresnet_pth_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = I.IResNet((1, 2, 1, 1), num_features=128)
    with torch.no_grad():  # non-trivial BN statistics so loading them matters
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "backbone.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)  # DDP-style prefix
    model = I.ArcFace(str(path), batch_size=2)
    assert model.backend == "torch" and model.info.weights_real
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    emb = model.embed(faces)
    assert emb.shape == (3, 128)
    x = torch.from_numpy(((faces.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    # a checkpoint that is not an IResNet fails loudly
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(I.IdentityModelError):
        I.ArcFace(str(bad))
