"""Stable Diffusion components (UNet, VAE, CLIP text encoder + tokenizer, DDPM/DDIM schedulers).

Three ways to get them, all offline (never a download):

* `load_diffusion(path)` with a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`): every part via `from_pretrained(path, subfolder=..., local_files_only=True)`;
  `weights_real=True`, fingerprints are content hashes of the weight files.
* `load_diffusion(path, config=DIR)` with a single-file checkpoint (`.safetensors` / `.ckpt`):
  `StableDiffusionPipeline.from_single_file(path, config=DIR, local_files_only=True)`. diffusers
  0.42 infers the model's hub repo from the checkpoint and reads that repo's configs; offline this
  only works when `config` points at a LOCAL diffusers folder holding the configs and the tokenizer
  (`model_index.json`, `*/config.json`, `scheduler/scheduler_config.json`, `tokenizer/`; no weights
  needed). `original_config=` (the LDM yaml) is passed through, but diffusers' legacy path then
  still fetches the CLIP tokenizer from the hub, so offline it only works with a warm HF cache.
* `build_random("tiny")` / `build_random("sd15")`: configs with random weights from a fixed seed
  (`weights_real=False`, announced loudly). `tiny` is a CPU toy (64 px images -> 4 x 8 x 8
  latents, cross-attention width 32); `sd15` has the real SD 1.5 shapes (~1.07 G parameters).

Image tensors are (B, 3, H, W) in [-1, 1]; latents are (B, 4, H/8, W/8), already multiplied by the
VAE scaling factor; text embeddings are (B, 77, D) (D = 768 for SD 1.5, 32 for tiny).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.models.base import ModelInfo, announce, file_fingerprint, text_fingerprint

log = logging.getLogger("persona.models.diffusion")

RANDOM_INIT_SEED = 0
MAX_TOKENS = 77
RANDOM_LICENSE = "n/a (random init)"
DEFAULT_LICENSE = "unspecified (check the model card; SD 1.5 is CreativeML OpenRAIL-M)"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_FILE_FIELDS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ----------------------------------------------------------------------------- configs
def sd15_unet_config() -> dict[str, Any]:
    """The SD 1.5 `UNet2DConditionModel` config (859.5 M parameters, 16 cross-attention layers)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def sd15_vae_config() -> dict[str, Any]:
    """The SD 1.5 `AutoencoderKL` config (factor 8, 4 latent channels, scaling 0.18215)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def sd15_text_config(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407) -> dict[str, Any]:
    """CLIP ViT-L/14 text tower as used by SD 1.5 (hidden 768, 12 layers, 77 positions)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": 1,
    }


def scheduler_config() -> dict[str, Any]:
    """SD 1.5 noise schedule (scaled-linear betas 0.00085 -> 0.012, 1000 steps, epsilon)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def tiny_unet_config() -> dict[str, Any]:
    """CPU toy UNet: widths (32, 64), 4 heads, cross-attention width 32, 8 x 8 latents."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    }


def tiny_vae_config() -> dict[str, Any]:
    """CPU toy VAE. Four blocks (not two) so the spatial factor is 8 like SD: 64 px -> 8 x 8."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 32, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def tiny_text_config(vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    """CPU toy CLIP text tower: hidden 32, 2 layers, 4 heads, 77 positions."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }


# ----------------------------------------------------------------------------- tokenizer
def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2/CLIP scheme)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (514 ids: 256 bytes, 256 word-final bytes, bos, eos).

    Built in memory (nothing read or downloaded); every string tokenizes (one id per byte), padded /
    truncated to 77 like the real one. bos = 512, eos = pad = 513.
    """
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


# ----------------------------------------------------------------------------- components
@dataclass
class DiffusionComponents:
    """The frozen SD parts plus schedulers. `info` maps part name -> ModelInfo."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training: add_noise / targets
    sample_scheduler: DDIMScheduler  # inference: DDIM (50 steps in the paper)
    info: dict[str, ModelInfo] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: str = ""  # "tiny", "sd15-random", or the path loaded from

    @property
    def weights_real(self) -> bool:
        return all(i.weights_real for i in self.info.values())

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def to(self, device: str | torch.device | None = None, dtype: Optional[torch.dtype] = None) -> "DiffusionComponents":
        """Move (and optionally cast) the three networks in place."""
        device = torch.device(device) if device is not None else self.device
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        self.device = device
        return self

    def freeze(self) -> "DiffusionComponents":
        """`requires_grad_(False)` + eval() on UNet, VAE and text encoder.

        Call it BEFORE installing an adapter (`PersonaAdapter.install`): its processors become UNet
        submodules, so freezing the UNet afterwards would freeze them too.
        """
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        return self

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, 77) int64 ids (padded / truncated) on `self.device`."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Prompts or (B, 77) ids -> (B, 77, D) last hidden state of the text encoder."""
        ids = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        return self.text_encoder(ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = True
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents (posterior sample or mean)."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in [-1, 1] (not clamped)."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def pipeline(self, scheduler: Literal["ddim", "ddpm"] = "ddim"):
        """A `StableDiffusionPipeline` over these parts (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.sample_scheduler if scheduler == "ddim" else self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers folder (loadable by `load_diffusion(path)`)."""
        self.pipeline("ddim").save_pretrained(str(path), safe_serialization=True)
        return Path(path)

    def announce(self) -> None:
        for i in self.info.values():
            announce(i)


def default_device() -> torch.device:
    from pipeline.devices import resolve_device

    return resolve_device("auto")


def _schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    cfg = scheduler_config()
    return DDPMScheduler.from_config(cfg), DDIMScheduler.from_config(cfg)


def build_random(
    preset: Literal["tiny", "sd15"] = "tiny",
    *,
    seed: int = RANDOM_INIT_SEED,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionComponents:
    """Components with RANDOM weights from `seed` (announced loudly, `weights_real=False`).

    `tiny`: UNet (32, 64) / VAE factor 8 / CLIP text hidden 32, for CPU runs and tests.
    `sd15`: the real SD 1.5 shapes (~4.3 GB fp32), e.g. for GPU memory / throughput checks; its
    tokenizer is the tiny byte-level one (ids < 514, valid for the 49408-entry embedding).
    """
    tokenizer = build_tiny_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if preset == "tiny":
        cfgs = {"unet": tiny_unet_config(), "vae": tiny_vae_config(), "text_encoder": tiny_text_config(len(tokenizer), bos, eos)}
    elif preset == "sd15":
        cfgs = {"unet": sd15_unet_config(), "vae": sd15_vae_config(), "text_encoder": sd15_text_config(bos=bos, eos=eos)}
    else:
        raise ValueError(f"unknown preset {preset!r} (tiny | sd15)")
    device = torch.device(device) if device is not None else default_device()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
    finally:
        torch.random.set_rng_state(gen_state)
    noise_sched, ddim = _schedulers()
    name = f"sd-{preset}-random"
    info = {
        part: ModelInfo(f"{name}-{part}", text_fingerprint(preset, part, cfg, seed), False, RANDOM_LICENSE, f"random:{preset}")
        for part, cfg in cfgs.items()
    }
    info["tokenizer"] = ModelInfo(
        "clip-byte-tokenizer", text_fingerprint("byte-level-bpe", len(tokenizer)), False, RANDOM_LICENSE, "built-in"
    )
    info["scheduler"] = ModelInfo("ddpm-ddim-sd15", text_fingerprint(scheduler_config()), True, "Apache-2.0", "diffusers")
    comps = DiffusionComponents(unet, vae, text_encoder, tokenizer, noise_sched, ddim, info, device, f"{preset}-random")
    comps.to(device, None if dtype == torch.float32 else dtype)
    comps.announce()
    return comps


def _folder_fingerprint(folder: Path, hash_weights: bool) -> str:
    """Hash over the files of one component folder: content hashes (or name/size when not hashing)."""
    parts = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix in _WEIGHT_SUFFIXES and not hash_weights:
            parts.append((rel, p.stat().st_size))
        else:
            parts.append((rel, file_fingerprint(p)))
    return text_fingerprint(*parts)


def _load_folder(path: Path, device: torch.device, dtype: torch.dtype, hash_weights: bool, license: str) -> DiffusionComponents:
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    noise_sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    ddim = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    info = {
        part: ModelInfo(f"sd-{part}", _folder_fingerprint(path / part, hash_weights), True, license, str(path / part))
        for part in _FILE_FIELDS
    }
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, noise_sched, ddim, info, device, str(path))


def _load_single_file(
    path: Path, config: Optional[str], original_config: Optional[str], device: torch.device, dtype: torch.dtype,
    hash_weights: bool, license: str,
) -> DiffusionComponents:
    from diffusers import StableDiffusionPipeline

    if config is None and original_config is None:
        raise ValueError(
            f"single-file checkpoint {path}: offline loading needs `config=` pointing at a local diffusers folder "
            "with the SD configs and tokenizer (model_index.json, unet/config.json, vae/config.json, "
            "text_encoder/config.json, tokenizer/, scheduler/; weights not needed); diffusers would otherwise "
            "download them from the hub"
        )
    kwargs: dict[str, Any] = dict(
        local_files_only=True, torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if config is not None:
        kwargs["config"] = str(config)
    if original_config is not None:
        kwargs["original_config"] = str(original_config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as e:  # make the offline failure mode obvious
        raise RuntimeError(
            f"could not load single-file checkpoint {path} offline (config={config}, original_config={original_config}); "
            f"pass config=<local diffusers folder with configs + tokenizer>: {e}"
        ) from e
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    fp = file_fingerprint(path) if hash_weights else text_fingerprint(path.name, path.stat().st_size)
    cfg_fp = text_fingerprint(pipe.unet.config, pipe.vae.config, pipe.text_encoder.config.to_dict())
    info = {
        part: ModelInfo(f"sd-{part}", text_fingerprint(fp, cfg_fp, part), True, license, str(path))
        for part in ("unet", "vae", "text_encoder")
    }
    info["tokenizer"] = ModelInfo("sd-tokenizer", text_fingerprint(len(pipe.tokenizer), cfg_fp), True, license, str(config or path))
    info["scheduler"] = ModelInfo("sd-scheduler", text_fingerprint(dict(pipe.scheduler.config)), True, license, str(config or path))
    return DiffusionComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise_sched, ddim, info, device, str(path))


def load_diffusion(
    path: str | os.PathLike | None = None,
    *,
    preset: Optional[Literal["tiny", "sd15"]] = None,
    config: Optional[str | os.PathLike] = None,
    original_config: Optional[str | os.PathLike] = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
    license: str = DEFAULT_LICENSE,
    seed: int = RANDOM_INIT_SEED,
) -> DiffusionComponents:
    """Load SD components from a local diffusers folder or single file; or a random `preset`.

    `path=None` requires `preset` ("tiny" / "sd15", random weights, loudly announced). A directory
    is read as a diffusers folder; a file as a single-file checkpoint (needs `config`, see module
    doc). `hash_weights=False` fingerprints weight files by name and size instead of sha256.
    The networks are returned in eval mode on `device` (default: CUDA when available).
    """
    if path is None:
        if preset is None:
            raise ValueError("load_diffusion: give a model `path` or a random `preset` ('tiny' | 'sd15')")
        return build_random(preset, seed=seed, device=device, dtype=dtype)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"diffusion model path {p} does not exist")
    dev = torch.device(device) if device is not None else default_device()
    if p.is_dir():
        comps = _load_folder(p, dev, dtype, hash_weights, license)
    else:
        comps = _load_single_file(p, None if config is None else str(config),
                                  None if original_config is None else str(original_config), dev, dtype, hash_weights, license)
    comps.to(dev)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.eval()
    comps.announce()
    return comps
