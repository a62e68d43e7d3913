"""`persona compare`: every registered method's champion (else candidate) scored on one evaluation
set: a leaderboard, a lambda trade-off plot, a side-by-side grid, one MLflow run
(training/compare.py has the details).

    persona compare [--params params.yaml] [--methods a,b] [--scales 0,0.5,1] [--steps N] [--no-mlflow] [--json]
"""
from __future__ import annotations

import json


def _numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"persona compare: {flag} {text!r}: expected comma-separated numbers") from None


def _cmd(args) -> int:
    from pipeline.config import ConfigError, load_params
    from training import compare as cp

    try:
        params = load_params(args.params)
        cfg = cp.compare_config(params, {
            "methods": [m for m in args.methods.split(",") if m] if args.methods else None,
            "scales": _numbers(args.scales, "--scales") if args.scales else None, "steps": args.steps})
    except ConfigError as e:
        raise SystemExit(f"persona compare: {e}") from None
    res = cp.compare(params, cfg, log_mlflow=False if args.no_mlflow else None)
    if args.json:
        print(json.dumps(cp.numbers(res), indent=2, sort_keys=True))
    print(cp.summary(res))
    print(f"[compare] wrote {cfg.metrics_out}, {cfg.table_out}, {cfg.tradeoff_out}, {cfg.grid_out}, {cfg.report_out}"
          + (f"; MLflow run {res['mlflow']['run_id']} ({res['mlflow']['experiment']})" if res.get("mlflow") else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="score every method's champion (else candidate) on one evaluation set: leaderboard, trade-off plot, grid",
        description="For every registered method (or params compare.methods): the registry's persona-<method> "
        "@champion, else @candidate, else the adapter params evaluate.adapters names (the reason recorded); all "
        "scored on the same faces, prompts and seeds with persona evaluate's code, plus a lambda sweep "
        "(compare.scales). Writes compare.metrics_out, table_out, tradeoff_out, grid_out, report_out and one "
        "MLflow run. Params: `compare:` over `evaluate:`.",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--methods", help="comma-separated methods (default params compare.methods, else every registered one)")
    p.add_argument("--scales", help="comma-separated lambdas of the sweep (default params compare.scales)")
    p.add_argument("--steps", type=int, help="sampler steps (default params compare.steps, else evaluate.steps)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the comparison run")
    p.add_argument("--json", action="store_true", help="print the DVC metrics (numbers) as JSON")
    p.set_defaults(func=_cmd)
