"""Sampling through diffusers: a `StableDiffusionPipeline` over the configured SD parts, with an
installed `PersonaAdapter` (training grids, `persona generate`, `persona evaluate`).

Any diffusers scheduler built from the base model's scheduler config: `ddim` (eta 0), `euler_a`
(Euler ancestral), `dpm++` (DPM-Solver++ multistep). Classifier-free guidance is the pipeline's
(guidance > 1): its unconditional half is the negative prompt + the conditioner's null tokens. The
identity scale is the adapter's (`adapter.scale`); a delayed identity start (scale 0 for the first
`delay_steps` steps) is set by `callback_on_step_end`. Image i's initial noise (and Euler-a's
per-step noise) comes from its own CPU generator seeded with seeds[i], so it depends neither on
the device nor on the batch it is in; on CPU a record re-runs to identical pixels.

Image-to-image (`images`: one content image per prompt, `strength`): a diffusers
`StableDiffusionImg2ImgPipeline` over the same components as the text-to-image pipeline (same
scheduler, guidance, adapter and callbacks); the images set the output size.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

SCHEDULERS = ("ddim", "euler_a", "dpm++")


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler by name from a base scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def make_pipeline(components: Any, scheduler: str = "ddim"):
    """A `StableDiffusionPipeline` sharing the modules of `components` (no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=make_scheduler(scheduler, components.sample_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_scheduler_config(pipe: Any) -> Any:
    """The scheduler config a pipeline started with (schedulers are always built from it, so
    switching e.g. euler_a -> ddim never carries one scheduler's defaults into another)."""
    cfg = getattr(pipe, "_persona_scheduler_config", None)
    if cfg is None:
        cfg = dict(pipe.scheduler.config)
        pipe._persona_scheduler_config = cfg
    return cfg


def scheduler_record(pipe: Any, name: str) -> dict:
    return {"name": name, "class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)}


@torch.no_grad()
def sample(
    pipe: Any,
    adapter: Any,
    conditioning: Optional[Sequence[Sequence[dict]]],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    scheduler: str = "ddim",
    negative_prompt: str = "",
    steps: int = 50,
    guidance: float = 7.5,
    scale: float = 1.0,
    delay_steps: int = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    regions: Optional[torch.Tensor] = None,
    images: Optional[Sequence[np.ndarray]] = None,
    strength: float = 0.75,
) -> np.ndarray:
    """B prompts, B seeds, B conditionings (per image: the conditioner inputs of its identities) ->
    (B, H, W, 3) uint8 images. `adapter` None (or conditioning None): the base pipeline. `images`:
    B content images (H, W, 3) uint8 for image-to-image at `strength` (module doc)."""
    b = len(prompts)
    if len(seeds) != b or (conditioning is not None and len(conditioning) != b):
        raise ValueError(f"sample: {b} prompts, {len(seeds)} seeds, {len(conditioning or [])} conditionings")
    if steps < 1 or delay_steps < 0:
        raise ValueError("sample: steps >= 1, delay_steps >= 0")
    if images is not None and (len(images) != b or not 0.0 < strength <= 1.0):
        raise ValueError(f"sample: {b} prompts need {b} content images (got {len(images)}) and strength in (0, 1]")
    pipe.scheduler = make_scheduler(scheduler, base_scheduler_config(pipe))
    size: dict[str, Any] = {"height": height, "width": width}
    if images is not None:
        from diffusers import StableDiffusionImg2ImgPipeline
        from PIL import Image

        run = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        run.set_progress_bar_config(disable=True)
        size = {"image": [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images], "strength": float(strength)}
    else:
        run = pipe
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs: dict[str, Any] = {}
    old_scale = None
    if adapter is not None:
        old_scale = adapter.scale
        adapter.condition(conditioning, regions=regions) if conditioning is not None else adapter.clear()
        adapter.scale = 0.0 if delay_steps > 0 or conditioning is None else float(scale)

        def on_step_end(_pipe, i, _t, _kw):
            # scale for the NEXT step (i + 1): 0 during the delay
            if conditioning is not None:
                adapter.scale = float(scale) if i + 1 >= delay_steps else 0.0
            return {}

        kwargs["callback_on_step_end"] = on_step_end
    try:
        out = run(prompt=list(prompts), negative_prompt=[negative_prompt] * b if guidance > 1 else None,
                  num_inference_steps=int(steps), guidance_scale=float(guidance), generator=gens, output_type="pt",
                  **size, **kwargs)
    finally:
        if adapter is not None:
            adapter.clear()
            adapter.scale = old_scale
    img = out.images.float().clamp(0, 1)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
