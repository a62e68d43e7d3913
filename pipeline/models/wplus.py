"""e4e (encoder4editing, Tov et al. 2021): aligned face -> StyleGAN2 W+ code (18 x 512).

The network is the pSp-style `Encoder4Editing`: an IR-SE-50 backbone (ArcFace-style residual units
with squeeze-excitation), an FPN over three of its feature maps and one `GradualStyleBlock` head per
StyleGAN layer. Head 0 predicts the base code w0 from the coarsest map; heads i >= 1 predict offsets
that are added to w0 (coarse heads 1-2 read c3 at 16x16, middle heads 3-6 read p2 at 32x32, fine
heads 7-17 read p1 at 64x64). The checkpoint's `latent_avg` is added to all codes.

Parameter names and shapes follow the official checkpoint `e4e_ffhq_encode.pt` (a `torch.save`
dict with `state_dict` holding `encoder.*` and `decoder.*` keys, `latent_avg` and `opts`), so it
loads with `strict` key matching. Without a checkpoint the encoder is randomly initialised from a
fixed seed and says so loudly (`weights_real=False`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.config import WPlusConfig
from pipeline.models.base import ModelInfo, announce, file_fingerprint, text_fingerprint

log = logging.getLogger("persona.models.wplus")

LICENSE = "MIT (e4e)"
RANDOM_INIT_SEED = 0
W_DIM = 512

# IR-SE-50: (in_channels, out_channels, units) per stage; the first unit of a stage has stride 2.
_IR_STAGES = {
    50: ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)),
    100: ((64, 64, 3), (64, 128, 13), (128, 256, 30), (256, 512, 3)),
    152: ((64, 64, 3), (64, 128, 8), (128, 256, 36), (256, 512, 3)),
}


class WPlusError(RuntimeError):
    """A checkpoint that does not fit the e4e encoder, or bad encoder input."""


# --------------------------------------------------------------------------------------------
# architecture


class SEModule(nn.Module):
    """Squeeze-excitation: channel gates from global average pooling (1x1 convs, no bias)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * g


class BottleneckIRSE(nn.Module):
    """IR-SE residual unit: BN-conv3x3-PReLU-conv3x3(stride)-BN-SE plus a (projected) shortcut."""

    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        if in_c == out_c:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # identity or subsampling
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_c),
            nn.Conv2d(in_c, out_c, 3, 1, 1, bias=False),
            nn.PReLU(out_c),
            nn.Conv2d(out_c, out_c, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_c),
            SEModule(out_c, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class EqualLinear(nn.Module):
    """StyleGAN2 equalized-lr linear layer: y = x (W * lr_mul / sqrt(in))^T + b * lr_mul."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class GradualStyleBlock(nn.Module):
    """map2style head: log2(spatial) stride-2 conv3x3 + LeakyReLU down to 1x1, then EqualLinear."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        layers: list[nn.Module] = [nn.Conv2d(in_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(math.log2(spatial)) - 1):
            layers += [nn.Conv2d(out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_c))


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=True) upsample of x to y's size, plus y (FPN top-down step)."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder4Editing(nn.Module):
    """e4e encoder. Input (N, 3, 256, 256) in [-1, 1]; output (N, style_count, 512) codes.

    The output does not include `latent_avg` (the wrapper adds it). style_count = 2 log2(size) - 2
    (18 for a 1024 px StyleGAN2).
    """

    coarse_ind = 3
    middle_ind = 7

    def __init__(self, num_layers: int = 50, stylegan_size: int = 1024):
        super().__init__()
        if num_layers not in _IR_STAGES:
            raise ValueError(f"num_layers must be one of {sorted(_IR_STAGES)}, got {num_layers}")
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        units: list[nn.Module] = []
        stage_ends: list[int] = []
        for in_c, out_c, n in _IR_STAGES[num_layers]:
            units.append(BottleneckIRSE(in_c, out_c, 2))
            units += [BottleneckIRSE(out_c, out_c, 1) for _ in range(n - 1)]
            stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        # c1: end of stage 2 (128 ch, 1/4), c2: end of stage 3 (256 ch, 1/8), c3: end (512 ch, 1/16)
        self._taps = (stage_ends[1], stage_ends[2], stage_ends[3])

        self.style_count = 2 * int(math.log2(stylegan_size)) - 2
        self.styles = nn.ModuleList()
        for i in range(self.style_count):
            spatial = 16 if i < self.coarse_ind else 32 if i < self.middle_ind else 64
            self.styles.append(GradualStyleBlock(512, 512, spatial))
        self.latlayer1 = nn.Conv2d(256, 512, kernel_size=1)
        self.latlayer2 = nn.Conv2d(128, 512, kernel_size=1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone taps (c1, c2, c3): (N,128,H/4,W/4), (N,256,H/8,W/8), (N,512,H/16,W/16)."""
        x = self.input_layer(x)
        t1, t2, t3 = self._taps
        c1 = c2 = None
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == t1:
                c1 = x
            elif i == t2:
                c2 = x
            elif i == t3:
                break
        assert c1 is not None and c2 is not None
        return c1, c2, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.features(x)
        w0 = self.styles[0](c3)
        codes = [w0]
        feats = c3
        p2 = None
        for i in range(1, self.style_count):
            if i == self.coarse_ind:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                feats = p2
            elif i == self.middle_ind:
                feats = _upsample_add(p2, self.latlayer2(c1))
            codes.append(w0 + self.styles[i](feats))  # e4e: every layer is w0 plus an offset
        return torch.stack(codes, dim=1)


# --------------------------------------------------------------------------------------------
# checkpoint


@dataclass
class E4ECheckpoint:
    """The parts of an official e4e checkpoint the encoder needs."""

    encoder_state: dict[str, torch.Tensor]  # keys without the `encoder.` prefix
    latent_avg: Optional[torch.Tensor]  # (style_count, 512), or None when not applied
    opts: dict[str, Any]
    stylegan_size: int


def _torch_load(path: Path) -> Any:
    """Load a checkpoint without unpickling arbitrary objects (`weights_only=True`): tensors, plain
    containers and `argparse.Namespace` (the `opts` of some e4e forks, a plain attribute bag). Anything
    else is refused: unpickling it could run code the file carries."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WPlusError(
            f"{path}: refusing to load this checkpoint: it holds pickled objects beyond tensors and plain "
            f"containers ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}), and unpickling "
            "them could run code. If you trust the file, convert it once into a weights-only checkpoint: in "
            "a Python session, load it with torch.load's `weights_only` switched off and save "
            "{'state_dict': ck['state_dict'], 'latent_avg': ck.get('latent_avg'), 'opts': dict(vars(ck['opts']) "
            "if not isinstance(ck['opts'], dict) else ck['opts'])} with torch.save; point wplus.checkpoint at "
            "the new file"
        ) from None


def read_checkpoint(path: str | Path) -> E4ECheckpoint:
    """Read an official-format e4e checkpoint; the `decoder.*` (StyleGAN2) weights are skipped."""
    p = Path(path)
    if not p.is_file():
        raise WPlusError(f"e4e checkpoint not found: {p} (set wplus.checkpoint to e4e_ffhq_encode.pt)")
    ckpt = _torch_load(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WPlusError(f"{p}: not an e4e checkpoint (expected a dict with 'state_dict', 'latent_avg', 'opts')")
    opts = ckpt.get("opts") or {}
    if not isinstance(opts, dict):  # an argparse.Namespace in some forks
        opts = dict(vars(opts))
    enc_type = opts.get("encoder_type", "Encoder4Editing")
    if enc_type != "Encoder4Editing":
        raise WPlusError(f"{p}: opts.encoder_type is {enc_type!r}; only 'Encoder4Editing' (e4e) is supported")
    size = int(opts.get("stylegan_size", opts.get("output_size", 1024)))
    style_count = 2 * int(math.log2(size)) - 2

    state: dict[str, torch.Tensor] = {}
    for k, v in ckpt["state_dict"].items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("encoder."):
            state[k[len("encoder."):]] = v
    if not state:
        raise WPlusError(f"{p}: state_dict has no 'encoder.*' keys")

    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None and opts.get("start_from_latent_avg", True) is not False:
        la = torch.as_tensor(latent_avg).float().cpu()
        if la.ndim == 1:
            la = la.unsqueeze(0)
        la = la.reshape(-1, la.shape[-1])
        if la.shape[-1] != W_DIM or la.shape[0] not in (1, style_count):
            raise WPlusError(f"{p}: latent_avg has shape {tuple(latent_avg.shape)}, expected "
                             f"({style_count}, {W_DIM}) or ({W_DIM},)")
        latent_avg = la.expand(style_count, W_DIM).clone()
    else:
        latent_avg = None
    return E4ECheckpoint(state, latent_avg, opts, size)


def load_encoder_state(net: Encoder4Editing, state: dict[str, torch.Tensor]) -> None:
    """Strict load with a readable error naming missing / unexpected / mis-shaped keys."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise WPlusError(
            "e4e encoder weights do not match the architecture: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(bad)} mis-shaped {bad[:5]}"
        )
    net.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# wrapper


def whiten_background(face: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Composite a face onto white: out = face * keep + 255 * (1 - keep).

    face: (H, W, 3) uint8 RGB. keep: (H, W) foreground weight, float in [0, 1] or uint8 in
    [0, 255] (255 = keep the pixel). Returns (H, W, 3) uint8.
    """
    if keep.shape[:2] != face.shape[:2]:
        raise WPlusError(f"mask {keep.shape[:2]} and face {face.shape[:2]} differ in size")
    k = keep.astype(np.float32)
    if keep.dtype == np.uint8:
        k /= 255.0
    k = np.clip(k, 0.0, 1.0)[..., None]
    out = face.astype(np.float32) * k + 255.0 * (1.0 - k)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess(faces: Sequence[np.ndarray], size: int = 256) -> torch.Tensor:
    """RGB uint8 faces (H, W, 3), any size -> (N, 3, size, size) float32 in [-1, 1].

    Same as e4e's inference transform: bilinear resize, ToTensor, Normalize(0.5, 0.5).
    """
    out = np.empty((len(faces), 3, size, size), np.float32)
    for i, f in enumerate(faces):
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise WPlusError(f"face {i}: expected (H, W, 3) uint8 RGB, got {f.shape} {f.dtype}")
        if f.shape[:2] != (size, size):
            f = np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
        out[i] = f.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(out)


def default_device() -> torch.device:
    from pipeline.devices import resolve_device

    return resolve_device("auto")


class WPlusEncoder:
    """Batched e4e inference. `encode(faces) -> (N, 18, 512) float32` W+ codes."""

    def __init__(self, net: Encoder4Editing, latent_avg: Optional[torch.Tensor], info: ModelInfo,
                 cfg: WPlusConfig, device: torch.device):
        self.net = net.to(device).eval()
        self.latent_avg = None if latent_avg is None else latent_avg.to(device)
        self.info = info
        self.cfg = cfg
        self.device = device

    @property
    def num_layers(self) -> int:
        """Rows of the W+ code (18 for a 1024 px StyleGAN2)."""
        return self.net.style_count

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, style_count, 512) codes incl. latent_avg (on device)."""
        codes = self.net(x.to(self.device, torch.float32))
        if self.latent_avg is not None:
            codes = codes + self.latent_avg.unsqueeze(0)
        return codes

    def encode(self, faces: Sequence[np.ndarray],
               keep_masks: Optional[Sequence[Optional[np.ndarray]]] = None) -> np.ndarray:
        """Aligned faces -> W+ codes.

        faces: list of (H, W, 3) uint8 RGB FFHQ-aligned crops (resized to cfg.input_size).
        keep_masks: optional list of (H, W) foreground weights (see `whiten_background`); applied
        when cfg.whiten_background is true. Returns float32 (N, 18, 512).
        """
        faces = list(faces)
        if keep_masks is not None:
            if len(keep_masks) != len(faces):
                raise WPlusError(f"{len(keep_masks)} masks for {len(faces)} faces")
            if self.cfg.whiten_background:
                faces = [f if m is None else whiten_background(f, m) for f, m in zip(faces, keep_masks)]
        out = np.zeros((len(faces), self.num_layers, W_DIM), np.float32)
        bs = max(1, int(self.cfg.batch_size))
        for s in range(0, len(faces), bs):
            x = preprocess(faces[s:s + bs], self.cfg.input_size)
            out[s:s + bs] = self.encode_tensor(x).float().cpu().numpy()
        return out


def build_random(num_layers: int = 50, stylegan_size: int = 1024,
                 seed: int = RANDOM_INIT_SEED) -> Encoder4Editing:
    """Randomly initialised encoder, identical for the same seed (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Encoder4Editing(num_layers, stylegan_size)


RANDOM_ARCH = {"encoder_type": "Encoder4Editing", "num_layers": 50, "mode": "ir_se", "stylegan_size": 1024}


def model_info(cfg: WPlusConfig) -> ModelInfo:
    """What `load(cfg)` will report, without building the network (for cache keys in the driver)."""
    if cfg.checkpoint:
        return ModelInfo(name="e4e-ffhq-encode", fingerprint=file_fingerprint(cfg.checkpoint),
                         weights_real=True, license=LICENSE, source=str(cfg.checkpoint))
    return ModelInfo(name="e4e-random", fingerprint=text_fingerprint("e4e-random", RANDOM_ARCH, RANDOM_INIT_SEED),
                     weights_real=False, license=LICENSE, source="random-init")


def load(cfg: WPlusConfig, device: Optional[str | torch.device] = None) -> WPlusEncoder:
    """Build the e4e encoder from cfg.checkpoint (official format), or random init when null."""
    dev = torch.device(device) if device is not None else default_device()
    info = model_info(cfg)
    if cfg.checkpoint:
        ck = read_checkpoint(cfg.checkpoint)
        net = Encoder4Editing(50, ck.stylegan_size)
        load_encoder_state(net, ck.encoder_state)
        latent_avg = ck.latent_avg
        if latent_avg is None:
            log.warning("e4e checkpoint %s has no latent_avg: codes are used without it", cfg.checkpoint)
    else:
        net = build_random(RANDOM_ARCH["num_layers"], RANDOM_ARCH["stylegan_size"], RANDOM_INIT_SEED)
        latent_avg = torch.zeros(net.style_count, W_DIM)
    announce(info)
    return WPlusEncoder(net, latent_avg, info, cfg, dev)
