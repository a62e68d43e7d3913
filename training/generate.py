"""Generation with a trained W+ adapter: reference photo(s) or a W+ code + prompt -> images.

    reference photo(s) --detect (MediaPipe/SCRFD) -> lm5 -> FFHQ quad -> aligned face (+ face mask,
    background whitened) --e4e--> W+ (18, 512) per photo, averaged over the photos
    W+ (+ a * direction) --WProj--> 4 identity tokens --residual cross-attention--> UNet
    DDIM (eta 0), classifier-free guidance: eps = eps_u + g (eps_c - eps_u), with the unconditional
    branch = negative prompt ('' by default) + the ZERO W+ code (WProj's null tokens, the condition
    the training dropout used); lambda (`scale`) weights the identity branch, 0 for the first
    `delay_steps` DDIM steps (delayed identity start).

The alignment is the data pipeline's own code (`pipeline.models.faces/align/masks` hull
mask) with the `align`, `masks` and `wplus` sections of params.yaml, so a reference photo gets the
same W+ code the `wplus` stage would give it.

Adapters come from a folder holding `adapter.safetensors` + `adapter.json` (what training writes),
or from the MLflow registry: `models:/<name>@<alias>` or `models:/<name>/<version>` (downloaded with
`mlflow.artifacts.download_artifacts`; the alias is pinned to its version in the records).

Every image is written as `<stem>.png` with `<stem>.json` (everything needed to reproduce it: adapter
uri/path + sha256, base model, prompts, seed, steps, guidance, lambda, delay, edit, reference
sha256s, versions) and `<stem>.wplus.npy` (the float32 (18, 512) code fed to WProj, after the edit;
`<stem>.wplus_base.npy` holds the code before the edit). `regenerate(json)` (`persona generate
--from-json`) re-runs it from that record; on CPU the pixels are identical.

Images are HxWx3 uint8 RGB; the initial latent noise of image i comes from its own CPU generator
seeded with its seed, so it does not depend on the device or on the batch it is in.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.config import ConfigError, Params, build, load_params, to_dict

log = logging.getLogger("persona.generate")

RECORD_FORMAT = "persona-generation/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
W_SHAPE = (18, 512)
REPO_ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================
# config (`generate:` section of params.yaml)


@dataclass
class BaseModelOverride:
    """Base SD model to use instead of the one recorded in adapter.json (all null: the recorded one)."""

    preset: Optional[Literal["tiny", "sd15"]] = None
    path: Optional[str] = None
    config: Optional[str] = None  # single-file checkpoints: local diffusers folder with configs + tokenizer


@dataclass
class GenerateConfig:
    adapter: str = "models/wplus/stage2"  # folder with adapter.json, or models:/<name>@<alias>
    base_model: BaseModelOverride = field(default_factory=BaseModelOverride)
    negative_prompt: str = ""
    steps: int = 50  # DDIM steps (paper: 50)
    guidance: float = 7.5  # CFG scale; 1 = no unconditional branch
    scale: float = 1.0  # lambda, weight of the identity branch
    delay_steps: int = 0  # DDIM steps at the start with lambda = 0
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


# ============================================================================================
# small helpers


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def git_commit(cwd: str | os.PathLike = REPO_ROOT) -> Optional[str]:
    """HEAD of the checkout holding this code (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(cwd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


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


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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
                "stage": self.meta.get("stage"), "global_step": self.meta.get("global_step"),
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
        folder, meta = read_adapter_folder(folder)
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
    """Frozen SD components with a W+ adapter loaded; `sample` draws images."""

    comps: Any  # pipeline.models.diffusion.DiffusionComponents
    adapter: Any  # training.adapters.WPlusAdapter
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
        from training.adapters import load_adapter

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
        ad = load_adapter(comps.unet, res.folder / ADAPTER_FILE, scale=1.0)
        ad.eval()
        if not res.meta.get("weights_real", {}) or not all(res.meta.get("weights_real", {}).values()):
            log.warning("!!! adapter %s was trained with RANDOM weights somewhere (%s): its images are NOT meaningful !!!",
                        res.spec, res.meta.get("weights_real"))
        return cls(comps, ad, res, spec)

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

    @torch.no_grad()
    def sample(
        self,
        w: np.ndarray | torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        negative_prompt: str = "",
        steps: int = 50,
        guidance: float = 7.5,
        scale: float = 1.0,
        delay_steps: int = 0,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> np.ndarray:
        """(B, 18, 512) W+ codes, B prompts, B seeds -> (B, H, W, 3) uint8 images.

        DDIM (eta 0) with `steps` steps; CFG when guidance != 1 (uncond = negative prompt + zero
        W+ code); lambda = 0 for the first `delay_steps` steps, then `scale`.
        """
        from diffusers import DDIMScheduler

        w = torch.as_tensor(np.asarray(w, dtype=np.float32) if not isinstance(w, torch.Tensor) else w).float()
        if w.ndim == 2:
            w = w[None]
        b = w.shape[0]
        if w.shape[1:] != W_SHAPE or len(prompts) != b or len(seeds) != b:
            raise ValueError(f"sample: W+ {tuple(w.shape)}, {len(prompts)} prompts, {len(seeds)} seeds (need B x 18 x 512, B, B)")
        check_sampling(steps, delay_steps)
        f = self.comps.vae_scale_factor
        h, wd = int(height or self.default_size), int(width or self.default_size)
        if h % f or wd % f:
            raise ValueError(f"height/width must be multiples of {f}, got {h}x{wd}")
        dev, dt = self.device, self.dtype
        sched = DDIMScheduler.from_config(self.comps.sample_scheduler.config)
        sched.set_timesteps(steps, device=dev)
        ch = int(self.comps.unet.config.in_channels)
        noise = [torch.randn((1, ch, h // f, wd // f), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        lat = (torch.cat(noise) * sched.init_noise_sigma).to(dev, dt)
        wproj = self.adapter.wproj
        w_dev = w.to(dev, wproj.norm.weight.dtype)
        cond_text = self.comps.encode_prompt(list(prompts)).to(dt)
        tokens = wproj(w_dev)
        cfg = float(guidance) != 1.0
        if cfg:
            text = torch.cat([self.comps.encode_prompt([negative_prompt] * b).to(dt), cond_text])
            tokens = torch.cat([wproj(torch.zeros_like(w_dev)), tokens])
        else:
            text = cond_text
        for i, t in enumerate(sched.timesteps):
            lam = 0.0 if i < delay_steps else float(scale)
            x = sched.scale_model_input(torch.cat([lat, lat]) if cfg else lat, t)
            with self.adapter.conditioned(tokens, scale=lam):
                eps = self.comps.unet(x, t, encoder_hidden_states=text).sample
            if cfg:
                eu, ec = eps.float().chunk(2)
                eps = (eu + float(guidance) * (ec - eu)).to(dt)
            lat = sched.step(eps, t, lat).prev_sample
        img = self.comps.decode_latents(lat).float().clamp(-1, 1)
        return ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ============================================================================================
# W+ codes: reference photos, files, edits


@dataclass
class Encoders:
    """Detector + e4e encoder for reference photos (loaded once, reused)."""

    detector: Any
    encoder: Any
    params: Params

    @classmethod
    def load(cls, params: Params, device: Optional[str] = None) -> "Encoders":
        from pipeline.models import faces, wplus

        return cls(faces.load(params.align), wplus.load(params.wplus, device=device), params)

    def close(self) -> None:
        close = getattr(self.detector, "close", None)
        if close:
            close()


def _largest_face(faces: list) -> Any:
    good = [f for f in faces if f.lm5 is not None and getattr(f, "landmarks_source", "") != "detector"]
    if not good:
        return None
    return max(good, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))


def align_reference(rgb: np.ndarray, face: Any, params: Params) -> tuple[np.ndarray, np.ndarray, dict]:
    """One detected face -> (aligned face (S, S, 3) uint8, face mask (S, S) uint8, info), exactly as
    the align + masks stages make them (FFHQ crop; hull of the mesh, or the quad ellipse)."""
    from pipeline.models import align as geom
    from pipeline.models.masks import hull_mask, quad_ellipse_points

    a = params.align
    lm5 = np.asarray(face.lm5, dtype=np.float64)
    quad = geom.ffhq_quad(lm5)
    aligned, tf = geom.align_face(rgb, quad, a.output_size, a.transform_size)
    pts = np.asarray(face.mesh) if face.mesh is not None else quad_ellipse_points(quad)
    mask = hull_mask(geom.apply_matrix(tf.matrix, pts), a.output_size, params.masks.erode_at_1024, params.masks.blur_at_1024)
    side = geom.quad_side(quad)
    if side < a.min_face_size:
        log.warning("reference face is small (quad side %.0f px < align.min_face_size %d): its W+ code may be poor",
                    side, a.min_face_size)
    info = {"bbox": np.round(face.bbox, 2).tolist(), "score": round(float(face.score), 4),
            "lm5": np.round(lm5, 3).tolist(), "quad_side": round(side, 2), "mask_source": "mesh" if face.mesh is not None else "quad_ellipse"}
    return aligned, mask, info


def encode_references(paths: Sequence[str | os.PathLike], encoders: Encoders) -> tuple[np.ndarray, list[dict]]:
    """Reference photos -> (averaged W+ (18, 512) float32, per-photo records with sha256 + face).

    Each photo contributes its largest face with dense landmarks; a photo without one is an error.
    """
    from pipeline.images import load_rgb

    if not paths:
        raise ValueError("encode_references: no reference photos")
    faces, masks, refs = [], [], []
    for p in paths:
        rgb, _ = load_rgb(p)
        face = _largest_face(encoders.detector.detect(rgb))
        if face is None:
            raise ValueError(f"reference {p}: no face with landmarks found")
        aligned, mask, info = align_reference(rgb, face, encoders.params)
        faces.append(aligned)
        masks.append(mask)
        refs.append({"path": str(p), "sha256": sha256_file(p), "face": info})
    codes = encoders.encoder.encode(faces, keep_masks=masks)
    for r, c in zip(refs, codes):
        r["wplus_sha256"] = sha256_array(c.astype(np.float32))
    return codes.mean(axis=0).astype(np.float32), refs


def load_wplus(path: str | os.PathLike) -> np.ndarray:
    """A W+ .npy file: (18, 512) or (N, 18, 512) (averaged) -> (18, 512) float32."""
    w = np.load(path, allow_pickle=False).astype(np.float32)
    if w.ndim == 3:
        w = w.mean(axis=0)
    if w.shape != W_SHAPE:
        raise ValueError(f"{path}: W+ code must be (18, 512) or (N, 18, 512), got {w.shape}")
    return w


def load_direction(path: str | os.PathLike) -> np.ndarray:
    """An edit direction .npy: (18, 512), or (512,) applied to every row -> (18, 512) float32."""
    d = np.load(path, allow_pickle=False).astype(np.float32)
    if d.shape == (W_SHAPE[1],):
        d = np.broadcast_to(d, W_SHAPE).copy()
    if d.shape != W_SHAPE:
        raise ValueError(f"{path}: edit direction must be (18, 512) or (512,), got {d.shape}")
    return d


def apply_edit(w: np.ndarray, direction: Optional[np.ndarray], alpha: float) -> np.ndarray:
    """w + alpha * direction (float32); w unchanged when there is no direction or alpha is 0."""
    w = np.asarray(w, dtype=np.float32)
    if direction is None or alpha == 0:
        return w.copy()
    return (w + np.float32(alpha) * np.asarray(direction, dtype=np.float32)).astype(np.float32)


# ============================================================================================
# generate -> files, and back


@dataclass
class Request:
    """What to generate (one W+ code, several prompts x num_images)."""

    prompts: list[str]
    references: list[str] = field(default_factory=list)  # photos (W+ averaged over them)
    wplus: Optional[str] = None  # or a W+ .npy file
    edit: Optional[str] = None  # direction .npy
    alpha: float = 0.0
    name: str = "img"  # file stem prefix


def _write_png(path: Path, img: np.ndarray) -> str:
    from pipeline.images import encode_png

    data = encode_png(img)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _save_npy(path: Path, a: np.ndarray) -> str:
    np.save(path, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return sha256_file(path)


def generate(
    req: Request,
    cfg: GenerateConfig,
    *,
    params: Optional[Params] = None,
    generator: Optional[Generator] = None,
    encoders: Optional[Encoders] = None,
    out: Optional[str | os.PathLike] = None,
) -> list[dict]:
    """Generate len(prompts) x num_images images into `out` (default cfg.out); returns the records."""
    params = params or Params()
    if not req.prompts:
        raise ValueError("generate: give at least one prompt")
    if bool(req.references) == bool(req.wplus):
        raise ValueError("generate: give reference photo(s) or a W+ .npy file (exactly one of the two)")
    gen = generator or Generator.load(cfg.adapter, base=to_dict(cfg.base_model), device=cfg.device, dtype=cfg.dtype,
                                      tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)
    if req.references:
        own = encoders is None
        enc = encoders or Encoders.load(params)
        try:
            w_base, refs = encode_references(req.references, enc)
        finally:
            if own:
                enc.close()
        w_source = {"kind": "references", "encoder": enc.encoder.info.as_dict(), "detector": enc.detector.info.as_dict(),
                    "align": to_dict(params.align), "masks": to_dict(params.masks), "wplus": to_dict(params.wplus)}
    else:
        w_base, refs = load_wplus(req.wplus), []
        w_source = {"kind": "file", "path": str(req.wplus), "sha256": sha256_file(req.wplus)}
    direction = load_direction(req.edit) if req.edit else None
    w = apply_edit(w_base, direction, req.alpha)
    edit = None if direction is None else {"direction": str(req.edit), "sha256": sha256_file(req.edit), "alpha": float(req.alpha)}

    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    h, wd = int(cfg.height or gen.default_size), int(cfg.width or gen.default_size)
    vers = versions()
    records = []
    for pi, prompt in enumerate(req.prompts):
        for k in range(cfg.num_images):
            seed = cfg.seed + k
            stem = f"{req.name}-p{pi:02d}-seed{seed}"
            img = gen.sample(w[None], [prompt], [seed], negative_prompt=cfg.negative_prompt, steps=cfg.steps,
                             guidance=cfg.guidance, scale=cfg.scale, delay_steps=cfg.delay_steps, height=h, width=wd)[0]
            rec = {
                "format": RECORD_FORMAT,
                "image": {"file": f"{stem}.png", "sha256": _write_png(out / f"{stem}.png", img), "height": h, "width": wd},
                "wplus": {"file": f"{stem}.wplus.npy", "sha256": _save_npy(out / f"{stem}.wplus.npy", w),
                          "base_file": None, "source": w_source},
                "prompt": prompt,
                "negative_prompt": cfg.negative_prompt,
                "seed": int(seed),
                "steps": int(cfg.steps),
                "guidance": float(cfg.guidance),
                "lambda": float(cfg.scale),
                "delay_steps": int(cfg.delay_steps),
                "scheduler": {"name": "ddim", "eta": 0.0, "config": dict(gen.comps.sample_scheduler.config)},
                "edit": edit,
                "references": refs,
                "adapter": gen.resolved.as_record(),
                "base_model": {**gen.base, "parts": {k2: v.as_dict() for k2, v in gen.comps.info.items()}},
                "device": str(gen.device),
                "dtype": DTYPE_NAMES.get(gen.dtype, str(gen.dtype)),
                "batch_size": 1,
                "weights_real": gen.weights_real,
                "versions": vers,
            }
            if edit is not None:
                rec["wplus"]["base_file"] = f"{stem}.wplus_base.npy"
                _save_npy(out / f"{stem}.wplus_base.npy", w_base)
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

    Uses the recorded W+ code (`<stem>.wplus.npy`, checked against its sha256), the pinned adapter
    (registry version on the recorded server unless `tracking_uri` is given, or the folder; checked
    against its sha256), the recorded base model, sampling
    settings and dtype. Writes `<stem>.png/.json/.wplus.npy` into `out` (default `<dir>/rerun`).
    """
    from pipeline.images import decode_image

    record_path = Path(record_path)
    rec = json.loads(record_path.read_text())
    if rec.get("format") != RECORD_FORMAT:
        raise ValueError(f"{record_path}: not a {RECORD_FORMAT} record")
    src = record_path.parent
    wfile = src / rec["wplus"]["file"]
    if sha256_file(wfile) != rec["wplus"]["sha256"]:
        raise RuntimeError(f"{wfile}: sha256 differs from the record (the W+ code was modified)")
    w = load_wplus(wfile)
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
    img = generator.sample(w[None], [rec["prompt"]], [rec["seed"]], negative_prompt=rec["negative_prompt"],
                           steps=rec["steps"], guidance=rec["guidance"], scale=rec["lambda"],
                           delay_steps=rec["delay_steps"], height=rec["image"]["height"], width=rec["image"]["width"])[0]
    identical = False
    orig = src / rec["image"]["file"]
    if orig.is_file():
        identical = bool(np.array_equal(decode_image(orig.read_bytes()), img))
    out = Path(out) if out else src / "rerun"
    out.mkdir(parents=True, exist_ok=True)
    new = json.loads(json.dumps(rec))
    stem = Path(rec["image"]["file"]).stem
    new["image"]["sha256"] = _write_png(out / f"{stem}.png", img)
    new["wplus"]["sha256"] = _save_npy(out / f"{stem}.wplus.npy", w)
    new["wplus"]["base_file"] = None
    new["device"] = str(generator.device)
    new["versions"] = versions()
    new["regenerated_from"] = {"record": str(record_path.resolve()), "identical": identical}
    (out / f"{stem}.json").write_text(json.dumps(new, indent=2, sort_keys=True, default=str))
    return new, img, identical


def load_generate_params(path: str | os.PathLike = "params.yaml") -> tuple[Params, GenerateConfig]:
    params = load_params(path)
    return params, generate_config(params)
