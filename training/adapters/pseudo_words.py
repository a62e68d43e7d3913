"""Pseudo-word injection: identity tokens replace the text encoder's input embeddings at the positions
of an identifier phrase (Face2Diffusion, and the textual-inversion family it belongs to).

The identifier (e.g. "f l", the authors' S* = [S1*, S2*]) is tokenised without BOS / EOS into K token
ids; wherever that exact sequence occurs in a prompt, position p + k gets token k of the identity
tokens (B, K, D_text). The replacement happens on the output of the CLIP text model's embedding layer
(token + position embedding, as the authors' code overwrites it), then the rest of the text
transformer runs as usual; the UNet is untouched. With CLIP's causal attention the text encoder
output changes only at and after the identifier; a prompt without it is encoded exactly as by the
base model. Scale s blends: (1 - s) * original + s * token (s = 1 replaces; s = 0 is the base text
encoder, bit for bit). A prompt batch of n rows takes `TokenState.for_batch(n)` (guidance's negative
prompt has no identifier, so its rows stay the base model's whatever the tokens).

Installed as a forward hook on the text model's `embeddings` (transformers' CLIPTextEmbeddings, called
with `input_ids=`). No trainable tensors of its own (its state dict is empty).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from training.adapters.base import Injection


def identifier_positions(input_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids, (K,) identifier ids -> (B, L) long: k where position holds identifier token k
    of an occurrence of the whole sequence, else -1."""
    b, n = input_ids.shape
    k = int(ids.numel())
    out = torch.full((b, n), -1, dtype=torch.long, device=input_ids.device)
    if k == 0 or n < k:
        return out
    ids = ids.to(input_ids.device)
    starts = (input_ids.unfold(1, k, 1) == ids).all(-1)  # (B, L - K + 1)
    for j in range(k):
        out[:, j:j + starts.shape[1]] = torch.where(starts, torch.full_like(starts, j, dtype=torch.long),
                                                    out[:, j:j + starts.shape[1]])
    return out


def text_embeddings(text_encoder: Any) -> torch.nn.Module:
    """The CLIP text model's embedding layer (token + position embedding) of a text encoder
    (transformers' `CLIPTextModel`, with or without its `text_model` wrapper)."""
    model = getattr(text_encoder, "text_model", text_encoder)
    emb = getattr(model, "embeddings", None)
    if emb is None or not hasattr(emb, "position_embedding"):
        raise TypeError(f"{type(text_encoder).__name__}: no CLIP text embedding layer (token + position) found")
    return emb


class PseudoWordInjection(Injection):
    """Identity tokens (B, K, D_text) as the embeddings of the K identifier tokens (see module doc)."""

    conditions_text = True

    def __init__(self, identifier: str = "f l", scale: float = 1.0):
        super().__init__(scale)
        self.identifier = str(identifier)
        object.__setattr__(self, "_hook", None)
        object.__setattr__(self, "_ids", None)

    def config(self) -> dict[str, Any]:
        return {"identifier": self.identifier}

    @property
    def installed(self) -> bool:
        return self._hook is not None

    @property
    def num_tokens(self) -> Optional[int]:
        return None if self._ids is None else int(self._ids.numel())

    @staticmethod
    def token_ids(tokenizer: Any, identifier: str) -> list[int]:
        ids = tokenizer(identifier, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"identifier {identifier!r} tokenises to nothing")
        return [int(i) for i in ids]

    def install(self, target: Any, *, dtype: Optional[torch.dtype] = None) -> "PseudoWordInjection":
        if self._hook is not None:
            self.remove()
        emb = text_embeddings(target.text_encoder)
        object.__setattr__(self, "_ids", torch.tensor(self.token_ids(target.tokenizer, self.identifier)))

        def hook(module, args, kwargs, output):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            s = self.state.scale
            if input_ids is None or s == 0.0:
                return None
            where = identifier_positions(input_ids, self._ids)
            hit = where >= 0
            if not bool(hit.any()):
                return None
            tok = self.state.for_batch(output.shape[0]).to(output.device, output.dtype)
            if tok.ndim != 3 or tok.shape[1] != self._ids.numel() or tok.shape[2] != output.shape[2]:
                raise ValueError(f"pseudo-word tokens must be (B, {self._ids.numel()}, {output.shape[2]}) for identifier "
                                 f"{self.identifier!r}, got {tuple(tok.shape)}")
            rep = tok.gather(1, where.clamp(min=0)[..., None].expand(-1, -1, output.shape[2]))
            new = rep if s == 1.0 else (1.0 - s) * output + s * rep
            return torch.where(hit[..., None], new, output)

        object.__setattr__(self, "_hook", emb.register_forward_hook(hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            object.__setattr__(self, "_hook", None)
