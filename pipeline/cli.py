"""`persona`: the command line.

    persona stage NAME                  run one data stage (what dvc.yaml calls)
    persona build --source DIR --out DIR [--until STAGE]
                                        run the data stages on any folder, outside DVC
    persona build [--params params.yaml] [--until STAGE]
                                        run the data stages configured in the params (what
                                        dvc.yaml's data stages run, in order) on its data_root
    persona build submit [the options above] [--address URL] [--no-wait] [--working-dir DIR]
                                        the same as a Ray Job on a cluster: stream, wait, exit status
    persona stages                      list the data stages in order
    persona COMMAND ...                 the commands other packages register (sample, jobs, train, ...)

Stages and the other commands register themselves (entry points `persona.stages` and
`persona.commands`, pipeline/plugins.py): this module names none of them. Exit status: 0; 75 when
items failed for reasons of the run (they are recorded and retried by the next run); 1 on an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import plugins
from pipeline.storage import spath

EX_TEMPFAIL = 75  # sysexits: some items failed for reasons of the run; rerun to retry them


def version() -> str:
    """'0.1.0' (the installed distribution's, else this checkout's pyproject.toml), plus the git
    commit when run from a checkout: '0.1.0 (git 1a2b3c4d, modified)'."""
    import importlib.metadata
    import tomllib

    root = Path(__file__).resolve().parents[1]
    v = None
    try:
        v = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        try:
            v = importlib.metadata.version("persona")
        except importlib.metadata.PackageNotFoundError:
            v = "unknown"
    from pipeline.gitinfo import git_commit, git_dirty

    commit = git_commit(root)
    if commit:
        v += f" (git {commit[:8]}{', modified' if git_dirty(root) else ''})"
    return v


class _VersionAction(argparse.Action):
    """`--version`, computed only when asked for (it may call git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")
        parser.exit()


def available_stages() -> list[str]:
    """The registered data stages, in pipeline order."""
    return [s.name for s in plugins.data_stages()]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("filelock", "urllib3", "PIL", "matplotlib", "h5py", "absl", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(name: str, ctx) -> dict:
    try:
        st = plugins.stage(name)
    except KeyError as e:
        raise SystemExit(e.args[0]) from None
    t0 = time.perf_counter()
    stats = dict(st.run(ctx) or {})
    stats.setdefault("seconds", round(time.perf_counter() - t0, 3))
    retry = f" retrying={stats['retrying']}" if stats.get("retrying") else ""
    print(
        f"[{name}] inputs={stats.get('inputs')} computed={stats.get('computed')} "
        f"cached={stats.get('cached')} counts={json.dumps(stats.get('counts', {}), sort_keys=True)}{retry} "
        f"in {stats['seconds']:.1f}s",
        flush=True,
    )
    return stats


def _retry_exit(names: list[str]) -> int:
    if not names:
        return 0
    print(f"persona: items of {', '.join(names)} failed for reasons of the run (recorded, see the rows' `error`); "
          "run again to retry them", file=sys.stderr)
    return EX_TEMPFAIL


def _cmd_stage(args) -> int:
    from pipeline.config import load_params
    from pipeline.stage import Context

    params = load_params(args.params)
    ctx = Context.make(params, args.root, args.metrics_dir)
    stats = run_stage(args.name, ctx)
    return _retry_exit([args.name] if stats.get("retrying") else [])


def build_job_command(args) -> list[str]:
    """The entrypoint of `persona build submit`: this build command without the submit options.
    Paths are passed as given: the job reads them on the cluster (relative to its working dir)."""
    from pipeline.jobs import job_entrypoint

    return job_entrypoint("build", args, options=("source", "out", "until", "name", "params"), flags=("unlabeled",))


def _check_build_args(args) -> None:
    if args.source is None:
        if args.name or args.unlabeled:
            raise SystemExit("--name / --unlabeled apply to --source only")
    elif args.out is None:
        raise SystemExit("--source needs --out (the folder for the item stores and metrics)")


def _cmd_build(args) -> int:
    from pipeline.jobs import is_submit

    _check_build_args(args)
    if is_submit(args):
        from pipeline.jobs import submit_command

        return submit_command(args, build_job_command(args), "build")

    from pipeline.config import SourceConfig, load_params
    from pipeline.stage import Context

    if args.source is None and not Path(args.params).is_file():
        raise SystemExit(f"--params {args.params}: no such file (without --source, build runs the stages it configures)")
    params = load_params(args.params)  # with --source, a missing file gives the defaults
    if args.source is not None:
        src = spath(args.source)  # a folder, or an s3:// prefix
        if not src.exists():
            raise SystemExit(f"--source {src} does not exist")
        params.ingest.sources = [SourceConfig(name=args.name or src.name or "source", path=str(src), labeled=not args.unlabeled)]
    if args.out is not None:
        ctx = Context.make(params, args.out, spath(args.out) / "metrics")  # args.out may be an s3:// URL
    else:  # exactly what `persona stage NAME` (dvc.yaml) uses: data_root and metrics/
        ctx = Context.make(params)
    stages = available_stages()
    if args.until:
        if args.until not in stages:
            raise SystemExit(f"--until {args.until}: not a stage; choose from {', '.join(stages)}")
        stages = stages[: stages.index(args.until) + 1]
    retrying = []
    for name in stages:
        if run_stage(name, ctx).get("retrying"):
            retrying.append(name)
    print(f"[build] done: outputs under {ctx.root}, metrics under {ctx.metrics_dir}")
    return _retry_exit(retrying)


def _cmd_stages(args) -> int:
    for s in plugins.data_stages():
        after = ", ".join(s.after) if s.after else "-"
        print(f"{s.name:10s} {s.summary}  [after: {after}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="persona",
        description="Persona: face datasets and identity adapters for text-to-image diffusion.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Typical use: `make demo` (dvc repro on the bundled sample), or\n"
        "  persona build --source ~/photos --out /tmp/persona-out\n"
        "  persona build submit --address http://HEAD:8265 --params data/params.yaml   (as a Ray Job)\n"
        "Set RAY_ADDRESS to run the stages on a Ray cluster.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action=_VersionAction, help="print the version (and the git commit of a checkout) and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    s = sub.add_parser("stage", help="run one data stage (what dvc.yaml calls)")
    s.add_argument("name", help="stage name: " + ", ".join(plugins.stage_names()))
    s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    s.add_argument("--root", help="item store root (default: params data_root, data)")
    s.add_argument("--metrics-dir", help="DVC metrics folder (default: metrics)")
    s.set_defaults(func=_cmd_stage)

    s = sub.add_parser(
        "build",
        help="run the data stages (on any folder, or as configured), outside DVC; `build submit`: as a Ray Job",
        description="Run the data stages in order with the same code the DVC stages call; reruns are "
        "incremental. With --source DIR: on that folder (subfolders = identities, loose files = unlabeled), "
        "into --out. Without: on the sources of the params file, into its data_root and metrics/ "
        "(like `persona stage NAME` for each stage; --out moves both). "
        "`persona build submit ...` sends the same command to a Ray cluster as a Ray Job.",
    )
    from pipeline.jobs import add_submit_options

    s.add_argument("--source", help="folder of photos: <identity>/<photo> or loose photos (default: the params' sources)")
    s.add_argument("--out", help="output folder: item stores and metrics/ (required with --source; default: data_root)")
    s.add_argument("--until", help="stop after this stage")
    s.add_argument("--name", help="with --source: source name recorded in the rows (default: folder name)")
    s.add_argument("--unlabeled", action="store_true", help="with --source: treat every photo as unlabeled")
    s.add_argument("--params", default="params.yaml", help="params file for stage settings (default: params.yaml)")
    add_submit_options(s)
    s.set_defaults(func=_cmd_build)

    s = sub.add_parser("stages", help="list the data stages in order")
    s.set_defaults(func=_cmd_stages)
    plugins.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe / TFLite chatter in every worker
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except Exception as e:  # one clear line; the traceback with -v
        if args.verbose:
            raise
        print(f"persona {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        print("(run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
