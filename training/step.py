"""What a phase's loss sees of one training batch: `StepContext` (built by the LightningModule).

Randomness is drawn per SAMPLE: each sample's VAE posterior eps, diffusion noise, timestep and
condition-dropout uniform come, in that order, from its own CPU generator seeded by (seed, g), g =
the sample's global position in the global batch (`batch["pos"]`); a loss draws more from the same
generators (`ctx.draws.randn(shape)`, after those four). So the draws do not depend on how the
global batch is split over ranks. Batch-level draws (e.g. a permutation within the batch) come
from `ctx.generator(name)`, seeded by (name, seed, data batch index, rank): pure functions of
(seed, step, rank, world), so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch

from training.losses import dropout_from_uniform

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.diffusion import DiffusionComponents
    from training.adapter import PersonaAdapter

_UNSET: Any = object()


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from arbitrary parts (sha256; stable across processes and platforms)."""
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class SampleDraws:
    """One CPU generator per sample, seeded by (seed, global position g) only."""

    def __init__(self, seed: int, positions: Sequence[int]):
        if not positions:
            raise ValueError("SampleDraws: no positions (empty batch)")
        self.generators = [torch.Generator().manual_seed(seed_of("draw", seed, int(g))) for g in positions]

    def standard(self, latent_shape: tuple[int, ...], num_timesteps: int) -> dict[str, torch.Tensor]:
        """The first draws of every sample, in this order: VAE posterior eps (latent_shape), diffusion
        noise (latent_shape), timestep in [0, num_timesteps), condition-dropout uniform in [0, 1).
        Returns CPU tensors stacked over samples: eps, noise (B, *latent_shape), t (B,) int64, u (B,)."""
        rows = [{"eps": torch.randn(latent_shape, generator=g), "noise": torch.randn(latent_shape, generator=g),
                 "t": torch.randint(0, num_timesteps, (), generator=g), "u": torch.rand((), generator=g)}
                for g in self.generators]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """(B, *shape) standard normal, row i from sample i's generator."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def rand(self, shape: Sequence[int] = ()) -> torch.Tensor:
        """(B, *shape) uniform in [0, 1), row i from sample i's generator."""
        return torch.stack([torch.rand(tuple(shape), generator=g) for g in self.generators])


class StepContext:
    """One training batch, ready for a phase's `loss` (see module doc).

    Attributes: batch (on the device), step (data batch index b), global_step, rank, seed, draws,
    z0 / noise / t / zt / target (latents, added noise, timesteps, noisy latents, the prediction
    target: noise for epsilon models, the velocity for v models), drop_cond / drop_text (B,) bool,
    inputs (conditioner inputs after condition dropout), conditioner, injection, components.
    """

    def __init__(self, *, batch: dict, step: int, global_step: int, rank: int, seed: int,
                 components: "DiffusionComponents", adapter: "PersonaAdapter", input_keys: Sequence[str],
                 encode_text: Callable[[Sequence[str]], torch.Tensor], null_text: Callable[[], torch.Tensor],
                 dropout: tuple[float, float, float], positions: Sequence[int], device: torch.device):
        self.batch, self.step, self.global_step, self.rank, self.seed = batch, step, global_step, rank, seed
        self.components, self.adapter = components, adapter
        self.conditioner, self.injection = adapter.conditioner, adapter.injection
        self.device = device
        self._encode, self._null_text = encode_text, null_text
        images = batch["image"]
        sched = components.noise_scheduler
        vae = components.vae
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        latent_shape = (int(vae.config.latent_channels), images.shape[-2] // f, images.shape[-1] // f)
        self.draws = SampleDraws(seed, positions)
        first = self.draws.standard(latent_shape, sched.config.num_train_timesteps)
        self.z0 = self.encode_images(images, first["eps"])
        self.noise = first["noise"].to(self.z0.device, self.z0.dtype)
        self.t = first["t"].to(self.z0.device)
        self.zt = sched.add_noise(self.z0, self.noise, self.t)
        self.target = self.noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(self.z0, self.noise, self.t)
        self.drop_cond, self.drop_text = (m.to(device) for m in dropout_from_uniform(first["u"], *dropout))
        raw = {k: (batch[k].float() if batch[k].is_floating_point() else batch[k]) for k in input_keys}
        self.inputs = adapter.null_inputs(raw, self.drop_cond)
        self._text: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents: posterior mean + std * eps (eps drawn per sample)."""
        vae = self.components.vae
        dist = vae.encode(images.to(self.device, vae.dtype)).latent_dist
        if eps.shape != dist.mean.shape:
            raise ValueError(f"encode_images: eps shape {tuple(eps.shape)} != latent shape {tuple(dist.mean.shape)}")
        return (dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)) * vae.config.scaling_factor

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, 77, D) through the text encoder as the injection currently conditions it."""
        return self._encode(list(prompts))

    def text(self, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Text embeddings of `prompts` (default: the batch's) with the batch's text dropout applied.
        Cached for the batch prompts unless the injection conditions the text encoder."""
        own = prompts is None
        if own and self._text is not None and not self.injection.conditions_text:
            return self._text
        emb = self.encode_text(self.batch["prompt"] if own else prompts)
        null = self._null_text().to(emb.dtype).expand_as(emb)
        emb = torch.where(self.drop_text.view(-1, 1, 1), null, emb)
        if own:
            self._text = emb
        return emb

    def generator(self, name: str) -> torch.Generator:
        """A CPU generator for a batch-level draw, seeded by (name, seed, data batch index, rank)."""
        return torch.Generator().manual_seed(seed_of(name, self.seed, self.step, self.rank))

    # ---------------------------------------------------------------- the model
    def tokens(self, inputs: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Conditioner tokens of `inputs` (default: the batch's, after condition dropout)."""
        return self.conditioner(self.inputs if inputs is None else inputs)

    def unet(self, tokens: Optional[torch.Tensor] = _UNSET, *, scale: float = 1.0, prompts: Optional[Sequence[str]] = None,
             zt: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """The UNet's prediction for (zt, t) with `tokens` at `scale` (scale 0: the base model; tokens
        default: `self.tokens()`). The tokens and scale stay set on the injection after the call, so
        with gradient checkpointing make the prediction that carries the gradient the last call."""
        if tokens is _UNSET:
            tokens = self.tokens()
        self.injection.set_tokens(tokens, **kwargs)
        self.injection.scale = scale
        text = self.text(prompts)
        unet = self.components.unet
        zt = self.zt if zt is None else zt
        return unet(zt.to(unet.dtype), self.t if t is None else t, text.to(unet.dtype)).sample

    def predict(self) -> torch.Tensor:
        """The conditioned prediction: the batch's tokens at scale 1."""
        return self.unet(self.tokens(), scale=1.0)
