"""Residual cross-attention injection (the W+ Adapter's, and PIDiff's SCA): in every cross-attention
layer the text-attention output is the query source of a second attention over the identity tokens.

Per layer, with x the (B, N, C) hidden states, c the (B, 77, D) text tokens and F the (B, T, D)
identity tokens:

    h   = MHA(W_q x, W_k c, W_v c)                       # the layer's own to_q / to_k / to_v
    h'  = MHA(W_q' h, W_k' F, W_v' F)                    # new W_q' (C x C), W_k', W_v' (D -> C)
    out = to_out(h + scale * h')                         # the layer's own output projection

Where the residual goes: `h` is the multi-head text-attention result BEFORE the layer's output
projection `to_out` (heads concatenated, width C); the identity branch has no projection of its
own and is added there, so the sum goes through the shared `to_out`. This is what the W+ Adapter
authors' release does, and it is what the paper's 31.6 M count means: W_q' + W_k' + W_v' only, over
the 16 cross-attention layers of SD 1.5 = 5 * 593,920 + 5 * 1,392,640 + 6 * 3,604,480 = 31,559,680
(a separate output projection per layer would add 12.4 M, giving 44.0 M).
W_q', W_k', W_v' start as copies of the layer's to_q, to_k, to_v (W_q' = to_q is C x C because
C == inner dim in SD's cross-attention layers). scale == 0 is exactly the base UNet
(`training.adapters.attention`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from training.adapters.attention import CrossAttentionInjection, IdentityAttnProcessor, merge_heads, multihead
from training.adapters.base import TokenState


def _copy_linear(src: nn.Linear, in_features: int, dtype: torch.dtype) -> nn.Linear:
    """A new Linear(in_features -> src.out_features) on src's device, initialised as a copy of src."""
    lin = nn.Linear(in_features, src.out_features, bias=src.bias is not None, device=src.weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(src.weight)
        if src.bias is not None:
            lin.bias.copy_(src.bias)
    return lin


class ResidualAttnProcessor(IdentityAttnProcessor):
    """Text cross-attention + residual identity attention (see module doc)."""

    def __init__(self, attn: Attention, state: TokenState, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(state)
        inner, query_dim = attn.to_q.out_features, attn.to_q.in_features
        if inner != query_dim:
            raise ValueError(f"residual attention needs to_q square (query dim == inner dim), got {query_dim}->{inner}")
        dtype = dtype or attn.to_q.weight.dtype
        self.to_q_w = _copy_linear(attn.to_q, inner, dtype)
        self.to_k_w = _copy_linear(attn.to_k, attn.to_k.in_features, dtype)
        self.to_v_w = _copy_linear(attn.to_v, attn.to_v.in_features, dtype)

    def branch(self, attn: Attention, query: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"residual attention takes one identity: tokens (B, T, D), got {tuple(tokens.shape)}")
        wdt = self.to_q_w.weight.dtype
        tokens = tokens.to(device=hidden.device, dtype=wdt)
        q = multihead(self.to_q_w(hidden.to(wdt)), attn.heads)
        k = multihead(self.to_k_w(tokens), attn.heads)
        v = multihead(self.to_v_w(tokens), attn.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return merge_heads(out).to(hidden.dtype)


class ResidualAttention(CrossAttentionInjection):
    """The residual cross-attention injection: one `ResidualAttnProcessor` per cross-attention layer."""

    processor_cls = ResidualAttnProcessor
