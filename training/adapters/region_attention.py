"""Region-masked decoupled cross-attention: several identities in one image, each confined to its
person's region (FaceStudio's multi-identity cross-attention, Eq. 2: F_i = Attention(Q_i, K_i, V_i)).

One identity (tokens (B, T, D)): exactly `decoupled_attention.DecoupledAttnProcessor` (the same ops;
the same tensors `to_k_id`, `to_v_id`, so a decoupled adapter's state dict loads here). K identities
(tokens (B, K, T, D), set with `regions` (B, K, H, W), masks in [0, 1] at any resolution with the
image's aspect, e.g. latent or pixel size):

1. **Labels per UNet level.** A layer with N = h * w query positions finds its grid (h, w) =
   (ceil(H / 2^s), ceil(W / 2^s)) for the s with h * w = N (the UNet halves its grid per level,
   rounding up), average-pools the masks to it, and gives each position the identity whose mask
   covers most of its cell, if that cover is >= 0.5 (ties: the lower index); else the position is
   *outside* every region.
2. **Per identity.** out_k = MHA(W_q x, W_k' F_k, W_v' F_k) for each identity k (F_k its tokens):
   the single-identity branch.
3. **Select.** A position labelled k takes out_k; nothing of the other identities reaches it (its
   attention probabilities on their tokens are exactly 0). Positions outside every region follow
   `outside`: `all` (attend to all identities' tokens jointly: one softmax over the K * T tokens),
   `mean` (the mean of the identities' outputs out_k), or `none` (no identity attention: the text
   path alone there, as if the scale were 0).

With one region covering the whole image the output is the single-identity processor's, bit for
bit. `probe` (a callable set on a processor, for inspection and tests) receives the effective
attention probabilities of each call, (B, heads, N, K, T): row (position n) = what n's output is a
weighted sum of, over every identity's tokens.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from training.adapters.attention import CrossAttentionInjection, IdentityAttnProcessor, merge_heads, multihead
from training.adapters.base import TokenState
from training.adapters.residual_attention import _copy_linear

OUTSIDE = ("all", "mean", "none")
Outside = Literal["all", "mean", "none"]


def level_grid(height: int, width: int, n: int) -> tuple[int, int]:
    """(h, w) of a UNet level with n positions for masks of height x width (module doc, step 1)."""
    for s in range(32):
        h, w = math.ceil(height / 2 ** s), math.ceil(width / 2 ** s)
        if h * w == n:
            return h, w
        if h * w < n:
            break
    raise ValueError(f"region masks {height}x{width} do not match an attention layer with {n} positions "
                     "(give masks with the image's aspect ratio)")


def region_labels(regions: torch.Tensor, n: int, threshold: float = 0.5) -> torch.Tensor:
    """(B, K, H, W) masks in [0, 1] -> (B, n) long labels at the level with n positions: the identity
    whose pooled mask is largest there if >= threshold, else -1 (outside)."""
    if regions.ndim != 4:
        raise ValueError(f"regions must be (B, K, H, W), got {tuple(regions.shape)}")
    h, w = level_grid(regions.shape[-2], regions.shape[-1], n)
    pooled = F.adaptive_avg_pool2d(regions.float(), (h, w))  # (B, K, h, w)
    best = pooled.max(dim=1).values
    idx = pooled.argmax(dim=1)  # the first maximum on ties
    return torch.where(best >= threshold, idx, torch.full_like(idx, -1)).flatten(1)


class RegionState(TokenState):
    """TokenState + the policy for positions outside every region."""

    def __init__(self, scale: float = 1.0, outside: Outside = "all") -> None:
        super().__init__(scale)
        if outside not in OUTSIDE:
            raise ValueError(f"outside must be one of {OUTSIDE}, got {outside!r}")
        self.outside: str = outside


class RegionAttnProcessor(IdentityAttnProcessor):
    """Text cross-attention + region-masked identity attention (see module doc)."""

    def __init__(self, attn: Attention, state: TokenState, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(state)
        dtype = dtype or attn.to_k.weight.dtype
        self.to_k_id = _copy_linear(attn.to_k, attn.to_k.in_features, dtype)
        self.to_v_id = _copy_linear(attn.to_v, attn.to_v.in_features, dtype)
        object.__setattr__(self, "probe", None)  # Optional[Callable[[Tensor], Any]] (not a submodule)

    def _kv(self, attn: Attention, tokens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(device=device, dtype=self.to_k_id.weight.dtype)
        return multihead(self.to_k_id(tokens), attn.heads), multihead(self.to_v_id(tokens), attn.heads)

    def _attend(self, attn: Attention, query: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One identity: exactly `DecoupledAttnProcessor.branch`."""
        wdt = self.to_k_id.weight.dtype
        k, v = self._kv(attn, tokens, hidden.device)
        out = F.scaled_dot_product_attention(query.to(wdt), k, v, dropout_p=0.0, is_causal=False)
        return merge_heads(out).to(hidden.dtype)

    def branch(self, attn: Attention, query: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim == 3:
            if self.probe is not None:
                self.probe(self._probabilities(attn, query, tokens[:, None], torch.zeros(
                    query.shape[0], query.shape[2], dtype=torch.long, device=query.device)))
            return self._attend(attn, query, hidden, tokens)
        if tokens.ndim != 4:
            raise ValueError(f"identity tokens must be (B, T, D) or (B, K, T, D), got {tuple(tokens.shape)}")
        regions = self.state.regions_for_batch(query.shape[0])
        if regions is None:
            raise ValueError("several identities (tokens (B, K, T, D)) need their regions (B, K, H, W)")
        if regions.shape[1] != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} identities but {regions.shape[1]} regions")
        labels = region_labels(regions.to(query.device), query.shape[2])  # (B, N)
        outside = getattr(self.state, "outside", "all")
        if self.probe is not None:
            self.probe(self._probabilities(attn, query, tokens, labels, outside))
        outs = [self._attend(attn, query, hidden, tokens[:, k]) for k in range(tokens.shape[1])]
        out = torch.zeros_like(hidden)
        if bool((labels < 0).any()):
            if outside == "all":
                out = self._attend(attn, query, hidden, tokens.flatten(1, 2))  # one softmax over all K * T tokens
            elif outside == "mean":
                out = torch.stack(outs).mean(0)
        for k, o in enumerate(outs):
            out = torch.where((labels == k)[..., None], o, out)
        return out

    @torch.no_grad()
    def _probabilities(self, attn: Attention, query: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                       outside: str = "all") -> torch.Tensor:
        """(B, heads, N, K, T) effective attention probabilities of a call (module doc)."""
        b, k_ids, t = tokens.shape[:3]
        wdt = self.to_k_id.weight.dtype
        k, _ = self._kv(attn, tokens.flatten(1, 2), query.device)  # (B, heads, K*T, d)
        q = query.to(wdt)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, heads, N, K*T)
        scores = scores.unflatten(-1, (k_ids, t))
        per_id = scores.softmax(-1)  # each identity's own softmax over its T tokens
        onehot = F.one_hot(labels.clamp_min(0), k_ids).to(per_id.dtype)[:, None, :, :, None]  # (B, 1, N, K, 1)
        probs = per_id * onehot
        out = (labels < 0)[:, None, :, None, None]
        if outside == "all":
            joint = scores.flatten(-2).softmax(-1).unflatten(-1, (k_ids, t))
            probs = torch.where(out, joint, probs)
        elif outside == "mean":
            probs = torch.where(out, per_id / k_ids, probs)
        else:
            probs = torch.where(out, torch.zeros_like(probs), probs)
        return probs


class RegionAttention(CrossAttentionInjection):
    """Region-masked decoupled cross-attention (module doc); `outside`: all | mean | none."""

    processor_cls = RegionAttnProcessor

    def __init__(self, layers: Optional[list[str]] = None, scale: float = 1.0, outside: Outside = "all") -> None:
        super().__init__(layers, scale)
        self.state = RegionState(scale, outside)

    def config(self) -> dict[str, Any]:
        return {"layers": self.layers, "outside": self.outside}

    @property
    def outside(self) -> str:
        return self.state.outside

    @outside.setter
    def outside(self, value: str) -> None:
        if value not in OUTSIDE:
            raise ValueError(f"outside must be one of {OUTSIDE}, got {value!r}")
        self.state.outside = value

    def processors(self) -> dict[str, RegionAttnProcessor]:
        """{layer key: processor} in layer order (e.g. to set a `probe` on each)."""
        return dict(self.attn.items())

    def set_probe(self, fn: Optional[Callable[[str, torch.Tensor], Any]]) -> None:
        """Call fn(layer key, probabilities) from every processor (None: stop)."""
        for name, proc in self.attn.items():
            object.__setattr__(proc, "probe", None if fn is None else (lambda p, _n=name: fn(_n, p)))
