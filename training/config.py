"""Training configuration: the `train`, `train_stage1`, `train_stage2` sections of params.yaml.

`pipeline.config.load_params` passes these sections through untouched (`Params.extra`); this module
validates them strictly with `pipeline.config.build` (unknown keys and wrong types are errors).

    train:          shared by both stages (base model, resolution, device, MLflow, paths, data)
    train_stage1:   Stage I  (aligned faces + neutral prompts; WProj + W+ attention trained)
    train_stage2:   Stage II (in-the-wild crops + captions + masks; WProj frozen; rec + dis + reg)

`overrides` are dotted keys applied to the raw sections before validation, e.g.
{"train.resolution": 64, "train_stage1.max_steps": 5} (what `persona train --set` passes).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from pipeline.config import ConfigError, Params, build, load_params, to_dict

SECTIONS = ("train", "train_stage1", "train_stage2")


@dataclass
class BaseModelConfig:
    """The frozen Stable Diffusion. `path` (local diffusers folder or single file) wins over `preset`."""

    preset: Optional[Literal["tiny", "sd15"]] = "tiny"  # random-weight preset when path is null (loudly announced)
    path: Optional[str] = None  # local SD 1.5 diffusers folder or single-file .safetensors/.ckpt
    config: Optional[str] = None  # single-file only: local diffusers folder with the configs + tokenizer
    hash_weights: bool = True  # fingerprint weight files by content (false: by name + size)


@dataclass
class MlflowConfig:
    """Tracking. All three locations are set explicitly (MLflow 3 defaults differ per folder state)."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlruns.db"
    registry_uri: Optional[str] = None  # null -> tracking_uri
    artifact_location: str = "mlartifacts"  # for a NEW experiment; a local path is made absolute
    experiment: str = "persona-wplus"
    run_name: Optional[str] = None  # null -> "wplus-stage<N>"


@dataclass
class SamplingConfig:
    """The sample grid logged during training (DDIM, classifier-free guidance)."""

    num_faces: int = 4  # val faces whose W+ codes condition the grid
    steps: int = 10  # DDIM steps (paper inference: 50)
    guidance: float = 7.5
    seed: int = 1234  # initial noise (fixed, so grids of different steps are comparable)


@dataclass
class ClusterConfig:
    """`train.cluster:` Ray Train scale-out (`persona train --workers N`; 0 workers = one local process).

    Not part of the run signature: note that N workers x batch_size is a different trajectory from
    one process (per-rank RNG streams), so do not mix layouts when resuming from local checkpoints."""

    workers: int = 0  # Ray Train workers (DDP ranks); 0 = plain single-process `train()`
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu
    cpus_per_worker: float = 1.0
    address: Optional[str] = None  # Ray cluster (null: $RAY_ADDRESS, else an in-process Ray)
    storage_path: str = "ray_results"  # Ray Train checkpoints/results (shared storage on multi-node clusters)
    max_failures: int = 1  # worker-group restarts from the last reported checkpoint
    dashboard: Optional[str] = None  # `persona train --submit`: the head's dashboard (null: $RAY_API_SERVER_ADDRESS)


@dataclass
class TrainConfig:
    """`train:` shared settings."""

    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    resolution: int = 64  # training image side in px (tiny: 64, SD 1.5: 512); latents are resolution / 8
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "16-mixed"] = "auto"  # auto: bf16/16-mixed on GPU, 32 on CPU
    frozen_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen UNet/VAE/text encoder; auto follows precision
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    out_dir: str = "models/wplus"  # <out_dir>/stage<N>/adapter.safetensors + adapter.json
    checkpoints_dir: str = "checkpoints/wplus"  # <checkpoints_dir>/stage<N>/*.ckpt (Lightning, for resume)
    metrics_dir: str = "metrics"  # <metrics_dir>/train_stage<N>.json
    plots_dir: str = "plots"  # <plots_dir>/train_stage<N>.csv (+ _samples.png)
    shards: str = "data/shards"  # shards folder (index.json, train/, val/)
    synthetic: int = 0  # > 0: train on this many in-memory synthetic samples instead of the shards
    num_workers: int = 2  # DataLoader workers (0 = in the main process)
    threads: int = 0  # torch CPU threads; 0 = auto: 1 for the tiny preset on CPU (its ops are too small to split)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dvc_lock: str = "dvc.lock"  # where the shards' hash is looked up (lineage)
    shards_stage: str = "shards"  # DVC stage whose `shards` out is the data
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # Ray Train (training/cluster.py)


@dataclass
class DropoutConfig:
    """Condition dropout for classifier-free guidance (one draw per sample, exclusive cases)."""

    image: float = 0.05
    text: float = 0.05
    both: float = 0.05


@dataclass
class ImageAugConfig:
    """Stage II in-the-wild augmentation: colour jitter, rotation, square crops keeping the whole face."""

    brightness: float = 0.2  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0  # shift in turns, uniform in [-h, h] (the authors used 0)
    rotation: float = 10.0  # degrees, uniform in [-r, r]; a rotation that cuts the face is undone
    min_crop_scale: float = 0.6  # crop side >= this * image side where the face allows it
    min_face_fraction: float = 0.15  # face box side >= this * crop side (small faces get tighter crops)


@dataclass
class StageConfig:
    """`train_stage1:` (and the common part of `train_stage2:`)."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per device
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warm-up from 0 to lr, then constant
    grad_clip: float = 1.0  # max grad norm; 0 = off
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    log_every: int = 10  # steps between logged metrics
    sample_every: int = 500  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 500  # steps between Lightning checkpoints
    keep_last: int = 3  # checkpoints kept (plus last.ckpt)
    ema: float = 0.0  # EMA decay of the adapter weights (0 = off); the exported adapter is the EMA
    gradient_checkpointing: bool = False


@dataclass
class Stage2Config(StageConfig):
    """`train_stage2:` Stage I keys plus the Stage II objective and augmentation."""

    init: Optional[str] = None  # Stage I adapter; null -> <out_dir>/stage1/adapter.safetensors
    l_dis: float = 1.5
    l_reg: float = 1.0
    augment: Literal["shuffle", "noise", "both"] = "both"  # W+ augmentation for the disentanglement loss
    noise_sigma: float = 1.0  # Gaussian noise on W+ (W+ units)
    image_aug: ImageAugConfig = field(default_factory=ImageAugConfig)


@dataclass
class TrainParams:
    """The three validated sections."""

    train: TrainConfig
    stage1: StageConfig
    stage2: Stage2Config

    def stage(self, n: int) -> StageConfig:
        if n == 1:
            return self.stage1
        if n == 2:
            return self.stage2
        raise ValueError(f"stage must be 1 or 2, got {n!r}")

    def as_dict(self) -> dict:
        return {"train": to_dict(self.train), "train_stage1": to_dict(self.stage1), "train_stage2": to_dict(self.stage2)}


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"override '{key}': must start with one of {', '.join(SECTIONS)}")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def _validate(tp: TrainParams) -> TrainParams:
    t = tp.train
    if t.resolution < 8 or t.resolution % 8:
        raise ConfigError(f"train.resolution: must be a positive multiple of 8, got {t.resolution}")
    if t.num_workers < 0 or t.synthetic < 0 or t.threads < 0:
        raise ConfigError("train.num_workers / synthetic / threads must be >= 0")
    if t.cluster.workers < 0 or t.cluster.max_failures < 0 or t.cluster.cpus_per_worker < 0:
        raise ConfigError("train.cluster: workers, max_failures and cpus_per_worker must be >= 0")
    if t.sampling.num_faces < 1 or t.sampling.steps < 1:
        raise ConfigError("train.sampling.num_faces and steps must be >= 1")
    if t.base_model.path is None and t.base_model.preset is None:
        raise ConfigError("train.base_model: give a path or a preset (tiny | sd15)")
    for name, s in (("train_stage1", tp.stage1), ("train_stage2", tp.stage2)):
        if s.max_steps < 1 or s.batch_size < 1 or s.accumulate < 1:
            raise ConfigError(f"{name}: max_steps, batch_size and accumulate must be >= 1")
        if s.log_every < 1 or s.checkpoint_every < 1 or s.keep_last < 1 or s.sample_every < 0 or s.warmup_steps < 0:
            raise ConfigError(f"{name}: log_every, checkpoint_every, keep_last >= 1; sample_every, warmup_steps >= 0")
        if not 0.0 <= s.ema < 1.0:
            raise ConfigError(f"{name}.ema: decay must be in [0, 1), got {s.ema}")
        d = s.dropout
        if min(d.image, d.text, d.both) < 0 or d.image + d.text + d.both > 1:
            raise ConfigError(f"{name}.dropout: probabilities must be >= 0 and sum to <= 1")
    a = tp.stage2.image_aug
    if not (0 < a.min_crop_scale <= 1 and 0 <= a.min_face_fraction <= 1):
        raise ConfigError("train_stage2.image_aug: min_crop_scale in (0, 1], min_face_fraction in [0, 1]")
    return tp


def train_params(
    params: Union[Params, Mapping[str, Any], str, Path, None] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> TrainParams:
    """Validate the training sections of `params` (a Params, a raw dict, or a params.yaml path;
    None = defaults) with dotted `overrides` applied first."""
    if params is None:
        raw: dict = {}
    elif isinstance(params, Params):
        raw = copy.deepcopy(params.extra)
    elif isinstance(params, (str, Path)):
        raw = copy.deepcopy(load_params(params).extra)
    else:
        raw = copy.deepcopy(dict(params))
    raw = {k: (raw.get(k) or {}) for k in SECTIONS}
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    tp = TrainParams(
        train=build(TrainConfig, raw["train"], "train"),
        stage1=build(StageConfig, raw["train_stage1"], "train_stage1"),
        stage2=build(Stage2Config, raw["train_stage2"], "train_stage2"),
    )
    return _validate(tp)


def flat_params(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclass/dict -> {"a.b.c": value} (for MLflow params)."""
    d = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = v
    return out


# Keys that cannot change the trained weights (excluded from the run signature, so changing them,
# or raising max_steps, still resumes from the existing checkpoints).
_NON_TRAJECTORY_TRAIN = ("mlflow", "out_dir", "checkpoints_dir", "metrics_dir", "plots_dir", "num_workers",
                         "threads", "sampling", "dvc_lock", "shards_stage", "cluster")
_NON_TRAJECTORY_STAGE = ("max_steps", "log_every", "sample_every", "checkpoint_every", "keep_last")


def run_signature(tp: TrainParams, stage: int, *extra: Any) -> str:
    """Hash of everything that determines the weight trajectory of `stage` (+ extra, e.g. data ids)."""
    t = {k: v for k, v in to_dict(tp.train).items() if k not in _NON_TRAJECTORY_TRAIN}
    s = {k: v for k, v in to_dict(tp.stage(stage)).items() if k not in _NON_TRAJECTORY_STAGE}
    blob = json.dumps({"stage": stage, "train": t, "stage_cfg": s, "extra": [str(e) for e in extra]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
