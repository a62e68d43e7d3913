"""`persona personalize`: per-identity fine-tunes of a method with a per-identity phase
(training/personalize.py has the details).

    persona personalize --method M --identity NAME [--from-shards | --images DIR] [--steps N]
                        [--params params.yaml] [--set KEY=VALUE ...] [--no-register] [--evaluate] [--json]
    persona personalize --method M --all-identities [--address RAY_ADDRESS] [--use-gpu | --no-gpu] ...
                        one Ray task per labelled identity of the shards

Exit status: 0 when every identity was trained, skipped (already done with the same cache key) or
refused by the phase as a recorded verdict in the fan-out; 1 when the one `--identity` was refused
(e.g. too few photos) or on an error; 75 when identities failed for reasons of the run (a task's
exception, a dead worker): the next run retries them and skips the finished ones.
"""
from __future__ import annotations

import json
import sys

EX_TEMPFAIL = 75


def _cmd(args) -> int:
    from training.cli import _parse_set
    from training.personalize import personalize

    if args.images is not None and args.from_shards:
        raise SystemExit("persona personalize: give --images DIR or --from-shards, not both")
    rep = personalize(args.params, args.method, identity=args.identity, all_identities=args.all_identities,
                      images=args.images, steps=args.steps, overrides=_parse_set(args.set),
                      register=False if args.no_register else None, evaluate=True if args.evaluate else None,
                      address=args.address, use_gpu=args.use_gpu)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True, default=str))
    rows = rep["rows"]
    if any(r.get("retry") for r in rows):
        return EX_TEMPFAIL
    if args.identity and rows[0]["status"] == "error":
        print(f"persona personalize: {rows[0]['error']}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "personalize",
        help="per-identity fine-tunes (one identity, or all of them over Ray), each registered per identity",
        description="Fine-tune a method's per-identity phase (e.g. PIDiff's) for one identity of the shards "
        "(--from-shards, the default), for the photos of a folder (--images DIR: the data stages run on them "
        "first), or for every labelled identity (--all-identities: one Ray task each, as many at a time as the "
        "cluster has room for). An identity whose adapter was made with the same cache key is skipped; a failed "
        "identity is a row of the run report and does not stop the others. Params: `personalize:` and "
        "train.methods.<method>.<phase>.",
    )
    p.add_argument("--method", help="the method (default params personalize.method)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--identity", help="one identity (its shards name, or the name for --images)")
    who.add_argument("--all-identities", action="store_true", help="every labelled identity of the shards (Ray fan-out)")
    p.add_argument("--images", help="a folder of the identity's photos: run the data stages on them first")
    p.add_argument("--from-shards", action="store_true", help="the identity's faces from the shards (the default)")
    p.add_argument("--steps", type=int, help="optimizer steps (default the phase's max_steps)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. --set METHOD.PHASE.min_photos=2 (repeatable)")
    p.add_argument("--no-register", action="store_true", help="do not register the adapters (params personalize.register)")
    p.add_argument("--evaluate", action="store_true", help="evaluate each adapter before registering it")
    p.add_argument("--address", help="Ray cluster for --all-identities (default params personalize.address, $RAY_ADDRESS)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None, help="one GPU per task")
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="CPU tasks even on a GPU cluster")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.set_defaults(func=_cmd)
