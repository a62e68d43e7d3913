"""Decoupled cross-attention injection (IP-Adapter style): in every cross-attention layer the
layer's query also attends to the identity tokens through new key / value projections, and the two
results are added:

    out = to_out(MHA(W_q x, W_k c, W_v c) + scale * MHA(W_q x, W_k' F, W_v' F))

x: (B, N, C) hidden states, c: (B, 77, D) text tokens, F: (B, T, D) identity tokens; W_k', W_v'
(D -> C) start as copies of the layer's to_k / to_v. Trainable: W_k', W_v' per layer (on SD 1.5:
2 x 16 layers, 19,169,280 parameters). scale 0 is exactly the base UNet (`training.adapters.attention`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from training.adapters.attention import CrossAttentionInjection, IdentityAttnProcessor, merge_heads, multihead
from training.adapters.base import TokenState
from training.adapters.residual_attention import _copy_linear


class DecoupledAttnProcessor(IdentityAttnProcessor):
    """Text cross-attention + the same query over the identity tokens (see module doc)."""

    def __init__(self, attn: Attention, state: TokenState, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(state)
        dtype = dtype or attn.to_k.weight.dtype
        self.to_k_id = _copy_linear(attn.to_k, attn.to_k.in_features, dtype)
        self.to_v_id = _copy_linear(attn.to_v, attn.to_v.in_features, dtype)

    def branch(self, attn: Attention, query: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"decoupled attention takes one identity: tokens (B, T, D), got {tuple(tokens.shape)}")
        wdt = self.to_k_id.weight.dtype
        tokens = tokens.to(device=hidden.device, dtype=wdt)
        k = multihead(self.to_k_id(tokens), attn.heads)
        v = multihead(self.to_v_id(tokens), attn.heads)
        out = F.scaled_dot_product_attention(query.to(wdt), k, v, dropout_p=0.0, is_causal=False)
        return merge_heads(out).to(hidden.dtype)


class DecoupledAttention(CrossAttentionInjection):
    """The decoupled cross-attention injection: one `DecoupledAttnProcessor` per cross-attention layer."""

    processor_cls = DecoupledAttnProcessor
