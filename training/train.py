"""`train(params, stage, ...)`: one W+ Adapter training stage as a Lightning job, tracked in MLflow.

A plain function (no globals, no argparse) so a Ray Train `TorchTrainer` can call it per worker:
pass `trainer_kwargs` (strategy / plugins / devices), `callbacks` and `prepare_trainer` (e.g.
`ray.train.lightning.prepare_trainer`). MLflow calls and file outputs happen on global rank 0 only.

Outputs (paths from the `train` section; N = stage):
    <out_dir>/stageN/adapter.safetensors   the adapter only (`save_adapter`; EMA weights when ema > 0)
    <out_dir>/stageN/adapter.json          {"method", "stage", "base_model", "wproj", "scale", "mlflow",
                                            "lineage", "weights_real", "global_step", "seed", ...}
    <checkpoints_dir>/stageN/              Lightning checkpoints (adapter + optimizer + schedule + EMA,
                                            never the frozen UNet), last N kept + last.ckpt, run.json
    <metrics_dir>/train_stageN.json        final / first loss, steps, throughput (DVC metrics)
    <plots_dir>/train_stageN.csv           step,loss[,rec,dis,reg] (DVC plots)
    <plots_dir>/train_stageN_samples.png   final sample grid (top: reference faces, bottom: generated)
MLflow run: params, metrics (loss, loss_rec, loss_dis, loss_reg, lr, samples_per_s), sample grids
(`samples/`), the adapter (`adapter/adapter.safetensors` + `adapter/adapter.json`) and lineage tags.

Resume (`resume="auto"`): when <checkpoints_dir>/stageN/run.json has this run's signature (config
minus max_steps / logging knobs, data, base model, Stage I adapter), training continues from the
newest checkpoint and the same MLflow run; otherwise stale checkpoints are removed and it starts
fresh. `resume="never"` always starts fresh; a path resumes from that checkpoint.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline.config import Params
from pipeline.images import encode_png
from pipeline.models.base import file_fingerprint, text_fingerprint
from pipeline.models.diffusion import DiffusionComponents, load_diffusion
from training.adapters import WProj, WPlusAdapter, install_wplus_adapter, load_adapter, save_adapter
from training.config import TrainConfig, TrainParams, flat_params, run_signature, train_params
from training.data import WPlusDataModule, seed_of
from training.module import WPlusModule, image_grid
from training import tracking

log = logging.getLogger("persona.training")

ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "adapter.json"
RUN_FILE = "run.json"
_STEP_RE = re.compile(r"step=(\d+)\.ckpt$")


# ============================================================================================
# devices and precision


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no GPU")
    return name


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


def stage1_adapter_path(tp: TrainParams) -> Path:
    return Path(tp.stage2.init) if tp.stage2.init else Path(tp.train.out_dir) / "stage1" / ADAPTER_FILE


def build_adapter(stage: int, tp: TrainParams, comps: DiffusionComponents) -> tuple[WPlusAdapter, Optional[Path]]:
    """Stage I: a fresh adapter (WProj init seeded by train.seed). Stage II: Stage I's adapter,
    WProj frozen. The adapter weights are fp32 whatever the frozen parts' dtype."""
    if stage == 1:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of("wproj-init", tp.train.seed) % (2**63))
            wproj = WProj(cross_dim=comps.cross_attention_dim)
        adapter = install_wplus_adapter(comps.unet, wproj, dtype=torch.float32)
        return adapter, None
    init = stage1_adapter_path(tp)
    if not init.is_file():
        raise FileNotFoundError(f"Stage II starts from the Stage I adapter, but {init} does not exist "
                                "(run `persona train --stage 1` first, or set train_stage2.init)")
    rec_path = init.parent / RECORD_FILE
    if rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("base_model") != base_model_record(tp.train):
            raise ValueError(f"Stage I adapter {init} was trained on base model {rec.get('base_model')}, "
                             f"this run uses {base_model_record(tp.train)}")
        if rec.get("stage") != 1:
            log.warning("train_stage2.init %s is a stage-%s adapter, not stage 1", init, rec.get("stage"))
    else:
        log.warning("no %s beside %s: cannot check its base model", RECORD_FILE, init)
    adapter = load_adapter(comps.unet, init, freeze_unet=True)
    adapter.float()
    adapter.wproj.requires_grad_(False)
    return adapter, init


def code_fingerprint() -> str:
    """Hash of the sources that shape the weight trajectory (a code change never resumes old checkpoints)."""
    root = Path(__file__).resolve().parent
    files = [root / n for n in ("train.py", "data.py", "module.py", "losses.py")] + sorted((root / "adapters").glob("*.py"))
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
    """Every `every` steps (and via `render` at the end): DDIM samples from the val faces' W+
    codes; the grid (top row: reference faces, bottom: generated) goes to `folder` and MLflow."""

    def __init__(self, val: dict, every: int, folder: Path, sampling):
        self.val, self.every, self.folder, self.sampling = val, every, Path(folder), sampling
        self.last_step = -1

    def render(self, trainer: Optional[L.Trainer], module: WPlusModule, step: int) -> Optional[Path]:
        if trainer is not None and not trainer.is_global_zero:
            return None
        s = self.sampling
        with module.export_weights():
            imgs = module.generate(self.val["wplus"], list(self.val["prompt"]), steps=s.steps, guidance=s.guidance,
                                   seed=s.seed)
        path = self.folder / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image_grid([self.val["face"], imgs])))
        if trainer is not None and trainer.logger is not None:
            tracking.log_artifacts(trainer.logger, [path], "samples")
        self.last_step = step
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if self.every and step > 0 and step % self.every == 0 and step != self.last_step:
            self.render(trainer, pl_module, step)


# ============================================================================================
# outputs


def export_adapter(module: WPlusModule, folder: Path, record: dict) -> tuple[Path, Path]:
    """Write adapter.safetensors (EMA weights when enabled) and adapter.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": record["method"], "stage": str(record["stage"]), "global_step": str(record["global_step"])}
    with module.export_weights() as adapter:
        st = save_adapter(adapter, folder / ADAPTER_FILE, metadata=meta)
    js = folder / RECORD_FILE
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, js)
    return st, js


def _loss_columns(stage: int) -> list[str]:
    return ["step", "loss"] + (["rec", "dis", "reg"] if stage == 2 else [])


def write_plot(history: Sequence[Sequence[float]], path: Path, stage: int) -> Path:
    """CSV step,loss[,rec,dis,reg] (one row per logged step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _loss_columns(stage)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in history:
            w.writerow([int(row[0])] + [f"{v:.6g}" for v in row[1:len(cols)]])
    return path


def summarize(history: Sequence[Sequence[float]], stage: int) -> dict[str, float]:
    """First / last / mean-of-last-10 of each logged loss."""
    out: dict[str, float] = {}
    if not history:
        return out
    cols = _loss_columns(stage)[1:]
    tail = history[-10:]
    for j, c in enumerate(cols, start=1):
        key = "loss" if c == "loss" else f"loss_{c}"
        out[key] = round(float(history[-1][j]), 6)
        out[f"{key}_first"] = round(float(history[0][j]), 6)
        out[f"{key}_last10_mean"] = round(sum(r[j] for r in tail) / len(tail), 6)
    return out


# ============================================================================================
# the entry point


def _quiet_lightning() -> None:
    for pat in (r".*does not have many workers.*", r".*module\(s\) in eval mode.*", r".*Tensor Cores.*",
                r".*LightningModule.*has parameters that were not used.*", r".*`training_step` returned `None`.*",
                r".*Checkpoint directory .* exists and is not empty.*", r".*treespec, LeafSpec.*"):
        warnings.filterwarnings("ignore", message=pat)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def train(
    params: Union[Params, Mapping[str, Any], str, os.PathLike, None] = None,
    stage: int = 1,
    *,
    max_steps: Optional[int] = None,
    fast_dev_run: bool = False,
    overrides: Optional[Mapping[str, Any]] = None,
    resume: str = "auto",
    trainer_kwargs: Optional[dict[str, Any]] = None,
    callbacks: Optional[Sequence[Callback]] = None,
    prepare_trainer: Optional[Callable[[L.Trainer], L.Trainer]] = None,
) -> dict[str, Any]:
    """Train W+ Adapter `stage` (1 or 2); returns a result dict (paths, step, metrics, MLflow run).

    params: a `Params`, the raw params dict, or a params.yaml path (None: defaults).
    overrides: dotted keys, e.g. {"train.synthetic": 16, "train_stage1.batch_size": 2}.
    max_steps: overrides train_stageN.max_steps. fast_dev_run: one step, no MLflow, no checkpoints,
    no metrics (the adapter files are still written, marked "fast_dev_run": true).
    """
    t0 = time.perf_counter()
    _quiet_lightning()
    tp = train_params(params, overrides)
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    cfg, scfg = tp.train, tp.stage(stage)
    if max_steps is not None:
        scfg.max_steps = int(max_steps)
    device = resolve_device(cfg.device)
    threads = cfg.threads or (1 if device == "cpu" and cfg.base_model.preset == "tiny" and not cfg.base_model.path else 0)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(tp, stage, cfg, scfg, device, t0, fast_dev_run, resume, trainer_kwargs, callbacks, prepare_trainer)
    finally:
        torch.set_num_threads(prev_threads)


def _train(tp: TrainParams, stage: int, cfg: TrainConfig, scfg, device: str, t0: float, fast_dev_run: bool, resume: str,
           trainer_kwargs, callbacks, prepare_trainer) -> dict[str, Any]:
    precision = resolve_precision(cfg.precision, device)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")

    comps = load_components(cfg, resolve_frozen_dtype(cfg.frozen_dtype, precision))
    adapter, init = build_adapter(stage, tp, comps)
    dm = WPlusDataModule(stage, cfg, scfg)
    dm.setup()
    data = dm.describe()
    weights_real = {f"diffusion.{k}": bool(v.weights_real) for k, v in comps.info.items()}
    weights_real.update(dm.weights_real())
    tracking.warn_random_weights(weights_real, f"W+ Adapter stage {stage}")
    base_fp = sorted((k, v.fingerprint) for k, v in comps.info.items())
    signature = run_signature(tp, stage, data["signature"], base_fp, file_fingerprint(init) if init else None,
                              code_fingerprint())

    ckdir = Path(cfg.checkpoints_dir) / f"stage{stage}"
    out = Path(cfg.out_dir) / f"stage{stage}"
    ckpt_path, prior = (None, None) if fast_dev_run else prepare_checkpoints(ckdir, signature, resume)

    commit, shards = tracking.git_commit(), ("none" if cfg.synthetic else
                                             tracking.shards_hash(cfg.shards, cfg.dvc_lock, cfg.shards_stage))
    tags = tracking.lineage_tags(stage, commit, shards, weights_real, tracking.git_dirty())
    logger = None
    if cfg.mlflow.enabled and not fast_dev_run:
        same_store = prior and prior.get("tracking_uri") == cfg.mlflow.tracking_uri
        logger = tracking.make_logger(cfg.mlflow, stage, tags, run_id=prior.get("run_id") if same_store else None)

    module = WPlusModule(stage, tp, comps, adapter, signature)
    val = dm.val_examples()
    grids = SampleGrids(val, scfg.sample_every, ckdir / "samples", cfg.sampling)
    cbs: list[Callback] = [grids]
    if not fast_dev_run:
        cbs.append(checkpoint_callback(ckdir, scfg.checkpoint_every, scfg.keep_last))
    cbs += list(callbacks or [])
    tk = dict(trainer_kwargs or {})
    plugins = [AtomicCheckpointIO()] + list(tk.pop("plugins", []) or [])
    kwargs: dict[str, Any] = dict(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=scfg.max_steps, logger=logger if logger is not None else False, callbacks=cbs,
        gradient_clip_val=scfg.grad_clip or None, accumulate_grad_batches=scfg.accumulate,
        log_every_n_steps=scfg.log_every, enable_checkpointing=not fast_dev_run, fast_dev_run=fast_dev_run,
        plugins=plugins, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(ckdir), enable_progress_bar=False,
    )
    kwargs.update(tk)
    trainer = L.Trainer(**kwargs)
    if prepare_trainer is not None:
        trainer = prepare_trainer(trainer)

    if logger is not None and trainer.is_global_zero:
        hp = {"stage": stage, "signature": signature, "precision": precision, "device": device,
              "data.train_samples": data["train_samples"], "data.source": data["source"],
              **flat_params(to_section(tp, "train"), "train."),
              **flat_params(to_section(tp, f"train_stage{stage}"), f"train_stage{stage}.")}
        if init:
            hp["init"] = str(init)
        try:
            logger.log_hyperparams(hp)
        except Exception as e:  # noqa: BLE001 - a resumed run with a changed non-trajectory param
            log.warning("MLflow params not (re)logged: %s", e)
        (ckdir / RUN_FILE).write_text(json.dumps({"signature": signature, "run_id": logger.run_id,
                                                  "tracking_uri": cfg.mlflow.tracking_uri, "stage": stage},
                                                 indent=2) + "\n")

    log.info("W+ Adapter stage %d: %s, %s, %d train samples, resume=%s", stage, device, precision,
             data["train_samples"], ckpt_path)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    step = int(trainer.global_step)

    result: dict[str, Any] = {"stage": stage, "global_step": step, "resumed_from": str(ckpt_path) if ckpt_path else None,
                              "checkpoint_dir": str(ckdir), "device": device, "precision": precision,
                              "weights_real": weights_real, "data": data}
    if not trainer.is_global_zero:
        return result
    final_grid = None
    if not fast_dev_run:
        final_grid = grids.render(trainer, module, step) if grids.last_step != step else grids.folder / f"step_{step:06d}.png"
    mlflow_info = tracking.run_info(logger, cfg.mlflow)
    record = {
        "method": tracking.METHOD, "stage": stage, "base_model": base_model_record(cfg),
        "wproj": adapter.wproj.config(), "scale": 1.0,
        "mlflow": {k: mlflow_info[k] for k in ("tracking_uri", "run_id", "experiment")},
        "lineage": {"git_commit": commit, "shards_hash": shards},
        "weights_real": weights_real, "global_step": step, "seed": cfg.seed,
        # extras (not part of the minimal contract)
        "mlflow_extra": {k: mlflow_info[k] for k in ("registry_uri", "artifact_uri")},
        "resolution": cfg.resolution, "ema": scfg.ema or None, "signature": signature,
        "init": {"path": str(init), "sha256": file_fingerprint(init, 64)} if init else None,
        "fast_dev_run": bool(fast_dev_run), "layers": adapter.layer_names,
    }
    st, js = export_adapter(module, out, record)
    if not fast_dev_run:
        prune_checkpoints(ckdir, scfg.keep_last)
    seconds = round(time.perf_counter() - t0, 3)
    metrics = {"stage": stage, "global_step": step, "seconds": seconds, **summarize(module.history, stage),
               "samples_per_s": round(float(module._last_log.get("samples_per_s", 0.0)), 3),
               "weights_random": not all(weights_real.values()),
               "resumed_from_step": _ckpt_step(ckpt_path)}
    if not fast_dev_run:
        Path(cfg.metrics_dir).mkdir(parents=True, exist_ok=True)
        mpath = Path(cfg.metrics_dir) / f"train_stage{stage}.json"
        mpath.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        ppath = write_plot(module.history, Path(cfg.plots_dir) / f"train_stage{stage}.csv", stage)
        if final_grid is not None and Path(final_grid).is_file():
            gpath = Path(cfg.plots_dir) / f"train_stage{stage}_samples.png"
            gpath.write_bytes(Path(final_grid).read_bytes())
        if logger is not None:
            tracking.log_artifacts(logger, [st, js], "adapter")
            tracking.log_artifacts(logger, [ppath, mpath], "metrics")
            tracking.set_tags(logger, {"global_step": step})
            logger.experiment.log_metric(logger.run_id, "train_seconds", seconds, step=step)
    result.update(adapter=str(st), adapter_json=str(js), record=record, metrics=metrics,
                  run_id=mlflow_info["run_id"], tracking_uri=mlflow_info["tracking_uri"], seconds=seconds)
    print(f"[train_stage{stage}] done: step {step}, loss {metrics.get('loss')}, adapter {st}, "
          f"mlflow run {mlflow_info['run_id']} in {seconds:.1f}s", flush=True)
    return result


def _ckpt_step(path: Optional[Path]) -> Optional[int]:
    if path is None:
        return None
    p = Path(path)
    m = _STEP_RE.search(p.resolve().name if p.is_symlink() else p.name)
    return int(m.group(1)) if m else None


def to_section(tp: TrainParams, name: str) -> dict:
    return tp.as_dict()[name]
