"""A local MLflow tracking server: `mlflow server` on 127.0.0.1 with SQLite + a served artifact folder.

    persona mlflow-server [--port 5000] [--backend sqlite:///mlflow-server.db] [--artifacts mlartifacts-server]

starts `python -m mlflow server --backend-store-uri <backend> --artifacts-destination <dir>
--serve-artifacts --host 127.0.0.1 --port <port> --workers N`, waits until `/health` answers (about
20 s on a laptop) and keeps it running until Ctrl-C / SIGTERM. Clients then use
`MLFLOW_TRACKING_URI=http://127.0.0.1:<port>`; artifacts travel through the server
(`mlflow-artifacts:/` URIs), so clients need no access to the artifact folder.

For a team server (PostgreSQL + object store + MLflow's basic-auth app) see the README, "Team
deployment", and infra/k8s/mlflow.yaml; `launch` runs that manifest's own command line in the tests
(tests/team_server.py). `start_server` / `MlflowServer.stop` are what the integration tests use.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger("persona.mlflow_server")

DEFAULT_BACKEND = "sqlite:///mlflow-server.db"
DEFAULT_ARTIFACTS = "mlartifacts-server"
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def health(url: str, timeout: float = 2.0) -> bool:
    """True when `<url>/health` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
        return False


@dataclass
class MlflowServer:
    """A running `mlflow server` process (its own process group) and its URL."""

    proc: subprocess.Popen
    url: str
    port: int
    backend: str
    artifacts: Path | str
    log_path: Optional[Path] = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM the server's process group (the server and its workers), SIGKILL after `timeout`."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return self.proc.poll()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return self.proc.wait(5)

    def tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_command(port: int, backend: str, artifacts: str | os.PathLike, host: str = LOOPBACK,
                   workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", host,
            "--port", str(port), "--workers", str(workers)]


def start_server(
    port: Optional[int] = None,
    backend: str = DEFAULT_BACKEND,
    artifacts: str | os.PathLike = DEFAULT_ARTIFACTS,
    *,
    host: str = LOOPBACK,
    workers: int = 1,
    timeout: float = 120.0,
    log_path: Optional[str | os.PathLike] = None,
    cwd: Optional[str | os.PathLike] = None,
) -> MlflowServer:
    """Start `mlflow server` (SQLite backend, served local artifacts) and wait for /health.

    A relative SQLite path and artifact folder are relative to `cwd` (default: the current folder).
    Raises RuntimeError (with the server's log tail) when it exits or does not answer in `timeout` s.
    """
    cwd = Path(cwd) if cwd else Path.cwd()
    port = port or free_port(host)
    if "://" in str(artifacts):  # object store (s3://, gs://, ...): passed through
        art: Path | str = str(artifacts)
    else:
        art = Path(artifacts)
        art = art if art.is_absolute() else cwd / art
        art.mkdir(parents=True, exist_ok=True)
    return launch(server_command(port, backend, art, host, workers), f"http://{host}:{port}", backend=backend,
                  artifacts=art, timeout=timeout, log_path=log_path, cwd=cwd)


def launch(
    cmd: list[str],
    url: str,
    *,
    env: Optional[Mapping[str, str]] = None,
    backend: str = "",
    artifacts: Path | str = "",
    timeout: float = 120.0,
    log_path: Optional[str | os.PathLike] = None,
    cwd: Optional[str | os.PathLike] = None,
) -> MlflowServer:
    """Run an `mlflow server ...` command line (its own process group) and wait until `url`/health answers.

    `env` is the server's whole environment (default: this process's). Used by `start_server` and by
    the team-server tests, which run the command line of infra/k8s/mlflow.yaml (PostgreSQL backend,
    basic-auth app, S3 artifacts). The command line is logged; pass secrets in `env`, never in `cmd`.
    """
    lp = Path(log_path) if log_path else None
    out = open(lp, "ab") if lp else subprocess.DEVNULL
    env = {**(os.environ if env is None else env), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    log.info("starting %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, cwd=str(cwd or Path.cwd()), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    finally:
        if lp:
            out.close()
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    srv = MlflowServer(proc, url, port, backend, artifacts, lp)
    t0 = time.monotonic()
    while not health(srv.url):
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} before answering /health:\n{srv.tail()}")
        if time.monotonic() - t0 > timeout:
            srv.stop()
            raise RuntimeError(f"mlflow server did not answer {srv.url}/health within {timeout:.0f}s:\n{srv.tail()}")
        time.sleep(0.5)
    log.info("mlflow server up at %s after %.1fs", srv.url, time.monotonic() - t0)
    return srv


def serve(port: int = 5000, backend: str = DEFAULT_BACKEND, artifacts: str = DEFAULT_ARTIFACTS,
          host: str = LOOPBACK, workers: int = 1, timeout: float = 120.0) -> int:
    """Start the server, print how to use it, and block until it exits or we are interrupted."""
    srv = start_server(port, backend, artifacts, host=host, workers=workers, timeout=timeout)
    print(f"[mlflow-server] {srv.url} (backend {backend}, artifacts {srv.artifacts})\n"
          f"  export MLFLOW_TRACKING_URI={srv.url}\n  Ctrl-C to stop.", flush=True)

    def _term(signum, frame):  # pragma: no cover - signal path
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        return int(srv.proc.wait() or 0)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        srv.stop()
