"""`persona train`: one phase of a registered method (what the DVC stages train@<method>-<phase> call).

    persona train --method M --phase P [--params params.yaml] [--max-steps N] [--fast-dev-run]
                  [--resume auto|never|CKPT] [--set train.resolution=64 --set M.P.lr=1e-5 ...]
                  [--workers N [--use-gpu] [--cpus-per-worker C] [--address RAY_ADDRESS]]   Ray Train (DDP)
    persona train --stage N ...      a phase alias a method declares (e.g. --stage 1 for its first phase)
    persona train --list             the registered methods and their phases
    persona train submit --method M --phase P [the options above]
                  [--address http://HEAD:8265] [--no-wait] [--working-dir DIR|none] [--env K=V]  as a Ray Job

`--workers N` (or train.cluster.workers) trains on N Ray Train workers (training/cluster.py);
`submit` (older spelling: `--submit`) sends this same command (minus the submit options) to a
cluster's dashboard as a Ray Job, streams its logs and exits with the job's status
(`pipeline.jobs.submit_and_wait`), so a DVC stage can block on it; `--no-wait` prints the job id.
"""
from __future__ import annotations

import json

import yaml


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (e.g. train.resolution=64 or METHOD.PHASE.batch_size=4)")
        out[key.strip()] = yaml.safe_load(value)  # 4 -> int, 1e-4 -> float, null -> None, [a] -> list
    return out


def job_command(args) -> list[str]:
    """The submitted job's entrypoint: this `persona train` command without the submit options
    (the job runs on the cluster, where Ray sets RAY_ADDRESS, so `--workers` uses that cluster)."""
    from pipeline.jobs import job_entrypoint

    return job_entrypoint(
        "train", args,
        options=("method", "phase", "stage", "params", "resume", "max_steps", "workers", "cpus_per_worker",
                 "storage_path"),
        repeated=("set",), flags=("fast_dev_run", "json", "use_gpu"),
    )


def _cmd_submit(args) -> int:
    from pipeline import jobs

    gpus = 1 if args.use_gpu and not args.workers else None  # the trainer runs in the entrypoint process
    return jobs.submit_command(args, job_command(args), "train", entrypoint_num_gpus=gpus)


def _cmd_list() -> int:
    from training import methods

    for name in methods.names():
        m = methods.get(name)
        aliases = {v: k for k, v in m.stage_aliases.items()}
        phases = ", ".join(f"{p}" + (f" (--stage {aliases[p]})" if p in aliases else "") for p in m.phases)
        print(f"{name}: {phases}")
    return 0


def _cmd_train(args) -> int:
    from pipeline.jobs import is_submit
    from training import methods

    if args.list:
        return _cmd_list()
    try:
        method, phase = methods.resolve(args.method, args.phase, args.stage)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"persona train: {e.args[0]}") from None
    if is_submit(args):
        return _cmd_submit(args)
    overrides = _parse_set(args.set)
    workers = args.workers
    if workers is None:
        from training.config import train_params

        workers = train_params(args.params, overrides).train.cluster.workers
    if workers:
        from training.cluster import train_distributed

        if args.fast_dev_run:
            raise SystemExit("--fast-dev-run is for one local process: drop --workers (or set train.cluster.workers=0)")

        res = train_distributed(args.params, method.name, phase, workers, args.use_gpu or None, max_steps=args.max_steps,
                                overrides=overrides, resume=args.resume, cpus_per_worker=args.cpus_per_worker,
                                address=args.address, storage_path=args.storage_path)
    else:
        from training.train import train

        res = train(args.params, method.name, phase, max_steps=args.max_steps, fast_dev_run=args.fast_dev_run,
                    overrides=overrides, resume=args.resume)
    if args.json:
        keep = ("method", "phase", "global_step", "adapter", "adapter_json", "run_id", "model_id", "tracking_uri",
                "resumed_from", "metrics", "seconds")
        print(json.dumps({k: res.get(k) for k in keep}, indent=2, default=str))
    return 0


def register(subparsers) -> None:
    from pipeline.jobs import add_submit_options

    p = subparsers.add_parser(
        "train",
        help="train one phase of an identity-adapter method (Lightning; tracked in MLflow)",
        description="Train one phase of a registered method (--list shows them) on the shards, with the train "
        "section of the params file (train.methods.<method>.<phase>). A phase that starts from another one "
        "reads that phase's adapter. Resumes from the last checkpoint when the config and data are unchanged.",
    )
    p.add_argument("--method", help="a registered method (--list shows them)")
    p.add_argument("--phase", help="a phase of the method")
    p.add_argument("--stage", help="a phase alias: N -> the phase of --method (or of the one method) declaring it")
    p.add_argument("--list", action="store_true", help="list the registered methods and their phases")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="override the phase's max_steps")
    p.add_argument("--fast-dev-run", action="store_true", help="one step, no MLflow / checkpoints (smoke test)")
    p.add_argument("--resume", default="auto", help="auto (default) | never | path to a .ckpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. --set train.synthetic=16 --set METHOD.PHASE.lr=1e-5 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("scale-out (Ray Train / Ray Jobs)")
    g.add_argument("--workers", type=int, default=None,
                   help="train on N Ray Train workers (DDP; default train.cluster.workers, 0 = one local process)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (or for the submitted job)")
    g.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker (default train.cluster)")
    g.add_argument("--storage-path", default=None, help="Ray Train results/checkpoints (default train.cluster)")
    g.add_argument("--address", default=None,
                   help="with submit: the dashboard URL (http://HEAD:8265); else the Ray cluster for --workers")
    add_submit_options(p, address=False)
    p.set_defaults(func=_cmd_train)
