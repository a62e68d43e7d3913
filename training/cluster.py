"""Distributed training of any method phase with Ray Train (`TorchTrainer` + Lightning DDP).

    train_distributed(params, method, phase, workers=2, use_gpu=False, ...)  -> dict (rank 0's result)
    persona train --method M --phase P --workers 2 [--use-gpu]             (this, from the CLI)
    persona train submit --method M --phase P --address http://HEAD:8265  (the same command as a Ray Job)

Each Ray Train worker runs the ordinary `training.train.train(...)` with Ray's `RayDDPStrategy`,
`RayLightningEnvironment`, `RayTrainReportCallback` and `prepare_trainer` passed through its hooks.
Data: worker r of W reads global samples g = (b * W + r) * B + i of step b (`training.data.StepBatches`),
so the ranks read disjoint samples and together cover what one process with batch W * B would read.
Randomness (noise, timesteps, dropout, prompts, crops) is drawn per sample, keyed by its global
position g, so W workers with batch B compute the gradient of one process with batch W * B (DDP
averages the ranks' gradients = the gradient of the mean loss over the W * B samples), except where
a loss draws per device batch (`StepContext.generator`, e.g. a shuffle within the batch) or mixes
samples of the batch (e.g. a contrastive term).

Fault tolerance: every `checkpoint_every` steps the Lightning checkpoint (adapter + optimizer +
schedule + EMA) is reported to Ray Train (`ray.train.report`); when a worker dies, Ray Train restarts
the worker group (up to `max_failures` times) and each worker resumes from `ray.train.get_checkpoint()`.
(Ray Train v2 registers a report when its controller collects it, every ~2 s: a checkpoint reported
just before a crash may not be registered yet, and then the restart resumes from the one before.)
MLflow and the output files are written by global rank 0 only (as in `train()`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
from lightning.pytorch.callbacks import Callback

from pipeline.config import Params
from training.config import train_params

log = logging.getLogger("persona.training.cluster")

REPO = Path(__file__).resolve().parents[1]
RESULT_FILE = "result.json"  # in the final Ray checkpoint: rank 0's summary
CKPT_NAME = "step={step:06d}.ckpt"  # same name as train.py's Lightning checkpoints (its step parser reads it)


class ReportCheckpoints(Callback):
    """Every `every` optimizer steps: save the Lightning checkpoint and report it to Ray Train.

    Every rank calls `ray.train.report` (it is collective); only rank 0 attaches the checkpoint.
    (`RayTrainReportCallback` alone reports at epoch ends, and this training has one endless epoch.)"""

    def __init__(self, every: int):
        self.every = int(every)
        self.last = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step <= 0 or step % self.every or step == self.last or step >= int(trainer.max_steps or 0):
            return  # the final step is reported by RayTrainReportCallback at the epoch's end
        self.last = step
        report_checkpoint(trainer, {"global_step": step})


def report_checkpoint(trainer: L.Trainer, metrics: dict) -> None:
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix="persona-ckpt-"))
    try:
        path = tmp / CKPT_NAME.format(step=int(trainer.global_step))
        trainer.save_checkpoint(str(path))  # writes on global rank 0 only (collective call)
        ckpt = ray.train.Checkpoint.from_directory(str(tmp)) if trainer.is_global_zero else None
        ray.train.report(metrics=metrics, checkpoint=ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restored_checkpoint(dest: Path) -> Optional[Path]:
    """The Lightning checkpoint inside `ray.train.get_checkpoint()`, copied to `dest` (None: fresh start)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as d:
        files = sorted(Path(d).glob("*.ckpt"))
        if not files:
            raise FileNotFoundError(f"Ray Train checkpoint {d} holds no .ckpt file")
        out = dest / files[-1].name
        shutil.copyfile(files[-1], out)
    return out


def train_loop(config: dict) -> None:
    """Per-worker body: `train()` with Ray's Lightning strategy, environment and callbacks."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from training.train import find_checkpoint, train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    resume = config["resume"]
    local = Path(tempfile.mkdtemp(prefix=f"persona-resume-r{rank}-"))
    try:
        restored = restored_checkpoint(local)
        if restored is not None:
            resume = str(restored)
            log.info("rank %d resumes from Ray Train checkpoint %s", rank, restored.name)
        overrides = dict(config["overrides"] or {})
        if rank != 0:  # MLflow from rank 0 only (no second run, no concurrent store migrations)
            overrides["train.mlflow.enabled"] = False
        tp = train_params(config["params"], overrides)
        every = tp.phase(config["method"], config["phase"]).checkpoint_every
        extra = [f() for f in config.get("callback_factories") or []]
        res = train(config["params"], config["method"], config["phase"], max_steps=config["max_steps"], overrides=overrides,
                    resume=resume,
                    trainer_kwargs={"strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()],
                                    "devices": "auto"},
                    callbacks=[ReportCheckpoints(every), RayTrainReportCallback(), *extra],
                    prepare_trainer=prepare_trainer)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    keep = ("method", "phase", "global_step", "resumed_from", "adapter", "adapter_json", "run_id", "tracking_uri", "seconds")
    summary = {k: res.get(k) for k in keep}
    summary.update(resumed_from_step=(res.get("metrics") or {}).get("resumed_from_step"),
                   loss=(res.get("metrics") or {}).get("loss"), world_size=ctx.get_world_size(), done=True)
    # The final report carries a checkpoint (Ray's Result exposes the metrics of the latest
    # checkpoint): result.json for the driver, plus the final Lightning checkpoint for later resumes.
    tmp = Path(tempfile.mkdtemp(prefix="persona-final-"))
    try:
        ckpt = None
        if rank == 0:
            (tmp / RESULT_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
            last = find_checkpoint(Path(res["checkpoint_dir"]))
            if last is not None:
                shutil.copyfile(last.resolve(), tmp / CKPT_NAME.format(step=int(res["global_step"])))
            ckpt = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report(metrics={k: v for k, v in summary.items() if v is not None}, checkpoint=ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_ray(address: Optional[str]) -> None:
    """Ray for training (Ray Train workers, per-identity tasks): attach to `address` / $RAY_ADDRESS,
    else start it in this process. Warm data-stage actors this process still holds
    (`pipeline.runtime`'s pool, kept between stages) are released first: their CPUs are the
    training workers'."""
    import ray

    from pipeline.runtime import release_pools

    release_pools()
    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, runtime_env={"env_vars": env},
             include_dashboard=False, log_to_driver=True)


def train_distributed(
    params: Union[Params, Mapping[str, Any], str, os.PathLike, None] = None,
    method: Optional[str] = None,
    phase: Optional[str] = None,
    workers: Optional[int] = None,
    use_gpu: Optional[bool] = None,
    *,
    max_steps: Optional[int] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    resume: str = "auto",
    gpus_per_worker: Optional[float] = None,
    cpus_per_worker: Optional[float] = None,
    address: Optional[str] = None,
    storage_path: Optional[str] = None,
    max_failures: Optional[int] = None,
    name: Optional[str] = None,
    callback_factories: Sequence[Callable[[], Callback]] = (),
    stage: Optional[int] = None,
) -> dict[str, Any]:
    """Train one method phase on `workers` Ray Train workers (DDP); returns rank 0's final metrics plus
    {"checkpoint": path of the last reported Ray checkpoint or None, "storage_path", "name"}.

    None arguments fall back to the `train.cluster` section. `callback_factories`: zero-argument
    callables building extra Lightning callbacks inside each worker (e.g. for tests)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training import methods

    m, phase = methods.resolve(method, phase, stage)
    raw_params = params
    if isinstance(params, Params):
        raw_params = dict(params.extra)
    elif isinstance(params, (str, os.PathLike)):
        from pipeline.config import load_params

        raw_params = dict(load_params(params).extra)
    tp = train_params(raw_params, overrides)
    cc = tp.train.cluster
    workers = int(workers if workers is not None else cc.workers) or 1
    use_gpu = bool(cc.use_gpu if use_gpu is None else use_gpu)
    res = {"CPU": float(cc.cpus_per_worker if cpus_per_worker is None else cpus_per_worker)}
    if use_gpu:
        res["GPU"] = float(cc.gpus_per_worker if gpus_per_worker is None else gpus_per_worker)
    storage = str(Path(storage_path or cc.storage_path).resolve()) if "://" not in (storage_path or cc.storage_path) \
        else (storage_path or cc.storage_path)
    name = name or f"{m.name}-{phase}"
    ensure_ray(address or cc.address)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"params": raw_params, "method": m.name, "phase": phase, "max_steps": max_steps,
                           "overrides": dict(overrides or {}), "resume": resume,
                           "callback_factories": list(callback_factories)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=res),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=int(cc.max_failures if max_failures is None else max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, tp.phase(m.name, phase).keep_last)),
        ),
    )
    log.info("Ray Train: %s.%s on %d workers (%s per worker), storage %s/%s", m.name, phase, workers, res, storage, name)
    result = trainer.fit()
    out: dict[str, Any] = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            if (Path(d) / RESULT_FILE).is_file():
                out = json.loads((Path(d) / RESULT_FILE).read_text())
    if not out:
        out = dict(result.metrics or {})
    out.update(checkpoint=result.checkpoint.path if result.checkpoint else None, storage_path=storage, name=name)
    print(f"[train {m.name}.{phase}] distributed on {workers} workers: step {out.get('global_step')}, "
          f"adapter {out.get('adapter')}", flush=True)
    return out
