"""Generation with a trained adapter of any method: reference photo(s) and / or method inputs +
prompts -> images, through a diffusers `StableDiffusionPipeline`.

    adapter folder (or models:/name@alias) --load_persona_adapter--> pipeline with the injection
    reference photos --ReferenceKit (the data pipeline's detection, alignment, masks, member
    encoders)--> shard-like samples --Method.prepare / Method.inputs--> conditioner inputs
    conditioner inputs --conditioner--> tokens --injection--> UNet / text encoder
    any diffusers scheduler (ddim | euler_a | dpm++), classifier-free guidance with the negative
    prompt + the conditioner's null tokens, identity scale lambda, 0 for the first `delay_steps`
    steps (delayed identity start, via `callback_on_step_end`)

Several identities (`Request.identities`, each with its reference photos, mixing weights and image
region) reach injections that support them as (B, K, T, D) tokens + (B, K, H, W) regions.

Image-to-image (`Request.content`, `persona generate --content PHOTO --strength S`): the content
photo, centre-cropped to the output's aspect and resized (by default the output keeps the photo's
aspect, its shorter side the default size), is the start of a diffusers
`StableDiffusionImg2ImgPipeline` over the same components (`training.sampling`). With several
identities and no region masks, the regions are the content photo's person instances
(`ReferenceKit.persons`: the selfie person mask split among its faces,
`pipeline.models.instances`), person k (left to right) for identity k, or person `assign[k]`.
The record keeps the fitted content image, the instance map, each identity's region mask, the
assignment and the mixing weights, so `--from-json` re-runs it to the same pixels.
Method-specific inputs: `Request.inputs` (named files, `--input NAME=PATH`) and `Request.options`
(`--option KEY=VALUE`), read by `Method.prepare`. The model sees `Method.prompt(prompt, adapter)`
(recorded as `model_prompt` beside the prompt as given). Sampling defaults: the `generate` section,
then `generate.methods.<method>` (`with_method_defaults`; what `persona generate` applies before its
flags).

Adapters come from a folder holding `adapter.safetensors` + `adapter.json` (what training writes),
or from the MLflow registry: `models:/<name>@<alias>` or `models:/<name>/<version>` (the version's
MLflow model, downloaded with `mlflow.artifacts.download_artifacts`, holds the adapter files; the
alias is pinned to its version in the records).

Every image is written as `<stem>.png` with `<stem>.json` (everything needed to reproduce it: adapter
uri/path + sha256, base model, prompts, seed, scheduler, steps, guidance, lambda, delay, the
conditioner inputs (`<name>.id<k>.<input>.npy`, with sha256) and what the method recorded about
them (reference sha256s, edits), versions). `regenerate(json)` (`persona generate --from-json`)
re-runs it from that record; on CPU the pixels are identical.

Images are HxWx3 uint8 RGB; the initial latent noise of image i comes from its own CPU generator
seeded with its seed, so it does not depend on the device or on the batch it is in.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.config import ConfigError, Params, load_params, to_dict
from pipeline.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from pipeline.digests import sha256_bytes, sha256_file
from pipeline.gitinfo import git_commit
from training.sections import section_config
from training.methods.base import Identity, Prepared

log = logging.getLogger("persona.generate")

RECORD_FORMAT = "persona-generation/2"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
SCHEDULERS = ("ddim", "euler_a", "dpm++")


# ============================================================================================
# config (`generate:` section of params.yaml)


@dataclass
class BaseModelOverride:
    """Base SD model to use instead of the one recorded with the adapter (all null: the recorded one)."""

    preset: Optional[Literal["tiny", "sd15"]] = None
    path: Optional[str] = None
    config: Optional[str] = None  # single-file checkpoints: local diffusers folder with configs + tokenizer


@dataclass
class MethodSampling:
    """`generate.methods.<method>:` a method's own sampling defaults (null: the section's value)."""

    scheduler: Optional[Literal["ddim", "euler_a", "dpm++"]] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None


@dataclass
class GenerateConfig:
    adapter: Optional[str] = None  # folder with adapter.json, or models:/<name>@<alias>
    base_model: BaseModelOverride = field(default_factory=BaseModelOverride)
    negative_prompt: str = ""
    scheduler: Literal["ddim", "euler_a", "dpm++"] = "ddim"
    steps: int = 50  # sampler steps
    guidance: float = 7.5  # CFG scale; <= 1 = no unconditional branch
    scale: Optional[float] = None  # lambda, weight of the identity; null -> the adapter's default (adapter.json scale)
    delay_steps: int = 0  # steps at the start with lambda = 0
    seed: int = 0  # first seed; image k of a prompt uses seed + k
    strength: float = 0.75  # image-to-image (--content): how much of the content photo is re-generated, 0..1
    num_images: int = 1  # per prompt
    height: Optional[int] = None  # null -> the adapter's training resolution, else the UNet's native size
    width: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    out: str = "outputs/generate"
    tracking_uri: Optional[str] = None  # for models:/ adapters; null -> $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    registry_uri: Optional[str] = None  # null -> $MLFLOW_REGISTRY_URI or the tracking URI
    # per method: its sampling defaults over the ones above (e.g. a paper's scheduler / steps / CFG);
    # command-line flags still win (`with_method_defaults`)
    methods: dict[str, MethodSampling] = field(default_factory=dict)


def with_method_defaults(cfg: GenerateConfig, method: str) -> GenerateConfig:
    """`cfg` with `methods[method]`'s non-null sampling values applied (a copy)."""
    import dataclasses

    own = cfg.methods.get(method)
    if own is None:
        return cfg
    return dataclasses.replace(cfg, **{k: v for k, v in dataclasses.asdict(own).items() if v is not None})


def generate_config(params: Params | Mapping[str, Any] | None = None) -> GenerateConfig:
    """Validate the `generate:` section (a Params, the raw section dict, or None for defaults)."""
    cfg = section_config(GenerateConfig, params, "generate")
    check_sampling(cfg.steps, cfg.delay_steps, cfg.num_images, "generate")
    check_strength(cfg.strength, "generate")
    return cfg


def check_strength(strength: float, where: str = "generate") -> None:
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"{where}.strength must be in (0, 1], got {strength}")


def check_sampling(steps: int, delay_steps: int, num_images: int = 1, where: str = "generate") -> None:
    if steps < 1:
        raise ConfigError(f"{where}.steps must be >= 1, got {steps}")
    if delay_steps < 0:
        raise ConfigError(f"{where}.delay_steps must be >= 0, got {delay_steps}")
    if num_images < 1:
        raise ConfigError(f"{where}.num_images must be >= 1, got {num_images}")


def versions() -> dict[str, Optional[str]]:
    """Versions of what determines the pixels (recorded with every image)."""
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "persona_commit": git_commit()}
    for pkg in ("persona", "torch", "diffusers", "transformers", "numpy", "safetensors", "mediapipe", "onnxruntime"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["torch_threads"] = str(torch.get_num_threads())
    return out


# ============================================================================================
# adapters: folder or registry


@dataclass
class ResolvedAdapter:
    """A local adapter folder and where it came from."""

    folder: Path  # holds adapter.safetensors + adapter.json
    spec: str  # as given (path or models:/ uri)
    meta: dict  # adapter.json
    sha256: str  # of adapter.safetensors
    uri: Optional[str] = None  # pinned registry uri models:/<name>/<version> (None for a local folder)
    registry: Optional[dict] = None  # {"name", "version", "alias", "run_id", "source"}

    def as_record(self) -> dict:
        return {"spec": self.spec, "uri": self.uri, "path": None if self.uri else str(self.folder.resolve()),
                "sha256": self.sha256, "registry": self.registry, "method": self.meta.get("method"),
                "phase": self.meta.get("phase"), "global_step": self.meta.get("global_step"),
                "mlflow": self.meta.get("mlflow"), "lineage": self.meta.get("lineage"),
                "weights_real": self.meta.get("weights_real")}


def parse_models_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """'models:/name@alias' -> (name, None, alias); 'models:/name/3' -> (name, '3', None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a models:/ uri: {uri!r}")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if not name or not alias or "/" in alias:
            raise ValueError(f"bad models uri {uri!r} (models:/<name>@<alias>)")
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"bad models uri {uri!r} (models:/<name>@<alias> or models:/<name>/<version>)")
    return name, version, None


def portable_uri(uri: str) -> str:
    """A tracking URI as recorded: relative SQLite paths made absolute, user:password@ removed."""
    from urllib.parse import urlsplit, urlunsplit

    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def read_adapter_folder(folder: str | os.PathLike) -> tuple[Path, dict]:
    """(folder, adapter.json) of an adapter folder, or of the folder of an adapter.safetensors file."""
    p = Path(folder)
    if p.is_file():
        p = p.parent
    if not (p / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{p}: no {ADAPTER_FILE} (expected an adapter folder written by training)")
    meta_path = p / ADAPTER_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{p}: no {ADAPTER_META} beside {ADAPTER_FILE}")
    return p, json.loads(meta_path.read_text())


def resolve_adapter(
    spec: str,
    *,
    tracking_uri: Optional[str] = None,
    registry_uri: Optional[str] = None,
    dst: Optional[str | os.PathLike] = None,
    expect_sha256: Optional[str] = None,
) -> ResolvedAdapter:
    """A local folder, or a registry version downloaded into `dst` (default: a fresh temp folder)."""
    if not spec.startswith("models:/"):
        folder, meta = read_adapter_folder(spec)
        res = ResolvedAdapter(folder, spec, meta, sha256_file(folder / ADAPTER_FILE))
    else:
        from training.registry import Registry

        name, version, alias = parse_models_uri(spec)
        reg = Registry(tracking_uri=tracking_uri, registry_uri=registry_uri)
        mv = reg.version(name, alias or version)
        target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"persona-{name}-v{mv.version}-"))
        folder = reg.download(name, mv.version, target)
        from training.pyfunc import adapter_folder

        folder, meta = read_adapter_folder(adapter_folder(folder) or folder)  # an MLflow model holds it in artifacts/
        res = ResolvedAdapter(folder, spec, meta, sha256_file(folder / ADAPTER_FILE), uri=f"models:/{name}/{mv.version}",
                              registry={"name": name, "version": str(mv.version), "alias": alias,
                                        "run_id": mv.run_id, "source": mv.source,
                                        "tracking_uri": portable_uri(reg.tracking_uri),
                                        "registry_uri": portable_uri(reg.registry_uri)})
        tag_sha = (mv.tags or {}).get("adapter_sha256")
        if tag_sha and tag_sha != res.sha256:
            raise RuntimeError(f"{res.uri}: downloaded adapter sha256 {res.sha256[:12]} != registered {tag_sha[:12]}")
    if expect_sha256 and expect_sha256 != res.sha256:
        raise RuntimeError(
            f"adapter {spec}: sha256 {res.sha256[:16]} differs from the recorded {expect_sha256[:16]}; "
            "this is not the adapter the record was made with"
        )
    return res


# ============================================================================================
# the generator


@dataclass
class Generator:
    """SD components in a diffusers pipeline with an adapter installed; `sample` draws images."""

    comps: Any  # pipeline.models.diffusion.DiffusionComponents
    pipe: Any  # diffusers StableDiffusionPipeline over comps
    adapter: Any  # training.adapter.PersonaAdapter (installed)
    method: Any  # training.methods.base.Method
    resolved: ResolvedAdapter
    base: dict  # {"preset", "path", "config"} actually loaded

    @classmethod
    def load(
        cls,
        adapter: str | ResolvedAdapter,
        *,
        base: Optional[Mapping[str, Any]] = None,
        device: str = "auto",
        dtype: str = "auto",
        tracking_uri: Optional[str] = None,
        registry_uri: Optional[str] = None,
    ) -> "Generator":
        from pipeline.models.diffusion import load_diffusion
        from training import methods
        from training.adapter import load_persona_adapter
        from training.sampling import make_pipeline

        res = adapter if isinstance(adapter, ResolvedAdapter) else resolve_adapter(
            adapter, tracking_uri=tracking_uri, registry_uri=registry_uri)
        b = dict(res.meta.get("base_model") or {})
        if base and any(v is not None for v in base.values()):
            b = {k: v for k, v in base.items() if v is not None}
        spec = {"preset": b.get("preset"), "path": b.get("path"), "config": b.get("config")}
        if spec["path"] is None and spec["preset"] is None:
            raise ValueError(f"adapter {res.spec}: adapter.json names no base model (base_model.preset/path); pass one")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        comps = load_diffusion(spec["path"], preset=None if spec["path"] else spec["preset"], config=spec["config"],
                               device=dev, dtype=dt)
        comps.freeze()
        pipe = make_pipeline(comps)
        ad = load_persona_adapter(pipe, res.folder / ADAPTER_FILE)
        if not res.meta.get("weights_real", {}) or not all(res.meta.get("weights_real", {}).values()):
            log.warning("!!! adapter %s was trained with RANDOM weights somewhere (%s): its images are NOT meaningful !!!",
                        res.spec, res.meta.get("weights_real"))
        return cls(comps, pipe, ad, methods.get(ad.method), res, spec)

    @property
    def device(self) -> torch.device:
        return self.comps.device

    @property
    def dtype(self) -> torch.dtype:
        return self.comps.unet.dtype

    @property
    def native_size(self) -> int:
        """Image side the UNet was configured for (sample_size x VAE factor): tiny 64, SD 1.5 512."""
        return int(self.comps.unet.config.sample_size) * self.comps.vae_scale_factor

    @property
    def default_size(self) -> int:
        """Image side to generate by default: the adapter's training resolution (adapter.json
        `resolution`) when recorded, else the UNet's native size."""
        r = self.resolved.meta.get("resolution")
        return int(r) if isinstance(r, int) and r > 0 else self.native_size

    @property
    def default_scale(self) -> float:
        """lambda when the request leaves it unset: the method's inference default recorded in
        adapter.json (`scale`), else 1.0."""
        s = self.resolved.meta.get("scale")
        return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else 1.0

    @property
    def weights_real(self) -> dict[str, bool]:
        d = {f"base.{k}": bool(v.weights_real) for k, v in self.comps.info.items()}
        d.update({f"adapter.{k}": bool(v) for k, v in (self.resolved.meta.get("weights_real") or {}).items()})
        return d

    def sample(
        self,
        conditioning: Sequence[Sequence[Mapping[str, np.ndarray]]],
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
        image: Optional[np.ndarray] = None,
        strength: float = 0.75,
    ) -> np.ndarray:
        """B conditionings (per image: the conditioner inputs of its identities), B prompts, B seeds
        -> (B, H, W, 3) uint8 images (see `training.sampling.sample`). `image`: an (H, W, 3) uint8
        content image for image-to-image at `strength` (its size is the output's)."""
        from training.sampling import sample

        check_sampling(steps, delay_steps)
        f = self.comps.vae_scale_factor
        if image is not None:
            height, width = image.shape[:2]
        h, wd = int(height or self.default_size), int(width or self.default_size)
        if h % f or wd % f:
            raise ValueError(f"height/width must be multiples of {f}, got {h}x{wd}")
        return sample(self.pipe, self.adapter, conditioning, prompts, seeds, scheduler=scheduler,
                      negative_prompt=negative_prompt, steps=steps, guidance=guidance, scale=scale,
                      delay_steps=delay_steps, height=h, width=wd, regions=regions,
                      images=None if image is None else [image] * len(prompts), strength=strength)


# ============================================================================================
# requests -> conditioner inputs


@dataclass
class Request:
    """What to generate: prompts x num_images with the same conditioning."""

    prompts: list[str]
    identities: list[Identity] = field(default_factory=list)  # none: the method's inputs alone
    inputs: dict[str, str] = field(default_factory=dict)  # method-specific named files (--input NAME=PATH)
    options: dict[str, str] = field(default_factory=dict)  # method-specific options (--option KEY=VALUE)
    name: str = "img"  # file stem prefix
    content: Optional[str] = None  # content photo: image-to-image (and the persons' regions of several identities)
    assign: Optional[list[int]] = None  # identity k -> person assign[k] of the content photo (default k)
    method: Optional[str] = None  # the adapter must be of this method (None: any)


def load_regions(identities: Sequence[Identity], height: int, width: int) -> Optional[torch.Tensor]:
    """(1, K, H, W) float masks in [0, 1] of K identities' regions (None: a single identity / no regions)."""
    if len(identities) <= 1:
        return None
    from PIL import Image

    if any(i.region is None for i in identities):
        raise ValueError("several identities: give each one's region mask (--region)")
    masks = []
    for i in identities:
        with Image.open(i.region) as im:
            masks.append(np.asarray(im.convert("L").resize((width, height), Image.Resampling.BILINEAR),
                                    dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(masks))[None]


def content_size(width: int, height: int, side: int, multiple: int) -> tuple[int, int]:
    """(h, w) of an output keeping a photo's aspect: the shorter side `side`, the longer one scaled
    and rounded to a multiple of `multiple`."""
    short, long_ = min(width, height), max(width, height)
    other = max(multiple, int(round(side * long_ / short / multiple)) * multiple)
    return (side, other) if height <= width else (other, side)


def fit_box(width: int, height: int, w: int, h: int) -> tuple[float, float, float, float]:
    """The centred box of a width x height photo with the aspect w : h (what `fit_image` keeps)."""
    if width * h > height * w:  # wider than the target: cut the sides
        cw = height * w / h
        return ((width - cw) / 2, 0.0, (width + cw) / 2, float(height))
    ch = width * h / w
    return (0.0, (height - ch) / 2, float(width), (height + ch) / 2)


def fit_image(img: np.ndarray, h: int, w: int, labels: bool = False) -> np.ndarray:
    """A photo (H, W, 3) or label map (H, W) centre-cropped to the aspect w : h and resized to (h, w)
    (Lanczos; nearest for labels)."""
    from PIL import Image

    box = fit_box(img.shape[1], img.shape[0], w, h)
    resample = Image.Resampling.NEAREST if labels else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), resample, box=box)).copy()


def content_regions(identities: Sequence[Identity], labels: np.ndarray, persons: int, assign: Optional[Sequence[int]],
                    out: Path, stem: str) -> tuple[list[Identity], list[int]]:
    """Identity k gets person assign[k] (default k) of a fitted label map (i + 1 = person i): its mask
    is written as `<stem>.id<k>.region.png` (255 = the person) and becomes its region."""
    import dataclasses

    k = len(identities)
    assign = list(range(k)) if assign is None else [int(a) for a in assign]
    if persons < k:
        raise ValueError(f"the content photo shows {persons} person(s) with a face, {k} identities were given")
    if len(assign) != k or len(set(assign)) != k or not all(0 <= a < persons for a in assign):
        raise ValueError(f"--assign: {k} distinct person indices in 0..{persons - 1} (0 = leftmost), got {assign}")
    from pipeline.images import encode_png

    out_ids = []
    for i, (ident, a) in enumerate(zip(identities, assign)):
        mask = np.where(labels == a + 1, 255, 0).astype(np.uint8)
        if not mask.any():
            log.warning("person %d of the content photo vanishes at the output size: identity %d has no region", a, i)
        path = out / f"{stem}.id{i}.region.png"
        path.write_bytes(encode_png(mask))
        out_ids.append(dataclasses.replace(ident, region=str(path)))
    return out_ids, assign


def _prepare_content(req: "Request", identities: list[Identity], kit: Any, out: Path, h: int, wd: int,
                     sized: bool, side: int, multiple: int) -> tuple[dict, np.ndarray, list[Identity]]:
    """The content photo fitted to the output (+ the persons' regions of several identities)."""
    from pipeline.images import load_rgb

    rgb, _ = load_rgb(req.content)
    if not sized:
        h, wd = content_size(rgb.shape[1], rgb.shape[0], side, multiple)
    img = fit_image(rgb, h, wd)
    rec: dict = {"photo": str(req.content), "photo_sha256": sha256_file(req.content), "file": f"{req.name}.content.png",
                 "box": [round(v, 3) for v in fit_box(rgb.shape[1], rgb.shape[0], wd, h)]}
    rec["sha256"] = _write_png(out / rec["file"], img)
    if len(identities) > 1 and all(i.region is None for i in identities):
        labels, faces = kit.persons(req.content)
        fitted = fit_image(labels, h, wd, labels=True)
        identities, assign = content_regions(identities, fitted, len(faces), req.assign, out, req.name)
        rec.update({"persons": faces, "assignment": assign, "instances": {
            "file": f"{req.name}.instances.png", "sha256": _write_png(out / f"{req.name}.instances.png", fitted),
            "rule": "pipeline.models.instances.split_persons", "params": to_dict(kit.params.instances)}})
    elif req.assign is not None:
        raise ValueError("--assign needs several identities without --region masks")
    return rec, img, identities


def _write_png(path: Path, img: np.ndarray) -> str:
    from pipeline.images import encode_png

    data = encode_png(img)
    path.write_bytes(data)
    return sha256_bytes(data)


def _save_npy(path: Path, a: np.ndarray) -> str:
    np.save(path, np.ascontiguousarray(a), allow_pickle=False)
    return sha256_file(path)


def save_conditioning(out: Path, stem: str, prepared: Sequence[Prepared], identities: Sequence[Identity]) -> list[dict]:
    """Write each identity's conditioner inputs as `<stem>.id<k>.<input>.npy`; their record entries."""
    recs = []
    for k, p in enumerate(prepared):
        files = {}
        for name, arr in p.inputs.items():
            fname = f"{stem}.id{k}.{name}.npy"
            files[name] = {"file": fname, "sha256": _save_npy(out / fname, np.asarray(arr)), "shape": list(np.shape(arr))}
        ident = identities[k] if k < len(identities) else Identity()
        recs.append({"inputs": files, "region": ident.region, "weights": ident.weights,
                     "region_sha256": sha256_file(ident.region) if ident.region else None, **p.record})
    return recs


def load_conditioning(src: Path, entries: Sequence[dict]) -> list[dict[str, np.ndarray]]:
    """The recorded conditioner inputs, each checked against its sha256."""
    out = []
    for e in entries:
        inputs = {}
        for name, f in e["inputs"].items():
            p = src / f["file"]
            if sha256_file(p) != f["sha256"]:
                raise RuntimeError(f"{p}: sha256 differs from the record (the conditioner input was modified)")
            inputs[name] = np.load(p, allow_pickle=False)
        out.append(inputs)
    return out


def generate(
    req: Request,
    cfg: GenerateConfig,
    *,
    params: Optional[Params] = None,
    generator: Optional[Generator] = None,
    kit: Any = None,
    out: Optional[str | os.PathLike] = None,
) -> list[dict]:
    """Generate len(prompts) x num_images images into `out` (default cfg.out); returns the records."""
    from training.references import ReferenceKit

    params = params or Params()
    if not req.prompts:
        raise ValueError("generate: give at least one prompt")
    if not cfg.adapter and generator is None:
        raise ValueError("generate: no adapter (give --adapter DIR | models:/NAME@ALIAS, or params generate.adapter)")
    gen = generator or Generator.load(cfg.adapter, base=to_dict(cfg.base_model), device=cfg.device, dtype=cfg.dtype,
                                      tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)
    if req.method is not None and gen.method.name != req.method:
        raise ValueError(f"generate: the adapter {gen.resolved.spec} is a '{gen.method.name}' adapter, not '{req.method}'")
    check_strength(cfg.strength)
    identities = list(req.identities) or [Identity()]
    out = Path(out or cfg.out)
    h, wd = int(cfg.height or gen.default_size), int(cfg.width or gen.default_size)
    content, image = None, None
    own = kit is None
    kit = kit or ReferenceKit(params)
    try:
        if req.content:
            out.mkdir(parents=True, exist_ok=True)
            content, image, identities = _prepare_content(
                req, identities, kit, out, h, wd, sized=cfg.height is not None or cfg.width is not None,
                side=gen.default_size, multiple=gen.comps.vae_scale_factor)
            h, wd = image.shape[:2]
            content["strength"] = float(cfg.strength)
        kit.content = req.content
        prepared = [gen.method.prepare(i, req.inputs, req.options, kit) for i in identities]
    finally:
        kit.content = None
        if own:
            kit.close()

    out.mkdir(parents=True, exist_ok=True)
    regions = load_regions(identities, h, wd)
    conditioning = save_conditioning(out, req.name, prepared, identities)
    scale = gen.default_scale if cfg.scale is None else float(cfg.scale)
    vers = versions()
    records = []
    for pi, prompt in enumerate(req.prompts):
        model_prompt = gen.method.prompt(prompt, gen.adapter)
        for k in range(cfg.num_images):
            seed = cfg.seed + k
            stem = f"{req.name}-p{pi:02d}-seed{seed}"
            img = gen.sample([[p.inputs for p in prepared]], [model_prompt], [seed], scheduler=cfg.scheduler,
                             negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,
                             scale=scale, delay_steps=cfg.delay_steps, height=h, width=wd, regions=regions,
                             image=image, strength=cfg.strength)[0]
            rec = {
                "format": RECORD_FORMAT,
                "image": {"file": f"{stem}.png", "sha256": _write_png(out / f"{stem}.png", img), "height": h, "width": wd},
                "method": gen.method.name,
                "conditioning": conditioning,
                "content": content,
                "request": {"inputs": dict(req.inputs), "options": dict(req.options)},
                "prompt": prompt,
                "model_prompt": model_prompt,
                "negative_prompt": cfg.negative_prompt,
                "seed": int(seed),
                "scheduler": {"name": cfg.scheduler, "class": type(gen.pipe.scheduler).__name__,
                              "config": dict(gen.pipe.scheduler.config)},
                "steps": int(cfg.steps),
                "guidance": float(cfg.guidance),
                "lambda": scale,
                "delay_steps": int(cfg.delay_steps),
                "adapter": gen.resolved.as_record(),
                "base_model": {**gen.base, "parts": {k2: v.as_dict() for k2, v in gen.comps.info.items()}},
                "device": str(gen.device),
                "dtype": DTYPE_NAMES.get(gen.dtype, str(gen.dtype)),
                "batch_size": 1,
                "weights_real": gen.weights_real,
                "versions": vers,
            }
            if not all(rec["weights_real"].values()):
                rec["warning"] = "RANDOM WEIGHTS somewhere in this generation (see weights_real): not meaningful"
            (out / f"{stem}.json").write_text(json.dumps(rec, indent=2, sort_keys=True, default=str))
            records.append(rec)
            log.info("wrote %s (%dx%d, seed %d)", out / f"{stem}.png", wd, h, seed)
    return records


def regenerate(
    record_path: str | os.PathLike,
    *,
    out: Optional[str | os.PathLike] = None,
    device: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    registry_uri: Optional[str] = None,
    generator: Optional[Generator] = None,
) -> tuple[dict, np.ndarray, bool]:
    """Re-run a generation record. Returns (new record, image, identical-to-the-recorded-pixels).

    Uses the recorded conditioner inputs (checked against their sha256), the pinned adapter
    (registry version on the recorded server unless `tracking_uri` is given, or the folder; checked
    against its sha256), the recorded base model, scheduler, sampling settings and dtype. Writes
    `<stem>.png/.json` + the inputs into `out` (default `<dir>/rerun`).
    """
    from pipeline.images import decode_image

    record_path = Path(record_path)
    rec = json.loads(record_path.read_text())
    if rec.get("format") != RECORD_FORMAT:
        raise ValueError(f"{record_path}: not a {RECORD_FORMAT} record")
    src = record_path.parent
    inputs = load_conditioning(src, rec["conditioning"])
    ad = rec["adapter"]
    spec = ad.get("uri") or ad.get("path")
    recorded = ad.get("registry") or {}
    tracking_uri = tracking_uri or recorded.get("tracking_uri")
    registry_uri = registry_uri or recorded.get("registry_uri")
    if generator is None:
        res = resolve_adapter(spec, tracking_uri=tracking_uri, registry_uri=registry_uri, expect_sha256=ad["sha256"])
        base = {k: rec["base_model"].get(k) for k in ("preset", "path", "config")}
        generator = Generator.load(res, base=base, device=device or "auto", dtype=rec.get("dtype", "fp32"))
    elif generator.resolved.sha256 != ad["sha256"]:
        raise RuntimeError("regenerate: the given generator holds a different adapter than the record")
    h, w = rec["image"]["height"], rec["image"]["width"]
    idents = [Identity(region=_recorded_file(c.get("region"), src)) for c in rec["conditioning"]]
    for ident, c in zip(idents, rec["conditioning"]):
        if ident.region and sha256_file(ident.region) != c.get("region_sha256"):
            raise RuntimeError(f"{ident.region}: region mask sha256 differs from the record")
    content, image = rec.get("content"), None
    if content:
        p = src / content["file"]
        if sha256_file(p) != content["sha256"]:
            raise RuntimeError(f"{p}: content image sha256 differs from the record")
        image = decode_image(p.read_bytes())
    img = generator.sample([inputs], [rec.get("model_prompt", rec["prompt"])], [rec["seed"]], scheduler=rec["scheduler"]["name"],
                           negative_prompt=rec["negative_prompt"], steps=rec["steps"], guidance=rec["guidance"],
                           scale=rec["lambda"], delay_steps=rec["delay_steps"], height=h, width=w,
                           regions=load_regions(idents, h, w), image=image,
                           strength=content["strength"] if content else 0.75)[0]
    identical = False
    orig = src / rec["image"]["file"]
    if orig.is_file():
        identical = bool(np.array_equal(decode_image(orig.read_bytes()), img))
    out = Path(out) if out else src / "rerun"
    out.mkdir(parents=True, exist_ok=True)
    new = json.loads(json.dumps(rec))
    stem = Path(rec["image"]["file"]).stem
    new["image"]["sha256"] = _write_png(out / f"{stem}.png", img)
    for entry, arrays in zip(new["conditioning"], inputs):
        for name, f in entry["inputs"].items():
            f["sha256"] = _save_npy(out / f["file"], arrays[name])
    new["device"] = str(generator.device)
    new["versions"] = versions()
    new["regenerated_from"] = {"record": str(record_path.resolve()), "identical": identical}
    (out / f"{stem}.json").write_text(json.dumps(new, indent=2, sort_keys=True, default=str))
    return new, img, identical


def _recorded_file(path: Optional[str], src: Path) -> Optional[str]:
    """A file a record names: as recorded, else the file of that name beside the record (a copied
    output folder, another working directory)."""
    if not path or Path(path).is_file():
        return path
    near = src / Path(path).name
    return str(near) if near.is_file() else path


def load_generate_params(path: str | os.PathLike = "params.yaml") -> tuple[Params, GenerateConfig]:
    params = load_params(path)
    return params, generate_config(params)
