"""The injection protocol and the run-time token state every injection shares.

An **injection** puts identity tokens into a diffusion model. It is an `nn.Module` (its own trainable
tensors, e.g. new attention projections, are its state dict) that installs itself on a *target*:
anything with `.unet` (and, for text-side injections, `.text_encoder` and `.tokenizer`), i.e. a
`pipeline.models.diffusion.DiffusionComponents` or a diffusers `StableDiffusionPipeline`:

    inj = SomeInjection(**config)           # config(): the constructor arguments (saved with adapters)
    inj.install(target, dtype=torch.float32)   # creates its modules on first install (initialised
                                            # from the base), or attaches the ones it has (loaded)
    inj.set_tokens(tokens, uncond=null)     # what the layers attend to, until changed
    inj.scale = 0.7                         # identity strength; 0 = exactly the base model
    inj.remove()                            # the base model again

Tokens (`TokenState.for_batch`): `tokens` is (B, T, D) (or (B, K, T, D) for K identities with
`regions` (B, K, H, W), for injections that support several identities). A model batch of B uses
`tokens`; a batch of 2B (classifier-free guidance: diffusers puts the unconditional half first) uses
cat([uncond, tokens]); a batch-1 `tokens` is broadcast. Injections that change the text encoder's
output set `conditions_text = True`, so callers re-encode prompts after changing the tokens.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Mapping, Optional, Protocol

import torch
from torch import nn


class Conditioner(Protocol):
    """An `nn.Module` mapping conditioner inputs to identity tokens.

    `forward(inputs)`: {name: (B, ...) tensor} -> (B, T, D) tokens (D = the width the injection
    expects, e.g. the UNet's cross-attention width). `config()`: constructor arguments (saved in
    adapter files, so `type(c)(**c.config())` rebuilds it). Optional `null_inputs(inputs, drop)`:
    the inputs with the samples of the (B,) bool `drop` replaced by the "no identity" condition
    (default `zero_inputs`: zeros)."""

    def config(self) -> dict: ...

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


def zero_inputs(inputs: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """Default null condition: the rows of `drop` (B,) zeroed in every input tensor (B, ...)."""
    out = {}
    for k, v in inputs.items():
        keep = (~drop).to(device=v.device, dtype=v.dtype).view(-1, *([1] * (v.ndim - 1)))
        out[k] = v * keep
    return out


class TokenState:
    """Run-time inputs shared by all layers (or hooks) of one injection: tokens and the scale."""

    def __init__(self, scale: float = 1.0) -> None:
        self.tokens: Optional[torch.Tensor] = None
        self.uncond: Optional[torch.Tensor] = None
        self.regions: Optional[torch.Tensor] = None
        self.scale: float = float(scale)

    def for_batch(self, n: int, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tokens for a model batch of n (see module doc); `tokens` overrides the stored ones."""
        tok = self.tokens if tokens is None else tokens
        if tok is None:
            raise RuntimeError("identity adapter: no tokens set (set_tokens / conditioned(...), "
                               "cross_attention_kwargs={'identity_tokens': ...}, or scale 0 for the base model)")
        if tok.ndim not in (3, 4):
            raise ValueError(f"identity tokens must be (B, T, D) or (B, K, T, D), got {tuple(tok.shape)}")
        b = tok.shape[0]
        if b == n:
            return tok
        if tokens is None and self.uncond is not None and 2 * b == n:
            return torch.cat([self.uncond.to(tok.device, tok.dtype).expand_as(tok), tok])
        if b == 1:
            return tok.expand(n, *tok.shape[1:])
        raise ValueError(f"identity tokens batch {b} != model batch {n} (with guidance set `uncond` too)")

    def regions_for_batch(self, n: int) -> Optional[torch.Tensor]:
        """The (B, K, H, W) regions for a model batch of n (repeated for the two halves of a guided batch)."""
        r = self.regions
        if r is None or r.shape[0] == n:
            return r
        if 2 * r.shape[0] == n:
            return torch.cat([r, r])
        if r.shape[0] == 1:
            return r.expand(n, *r.shape[1:])
        raise ValueError(f"regions batch {r.shape[0]} != model batch {n}")


class Injection(nn.Module):
    """Base class of injections (see module doc). Subclasses implement `install` and `remove` and keep
    their run-time inputs in `self.state` (a `TokenState` their layers / hooks read)."""

    conditions_text: ClassVar[bool] = False

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.state = TokenState(scale)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (saved with the adapter)."""
        return {}

    def install(self, target: Any, *, dtype: Optional[torch.dtype] = None) -> "Injection":
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    @property
    def installed(self) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- run-time inputs
    @property
    def scale(self) -> float:
        return self.state.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.state.scale = float(value)

    @property
    def tokens(self) -> Optional[torch.Tensor]:
        return self.state.tokens

    def set_tokens(self, tokens: Optional[torch.Tensor], uncond: Optional[torch.Tensor] = None,
                   regions: Optional[torch.Tensor] = None) -> None:
        """Tokens (B, T, D) [or (B, K, T, D) + regions (B, K, H, W)] every layer uses until changed;
        `uncond`: the null tokens for the unconditional half of a guided batch."""
        self.state.tokens, self.state.uncond, self.state.regions = tokens, uncond, regions

    def clear(self) -> None:
        self.set_tokens(None)

    @contextlib.contextmanager
    def conditioned(self, tokens: Optional[torch.Tensor], *, uncond: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, regions: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Within the block the model sees `tokens` at `scale`; the previous state is restored after.
        (With gradient checkpointing call `backward()` inside, or use `set_tokens`.)"""
        s = self.state
        old = (s.tokens, s.uncond, s.regions, s.scale)
        self.set_tokens(tokens, uncond, regions)
        if scale is not None:
            s.scale = float(scale)
        try:
            yield
        finally:
            s.tokens, s.uncond, s.regions, s.scale = old
