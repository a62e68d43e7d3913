"""The W+ Adapter LightningModule (one class, configured per stage), EMA, and the DDIM sampler.

Stage I:  trainable = WProj + every W+ attention processor;
          L = noise_mse(eps(z_t, t, text, F(w)), target).
Stage II: WProj frozen (loaded from Stage I), trainable = the W+ attention processors;
          L = L_rec + l_dis * L_dis + l_reg * L_reg (`training.losses.stage2_loss`), with
          eps(aug(w)) and eps(lambda = 0) computed without gradient.
Both: condition dropout (zero W+ code / empty prompt) for classifier-free guidance, AdamW with a
linear warm-up, gradient clipping and mixed precision via the Trainer, optional gradient
checkpointing and EMA of the adapter weights.

Randomness is drawn per SAMPLE: each sample's VAE posterior eps, diffusion noise, timestep,
condition-dropout uniform and (Stage II) W+ augmentation noise come, in that order, from its own CPU
generator seeded by (seed, g), g = the sample's global position in the global batch (`batch["pos"]`,
see `training.data.StepBatches`). The draws therefore do not depend on how the global batch is split
over ranks: W DDP workers with batch B compute the gradient of one process with batch W * B (up to
float rounding). The one batch-level draw, Stage II's "shuffle" permutation, comes from a generator
seeded by (seed, data batch index, rank) and permutes within the per-device batch (so with "shuffle"
or "both" a W-worker Stage II run is not the one-process run with batch W * B). All of it is a pure
function of (seed, data batch index, rank, world), so a resumed run repeats exactly what an
uninterrupted one does. Lightning checkpoints hold the adapter weights only (never the frozen
UNet / VAE / text encoder), plus the optimizer, scheduler, EMA and loss history.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
from diffusers import DDIMScheduler

from pipeline.models.diffusion import DiffusionComponents
from training.adapters import WPlusAdapter
from training.config import StageConfig, TrainParams
from training.data import seed_of
from training.losses import apply_condition_dropout, dropout_from_uniform, noise_mse, stage2_loss, wplus_augment

log = logging.getLogger("persona.training.module")

ADAPTER_PREFIX = "adapter."


class AdapterEMA:
    """Exponential moving average of the trainable adapter tensors (fp32 shadow copies).

    decay_t = min(decay, (1 + n) / (10 + n)) after n updates (warm-up so early weights fade fast).
    """

    def __init__(self, adapter: WPlusAdapter, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in adapter.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, adapter: WPlusAdapter) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in adapter.named_parameters():
            if n in self.shadow:
                s = self.shadow[n]
                if s.device != p.device:
                    s = self.shadow[n] = s.to(p.device)
                s.mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, adapter: WPlusAdapter) -> Iterator[None]:
        """Within the block the adapter holds the EMA weights; the trained ones are restored after."""
        params = dict(adapter.named_parameters())
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


def sample_generators(seed: int, positions: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, global position g) only."""
    return [torch.Generator().manual_seed(seed_of("draw", seed, int(g))) for g in positions]


def draw_per_sample(generators: Sequence[torch.Generator], latent_shape: tuple[int, ...], num_timesteps: int,
                    wplus_shape: Optional[tuple[int, ...]] = None) -> dict[str, torch.Tensor]:
    """Each sample's training draws from its own generator, in this fixed order: VAE posterior eps
    (latent_shape), diffusion noise (latent_shape), timestep in [0, num_timesteps), condition-dropout
    uniform in [0, 1), then (when wplus_shape is given) the W+ augmentation noise.

    Returns CPU tensors stacked over samples: {"eps": (B, *latent_shape), "noise": (B, *latent_shape),
    "t": (B,) int64, "u": (B,) float32, ["w_noise": (B, *wplus_shape)]}; sample i's rows depend on
    generators[i] only.
    """
    rows: list[dict[str, torch.Tensor]] = []
    for g in generators:
        r = {"eps": torch.randn(latent_shape, generator=g), "noise": torch.randn(latent_shape, generator=g),
             "t": torch.randint(0, num_timesteps, (), generator=g), "u": torch.rand((), generator=g)}
        if wplus_shape is not None:
            r["w_noise"] = torch.randn(wplus_shape, generator=g)
        rows.append(r)
    if not rows:
        raise ValueError("draw_per_sample: no generators (empty batch)")
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


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


class WPlusModule(L.LightningModule):
    """Stage I or II training of a W+ Adapter installed on `components.unet` (see module doc)."""

    def __init__(self, stage: int, params: TrainParams, components: DiffusionComponents, adapter: WPlusAdapter,
                 signature: str = ""):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.stage_n = stage
        self.params = params
        self.scfg: StageConfig = params.stage(stage)
        self.seed = params.train.seed
        self.signature = signature
        self.components = components
        # frozen parts (moved by Lightning; stripped from checkpoints)
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.adapter = adapter
        self.strict_loading = False  # checkpoints carry the adapter only
        if stage == 2:
            adapter.wproj.requires_grad_(False)
        adapter.scale = 1.0
        if self.scfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = AdapterEMA(adapter, self.scfg.ema) if self.scfg.ema > 0 else None
        self.history: list[list[float]] = []  # [step, loss, (rec, dis, reg)]
        self._null_text: Optional[torch.Tensor] = None
        self._t_last: Optional[float] = None
        self._last_log: dict[str, float] = {}

    # ------------------------------------------------------------------ modes / frozen parts
    def train(self, mode: bool = True) -> "WPlusModule":
        super().train(mode)
        for m in (self.unet, self.vae, self.text_encoder):  # frozen: always eval (dropout off)
            m.eval()
        if mode:  # the adapter's own modules follow `mode`
            self.adapter.train(mode)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]

    @property
    def rank(self) -> int:
        return int(self.trainer.global_rank) if self._trainer is not None else 0

    # ------------------------------------------------------------------ frozen encoders
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 77, D) text embeddings (frozen CLIP text encoder)."""
        ids = self.components.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def null_text(self) -> torch.Tensor:
        """(1, 77, D) embedding of the empty prompt (cached per device)."""
        if self._null_text is None or self._null_text.device != self.device:
            self._null_text = self.encode_text([""])
        return self._null_text

    def latent_shape(self, images: torch.Tensor) -> tuple[int, int, int]:
        """(C, H/f, W/f) of one image's VAE latent, f = the VAE's downsampling factor."""
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.vae.config.latent_channels), images.shape[-2] // f, images.shape[-1] // f

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) scaled latents: the posterior sample
        mean + std * eps, eps (B, C, H/f, W/f) standard normal (drawn by the caller)."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        if eps.shape != dist.mean.shape:
            raise ValueError(f"encode_images: eps shape {tuple(eps.shape)} != latent shape {tuple(dist.mean.shape)}")
        return (dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)) * self.vae.config.scaling_factor

    def _unet(self, zt: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(zt.to(self.unet.dtype), t, text.to(self.unet.dtype)).sample

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        b = int(batch["step"])
        images, w = batch["image"], batch["wplus"].float()
        B = images.shape[0]
        sched = self.components.noise_scheduler
        s2 = self.params.stage2
        w_noise = self.stage_n == 2 and s2.augment in ("noise", "both")
        draws = draw_per_sample(sample_generators(self.seed, batch_positions(batch)), self.latent_shape(images),
                                sched.config.num_train_timesteps, tuple(w.shape[1:]) if w_noise else None)
        z0 = self.encode_images(images, draws["eps"])
        noise = draws["noise"].to(z0.device, z0.dtype)
        t = draws["t"].to(z0.device)
        zt = sched.add_noise(z0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
        d = self.scfg.dropout
        drop_image, drop_text = dropout_from_uniform(draws["u"], d.image, d.text, d.both)
        text = self.encode_text(batch["prompt"])
        w, text = apply_condition_dropout(w, text, self.null_text(), drop_image.to(w.device), drop_text.to(w.device))

        if self.stage_n == 1:
            tokens = self.adapter.wproj(w)
            # set_tokens (not a context): gradient checkpointing recomputes the forward in backward
            self.adapter.set_tokens(tokens)
            self.adapter.scale = 1.0
            eps = self._unet(zt, t, text)
            parts = {"loss": noise_mse(eps, target)}
        else:
            # the shuffle permutes within this device's batch: drawn per (seed, step, rank), not per sample
            shuffle = torch.Generator().manual_seed(seed_of("shuffle", self.seed, b, self.rank))
            w_aug = wplus_augment(w.detach().cpu(), s2.augment, s2.noise_sigma, generator=shuffle,
                                  noise=draws.get("w_noise")).to(w.device)
            w_aug = w_aug * (~drop_image).to(w_aug.device, w_aug.dtype).view(-1, 1, 1)  # dropped codes stay null
            with torch.no_grad():
                with self.adapter.conditioned(w=w_aug, scale=1.0):
                    eps_aug = self._unet(zt, t, text)
                with self.adapter.conditioned(None, scale=0.0):
                    eps_base = self._unet(zt, t, text)
            self.adapter.set_tokens(self.adapter.wproj(w))
            self.adapter.scale = 1.0
            eps = self._unet(zt, t, text)
            parts = stage2_loss(eps, target, eps_aug, eps_base, batch["mask"], s2.l_dis, s2.l_reg)

        self._log_step(parts, B)
        return parts["loss"]

    def _log_step(self, parts: dict[str, torch.Tensor], batch_size: int) -> None:
        now = time.perf_counter()
        world = int(self.trainer.world_size) if self._trainer is not None else 1
        self.log("loss", parts["loss"], on_step=True, prog_bar=True, batch_size=batch_size)
        for k in ("rec", "dis", "reg"):
            if k in parts:
                self.log(f"loss_{k}", parts[k], on_step=True, batch_size=batch_size)
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            self.log("lr", float(self.lr_schedulers().get_last_lr()[0]), on_step=True, batch_size=batch_size)
        if self._t_last is not None:
            sps = batch_size * world / max(now - self._t_last, 1e-9)
            self.log("samples_per_s", sps, on_step=True, batch_size=batch_size)
            self._last_log["samples_per_s"] = sps
        self._t_last = now
        step = int(self.global_step)
        last = self._trainer is not None and step + 1 >= int(self.trainer.max_steps or 0)
        if step % self.scfg.log_every == 0 or last:
            row = [float(step), float(parts["loss"].detach())]
            if "rec" in parts:
                row += [float(parts[k].detach()) for k in ("rec", "dis", "reg")]
            self.history.append(row)
            msg = " ".join(f"{k}={v:.4f}" for k, v in zip(("loss", "rec", "dis", "reg"), row[1:]))
            sps = self._last_log.get("samples_per_s")
            if self.rank == 0:
                log.info(f"[train_stage{self.stage_n}] step {step + 1}/{self.trainer.max_steps if self._trainer else '?'} "
                         f"{msg}" + (f" ({sps:.1f} samples/s)" if sps else ""))

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # called right after optimizer.step(): update the EMA of the adapter
        if self.ema is not None:
            self.ema.update(self.adapter)

    def configure_optimizers(self):
        s = self.scfg
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(s.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints (adapter only)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(ADAPTER_PREFIX)}
        checkpoint["persona"] = {
            "stage": self.stage_n,
            "signature": self.signature,
            "history": [list(r) for r in self.history],
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        want = {ADAPTER_PREFIX + k for k in self.adapter.state_dict()}
        have = set(checkpoint.get("state_dict", {}))
        missing = sorted(want - have)
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[:3]})")
        extra = checkpoint.get("persona") or {}
        if extra.get("stage") not in (None, self.stage_n):
            raise RuntimeError(f"checkpoint is from stage {extra.get('stage')}, this run is stage {self.stage_n}")
        if self.signature and extra.get("signature") and extra["signature"] != self.signature:
            log.warning("checkpoint signature %s != run signature %s (config or data changed)",
                        extra["signature"], self.signature)
        self.history = [list(r) for r in extra.get("history") or []]
        if self.ema is not None and extra.get("ema"):
            self.ema.load_state_dict(extra["ema"])

    @contextlib.contextmanager
    def export_weights(self) -> Iterator[WPlusAdapter]:
        """The adapter holding the weights to export (the EMA when enabled)."""
        if self.ema is None:
            yield self.adapter
        else:
            with self.ema.applied(self.adapter):
                yield self.adapter

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, wplus: torch.Tensor, prompts: list[str], steps: int = 10, guidance: float = 7.5,
                 seed: int = 0, scale: float = 1.0) -> torch.Tensor:
        """DDIM sampling with classifier-free guidance (uncond = empty prompt + zero W+ code).

        wplus (K, 18, 512), K prompts -> (K, 3, R, R) images in [-1, 1] (R = training resolution).
        """
        K = wplus.shape[0]
        res = self.params.train.resolution
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sched = DDIMScheduler.from_config(self.components.sample_scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        g = torch.Generator().manual_seed(int(seed))
        lat = torch.randn((K, self.unet.config.in_channels, res // f, res // f), generator=g).to(self.device)
        lat = lat * sched.init_noise_sigma
        text = torch.cat([self.null_text().expand(K, -1, -1), self.encode_text(prompts)])
        w = wplus.to(self.device).float()
        tokens = torch.cat([self.adapter.wproj(torch.zeros_like(w)), self.adapter.wproj(w)])
        was_training = self.adapter.training
        self.adapter.eval()
        try:
            with self.adapter.conditioned(tokens, scale=scale):
                for t in sched.timesteps:
                    inp = sched.scale_model_input(torch.cat([lat, lat]), t)
                    eps = self._unet(inp, t.expand(2 * K), text).float()
                    eu, ec = eps.chunk(2)
                    lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
            img = self.vae.decode(lat.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        finally:
            self.adapter.train(was_training)
        return img.float().clamp(-1, 1)


def image_grid(rows: list[torch.Tensor], min_tile: int = 128) -> np.ndarray:
    """Rows of (K, 3, R, R) images in [-1, 1] -> one uint8 (H, W, 3) grid (tiles upscaled to >= min_tile)."""
    k = max(r.shape[0] for r in rows)
    res = rows[0].shape[-1]
    rep = max(1, -(-min_tile // res))
    tile = res * rep
    out = np.full((len(rows) * tile, k * tile, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        a = ((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j in range(a.shape[0]):
            out[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = a[j].repeat(rep, 0).repeat(rep, 1)
    return out
