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
Method-specific inputs: `Request.inputs` (named files, `--input NAME=PATH`) and `Request.options`
(`--option KEY=VALUE`), read by `Method.prepare`.

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

from pipeline.config import ConfigError, Params, build, load_params, to_dict
from pipeline.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from pipeline.digests import sha256_bytes, sha256_file
from pipeline.gitinfo import git_commit
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
class GenerateConfig:
    adapter: Optional[str] = None  # folder with adapter.json, or models:/<name>@<alias>
    base_model: BaseModelOverride = field(default_factory=BaseModelOverride)
    negative_prompt: str = ""
    scheduler: Literal["ddim", "euler_a", "dpm++"] = "ddim"
    steps: int = 50  # sampler steps
    guidance: float = 7.5  # CFG scale; <= 1 = no unconditional branch
    scale: float = 1.0  # lambda, weight of the identity
    delay_steps: int = 0  # steps at the start with lambda = 0
    seed: int = 0  # first seed; image k of a prompt uses seed + k
    num_images: int = 1  # per prompt
    height: Optional[int] = None  # null -> the adapter's training resolution, else the UNet's native size
    width: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    out: str = "outputs/generate"
    tracking_uri: Optional[str] = None  # for models:/ adapters; null -> $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    registry_uri: Optional[str] = None  # null -> $MLFLOW_REGISTRY_URI or the tracking URI


def generate_config(params: Params | Mapping[str, Any] | None = None) -> GenerateConfig:
    """Validate the `generate:` section (a Params, the raw section dict, or None for defaults)."""
    raw = params.extra.get("generate") if isinstance(params, Params) else params
    cfg = build(GenerateConfig, raw or {}, "generate")
    check_sampling(cfg.steps, cfg.delay_steps, cfg.num_images, "generate")
    return cfg


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
    ) -> np.ndarray:
        """B conditionings (per image: the conditioner inputs of its identities), B prompts, B seeds
        -> (B, H, W, 3) uint8 images (see `training.sampling.sample`)."""
        from training.sampling import sample

        check_sampling(steps, delay_steps)
        f = self.comps.vae_scale_factor
        h, wd = int(height or self.default_size), int(width or self.default_size)
        if h % f or wd % f:
            raise ValueError(f"height/width must be multiples of {f}, got {h}x{wd}")
        return sample(self.pipe, self.adapter, conditioning, prompts, seeds, scheduler=scheduler,
                      negative_prompt=negative_prompt, steps=steps, guidance=guidance, scale=scale,
                      delay_steps=delay_steps, height=h, width=wd, regions=regions)


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
        recs.append({"inputs": files, "region": ident.region,
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
    identities = list(req.identities) or [Identity()]
    own = kit is None
    kit = kit or ReferenceKit(params)
    try:
        prepared = [gen.method.prepare(i, req.inputs, req.options, kit) for i in identities]
    finally:
        if own:
            kit.close()

    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    h, wd = int(cfg.height or gen.default_size), int(cfg.width or gen.default_size)
    regions = load_regions(identities, h, wd)
    conditioning = save_conditioning(out, req.name, prepared, identities)
    vers = versions()
    records = []
    for pi, prompt in enumerate(req.prompts):
        for k in range(cfg.num_images):
            seed = cfg.seed + k
            stem = f"{req.name}-p{pi:02d}-seed{seed}"
            img = gen.sample([[p.inputs for p in prepared]], [prompt], [seed], scheduler=cfg.scheduler,
                             negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,
                             scale=cfg.scale, delay_steps=cfg.delay_steps, height=h, width=wd, regions=regions)[0]
            rec = {
                "format": RECORD_FORMAT,
                "image": {"file": f"{stem}.png", "sha256": _write_png(out / f"{stem}.png", img), "height": h, "width": wd},
                "method": gen.method.name,
                "conditioning": conditioning,
                "request": {"inputs": dict(req.inputs), "options": dict(req.options)},
                "prompt": prompt,
                "negative_prompt": cfg.negative_prompt,
                "seed": int(seed),
                "scheduler": {"name": cfg.scheduler, "class": type(gen.pipe.scheduler).__name__,
                              "config": dict(gen.pipe.scheduler.config)},
                "steps": int(cfg.steps),
                "guidance": float(cfg.guidance),
                "lambda": float(cfg.scale),
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
    idents = [Identity(region=c.get("region")) for c in rec["conditioning"]]
    for c in rec["conditioning"]:
        if c.get("region") and sha256_file(c["region"]) != c.get("region_sha256"):
            raise RuntimeError(f"{c['region']}: region mask sha256 differs from the record")
    img = generator.sample([inputs], [rec["prompt"]], [rec["seed"]], scheduler=rec["scheduler"]["name"],
                           negative_prompt=rec["negative_prompt"], steps=rec["steps"], guidance=rec["guidance"],
                           scale=rec["lambda"], delay_steps=rec["delay_steps"], height=h, width=w,
                           regions=load_regions(idents, h, w))[0]
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


def load_generate_params(path: str | os.PathLike = "params.yaml") -> tuple[Params, GenerateConfig]:
    params = load_params(path)
    return params, generate_config(params)
