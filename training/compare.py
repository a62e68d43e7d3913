"""`persona compare`: every registered method scored on ONE evaluation set (a leaderboard, a lambda
trade-off plot, a side-by-side grid, one MLflow comparison run).

Which adapter per method (no method is named here: the methods are the registered ones, or
`compare.methods`): the registry's `persona-<method>` version with alias `champion`, else `candidate`
(`compare.aliases`, in order); when the registry has neither (or cannot be reached), the adapter
`evaluate.adapters[method]` names, with the reason recorded; a method with neither is listed as
missing with its reason.

The evaluation set: the faces of `evaluate.split` that hold the shard members EVERY compared method
needs (identities by name, at most `max_identities`, the first `faces_per_identity` faces by key),
the same prompts, seeds, sampler, steps, guidance and image size for every method. Scoring is
`training.evaluate.evaluate` itself (the same generation code path and scorers as `persona evaluate`,
with `face_keys` pinning the faces). Each method's evaluation-set id (`compare_set_id`) is computed
from ITS OWN evaluation report (faces, prompts, seeds, protocol, scorer fingerprints; not the
conditioner inputs, which differ by method by design), so equal ids across methods say they were
scored on the same set; a method whose id differs is flagged in the leaderboard.

Per method: the generic metrics at the method's own inference lambda (the adapter's default, e.g.
PIDiff 0.4; the leaderboard row), the method's own metrics through its hooks
(`Method.extra_metrics`, `Method.evaluation_metrics`), and a lambda sweep (`compare.scales`: identity
similarity and CLIP-T at each lambda, the papers' trade-off curve; the method metrics are skipped
there). A metric that cannot be computed is `{"value": null, "missing": reason}`.

Outputs: `metrics_out` (DVC metrics, numbers only: {method: {metric: value, "lambda": L, "sweep":
{"sN": {"lambda", metric...}}}, "weights_real": 0|1}), `report_out` (the full report: sources,
reasons, eval set, every metric entry), `table_out` (the Markdown leaderboard), `tradeoff_out`
(identity similarity vs CLIP-T per method per lambda; vs lambda when CLIP-T is missing, said in the
title), `grid_out` (the first face and prompt, every method side by side), each method's evaluation
files under `work_dir/<method>/`, and one MLflow run (experiment `compare.mlflow.experiment`) with
the metrics `<method>.<metric>`, the sweep as `sweep.<method>.<metric>` by step, missing reasons as
tags, `weights_real` and the files. Random weights anywhere: `weights_real: false` everywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.config import ConfigError, Params
from training.sections import section_config

log = logging.getLogger("persona.compare")

FORMAT = "persona-compare/1"
GENERIC = ("identity_similarity", "identity_similarity_detected", "face_detection_rate", "clip_t")
SWEEP = ("identity_similarity", "identity_similarity_detected", "face_detection_rate", "clip_t")
# what the evaluation itself reports beside the generic metrics (not the method's own)
NOT_METHOD = set(GENERIC) | {"lpips", "fid", "control_same_identity", "control_different_identity"}


@dataclass
class CompareMlflowConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # null -> $MLFLOW_TRACKING_URI, else registry.tracking_uri
    experiment: str = "persona-compare"
    artifact_location: str = "mlartifacts"  # artifact root of a NEW experiment on a local store


@dataclass
class CompareConfig:
    methods: Optional[list[str]] = None  # null: every registered method
    aliases: list[str] = field(default_factory=lambda: ["champion", "candidate"])  # tried in this order
    # the evaluation set and sampler: null -> the `evaluate:` section's value
    split: Optional[str] = None
    max_identities: Optional[int] = None
    faces_per_identity: Optional[int] = None
    prompts: Optional[list[str]] = None
    num_images: Optional[int] = None
    steps: Optional[int] = None
    resolution: Optional[int] = None  # null: evaluate.resolution, else the first method's adapter resolution
    scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # the lambda sweep (trade-off points)
    grid_face: int = 0  # which evaluation face / prompt the side-by-side grid shows
    grid_prompt: int = 0
    metrics_out: str = "metrics/compare.json"
    report_out: str = "eval/compare/report.json"
    table_out: str = "eval/compare.md"
    tradeoff_out: str = "plots/compare_tradeoff.png"
    grid_out: str = "plots/compare_grid.png"
    work_dir: str = "eval/compare"  # each method's evaluation files (<method>/default, <method>/sN)
    mlflow: CompareMlflowConfig = field(default_factory=CompareMlflowConfig)


def compare_config(params: Params | Mapping[str, Any] | None = None,
                   overrides: Optional[Mapping[str, Any]] = None) -> CompareConfig:
    """Validate the `compare:` section (Params, raw dict or None) with top-level key overrides."""
    cfg = section_config(CompareConfig, params, "compare", overrides)
    if not cfg.aliases:
        raise ConfigError("compare.aliases: give at least one registry alias (e.g. [champion, candidate])")
    if not cfg.scales or any(not isinstance(s, (int, float)) or s < 0 for s in cfg.scales):
        raise ConfigError(f"compare.scales: give one or more lambdas >= 0 (got {cfg.scales})")
    for k in ("max_identities", "faces_per_identity", "num_images", "steps", "resolution"):
        v = getattr(cfg, k)
        if v is not None and v < 1:
            raise ConfigError(f"compare.{k} must be >= 1 (or null: the evaluate section's)")
    if cfg.prompts is not None and not cfg.prompts:
        raise ConfigError("compare.prompts: give at least one prompt (or null: evaluate.prompts)")
    if cfg.grid_face < 0 or cfg.grid_prompt < 0:
        raise ConfigError("compare.grid_face / grid_prompt must be >= 0")
    return cfg


# ============================================================================================
# which adapter per method


def resolve_source(method: str, adapters: Mapping[str, str], registry: Any, aliases: Sequence[str]) -> dict:
    """{"spec": models:/... or a folder, "kind": "registry" | "folder", "alias", "version", "reason"};
    spec None (with the reason) when neither the registry nor evaluate.adapters has one."""
    name = registry.model_name(method) if registry is not None else f"persona-{method}"
    if registry is None:
        reason = "the MLflow registry could not be opened"
    else:
        try:
            for alias in aliases:
                mv = registry.by_alias(name, alias)
                if mv is not None:
                    return {"kind": "registry", "spec": f"models:/{name}@{alias}", "model": name, "alias": alias,
                            "version": str(mv.version), "reason": None}
            reason = f"the registry has no version of {name} with alias {' or '.join(aliases)}"
        except Exception as e:  # an unreachable server is a reason, not a crash
            reason = f"the registry ({registry.tracking_uri}) could not be read: {str(e).splitlines()[0][:300]}"
    if method in adapters:
        return {"kind": "folder", "spec": adapters[method], "model": name, "alias": None, "version": None,
                "reason": f"{reason}: used evaluate.adapters.{method}"}
    return {"kind": None, "spec": None, "model": name, "alias": None, "version": None,
            "reason": f"{reason}, and evaluate.adapters has no entry for {method}"}


# ============================================================================================
# the common evaluation set


def compare_set_id(results: Mapping[str, Any], scales: Sequence[float]) -> str:
    """Hash of what makes two methods' scores comparable, read from one method's evaluation report:
    its faces (keys, identities), prompts, seeds, sampler protocol, image size, references, the
    scorers' fingerprints and the lambda sweep. Not the conditioner inputs (method-specific by design)
    nor the method's default lambda (its own setting, reported beside)."""
    es = results["eval_set"]
    proto = {k: es.get(k) for k in ("split", "identities", "faces", "prompts", "num_images", "seed", "scheduler", "steps",
                                     "guidance", "delay_steps", "negative_prompt", "size", "references")}
    proto["scorers"] = {k: (v or {}).get("fingerprint") for k, v in sorted((results.get("scorers") or {}).items())}
    proto["clip_t"] = (results["metrics"].get("clip_t") or {}).get("fingerprint")
    proto["scales"] = [float(s) for s in scales]
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:24]


def common_faces(shards: str, split: str, max_identities: int, per_identity: int, needs: Sequence[str]) -> list[str]:
    """Keys of the evaluation faces that hold every compared method's shard members."""
    from training.evaluate import labeled_faces

    return [f.key for f in labeled_faces(shards, (split,), max_identities, per_identity, need=tuple(dict.fromkeys(needs)))]


def metric_table(metrics: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict]:
    """{name: {"value", "n"[, "missing"]}} of `names` (absent ones are missing with a reason)."""
    out = {}
    for k in names:
        m = metrics.get(k)
        if m is None:
            out[k] = {"value": None, "n": 0, "missing": "not reported by the evaluation"}
        else:
            out[k] = {"value": m.get("value"), "n": m.get("n", 0), **({"missing": m["missing"]} if m.get("value") is None else {})}
    return out


# ============================================================================================
# the comparison


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _finite(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scale_tag(i: int) -> str:
    return f"s{i}"


def compare(params: Params, cfg: Optional[CompareConfig] = None, *, log_mlflow: Optional[bool] = None,
            scorer: Any = None) -> dict:
    """Score every method on the common evaluation set; write the files; log one MLflow run."""
    from training import methods
    from training.evaluate import FaceScorer, evaluate, evaluate_config, for_method
    from training.generate import Generator, resolve_adapter
    from training.registry import Registry, registry_config

    t0 = time.perf_counter()
    cfg = cfg or compare_config(params)
    ecfg = evaluate_config(params)
    over = {k: getattr(cfg, k) for k in ("split", "max_identities", "faces_per_identity", "prompts", "num_images", "steps")
            if getattr(cfg, k) is not None}
    ecfg = dataclasses.replace(ecfg, adapter=None, **over)
    names = list(cfg.methods) if cfg.methods is not None else methods.names()
    unknown = [m for m in names if m not in methods.names()]
    if unknown:
        raise ConfigError(f"compare.methods: {unknown} are not registered methods (registered: {methods.names()})")
    try:
        registry = Registry(registry_config(params))
    except Exception as e:  # noqa: BLE001 - recorded as every method's reason
        log.warning("compare: registry unavailable: %s", e)
        registry = None

    work = Path(cfg.work_dir)
    entries: dict[str, dict] = {}
    sources = {m: resolve_source(m, ecfg.adapters, registry, cfg.aliases) for m in names}
    for m in names:
        if sources[m]["spec"] is None:
            entries[m] = {"method": m, "source": sources[m], "missing": sources[m]["reason"]}
            log.warning("compare: %s: %s", m, sources[m]["reason"])
    present = [m for m in names if m not in entries]
    needs = [n for m in present for n in methods.get(m).needs]
    keys = common_faces(ecfg.shards, ecfg.split, ecfg.max_identities, max(ecfg.faces_per_identity, ecfg.references), needs)
    if present and not keys:
        raise RuntimeError(f"compare: no labeled faces in split '{ecfg.split}' of {ecfg.shards} hold every member the "
                           f"methods need ({sorted(set(needs))})")
    own_scorer = scorer is None
    scorer = scorer or FaceScorer.load(params)
    size = cfg.resolution or ecfg.resolution
    control = None
    tmp = tempfile.TemporaryDirectory(prefix="persona-compare-")
    try:
        for m in present:
            src = sources[m]
            try:
                res = resolve_adapter(src["spec"], tracking_uri=registry.tracking_uri if registry else None,
                                      registry_uri=registry.registry_uri if registry else None,
                                      dst=Path(tmp.name) / m if src["kind"] == "registry" else None)
                gen = Generator.load(res, device=ecfg.device, dtype=ecfg.dtype)
            except Exception as e:  # a broken adapter is this method's verdict, not the comparison's
                entries[m] = {"method": m, "source": src, "missing": f"adapter {src['spec']} could not be loaded: "
                                                                     f"{str(e).splitlines()[0][:300]}"}
                log.warning("compare: %s: %s", m, entries[m]["missing"])
                continue
            if gen.method.name != m:
                entries[m] = {"method": m, "source": src,
                              "missing": f"adapter {src['spec']} holds a '{gen.method.name}' adapter, not {m}"}
                continue
            size = size or gen.default_size
            default = gen.default_scale
            runs = {}
            points = [("default", default, True)] + [(_scale_tag(i), float(s), False) for i, s in enumerate(cfg.scales)]
            for tag, scale, full in points:
                d = work / m / tag
                c = dataclasses.replace(
                    for_method(ecfg, m), scale=scale, resolution=size,
                    control=dataclasses.replace(ecfg.control, enabled=ecfg.control.enabled and control is None and full),
                    metrics_out=str(d / "metrics.json"), report_out=str(d / "report.json"), grid_out=str(d / "grid.png"),
                    images_out=str(d / "images"))
                log.info("compare: %s lambda=%s (%s)", m, scale, tag)
                r = evaluate(c, params, generator=gen, scorer=scorer, log_mlflow=False, face_keys=keys, method_metrics=full)
                if full and control is None and c.control.enabled:
                    control = {k: r["metrics"][k] for k in ("control_same_identity", "control_different_identity")}
                runs[tag] = r
            full_res = runs["default"]
            own = [k for k in full_res["metrics"] if k not in NOT_METHOD]
            entries[m] = {
                "method": m, "source": src, "adapter": full_res["adapter"], "lambda": default,
                "eval_set": compare_set_id(full_res, cfg.scales), "method_eval_set": full_res["eval_set"]["id"],
                "faces": full_res["eval_set"]["faces"], "weights_real": full_res["weights_real"],
                "random_weights": full_res["random_weights"],
                "metrics": metric_table(full_res["metrics"], list(GENERIC) + own),
                "method_metrics": own,
                "sweep": [{"tag": _scale_tag(i), "lambda": float(s), "metrics": metric_table(runs[_scale_tag(i)]["metrics"], SWEEP),
                           "eval_set": compare_set_id(runs[_scale_tag(i)], cfg.scales)} for i, s in enumerate(cfg.scales)],
                "report": full_res["report_file"],
                "grid_image": _grid_image(full_res, cfg.grid_face, cfg.grid_prompt),
            }
            del gen
    finally:
        tmp.cleanup()
        if own_scorer:
            scorer.close()

    scored = [m for m in names if "eval_set" in entries[m]]
    ids = sorted({entries[m]["eval_set"] for m in scored} | {p["eval_set"] for m in scored for p in entries[m]["sweep"]})
    same = len(ids) <= 1
    if not same:
        log.warning("compare: the methods were NOT scored on one evaluation set (ids %s): see the report", ids)
    real = all(entries[m]["weights_real"] for m in scored) and bool(scored)
    random_names = sorted({f"{m}:{n}" for m in scored for n in entries[m]["random_weights"]})
    clip_missing = next((entries[m]["metrics"]["clip_t"]["missing"] for m in scored
                         if entries[m]["metrics"]["clip_t"]["value"] is None), None)
    results = {
        "format": FORMAT, "weights_real": real, "random_weights": random_names,
        "eval_set": {"id": ids[0] if same and ids else None, "ids": ids, "same": same, "shards": ecfg.shards,
                     "split": ecfg.split, "faces": keys, "prompts": list(ecfg.prompts), "num_images": ecfg.num_images,
                     "seed": ecfg.seed, "scheduler": ecfg.scheduler, "steps": ecfg.steps, "guidance": ecfg.guidance,
                     "size": size, "references": ecfg.references, "scales": [float(s) for s in cfg.scales]},
        "methods": entries, "order": leaderboard_order(entries), "control": control,
        "clip_t_missing": clip_missing,
    }
    if not real:
        parts = sorted({n.split(":", 1)[1] for n in random_names})
        who = sorted({n.split(":", 1)[0] for n in random_names})
        results["warning"] = (f"RANDOM WEIGHTS ({', '.join(parts) or 'no scored method'}) in {len(who)} of "
                              f"{len(scored)} scored methods ({', '.join(who)}; per method in the report): these "
                              "numbers measure nothing about identity preservation")
        log.warning("!!! %s !!!", results["warning"])
    write_outputs(results, cfg)
    results["seconds"] = round(time.perf_counter() - t0, 3)
    do_log = cfg.mlflow.enabled if log_mlflow is None else log_mlflow
    if do_log:
        results["mlflow"] = log_comparison(results, cfg, params)
    Path(cfg.report_out).write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    return results


def _grid_image(res: Mapping[str, Any], face: int, prompt: int) -> Optional[dict]:
    """The sample (file, reference face key, prompt) the grid shows: face `face`, prompt `prompt`, first seed."""
    faces = res["eval_set"]["faces"]
    if not faces:
        return None
    key = faces[min(face, len(faces) - 1)]
    pi = min(prompt, len(res["eval_set"]["prompts"]) - 1)
    for s in res["samples"]:
        if s["key"] == key and s["prompt_index"] == pi:
            return {"file": s["file"], "key": key, "identity": s["identity"], "prompt": s["prompt"], "seed": s["seed"],
                    "identity_similarity": s["identity_similarity"]}
    return None


def leaderboard_order(entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Scored methods by identity similarity (highest first; ties by name), then the missing ones."""
    def key(m):
        v = entries[m].get("metrics", {}).get("identity_similarity", {}).get("value")
        return (v is None, -(v or 0.0), m)

    return sorted(entries, key=key)


# ============================================================================================
# outputs


def numbers(results: Mapping[str, Any]) -> dict:
    """The DVC metrics: numbers only."""
    out: dict[str, Any] = {"weights_real": 1 if results["weights_real"] else 0}
    for m, e in results["methods"].items():
        if "metrics" not in e:
            continue
        row: dict[str, Any] = {"lambda": float(e["lambda"])}
        row.update({k: float(v["value"]) for k, v in e["metrics"].items() if _finite(v["value"])})
        row["sweep"] = {p["tag"]: {"lambda": p["lambda"], **{k: float(v["value"]) for k, v in p["metrics"].items()
                                                            if _finite(v["value"])}} for p in e["sweep"]}
        out[m] = row
    return out


def leaderboard(results: Mapping[str, Any]) -> str:
    """The Markdown leaderboard (missing values as '-' with a numbered reason below)."""
    es = results["eval_set"]
    lines = ["# Method comparison", ""]
    if not results["weights_real"]:
        lines += [f"**weights_real: false** - {results.get('warning')}", ""]
    set_line = (f"Evaluation set `{es['id']}` (the same for every method)" if es["same"] and es["id"]
                else f"**NOT one evaluation set**: ids {', '.join(es['ids'])}")
    lines += [f"{set_line}: {len(es['faces'])} faces of split `{es['split']}`, {len(es['prompts'])} prompts x "
              f"{es['num_images']} seeds from {es['seed']}, {es['scheduler']} {es['steps']} steps, guidance {es['guidance']}, "
              f"{es['size']} px; lambda sweep {es['scales']}.", ""]
    notes: list[str] = []

    def note(reason: str) -> int:
        if reason not in notes:
            notes.append(reason)
        return notes.index(reason) + 1

    def cell(entry: Mapping[str, Any]) -> str:
        if entry["value"] is not None:
            return f"{entry['value']:.4f}"
        return f"- [{note(entry.get('missing') or 'missing')}]"

    head = ["rank", "method", "adapter", "lambda", "identity sim.", "identity sim. (detected)", "face detection",
            "CLIP-T", "method metrics", "eval set"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = 0
    for m in results["order"]:
        e = results["methods"][m]
        if "metrics" not in e:
            cellm = cell({"value": None, "missing": e["missing"]})
            lines.append(f"| - | {m} | {cellm} | | | | | | | |")
            continue
        rank += 1
        s = e["source"]
        where = (f"{s['model']}@{s['alias']} (v{s['version']})" if s["kind"] == "registry"
                 else f"`{s['spec']}` [{note(s['reason'])}]")
        own = "; ".join(f"{k} {cell(e['metrics'][k])}" for k in e["method_metrics"]) or "-"
        g = e["metrics"]
        lines.append(f"| {rank} | {m} | {where} | {e['lambda']:g} | {cell(g['identity_similarity'])} | "
                     f"{cell(g['identity_similarity_detected'])} | {cell(g['face_detection_rate'])} | {cell(g['clip_t'])} | "
                     f"{own} | `{e['eval_set'][:12]}` |")
    lines += ["", "Lambda sweep (identity similarity / CLIP-T):", "",
              "| method | " + " | ".join(f"lambda {s:g}" for s in es["scales"]) + " |",
              "|---|" + "---|" * len(es["scales"])]
    for m in results["order"]:
        e = results["methods"][m]
        if "sweep" in e:
            lines.append(f"| {m} | " + " | ".join(
                f"{_fmt(p['metrics']['identity_similarity']['value'])} / {_fmt(p['metrics']['clip_t']['value'])}"
                for p in e["sweep"]) + " |")
    if notes:
        lines += ["", "Missing and notes:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    if results.get("control"):
        c = results["control"]
        lines += ["", f"Control (real photo vs real photo, ArcFace): same person {_fmt(c['control_same_identity'].get('value'))}, "
                      f"different people {_fmt(c['control_different_identity'].get('value'))}."]
    return "\n".join(lines) + "\n"


def tradeoff_plot(results: Mapping[str, Any], path: Path) -> None:
    """Identity similarity vs CLIP-T, one point per method per lambda (vs lambda when CLIP-T is missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [m for m in results["order"] if "sweep" in results["methods"][m]]
    has_clip = bool(scored) and all(p["metrics"]["clip_t"]["value"] is not None
                                    for m in scored for p in results["methods"][m]["sweep"])
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for m in scored:
        pts = [(p["lambda"], p["metrics"]["clip_t"]["value"], p["metrics"]["identity_similarity"]["value"])
               for p in results["methods"][m]["sweep"] if p["metrics"]["identity_similarity"]["value"] is not None]
        if not pts:
            continue
        xs = [c if has_clip else lam for lam, c, _ in pts]
        ys = [y for _, _, y in pts]
        ax.plot(xs, ys, marker="o", label=m)
        for (lam, _, _), x, y in zip(pts, xs, ys):
            ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_ylabel("identity similarity (ArcFace, 0 where no face)")
    if has_clip:
        ax.set_xlabel("CLIP-T (image-prompt similarity)")
        title = "identity vs prompt fidelity per lambda"
    else:
        ax.set_xlabel("lambda (identity scale)")
        title = "identity similarity vs lambda: CLIP-T missing (no evaluate.clip_model)"
    if not results["weights_real"]:
        title += "\nweights_real: false (random weights: the numbers measure nothing)"
    ax.set_title(title, fontsize=9)
    if scored:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def side_by_side(results: Mapping[str, Any], tile: int = 128) -> Optional[Any]:
    """The grid: the reference face, then each method's image for the same face, prompt and seed."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from pipeline.images import load_rgb
    from training.evaluate import comparison_grid, labeled_faces

    shown = [(m, results["methods"][m]["grid_image"]) for m in results["order"]
             if (results["methods"][m].get("grid_image") or {}).get("file")]
    if not shown:
        return None
    first = shown[0][1]
    ref = labeled_faces(results["eval_set"]["shards"], (results["eval_set"]["split"],), 10**6, 10**6, keys={first["key"]})
    ref_img = ref[0].face if ref else np.full((tile, tile, 3), 255, np.uint8)
    gens = []
    for m, g in shown:
        img, _ = load_rgb(g["file"])
        sim = g.get("identity_similarity")
        gens.append((img, "" if sim is None else f"id {sim:.2f}"))
    grid = comparison_grid([(first["identity"], ref_img, gens)], [m for m, _ in shown], tile)
    head = 16
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + head), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, head))
    ImageDraw.Draw(canvas).text((2, 2), f"prompt: {first['prompt']!r}, seed {first['seed']}"
                                + ("" if results["weights_real"] else "  [weights_real: false]"),
                                fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(canvas)


def _write(path: Path, data: bytes | str) -> None:
    """Atomic write (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_outputs(results: dict, cfg: CompareConfig) -> None:
    from pipeline.images import encode_png

    _write(Path(cfg.metrics_out), json.dumps(numbers(results), indent=2, sort_keys=True) + "\n")
    _write(Path(cfg.table_out), leaderboard(results))
    tradeoff_plot(results, Path(cfg.tradeoff_out))
    grid = side_by_side(results)
    gp = Path(cfg.grid_out)
    if grid is not None:
        _write(gp, encode_png(grid))
    else:
        gp.unlink(missing_ok=True)
    results["files"] = {"metrics": cfg.metrics_out, "report": cfg.report_out, "table": cfg.table_out,
                        "tradeoff": cfg.tradeoff_out, "grid": cfg.grid_out if grid is not None else None}
    _write(Path(cfg.report_out), json.dumps(results, indent=2, sort_keys=True, default=str))


# ============================================================================================
# MLflow: one comparison run


def log_comparison(results: Mapping[str, Any], cfg: CompareConfig, params: Params) -> dict:
    """One run in `compare.mlflow.experiment`: `<method>.<metric>` at each method's lambda, the sweep
    as `sweep.<method>.<metric>` (step = sweep index, with `sweep.<method>.lambda`), tags (eval set,
    weights_real, sources, missing reasons), the evaluation set as the run's dataset input, the files."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from training.evaluate import log_metrics_on
    from training.registry import registry_config

    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or registry_config(params).tracking_uri
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    remote = uri.split(":", 1)[0] in ("http", "https", "databricks")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.mlflow.experiment, artifact_location=None if remote else str(Path(cfg.mlflow.artifact_location).resolve()))
    es = results["eval_set"]
    run_id = client.create_run(exp_id, run_name="compare", tags={"persona.kind": "compare"}).info.run_id
    values: dict[str, float] = {}
    for m, e in results["methods"].items():
        for k, v in (e.get("metrics") or {}).items():
            if _finite(v["value"]):
                values[f"{m}.{k}"] = float(v["value"])
        if "lambda" in e:
            values[f"{m}.lambda"] = float(e["lambda"])
    if es["same"] and es["id"]:  # the metrics refer to the evaluation set, logged as the run's dataset input
        log_metrics_on(client, run_id, values, 0, results={"eval_set": {"id": es["id"], "shards": es["shards"]}}, prefix="")
    else:
        log_metrics_on(client, run_id, values, 0, prefix="")
    ts = int(time.time() * 1000)
    sweep = [Metric(f"sweep.{m}.{k}", float(v), ts, i)
             for m, e in results["methods"].items() for i, p in enumerate(e.get("sweep") or [])
             for k, v in [("lambda", p["lambda"])] + [(k, x["value"]) for k, x in p["metrics"].items()] if _finite(v)]
    tags = [RunTag("weights_real", str(results["weights_real"]).lower()), RunTag("eval.set", str(es["id"] or "MIXED")),
            RunTag("eval.same_set", str(es["same"]).lower())]
    for m, e in results["methods"].items():
        s = e["source"]
        tags.append(RunTag(f"source.{m}", str(s["spec"] or "none") + (f" (v{s['version']})" if s.get("version") else "")))
        if s.get("reason"):
            tags.append(RunTag(f"source_reason.{m}", s["reason"][:4000]))
        if "missing" in e:
            tags.append(RunTag(f"missing.{m}", e["missing"][:4000]))
        for k, v in (e.get("metrics") or {}).items():
            if v["value"] is None:
                tags.append(RunTag(f"missing.{m}.{k}", str(v.get("missing"))[:4000]))
    if not results["weights_real"]:
        tags.append(RunTag("warning", results.get("warning", "random weights")[:4000]))
    prms = [Param("methods", ",".join(results["methods"])[:6000]), Param("scales", json.dumps(es["scales"])),
            Param("faces", str(len(es["faces"]))), Param("prompts", str(len(es["prompts"]))),
            Param("num_images", str(es["num_images"])), Param("steps", str(es["steps"])), Param("size", str(es["size"]))]
    for i in range(0, len(sweep), 900):
        client.log_batch(run_id, metrics=sweep[i:i + 900])
    client.log_batch(run_id, tags=tags, params=prms)
    for f in (cfg.metrics_out, cfg.table_out, cfg.tradeoff_out, cfg.grid_out, cfg.report_out):
        if Path(f).is_file():
            client.log_artifact(run_id, str(f), "compare")
    client.set_terminated(run_id)
    return {"tracking_uri": uri, "run_id": run_id, "experiment": cfg.mlflow.experiment}


def summary(results: Mapping[str, Any]) -> str:
    """A short text leaderboard for the terminal."""
    es = results["eval_set"]
    lines = [f"evaluation set {es['id'] or 'NOT THE SAME: ' + ', '.join(es['ids'])}: {len(es['faces'])} faces x "
             f"{len(es['prompts'])} prompts x {es['num_images']} seeds; lambda sweep {es['scales']}"]
    for m in results["order"]:
        e = results["methods"][m]
        if "metrics" not in e:
            lines.append(f"  {m:18s} missing: {e['missing']}")
            continue
        g = e["metrics"]
        src = e["source"]
        where = f"{src['model']}@{src['alias']} v{src['version']}" if src["kind"] == "registry" else f"{src['spec']} (folder)"
        lines.append(f"  {m:18s} id={_fmt(g['identity_similarity']['value'])} det={_fmt(g['face_detection_rate']['value'])} "
                     f"clip_t={_fmt(g['clip_t']['value'])} lambda={e['lambda']:g} set={e['eval_set'][:12]}  [{where}]")
    if not results["weights_real"]:
        lines.append(f"  WARNING: {results.get('warning')}")
    return "\n".join(lines)
