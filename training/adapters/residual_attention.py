"""W+ Adapter injection: residual cross-attention in every cross-attention layer (`attn2`) of a UNet.

Per layer, with x the (B, N, C) hidden states, c the (B, 77, D) text tokens and F the (B, 4, D)
W+ tokens from `WProj`:

    h   = MHA(W_q x, W_k c, W_v c)                       # the layer's own to_q / to_k / to_v
    h'  = MHA(W_q' h, W_k' F, W_v' F)                    # new W_q' (C x C), W_k', W_v' (D -> C)
    out = to_out(h + scale * h')                         # the layer's own output projection

Where the residual goes: `h` is the multi-head text-attention result BEFORE the layer's output
projection `to_out` (heads concatenated, width C); the identity branch has no projection of its
own and is added there, so the sum goes through the shared `to_out`. This is what the authors'
release does, and it is what the paper's 31.6 M count means: W_q' + W_k' + W_v' only, over the 16
cross-attention layers of SD 1.5 = 5 * 593,920 + 5 * 1,392,640 + 6 * 3,604,480 = 31,559,680
(a separate output projection per layer would add 12.4 M, giving 44.0 M).
W_q', W_k', W_v' start as copies of the layer's to_q, to_k, to_v (W_q' = to_q is C x C because
C == inner dim in SD's cross-attention layers).

scale == 0 (or `set_scale(..., 0)`) skips the branch entirely, and the text path uses exactly the
ops of diffusers' `AttnProcessor2_0`, so the UNet output is bit-for-bit the base UNet's.

How the W+ tokens reach the layers (tokens batch must equal the UNet batch, or be 1):
* `with adapter.conditioned(tokens, scale=...): eps = unet(...).sample` (restores on exit). With
  gradient checkpointing the backward recomputes the forward, so call `backward()` inside the
  block, or use `adapter.set_tokens(tokens)` which stays until changed;
* or per call: `unet(..., cross_attention_kwargs={"wplus_tokens": tokens, "wplus_scale": 1.0})`
  (diffusers then logs that the self-attention processors ignore these keys).
With classifier-free guidance the UNet batch is [uncond; cond]: pass cat([F(0), F(w)]).
Delayed identity start = set the scale to 0 for the first k steps (`set_scale` between steps).

The processors are registered as UNet submodules (diffusers does that for nn.Module processors),
so `unet.to(...)` moves them too, and `unet.requires_grad_(False)` would freeze them: freeze the
base BEFORE `install_wplus_adapter` (it freezes the UNet itself) or re-enable the adapter after.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from training.adapters.wproj import WProj

log = logging.getLogger("persona.adapters.wplus")

FORMAT = "persona-wplus-adapter/1"


class _WPlusState:
    """Run-time inputs shared by all processors of one adapter: W+ tokens and the scale lambda."""

    def __init__(self, scale: float = 1.0) -> None:
        self.tokens: Optional[torch.Tensor] = None
        self.scale: float = float(scale)


class ResidualWPlusAttnProcessor(nn.Module):
    """diffusers attention processor: text cross-attention + residual W+ cross-attention (see module doc)."""

    def __init__(self, attn: Attention, state: _WPlusState, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        inner, query_dim = attn.to_q.out_features, attn.to_q.in_features
        if inner != query_dim:
            raise ValueError(f"residual W+ attention needs to_q square (query dim == inner dim), got {query_dim}->{inner}")
        dev = attn.to_q.weight.device
        dtype = dtype or attn.to_q.weight.dtype
        self.to_q_w = nn.Linear(inner, inner, bias=attn.to_q.bias is not None, device=dev, dtype=dtype)
        self.to_k_w = nn.Linear(attn.to_k.in_features, inner, bias=attn.to_k.bias is not None, device=dev, dtype=dtype)
        self.to_v_w = nn.Linear(attn.to_v.in_features, inner, bias=attn.to_v.bias is not None, device=dev, dtype=dtype)
        with torch.no_grad():
            for new, old in ((self.to_q_w, attn.to_q), (self.to_k_w, attn.to_k), (self.to_v_w, attn.to_v)):
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        self.state = state

    def _wplus_branch(self, attn: Attention, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) text-attention output, (B or 1, T, D) tokens -> (B, N, C) W+ attention output."""
        batch = h.shape[0]
        if tokens.ndim != 3:
            raise ValueError(f"W+ tokens must be (B, T, D), got {tuple(tokens.shape)}")
        if tokens.shape[0] != batch:
            if tokens.shape[0] != 1:
                raise ValueError(f"W+ tokens batch {tokens.shape[0]} != UNet batch {batch} (pass cat([uncond, cond]) under CFG)")
            tokens = tokens.expand(batch, -1, -1)
        wdt = self.to_q_w.weight.dtype
        tokens = tokens.to(device=h.device, dtype=wdt)
        query = self.to_q_w(h.to(wdt))
        key = self.to_k_w(tokens)
        value = self.to_v_w(tokens)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(h.dtype)

    # diffusers inspects __call__'s signature to decide which cross_attention_kwargs to pass.
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        wplus_tokens: Optional[torch.Tensor] = None,
        wplus_scale: Optional[float] = None,
    ) -> torch.Tensor:
        scale = self.state.scale if wplus_scale is None else float(wplus_scale)
        tokens = self.state.tokens if wplus_tokens is None else wplus_tokens
        if scale != 0.0 and tokens is None:
            raise RuntimeError(
                "W+ adapter: no W+ tokens set (use adapter.conditioned(tokens) / set_tokens, "
                "cross_attention_kwargs={'wplus_tokens': ...}, or scale 0 for the base UNet)"
            )

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

        # --- residual W+ attention, added before the shared output projection ---
        if scale != 0.0:
            hidden_states = hidden_states + scale * self._wplus_branch(attn, hidden_states, tokens)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _key(layer_name: str) -> str:
    return layer_name.replace(".", "_")


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """(name, module) of every cross-attention layer (16 on SD 1.5), in module order."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


class WPlusAdapter(nn.Module):
    """The trainable W+ Adapter: `wproj` (WProj) + `attn` (ModuleDict of the UNet's W+ processors).

    forward(w): (B, 18, 512) W+ codes -> (B, 4, cross_dim) tokens. The processors are the same
    objects the UNet calls, so `adapter.parameters()` is exactly what an optimizer should get
    (Stage II: `adapter.wproj.requires_grad_(False)` and optimise `adapter.attn.parameters()`).
    """

    def __init__(self, wproj: WProj, processors: dict[str, ResidualWPlusAttnProcessor], state: _WPlusState) -> None:
        super().__init__()
        self.wproj = wproj
        self.attn = nn.ModuleDict({_key(n): p for n, p in processors.items()})
        self.layer_names = list(processors)
        self._state = state

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.wproj(w)

    @property
    def scale(self) -> float:
        return self._state.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._state.scale = float(value)

    @property
    def tokens(self) -> Optional[torch.Tensor]:
        return self._state.tokens

    def set_tokens(self, tokens: Optional[torch.Tensor]) -> None:
        """Set (or clear with None) the (B, T, D) W+ tokens every W+ layer attends to until changed."""
        self._state.tokens = tokens

    @contextlib.contextmanager
    def conditioned(
        self, tokens: Optional[torch.Tensor] = None, *, w: Optional[torch.Tensor] = None, scale: Optional[float] = None
    ) -> Iterator[Optional[torch.Tensor]]:
        """Within the block the UNet sees `tokens` (or `wproj(w)`) at `scale`; both restored after.

        Yields the tokens in use. `scale=0.0` gives the base UNet (tokens may then be None).
        """
        if w is not None:
            if tokens is not None:
                raise ValueError("give tokens or w, not both")
            tokens = self.wproj(w)
        old = (self._state.tokens, self._state.scale)
        self._state.tokens = tokens
        if scale is not None:
            self._state.scale = float(scale)
        try:
            yield tokens
        finally:
            self._state.tokens, self._state.scale = old

    def num_parameters(self) -> dict[str, int]:
        """{'wproj': n, 'attn': n, 'total': n} parameter counts."""
        n_w = sum(p.numel() for p in self.wproj.parameters())
        n_a = sum(p.numel() for p in self.attn.parameters())
        return {"wproj": n_w, "attn": n_a, "total": n_w + n_a}


def _processors(unet: nn.Module) -> list[ResidualWPlusAttnProcessor]:
    return [m.processor for _, m in cross_attention_layers(unet) if isinstance(m.processor, ResidualWPlusAttnProcessor)]


def install_wplus_adapter(
    unet: UNet2DConditionModel,
    wproj: Optional[WProj] = None,
    *,
    scale: float = 1.0,
    freeze_unet: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> WPlusAdapter:
    """Put a `ResidualWPlusAttnProcessor` on every cross-attention layer of `unet`; return the adapter.

    `wproj` defaults to `WProj(cross_dim=unet.config.cross_attention_dim)`. With `freeze_unet` the
    UNet's own parameters get `requires_grad_(False)` first; the adapter's are trainable. New
    weights live on the layers' device, in `dtype` (default: the layer's dtype; use float32 to
    train against a half-precision UNet).
    """
    cross_dim = int(unet.config.cross_attention_dim)
    wproj = wproj if wproj is not None else WProj(cross_dim=cross_dim)
    if wproj.cross_dim != cross_dim:
        raise ValueError(f"WProj cross_dim {wproj.cross_dim} != UNet cross_attention_dim {cross_dim}")
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("UNet has no cross-attention layers")
    if _processors(unet):
        raise RuntimeError("a W+ adapter is already installed on this UNet (uninstall_wplus_adapter first)")
    if freeze_unet:
        unet.requires_grad_(False)
    state = _WPlusState(scale)
    procs: dict[str, ResidualWPlusAttnProcessor] = {}
    for name, attn in layers:
        if not isinstance(attn.processor, AttnProcessor2_0):
            log.warning("layer %s used %s; the W+ processor computes the text path like AttnProcessor2_0",
                        name, type(attn.processor).__name__)
        proc = ResidualWPlusAttnProcessor(attn, state, dtype=dtype)
        attn.set_processor(proc)
        procs[name] = proc
    ref = layers[0][1].to_q.weight
    wproj.to(device=ref.device, dtype=dtype or ref.dtype)
    adapter = WPlusAdapter(wproj, procs, state)
    adapter.requires_grad_(True)
    return adapter


def uninstall_wplus_adapter(unet: nn.Module) -> int:
    """Give every W+ layer a fresh `AttnProcessor2_0` again; returns the number of layers restored."""
    n = 0
    for _, attn in cross_attention_layers(unet):
        if isinstance(attn.processor, ResidualWPlusAttnProcessor):
            attn.set_processor(AttnProcessor2_0())
            n += 1
    return n


def set_scale(target: nn.Module, value: float) -> None:
    """Set lambda on a `WPlusAdapter` or on every W+ layer of a UNet (0 -> exact base UNet)."""
    if isinstance(target, WPlusAdapter):
        target.scale = value
        return
    procs = _processors(target)
    if not procs:
        raise ValueError("no W+ adapter installed on this module")
    for p in procs:
        p.state.scale = float(value)


def adapter_state_dict(adapter: WPlusAdapter) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors: `wproj.*` and `attn.<layer>.to_{q,k,v}_w.*` (detached, contiguous)."""
    return {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}


def save_adapter(adapter: WPlusAdapter, path: str | os.PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write the adapter (only) as safetensors, with the WProj config and layer names as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "wproj": json.dumps(adapter.wproj.config()), "layers": json.dumps(adapter.layer_names)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.cpu() for k, v in adapter_state_dict(adapter).items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a saved adapter."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={meta.get('format')!r})")
    return tensors, meta


def load_adapter(unet: UNet2DConditionModel, path: str | os.PathLike, *, scale: float = 1.0, freeze_unet: bool = True) -> WPlusAdapter:
    """Install a fresh W+ adapter on `unet` (replacing any installed one) and load `path` into it (strict)."""
    tensors, meta = read_adapter_file(path)
    cfg = json.loads(meta["wproj"])
    wproj = WProj(cross_dim=cfg["cross_dim"], groups=[tuple(g) for g in cfg["groups"]], w_dim=cfg["w_dim"], bias=cfg["bias"])
    uninstall_wplus_adapter(unet)
    adapter = install_wplus_adapter(unet, wproj, scale=scale, freeze_unet=freeze_unet)
    saved_layers = json.loads(meta.get("layers", "[]"))
    if saved_layers and saved_layers != adapter.layer_names:
        raise ValueError(f"adapter {path} was saved for different cross-attention layers than this UNet has")
    adapter.load_state_dict(tensors, strict=True)
    return adapter
