"""`persona generate | evaluate | registry | mlflow-server`: inference, evaluation and promotion.

    persona generate [--method M] [--ref PHOTO ... [--weights W ... | --mix W,W,...]] [--region MASK ...]
                     [--input NAME=PATH ...] [--option KEY=VALUE ...] [the method's own flags] --prompt TEXT [--prompt ...]
                     [--adapter DIR | models:/NAME@ALIAS] [--content PHOTO [--strength S] [--assign I,J,...]]
                     [--scheduler ddim|euler_a|dpm++] [--lambda L] [--delay K] [--seed S] [--num-images N]
                     [--steps T] [--guidance G] [--negative-prompt TEXT] [--out DIR]
    persona generate --from-json OUT/img-p00-seed0.json [--out DIR]     re-run a recorded image
    persona evaluate [--adapter ... | --method M] [--shards DIR] [--no-mlflow]     params `evaluate:`
    persona registry register --adapter DIR [--metrics eval/M/report.json]         -> persona-<method>
    persona registry promote [--method M | --name N] [--version V] [--force] | rollback | list | show [REF]
    persona mlflow-server [--port 5000] [--backend sqlite:///mlflow-server.db] [--artifacts DIR]

Defaults come from params.yaml (`generate`, `evaluate`, `registry`); MLflow locations from
--tracking-uri / $MLFLOW_TRACKING_URI / params (see training/registry.py).
"""
from __future__ import annotations

import argparse
import json
import sys

# Methods declare generation input flags as entry points: `FLAG = "module:ATTR"`, ATTR a string naming
# the method input (`Method.prepare` files) the flag fills, e.g. `style-ref` -> "style". Only the
# flag names are read to build the parser; the module is imported when the flag is used.


def _params(path: str):
    from pipeline.config import load_params

    return load_params(path)


def _dump(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------- generate
def _pairs(items, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"persona generate: {flag} {item!r}: expected NAME=VALUE")
        out[k.strip()] = v
    return out


def _numbers(text: str, flag: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"persona generate: {flag} {text!r}: expected comma-separated numbers") from None


def _identities(args) -> list:
    """--ref photos [+ --weights / --mix] = one identity; with --region masks: identity i = (ref i,
    region i); with --content and several refs (no weights): identity i = ref i, its region the
    content photo's person i (`generate.content_identities`)."""
    from training.methods.base import Identity

    refs, regions = list(args.ref or []), list(args.region or [])
    if args.mix and args.weights:
        raise SystemExit("persona generate: give --weights or --mix, not both")
    weights = _numbers(args.mix, "--mix") if args.mix else (list(args.weights) if args.weights else None)
    if weights and len(weights) != len(refs):
        raise SystemExit(f"persona generate: {len(weights)} mixing weights for {len(refs)} --ref photos")
    if args.assign and not (args.content and len(refs) > 1 and not weights):
        raise SystemExit("persona generate: --assign goes with --content and several --ref (one identity each)")
    if regions:
        if len(regions) != len(refs) or weights:
            raise SystemExit("persona generate: with --region, give one --ref per region (identity i = ref i in region i)")
        return [Identity([r], None, m) for r, m in zip(refs, regions)]
    if args.content and len(refs) > 1 and not weights:
        return [Identity([r]) for r in refs]
    return [Identity(refs, weights)] if refs else []



class _GenerateParser(argparse.ArgumentParser):
    """`persona generate`'s parser: options it does not know are kept in `method_args`, for the
    adapter's method to parse once it is known (`Method.flags`); what that leaves is an error."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        ns.method_args = list(getattr(ns, "method_args", None) or []) + list(rest)
        return ns, []


def _method_flags(method, extra: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """A method's own `persona generate` flags (`Method.flags`) -> (--input pairs, --option pairs)."""
    known = ", ".join(f.flag for f in method.flags) or "none"
    p = argparse.ArgumentParser(prog=f"persona generate ({method.name})", add_help=False, allow_abbrev=False)
    for f in method.flags:
        p.add_argument(f.flag, dest=f"{f.kind}:{f.target}", metavar=f.metavar, help=f.help)
    ns, rest = p.parse_known_args(extra)
    if rest:
        raise SystemExit(f"persona generate: unrecognized arguments: {' '.join(rest)} (the flags of method "
                         f"'{method.name}': {known})")
    files, options = {}, {}
    for dest, v in vars(ns).items():
        if v is not None:
            kind, target = dest.split(":", 1)
            (files if kind == "input" else options)[target] = v
    return files, options


_SAMPLING_FLAGS = (("scheduler", "scheduler"), ("steps", "steps"), ("guidance", "guidance"))
_OTHER_FLAGS = (("scale", "lam"), ("delay_steps", "delay"), ("seed", "seed"), ("num_images", "num_images"),
                ("height", "height"), ("width", "width"), ("device", "device"), ("dtype", "dtype"),
                ("negative_prompt", "negative_prompt"), ("tracking_uri", "tracking_uri"), ("registry_uri", "registry_uri"))


def _apply_flags(cfg, args, pairs) -> None:
    for key, attr in pairs:
        v = getattr(args, attr)
        if v is not None:
            setattr(cfg, key, v)


def _method_adapter(args, cfg, params) -> None:
    """--method M: the adapter params evaluate.adapters[M] names (unless --adapter is given); a local
    adapter folder must hold an adapter of method M."""
    from pathlib import Path

    from training import evaluate as ev
    from training import methods
    from training import generate as g

    try:
        methods.get(args.method)
        if args.adapter is None:
            cfg.adapter = ev.adapter_for(ev.evaluate_config(params), args.method)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"persona generate: {e.args[0]}") from None
    if cfg.adapter and not str(cfg.adapter).startswith("models:/") and Path(cfg.adapter).exists():
        _, meta = g.read_adapter_folder(cfg.adapter)
        if meta.get("method") != args.method:
            raise SystemExit(f"persona generate: {cfg.adapter} holds a '{meta.get('method')}' adapter, not --method {args.method}")


def _cmd_generate(args) -> int:
    from training import generate as g
    from training import methods

    if args.from_json:
        if getattr(args, "method_args", None):
            raise SystemExit(f"persona generate: unrecognized arguments: {' '.join(args.method_args)}")
        rec, _, identical = g.regenerate(args.from_json, out=args.out, device=args.device,
                                         tracking_uri=args.tracking_uri, registry_uri=args.registry_uri)
        print(f"[generate] re-ran {args.from_json}: {rec['image']['file']} "
              f"{'IDENTICAL to' if identical else 'DIFFERS from'} the recorded pixels")
        return 0 if identical or not args.check else 1
    params = _params(args.params)
    cfg = g.generate_config(params)
    if args.adapter:
        cfg.adapter = args.adapter
    _apply_flags(cfg, args, _OTHER_FLAGS)
    if args.method:  # the adapter DVC trains and evaluates for the method (checked against --adapter)
        _method_adapter(args, cfg, params)
    if args.base_model:
        cfg.base_model = g.BaseModelOverride(path=args.base_model)
    if args.preset:
        cfg.base_model = g.BaseModelOverride(preset=args.preset)
    if not args.prompt:
        raise SystemExit("persona generate: give --prompt (or --from-json)")
    if not cfg.adapter:
        raise SystemExit("persona generate: no adapter (give --adapter DIR | models:/NAME@ALIAS, --method M, "
                         "or params generate.adapter)")
    res = g.resolve_adapter(cfg.adapter, tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)
    method = methods.get(str(res.meta.get("method")))
    if args.method and args.method != method.name:
        raise SystemExit(f"persona generate: --method {args.method}, but {cfg.adapter} is a '{method.name}' adapter")
    cfg = g.with_method_defaults(cfg, method.name)  # the method's sampling defaults, then the flags
    _apply_flags(cfg, args, _SAMPLING_FLAGS)
    if args.strength is not None:
        cfg.strength = args.strength
    g.check_sampling(cfg.steps, cfg.delay_steps, cfg.num_images)
    files, options = _pairs(args.input, "--input"), _pairs(args.option, "--option")
    own_files, own_options = _method_flags(method, getattr(args, "method_args", None) or [])
    both = sorted((set(own_files) & set(files)) | (set(own_options) & set(options)))
    if both:
        raise SystemExit(f"persona generate: {both} given both by a method flag and by --input/--option")
    req = g.Request(prompts=args.prompt, identities=_identities(args), inputs={**files, **own_files},
                    options={**options, **own_options}, name=args.name, content=args.content,
                    assign=_numbers(args.assign, "--assign", int) if args.assign else None)
    gen = g.Generator.load(res, base=g.to_dict(cfg.base_model), device=cfg.device, dtype=cfg.dtype)
    recs = g.generate(req, cfg, params=params, generator=gen, out=args.out)
    out = args.out or cfg.out
    for r in recs:
        print(f"[generate] {out}/{r['image']['file']}  seed={r['seed']} lambda={r['lambda']} prompt={r['prompt']!r}")
    return 0


# ---------------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args) -> int:
    from training import evaluate as ev

    params = _params(args.params)
    cfg = ev.evaluate_config(params, {"adapter": args.adapter, "shards": args.shards, "split": args.split,
                                      "max_identities": args.max_identities, "steps": args.steps,
                                      "metrics_out": args.metrics_out, "report_out": args.report_out,
                                      "device": args.device})
    if not cfg.adapter:
        cfg.adapter = ev.adapter_for(cfg, args.method)
    res = ev.evaluate(cfg, params, log_mlflow=False if args.no_mlflow else None)
    print(ev.summary(res))
    print(f"[evaluate] {res['method']}: wrote {res['metrics_file']}, {res['report_file']}, {res['grid']}"
          + (f"; MLflow run {res['mlflow']['run_id']}" if res.get("mlflow") else ""))
    return 0


# ---------------------------------------------------------------------------------- registry
def _registry(args):
    from training.registry import Registry, registry_config

    cfg = registry_config(_params(args.params))
    return Registry(cfg, tracking_uri=args.tracking_uri, registry_uri=args.registry_uri)


def _cmd_register(args) -> int:
    from pathlib import Path

    reg = _registry(args)
    meta = Path(args.adapter) / "adapter.json"
    method = str(json.loads(meta.read_text()).get("method")) if meta.is_file() else "unknown"
    metrics = None if args.no_metrics else (args.metrics or reg.cfg.metrics).replace("{method}", method)
    from training.pyfunc import kit_params

    out = reg.register(args.adapter, evaluation=metrics, name=args.name, alias=args.alias,
                       allow_mismatch=args.allow_mismatch, new_version=args.new_version,
                       kit=kit_params(_params(args.params)))
    dst = Path((args.out or reg.cfg.out).replace("{method}", method))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    print(f"[registry] {out['name']} version {out['version']} -> @{out['alias']} ({out['uri']}, run {out['run_id']})"
          + (" [existing version]" if out["reused_version"] else ""))
    return 0


def _cmd_promote(args) -> int:
    from training.registry import PromotionRefused, format_decision

    reg = _registry(args)
    try:
        d = reg.promote(args.name, args.version, force=args.force, method=args.method)
    except PromotionRefused as e:
        print(format_decision(e.decision), file=sys.stderr)
        return 1
    print(format_decision(d))
    if d.get("promoted"):
        print(f"[registry] {d['name']}@champion -> version {d['candidate_version']}" + (" (FORCED)" if d.get("forced") else ""))
    else:
        print(f"[registry] nothing to do: {'; '.join(d['reasons'])}")
    return 0


def _cmd_rollback(args) -> int:
    from training.registry import RegistryError

    reg = _registry(args)
    try:
        d = reg.rollback(args.name, method=args.method)
    except RegistryError as e:
        print(f"[registry] {e}", file=sys.stderr)
        return 1
    print(f"[registry] {d['name']}@champion: version {d['previous_champion']} -> {d['champion_version']}")
    return 0


def _cmd_list(args) -> int:
    reg = _registry(args)
    name = None if args.all else reg.model_name(args.method, name=args.name)
    rows = reg.list(name)
    if args.json:
        _dump(rows)
        return 0
    if args.all:
        for r in rows:
            print(f"{r['name']:30s} aliases={r['aliases']}")
        return 0
    print(f"{name}  (gate: {', '.join(reg.cfg.gate_metrics)})")
    for r in rows:
        ms = " ".join(f"{k}={'n/a' if v is None else f'{v:.4f}'}" for k, v in sorted(r["metrics"].items()))
        print(f"  v{r['version']:>3s} {','.join(r['aliases']) or '-':20s} {r['created']} weights_real={r['weights_real']} "
              f"eval_set={(r['eval_set'] or '-')[:12]} {ms}")
    return 0


def _cmd_show(args) -> int:
    reg = _registry(args)
    _dump(reg.show(args.name, args.ref, method=args.method))
    return 0


# ---------------------------------------------------------------------------------- mlflow-server
def _cmd_server(args) -> int:
    from training.mlflow_server import serve

    return serve(args.port, args.backend, args.artifacts, host=args.host, workers=args.workers, timeout=args.timeout)


# ---------------------------------------------------------------------------------- parsers
def _mlflow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else params)")
    p.add_argument("--registry-uri", help="MLflow registry URI (default: $MLFLOW_REGISTRY_URI, else the tracking URI)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def register(sub) -> None:
    """Add `generate`, `evaluate`, `registry` and `mlflow-server` to the `persona` parser."""
    fmt = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser("generate", help="images from reference photo(s) and / or method inputs with an adapter",
                       description="Reference photo(s) (or a method's own inputs) + prompt(s) -> PNG + JSON record "
                       "+ the conditioner inputs per image, with any method's adapter through a diffusers pipeline. "
                       "`--from-json REC.json` re-runs a record (identical pixels on CPU).", formatter_class=fmt,
                       epilog="A method may add flags of its own (its `flags`, shorthands for --input / --option; see "
                       "the method's section in the README); a flag neither knows is an error listing them. Sampling "
                       "defaults: params generate, then generate.methods.<method>, then these flags.")
    s.__class__ = _GenerateParser  # keeps the options it does not know for the adapter's method
    s.add_argument("--adapter", help="adapter folder (adapter.json) or models:/NAME@ALIAS | models:/NAME/VERSION")
    s.add_argument("--method", help="the adapter of this method that params evaluate.adapters names (without --adapter); "
                   "with --adapter: checked against it")
    s.add_argument("--ref", action="append", help="reference photo (repeat to mix several)")
    s.add_argument("--weights", "--ref-weights", dest="weights", type=float, nargs="+",
                   help="mixing weight per --ref, a convex combination (default: equal)")
    s.add_argument("--mix", metavar="W,W,...", help="mix the --ref identities by these weights (comma-separated; "
                   "same as --weights)")
    s.add_argument("--content", metavar="PHOTO",
                   help="image-to-image from this photo (at --strength); with several --ref, identity i is person i "
                   "of the photo (its instance mask is identity i's region; left to right, or --assign)")
    s.add_argument("--strength", type=float, help="with --content: how much of it is re-generated, 0..1 "
                   "(default params generate.strength)")
    s.add_argument("--assign", metavar="I,J,...", help="with --content and several --ref: ref k goes to person "
                   "assign[k] of the content photo (0 = leftmost)")
    s.add_argument("--region", action="append",
                   help="image region of identity i (mask PNG, white = the person); with regions, --ref i is identity i")
    s.add_argument("--input", action="append", metavar="NAME=PATH",
                   help="a method-specific input file (e.g. a code .npy, an expression photo; see the method's doc)")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method-specific option")
    s.add_argument("--scheduler", choices=["ddim", "euler_a", "dpm++"], help="diffusers sampler (default params)")
    s.add_argument("--prompt", action="append", help="prompt (repeat for several)")
    s.add_argument("--negative-prompt", dest="negative_prompt", help="what to steer away from (default params generate.negative_prompt)")
    s.add_argument("--lambda", dest="lam", type=float,
                   help="identity scale lambda (default params generate.scale; null: the adapter's method default)")
    s.add_argument("--delay", type=int, help="sampler steps with lambda 0 at the start (delayed identity)")
    s.add_argument("--seed", type=int, help="seed of the first image (default params generate.seed)")
    s.add_argument("--num-images", dest="num_images", type=int, help="images per prompt (seeds seed, seed+1, ...)")
    s.add_argument("--steps", type=int, help="sampler steps")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    s.add_argument("--height", type=int, help="image height in px (default: the adapter's training resolution)")
    s.add_argument("--width", type=int, help="image width in px (default: the adapter's training resolution)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto: cuda when present)")
    s.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="weights dtype (default auto: fp16 on CUDA, fp32 on CPU)")
    s.add_argument("--base-model", dest="base_model", help="override the base SD model (local diffusers folder)")
    s.add_argument("--preset", choices=["tiny", "sd15"], help="override the base SD model with a random preset")
    s.add_argument("--name", default="img", help="file name prefix (default: img)")
    s.add_argument("--out", help="output folder (default: params generate.out; --from-json: <record dir>/rerun)")
    s.add_argument("--from-json", dest="from_json", help="re-run a generation record")
    s.add_argument("--check", action="store_true", help="with --from-json: exit 1 unless the pixels are identical")
    _mlflow_args(s)
    s.epilog = ("A method's own options (its `options`) are also flags: --NAME VALUE is --option NAME=VALUE "
                "(e.g. --text-guidance 0.5).")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("evaluate", help="score an adapter on the held-out identities (params evaluate:)",
                       description="Generate for the val identities x prompts, score identity similarity, "
                       "detection rate, CLIP-T / LPIPS / FID where configured, and the real-photo control; write "
                       "the DVC metrics (numbers only), the full report (eval/<method>/report.json) and a grid; "
                       "log to MLflow (the metrics on the adapter's MLflow model).", formatter_class=fmt)
    s.add_argument("--adapter", help="adapter folder or models:/ uri (default: params evaluate.adapter(s))")
    s.add_argument("--method", help="evaluate params evaluate.adapters[METHOD]")
    s.add_argument("--shards", help="shards folder (default params evaluate.shards)")
    s.add_argument("--split", help="split of the shards to evaluate on (default params evaluate.split, val)")
    s.add_argument("--max-identities", dest="max_identities", type=int, help="at most this many identities")
    s.add_argument("--steps", type=int, help="sampler steps (default params evaluate.steps)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto: cuda when present)")
    s.add_argument("--metrics-out", dest="metrics_out",
                   help="scalar metrics file, DVC metrics (default params evaluate.metrics_out)")
    s.add_argument("--report-out", dest="report_out",
                   help="full report: samples, paths, reasons, warnings (default params evaluate.report_out)")
    s.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    s.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("registry", help="MLflow model registry: register, promote, rollback, list, show")
    rs = r.add_subparsers(dest="registry_command", required=True, metavar="ACTION", help="what to do in the registry")
    s = rs.add_parser("register", help="register an adapter folder (+ eval results) as @candidate")
    s.add_argument("--adapter", required=True, help="adapter folder (adapter.safetensors + adapter.json)")
    s.add_argument("--metrics", "--evaluation", dest="metrics",
                   help="the evaluation report of `persona evaluate` (default: params registry.metrics, {method} filled in)")
    s.add_argument("--no-metrics", action="store_true", help="register without evaluation results")
    s.add_argument("--allow-mismatch", action="store_true", help="accept results made for another adapter file")
    s.add_argument("--new-version", action="store_true", help="always create a new version")
    s.add_argument("--name", help="registered model (default: params registry.model_name, persona-<method>)")
    s.add_argument("--alias", default="candidate", help="alias pointed at the new version (default: candidate)")
    s.add_argument("--out", help="write the registration summary here (default: params registry.out)")
    _mlflow_args(s)
    s.set_defaults(func=_cmd_register)
    s = rs.add_parser("promote", help="move @champion to @candidate if it beats the champion on the gate metrics")
    s.add_argument("--name", help="registered model (default: params registry.model_name, persona-<method>)")
    s.add_argument("--method", help="the registered model of this method (persona-<method>)")
    s.add_argument("--version", help="promote this version instead of @candidate")
    s.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded on the version)")
    _mlflow_args(s)
    s.set_defaults(func=_cmd_promote)
    s = rs.add_parser("rollback", help="move @champion back to the previous champion")
    s.add_argument("--name", help="registered model (default: params registry.model_name, persona-<method>)")
    s.add_argument("--method", help="the registered model of this method (persona-<method>)")
    _mlflow_args(s)
    s.set_defaults(func=_cmd_rollback)
    s = rs.add_parser("list", help="versions with aliases and metrics")
    s.add_argument("--name", help="registered model (default: params registry.model_name, persona-<method>)")
    s.add_argument("--method", help="the registered model of this method (persona-<method>)")
    s.add_argument("--all", action="store_true", help="list registered models instead")
    s.add_argument("--json", action="store_true", help="print the versions as JSON")
    _mlflow_args(s)
    s.set_defaults(func=_cmd_list)
    s = rs.add_parser("show", help="one version (number or alias, default champion) as JSON")
    s.add_argument("ref", nargs="?", default="champion", help="version number or alias (default: champion)")
    s.add_argument("--name", help="registered model (default: params registry.model_name, persona-<method>)")
    s.add_argument("--method", help="the registered model of this method (persona-<method>)")
    _mlflow_args(s)
    s.set_defaults(func=_cmd_show)

    s = sub.add_parser("mlflow-server", help="run a local MLflow tracking server (SQLite + served artifacts)")
    s.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; see README for team servers)")
    s.add_argument("--backend", default="sqlite:///mlflow-server.db", help="backend store URI")
    s.add_argument("--artifacts", default="mlartifacts-server", help="artifact folder (or s3://..., gs://...)")
    s.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /health")
    s.set_defaults(func=_cmd_server)
