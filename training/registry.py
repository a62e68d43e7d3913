"""MLflow model registry for adapters: register, promote (gated), rollback, list, show. Aliases only.

    register   a version made from the adapter's MLflow model (`training.pyfunc`: a pyfunc, so
               `mlflow.pyfunc.load_model("models:/persona-<method>@candidate")` works): the model its
               training logged (adapter.json mlflow.model_id, when it is on this tracking server and
               carries no other evaluation), else a new one logged now into the training run (when
               that run is on this server) or a new run; the evaluation's numbers are MLflow metrics
               of that model (`eval.<name>`, for the evaluation-set dataset `eval-set`), a metric
               without a number is a tag `missing.<name>` with the reason; the version is tagged with
               the adapter phase's own tags and aliases (adapter.json
               `phase_record.registry`, e.g. a per-identity fine-tune's identity and `<identity>-champion`),
               the evaluation-set id (`eval_set`), git commit, shards hash, method, phase, params hash
               (adapter.json `params_hash` / `signature`, else a hash of the training run's MLflow
               params), adapter sha256, weights_real; alias `candidate`. Evaluation results made for
               another adapter file are refused. Registering the same adapter with the same
               evaluation again reuses that version.
    promote    move alias `champion` to the candidate only when it beats the current champion on
               the gate metrics (higher is better; not worse on any, better by > min_improvement
               on at least one) on the SAME evaluation set; else `PromotionRefused` with the numbers.
               The previous champion is pushed on the registered model's `persona.champion_history`
               tag (a JSON list of versions).
    rollback   pop that history: `champion` goes back to the previous champion.

Where: tracking URI = explicit argument, else $MLFLOW_TRACKING_URI, else `registry.tracking_uri`
(default `sqlite:///mlruns.db`); registry URI = argument, else $MLFLOW_REGISTRY_URI, else
`registry.registry_uri`, else the tracking URI. New experiments on a local store put their artifacts
in `registry.artifact_location` (default `mlartifacts/`); on an HTTP server the server decides
(`--artifacts-destination`). Concurrent promotions of the same model are not serialised.
On a server with MLflow's basic-auth app the credentials are MLflow's own MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD (never from params or URIs; never logged, never in params or tags); a refusal (401 / 403) raises
`RegistryAccessError`, one line naming the user and the refused call, never the password.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.config import ConfigError, Params
from pipeline.digests import sha256_file
from training.sections import section_config

log = logging.getLogger("persona.registry")

CANDIDATE = "candidate"
CHAMPION = "champion"
HISTORY_TAG = "persona.champion_history"
EVAL_PREFIX = "eval."  # the evaluation's metrics on the version's logged model
MISSING_TAG = "missing."  # version tag: a metric without a number, and why
METRIC_PREFIX = "metric."  # versions registered before models: metrics as tags
MISSING_PREFIX = "missing: "
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
HISTORY_MAX = 200
ADAPTER_FILES = ("adapter.safetensors", "adapter.json")


# ============================================================================================
# config (`registry:` section of params.yaml)


@dataclass
class RegistryConfig:
    model_name: str = "persona-{method}"  # registered model, one per method ({method}: the adapter's)
    tracking_uri: str = DEFAULT_TRACKING_URI  # $MLFLOW_TRACKING_URI wins
    registry_uri: Optional[str] = None  # null -> the tracking URI ($MLFLOW_REGISTRY_URI wins)
    artifact_location: str = "mlartifacts"  # artifact root of NEW experiments on a local store
    experiment: str = "persona-{method}"  # for new runs when the adapter's training run is not on this server
    gate_metrics: list[str] = field(default_factory=lambda: ["identity_similarity"])  # higher is better
    min_improvement: float = 0.0  # at least one gate metric must improve by more than this
    require_same_eval_set: bool = True  # candidate and champion must carry the same eval_set tag
    metrics: str = "eval/{method}/report.json"  # the evaluation report `register` reads by default
    out: str = "eval/{method}/register.json"  # what `register` writes (DVC out); {method}: the adapter's


def registry_config(params: Params | Mapping[str, Any] | None = None) -> RegistryConfig:
    cfg = section_config(RegistryConfig, params, "registry")
    if not cfg.gate_metrics:
        raise ConfigError("registry.gate_metrics: name at least one metric")
    if cfg.min_improvement < 0:
        raise ConfigError("registry.min_improvement must be >= 0")
    return cfg


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (no candidate, nothing to roll back to, ...)."""


class RegistryAccessError(RegistryError):
    """The MLflow server refused the request: no or wrong credentials (401) or not allowed (403)."""


class PromotionRefused(RegistryError):
    """The candidate does not beat the champion; `decision` holds the numbers."""

    def __init__(self, decision: dict):
        self.decision = decision
        super().__init__(format_decision(decision))


# ============================================================================================
# URIs and clients


def resolve_uris(tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None,
                 cfg: Optional[RegistryConfig] = None) -> tuple[str, str]:
    """(tracking, registry) URIs: argument > environment > params > default (see module doc)."""
    cfg = cfg or RegistryConfig()
    t = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or DEFAULT_TRACKING_URI
    r = registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or cfg.registry_uri or t
    return t, r


def is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# The one place that turns an authenticated server's refusal into one clear line. Credentials come
# only from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (MLflow's client reads them); the
# message names the user, never the password.
_ACCESS_CODES = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


def access_status(e: BaseException) -> Optional[int]:
    """401 / 403 when `e` is an MLflow server's refusal (REST error code or HTTP status), else None."""
    code = getattr(e, "error_code", None)
    if code in _ACCESS_CODES:
        return _ACCESS_CODES[code]
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if status in (401, 403) else None


def access_message(status: int, uri: str, what: str) -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and not user:
        return (f"the MLflow server {uri} requires a login: set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (refused: {what})")
    if status == 401:
        return (f"the MLflow server {uri} rejected the credentials of user '{user}' "
                f"(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; refused: {what})")
    return (f"user '{user}' may not {what} on the MLflow server {uri} (403 permission denied): the account "
            "can read but not change this; use an account with EDIT or MANAGE on it, or ask an MLflow admin")


class _AccessChecked:
    """An MlflowClient whose calls raise RegistryAccessError for a 401/403 (everything else unchanged)."""

    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised unless it is a refusal
                status = access_status(e)
                if status is None:
                    raise
                shown = ", ".join(repr(a) for a in args[:2] if isinstance(a, (str, int)))
                raise RegistryAccessError(access_message(status, self._uri, f"{name}({shown})")) from e

        return call


def client_for(tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None,
               cfg: Optional[RegistryConfig] = None):
    """An `MlflowClient` on the resolved URIs (a 401/403 from the server raises RegistryAccessError)."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    t, r = resolve_uris(tracking_uri, registry_uri, cfg)
    return _AccessChecked(MlflowClient(tracking_uri=t, registry_uri=r), t)


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def download_version(name: str, version: str | int, dst: str | os.PathLike, *, tracking_uri: str,
                     registry_uri: str) -> Path:
    """Download the files of `models:/<name>/<version>` (the adapter folder) into `dst`.

    The version's download URI is resolved with an explicit registry client, then fetched with
    `mlflow.artifacts.download_artifacts(<that uri>, tracking_uri=...)`: MLflow 3.17's own
    `models:/` resolution reads the process-global registry URI and ignores the one passed in.
    """
    _quiet_mlflow()
    import mlflow
    from mlflow import MlflowClient

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    client = _AccessChecked(MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri), tracking_uri)
    uri = client.get_model_version_download_uri(name, str(version))
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a refusal
        if access_status(e) is None:
            raise
        raise RegistryAccessError(access_message(access_status(e), tracking_uri, f"download {uri}")) from e
    return Path(path)


# ============================================================================================
# metrics <-> tags, and the promotion gate (pure)


def metric_values(metrics: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """{'identity_similarity': {'value': 0.41, ...}, 'clip_t': {'value': None, 'missing': 'why'}} ->
    ({'identity_similarity': 0.41}, {'clip_t': 'why'}): the numbers, and why the others have none."""
    values, missing = {}, {}
    for name, m in metrics.items():
        v = m.get("value") if isinstance(m, Mapping) else m
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            values[name] = float(v)
        else:
            missing[name] = str((m.get("missing") if isinstance(m, Mapping) else None) or "no value")
    return values, missing


def model_metrics(model) -> dict[str, float]:
    """The latest `eval.<name>` metrics of a logged model -> {name: value}."""
    latest: dict[str, Any] = {}
    for m in getattr(model, "metrics", None) or []:
        if m.key.startswith(EVAL_PREFIX):
            k = m.key[len(EVAL_PREFIX):]
            if k not in latest or (m.timestamp, m.step) >= (latest[k].timestamp, latest[k].step):
                latest[k] = m
    return {k: float(m.value) for k, m in latest.items()}


def model_id_of(mv) -> Optional[str]:
    """The logged model a version was made from (its `model_id`, or its `models:/<id>` source)."""
    mid = getattr(mv, "model_id", None)
    if mid:
        return mid
    src = str(getattr(mv, "source", "") or "")
    rest = src[len("models:/"):] if src.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None


def metric_tags(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Versions registered before MLflow models: {'identity_similarity': {'value': 0.41, ...}, 'clip_t':
    {'value': None, 'missing': 'why'}} -> {'metric.identity_similarity': '0.41', 'metric.clip_t': 'missing: why'}."""
    out = {}
    for name, m in metrics.items():
        v = m.get("value") if isinstance(m, Mapping) else m
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[METRIC_PREFIX + name] = repr(float(v))
        else:
            reason = m.get("missing") if isinstance(m, Mapping) else None
            out[METRIC_PREFIX + name] = MISSING_PREFIX + str(reason or "no value")
    return out


def tag_metrics(tags: Mapping[str, str]) -> dict[str, Optional[float]]:
    """Inverse of `metric_tags` (versions registered before MLflow models): metric name -> float, or None."""
    out: dict[str, Optional[float]] = {}
    for k, v in tags.items():
        if not k.startswith(METRIC_PREFIX):
            continue
        try:
            out[k[len(METRIC_PREFIX):]] = float(v)
        except (TypeError, ValueError):
            out[k[len(METRIC_PREFIX):]] = None
    return out


def gate(
    candidate: Mapping[str, Optional[float]],
    champion: Optional[Mapping[str, Optional[float]]],
    metrics: Sequence[str],
    *,
    min_improvement: float = 0.0,
    candidate_eval_set: Optional[str] = None,
    champion_eval_set: Optional[str] = None,
    require_same_eval_set: bool = True,
) -> dict:
    """Does the candidate beat the champion? -> {"ok", "reasons", "rows"} (metrics: higher is better).

    ok when there is no champion (and the candidate has every gate metric), or when on the same
    evaluation set the candidate is not worse on any gate metric and better by more than
    `min_improvement` on at least one. A metric without a value on either side refuses.
    """
    if not metrics:
        raise ValueError("gate: no gate metrics")
    rows, reasons = [], []
    for m in metrics:
        c = candidate.get(m)
        h = None if champion is None else champion.get(m)
        delta = None if c is None or h is None else c - h
        if c is None:
            verdict = "candidate has no value"
        elif champion is None:
            verdict = "no champion"
        elif h is None:
            verdict = "champion has no value"
        elif delta < 0:
            verdict = "worse"
        elif delta > min_improvement:
            verdict = "better"
        else:
            verdict = "not better"
        rows.append({"metric": m, "candidate": c, "champion": h, "delta": delta, "verdict": verdict})
    for r in rows:
        if r["verdict"] in ("candidate has no value", "champion has no value", "worse"):
            reasons.append(f"{r['metric']}: {r['verdict']} (candidate {_fmt(r['candidate'])}, champion {_fmt(r['champion'])})")
    if champion is not None and require_same_eval_set:
        if not candidate_eval_set or not champion_eval_set:
            reasons.append("evaluation set unknown on one side (tag eval_set missing): results are not comparable")
        elif candidate_eval_set != champion_eval_set:
            reasons.append(f"different evaluation sets (candidate {candidate_eval_set[:12]}, champion {champion_eval_set[:12]})")
    if champion is not None and not reasons and not any(r["verdict"] == "better" for r in rows):
        reasons.append(f"no gate metric improves by more than {min_improvement} over the champion")
    return {"ok": not reasons, "reasons": reasons, "rows": rows, "min_improvement": min_improvement,
            "first_champion": champion is None}


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_decision(d: dict) -> str:
    head = "PROMOTE" if d.get("ok") else "REFUSED"
    over = "(first champion)" if d.get("champion_version") is None else f"over v{d.get('champion_version')}"
    who = f" {d.get('name')} v{d.get('candidate_version')} {over}" if d.get("name") else ""
    lines = [f"{head}{who}"]
    lines.append(f"  {'metric':28s} {'candidate':>10s} {'champion':>10s} {'delta':>9s}  verdict")
    for r in d.get("rows", []):
        delta = "n/a" if r["delta"] is None else f"{r['delta']:+.4f}"
        lines.append(f"  {r['metric']:28s} {_fmt(r['candidate']):>10s} {_fmt(r['champion']):>10s} {delta:>9s}  {r['verdict']}")
    for reason in d.get("reasons", []):
        lines.append(f"  reason: {reason}")
    return "\n".join(lines)


# ============================================================================================
# helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(params), sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_evaluation(path: Optional[str | os.PathLike]) -> Optional[dict]:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"evaluation results {p} not found (run `persona evaluate` first, or omit --metrics)")
    return json.loads(p.read_text())


def version_summary(mv, aliases: Optional[Sequence[str]] = None, metrics: Optional[Mapping[str, Optional[float]]] = None) -> dict:
    tags = dict(mv.tags or {})
    return {
        "name": mv.name, "version": str(mv.version), "aliases": sorted(aliases if aliases is not None else (mv.aliases or [])),
        "run_id": mv.run_id, "source": mv.source, "status": mv.status,
        "created": _dt.datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, _dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": dict(tag_metrics(tags) if metrics is None else metrics), "model_id": model_id_of(mv),
        "eval_set": tags.get("eval_set"), "weights_real": tags.get("weights_real"), "tags": tags,
    }


# ============================================================================================
# the registry


class Registry:
    """Registry operations on one tracking/registry server (see module doc)."""

    def __init__(self, cfg: Optional[RegistryConfig] = None, tracking_uri: Optional[str] = None,
                 registry_uri: Optional[str] = None):
        self.cfg = cfg or RegistryConfig()
        self.tracking_uri, self.registry_uri = resolve_uris(tracking_uri, registry_uri, self.cfg)
        self.client = client_for(self.tracking_uri, self.registry_uri)

    # ---------------------------------------------------------------- lookups
    def by_alias(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if _not_found(e):
                return None
            raise

    def version(self, name: str, ref: str | int):
        """A version by number or alias."""
        ref = str(ref)
        mv = self.client.get_model_version(name, ref) if ref.isdigit() else self.by_alias(name, ref)
        if mv is None:
            raise RegistryError(f"{name}: no version with alias '{ref}'")
        return mv

    def _registered(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as e:
            if _not_found(e):
                return None
            raise

    def _aliases_of(self, name: str) -> dict[str, list[str]]:
        rm = self._registered(name)
        out: dict[str, list[str]] = {}
        for alias, v in (getattr(rm, "aliases", None) or {}).items():
            out.setdefault(str(v), []).append(alias)
        return out

    def _history(self, name: str) -> list[str]:
        rm = self._registered(name)
        raw = (rm.tags or {}).get(HISTORY_TAG, "[]") if rm is not None else "[]"
        try:
            return [str(v) for v in json.loads(raw)]
        except json.JSONDecodeError:
            return []

    def _set_history(self, name: str, history: list[str]) -> None:
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_MAX:]))

    def _run_exists(self, run_id: Optional[str]) -> bool:
        if not run_id:
            return False
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return run.info.lifecycle_stage != "deleted"

    def model_name(self, method: Optional[str] = None, *, name: Optional[str] = None) -> str:
        """`name`, else registry.model_name with {method} filled in (persona-<method>)."""
        if name:
            return name
        tpl = self.cfg.model_name
        if "{method}" in tpl:
            if not method:
                raise RegistryError(f"registry.model_name is '{tpl}': give the model --name or the --method")
            return tpl.replace("{method}", method)
        return tpl

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        loc = None if is_remote(self.tracking_uri) else str(Path(self.cfg.artifact_location).resolve())
        return self.client.create_experiment(name, artifact_location=loc)

    def download(self, name: str, version: str | int, dst: str | os.PathLike) -> Path:
        return download_version(name, version, dst, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    # ---------------------------------------------------------------- register
    def register(
        self,
        adapter_dir: str | os.PathLike,
        *,
        evaluation: Optional[str | os.PathLike | dict] = None,
        name: Optional[str] = None,
        alias: str = CANDIDATE,
        allow_mismatch: bool = False,
        new_version: bool = False,
        kit: Optional[Mapping[str, Any]] = None,
    ) -> dict:
        """Register the adapter in `adapter_dir` (+ evaluation results) and point `alias` at it. `kit`: the
        data stages' params sections a model logged now carries (`training.pyfunc.kit_params`; default
        the defaults)."""
        folder = Path(adapter_dir)
        meta_path = folder / "adapter.json"
        for f in ADAPTER_FILES:
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{folder}: missing {f} (an adapter folder holds {', '.join(ADAPTER_FILES)})")
        meta = json.loads(meta_path.read_text())
        name = name or self.model_name(str(meta.get("method")))
        sha = sha256_file(folder / "adapter.safetensors")
        ev = evaluation if isinstance(evaluation, dict) or evaluation is None else load_evaluation(evaluation)
        if ev is not None:
            ev_sha = (ev.get("adapter") or {}).get("sha256")
            if ev_sha != sha and not allow_mismatch:
                raise RegistryError(
                    f"the evaluation results are for adapter {str(ev_sha)[:12]}, not for {folder} ({sha[:12]}); "
                    "re-run `persona evaluate` for this adapter (or pass --allow-mismatch)")
        metrics = (ev or {}).get("metrics") or {}
        values, missing = metric_values(metrics)
        eval_set = ((ev or {}).get("eval_set") or {}).get("id")

        ml = meta.get("mlflow") or {}
        lineage = meta.get("lineage") or {}
        run_id = ml.get("run_id")
        reused_run = self._run_exists(run_id)
        if reused_run:
            params_hash = meta.get("params_hash") or meta.get("signature") or _params_hash(self.client.get_run(run_id).data.params)
        else:
            if run_id:
                log.info("training run %s is not on %s: registering from a new run", run_id, self.tracking_uri)
            exp_id = self._experiment_id(ml.get("experiment") or self.cfg.experiment.replace("{method}", str(meta.get("method"))))
            run = self.client.create_run(exp_id, run_name=f"register-{name}", tags={
                "persona.kind": "register", "persona.training_run": str(run_id), "persona.training_tracking_uri": str(ml.get("tracking_uri")),
                "git_commit": str(lineage.get("git_commit")), "shards_hash": str(lineage.get("shards_hash"))})
            run_id = run.info.run_id
            params_hash = meta.get("params_hash") or meta.get("signature") or "unknown"
        weights_real = meta.get("weights_real") or {}
        real = bool(weights_real) and all(bool(v) for v in weights_real.values())
        if ev is not None:
            real = real and bool(ev.get("weights_real", False))
        tags = {
            "method": str(meta.get("method")), "phase": str(meta.get("phase")), "global_step": str(meta.get("global_step")),
            "seed": str(meta.get("seed")), "git_commit": str(lineage.get("git_commit")),
            "shards_hash": str(lineage.get("shards_hash")), "params_hash": str(params_hash), "adapter_sha256": sha,
            "base_model": json.dumps(meta.get("base_model"), sort_keys=True), "weights_real": str(real).lower(),
            "eval_set": str(eval_set) if eval_set else "none", "registered_at": _now(),
            **{MISSING_TAG + k: why[:4000] for k, why in missing.items()},
        }
        if ev is None:
            tags["evaluated"] = "false"
        # what the adapter's phase asks for (`Phase.record` "registry"): extra tags (never replacing
        # the ones above) and aliases (e.g. a per-identity fine-tune: identity tags, <identity>-champion)
        extra = (meta.get("phase_record") or {}).get("registry") or {}
        tags = {**{str(k): str(v) for k, v in (extra.get("tags") or {}).items()}, **tags}
        extra_aliases = [str(a) for a in extra.get("aliases") or [] if str(a) != alias]
        if not real:
            log.warning("!!! registering %s with RANDOM weights somewhere (weights_real=false): not a usable model !!!", name)

        if self._registered(name) is None:
            self.client.create_registered_model(
                name, tags={"method": str(meta.get("method"))},
                description=f"Persona {meta.get('method')} identity adapters (aliases: {CANDIDATE}, {CHAMPION})")
        expected = {**values, **{k: None for k in missing}}
        existing = None if new_version else self._same_version(name, sha, tags, expected)
        model_id = None
        if existing is not None:
            mv = existing
            log.info("%s: adapter %s with this evaluation is already version %s; moving '%s' only", name, sha[:12], mv.version, alias)
        else:
            model_id = self._model_for(folder, meta, sha, run_id if reused_run else None, values)
            if model_id is None:  # log the adapter as a model of this run now
                from training import pyfunc

                model_id = pyfunc.log_adapter_model(self.client, folder, run_id=run_id, kit=kit,
                                                    step=int(meta.get("global_step") or 0),
                                                    tags={"method": str(meta.get("method")), "phase": str(meta.get("phase")),
                                                          "adapter_sha256": sha, "persona.kind": "register"})
            if values and not model_metrics(self.client.get_logged_model(model_id)):
                from training.evaluate import log_metrics_on

                log_metrics_on(self.client, run_id, values, int(meta.get("global_step") or 0), model_id=model_id,
                               results=ev if (ev or {}).get("eval_set", {}).get("shards") else None)
            if ev is not None:
                self._log_json(run_id, ev, "evaluation", "evaluate.json")
            if not reused_run:
                self.client.set_terminated(run_id)
            from training.pyfunc import tracking_uri

            with tracking_uri(self.tracking_uri):  # a local registry resolves models:/<id> through the global URI
                mv = self.client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                                      model_id=model_id,
                                                      description=f"{meta.get('method')} {meta.get('phase')} adapter {sha[:12]}")
            mv = self._wait_ready(name, mv.version)
        self.client.set_registered_model_alias(name, alias, mv.version)
        for a in extra_aliases:
            self.client.set_registered_model_alias(name, a, mv.version)
        out = {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}", "alias": alias,
               "alias_uri": f"models:/{name}@{alias}", "run_id": mv.run_id, "source": mv.source,
               "model_id": model_id_of(mv) or model_id, "extra_aliases": extra_aliases, "reused_training_run": reused_run,
               "reused_version": existing is not None, "tracking_uri": self.tracking_uri,
               "registry_uri": self.registry_uri, "tags": tags, "metrics": expected}
        log.info("registered %s version %s (%s) from run %s", name, mv.version, alias, mv.run_id)
        return out

    def _model_for(self, folder: Path, meta: Mapping[str, Any], sha: str, run_id: Optional[str],
                   values: Mapping[str, float]) -> Optional[str]:
        """The model training logged for this adapter (adapter.json mlflow.model_id), when it is on this
        server in the training run, holds these adapter files and carries no other evaluation; else None."""
        from training.evaluate import logged_model

        mid = (meta.get("mlflow") or {}).get("model_id")
        model = logged_model(self.client, mid) if run_id else None
        if model is None or model.source_run_id != run_id or str(model.status) != "READY":
            return None
        if model.tags.get("adapter_sha256") not in (None, sha):
            return None
        have = model_metrics(model)
        if have and have != dict(values):
            return None  # evaluated otherwise: this version gets its own model, with its own metrics
        return mid

    def version_metrics(self, mv) -> dict[str, Optional[float]]:
        """A version's evaluation: the `eval.<name>` metrics of its logged model, None for each
        `missing.<name>` tag; versions registered before models: their `metric.<name>` tags."""
        from training.evaluate import logged_model

        tags = dict(mv.tags or {})
        model = logged_model(self.client, model_id_of(mv))
        if model is None:
            return tag_metrics(tags)
        out: dict[str, Optional[float]] = dict(model_metrics(model))
        out.update({k[len(MISSING_TAG):]: None for k in tags if k.startswith(MISSING_TAG)})
        return out

    def _log_json(self, run_id: str, obj: dict, artifact_path: str, filename: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / filename
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(p), artifact_path)

    def _same_version(self, name: str, sha: str, tags: Mapping[str, str], metrics: Mapping[str, Optional[float]]):
        """A version of this adapter file with this evaluation (set and numbers), if there is one."""
        for mv in self.client.search_model_versions(f"name='{name}'"):
            t = mv.tags or {}
            if t.get("adapter_sha256") == sha and t.get("eval_set") == tags.get("eval_set") and \
                    self.version_metrics(mv) == dict(metrics):
                return mv
        return None

    def _wait_ready(self, name: str, version: str, timeout: float = 60.0):
        import time

        t0 = time.monotonic()
        while True:
            mv = self.client.get_model_version(name, version)
            if mv.status == "READY":
                return mv
            if mv.status == "FAILED_REGISTRATION":
                raise RegistryError(f"{name} v{version}: registration failed ({mv.status_message})")
            if time.monotonic() - t0 > timeout:
                raise RegistryError(f"{name} v{version}: not READY after {timeout:.0f}s ({mv.status})")
            time.sleep(0.5)

    # ---------------------------------------------------------------- promote / rollback
    def promote(self, name: Optional[str] = None, version: Optional[str | int] = None, *, force: bool = False,
                method: Optional[str] = None) -> dict:
        """Move `champion` to the candidate (or `version`) if it beats the champion; else PromotionRefused."""
        name = self.model_name(method, name=name)
        if self._registered(name) is None:
            raise RegistryError(f"no registered model '{name}' (run `persona registry register` first)")
        cand = self.version(name, version if version is not None else CANDIDATE)
        champ = self.by_alias(name, CHAMPION)
        base = {"name": name, "candidate_version": str(cand.version),
                "champion_version": None if champ is None else str(champ.version)}
        if champ is not None and str(champ.version) == str(cand.version):
            return {**base, "ok": True, "promoted": False, "reasons": ["candidate is already the champion"], "rows": []}
        ct = dict(cand.tags or {})
        ht = dict(champ.tags or {}) if champ is not None else None
        d = gate(self.version_metrics(cand), None if ht is None else self.version_metrics(champ), self.cfg.gate_metrics,
                 min_improvement=self.cfg.min_improvement, candidate_eval_set=_eval_set(ct),
                 champion_eval_set=None if ht is None else _eval_set(ht),
                 require_same_eval_set=self.cfg.require_same_eval_set)
        d = {**base, **d}
        if not d["ok"] and not force:
            raise PromotionRefused(d)
        if not d["ok"]:
            log.warning("forcing promotion despite the gate:\n%s", format_decision(d))
        self.client.set_registered_model_alias(name, CHAMPION, cand.version)
        if champ is not None:
            self._set_history(name, self._history(name) + [str(champ.version)])
        self.client.set_model_version_tag(name, cand.version, "promoted_at", _now())
        self.client.set_model_version_tag(name, cand.version, "promoted_over", str(base["champion_version"]))
        if force and not d["ok"]:
            self.client.set_model_version_tag(name, cand.version, "promoted_forced", "; ".join(d["reasons"]))
        return {**d, "promoted": True, "forced": bool(force and not d["ok"])}

    def rollback(self, name: Optional[str] = None, *, method: Optional[str] = None) -> dict:
        """Move `champion` back to the previous champion (popped from the history tag)."""
        from mlflow.exceptions import MlflowException

        name = self.model_name(method, name=name)
        history = self._history(name)
        current = self.by_alias(name, CHAMPION)
        while history:
            prev = history.pop()
            try:
                mv = self.client.get_model_version(name, prev)
            except MlflowException as e:
                if _not_found(e):
                    log.warning("%s: previous champion v%s no longer exists; skipping it", name, prev)
                    continue
                raise
            self.client.set_registered_model_alias(name, CHAMPION, mv.version)
            self._set_history(name, history)
            if current is not None:
                self.client.set_model_version_tag(name, current.version, "rolled_back_at", _now())
            self.client.set_model_version_tag(name, mv.version, "restored_at", _now())
            return {"name": name, "champion_version": str(mv.version),
                    "previous_champion": None if current is None else str(current.version), "history": history}
        raise RegistryError(f"{name}: no previous champion to roll back to")

    # ---------------------------------------------------------------- list / show
    def list(self, name: Optional[str] = None) -> list[dict]:
        """Versions of `name` (newest first); with name=None, every registered model."""
        if name is None:
            return [{"name": rm.name, "aliases": dict(getattr(rm, "aliases", None) or {}),
                     "latest": None, "tags": dict(rm.tags or {})} for rm in self.client.search_registered_models()]
        aliases = self._aliases_of(name)
        mvs = sorted(self.client.search_model_versions(f"name='{name}'"), key=lambda m: -int(m.version))
        return [version_summary(m, aliases.get(str(m.version), []), self.version_metrics(m)) for m in mvs]

    def show(self, name: Optional[str] = None, ref: str | int = CHAMPION, *, method: Optional[str] = None) -> dict:
        name = self.model_name(method, name=name)
        mv = self.version(name, ref)
        out = version_summary(mv, self._aliases_of(name).get(str(mv.version), []), self.version_metrics(mv))
        out["champion_history"] = self._history(name)
        return out


def _eval_set(tags: Mapping[str, str]) -> Optional[str]:
    v = tags.get("eval_set")
    return None if not v or v == "none" else v
