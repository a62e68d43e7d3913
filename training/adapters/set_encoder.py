"""Set encoder of the Identity Encoder (Su et al. 2023): reference faces of ONE identity -> tokens.

    z_j = Enc(y_j)                 an image encoder over the aligned face y_j -> (z_dim,) (paper Eq. 2)
    z   = sum_j w_j z_j            set aggregation: w_j = 1/N (the mean) at inference; a random convex
                                   combination of a group's faces in training (Eq. 3; the loss does that)
    tokens = LayerNorm(Linear(z))  -> (num_tokens, cross_dim) for the injection

A conditioner (`training.adapters.base.Conditioner`). Inputs:
  "faces"         (B, N, 3, S, S) uint8 aligned faces (`encoder_face`: S = FACE_SIZE), or float in [-1, 1]
  "face_weights"  (B, N) float, the convex weights; 0 marks an empty slot (not encoded). All-zero weights
                  are the null identity (z = 0 -> the tokens of the Linear bias), which is what
                  `null_inputs` makes of a dropped row.

Enc (`backbone`): "resnet", a ResNet of basic blocks with GroupNorm (`widths` per stage, `blocks`
per stage; presets `tiny` and `small` in `ENCODER_PRESETS`), or "torchvision.<name>" (a torchvision
classification architecture, e.g. torchvision.resnet18, its classifier replaced by a Linear to
z_dim, GroupNorm where it takes a norm_layer). Randomly initialised, as in the paper. GroupNorm,
not BatchNorm: an encoding does not depend on the other faces of the batch, so training and
inference see the same function and W DDP ranks compute the one-process gradient. (Our own ResNet
beside torchvision's: torchvision fixes the stage widths at 64..512, too wide for the CPU demo.)
The faces are resized (bilinear, antialiased) to `image_size` inside the encoder.

`log_temperature`: log T of the soft nearest-neighbour loss (a training-only scalar kept here, in
the conditioner, so it can be learned: `learn_temperature`); inference does not use it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

FACE_SIZE = 128  # side of the aligned faces the conditioner inputs hold (the paper trains at 128 px)
FACES, WEIGHTS = "faces", "face_weights"
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": [16, 32, 64, 128], "blocks": [1, 1, 1, 1], "image_size": 64},  # tests / CPU demo
    "small": {"widths": [32, 64, 128, 256], "blocks": [2, 2, 2, 2], "image_size": 128},  # ResNet-18 layout, half width
}


def encoder_face(face: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """An aligned face (H, W, 3) uint8 -> (3, size, size) uint8 (bicubic resize), the conditioner input."""
    im = Image.fromarray(np.ascontiguousarray(np.asarray(face, dtype=np.uint8)[..., :3]))
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where the channels allow, else the largest divisor <= 8."""
    return max(g for g in range(1, 9) if channels % g == 0)


class BasicBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN + shortcut (1x1 conv + GN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(_groups(cout), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class ResNetEncoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, z_dim): stem conv3x3 stride 2, stages of basic blocks (stride 2
    from the second stage on), global average pool, Linear."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], z_dim: int):
        super().__init__()
        if not widths or len(widths) != len(blocks) or min(blocks) < 1 or min(widths) < 1:
            raise ValueError(f"ResNetEncoder: one block count >= 1 per stage width, got widths={widths} blocks={blocks}")
        w0 = int(widths[0])
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.GroupNorm(_groups(w0), w0), nn.ReLU())
        layers, cin = [], w0
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(int(n)):
                layers.append(BasicBlock(cin, int(w), 2 if (i > 0 and j == 0) else 1))
                cin = int(w)
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))


def torchvision_encoder(name: str, z_dim: int) -> nn.Module:
    """A torchvision classification architecture (random init) whose classifier outputs z_dim, with
    GroupNorm where the builder takes a `norm_layer` (the ResNet family)."""
    import torchvision

    ctor = getattr(torchvision.models, name, None)
    if ctor is None or not callable(ctor) or name[:1].isupper():
        raise ValueError(f"torchvision.models has no architecture builder '{name}'")
    try:
        return ctor(weights=None, num_classes=z_dim, norm_layer=lambda c: nn.GroupNorm(_groups(c), c))
    except TypeError:  # no norm_layer: the architecture's own normalisation
        return ctor(weights=None, num_classes=z_dim)


class SetEncoder(nn.Module):
    """Enc over each reference face, weighted sum over the set, Linear + LayerNorm -> tokens (see module doc)."""

    def __init__(self, cross_dim: int = 768, num_tokens: int = 4, z_dim: int = 512, backbone: str = "resnet",
                 widths: Optional[Sequence[int]] = None, blocks: Optional[Sequence[int]] = None,
                 image_size: int = 128, temperature: float = 1.0, learn_temperature: bool = False) -> None:
        super().__init__()
        if num_tokens < 1 or z_dim < 1 or image_size < 8 or temperature <= 0:
            raise ValueError("SetEncoder: num_tokens, z_dim >= 1, image_size >= 8, temperature > 0")
        self.cross_dim, self.num_tokens, self.z_dim = int(cross_dim), int(num_tokens), int(z_dim)
        self.backbone, self.image_size = str(backbone), int(image_size)
        self.learn_temperature, self.init_temperature = bool(learn_temperature), float(temperature)
        if self.backbone == "resnet":
            preset = ENCODER_PRESETS["small"]
            self.widths = [int(w) for w in (widths if widths is not None else preset["widths"])]
            self.blocks = [int(b) for b in (blocks if blocks is not None else preset["blocks"])]
            self.enc = ResNetEncoder(self.widths, self.blocks, self.z_dim)
        elif self.backbone.startswith("torchvision."):
            self.widths, self.blocks = None, None
            self.enc = torchvision_encoder(self.backbone.split(".", 1)[1], self.z_dim)
        else:
            raise ValueError(f"SetEncoder backbone must be 'resnet' or 'torchvision.<name>', got {backbone!r}")
        self.proj = nn.Linear(self.z_dim, self.num_tokens * self.cross_dim)
        self.norm = nn.LayerNorm(self.cross_dim)
        log_t = torch.tensor(math.log(float(temperature)))
        if self.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def config(self) -> dict:
        return {"cross_dim": self.cross_dim, "num_tokens": self.num_tokens, "z_dim": self.z_dim,
                "backbone": self.backbone, "widths": self.widths, "blocks": self.blocks, "image_size": self.image_size,
                "temperature": self.init_temperature, "learn_temperature": self.learn_temperature}

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    # ---------------------------------------------------------------- parts
    def encode(self, faces: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 (or float in [-1, 1]) aligned faces -> (B, z_dim) Enc outputs."""
        dt = self.proj.weight.dtype
        x = faces.to(self.proj.weight.device)
        x = x.to(dt) / 127.5 - 1.0 if not x.is_floating_point() else x.to(dt)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.enc(x).to(dt)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim) identity embeddings -> (B, num_tokens, cross_dim) tokens."""
        z = z.to(self.proj.weight.dtype)
        return self.norm(self.proj(z).view(z.shape[0], self.num_tokens, self.cross_dim))

    def aggregate(self, faces: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, S, S) faces, (B, N) weights -> (B, z_dim) = sum_j w_j Enc(face_j); slots with
        weight 0 are not encoded (all-zero weights: z = 0, the null identity)."""
        if faces.ndim != 5 or weights.shape != faces.shape[:2]:
            raise ValueError(f"SetEncoder: faces (B, N, 3, S, S) and weights (B, N), got {tuple(faces.shape)} "
                             f"and {tuple(weights.shape)}")
        b, n = weights.shape
        w = weights.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        z = torch.zeros(b, n, self.z_dim, device=w.device, dtype=w.dtype)
        used = (w != 0).reshape(-1)
        if bool(used.any()):
            flat = faces.reshape(b * n, *faces.shape[2:])[used.to(faces.device)]
            z = z.reshape(b * n, self.z_dim).index_put((used.nonzero().squeeze(1),), self.encode(flat)).view(b, n, -1)
        return (w.unsqueeze(-1) * z).sum(dim=1)

    # ---------------------------------------------------------------- the conditioner protocol
    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.project(self.aggregate(inputs[FACES], inputs[WEIGHTS]))

    def null_inputs(self, inputs: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of `drop` (B,) get all-zero weights: the null identity (faces untouched)."""
        out = dict(inputs)
        w = inputs[WEIGHTS]
        out[WEIGHTS] = w * (~drop).to(device=w.device, dtype=w.dtype).view(-1, *([1] * (w.ndim - 1)))
        return out
