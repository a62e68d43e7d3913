"""An identity adapter = a method's conditioner + its injection (+ any base weights a phase trained),
saved as one self-describing safetensors file.

    adapter = load_adapter("models/<method>/<phase>/adapter.safetensors")   # the file alone: any method
    adapter.install(pipe)                  # a StableDiffusionPipeline or DiffusionComponents
    adapter.condition([inputs])            # conditioner inputs per image -> tokens (+ null tokens for CFG)
    adapter.scale = 0.8                    # identity strength; 0 = exactly the base model
    load_persona_adapter(pipe, path)       # the two first lines

File: tensors `conditioner.*`, `injection.*` and `base.<part>.*` (a base part a phase trained, e.g.
the UNet when `train_unet`); metadata (`read_adapter_file`): `format` (FORMAT), `method`, `phase`,
`conditioner` / `injection` (JSON constructor arguments), `base_model` (JSON {"preset", "path"}),
`trained_base` (JSON list of parts), plus what the trainer adds (`global_step`, ...). The metadata is
stored as ONE safetensors metadata entry, `persona` (a sorted JSON object of those strings):
safetensors writes its metadata map in hash order, so with several entries the same adapter would
give different file bytes on every save. The same weights give the same bytes (and sha256). Written
atomically (temp file, fsync, rename). The classes come from the method registry (`training.methods`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pipeline.store import atomic_write_bytes
from training.adapters.base import Injection, zero_inputs

FORMAT = "persona-adapter/1"
META_KEY = "persona"  # the one safetensors metadata entry (see module doc)
BASE_PREFIX = "base."
# base parts a phase may train, and what of their state is theirs (processors belong to the injection)
BASE_PARTS = ("unet", "text_encoder")


def base_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A base part's own tensors (attention processors installed on it excluded)."""
    return {k: v for k, v in module.state_dict().items() if ".processor." not in k}


class PersonaAdapter(nn.Module):
    """Conditioner + injection of one method (see module doc). `pending` holds loaded tensors of the
    injection and base parts until `install` creates the modules they go into."""

    def __init__(self, method: str, conditioner: nn.Module, injection: Injection, *, phase: Optional[str] = None,
                 base_model: Optional[dict] = None, trained_base: Sequence[str] = (),
                 pending: Optional[dict[str, torch.Tensor]] = None, meta: Optional[dict[str, str]] = None) -> None:
        super().__init__()
        self.method, self.phase = method, phase
        self.conditioner = conditioner
        self.injection = injection
        self.base_model = dict(base_model or {})
        self.trained_base = list(trained_base)
        self.pending = dict(pending or {})
        self.meta = dict(meta or {})
        object.__setattr__(self, "_target", None)  # what it is installed on: a reference, not a submodule

    # ---------------------------------------------------------------- install
    def install(self, target: Any, *, dtype: Optional[torch.dtype] = None) -> "PersonaAdapter":
        """Install the injection on `target` (has .unet [.text_encoder, .tokenizer]); load pending
        tensors (strict); move the conditioner to the UNet's device (dtype: `dtype`, else the UNet's)."""
        unet = target.unet
        ref = next(unet.parameters())
        self.injection.install(target, dtype=dtype)
        if self.pending:
            inj = {k[len("injection."):]: v for k, v in self.pending.items() if k.startswith("injection.")}
            self.injection.load_state_dict(inj, strict=True)
            for part in self.trained_base:
                pre = f"{BASE_PREFIX}{part}."
                mod = getattr(target, part)
                tensors = {k[len(pre):]: v for k, v in self.pending.items() if k.startswith(pre)}
                want = set(base_state(mod))
                if set(tensors) != want:
                    raise ValueError(f"adapter's {part} weights do not match the target's {part} "
                                     f"({len(set(tensors) ^ want)} tensors differ)")
                mod.load_state_dict(tensors, strict=False)
            self.pending = {}
        self.conditioner.to(device=ref.device, dtype=dtype or ref.dtype)
        object.__setattr__(self, "_target", target)
        return self

    def remove(self) -> None:
        self.injection.remove()
        object.__setattr__(self, "_target", None)

    # ---------------------------------------------------------------- tokens
    def null_inputs(self, inputs: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs with the samples of `drop` (B,) bool replaced by the "no identity" condition."""
        fn = getattr(self.conditioner, "null_inputs", None)
        return dict(fn(inputs, drop)) if fn is not None else zero_inputs(inputs, drop)

    def tokens(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.conditioner(inputs)

    @property
    def device(self) -> torch.device:
        p = next(self.conditioner.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def condition(self, per_image: Sequence[Sequence[Mapping[str, Any]]], regions: Optional[torch.Tensor] = None) -> None:
        """Set the tokens for a batch: `per_image[i]` = the conditioner inputs of image i's K identities
        (K = 1: tokens (B, T, D); K > 1: (B, K, T, D) with `regions` (B, K, H, W)); the
        unconditional half of a guided batch gets the null tokens."""
        ks = {len(x) for x in per_image}
        if len(ks) != 1 or 0 in ks:
            raise ValueError("condition: every image needs the same number (>= 1) of identities")
        k = ks.pop()
        flat = stack_inputs([inp for img in per_image for inp in img], self.device)
        tok = self.tokens(flat)
        null = self.tokens(self.null_inputs(flat, torch.ones(tok.shape[0], dtype=torch.bool, device=tok.device)))
        if k > 1:
            tok, null = (x.reshape(len(per_image), k, *x.shape[1:]) for x in (tok, null))
        self.injection.set_tokens(tok, uncond=null, regions=regions)

    @property
    def scale(self) -> float:
        return self.injection.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.injection.scale = value

    def clear(self) -> None:
        self.injection.clear()

    # ---------------------------------------------------------------- save
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the file holds: conditioner.*, injection.* and base.<part>.* (CPU, contiguous)."""
        out = {k: v for k, v in self.state_dict().items()}
        for part in self.trained_base:
            if self._target is None:
                raise RuntimeError(f"trained base part '{part}': install the adapter before saving")
            out.update({f"{BASE_PREFIX}{part}.{k}": v for k, v in base_state(getattr(self._target, part)).items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "method": self.method, "phase": str(self.phase or ""),
                "conditioner": json.dumps(self.conditioner.config(), sort_keys=True),
                "injection": json.dumps(self.injection.config(), sort_keys=True),
                "base_model": json.dumps(self.base_model, sort_keys=True),
                "trained_base": json.dumps(self.trained_base)}


def stack_inputs(items: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Unbatched conditioner inputs (arrays or tensors) -> {name: (B, ...) float tensor} on `device`."""
    if not items:
        raise ValueError("no conditioner inputs")
    keys = list(items[0])
    if any(list(x) != keys for x in items):
        raise ValueError("conditioner inputs differ in their names")
    out = {}
    for k in keys:
        ts = [torch.as_tensor(np.asarray(x[k]) if not isinstance(x[k], torch.Tensor) else x[k]) for x in items]
        t = torch.stack(ts)
        out[k] = (t.float() if t.is_floating_point() else t).to(device)
    return out


def save_adapter(adapter: PersonaAdapter, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the adapter's tensors + metadata as safetensors, atomically (temp file, fsync, rename)."""
    path = Path(path)
    meta = adapter.metadata()
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, safetensors_bytes(adapter.tensors(), metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
    return path


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a saved adapter."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        meta = json.loads(raw[META_KEY]) if META_KEY in raw else raw
    except json.JSONDecodeError:
        meta = raw
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={meta.get('format')!r})")
    return tensors, meta


def load_adapter(path: str | os.PathLike, *, scale: float = 1.0) -> PersonaAdapter:
    """Rebuild an adapter of any registered method from its file alone (not installed yet)."""
    from training import methods

    tensors, meta = read_adapter_file(path)
    m = methods.get(meta["method"])
    cond = m.conditioner(**json.loads(meta["conditioner"]))
    cond.load_state_dict({k[len("conditioner."):]: v for k, v in tensors.items() if k.startswith("conditioner.")},
                         strict=True)
    inj = m.injection(**json.loads(meta["injection"]))
    inj.scale = scale
    pending = {k: v for k, v in tensors.items() if not k.startswith("conditioner.")}
    return PersonaAdapter(m.name, cond, inj, phase=meta.get("phase") or None,
                          base_model=json.loads(meta.get("base_model") or "{}"),
                          trained_base=json.loads(meta.get("trained_base") or "[]"), pending=pending, meta=meta)


def load_persona_adapter(pipe: Any, path: str | os.PathLike, *, scale: float = 1.0,
                         dtype: Optional[torch.dtype] = None) -> PersonaAdapter:
    """Load an adapter file onto a diffusers pipeline (or DiffusionComponents); returns the handle."""
    adapter = load_adapter(path, scale=scale).install(pipe, dtype=dtype)
    adapter.eval()
    return adapter
