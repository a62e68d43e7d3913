"""Per-identity fine-tunes: a method phase with `Phase.per_identity` (e.g. PIDiff's `personalize`)
trained once per identity, each adapter a version of `persona-<method>` (`persona personalize`,
training/personalize_cli.py). Knows no method by name.

    personalize(params, method, identity=NAME)            one identity, in this process
    personalize(params, method, all_identities=True)      every labelled identity of the shards, one
                                                          Ray task each (fan-out), as many at a time
                                                          as the cluster has room for
    personalize(params, method, identity=NAME, images=DIR)  the identity's photos in a folder: the
                                                          data stages run on them first, into
                                                          <work_dir>/<identity>/data

Per identity: the phase is bound to the shards (`Phase.bind`: it picks the identity's photos and
refuses too few with a `DataVerdict`), its cache key is computed, and when the adapter folder holds
an adapter made with the same key (`personalize.json` beside it, adapter sha256 checked) the
training is skipped; else `training.train.train` runs with `<method>.<phase>.identity` set (it
resumes from the identity's checkpoints after a crash), optionally `persona evaluate` on the
adapter's evaluation faces, then registration (`training.registry.Registry.register`: tags and
aliases from the phase's record, e.g. `<identity>-champion`).

Cache key = the run signature of the identity's phase (train + method + phase config, incl. the
identity and `max_steps`), the bound phase's record (its data: keys and content of the identity's
photos), the init adapter (pinned registry version + sha256, or the file's sha256, or none), the
base model (preset, or its files' sizes and mtimes) and the training code's fingerprint.

Fan-out: Ray tasks with `cpus_per_task` CPUs (and `gpus_per_task` GPUs when the cluster has GPUs,
`use_gpu` null, or when `use_gpu` is true); each task runs in the driver's working directory (the
project folder must be at the same path on every node: a shared file system); the driver registers
each finished adapter (one writer for the registry). A task that raises, or whose worker dies, is an
error row (`retry: true`); with `max_retries: 0` (default) the next run retries it, resuming from
its checkpoints. An identity the phase refuses is an error row with its reason (`retry: false`).
Neither stops the others. The run report (`report`, one row per identity; counts in == rows out) is
written atomically when the run ends.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from pipeline.config import ConfigError, Params, build, load_params
from pipeline.digests import sha256_file
from pipeline.store import atomic_write_json

log = logging.getLogger("persona.personalize")

SECTION = "personalize"
STATE_FILE = "personalize.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# ============================================================================================
# params: `personalize:` (a raw section, validated here)


@dataclass
class PersonalizeParams:
    method: Optional[str] = None  # default --method
    phase: Optional[str] = None  # null: the method's one per-identity phase
    identities: list[str] = field(default_factory=list)  # DVC personalize@<identity> (dvc.yaml foreach)
    work_dir: str = "personalize"  # --images DIR: <work_dir>/<identity>/ holds the manifest and the data built
    report: str = "metrics/reports/personalize_{method}_{identity}.json"  # run report; {identity}: the identity or "all"
    register: bool = True  # register each adapter (persona-<method>, the phase's tags and aliases)
    evaluate: bool = False  # run `persona evaluate` on each adapter first (registered with its results)
    use_gpu: Optional[bool] = None  # fan-out tasks on GPUs; null: when the Ray cluster has GPUs
    cpus_per_task: float = 1.0
    gpus_per_task: float = 1.0
    max_retries: int = 0  # Ray retries of a task whose worker died, within the run (0: the next run retries)
    address: Optional[str] = None  # Ray cluster for the fan-out (null: $RAY_ADDRESS, else Ray in this process)


def personalize_params(params: Union[Params, Mapping[str, Any], None] = None) -> PersonalizeParams:
    """Validate the `personalize:` section (a Params, the raw params dict or None)."""
    if isinstance(params, Params):
        raw = params.extra.get(SECTION)
    else:
        raw = (params or {}).get(SECTION) if isinstance(params, Mapping) else None
    cfg = build(PersonalizeParams, copy.deepcopy(raw or {}), SECTION)
    if cfg.cpus_per_task < 0 or cfg.gpus_per_task < 0 or cfg.max_retries < 0:
        raise ConfigError("personalize: cpus_per_task, gpus_per_task and max_retries must be >= 0")
    if "{identity}" not in cfg.report:
        raise ConfigError("personalize.report: the path must hold '{identity}' (single runs write one report each)")
    for ident in cfg.identities:
        if not str(ident).strip():
            raise ConfigError("personalize.identities: empty name")
    return cfg


# ============================================================================================
# helpers


def per_identity_phase(method: Any, phase: Optional[str] = None) -> Any:
    """The method's per-identity phase (`phase`, or its only one)."""
    if phase is not None:
        ph = method.phase(phase)
        if not ph.per_identity:
            raise ValueError(f"{method.name}.{phase} is not a per-identity phase (Phase.per_identity)")
        return ph
    found = [p for p in method.phases.values() if p.per_identity]
    if len(found) != 1:
        raise ValueError(f"method '{method.name}' has {len(found)} per-identity phases "
                         f"({[p.name for p in found]}); give --phase" if found else
                         f"method '{method.name}' has no per-identity phase (Phase.per_identity): use `persona train`")
    return found[0]


def identity_key(method: Any, phase: Any) -> str:
    """The dotted override naming the identity: '<method>.<phase>.identity'."""
    return f"{method.name}.{phase.name}.identity"


def as_params(params: Union[Params, Mapping[str, Any], str, os.PathLike, None]) -> Params:
    """Params from a Params, a raw params dict or a params.yaml path (None: the defaults)."""
    from pipeline.config import params_from_dict

    if params is None:
        p = Params()
    elif isinstance(params, Params):
        p = params
    elif isinstance(params, (str, os.PathLike)):
        p = load_params(params)
    else:
        p = params_from_dict(dict(params))
    return p


def base_model_fingerprint(tp: Any) -> list:
    """What identifies the base model for the cache key: the preset, or each file's (path, size,
    mtime) under the configured path (cheap; a replaced weight file changes it)."""
    from training.train import base_model_record

    rec = base_model_record(tp.train)
    if not rec["path"]:
        return [rec]
    p = Path(rec["path"])
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
    return [rec, [(str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def resolve_init(spec: Optional[str], tracking_uri: Optional[str] = None) -> dict:
    """The adapter the phase starts from, pinned once for every identity of a run: {"spec" (as
    given), "use" (what the runs get: a `models:/name@alias` becomes `models:/name/<version>`),
    "sha256"}; {"spec": None, ...} for a fresh adapter."""
    if not spec:
        return {"spec": None, "use": None, "sha256": None}
    if spec.startswith("models:/"):
        from training.generate import parse_models_uri
        from training.registry import Registry

        name, version, alias = parse_models_uri(spec)
        mv = Registry(tracking_uri=tracking_uri).version(name, alias or version)
        sha = (mv.tags or {}).get("adapter_sha256")
        return {"spec": spec, "use": f"models:/{name}/{mv.version}", "sha256": sha}
    p = Path(spec)
    f = p / "adapter.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"init adapter {spec}: no such adapter file or folder")
    return {"spec": spec, "use": spec, "sha256": sha256_file(f)}


def cache_key(tp: Any, method: Any, phase: Any, record: Mapping[str, Any], init: Mapping[str, Any]) -> str:
    """The identity's cache key (module doc)."""
    from training.config import run_signature
    from training.train import code_fingerprint

    pcfg = tp.phase(method.name, phase.name)
    return run_signature(tp, method.name, phase.name, json.dumps(record, sort_keys=True, default=str),
                         json.dumps({"sha256": init.get("sha256"), "use": init.get("use")}, sort_keys=True),
                         json.dumps(base_model_fingerprint(tp), default=str), code_fingerprint(method),
                         f"max_steps={pcfg.max_steps}")


def read_state(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(folder: Path, key: str) -> Optional[dict]:
    """The state of an adapter in `folder` made with cache key `key` (its file unchanged), else None."""
    st = read_state(folder)
    f = folder / "adapter.safetensors"
    if not st or st.get("cache_key") != key or not f.is_file() or not (folder / "adapter.json").is_file():
        return None
    return st if sha256_file(f) == st.get("adapter_sha256") else None


def photos_in(folder: str | os.PathLike) -> list[Path]:
    """The photos under a folder (recursive, sorted)."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"--images {d}: no such folder")
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def build_identity_data(params: Params, identity: str, images: str | os.PathLike, work: Path) -> tuple[Path, str]:
    """Run the data stages (the registered ones, in order, through the pipeline's runner: the same
    machinery as `persona build`) on the photos of `images`, all labelled `identity`, into
    `work/data`; returns (the shards folder, the identity as the shards name it: the ingest stage
    makes names safe, e.g. 'Barack Obama' -> 'Barack_Obama-<hash>'). Incremental: a rerun
    recomputes only new photos."""
    from pipeline import plugins
    from pipeline.cli import run_stage
    from pipeline.config import SourceConfig
    from pipeline.shard_reader import ShardIndex, shard_urls
    from pipeline.stage import Context
    from pipeline.store import atomic_write_bytes
    from training.methods.base import DataVerdict

    photos = photos_in(images)
    if not photos:
        raise DataVerdict(f"--images {images}: no photos ({', '.join(IMAGE_SUFFIXES)})", reason="no_photos")
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "photos.jsonl"
    lines = "".join(json.dumps({"path": str(p.resolve()), "identity": identity}, sort_keys=True) + "\n" for p in photos)
    if not manifest.is_file() or manifest.read_text() != lines:
        atomic_write_bytes(manifest, lines.encode())
    p = copy.deepcopy(params)
    p.ingest.sources = [SourceConfig(name="personalize", path=str(manifest), labeled=True, allow_outside=True)]
    p.shards.out = None
    root = work / "data"
    ctx = Context.make(p, root, root / "metrics")
    print(f"[personalize] {identity}: data stages on {len(photos)} photo(s) of {images} -> {root}", flush=True)
    for st in plugins.data_stages():
        run_stage(st.name, ctx)
    urls = shard_urls(root / "shards")
    names = sorted(ShardIndex(urls, ("json",)).by_identity()[0]) if urls else []
    if len(names) == 1 and names[0] != identity:
        print(f"[personalize] '{identity}' is '{names[0]}' in the shards", flush=True)
    return root / "shards", names[0] if len(names) == 1 else identity


# ============================================================================================
# one identity


@dataclass
class Job:
    """One identity of a run: its overrides, output folder, cache key, or the phase's verdict."""

    identity: str
    overrides: dict
    out: Path
    key: Optional[str] = None
    record: dict = field(default_factory=dict)
    verdict: Optional[tuple[str, str]] = None  # (reason, message)
    state: Optional[dict] = None  # is_done() state: training can be skipped


def plan(tp_of: Any, method: Any, phase: Any, identities: Sequence[str], source: Any, init: Mapping[str, Any],
         overrides: Mapping[str, Any]) -> list[Job]:
    """Bind the phase to each identity's data (verdicts, records), its cache key and whether it is done.
    `tp_of(overrides) -> TrainParams`."""
    from training.methods.base import DataVerdict
    from training.train import output_dir

    jobs = []
    for ident in identities:
        ov = {**overrides, identity_key(method, phase): ident}
        if init.get("use") is not None:
            ov[f"{method.name}.{phase.name}.init"] = init["use"]
        tp = tp_of(ov)
        pcfg = tp.phase(method.name, phase.name)
        out = output_dir(tp.train.out_dir, method, phase, pcfg)
        job = Job(ident, ov, out)
        try:
            record = phase.bind(pcfg, source).record(pcfg)
        except DataVerdict as e:
            job.verdict = (e.reason, str(e))
            jobs.append(job)
            continue
        job.record = record
        job.key = cache_key(tp, method, phase, record, init)
        job.state = is_done(out, job.key)
        jobs.append(job)
    return jobs


def train_identity(params: Params, method: str, phase: str, identity: str, overrides: Mapping[str, Any],
                   evaluate: bool = False) -> dict:
    """Train one identity's adapter (resuming from its checkpoints) [+ evaluate it]; a result row.
    A DataVerdict becomes a refused row."""
    from training.config import train_params
    from training.methods.base import DataVerdict
    from training.train import train

    t0 = time.perf_counter()
    try:
        res = train(params, method, phase, overrides=dict(overrides))
    except DataVerdict as e:
        return {"identity": identity, "status": "error", "reason": e.reason, "error": str(e), "retry": False}
    metrics = res.get("metrics") or {}
    folder = Path(res["adapter"]).parent
    row = {"identity": identity, "status": "trained", "reason": None, "error": None, "retry": False,
           "adapter": str(folder), "global_step": res["global_step"],
           "resumed_from_step": metrics.get("resumed_from_step"), "loss": metrics.get("loss"),
           "mlflow_run_id": res.get("run_id")}
    if evaluate:
        shards = train_params(params, overrides).train.shards
        row["evaluation"] = evaluate_adapter(params, folder, method, shards)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def evaluate_adapter(params: Params, folder: Path, method: str, shards: str) -> str:
    """`persona evaluate` on one per-identity adapter (on its evaluation faces, in the shards it was
    trained on), outputs named after its folder; returns the full report (what registration reads)."""
    from training.evaluate import evaluate, evaluate_config

    stem = f"{method}_{folder.name}"
    cfg = evaluate_config(params, {"adapter": str(folder), "shards": str(shards),
                                   "metrics_out": f"metrics/evaluate_{stem}.json",
                                   "report_out": f"eval/{method}/{folder.name}/report.json",
                                   "grid_out": f"plots/evaluate_{stem}_grid.png",
                                   "images_out": f"eval/{method}/{folder.name}/images"})
    res = evaluate(cfg, params)
    return res["report_file"]


def _task(params: Params, method: str, phase: str, identity: str, overrides: Mapping[str, Any], evaluate: bool,
          cwd: str) -> dict:
    """A Ray task: one identity's training, in the driver's working directory."""
    import ray

    if os.path.isdir(cwd):
        os.chdir(cwd)
    row = train_identity(params, method, phase, identity, overrides, evaluate)
    row["node"] = ray.get_runtime_context().get_node_id()
    return row


# ============================================================================================
# the run


def _prepare_tracking(tp: Any, method: str) -> None:
    """Create the training experiment (and the tracking store's tables) once in the driver, so
    that parallel tasks do not race to create them."""
    if not tp.train.mlflow.enabled:
        return
    from training.tracking import artifact_location, experiment_name, setup_mlflow

    setup_mlflow(tp.train.mlflow)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tp.train.mlflow.tracking_uri)
    name = experiment_name(tp.train.mlflow, method)
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(tp.train.mlflow.artifact_location))
        except Exception:  # noqa: BLE001 - created meanwhile by another process
            if client.get_experiment_by_name(name) is None:
                raise


def fan_out(params: Params, method: Any, phase: Any, jobs: Sequence[Job], cfg: PersonalizeParams, *,
            address: Optional[str], use_gpu: Optional[bool], evaluate: bool, on_result) -> None:
    """One Ray task per job (see module doc); `on_result(job, row)` in the driver as each finishes."""
    import ray

    from training.cluster import ensure_ray

    ensure_ray(address or cfg.address)
    gpu = use_gpu if use_gpu is not None else cfg.use_gpu
    if gpu is None:
        gpu = ray.cluster_resources().get("GPU", 0) > 0
    opts = {"num_cpus": cfg.cpus_per_task, "num_gpus": cfg.gpus_per_task if gpu else 0, "max_retries": cfg.max_retries}
    total = ray.cluster_resources()
    print(f"[personalize] {len(jobs)} identit{'y' if len(jobs) == 1 else 'ies'} as Ray tasks ({opts['num_cpus']:g} CPU"
          + (f", {opts['num_gpus']:g} GPU" if gpu else "") + f" each) on a cluster with {total.get('CPU', 0):g} CPU"
          + (f", {total.get('GPU', 0):g} GPU" if total.get("GPU") else ""), flush=True)
    remote = ray.remote(_task)
    cwd = os.getcwd()
    refs = {remote.options(name=f"personalize-{method.name}-{job.out.name}", **opts).remote(
        params, method.name, phase.name, job.identity, job.overrides, evaluate, cwd): job for job in jobs}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            job = refs[ref]
            try:
                row = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the task raised: a failure of the run, retried next run
                cause = e.cause if getattr(e, "cause", None) is not None else e
                row = {"identity": job.identity, "status": "error", "reason": "failed", "retry": True,
                       "error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"}
            except ray.exceptions.RayError as e:  # the worker or its node died
                row = {"identity": job.identity, "status": "error", "reason": "worker_died", "retry": True,
                       "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            on_result(job, row)


def personalize(
    params: Union[Params, Mapping[str, Any], str, os.PathLike, None] = None,
    method: Optional[str] = None,
    *,
    identity: Optional[str] = None,
    all_identities: bool = False,
    images: Optional[str | os.PathLike] = None,
    steps: Optional[int] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    register: Optional[bool] = None,
    evaluate: Optional[bool] = None,
    address: Optional[str] = None,
    use_gpu: Optional[bool] = None,
) -> dict:
    """Personalise one identity (in this process) or all of them (Ray tasks); returns the run report
    {"method", "phase", "rows": [one per identity], "counts", "report": path, ...} (module doc)."""
    from training import methods
    from training.config import train_params
    from training.data import PersonaDataModule

    t0 = time.perf_counter()
    p = as_params(params)
    cfg = personalize_params(p)
    name = method or cfg.method
    if not name:
        raise ValueError("give --method (or params personalize.method)")
    m = methods.get(name)
    ph = per_identity_phase(m, cfg.phase)
    if bool(identity) == bool(all_identities):
        raise ValueError("give --identity NAME or --all-identities (one of the two)")
    if images is not None and not identity:
        raise ValueError("--images DIR is for one identity: give --identity NAME")
    register = cfg.register if register is None else register
    evaluate = cfg.evaluate if evaluate is None else evaluate
    ov = dict(overrides or {})
    if steps is not None:
        ov[f"{m.name}.{ph.name}.max_steps"] = int(steps)

    def tp_of(o: Mapping[str, Any]):
        return train_params(p, o)

    if images is not None:
        folder = ph.output_name(tp_of({**ov, identity_key(m, ph): identity}).phase(m.name, ph.name))
        shards, identity = build_identity_data(p, identity, images, Path(cfg.work_dir) / folder)
        ov["train.shards"] = str(shards)
    tp = tp_of(ov)
    pcfg = tp.phase(m.name, ph.name)
    dm = PersonaDataModule(m, ph, tp.train, pcfg)
    dm.load_sources()
    source = dm.train_source
    if identity:
        identities = [identity]
    else:
        groups, _ = source.by_identity()
        identities = sorted(groups)
        if not identities:
            raise ValueError(f"no labelled identities in {tp.train.shards} ({'/'.join(ph.splits)} splits)")
    init = resolve_init(pcfg.init)
    jobs = plan(tp_of, m, ph, identities, source, init, ov)

    reg = None
    if register:
        from training.registry import Registry, registry_config

        reg = Registry(registry_config(p))
    rows: dict[str, dict] = {}

    def finish(job: Job, row: dict) -> None:
        row = {"identity": job.identity, "adapter": str(job.out), "cache_key": job.key, **row}
        if row["status"] == "trained":
            st = {"cache_key": job.key, "identity": job.identity, "method": m.name, "phase": ph.name,
                  "adapter_sha256": sha256_file(job.out / "adapter.safetensors"), "init": init,
                  "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "evaluation": row.get("evaluation")}
            atomic_write_json(job.out / STATE_FILE, st)
            job.state = st
        if row["status"] in ("trained", "skipped") and reg is not None:
            try:
                row["registered"] = _register(reg, job, row.get("evaluation") or (job.state or {}).get("evaluation"))
            except Exception as e:  # noqa: BLE001 - the adapter is kept; the next run registers it
                row.update(registered=None, retry=True, register_error=f"{type(e).__name__}: {e}")
        rows[job.identity] = row
        _print_row(m.name, row)

    todo = []
    for job in jobs:
        if job.verdict is not None:
            finish(job, {"status": "error", "reason": job.verdict[0], "error": job.verdict[1], "retry": False})
        elif job.state is not None:
            finish(job, {"status": "skipped", "reason": "done", "error": None, "retry": False,
                         "registered": job.state.get("registered")})
        else:
            todo.append(job)
    if todo:
        _prepare_tracking(tp, m.name)
        if identity:
            (job,) = todo
            finish(job, train_identity(p, m.name, ph.name, job.identity, job.overrides, evaluate))
        else:
            fan_out(p, m, ph, todo, cfg, address=address, use_gpu=use_gpu, evaluate=evaluate, on_result=finish)

    ordered = [rows[i] for i in identities]
    counts: dict[str, int] = {}
    for r in ordered:
        k = r["status"] if r["status"] != "error" else f"error:{r['reason']}"
        counts[k] = counts.get(k, 0) + 1
    report = {"method": m.name, "phase": ph.name, "identities": len(identities), "rows": ordered, "counts": counts,
              "retry": sorted(r["identity"] for r in ordered if r.get("retry")),
              "init": init, "shards": str(tp.train.shards), "seconds": round(time.perf_counter() - t0, 3)}
    path = Path(cfg.report.replace("{method}", m.name).replace("{identity}", jobs[0].out.name if identity else "all"))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    report["report"] = str(path)
    print(f"[personalize {m.name}] {len(identities)} identit{'y' if len(identities) == 1 else 'ies'}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + f"; report {path}", flush=True)
    return report


def _register(reg: Any, job: Job, evaluation: Optional[str]) -> Optional[dict]:
    """Register the identity's adapter (once per adapter file and registry; an adapter already
    registered, e.g. with its evaluation by DVC's register stage, only gets the aliases when there is
    no new evaluation); recorded in its state."""
    st = job.state or read_state(job.out) or {}
    done = st.get("registered")
    if done and done.get("tracking_uri") == reg.tracking_uri and done.get("adapter_sha256") == st.get("adapter_sha256"):
        return done
    meta = json.loads((job.out / "adapter.json").read_text())
    aliases = ((meta.get("phase_record") or {}).get("registry") or {}).get("aliases") or ["candidate"]
    sha = st.get("adapter_sha256") or sha256_file(job.out / "adapter.safetensors")
    name = reg.model_name(str(meta.get("method")))
    same = None
    if evaluation is None:  # e.g. registered by `register@<method>` (DVC) with its evaluation
        same = next((v for v in reg.list(name) if v["tags"].get("adapter_sha256") == sha), None)  # newest first
    if same is not None:  # this adapter is a version already: point the aliases at it
        for a in aliases:
            reg.client.set_registered_model_alias(name, a, same["version"])
        out = {"name": name, "version": same["version"], "uri": f"models:/{name}/{same['version']}",
               "alias": aliases[0], "extra_aliases": aliases[1:]}
    else:
        out = reg.register(job.out, evaluation=evaluation, alias=aliases[0])
    done = {"name": out["name"], "version": out["version"], "aliases": [out["alias"], *out["extra_aliases"]],
            "uri": out["uri"], "tracking_uri": reg.tracking_uri, "adapter_sha256": sha}
    if st:
        atomic_write_json(job.out / STATE_FILE, {**st, "registered": done})
        job.state = {**st, "registered": done}
    return done


def _print_row(method: str, row: dict) -> None:
    ident = row["identity"]
    if row["status"] == "error":
        msg = f"ERROR ({row['reason']}{', retried by the next run' if row.get('retry') else ''}): {row.get('error')}"
    elif row["status"] == "skipped":
        msg = f"skipped (adapter with this cache key exists: {row['adapter']})"
    else:
        msg = (f"trained to step {row.get('global_step')}"
               + (f" (resumed from step {row['resumed_from_step']})" if row.get("resumed_from_step") else "")
               + f", adapter {row['adapter']}" + (f" in {row['seconds']:.1f}s" if row.get("seconds") else ""))
    reg = row.get("registered")
    if reg:
        msg += f"; registered {reg['name']} v{reg['version']} @{','.join(reg['aliases'])}"
    elif row.get("register_error"):
        msg += f"; NOT registered ({row['register_error']}; the next run registers it)"
    print(f"[personalize {method}] {ident}: {msg}", flush=True)
