"""Cross-attention layers of a UNet and the attention-processor base the UNet-side injections share.

`IdentityAttnProcessor.__call__` computes a layer's text cross-attention with exactly the ops, in the
same order, as diffusers' `AttnProcessor2_0`, then adds `scale * self.branch(...)` (the subclass's
identity attention) before the layer's output projection. With scale 0 the branch is skipped, so
the UNet output is bit-for-bit the base UNet's.

The processors are registered as UNet submodules (diffusers does that for nn.Module processors), so
`unet.to(...)` moves them too, and `unet.requires_grad_(False)` would freeze them: freeze the base
BEFORE installing (installs freeze nothing; `DiffusionComponents.freeze()` does).

Per call, `cross_attention_kwargs={"identity_tokens": ..., "identity_scale": ...}` override the
injection's state (diffusers then warns that the self-attention processors ignore these keys).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from training.adapters.base import Injection, TokenState

log = logging.getLogger("persona.adapters")


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """(name, module) of every cross-attention layer (16 on SD 1.5), in module order."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def layer_key(layer_name: str) -> str:
    """A layer name usable as a ModuleDict key ('a.b.attn2' -> 'a_b_attn2')."""
    return layer_name.replace(".", "_")


def multihead(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b = x.shape[0]
    return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class IdentityAttnProcessor(nn.Module):
    """diffusers attention processor: the layer's text cross-attention + `scale * branch(...)`."""

    def __init__(self, state: TokenState) -> None:
        super().__init__()
        self.state = state

    def branch(self, attn: Attention, query: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """query (B, heads, N, d) of the layer's to_q, hidden (B, N, C) text-attention output (heads
        merged, before to_out), tokens (B, T, D) -> (B, N, C) identity output."""
        raise NotImplementedError

    # diffusers inspects __call__'s signature to decide which cross_attention_kwargs to pass.
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        identity_tokens: Optional[torch.Tensor] = None,
        identity_scale: Optional[float] = None,
    ) -> torch.Tensor:
        scale = self.state.scale if identity_scale is None else float(identity_scale)

        # --- text path: the same ops, in the same order, as diffusers' AttnProcessor2_0 ---
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # --- the identity branch, added before the shared output projection ---
        if scale != 0.0:
            tokens = self.state.for_batch(batch_size, identity_tokens)
            hidden_states = hidden_states + scale * self.branch(attn, query, hidden_states, tokens)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class CrossAttentionInjection(Injection):
    """An injection with one `IdentityAttnProcessor` per cross-attention layer (`processor_cls`).

    `layers`: the layer names (None: every cross-attention layer of the UNet it is installed on;
    recorded by `config()` after the install). The processors live in `self.attn` (a ModuleDict,
    layer order): that is the injection's state dict. A processor is created by
    `processor_cls(attn, state, dtype)` (initialised from the base layer) on the first install only."""

    processor_cls: type = IdentityAttnProcessor

    def __init__(self, layers: Optional[list[str]] = None, scale: float = 1.0) -> None:
        super().__init__(scale)
        self.layers = list(layers) if layers is not None else None
        self.attn = nn.ModuleDict()
        self._set_unet(None)

    def _set_unet(self, unet: Optional[nn.Module]) -> None:
        object.__setattr__(self, "_unet", unet)  # a reference, not a submodule (never part of the state)

    def config(self) -> dict[str, Any]:
        return {"layers": self.layers}

    @property
    def installed(self) -> bool:
        return self._unet is not None

    def install(self, target: Any, *, dtype: Optional[torch.dtype] = None) -> "CrossAttentionInjection":
        unet = getattr(target, "unet", target)
        if self._unet is not None:
            raise RuntimeError("this injection is already installed (remove() it first)")
        found = cross_attention_layers(unet)
        if not found:
            raise ValueError("UNet has no cross-attention layers")
        by_name = dict(found)
        names = [n for n, _ in found] if self.layers is None else list(self.layers)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"the UNet lacks the adapter's cross-attention layers {missing[:3]} (another base model?)")
        if any(isinstance(m.processor, IdentityAttnProcessor) for _, m in found):
            raise RuntimeError("an identity injection is already installed on this UNet (remove it first)")
        fresh = len(self.attn) == 0
        for name in names:
            attn = by_name[name]
            if not isinstance(attn.processor, AttnProcessor2_0):
                log.warning("layer %s used %s; the identity processor computes the text path like AttnProcessor2_0",
                            name, type(attn.processor).__name__)
            if fresh:
                self.attn[layer_key(name)] = self.processor_cls(attn, self.state, dtype=dtype)
            proc = self.attn[layer_key(name)]
            ref = attn.to_q.weight
            proc.to(device=ref.device, dtype=dtype or next(proc.parameters(), ref).dtype)
            attn.set_processor(proc)
        self.layers = names
        self._set_unet(unet)
        return self

    def remove(self) -> None:
        if self._unet is None:
            return
        for _, attn in cross_attention_layers(self._unet):
            if isinstance(attn.processor, IdentityAttnProcessor):
                attn.set_processor(AttnProcessor2_0())
        self._set_unet(None)


def set_scale(unet: nn.Module, value: float) -> int:
    """Set the identity scale on every identity processor installed on `unet` (0 = the exact base
    UNet); returns the number of layers."""
    procs = [m.processor for _, m in cross_attention_layers(unet) if isinstance(m.processor, IdentityAttnProcessor)]
    if not procs:
        raise ValueError("no identity injection installed on this UNet")
    for p in procs:
        p.state.scale = float(value)
    return len(procs)
