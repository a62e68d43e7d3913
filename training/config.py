"""Training configuration: the `train:` section of params.yaml.

    train:            shared by every method and phase (base model, resolution, device, MLflow, paths, data)
      runs:           the DVC training stages, `train@<key>`: {method, phase, after} (see dvc.yaml)
      methods:
        <method>:     validated by the method's own dataclass (`Method.config`): its options (e.g. the
          <phase>:    conditioner's) and one subsection per phase (`PhaseConfig` keys + the phase's own)

`pipeline.config.load_params` passes the section through untouched (`Params.extra`); this module
validates it strictly with `pipeline.config.build` (unknown keys and wrong types are errors).
`overrides` are dotted keys applied to the raw section before validation, e.g.
{"train.resolution": 64, "<method>.<phase>.max_steps": 5} (a key starting with a registered
method's name means `train.methods.<key>`; what `persona train --set` passes).
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
from training.methods.base import NON_TRAJECTORY_PHASE, PhaseConfig, phase_configs

SECTION = "train"


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
    experiment: str = "persona-{method}"  # {method} is replaced by the method's name
    run_name: Optional[str] = None  # null -> "<method>-<phase>"


@dataclass
class SamplingConfig:
    """The sample grid logged during training (diffusers pipeline, classifier-free guidance)."""

    num_faces: int = 4  # val faces whose conditioner inputs condition the grid
    steps: int = 10  # sampler steps (paper inference: 50)
    guidance: float = 7.5
    seed: int = 1234  # initial noise of face i: seed + i (fixed, so grids of different steps are comparable)
    scheduler: Literal["ddim", "euler_a", "dpm++"] = "ddim"


@dataclass
class ClusterConfig:
    """`train.cluster:` Ray Train scale-out (`persona train --workers N`; 0 workers = one local process).

    Not part of the run signature: note that N workers x batch_size is a different trajectory from
    one process where a loss draws per device batch (e.g. a shuffle within the batch), so do not mix
    layouts when resuming from local checkpoints."""

    workers: int = 0  # Ray Train workers (DDP ranks); 0 = plain single-process `train()`
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu
    cpus_per_worker: float = 1.0
    address: Optional[str] = None  # Ray cluster (null: $RAY_ADDRESS, else an in-process Ray)
    storage_path: str = "ray_results"  # Ray Train checkpoints/results (shared storage on multi-node clusters)
    max_failures: int = 1  # worker-group restarts from the last reported checkpoint
    dashboard: Optional[str] = None  # `persona train --submit`: the head's dashboard (null: $RAY_API_SERVER_ADDRESS)


@dataclass
class RunSpec:
    """One DVC training stage (`train@<key>` in dvc.yaml)."""

    method: str
    phase: str
    after: str = "data/shards"  # what the phase starts from (a DVC dependency: the shards, or a phase's output)


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
    out_dir: str = "models"  # <out_dir>/<method>/<phase>/adapter.safetensors + adapter.json
    checkpoints_dir: str = "checkpoints"  # <checkpoints_dir>/<method>/<phase>/*.ckpt (Lightning, for resume)
    metrics_dir: str = "metrics"  # <metrics_dir>/train_<method>_<phase>.json
    plots_dir: str = "plots"  # <plots_dir>/train_<method>_<phase>.csv (+ _samples.png)
    shards: str = "data/shards"  # shards folder (index.json, train/, val/)
    synthetic: int = 0  # > 0: train on this many in-memory synthetic samples instead of the shards
    num_workers: int = 2  # DataLoader workers (0 = in the main process)
    jpeg_draft: bool = True  # decode JPEG members at about the training resolution (Phase.decode_sizes: libjpeg DCT scaling, several times cheaper; false: full-size decodes, other pixels)
    threads: int = 0  # torch CPU threads; 0 = auto: 1 for the tiny preset on CPU (its ops are too small to split)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dvc_lock: str = "dvc.lock"  # where the shards' hash is looked up (lineage)
    shards_stage: str = "shards"  # DVC stage whose `shards` out is the data
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # Ray Train (training/cluster.py)
    runs: dict[str, RunSpec] = field(default_factory=dict)  # DVC training stages (dvc.yaml foreach)
    methods: dict[str, Any] = field(default_factory=dict)  # per method: validated by the method's dataclass


@dataclass
class TrainParams:
    """The validated `train:` section and the method sections built from it."""

    train: TrainConfig
    method_configs: dict[str, Any]

    def method(self, name: str) -> Any:
        """The built `train.methods.<name>` section (defaults when params do not have it)."""
        if name not in self.method_configs:
            from training import methods

            self.method_configs[name] = build(methods.get(name).config, {}, f"train.methods.{name}")
        return self.method_configs[name]

    def phase(self, method: str, phase: str) -> PhaseConfig:
        cfg = getattr(self.method(method), phase, None)
        if not isinstance(cfg, PhaseConfig):
            raise ConfigError(f"train.methods.{method}: no phase '{phase}'")
        return cfg

    def as_dict(self) -> dict:
        d = to_dict(self.train)
        d["methods"] = {k: to_dict(v) for k, v in self.method_configs.items()}
        return d


def expand_key(key: str) -> str:
    """'<method>.<phase>.lr' -> 'train.methods.<method>.<phase>.lr' (a registered method's name first);
    'train....' unchanged; anything else is an error."""
    head = key.split(".", 1)[0]
    if head == SECTION:
        return key
    from training import methods

    if head in methods.names():
        return f"{SECTION}.methods.{key}"
    import difflib

    close = difflib.get_close_matches(head, [SECTION, *methods.names()], n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"override '{key}'{hint}: must start with 'train.' or a method name ({', '.join(methods.names())})")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = expand_key(key).split(".")[1:]
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def validate_phase(where: str, s: PhaseConfig) -> None:
    """The generic checks of a phase config."""
    if s.max_steps < 1 or s.batch_size < 1 or s.accumulate < 1:
        raise ConfigError(f"{where}: max_steps, batch_size and accumulate must be >= 1")
    if s.log_every < 1 or s.checkpoint_every < 1 or s.keep_last < 1 or s.sample_every < 0 or s.warmup_steps < 0:
        raise ConfigError(f"{where}: log_every, checkpoint_every, keep_last >= 1; sample_every, warmup_steps >= 0")
    if not 0.0 <= s.ema < 1.0:
        raise ConfigError(f"{where}.ema: decay must be in [0, 1), got {s.ema}")
    d = s.dropout
    if min(d.image, d.text, d.both) < 0 or d.image + d.text + d.both > 1:
        raise ConfigError(f"{where}.dropout: probabilities must be >= 0 and sum to <= 1")


def _validate(tp: TrainParams) -> TrainParams:
    from training import methods

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
    for key, run in t.runs.items():
        try:
            methods.get(run.method).phase(run.phase)
        except KeyError as e:
            raise ConfigError(f"train.runs.{key}: {e.args[0]}") from None
    for name, cfg in tp.method_configs.items():
        for phase, pc in phase_configs(methods.get(name), cfg).items():
            validate_phase(f"train.methods.{name}.{phase}", pc)
        check = getattr(cfg, "validate", None)
        if check is not None:
            check(f"train.methods.{name}")
    return tp


def train_params(
    params: Union[Params, Mapping[str, Any], str, Path, None] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> TrainParams:
    """Validate the `train:` section of `params` (a Params, a raw params dict, or a params.yaml
    path; None = defaults) with dotted `overrides` applied first."""
    from training import methods

    if params is None:
        raw: dict = {}
    elif isinstance(params, Params):
        raw = copy.deepcopy(params.extra.get(SECTION) or {})
    elif isinstance(params, (str, Path)):
        raw = copy.deepcopy(load_params(params).extra.get(SECTION) or {})
    else:
        raw = copy.deepcopy(dict(params).get(SECTION) or {})
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    t = build(TrainConfig, raw, SECTION)
    built = {}
    for name, section in t.methods.items():
        try:
            m = methods.get(name)
        except KeyError as e:
            raise ConfigError(f"train.methods.{name}: {e.args[0]}") from None
        built[name] = build(m.config, section, f"train.methods.{name}")
    return _validate(TrainParams(train=t, method_configs=built))


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
NON_TRAJECTORY_TRAIN = ("mlflow", "out_dir", "checkpoints_dir", "metrics_dir", "plots_dir", "num_workers",
                        "threads", "sampling", "dvc_lock", "shards_stage", "cluster", "runs", "methods")


def method_options(tp: TrainParams, method: str) -> dict:
    """The method's own options: its section minus the phase subsections."""
    from training import methods

    phases = set(methods.get(method).phases)
    return {k: v for k, v in to_dict(tp.method(method)).items() if k not in phases}


def run_signature(tp: TrainParams, method: str, phase: str, *extra: Any) -> str:
    """Hash of everything that determines the weight trajectory of a phase (+ extra, e.g. data ids)."""
    t = {k: v for k, v in to_dict(tp.train).items() if k not in NON_TRAJECTORY_TRAIN}
    s = {k: v for k, v in to_dict(tp.phase(method, phase)).items() if k not in NON_TRAJECTORY_PHASE}
    blob = json.dumps({"method": method, "phase": phase, "train": t, "options": method_options(tp, method),
                       "phase_cfg": s, "extra": [str(e) for e in extra]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
