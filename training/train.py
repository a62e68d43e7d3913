"""`train(params, method, phase, ...)`: one method phase as a Lightning job, tracked in MLflow.

A plain function (no globals, no argparse) so a Ray Train `TorchTrainer` can call it per worker:
pass `trainer_kwargs` (strategy / plugins / devices), `callbacks` and `prepare_trainer` (e.g.
`ray.train.lightning.prepare_trainer`). MLflow calls and file outputs happen on global rank 0 only.
Knows no method by name: the method and phase come from the registry (`training.methods`).

Outputs (paths from the `train` section; M = method, P = the phase's output name, usually the phase):
    <out_dir>/M/P/adapter.safetensors    the adapter (`training.adapter.save_adapter`: self-describing,
                                          EMA weights when ema > 0; never the frozen UNet)
    <out_dir>/M/P/adapter.json           {"method", "phase", "base_model", "conditioner", "injection",
                                          "scale" (the method's default inference lambda), "mlflow",
                                          "lineage", "weights_real", "global_step", "seed",
                                          "phase_record" (`Phase.record` of the bound phase), ...}
    <checkpoints_dir>/M/P/               Lightning checkpoints (trained weights + optimizer + schedule +
                                          EMA), last N kept + last.ckpt, run.json
    <checkpoints_dir>/M/P/csv/metrics.csv  Lightning's CSVLogger: every logged step (loss, loss_<term>, lr,
                                          throughput), kept exact across resumes (training.logs.CSVResume)
    <metrics_dir>/train_M_P.json         DVC metrics, numbers only: steps, seconds, last / first / mean of the
                                          last 10 of each loss term, samples/s
    <plots_dir>/train_M_P/<name>.csv     DVC plots from that CSV: step,<name> for loss, each loss_<term>, lr,
                                          samples_per_sec
    <plots_dir>/train_M_P_samples.png    final sample grid (top: reference faces, bottom: generated)
MLflow run (experiment `train.mlflow.experiment`, "{method}" filled in): params, metrics (loss,
loss_<term>, lr, train/... throughput: Lightning's MLFlowLogger, LearningRateMonitor, ThroughputMonitor),
the shards as a dataset input (digest: their DVC md5), sample grids (`samples/`), the metrics and
plot files, lineage tags, and the adapter as an MLflow model (`training.pyfunc`: a pyfunc that
generates images from prompts and reference photos; its id is recorded in adapter.json `mlflow.model_id`).

Resume (`resume="auto"`): when <checkpoints_dir>/M/P/run.json has this run's signature (config
minus max_steps / logging knobs, data, base model, init adapter, code), training continues from the
newest checkpoint and the same MLflow run; otherwise stale checkpoints are removed and it starts
fresh. `resume="never"` always starts fresh; a path resumes from that checkpoint.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline.config import Params
from pipeline.devices import resolve_device
from pipeline.digests import sha256_file
from pipeline.gitinfo import git_commit, git_dirty
from pipeline.images import encode_png
from pipeline.models.base import file_fingerprint, text_fingerprint
from pipeline.models.diffusion import DiffusionComponents, load_diffusion
from training import logs, methods, tracking
from training.adapter import PersonaAdapter, read_adapter_file, save_adapter
from training.config import TrainConfig, TrainParams, flat_params, method_options, run_signature, train_params
from training.data import PersonaDataModule
from training.methods.base import Method, Phase, PhaseConfig
from training.module import PersonaModule, image_grid
from training.sampling import make_pipeline, sample
from training.step import seed_of

log = logging.getLogger("persona.training")

ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "adapter.json"
RUN_FILE = "run.json"
_STEP_RE = re.compile(r"step=(\d+)\.ckpt$")
TRAINING_SOURCES = ("train.py", "data.py", "module.py", "step.py", "losses.py", "transforms.py", "adapter.py",
                    "methods/base.py")


# ============================================================================================
# devices and precision


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16-mixed (or 16-mixed without bf16) on GPU, 32-true on CPU. Mixed precision
    requested on CPU falls back to 32-true (with a warning)."""
    if precision == "32":
        precision = "32-true"
    if device != "cuda":
        if precision not in ("auto", "32-true"):
            log.warning("precision %s requested on CPU: training in fp32 (32-true)", precision)
        return "32-true"
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return precision


def resolve_frozen_dtype(name: str, precision: str) -> torch.dtype:
    """dtype of the frozen UNet / VAE / text encoder ('auto': the mixed-precision dtype, else fp32)."""
    if name == "auto":
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ============================================================================================
# model


def base_model_record(cfg: TrainConfig) -> dict[str, Optional[str]]:
    """{"preset": "tiny" | "sd15" | None, "path": str | None} (a path wins over the preset)."""
    bm = cfg.base_model
    return {"preset": None, "path": bm.path} if bm.path else {"preset": bm.preset, "path": None}


def load_components(cfg: TrainConfig, dtype: torch.dtype = torch.float32) -> DiffusionComponents:
    """The frozen SD parts on CPU (Lightning moves them), in eval mode with requires_grad off."""
    bm = cfg.base_model
    comps = load_diffusion(bm.path, preset=None if bm.path else bm.preset, config=bm.config, device="cpu",
                           dtype=dtype, hash_weights=bm.hash_weights)
    return comps.freeze()


def output_dir(root: str | os.PathLike, method: Method, phase: Phase, cfg: PhaseConfig) -> Path:
    return Path(root) / method.name / phase.output_name(cfg)


def init_adapter_path(tp: TrainParams, method: Method, phase: Phase) -> Optional[Path]:
    """The adapter a phase starts from: `init` of its params (file, adapter folder or models:/ uri),
    else the output of `Phase.init` in out_dir, else None (a fresh adapter)."""
    spec = tp.phase(method.name, phase.name).init
    if spec:
        if spec.startswith("models:/"):
            from training.generate import resolve_adapter

            return resolve_adapter(spec).folder / ADAPTER_FILE
        p = Path(spec)
        return p / ADAPTER_FILE if p.is_dir() else p
    if phase.init is None:
        return None
    prev = method.phase(phase.init)
    return output_dir(tp.train.out_dir, method, prev, tp.phase(method.name, prev.name)) / ADAPTER_FILE


def build_adapter(method: Method, phase: Phase, tp: TrainParams, comps: DiffusionComponents,
                  source: Any = None) -> tuple[PersonaAdapter, Optional[Path]]:
    """A fresh adapter installed on `comps` (conditioner init seeded by (its class, train.seed)), with
    the init adapter's tensors loaded when the phase starts from one, else calibrated on the training
    samples `source` (`Method.calibrate`; its record in `adapter.calibration`). Adapter weights are
    fp32 whatever the frozen parts' dtype."""
    mcfg = tp.method(method.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(f"{method.conditioner.__name__.lower()}-init", tp.train.seed) % (2**63))
        cond = method.conditioner(**method.conditioner_config(mcfg, comps))
    inj = method.injection(**method.injection_config(mcfg, comps))
    adapter = PersonaAdapter(method.name, cond, inj, phase=phase.name, base_model=base_model_record(tp.train))
    adapter.calibration = {}
    init = init_adapter_path(tp, method, phase)
    if init is None and source is not None:
        adapter.calibration = dict(method.calibrate(cond, source, mcfg) or {})
    if init is not None:
        if not init.is_file():
            raise FileNotFoundError(f"{method.name}.{phase.name} starts from the adapter {init}, which does not exist "
                                    f"(train phase '{phase.init}' first, or set train.methods.{method.name}.{phase.name}.init)")
        tensors, meta = read_adapter_file(init)
        if json.loads(meta.get("base_model") or "null") != base_model_record(tp.train):
            raise ValueError(f"init adapter {init} was trained on base model {meta.get('base_model')}, "
                             f"this run uses {base_model_record(tp.train)}")
        if meta.get("method") != method.name:
            log.warning("init adapter %s is a '%s' adapter, this run trains '%s'", init, meta.get("method"), method.name)
        elif phase.init and meta.get("phase") != phase.init:
            log.warning("init adapter %s is from phase %s, not %s", init, meta.get("phase"), phase.init)
        cond.load_state_dict({k[len("conditioner."):]: v for k, v in tensors.items() if k.startswith("conditioner.")},
                             strict=True)
        adapter.trained_base = json.loads(meta.get("trained_base") or "[]")
        adapter.pending = {k: v for k, v in tensors.items() if not k.startswith("conditioner.")}
    adapter.install(comps, dtype=torch.float32)
    return adapter, init


def conditioner_weights_real(adapter: PersonaAdapter) -> dict[str, bool]:
    """{"conditioner.<model>": weights_real} of models a conditioner runs itself (an optional
    `weights_real()` method of the conditioner, e.g. a frozen feature extractor)."""
    fn = getattr(adapter.conditioner, "weights_real", None)
    return {f"conditioner.{k}": bool(v) for k, v in (fn() if callable(fn) else {}).items()}


def code_fingerprint(method: Method) -> str:
    """Hash of the sources that shape the weight trajectory (a code change never resumes old checkpoints)."""
    root = Path(__file__).resolve().parent
    files = [root / n for n in TRAINING_SOURCES] + sorted((root / "adapters").glob("*.py"))
    own = inspect.getsourcefile(type(method))
    if own:
        files.append(Path(own))
    return text_fingerprint(*[(p.name, file_fingerprint(p)) for p in files if p.is_file()])


# ============================================================================================
# checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename: a run killed while
    saving never leaves a truncated checkpoint behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the final step (when it is not a multiple of every_n_train_steps)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def checkpoint_callback(ckdir: Path, every: int, keep: int) -> StepCheckpoint:
    return StepCheckpoint(dirpath=str(ckdir), filename="{step:06d}", every_n_train_steps=every, save_top_k=keep,
                          monitor="step", mode="max", save_last="link", save_on_train_epoch_end=False,
                          enable_version_counter=False)  # resume: overwrite last.ckpt, never last-v1.ckpt


def find_checkpoint(ckdir: Path) -> Optional[Path]:
    """The step=N.ckpt with the largest N (each is written atomically; last.ckpt is only a link that
    a kill between save and relink can leave pointing at an older one), else last.ckpt, else None."""
    steps = [(int(m.group(1)), p) for p in ckdir.glob("step=*.ckpt") if (m := _STEP_RE.search(p.name))]
    if steps:
        return max(steps)[1]
    last = ckdir / "last.ckpt"
    return last if last.exists() else None


def prune_checkpoints(ckdir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest step=N.ckpt files (and stray temporaries). A kill between
    Lightning's save of a new checkpoint and its removal of the oldest leaves one it no longer tracks."""
    steps = sorted((int(m.group(1)), p) for p in ckdir.glob("step=*.ckpt") if (m := _STEP_RE.search(p.name)))
    last = ckdir / "last.ckpt"
    target = last.resolve() if last.is_symlink() else None
    removed = [p for _, p in steps[:-keep] if p.resolve() != target] + list(ckdir.glob(".*.ckpt.*.tmp"))
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _clear_checkpoints(ckdir: Path) -> None:
    for p in list(ckdir.glob("*.ckpt")) + list(ckdir.glob(".*.tmp")) + [ckdir / RUN_FILE]:
        if p.is_symlink() or p.exists():
            p.unlink(missing_ok=True)


def prepare_checkpoints(ckdir: Path, signature: str, resume: str) -> tuple[Optional[Path], Optional[dict]]:
    """Decide where to resume from: (checkpoint or None, previous run.json or None); see module doc."""
    ckdir.mkdir(parents=True, exist_ok=True)
    prior = None
    if (ckdir / RUN_FILE).is_file():
        try:
            prior = json.loads((ckdir / RUN_FILE).read_text())
        except json.JSONDecodeError:
            prior = None
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        return path, prior if prior and prior.get("signature") == signature else None
    found = find_checkpoint(ckdir)
    if resume == "auto" and found is not None and prior and prior.get("signature") == signature:
        log.info("resuming from %s", found)
        return found, prior
    if found is not None or prior:
        why = "--resume never" if resume == "never" else "the config, data or base model changed"
        log.warning("removing checkpoints in %s (%s)", ckdir, why)
        _clear_checkpoints(ckdir)
    return None, None


# ============================================================================================
# sample grids


class SampleGrids(Callback):
    """Every `every` steps (and via `render` at the end): samples conditioned on the val faces'
    inputs through the diffusers pipeline; the grid (top row: reference faces, bottom: generated)
    goes to `folder` and MLflow."""

    def __init__(self, val: dict, every: int, folder: Path, sampling):
        self.val, self.every, self.folder, self.sampling = val, every, Path(folder), sampling
        self.last_step = -1

    def render(self, trainer: Optional[L.Trainer], module: PersonaModule, step: int) -> Optional[Path]:
        if trainer is not None and not trainer.is_global_zero:
            return None
        s = self.sampling
        k = len(self.val["prompt"])
        was_training = module.adapter.training
        module.adapter.eval()
        try:
            with module.export_weights() as adapter:
                imgs = sample(make_pipeline(module.components, s.scheduler), adapter,
                              [[inp] for inp in self.val["inputs"]], self.val["prompt"], [s.seed + i for i in range(k)],
                              scheduler=s.scheduler, steps=s.steps, guidance=s.guidance,
                              height=self.val["face"].shape[-1], width=self.val["face"].shape[-1])
        finally:
            module.adapter.train(was_training)
        path = self.folder / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image_grid([self.val["face"], imgs])))
        if trainer is not None:
            tracking.log_artifacts(tracking.mlflow_logger(trainer), [path], "samples")
        self.last_step = step
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if self.every and step > 0 and step % self.every == 0 and step != self.last_step:
            self.render(trainer, pl_module, step)


# ============================================================================================
# outputs


def export_adapter(module: PersonaModule, folder: Path, record: dict) -> tuple[Path, Path]:
    """Write adapter.safetensors (EMA weights when enabled) and adapter.json into `folder`, atomically."""
    from pipeline.store import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"global_step": str(record["global_step"]), "seed": str(record["seed"]),
            "resolution": str(record["resolution"])}
    if record.get("phase_record"):
        meta["phase_record"] = json.dumps(record["phase_record"], sort_keys=True)
    with module.export_weights() as adapter:
        st = save_adapter(adapter, folder / ADAPTER_FILE, metadata=meta)
    js = folder / RECORD_FILE
    atomic_write_json(js, record)
    return st, js


# ============================================================================================
# the entry point


def _quiet_lightning() -> None:
    for pat in (r".*does not have many workers.*", r".*module\(s\) in eval mode.*", r".*Tensor Cores.*",
                r".*LightningModule.*has parameters that were not used.*", r".*`training_step` returned `None`.*",
                r".*Checkpoint directory .* exists and is not empty.*", r".*treespec, LeafSpec.*",
                r".*Experiment logs directory .* exists and is not empty.*",  # CSVLogger on resume (CSVResume)
                r".*`ThroughputMonitor`.*"):
        warnings.filterwarnings("ignore", message=pat)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def train(
    params: Union[Params, Mapping[str, Any], str, os.PathLike, None] = None,
    method: Optional[str] = None,
    phase: Optional[str] = None,
    *,
    stage: Optional[int] = None,
    max_steps: Optional[int] = None,
    fast_dev_run: bool = False,
    overrides: Optional[Mapping[str, Any]] = None,
    resume: str = "auto",
    trainer_kwargs: Optional[dict[str, Any]] = None,
    callbacks: Optional[Sequence[Callback]] = None,
    prepare_trainer: Optional[Callable[[L.Trainer], L.Trainer]] = None,
) -> dict[str, Any]:
    """Train one phase of a registered method; returns a result dict (paths, step, metrics, MLflow run).

    params: a `Params`, the raw params dict, or a params.yaml path (None: defaults).
    method / phase: names in the registry (`stage=N`: a phase alias a method declares).
    overrides: dotted keys, e.g. {"train.synthetic": 16, "<method>.<phase>.batch_size": 2}.
    max_steps: overrides the phase's max_steps. fast_dev_run: one step, no MLflow, no checkpoints,
    no metrics (the adapter files are still written, marked "fast_dev_run": true).
    """
    t0 = time.perf_counter()
    _quiet_lightning()
    m, phase_name = methods.resolve(method, phase, stage)
    tp = train_params(params, overrides)
    ph = m.phase(phase_name)
    cfg, pcfg = tp.train, tp.phase(m.name, ph.name)
    if max_steps is not None:
        pcfg.max_steps = int(max_steps)
    device = resolve_device(cfg.device).type
    threads = cfg.threads or (1 if device == "cpu" and cfg.base_model.preset == "tiny" and not cfg.base_model.path else 0)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(tp, m, ph, pcfg, device, t0, fast_dev_run, resume, trainer_kwargs, callbacks, prepare_trainer,
                      params)
    finally:
        torch.set_num_threads(prev_threads)


def _train(tp: TrainParams, method: Method, phase: Phase, pcfg: PhaseConfig, device: str, t0: float, fast_dev_run: bool,
           resume: str, trainer_kwargs, callbacks, prepare_trainer, params=None) -> dict[str, Any]:
    cfg = tp.train
    precision = resolve_precision(cfg.precision, device)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    name = f"{method.name}-{phase.output_name(pcfg)}"
    tag = f"{method.name}.{phase.output_name(pcfg)}"

    comps = load_components(cfg, resolve_frozen_dtype(cfg.frozen_dtype, precision))
    dm = PersonaDataModule(method, phase, cfg, pcfg)
    dm.setup()
    phase = dm.phase  # bound to the training data (`Phase.bind`)
    adapter, init = build_adapter(method, phase, tp, comps, source=dm.train_source)
    data = dm.describe()
    weights_real = {f"diffusion.{k}": bool(v.weights_real) for k, v in comps.info.items()}
    weights_real.update(dm.weights_real())
    weights_real.update(conditioner_weights_real(adapter))
    tracking.warn_random_weights(weights_real, f"training {tag}")
    base_fp = sorted((k, v.fingerprint) for k, v in comps.info.items())
    signature = run_signature(tp, method.name, phase.name, data["signature"], base_fp,
                              file_fingerprint(init) if init else None, code_fingerprint(method))

    ckdir = output_dir(cfg.checkpoints_dir, method, phase, pcfg)
    out = output_dir(cfg.out_dir, method, phase, pcfg)
    ckpt_path, prior = (None, None) if fast_dev_run else prepare_checkpoints(ckdir, signature, resume)

    commit = git_commit() or "unknown"
    shards = "none" if cfg.synthetic else tracking.shards_hash(cfg.shards, cfg.dvc_lock, cfg.shards_stage)
    tags = tracking.lineage_tags(method.name, phase.name, commit, shards, weights_real, git_dirty())
    logger = None
    if cfg.mlflow.enabled and not fast_dev_run:
        same_store = prior and prior.get("tracking_uri") == cfg.mlflow.tracking_uri
        logger = tracking.make_logger(cfg.mlflow, method.name, name, tags,
                                      run_id=prior.get("run_id") if same_store else None)

    module = PersonaModule(method, phase, pcfg, cfg.seed, comps, adapter, signature)
    val = dm.val_examples()
    grids = SampleGrids(val, pcfg.sample_every, ckdir / "samples", cfg.sampling)
    csv_log = None if fast_dev_run else logs.csv_logger(ckdir)
    cbs: list[Callback] = []
    if csv_log is not None:  # first: its on_train_batch_end runs before any checkpoint is written
        cbs.append(logs.CSVResume(csv_log))
    cbs.append(grids)
    if not fast_dev_run:  # the monitors log to the loggers (fast_dev_run has none)
        cbs += logs.monitors(tag, pcfg.log_every, lambda batch: int(len(batch["image"])))
        cbs.append(checkpoint_callback(ckdir, pcfg.checkpoint_every, pcfg.keep_last))
    cbs += list(callbacks or [])
    loggers = [lg for lg in (logger, csv_log) if lg is not None]
    tk = dict(trainer_kwargs or {})
    plugins = [AtomicCheckpointIO()] + list(tk.pop("plugins", []) or [])
    kwargs: dict[str, Any] = dict(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=pcfg.max_steps, logger=loggers or False, callbacks=cbs,
        gradient_clip_val=pcfg.grad_clip or None, accumulate_grad_batches=pcfg.accumulate,
        log_every_n_steps=pcfg.log_every, enable_checkpointing=not fast_dev_run, fast_dev_run=fast_dev_run,
        plugins=plugins, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(ckdir), enable_progress_bar=not fast_dev_run,
    )
    kwargs.update(tk)
    trainer = L.Trainer(**kwargs)
    if prepare_trainer is not None:
        trainer = prepare_trainer(trainer)

    if logger is not None and trainer.is_global_zero:
        hp = {"method": method.name, "phase": phase.name, "signature": signature, "precision": precision,
              "device": device, "data.train_samples": data["train_samples"], "data.source": data["source"],
              **{k: v for k, v in flat_params(data.get("sampler") or {}, "data.sampler.").items()
                 if not isinstance(v, (list, tuple))},
              **flat_params({k: v for k, v in tp.as_dict().items() if k not in ("methods", "runs")}, "train."),
              **flat_params(method_options(tp, method.name), "method."), **flat_params(pcfg, "phase.")}
        if init:
            hp["init"] = str(init)
        try:
            logger.log_hyperparams(hp)
        except Exception as e:  # noqa: BLE001 - a resumed run with a changed non-trajectory param
            log.warning("MLflow params not (re)logged: %s", e)
        tracking.log_dataset(logger, cfg.shards, shards, data, dm.examples.keys, synthetic=bool(cfg.synthetic))
    if not fast_dev_run and trainer.is_global_zero:  # what a later run resumes (with or without MLflow)
        (ckdir / RUN_FILE).write_text(json.dumps({"signature": signature, "run_id": logger.run_id if logger else None,
                                                  "tracking_uri": cfg.mlflow.tracking_uri if logger else None,
                                                  "method": method.name, "phase": phase.name}, indent=2) + "\n")

    log.info("%s: %s, %s, %d train samples, resume=%s", tag, device, precision, data["train_samples"], ckpt_path)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    step = int(trainer.global_step)

    result: dict[str, Any] = {"method": method.name, "phase": phase.name, "global_step": step,
                              "resumed_from": str(ckpt_path) if ckpt_path else None, "checkpoint_dir": str(ckdir),
                              "device": device, "precision": precision, "weights_real": weights_real, "data": data}
    if not trainer.is_global_zero:
        return result
    final_grid = None
    if not fast_dev_run:
        final_grid = grids.render(trainer, module, step) if grids.last_step != step else grids.folder / f"step_{step:06d}.png"
    from training import pyfunc

    mlflow_info = tracking.run_info(logger, cfg.mlflow, method.name)
    model_id = None
    if logger is not None:  # the MLflow model's id goes into adapter.json before the files are logged into it
        model_id = pyfunc.create_model(logger.experiment, logger.run_id, tags={"method": method.name, "phase": phase.name})
    record = {
        "method": method.name, "phase": phase.name, "output": phase.output_name(pcfg),
        "base_model": base_model_record(cfg),
        "conditioner": adapter.conditioner.config(), "injection": adapter.injection.config(),
        "trained_base": list(adapter.trained_base), "scale": float(method.inference_scale(tp.method(method.name))),
        "mlflow": {**{k: mlflow_info[k] for k in ("tracking_uri", "run_id", "experiment")}, "model_id": model_id,
                   "model_uri": f"models:/{model_id}" if model_id else None},
        "lineage": {"git_commit": commit, "shards_hash": shards},
        "weights_real": weights_real, "global_step": step, "seed": cfg.seed,
        # extras (not part of the minimal contract)
        "mlflow_extra": {k: mlflow_info[k] for k in ("registry_uri", "artifact_uri")},
        "resolution": cfg.resolution, "ema": pcfg.ema or None, "signature": signature,
        "init": {"path": str(init), "sha256": sha256_file(init)} if init else None,
        "calibration": getattr(adapter, "calibration", None) or None,
        "fast_dev_run": bool(fast_dev_run),
        "phase_record": phase.record(pcfg),
    }
    if data.get("sampler"):
        record["sampler"] = data["sampler"]
    st, js = export_adapter(module, out, record)
    if not fast_dev_run:
        prune_checkpoints(ckdir, pcfg.keep_last)
    history = logs.read_history(Path(csv_log.log_dir) / "metrics.csv") if csv_log is not None else \
        [{"step": max(step - 1, 0), **{k: float(v) for k, v in trainer.logged_metrics.items()}}]
    seconds = round(time.perf_counter() - t0, 3)
    metrics: dict[str, Any] = {"global_step": step, "seconds": seconds, **logs.summarize(history),
                               **sampler_metrics(data.get("sampler"))}
    if ckpt_path is not None:
        metrics["resumed_from_step"] = _ckpt_step(ckpt_path)
    if not fast_dev_run:
        stem = f"train_{method.name}_{phase.output_name(pcfg)}"
        Path(cfg.metrics_dir).mkdir(parents=True, exist_ok=True)
        mpath = Path(cfg.metrics_dir) / f"{stem}.json"
        mpath.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        plots = logs.write_plots(history, Path(cfg.plots_dir) / stem)
        gpath = Path(cfg.plots_dir) / f"{stem}_samples.png"
        gpath.unlink(missing_ok=True)
        if final_grid is not None and Path(final_grid).is_file():
            shutil.copyfile(final_grid, gpath)
        if logger is not None:
            tracking.log_artifacts(logger, [mpath], "metrics")
            tracking.log_artifacts(logger, plots, "plots")
            tracking.set_tags(logger, {"global_step": step})
            logger.experiment.log_metric(logger.run_id, "train_seconds", seconds, step=step)
            pyfunc.log_adapter_model(logger.experiment, out, run_id=logger.run_id, model_id=model_id,
                                     kit=pyfunc.kit_params(full_params(params)), step=step,
                                     example_reference=example_reference(dm))
    result.update(adapter=str(st), adapter_json=str(js), record=record, metrics=metrics, model_id=model_id,
                  run_id=mlflow_info["run_id"], tracking_uri=mlflow_info["tracking_uri"], seconds=seconds)
    print(f"[train {tag}] done: step {step}, loss {metrics.get('loss')}, adapter {st}, "
          f"mlflow run {mlflow_info['run_id']} in {seconds:.1f}s", flush=True)
    return result


def full_params(params: Union[Params, Mapping[str, Any], str, os.PathLike, None]) -> Params:
    """The whole params (every section) from what `train()` was given."""
    from pipeline.config import load_params, params_from_dict

    if isinstance(params, Params):
        return params
    if isinstance(params, (str, os.PathLike)):
        return load_params(params)
    return params_from_dict(dict(params or {}))


def example_reference(dm: PersonaDataModule, max_side: int = 256) -> Optional[bytes]:
    """A photo for the MLflow model's input example: the first validation (else training) sample's
    in-the-wild crop, as JPEG of at most `max_side` px (None for synthetic data, which holds no faces:
    the model then uses its default photo)."""
    from PIL import Image

    from pipeline.images import encode_jpeg

    if dm.cfg.synthetic:
        return None
    for src in (dm.val_source, dm.train_source):
        if src is not None and len(src):
            try:
                img = src.get(0, ("jpg",)).get("jpg")
            except (KeyError, ValueError):
                continue
            if img is not None:
                im = Image.fromarray(img)
                im.thumbnail((max_side, max_side))
                return encode_jpeg(np.asarray(im), quality=90)
    return None


def sampler_metrics(report: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """The numeric entries of the sampler's data report (`Sampler.describe`) as `sampler_<key>` metrics."""
    return {f"sampler_{k}": v for k, v in (report or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _ckpt_step(path: Optional[Path]) -> Optional[int]:
    if path is None:
        return None
    p = Path(path)
    m = _STEP_RE.search(p.resolve().name if p.is_symlink() else p.name)
    return int(m.group(1)) if m else None
