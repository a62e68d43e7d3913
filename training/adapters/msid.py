"""Multi-scale identity (MSID) encoder of Face2Diffusion (Shiohara & Yamasaki, CVPR 2024, sec. 3.2).

A ViT on the 112 x 112 ArcFace crop (RGB, (x / 255 - 0.5) / 0.5): 8 x 8 patches (196 + CLS tokens),
width 384, 12 pre-norm blocks with 12 heads (head dim 32), MLP ratio 4, LayerNorm eps 1e-6. The CLS
token after blocks 3, 6, 9 and 12 (0-based `taps` 2, 5, 8, 11) each goes through BatchNorm1d +
LayerNorm, and the four are concatenated: (B, 1536). The paper pretrains it with an ArcFace loss on
every tap (MS1M, 30 epochs); the weights are the authors' released checkpoint.

Parameter names follow that checkpoint (a timm `VisionTransformer` state dict plus `norms.layer_<i>`),
so `load_msid(path)` reads it as released (also wrapped in {"state_dict" | "model": ...} or with a
`module.` prefix). Without a checkpoint the encoder is random from a fixed seed, reproducible across
processes (the adapter records the seed), and says `weights_real: false` (announced loudly). The
encoder is frozen: eval mode, no gradients.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("persona.msid")

IMAGE_SIZE = 112
PATCH = 8
WIDTH = 384
DEPTH = 12
HEADS = 12
TAPS = (2, 5, 8, 11)  # blocks 3, 6, 9, 12
OUT_DIM = WIDTH * len(TAPS)  # 1536


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class MSIDEncoder(nn.Module):
    """(B, 3, 112, 112) in [-1, 1] -> (B, 1536): the CLS token at each tap, BatchNorm1d + LayerNorm, concatenated."""

    def __init__(self, image_size: int = IMAGE_SIZE, patch: int = PATCH, width: int = WIDTH, depth: int = DEPTH,
                 heads: int = HEADS, taps: Sequence[int] = TAPS):
        super().__init__()
        if any(t < 0 or t >= depth for t in taps):
            raise ValueError(f"MSID taps {list(taps)} outside 0..{depth - 1}")
        self.image_size, self.taps = image_size, tuple(int(t) for t in taps)
        n = (image_size // patch) ** 2
        self.patch_embed = _PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.ModuleList([_Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)  # the ViT's final norm: in the checkpoint, not used by the taps
        self.norms = nn.ModuleDict({f"layer_{t}": nn.Sequential(nn.BatchNorm1d(width), nn.LayerNorm(width))
                                    for t in self.taps})
        self._init()

    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def out_dim(self) -> int:
        return self.pos_embed.shape[-1] * len(self.taps)

    def taps_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The normalised CLS token at each tap: len(taps) x (B, width)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"MSID takes {self.image_size} px ArcFace crops, got {tuple(x.shape[-2:])}")
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        out = []
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in self.taps:
                out.append(self.norms[f"layer_{i}"](h[:, 0]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.taps_features(x), dim=1)


def _unwrap(state: dict) -> dict:
    for k in ("state_dict", "model", "msid"):
        if isinstance(state.get(k), dict):
            state = state[k]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_msid(checkpoint: Optional[str] = None, seed: int = 0) -> tuple[MSIDEncoder, dict]:
    """The frozen encoder (eval, no grad) and its info {"name", "fingerprint", "weights_real", "source"}:
    the authors' checkpoint from `checkpoint`, or random from `seed` (announced loudly)."""
    from pipeline.models.base import ModelInfo, announce, file_fingerprint, text_fingerprint

    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"MSID checkpoint {path} does not exist")
        enc = MSIDEncoder()
        state = _unwrap(torch.load(str(path), map_location="cpu", weights_only=True))
        try:
            missing, unexpected = enc.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ
            raise ValueError(f"{path} is not an MSID (ViT-S/8 112 px, taps {list(TAPS)}) checkpoint: {e}") from None
        missing = [k for k in missing if not k.startswith("norm.")]  # the final ViT norm is unused
        if missing or unexpected:
            raise ValueError(f"{path} is not an MSID (ViT-S/8 112 px, taps {list(TAPS)}) checkpoint: "
                             f"missing {missing[:4]}, unexpected {list(unexpected)[:4]}")
        info = ModelInfo("msid-vit-s8-112", file_fingerprint(path), True, "as released by the Face2Diffusion authors",
                         str(path))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            enc = MSIDEncoder()
        info = ModelInfo("msid-vit-s8-112", text_fingerprint("msid-random", seed), False, "random init", "none")
    announce(info)
    enc.eval().requires_grad_(False)
    return enc, info.as_dict()
