"""MLflow tracking and lineage for training runs.

* `make_logger`: Lightning's `MLFlowLogger` with the tracking URI, the registry URI and the
  experiment's artifact location all set explicitly (MLflow 3 picks different defaults depending
  on what the working directory holds; DESIGN.md section 8). A local artifact location is made
  absolute (a relative one would be resolved against whatever directory a later reader runs in).
* lineage: `shards_hash()` (the md5 DVC recorded for the shards folder in dvc.lock; 'none' when
  the folder is not a DVC output there or no longer matches it), `lineage_tags()` (the git commit
  comes from `pipeline.gitinfo`), `log_dataset()` (the shards as the run's MLflow dataset input,
  context `training`: digest = that DVC md5, source = the shards folder or URL).
* `mlflow_logger(trainer)`: the MLFlowLogger among the Trainer's loggers (a CSVLogger sits beside it);
  `log_model_metrics()`: metrics on an MLflow logged model (MLflow 3 model metrics).
* the experiment name is `mlflow.experiment` with "{method}" filled in (`experiment_name`).
* `warn_random_weights()`: the loud warning when any model in the run has random weights.
Everything that writes to MLflow is rank-0 only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml
from lightning.pytorch.utilities import rank_zero_only

from training.config import MlflowConfig

log = logging.getLogger("persona.training.tracking")


# ============================================================================================
# lineage


def _folder_stats(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def shards_hash(shards: str | os.PathLike, dvc_lock: str | os.PathLike = "dvc.lock", stage: str = "shards") -> str:
    """md5 of the shards folder as recorded by DVC (`<stage>.outs[path == shards].md5` in dvc.lock).

    'none' when dvc.lock is absent, the folder is not that stage's output, or the folder's file
    count / total size no longer match the lock (shards rewritten outside DVC).
    """
    lock = Path(dvc_lock)
    if not lock.is_absolute() and not lock.exists() and os.environ.get("DVC_ROOT"):
        lock = Path(os.environ["DVC_ROOT"]) / lock
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "none"
    outs = ((data.get("stages") or {}).get(stage) or {}).get("outs") or []
    target = Path(shards).resolve()
    for o in outs:
        p = (lock.parent / str(o.get("path", ""))).resolve()
        if p != target:
            continue
        md5 = str(o.get("md5") or "")
        if not md5:
            return "none"
        if "nfiles" in o and "size" in o and target.is_dir():
            n, size = _folder_stats(target)
            if (n, size) != (int(o["nfiles"]), int(o["size"])):
                log.warning("shards folder %s no longer matches dvc.lock (%d files / %d bytes vs %s / %s): "
                            "shards_hash=none", target, n, size, o["nfiles"], o["size"])
                return "none"
        return md5
    return "none"


def lineage_tags(method: str, phase: str, commit: str, shards: str, weights_real: Mapping[str, bool],
                 dirty: Optional[bool] = None) -> dict[str, str]:
    """MLflow tags: method, phase, git_commit, shards_hash, weights_real.<model>, weights_random."""
    tags = {
        "method": method,
        "phase": phase,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "shards_hash": shards,
        "weights_random": str(not all(weights_real.values())).lower(),
    }
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    tags.update({f"weights_real.{k}": str(bool(v)).lower() for k, v in sorted(weights_real.items())})
    return tags


def warn_random_weights(weights_real: Mapping[str, bool], what: str = "training") -> list[str]:
    """Loud warning (log + stderr banner) naming every model with random weights; returns their names."""
    fake = sorted(k for k, v in weights_real.items() if not v)
    if fake:
        bar = "!" * 100
        msg = (f"{bar}\n!!! {what} uses models with RANDOM WEIGHTS: {', '.join(fake)}\n"
               f"!!! the results are NOT meaningful; the run is tagged weights_random=true\n{bar}")
        rank_zero_only(log.warning)("%s", msg)
    return fake


DIGEST_LEN = 36  # MLflow's dataset digest column (an md5 + ".dir" is 36)


def shards_dataset(shards: str | os.PathLike, dvc_md5: str, data: Mapping[str, Any], members=()):
    """The shards as an MLflow dataset (metadata only): name `shards`, source = the folder (absolute) or
    URL, digest = the DVC md5 of the folder, else (not a DVC output) Persona's data signature, and a
    schema naming the members the phase reads. None for synthetic data (no source to trace)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import ColSpec, Schema

    where = str(shards) if "://" in str(shards) else str(Path(shards).resolve())
    with warnings.catch_warnings():  # MLflow registers its local source for two schemes ("" and file:)
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        source = resolve_dataset_source(where)  # a folder, s3://..., ...: MLflow's source for that scheme
    digest = dvc_md5 if dvc_md5 and dvc_md5 != "none" else \
        hashlib.sha256(str(data.get("signature", "")).encode()).hexdigest()[:DIGEST_LEN]
    schema = Schema([ColSpec("binary", m) for m in members]) if members else None
    return MetaDataset(source, name="shards", digest=digest[:DIGEST_LEN], schema=schema)


@rank_zero_only
def log_dataset(logger, shards: str | os.PathLike, dvc_md5: str, data: Mapping[str, Any], members=(),
                synthetic: bool = False) -> None:
    """The shards as the run's dataset input (context `training`; tag `persona.digest`: which digest)."""
    if logger is None or synthetic:
        return
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ds = shards_dataset(shards, dvc_md5, data, members)
    kind = "dvc-md5" if dvc_md5 and dvc_md5 != "none" else "persona-data-signature"
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag("persona.digest", kind),
            InputTag("persona.train_samples", str(data.get("train_samples")))]
    logger.experiment.log_inputs(logger.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)])


# ============================================================================================
# MLflow


def artifact_location(loc: str) -> str:
    """A local path -> absolute path (URIs such as s3://, file:, mlflow-artifacts: unchanged)."""
    if "://" in loc or loc.startswith(("file:", "mlflow-artifacts:")):
        return loc
    return str(Path(loc).resolve())


def setup_mlflow(cfg: MlflowConfig) -> tuple[str, str]:
    """Set the process-wide tracking and registry URIs; returns (tracking_uri, registry_uri)."""
    import mlflow

    registry = cfg.registry_uri or cfg.tracking_uri
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(registry)
    return cfg.tracking_uri, registry


def run_exists(tracking_uri: str, run_id: Optional[str]) -> bool:
    if not run_id:
        return False
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted db, unknown id, server down
        return False
    return run.info.lifecycle_stage == "active"


def experiment_name(cfg: MlflowConfig, method: str) -> str:
    return cfg.experiment.replace("{method}", method)


def make_logger(cfg: MlflowConfig, method: str, run_name: str, tags: Mapping[str, str], run_id: Optional[str] = None):
    """Lightning MLFlowLogger for one method phase (a new run, or `run_id` continued when it exists)."""
    from lightning.pytorch.loggers import MLFlowLogger

    setup_mlflow(cfg)
    if run_id and not run_exists(cfg.tracking_uri, run_id):
        log.warning("MLflow run %s not found at %s: starting a new run", run_id, cfg.tracking_uri)
        run_id = None
    return MLFlowLogger(
        experiment_name=experiment_name(cfg, method),
        run_name=cfg.run_name or run_name,
        tracking_uri=cfg.tracking_uri,
        tags=dict(tags),
        artifact_location=artifact_location(cfg.artifact_location),
        run_id=run_id,
        log_model=False,
    )


@rank_zero_only
def log_artifacts(logger, files: list[str | os.PathLike], artifact_path: Optional[str] = None) -> None:
    """Upload local files to the logger's run under `artifact_path`."""
    if logger is None:
        return
    for f in files:
        logger.experiment.log_artifact(logger.run_id, str(f), artifact_path)


@rank_zero_only
def set_tags(logger, tags: Mapping[str, Any]) -> None:
    if logger is None:
        return
    for k, v in tags.items():
        logger.experiment.set_tag(logger.run_id, k, str(v))


def run_info(logger, cfg: MlflowConfig, method: str) -> dict[str, Optional[str]]:
    """{"tracking_uri", "registry_uri", "run_id", "experiment", "artifact_uri"} (ids None without a logger)."""
    info: dict[str, Optional[str]] = {
        "tracking_uri": cfg.tracking_uri if logger is not None else None,
        "registry_uri": (cfg.registry_uri or cfg.tracking_uri) if logger is not None else None,
        "run_id": None,
        "experiment": experiment_name(cfg, method) if logger is not None else None,
        "artifact_uri": None,
    }
    if logger is not None:
        info["run_id"] = logger.run_id
        info["artifact_uri"] = logger.experiment.get_run(logger.run_id).info.artifact_uri
    return info


def mlflow_logger(trainer):
    """The MLFlowLogger among the Trainer's loggers (None without one)."""
    from lightning.pytorch.loggers import MLFlowLogger

    return next((lg for lg in getattr(trainer, "loggers", None) or [] if isinstance(lg, MLFlowLogger)), None)


@rank_zero_only
def log_model_metrics(logger, model_id: Optional[str], metrics: Mapping[str, float], step: int) -> None:
    """Numbers as metrics of the logged model `model_id` (MLflow 3), through the logger's run."""
    if logger is None or not model_id or not metrics:
        return
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    logger.experiment.log_batch(logger.run_id, metrics=[Metric(k, float(v), ts, int(step), model_id=model_id)
                                                        for k, v in metrics.items()])
