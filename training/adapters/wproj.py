"""Grouped code projection (the W+ Adapter's mapping network F): StyleGAN W+ code (B, 18, 512) ->
4 tokens (B, 4, cross_dim). A conditioner (`training.adapters.base.Conditioner`): its input is
`inputs[key]` (or a tensor).

The 18 W+ rows are split into the groups [0:4], [4:8], [8:12], [12:18]; each group is flattened
(rows * 512) and mapped by its own Linear to `cross_dim`; the four tokens share one LayerNorm.
With cross_dim 768 and no Linear bias (as in the authors' release) that is
(3 * 2048 + 3072) * 768 + 2 * 768 = 7,079,424 parameters ("7.1 M" in the paper's supplement).
An all-zero W+ code (the "dropped image" condition) maps to the LayerNorm bias for every token.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import nn

W_PLUS_ROWS = 18
W_DIM = 512
DEFAULT_GROUPS: tuple[tuple[int, int], ...] = ((0, 4), (4, 8), (8, 12), (12, 18))


class WProj(nn.Module):
    """Grouped W+ projection. forward: (B, 18, w_dim) -> (B, len(groups), cross_dim)."""

    def __init__(
        self,
        cross_dim: int = 768,
        groups: Sequence[tuple[int, int]] = DEFAULT_GROUPS,
        w_dim: int = W_DIM,
        bias: bool = False,
        key: str = "code",
    ) -> None:
        super().__init__()
        self.groups = tuple((int(a), int(b)) for a, b in groups)
        if not self.groups or any(b <= a for a, b in self.groups):
            raise ValueError(f"WProj groups must be non-empty [start, end) row ranges, got {groups}")
        self.cross_dim = int(cross_dim)
        self.w_dim = int(w_dim)
        self.rows = max(b for _, b in self.groups)
        self.key = str(key)
        self.proj = nn.ModuleList(nn.Linear((b - a) * self.w_dim, self.cross_dim, bias=bias) for a, b in self.groups)
        self.norm = nn.LayerNorm(self.cross_dim)

    @property
    def num_tokens(self) -> int:
        return len(self.groups)

    def config(self) -> dict:
        """Constructor arguments (stored with saved adapters)."""
        return {
            "cross_dim": self.cross_dim,
            "groups": [list(g) for g in self.groups],
            "w_dim": self.w_dim,
            "bias": self.proj[0].bias is not None,
            "key": self.key,
        }

    def forward(self, w: Union[torch.Tensor, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        if isinstance(w, Mapping):
            w = w[self.key]
        if w.ndim != 3 or w.shape[1] < self.rows or w.shape[2] != self.w_dim:
            raise ValueError(f"WProj expects (B, >={self.rows}, {self.w_dim}) W+ codes, got {tuple(w.shape)}")
        w = w.to(self.norm.weight.dtype)
        tokens = [lin(w[:, a:b].reshape(w.shape[0], -1)) for lin, (a, b) in zip(self.proj, self.groups)]
        return self.norm(torch.stack(tokens, dim=1))
