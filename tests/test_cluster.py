"""Scale-out, for real: a two-node Ray cluster on this machine (token auth on).

- every data stage (`persona build`: ingest .. shards) attached to the cluster, with the item
  stores on an S3 API server (moto), spreads work over both nodes and writes tables, metrics and
  shards byte-identical to an in-process run on local disk;
- a worker node whose raylet is SIGKILLed mid-ingest: the stage completes, every item exactly once;
- `persona jobs submit` against the head's dashboard streams logs and returns the job's status;
- `persona build submit` runs the data build as a Ray Job (streamed, waited, its status as exit code).

Each node is a `ray start --block` process of its own; teardown ends exactly those processes (never
`ray stop`, which would end every Ray process of the machine).
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from tests.conftest import PERSONA, REPO
from tests.test_resume_and_dvc import _synthetic_raw

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class _Node:
    """One `ray start --block` process; its children are the node's Ray processes."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self._fh = open(log, "w")
        self.proc = subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=self._fh, stderr=subprocess.STDOUT)
        self.pids: set[int] = set()

    def text(self) -> str:
        return ANSI.sub("", self.log.read_text(errors="replace"))

    def wait_started(self, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        while "Ray runtime started" not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"ray start not up after {timeout}s:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        self.remember_children()

    def remember_children(self) -> None:
        try:
            self.pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def raylet_pid(self) -> int:
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        (pid,) = [c.pid for c in kids if c.name() == "raylet"]
        return pid

    def stop(self) -> None:
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` ends its node's processes
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _kill_pids(self.pids)
        self._fh.close()


def _kill_pids(pids) -> None:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.kill()
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


class _Cluster:
    """Head + one worker node, each with one CPU, in a private temp dir, with its own token."""

    def __init__(self, dashboard: bool):
        self.root = Path(tempfile.mkdtemp(prefix="prc", dir="/tmp"))  # short: Unix socket paths
        self.token = secrets.token_hex(32)
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
        }
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(k, None)
        gcs, dash, client, agent_h, agent_w = _free_ports(5)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.nodes: list[_Node] = []
        head_args = [
            "--head", f"--port={gcs}", "--num-cpus=1", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_h}", f"--include-dashboard={'true' if dashboard else 'false'}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--object-store-memory=200000000",
            "--disable-usage-stats", f"--temp-dir={self.root / 'h'}",
        ]
        try:
            self.head = self._start(head_args, "head.log")
            # The head binds this machine's interface address even when asked for 127.0.0.1.
            m = re.search(r"--address='([^']+)'", self.head.text())
            self.address = m.group(1) if m else f"{socket.gethostbyname(socket.gethostname())}:{gcs}"
            self.env["RAY_ADDRESS"] = self.address
            self.worker = self._start(
                [f"--address={self.address}", "--num-cpus=1", f"--dashboard-agent-listen-port={agent_w}",
                 "--object-store-memory=200000000", "--disable-usage-stats", f"--temp-dir={self.root / 'w'}"],
                "worker.log",
            )
        except BaseException:
            self.stop()
            raise

    def _start(self, args, log) -> _Node:
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        node = _Node(args, env, self.root / log)
        self.nodes.append(node)
        node.wait_started()
        return node

    def stop(self) -> None:
        for n in reversed(self.nodes):
            n.stop()
        # Anything of this cluster still alive (its paths name our private temp dir): end it.
        strays = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.root) in a for a in (p.info["cmdline"] or [])):
                    strays.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        _kill_pids(strays)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def _cluster(dashboard: bool):
    c = _Cluster(dashboard)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster():
    with _cluster(dashboard=True) as c:
        yield c


def _local_env() -> dict:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    return env


def _params(tmp: Path, raw: Path, batch_size: int, part_size: int) -> Path:
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({
        "runtime": {"executor": "ray", "workers": 2, "inline_below": 0, "part_size": part_size, "progress": False, "address": None},
        "ingest": {
            "batch_size": batch_size,
            "sources": [
                {"name": "sample", "path": str(raw / "sample")},
                {"name": "unlabeled", "path": str(raw / "unlabeled"), "labeled": False},
            ],
        },
    }))
    return p


def _stage_cmd(name: str, params: Path, root: Path) -> list[str]:
    return PERSONA + ["stage", name, "--params", str(params), "--root", str(root), "--metrics-dir", str(root / "metrics")]


def _run(cmd: list[str], env: dict, timeout: float = 240) -> str:
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def _last_run(root: Path, stage: str) -> dict:
    return json.loads((root / "runs" / f"{stage}.json").read_text())


# First: it runs its own cluster, before the module's cluster starts (at most two nodes at a time).
@pytest.mark.slow
@pytest.mark.integration
def test_lost_worker_node_mid_stage_every_item_once(sample_raw, tmp_path):
    from pipeline.config import load_params
    from stages.ingest import list_inputs

    n = 320
    raw = _synthetic_raw(sample_raw, tmp_path / "raw", n)
    params = _params(tmp_path, raw, batch_size=2, part_size=4)
    root = tmp_path / "out"
    parts = root / "ingest" / "parts"
    with _cluster(dashboard=False) as c:
        raylet = c.worker.raylet_pid()
        proc = subprocess.Popen(_stage_cmd("ingest", params, root), env=c.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            t0 = time.monotonic()
            while not (parts.exists() and len(list(parts.glob("part-*.parquet"))) >= 2):
                assert proc.poll() is None, proc.communicate()[0][-5000:]
                assert time.monotonic() - t0 < 120, "no parts committed in 120 s"
                time.sleep(0.02)
            done_at_kill = 4 * len(list(parts.glob("part-*.parquet")))
            assert proc.poll() is None and done_at_kill < n, "stage finished before the node was killed"
            os.kill(raylet, signal.SIGKILL)  # the worker node is lost with its actor and batches
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out[-5000:]
    assert "worker died with a batch" in out, "the kill did not hit batches in flight"

    expected = {it["key"] for it in list_inputs(load_params(params).ingest)}
    table = pd.read_parquet(root / "ingest" / "table.parquet")
    assert len(table) == n and table["key"].is_unique and set(table["key"]) == expected
    assert (table["status"] == "ok").all(), table["status"].value_counts()
    journal = pd.concat([pd.read_parquet(p) for p in sorted(parts.glob("part-*.parquet"))])
    assert len(journal) == n and journal["cache_key"].is_unique, "an item was committed twice"
    run = _last_run(root, "ingest")
    # results count once, on the node that returned them (the lost node's batches were redone)
    assert sum(run["nodes"].values()) == run["computed"] == n


RAY_STAGES = ("ingest", "align", "masks", "caption", "wplus", "identity", "expression", "clip_image",
              "instances")  # actor pools (dedup, shards: driver)
DATA_STAGES = ("ingest", "dedup", "align", "caption", "expression", "identity", "masks", "wplus", "clip_image", "instances",
               "shards")  # pipeline order


@pytest.mark.slow
@pytest.mark.integration
def test_data_stages_on_cluster_with_s3_root_match_in_process(cluster, s3, s3_server, sample_raw, tmp_path):
    """Every data stage of the bundled sample's labeled photos (the group photos only add minutes),
    run on the two-node cluster with the item stores on S3, against the in-process run on disk:
    both nodes did work in every parallel stage, and every table, metric and shard is identical."""
    from pipeline.cli import run_stage
    from pipeline.config import load_params
    from pipeline.stage import Context
    from pipeline.storage import spath

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "runtime": {"executor": "ray", "workers": 2, "inline_below": 0, "part_size": 2, "progress": False, "address": None},
        "ingest": {"batch_size": 1, "sources": [{"name": "sample", "path": str(sample_raw / "sample")}]},
        "align": {"batch_size": 1}, "masks": {"batch_size": 2}, "caption": {"batch_size": 2},
        "wplus": {"batch_size": 1, "input_size": 128}, "identity": {"batch_size": 2}, "expression": {"batch_size": 1},
        "clip_image": {"batch_size": 2}, "instances": {"batch_size": 2},
    }))
    root = f"{s3}/data"
    env = {**cluster.env, **s3_server.env}
    # one driver attached to the cluster runs every stage (`persona build`), stores and metrics on S3
    out = _run(PERSONA + ["build", "--params", str(params), "--out", root], env, timeout=600)
    assert "attaching to Ray cluster" in out and f"outputs under {root}" in out

    # the reference: Ray in this process (actors with one CPU each, like the cluster's: a model's
    # float reductions, and so its output bytes, depend on its thread count)
    from pipeline.plugins import stage_names

    assert sorted(DATA_STAGES) == stage_names()
    ctx = Context.make(load_params(params), tmp_path / "local", tmp_path / "m_local")
    for stage in DATA_STAGES:
        run_stage(stage, ctx)

    remote = spath(root)
    for stage in RAY_STAGES:
        run = json.loads((remote / "runs" / f"{stage}.json").read_text())
        nodes = run["nodes"]
        assert run["computed"] == run["inputs"] > 0, (stage, run)
        assert len(nodes) == 2 and all(n > 0 for n in nodes.values()), f"{stage}: work did not spread: {nodes}"
        assert sum(nodes.values()) == run["computed"]
        assert all(re.fullmatch(r"[0-9a-f]{56}", n) for n in nodes), nodes
    faces = json.loads((tmp_path / "m_local" / "shards.json").read_text())
    assert faces["written"]["total"] >= 6 and faces["written"]["val"] >= 1, faces

    for stage in DATA_STAGES[:-1]:
        a, b = (remote / stage / "table.parquet").read_bytes(), (tmp_path / "local" / stage / "table.parquet").read_bytes()
        assert a == b, f"{stage}: the cluster's table on S3 differs from the in-process one"
    for stage in DATA_STAGES:
        assert (remote / "metrics" / f"{stage}.json").read_text() == (tmp_path / "m_local" / f"{stage}.json").read_text()
    idx = json.loads((remote / "shards" / "index.json").read_text())
    assert idx == json.loads((tmp_path / "local" / "shards" / "index.json").read_text())
    for sh in idx["shards"]:
        assert (remote / "shards" / sh["file"]).read_bytes() == (tmp_path / "local" / "shards" / sh["file"]).read_bytes()


@pytest.mark.slow
@pytest.mark.integration
def test_jobs_submit_streams_logs_and_returns_status(cluster, tmp_path, monkeypatch, capsys):
    from pipeline import cli, jobs

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "job.py").write_text(
        "import os, sys\nprint('MARKER-' + os.environ['PERSONA_TEST_VAR'], flush=True)\nsys.exit(int(sys.argv[1]))\n"
    )
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    jobs.client(cluster.dashboard, retries_s=60)  # the dashboard may still be starting

    out = io.StringIO()
    env = {"PERSONA_TEST_VAR": "ok42"}
    assert jobs.submit_and_wait(cluster.dashboard, [sys.executable, "job.py", "0"], wd, env, out=out) == 0
    assert "MARKER-ok42" in out.getvalue()
    out = io.StringIO()
    assert jobs.submit_and_wait(cluster.dashboard, [sys.executable, "job.py", "3"], wd, env, out=out) == 3
    assert "MARKER-ok42" in out.getvalue()

    # the CLI: --no-wait prints the id; status and logs find the job
    capsys.readouterr()
    rc = cli.main(["jobs", "submit", "--address", cluster.dashboard, "--working-dir", str(wd),
                   "--env", "PERSONA_TEST_VAR=cli", "--no-wait", "--", sys.executable, "job.py", "0"])
    job_id = capsys.readouterr().out.strip()
    assert rc == 0 and job_id
    assert jobs.wait_for(jobs.client(cluster.dashboard), job_id, timeout_s=120) == "SUCCEEDED"
    assert cli.main(["jobs", "status", "--address", cluster.dashboard, job_id]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{job_id} SUCCEEDED")
    assert cli.main(["jobs", "logs", "--address", cluster.dashboard, job_id]) == 0
    assert "MARKER-cli" in capsys.readouterr().out

    # token authentication is on: no token, no access
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(Exception, match="(?i)auth"):
        jobs.client(cluster.dashboard).list_jobs()


@pytest.mark.slow
@pytest.mark.integration
def test_build_submit_runs_the_build_as_a_ray_job(cluster, sample_raw, tmp_path, monkeypatch, capsys):
    """`persona build submit`: the params-driven build as a Ray Job, logs streamed, the job's status as
    exit code; `--no-wait` prints an id that `persona jobs status` / `logs` find; `jobs stop` stops."""
    from pipeline import cli, jobs

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    jobs.client(cluster.dashboard, retries_s=60)
    wd = tmp_path / "wd"  # the code the job runs (uploaded)
    for pkg in ("pipeline", "stages"):
        shutil.copytree(REPO / pkg, wd / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = _params(tmp_path, sample_raw, batch_size=1, part_size=2)
    params.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "data_root": str(tmp_path / "data")}))
    base = ["build", "submit", "--address", cluster.dashboard, "--working-dir", str(wd)]

    capsys.readouterr()
    assert cli.main(base + ["--params", str(params), "--until", "dedup"]) == 0
    cap = capsys.readouterr()
    assert "[ingest] inputs=" in cap.out and "[dedup] inputs=" in cap.out and "[build] done" in cap.out  # streamed
    assert "[align]" not in cap.out
    assert "python -m pipeline.cli build --until dedup --params" in cap.err and "SUCCEEDED (exit 0)" in cap.err
    run = _last_run(tmp_path / "data", "ingest")
    assert run["computed"] == run["inputs"] >= 8
    assert len(run["nodes"]) == 2, f"the job's stage did not use the cluster: {run['nodes']}"
    dedup = pd.read_parquet(tmp_path / "data" / "dedup" / "table.parquet")
    assert len(dedup) == run["inputs"]

    # a build that fails inside the job: non-zero exit, the job's error in the streamed log
    assert cli.main(base + ["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 1
    cap = capsys.readouterr()
    assert "does not exist" in cap.out and "FAILED (exit 1)" in cap.err
    assert not (tmp_path / "bad").exists()

    # --no-wait: the job id, which `persona jobs status` / `logs` then report (a rerun: nothing to compute)
    assert cli.main(base + ["--params", str(params), "--until", "ingest", "--no-wait"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), job_id
    assert jobs.wait_for(jobs.client(cluster.dashboard), job_id, timeout_s=120) == "SUCCEEDED"
    assert cli.main(["jobs", "status", "--address", cluster.dashboard, job_id]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{job_id} SUCCEEDED")
    assert cli.main(["jobs", "logs", "--address", cluster.dashboard, job_id]) == 0
    assert f"computed=0 cached={run['inputs']}" in capsys.readouterr().out

    # `persona jobs stop` ends a running job
    assert cli.main(["jobs", "submit", "--address", cluster.dashboard, "--no-wait", "--",
                     sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(120)"]) == 0
    job_id = capsys.readouterr().out.strip()
    c = jobs.client(cluster.dashboard)
    t0 = time.monotonic()
    while jobs._status(c, job_id) != "RUNNING":
        assert time.monotonic() - t0 < 60, jobs._status(c, job_id)
        time.sleep(0.5)
    assert cli.main(["jobs", "stop", "--address", cluster.dashboard, job_id]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id} stop requested"
    assert jobs.wait_for(c, job_id, timeout_s=60) == "STOPPED"


def test_job_token_and_runtime_env(monkeypatch, tmp_path):
    """Token lookup order (env, token file, ~/.ray/auth_token; none when disabled) and the upload."""
    from pipeline import jobs

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs.auth_token() == "home-token"
    (tmp_path / "tok").write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.auth_token() == "env-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_token() is None

    renv = jobs.runtime_env(tmp_path, {"A": 1}, excludes=["big/"])
    assert renv["working_dir"] == str(tmp_path) and renv["env_vars"] == {"A": "1"}
    assert {"data", ".venv", ".git", "big/"} <= set(renv["excludes"])
    assert jobs.runtime_env(None, None) == {}


def test_worker_that_cannot_start_stops_the_run():
    """A factory that raises (a model that cannot load) fails loudly instead of N error rows."""
    from pipeline.config import RuntimeConfig
    from pipeline.runtime import map_batches

    items = [{"key": f"k{i}"} for i in range(6)]
    with pytest.raises(RuntimeError, match="worker failed to start"):
        list(map_batches(_BrokenFactory, items, 2, RuntimeConfig(progress=False, num_cpus=2)))


class _BrokenFactory:
    def __init__(self):
        raise OSError("model file missing")

    def __call__(self, batch):  # pragma: no cover
        return [[] for _ in batch]
