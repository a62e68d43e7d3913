"""`persona train`: one W+ Adapter training stage (what the DVC stages train_stage1/2 call).

    persona train --stage 1|2 [--params params.yaml] [--max-steps N] [--fast-dev-run]
                  [--resume auto|never|CKPT] [--set train.resolution=64 ...]
"""
from __future__ import annotations

import json

import yaml


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (e.g. train_stage1.batch_size=4)")
        out[key.strip()] = yaml.safe_load(value)  # 4 -> int, 1e-4 -> float, null -> None, [a] -> list
    return out


def _cmd_train(args) -> int:
    from training.train import train

    res = train(args.params, args.stage, max_steps=args.max_steps, fast_dev_run=args.fast_dev_run,
                overrides=_parse_set(args.set), resume=args.resume)
    if args.json:
        keep = ("stage", "global_step", "adapter", "adapter_json", "run_id", "tracking_uri", "resumed_from",
                "metrics", "seconds")
        print(json.dumps({k: res.get(k) for k in keep}, indent=2, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a W+ Adapter stage (Lightning; tracked in MLflow)",
        description="Train W+ Adapter stage 1 (aligned faces) or 2 (in-the-wild, needs stage 1's adapter) on the "
        "shards, with the train / train_stageN sections of the params file. Resumes from the last checkpoint "
        "when the config and data are unchanged.",
    )
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="training stage")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="override train_stageN.max_steps")
    p.add_argument("--fast-dev-run", action="store_true", help="one step, no MLflow / checkpoints (smoke test)")
    p.add_argument("--resume", default="auto", help="auto (default) | never | path to a .ckpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. --set train.synthetic=16 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_train)
