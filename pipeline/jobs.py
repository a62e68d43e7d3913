"""`persona jobs ...`: run a command on a Ray cluster as a Ray Job (submit, stream logs, wait).

    persona jobs submit [--address URL] [--working-dir DIR] [--env K=V]... [--no-wait] -- CMD...
    persona jobs status ID | logs ID [--follow] | stop ID | list
    persona train submit ... / persona build submit ...   (add_submit_options: a command as a Ray Job)

The address is the cluster's dashboard (`http://HOST:8265`; default `$RAY_API_SERVER_ADDRESS`,
else `http://127.0.0.1:8265`, e.g. a `kubectl port-forward`). Inside the job, `RAY_ADDRESS` is set
by Ray, so `persona stage ...` / `persona build ...` / `dvc repro` run their work on that cluster.

Token authentication (on by default for Ray 2.60 clusters): the bearer token is read from
`$RAY_AUTH_TOKEN`, else the file `$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`; none is sent when
`RAY_AUTH_MODE=disabled`. `submit_and_wait` exits like `ray job submit`: 0 when the job SUCCEEDED,
the entrypoint's exit code (or 1) when it FAILED, 1 when it was STOPPED.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with --working-dir (on top of the folder's .gitignore, which Ray honours).
DEFAULT_EXCLUDES = [".git", ".venv", ".dvc/cache", ".dvc/tmp", "data", "metrics", "mlruns", "tests/.cache", "**/__pycache__"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def auth_token() -> str | None:
    """The cluster's bearer token, from the places Ray itself reads (see module doc)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    p = Path(path) if path else Path.home() / ".ray" / "auth_token"
    if p.is_file():
        tok = p.read_text().strip()
        if tok:
            return tok
    if path:
        raise SystemExit(f"RAY_AUTH_TOKEN_PATH={path}: no token in that file")
    return None


def client(address: str | None = None, retries_s: float = 0.0):
    """A JobSubmissionClient for `address`, authenticated when a token is available.

    `retries_s` > 0 retries the connection that long (a dashboard that is still starting).
    """
    from ray.job_submission import JobSubmissionClient

    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    deadline = time.monotonic() + retries_s
    while True:
        try:
            return JobSubmissionClient(address or default_address(), headers=headers)
        except ConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def runtime_env(working_dir: str | Path | None, env: dict[str, str] | None, excludes: Sequence[str] = ()) -> dict:
    """Ray runtime env: the uploaded working dir (if any) and environment variables."""
    renv: dict[str, Any] = {}
    if working_dir is not None:
        wd = Path(working_dir).resolve()
        if not wd.is_dir():
            raise SystemExit(f"--working-dir {working_dir}: not a folder")
        renv["working_dir"] = str(wd)
        renv["excludes"] = list(DEFAULT_EXCLUDES) + list(excludes)
    if env:
        renv["env_vars"] = {str(k): str(v) for k, v in env.items()}
    return renv


def submit(
    address: str | None,
    entrypoint: Sequence[str] | str,
    working_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    excludes: Sequence[str] = (),
    submission_id: str | None = None,
    entrypoint_num_gpus: float | None = None,
) -> str:
    """Submit `entrypoint` (argv list or shell string) and return the job (submission) id."""
    return _submit(client(address), entrypoint, working_dir, env, excludes, submission_id, entrypoint_num_gpus)


def _submit(c, entrypoint, working_dir=None, env=None, excludes=(), submission_id=None, entrypoint_num_gpus=None) -> str:
    cmd = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    if not cmd.strip():
        raise SystemExit("nothing to run: give the entrypoint after `--`")
    return c.submit_job(
        entrypoint=cmd,
        runtime_env=runtime_env(working_dir, env, excludes) or None,
        submission_id=submission_id,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )


def _status(c, job_id: str) -> str:
    st = c.get_job_status(job_id)
    return str(getattr(st, "value", st))


def stream_logs(c, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> None:
    """Print the job's logs as they come until it ends (websocket tail; polling as a fallback)."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        with warnings.catch_warnings():  # ray 2.60's own websocket call passes ssl=None
            warnings.filterwarnings("ignore", message="ssl=None is deprecated", category=DeprecationWarning)
            asyncio.run(_tail())
        return
    except Exception as e:  # tail closed early or no websocket (proxy): poll the full log instead
        if _status(c, job_id) in TERMINAL:
            return
        print(f"[jobs] log stream interrupted ({e}); polling", file=sys.stderr)
    seen = 0
    while True:
        logs = c.get_job_logs(job_id)
        out.write(logs[seen:])
        out.flush()
        seen = len(logs)
        if _status(c, job_id) in TERMINAL:
            logs = c.get_job_logs(job_id)
            out.write(logs[seen:])
            out.flush()
            return
        time.sleep(poll_s)


def wait_for(c, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Block until the job is terminal; return its status name."""
    t0 = time.monotonic()
    while True:
        st = _status(c, job_id)
        if st in TERMINAL:
            return st
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"job {job_id} still {st} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def exit_code(c, job_id: str, status: str) -> int:
    """0 for SUCCEEDED; the entrypoint's exit code (or 1) for FAILED; 1 for STOPPED."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED":
        code = getattr(c.get_job_info(job_id), "driver_exit_code", None)
        return int(code) if isinstance(code, int) and code > 0 else 1
    return 1


def submit_and_wait(
    address: str | None,
    entrypoint: Sequence[str] | str,
    working_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    out: TextIO | None = None,
    excludes: Sequence[str] = (),
    entrypoint_num_gpus: float | None = None,
) -> int:
    """Submit, stream the logs to `out`, wait; return a process exit code (see `exit_code`).

    With `wait=False`, print the job id and return 0 at once. Ctrl-C stops waiting, not the job.
    """
    out = out or sys.stdout
    c = client(address)
    job_id = _submit(c, entrypoint, working_dir, env, excludes, entrypoint_num_gpus=entrypoint_num_gpus)
    if not wait:
        print(job_id, file=out, flush=True)
        return 0
    print(f"[jobs] submitted {job_id} to {address or default_address()}", file=sys.stderr, flush=True)
    try:
        stream_logs(c, job_id, out)
        status = wait_for(c, job_id)
    except KeyboardInterrupt:
        print(f"\n[jobs] stopped waiting; {job_id} keeps running (`persona jobs stop {job_id}`)", file=sys.stderr)
        return 130
    code = exit_code(c, job_id, status)
    print(f"[jobs] {job_id} {status} (exit {code})", file=sys.stderr, flush=True)
    return code


def _parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--env {p!r}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        env[k] = v
    return env


def _cli(fn):
    """Unreachable dashboard or refused token: one line on stderr and exit 1, not a traceback."""

    def run(args) -> int:
        try:
            return fn(args)
        except ConnectionError as e:
            raise SystemExit(f"[jobs] {e}") from None
        except Exception as e:
            if type(e).__name__ == "AuthenticationError":
                raise SystemExit(f"[jobs] {e}") from None
            raise

    return run


# ------------------------------------------------- `persona train submit` / `persona build submit`

ENTRY_PREFIX = ["python", "-m", "pipeline.cli"]


def add_submit_options(parser, address: bool = True) -> None:
    """The `submit` action and its options, for commands that can send themselves as a Ray Job.

    Adds an optional positional `action` (`persona CMD submit ...`), `--submit` (its older
    spelling), `--address` (unless the command defines its own), `--working-dir`, `--env`, `--no-wait`.
    Use `is_submit(args)`, `job_entrypoint(...)` and `submit_command(...)` in the command.
    """
    parser.add_argument("action", nargs="?", choices=["submit"], default=None, metavar="submit",
                        help="optional word right after the command (`persona %s submit ...`): instead of "
                        "running here, send this same command to a Ray cluster as a Ray Job, stream its logs "
                        "and exit with its status (see `persona jobs --help`)" % parser.prog.split()[-1])
    g = parser.add_argument_group("Ray Job (with `submit`)")
    g.add_argument("--submit", action="store_true", help="the same as `submit` (its older spelling)")
    if address:
        g.add_argument("--address", default=None,
                       help=f"the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    g.add_argument("--working-dir", default=".", metavar="DIR",
                   help="folder uploaded as the job's code and working directory (default: .); `none`: run in "
                   "the cluster's own copy (the image's working dir, e.g. /app)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    g.add_argument("--no-wait", action="store_true", help="print the job id and return at once")


def is_submit(args) -> bool:
    """Whether the parsed command asked to run as a Ray Job (`CMD submit ...` or `CMD --submit ...`)."""
    return getattr(args, "action", None) == "submit" or bool(getattr(args, "submit", False))


def job_entrypoint(command: str, args, options: Sequence[str] = (), flags: Sequence[str] = (),
                   repeated: Sequence[str] = ()) -> list[str]:
    """`python -m pipeline.cli COMMAND ...` rebuilt from parsed `args`, without the submit options.

    `options`: dests passed as `--opt VALUE` when not None; `repeated`: list dests passed once per
    value; `flags`: store_true dests passed as `--flag` when set. Dest `max_steps` is `--max-steps`.
    """
    cmd = ENTRY_PREFIX + [command]
    for dest in options:
        value = getattr(args, dest)
        if value is not None:
            cmd += [_flag(dest), str(value)]
    for dest in repeated:
        for value in getattr(args, dest) or []:
            cmd += [_flag(dest), str(value)]
    cmd += [_flag(dest) for dest in flags if getattr(args, dest)]
    return cmd


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def submit_command(args, entry: list[str], label: str, entrypoint_num_gpus: float | None = None) -> int:
    """Submit `entry` with the options from `add_submit_options`; the process exit code (`submit_and_wait`)."""
    wd = None if args.working_dir in (None, "", "none") else args.working_dir
    print(f"[{label}] submitting: {shlex.join(entry)}", file=sys.stderr, flush=True)
    return _cli(lambda a: submit_and_wait(a.address, entry, wd, _parse_env(a.env), wait=not a.no_wait,
                                          entrypoint_num_gpus=entrypoint_num_gpus))(args)


def _cmd_submit(args) -> int:
    entry = list(args.entrypoint)
    if entry and entry[0] == "--":
        entry = entry[1:]
    if not entry:
        raise SystemExit("usage: persona jobs submit [options] -- COMMAND [ARGS...]")
    return submit_and_wait(
        args.address, entry, args.working_dir, _parse_env(args.env), wait=not args.no_wait,
        excludes=args.exclude, entrypoint_num_gpus=args.entrypoint_num_gpus,
    )


def _cmd_status(args) -> int:
    c = client(args.address)
    info = c.get_job_info(args.job_id)
    st = str(getattr(info.status, "value", info.status))
    print(f"{args.job_id} {st}" + (f": {info.message}" if info.message else ""))
    return 0


def _cmd_logs(args) -> int:
    c = client(args.address)
    if args.follow:
        stream_logs(c, args.job_id)
    else:
        sys.stdout.write(c.get_job_logs(args.job_id))
    return 0


def _cmd_stop(args) -> int:
    c = client(args.address)
    stopped = c.stop_job(args.job_id)
    print(f"{args.job_id} {'stop requested' if stopped else 'was not running'}")
    return 0


def _cmd_list(args) -> int:
    c = client(args.address)
    for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
        st = str(getattr(j.status, "value", j.status))
        print(f"{j.submission_id or j.job_id}\t{st}\t{j.entrypoint}")
    return 0


JOBS_DESCRIPTION = f"""Run a command on a Ray cluster as a Ray Job: upload the working folder, start the command there,
stream its logs and exit with its status (0 when the job succeeded, the command's exit code when it
failed, 1 when it was stopped).

    persona jobs submit [--address URL] [--working-dir DIR] [--env K=V]... [--no-wait] -- COMMAND [ARGS...]
    persona jobs status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID | list

`persona build` and `persona train` can send themselves: put the word `submit` right after the command
(`persona train submit --method wplus --phase stage1 --address URL`); that is the optional `[submit]`
in their usage line, and `--submit` anywhere does the same. The job runs the same command without the
submit options, on the cluster.

The address is the cluster's dashboard (http://HOST:8265; default $RAY_API_SERVER_ADDRESS, else
{DEFAULT_ADDRESS}, e.g. a `kubectl port-forward`). Inside the job RAY_ADDRESS points at the cluster,
so `persona stage ...`, `persona build ...` and `dvc repro` spread their work over it. Token
authentication (on by default for Ray 2.60 clusters): the token comes from $RAY_AUTH_TOKEN, else the
file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; none is sent when RAY_AUTH_MODE=disabled."""


def register(subparsers) -> None:
    """Add `persona jobs {submit,status,logs,stop,list}` to the CLI."""
    p = subparsers.add_parser(
        "jobs",
        help="run commands on a Ray cluster as Ray Jobs (submit, status, logs, stop)",
        description=JOBS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION", help="what to do with jobs")

    def common(s):
        s.add_argument("--address", default=None, help=f"dashboard URL (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")

    s = sub.add_parser("submit", help="submit a command, stream its logs, exit with its status")
    common(s)
    s.add_argument("--working-dir", default=None, help="folder uploaded as the job's working dir (default: none, use the image's code)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="extra path excluded from the upload (repeatable)")
    s.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the entrypoint process itself")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER,
                   help="-- COMMAND [ARGS...]: the command the job runs (after `--`)")
    s.set_defaults(func=_cli(_cmd_submit))

    for name, fn, helptext in (
        ("status", _cmd_status, "print a job's status"),
        ("logs", _cmd_logs, "print a job's logs"),
        ("stop", _cmd_stop, "stop a running job"),
    ):
        s = sub.add_parser(name, help=helptext)
        common(s)
        s.add_argument("job_id", help="the job's id (printed by `submit`; `persona jobs list` shows them)")
        if name == "logs":
            s.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
        s.set_defaults(func=_cli(fn))

    s = sub.add_parser("list", help="list the cluster's jobs")
    common(s)
    s.set_defaults(func=_cli(_cmd_list))
