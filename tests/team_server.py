"""The team MLflow server of infra/k8s/mlflow.yaml, on loopback, for the tests.

`start_team_server` builds it from the manifest itself, so what is tested is what a team deploys:

1. a throwaway PostgreSQL cluster: `initdb` in a temp folder (as the `postgres` system user when we
   are root: initdb refuses root), `pg_ctl start` on a free 127.0.0.1 port, the superuser and
   database that the postgres image makes from the Secret `persona-postgres`, then the manifest's
   init script (ConfigMap persona-postgres-init: the auth database);
2. the `db-upgrade` init container's command (`mlflow db upgrade`: the schema on an empty database);
3. the `mlflow` container's command line (`mlflow server --app-name basic-auth`, PostgreSQL backend,
   `--serve-artifacts` to `s3://`) with the container's environment, its Secrets filled with random
   values, and the auth config from ConfigMap persona-mlflow-auth;
4. the `mlflow-users` Job's script (the read-only user).

Only what cannot be the same on loopback is replaced, each replacement checked to replace something:
PGHOST/PGPORT, the S3 endpoint (the moto server of tests/conftest.py) and bucket, the bind address
and port, one server worker instead of two, the auth config's path. `TeamServer.stop` stops the
server and PostgreSQL by pid and removes the temp folder.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "infra" / "k8s" / "mlflow.yaml"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
ADMIN, READER = "persona-admin", "persona-reader"


# ------------------------------------------------------------------------------------ binaries
def pg_bindir() -> Optional[Path]:
    """The folder with initdb / pg_ctl / postgres / psql: $PERSONA_PG_BIN, PATH, or Debian's newest."""
    cands = [os.environ.get("PERSONA_PG_BIN", "")]
    if shutil.which("initdb"):
        cands.append(str(Path(shutil.which("initdb")).parent))
    cands += sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(re.sub(r"\D", "", Path(p).parent.name) or 0), reverse=True)
    for c in cands:
        if c and all((Path(c) / b).is_file() for b in ("initdb", "pg_ctl", "postgres", "psql")):
            return Path(c)
    return None


def ensure_postgres() -> tuple[Optional[Path], str]:
    """(bindir, "") when the PostgreSQL server binaries are here (installing them with apt-get when
    they are missing and we may), else (None, why not) for a skip message."""
    found = pg_bindir()
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if not apt:
        return None, "no PostgreSQL server binaries (initdb, pg_ctl) on this machine and no apt-get to install them"
    if os.geteuid() != 0:
        return None, ("no PostgreSQL server binaries (initdb, pg_ctl) on this machine, and apt-get needs root: "
                      "run `sudo apt-get install postgresql` (or set PERSONA_PG_BIN)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    found = pg_bindir()
    if found:
        return found, ""
    tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
    return None, f"no PostgreSQL server binaries and `apt-get install postgresql` failed: {tail}"


def _as_postgres() -> list[str]:
    """Command prefix that runs a server binary as the `postgres` system user when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("initdb refuses to run as root and there is no `postgres` system user "
                           "(the Debian postgresql package creates it)") from None
    return ["runuser", "-u", "postgres", "--"]


def free_port() -> int:
    from training.mlflow_server import free_port as fp

    return fp()


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie that no init process reaps counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------------------------ PostgreSQL
@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (scram-sha-256 passwords, no fsync)."""

    bindir: Path
    root: Path  # temp folder the server user owns: data/, socket, log
    superuser: str
    password: str
    port: int = 0
    pid: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def libpq_env(self, user: Optional[str] = None, password: Optional[str] = None) -> dict[str, str]:
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": user or self.superuser,
                "PGPASSWORD": password or self.password}

    def start(self, timeout: float = 60.0) -> "Postgres":
        pre = _as_postgres()
        if pre:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if pre:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            subprocess.run([*pre, str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.superuser,
                            f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"],
                           cwd=self.root, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"initdb failed: {e.stderr.strip()[-2000:]}") from None
        finally:
            pwfile.unlink()
        self.port = free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        r = subprocess.run([*pre, str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                            "-w", "-t", str(int(timeout)), "-o", opts], cwd=self.root, capture_output=True, text=True,
                           timeout=timeout + 30)
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists():
            self.pid = int(pidfile.read_text().split()[0])
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop()
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()}\n{log}")
        return self

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.superuser, password=self.password,
                             dbname=dbname, autocommit=True) as conn:
            conn.execute(sql)

    def query(self, sql: str, dbname: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.superuser, password=self.password,
                             dbname=dbname) as conn:
            return list(conn.execute(sql).fetchall())

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster), SIGKILL after `timeout`; then remove the folder."""
        if self.pid and alive(self.pid):
            os.kill(self.pid, signal.SIGINT)
            t0 = time.monotonic()
            while alive(self.pid) and time.monotonic() - t0 < timeout:
                time.sleep(0.1)
            if alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------------------------ the manifest
def manifest() -> dict[tuple[str, str], dict]:
    """(kind, name) -> document of infra/k8s/mlflow.yaml."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def k8s_expand(s: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command/args (unknown references stay as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)


def container_env(c: dict, secrets_: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """A container's environment: `env` values and `secretKeyRef`s, `envFrom` Secrets."""
    out: dict[str, str] = {}
    for ef in c.get("envFrom", []):
        out.update(secrets_[ef["secretRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secrets_[ref["name"]][ref["key"]]
    return out


def replace_checked(items: list[str], old: str, new: str) -> list[str]:
    """Replace `old` in the items; the manifest must contain it (else the test runs something else)."""
    if not any(old in i for i in items):
        raise AssertionError(f"infra/k8s/mlflow.yaml no longer has {old!r}: update tests/team_server.py")
    return [i.replace(old, new) for i in items]


def _override(env: dict[str, str], **new: str) -> dict[str, str]:
    missing = sorted(set(new) - set(env))
    if missing:
        raise AssertionError(f"infra/k8s/mlflow.yaml's container has no {missing}: update tests/team_server.py")
    return {**env, **new}


def _base_env() -> dict[str, str]:
    """This process's environment without anything that would point a server or client elsewhere."""
    drop = ("MLFLOW_", "AWS_", "PG")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _mlflow(args: list[str]) -> list[str]:
    assert args and args[0] in ("mlflow", "python"), args
    return [sys.executable, "-m", "mlflow", *args[1:]] if args[0] == "mlflow" else [sys.executable, *args[1:]]


# ------------------------------------------------------------------------------------ the server
@dataclass
class TeamServer:
    url: str
    pg: Postgres
    server: object  # training.mlflow_server.MlflowServer
    bucket: str
    s3_endpoint: str
    secrets: dict[str, dict[str, str]]
    root: Path
    outputs: list[str] = field(default_factory=list)  # stdout/stderr of the init steps (leak checks)

    @property
    def admin(self) -> dict[str, str]:
        return dict(self.secrets["persona-mlflow-admin"])

    @property
    def reader(self) -> dict[str, str]:
        return dict(self.secrets["persona-mlflow-reader"])

    def secret_values(self) -> list[str]:
        """Every password and key the deployment holds (usernames and database names excluded)."""
        names = {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD"}
        return [v for s in self.secrets.values() for k, v in s.items() if k in names]

    def server_log(self) -> str:
        return self.server.log_path.read_text(errors="replace") if self.server.log_path else ""

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self.pg.stop()
            shutil.rmtree(self.root, ignore_errors=True)


def make_secrets(s3_keys: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The Secrets README.md tells the operator to create, with random values (MinIO's = moto's keys)."""
    def pw() -> str:
        return secrets.token_urlsafe(18)  # MLflow wants >= 12 characters

    return {
        "persona-postgres": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": pw(), "POSTGRES_DB": "mlflow"},
        "persona-minio": {"MINIO_ROOT_USER": s3_keys["AWS_ACCESS_KEY_ID"], "MINIO_ROOT_PASSWORD": s3_keys["AWS_SECRET_ACCESS_KEY"]},
        "persona-mlflow-server": {"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)},
        "persona-mlflow-admin": {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": pw()},
        "persona-mlflow-reader": {"MLFLOW_TRACKING_USERNAME": READER, "MLFLOW_TRACKING_PASSWORD": pw()},
    }


def _run(cmd: list[str], env: Mapping[str, str], what: str, outputs: list[str], timeout: float = 300) -> str:
    r = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    outputs.append(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout


def start_team_server(bindir: Path, s3_endpoint: str, s3_keys: Mapping[str, str], bucket: str,
                      timeout: float = 240.0) -> TeamServer:
    """Steps 1-4 of the module doc; the caller owns the result and calls `stop()`."""
    from training.mlflow_server import launch

    docs = manifest()
    sec = make_secrets(s3_keys)
    pgs = sec["persona-postgres"]
    root = Path(tempfile.mkdtemp(prefix="persona-team-"))
    pg = Postgres(bindir, Path(tempfile.mkdtemp(prefix="persona-pg-")), pgs["POSTGRES_USER"], pgs["POSTGRES_PASSWORD"])
    outputs: list[str] = []
    srv = None
    try:
        # 1. PostgreSQL as the postgres image leaves it, then the manifest's init script
        pg.start()
        pg.execute(f'CREATE DATABASE "{pgs["POSTGRES_DB"]}"')
        init = docs[("ConfigMap", "persona-postgres-init")]["data"]
        for name in sorted(init):
            script = root / name
            script.write_text(init[name])
            _run(["sh", str(script)], {**_base_env(), **pgs, **pg.libpq_env(),
                                       "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}, name, outputs)

        # 2. the migration (init container), on the empty database
        spec = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]
        (upgrade,) = spec["initContainers"]
        env = _override(container_env(upgrade, sec), PGHOST="127.0.0.1", PGPORT=str(pg.port))
        _run(_mlflow([k8s_expand(a, env) for a in upgrade["command"] + upgrade["args"]]), {**_base_env(), **env},
             "mlflow db upgrade", outputs)

        # 3. the server, from the container's own command line
        (c,) = spec["containers"]
        ini = root / "basic_auth.ini"
        ini.write_text(docs[("ConfigMap", "persona-mlflow-auth")]["data"]["basic_auth.ini"])
        ini.chmod(0o600)
        env = _override(container_env(c, sec), PGHOST="127.0.0.1", PGPORT=str(pg.port),
                        MLFLOW_S3_ENDPOINT_URL=s3_endpoint, MLFLOW_AUTH_CONFIG_PATH=str(ini))
        port = free_port()
        args = [k8s_expand(a, env) for a in c["command"] + c["args"]]
        args = replace_checked(args, "--host=0.0.0.0", "--host=127.0.0.1")
        args = replace_checked(args, "--port=5000", f"--port={port}")
        args = replace_checked(args, "--workers=2", "--workers=1")  # 2 CI cores
        args = replace_checked(args, "s3://mlflow/", f"s3://{bucket}/")
        srv = launch(_mlflow(args), f"http://127.0.0.1:{port}", env={**_base_env(), **env},
                     backend=next(a for a in args if a.startswith("--backend-store-uri=")).split("=", 1)[1],
                     artifacts=f"s3://{bucket}/", timeout=timeout, log_path=root / "mlflow-server.log", cwd=root)

        # 4. the read-only user (Job mlflow-users)
        job = docs[("Job", "mlflow-users")]["spec"]["template"]["spec"]
        (u,) = job["containers"]
        env = _override(container_env(u, sec), MLFLOW_TRACKING_URI=srv.url)
        _run(_mlflow(u["command"] + u["args"]), {**_base_env(), **env}, "mlflow-users job", outputs)
        return TeamServer(srv.url, pg, srv, bucket, s3_endpoint, sec, root, outputs)
    except BaseException:
        if srv is not None:
            srv.stop()
        pg.stop()
        raise
