"""The LightningModule of every method phase: a `PersonaAdapter` on the frozen SD parts, trained by
the phase's objective (`Phase.loss` on a `training.step.StepContext`).

Trainable: the parts the phase names (`Phase.trainable`: the conditioner and / or the injection, and
base parts such as the UNet); the rest is frozen and in eval mode. AdamW / Adam with a linear
warm-up, gradient clipping and mixed precision via the Trainer, optional gradient checkpointing and
an EMA of the trained weights only (the exported adapter is the EMA). Each loss term is logged
with `self.log` under its own name (`loss`, `loss_<term>`); the learning rate (the scheduler is named
`lr`), throughput, progress bar and the CSV of every logged step are Lightning's own callbacks and
loggers (`training.logs`).

Lightning checkpoints hold the trained weights only (never the frozen UNet / VAE / text encoder),
plus the optimizer, scheduler and EMA; with the deterministic batches
(`training.data`) and per-sample draws (`training.step`) a resumed run repeats exactly what an
uninterrupted one does, and W DDP workers with batch B compute the gradient of one process with
batch W * B (up to float rounding) wherever the loss draws per sample.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch

from pipeline.models.diffusion import DiffusionComponents
from training.adapter import BASE_PARTS, PersonaAdapter
from training.methods.base import Method, Phase, PhaseConfig
from training.step import StepContext

log = logging.getLogger("persona.training.module")

ADAPTER_PREFIX = "adapter."


class TrainedEMA:
    """Exponential moving average of the trained tensors of a module (fp32 shadow copies, by name).

    decay_t = min(decay, (1 + n) / (10 + n)) after n updates (warm-up so early weights fade fast).
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in module.named_parameters():
            if n in self.shadow:
                s = self.shadow[n]
                if s.device != p.device:
                    s = self.shadow[n] = s.to(p.device)
                s.mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """Within the block the module holds the EMA weights; the trained ones are restored after."""
        params = dict(module.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, s in self.shadow.items():
                params[n].copy_(s.to(params[n].device, params[n].dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}


def batch_positions(batch: dict) -> list[int]:
    """The global sample positions g of a training batch (`pos`, added by `training.data.StepBatches`)."""
    if "pos" not in batch:
        raise KeyError("training batch lacks 'pos' (global sample positions; see training.data.StepBatches)")
    pos = [int(g) for g in torch.as_tensor(batch["pos"]).reshape(-1).tolist()]
    if len(pos) != len(batch["image"]):
        raise ValueError(f"training batch has {len(batch['image'])} images but {len(pos)} positions")
    return pos


def warmup_lambda(warmup_steps: int):
    """LR multiplier: linear warm-up min(1, (s + 1) / warmup_steps), then constant 1."""
    def f(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return f


def set_trainable(adapter: PersonaAdapter, components: DiffusionComponents, parts: tuple[str, ...]) -> None:
    """requires_grad on exactly the named parts: base parts first (their processors belong to the
    injection), then the adapter's conditioner and injection."""
    unknown = set(parts) - {"conditioner", "injection", *BASE_PARTS}
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}")
    for p in BASE_PARTS:
        getattr(components, p).requires_grad_(p in parts)
    adapter.conditioner.requires_grad_("conditioner" in parts)
    adapter.injection.requires_grad_("injection" in parts)
    # saved with the adapter: base parts trained now, or changed by the adapter this phase started from
    adapter.trained_base = [p for p in BASE_PARTS if p in parts or p in adapter.trained_base]


class PersonaModule(L.LightningModule):
    """One method phase: the adapter on `components`, trained by `phase.loss` (see module doc)."""

    def __init__(self, method: Method, phase: Phase, cfg: PhaseConfig, seed: int, components: DiffusionComponents,
                 adapter: PersonaAdapter, signature: str = ""):
        super().__init__()
        self.method, self.phase, self.pcfg, self.seed = method, phase, cfg, int(seed)
        self.signature = signature
        self.components = components
        # frozen parts (moved by Lightning; stripped from checkpoints unless trained)
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.adapter = adapter
        self.parts = tuple(phase.trainable(cfg))
        set_trainable(adapter, components, self.parts)
        self.strict_loading = False  # checkpoints carry the trained weights only
        adapter.scale = 1.0
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = TrainedEMA(self, cfg.ema) if cfg.ema > 0 else None
        self._null_text: Optional[torch.Tensor] = None
        # read by Lightning's ThroughputMonitor (FLOPs are not counted: None skips flops_per_sec / MFU)
        self.flops_per_batch: Optional[int] = None

    # ------------------------------------------------------------------ modes / frozen parts
    def train(self, mode: bool = True) -> "PersonaModule":
        super().train(mode)
        for name in ("unet", "vae", "text_encoder"):  # frozen: always eval (dropout off)
            if name not in self.parts:
                getattr(self, name).eval()
        if mode:  # the adapter's own modules follow `mode`
            self.adapter.train(mode)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's trained tensors first (conditioner, injection), then trained base parts'."""
        seen = {id(p) for p in self.adapter.parameters()}
        out = [p for p in self.adapter.parameters() if p.requires_grad]
        for part in self.adapter.trained_base:
            out += [p for p in getattr(self, part).parameters() if p.requires_grad and id(p) not in seen]
        return out

    def _kept(self, key: str) -> bool:
        """Is a state-dict key part of checkpoints (the adapter and trained base parts)?"""
        if key.startswith(ADAPTER_PREFIX):
            return True
        return any(key.startswith(f"{p}.") and ".processor." not in key for p in self.adapter.trained_base)

    @property
    def rank(self) -> int:
        return int(self.trainer.global_rank) if self._trainer is not None else 0

    # ------------------------------------------------------------------ text
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 77, D) text embeddings; gradients flow only where something trainable is
        involved (a text-side injection or a trained text encoder)."""
        ids = self.components.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def null_text(self) -> torch.Tensor:
        """(1, 77, D) embedding of the empty prompt (cached per device unless the text encoder trains)."""
        if "text_encoder" in self.parts:
            return self.encode_text([""])
        if self._null_text is None or self._null_text.device != self.device:
            with torch.no_grad():
                self._null_text = self.encode_text([""])
        return self._null_text

    # ------------------------------------------------------------------ training
    def context(self, batch: dict) -> StepContext:
        """The StepContext of a training batch (latents, draws, dropout, conditioner inputs)."""
        return StepContext(batch=batch, step=int(batch["step"]), global_step=int(self.global_step), rank=self.rank,
                           seed=self.seed, components=self.components, adapter=self.adapter,
                           input_keys=self.method.input_keys, encode_text=self.encode_text, null_text=self.null_text,
                           dropout=self.phase.dropout(self.pcfg, int(self.global_step)),
                           positions=batch_positions(batch), device=self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.phase.loss(self.context(batch), self.pcfg)
        if "loss" not in parts:
            raise KeyError(f"{self.method.name}.{self.phase.name}: loss() must return a 'loss' entry")
        self._log_step(parts, int(batch["image"].shape[0]))
        return parts["loss"]

    def _log_step(self, parts: dict[str, torch.Tensor], batch_size: int) -> None:
        """`loss` (shown on the progress bar) and each `loss_<term>`, on the steps the Trainer logs."""
        self.log("loss", parts["loss"], on_step=True, prog_bar=True, batch_size=batch_size)
        for k in parts:
            if k != "loss":
                self.log(f"loss_{k}", parts[k], on_step=True, batch_size=batch_size)

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # called right after optimizer.step(): update the EMA of the trained weights
        if self.ema is not None:
            self.ema.update(self)

    def configure_optimizers(self):
        s = self.pcfg
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[s.optimizer]
        opt = cls(self.trainable_parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(s.warmup_steps))
        # named so LearningRateMonitor logs it as `lr`
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1, "name": "lr"}}

    # ------------------------------------------------------------------ checkpoints (trained weights only)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self._kept(k)}
        checkpoint["persona"] = {
            "method": self.method.name,
            "phase": self.phase.name,
            "signature": self.signature,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        want = {k for k in self.state_dict() if self._kept(k)}
        have = set(checkpoint.get("state_dict", {}))
        missing = sorted(want - have)
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trained tensors (e.g. {missing[:3]})")
        extra = checkpoint.get("persona") or {}
        for k, mine in (("method", self.method.name), ("phase", self.phase.name)):
            if extra.get(k) not in (None, mine):
                raise RuntimeError(f"checkpoint is from {k} {extra.get(k)!r}, this run is {mine!r}")
        if self.signature and extra.get("signature") and extra["signature"] != self.signature:
            log.warning("checkpoint signature %s != run signature %s (config or data changed)",
                        extra["signature"], self.signature)
        if self.ema is not None and extra.get("ema"):
            self.ema.load_state_dict(extra["ema"])

    @contextlib.contextmanager
    def export_weights(self) -> Iterator[PersonaAdapter]:
        """The adapter holding the weights to export (the EMA when enabled)."""
        if self.ema is None:
            yield self.adapter
        else:
            with self.ema.applied(self):
                yield self.adapter


def image_grid(rows: list[Any], min_tile: int = 128) -> np.ndarray:
    """Rows of (K, 3, R, R) images in [-1, 1] (tensors) or (K, R, R, 3) uint8 arrays -> one uint8
    (H, W, 3) grid (tiles upscaled to >= min_tile)."""
    arrs = []
    for r in rows:
        if isinstance(r, torch.Tensor):
            r = ((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        arrs.append(np.asarray(r, dtype=np.uint8))
    k = max(a.shape[0] for a in arrs)
    res = arrs[0].shape[1]
    rep = max(1, -(-min_tile // res))
    tile = res * rep
    out = np.full((len(arrs) * tile, k * tile, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrs):
        for j in range(a.shape[0]):
            out[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = a[j].repeat(rep, 0).repeat(rep, 1)
    return out
