"""The team MLflow setup for real: infra/k8s/mlflow.yaml's server (PostgreSQL backend, basic-auth app,
artifacts served to an S3 API) on loopback (tests/team_server.py), one server for this file.

Training (the training RayJob's own `persona train` command), register -> promote -> refuse -> rollback
as the admin, `persona generate --adapter models:/persona-wplus@champion` as the read-only user, the
read-only user's refusals, unauthenticated requests, and no credential in logs, params or tags.
Clients hold no S3 credentials: every artifact travels through the server.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, S3_KEYS
from tests.team_server import alive, ensure_postgres, start_team_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "persona-wplus"
K8S = REPO / "infra" / "k8s"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def team(s3_server):
    bindir, why = ensure_postgres()
    if bindir is None:
        pytest.skip(f"PostgreSQL-backed team MLflow server NOT TESTED: {why}")
    ts = start_team_server(bindir, s3_server.endpoint, S3_KEYS, s3_server.new_bucket("persona-team-mlflow"))
    try:
        yield ts
    finally:
        pid = ts.pg.pid
        ts.stop()
        assert not ts.server.alive() and not alive(pid) and not ts.pg.root.exists()


def client_env(team, user: dict | None) -> dict[str, str]:
    """A client's environment: the server's URL and `user`'s credentials; no S3 or other MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["MLFLOW_TRACKING_URI"] = team.url
    if user:
        env.update(user)
    return env


@contextlib.contextmanager
def as_client(team, user: dict | None):
    """This process as a client of the team server (as `user`, or anonymous with None)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(client_env(team, user))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cli(*argv: str) -> tuple[int, str, str]:
    """`persona ARGV` in this process -> (exit code, stdout, stderr)."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def training_command(team, params: Path) -> list[str]:
    """The stage-1 training RayJob's `persona train` argv, pointed at this server and params file; the
    Ray Train options (GPU workers) dropped: here it trains in one CPU process."""
    from tests.test_infra import persona_commands

    (job,) = [d for d in yaml.safe_load_all((K8S / "rayjob-train-stage1.yaml").read_text()) if d]
    (argv,) = persona_commands(job["spec"]["entrypoint"])
    out, skip = [], 0
    for i, a in enumerate(argv[1:]):
        if skip:
            skip -= 1
            continue
        if a in ("--workers", "--cpus-per-worker", "--storage-path"):
            skip = 1
            continue
        if a == "--use-gpu":
            continue
        out.append(a.replace("http://mlflow:5000", team.url))
    assert any(a.startswith("train.mlflow.tracking_uri=" + team.url) for a in out), out
    i = out.index("--params")
    out[i + 1] = str(params)
    return [sys.executable, "-m", "pipeline.cli", *out, "--json"]


@pytest.fixture(scope="module")
def flow(team, tmp_path_factory):
    """As the admin: train an adapter (run and artifacts on the server), then register -> promote ->
    better -> promote -> worse (refused) -> rollback -> promote v2 again. Everything printed is kept."""
    import torch

    from tests.test_generate import make_tiny_adapter
    from tests.test_registry import evaluation
    from tests.test_training import make_params

    tmp = tmp_path_factory.mktemp("team")
    params = tmp / "params.yaml"
    p = make_params(tmp, mlflow=True, stage1={"max_steps": 2, "checkpoint_every": 2})
    p["registry"] = {"model_name": NAME, "out": str(tmp / "register.json")}
    params.write_text(yaml.safe_dump(p))
    rec: dict = {"tmp": tmp, "params": str(params), "outputs": []}

    cmd = training_command(team, params)
    r = subprocess.run(cmd, cwd=tmp, env={**client_env(team, team.admin), "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=600)
    rec["outputs"].append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rec["train"] = json.loads(r.stdout[r.stdout.index("{"):])
    trained = Path(rec["train"]["adapter"]).parent
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        better = make_tiny_adapter(tmp / "better", steps=2, seed=1)
        worse = make_tiny_adapter(tmp / "worse", steps=2, seed=2)
    finally:
        torch.set_num_threads(old)
    rec["adapters"] = {"trained": trained, "better": better, "worse": worse}

    def step(key: str, *argv: str) -> None:
        rc, out, err = cli(*argv, "--params", str(params))
        rec[key] = (rc, out, err)
        rec["outputs"].append(out + err)
        if argv[1] == "register" and rc == 0:
            rec[key + ".json"] = json.loads((tmp / "register.json").read_text())

    def register(key: str, ad: Path, ident: float) -> None:
        (tmp / f"{key}-eval.json").write_text(json.dumps(evaluation(ad, ident)))
        step(key, "registry", "register", "--adapter", str(ad), "--metrics", str(tmp / f"{key}-eval.json"))

    with as_client(team, team.admin):
        register("reg1", trained, 0.30)
        step("promote1", "registry", "promote")
        register("reg2", better, 0.45)
        step("promote2", "registry", "promote")
        register("reg3", worse, 0.10)
        step("promote3", "registry", "promote")
        step("rollback", "registry", "rollback")
        step("promote4", "registry", "promote", "--version", "2")  # champion v2 again, v1 in the history
    return rec


# ------------------------------------------------------------------------------------ tests
def test_skips_only_without_binaries_and_apt_get(monkeypatch, tmp_path):
    """Where PostgreSQL is missing: root with apt-get installs it (not exercised here); no apt-get, or
    apt-get without root, gives the plain reason the fixture skips with."""
    import shutil

    from tests import team_server

    monkeypatch.setattr(team_server, "PG_BIN_GLOB", str(tmp_path / "none" / "*" / "bin"))
    monkeypatch.delenv("PERSONA_PG_BIN", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert team_server.ensure_postgres() == (
        None, "no PostgreSQL server binaries (initdb, pg_ctl) on this machine and no apt-get to install them")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    found, why = team_server.ensure_postgres()
    assert found is None and "apt-get needs root" in why
    fake = tmp_path / "pg" / "bin"
    fake.mkdir(parents=True)
    for b in ("initdb", "pg_ctl", "postgres", "psql"):
        (fake / b).write_text("")
    monkeypatch.setenv("PERSONA_PG_BIN", str(fake))
    assert team_server.ensure_postgres() == (fake, "")


def test_first_start_migrates_both_databases(team):
    """`mlflow db upgrade` (the init container) made the tracking schema on the empty database (the
    server checks it is at the head revision before it serves), and the auth app made its user store
    in `mlflow_auth` with the admin from the Secret and the users Job's read-only user."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    assert team.pg.query("SELECT version_num FROM alembic_version", "mlflow") == [(_get_latest_schema_revision(),)]
    assert any("Creating initial MLflow database tables" in o for o in team.outputs)
    users = dict(team.pg.query("SELECT username, is_admin FROM users", "mlflow_auth"))
    assert users == {team.admin["MLFLOW_TRACKING_USERNAME"]: True, team.reader["MLFLOW_TRACKING_USERNAME"]: False}
    assert team.pg.query("SELECT count(*) FROM alembic_version_auth", "mlflow_auth") == [(1,)]
    tables = {t for (t,) in team.pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", "mlflow")}
    assert {"experiments", "runs", "registered_models", "model_versions"} <= tables and "users" not in tables


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_unauthenticated_requests_are_refused(team):
    api = f"{team.url}/api/2.0/mlflow/experiments/search?max_results=1"
    arts = f"{team.url}/api/2.0/mlflow-artifacts/artifacts?path=1"
    a, r = team.admin, team.reader
    assert _get(f"{team.url}/health") == 200  # the probe only
    assert _get(api) == 401 and _get(arts) == 401
    assert _get(api, r["MLFLOW_TRACKING_USERNAME"], "wrong-password-123") == 401
    assert _get(api, a["MLFLOW_TRACKING_USERNAME"], r["MLFLOW_TRACKING_PASSWORD"]) == 401
    assert _get(api, r["MLFLOW_TRACKING_USERNAME"], r["MLFLOW_TRACKING_PASSWORD"]) == 200
    assert _get(api, a["MLFLOW_TRACKING_USERNAME"], a["MLFLOW_TRACKING_PASSWORD"]) == 200

    with as_client(team, None):  # the CLI says what to set, in one line
        rc, out, err = cli("registry", "list", "--name", NAME)
    assert rc == 1 and "Traceback" not in err
    assert "requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err.splitlines()[0]
    with as_client(team, {**r, "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"}):
        rc, out, err = cli("registry", "list", "--name", NAME)
    assert rc == 1 and "rejected the credentials of user 'persona-reader'" in err.splitlines()[0]
    assert "wrong-password-123" not in err


def test_register_promote_refuse_rollback_as_admin(team, flow):
    trained = flow["train"]
    assert trained["tracking_uri"] == team.url and trained["run_id"]
    r1, r2, r3 = flow["reg1.json"], flow["reg2.json"], flow["reg3.json"]
    assert [r["version"] for r in (r1, r2, r3)] == ["1", "2", "3"]
    assert r1["reused_training_run"] is True and r1["run_id"] == trained["run_id"]  # the training run, on the server
    assert all(r["source"] == f"models:/{r['model_id']}" for r in (r1, r2, r3))  # versions of MLflow models
    assert flow["promote1"][0] == 0 and "first champion" in flow["promote1"][1]
    assert flow["promote2"][0] == 0 and "persona-wplus@champion -> version 2" in flow["promote2"][1]
    rc, out, err = flow["promote3"]
    assert rc == 1 and "REFUSED" in err and "0.1000" in err and "0.4500" in err and "worse" in err
    assert flow["rollback"][0] == 0 and "version 2 -> 1" in flow["rollback"][1]
    assert flow["promote4"][0] == 0 and "persona-wplus@champion -> version 2" in flow["promote4"][1]

    # the artifacts are objects in the S3 bucket behind the server (training run and registrations)
    keys = _bucket_keys(team)
    # the trained adapter's MLflow model (logged by training, registered as v1) and one model per other adapter
    assert r1["model_id"] == trained["model_id"] and r2["model_id"] != r1["model_id"] != r3["model_id"]
    assert any(k.endswith("adapter/adapter.safetensors") and trained["model_id"] in k for k in keys), keys
    assert sum(k.endswith("adapter/adapter.safetensors") for k in keys) == 3

    from training.registry import Registry, RegistryConfig

    with as_client(team, team.admin):
        reg = Registry(RegistryConfig(model_name=NAME))
        assert reg.show(NAME)["version"] == "2" and reg.show(NAME, "candidate")["version"] == "3"
        assert reg.show(NAME)["champion_history"] == ["1"]
        for r in (r1, r2, r3):  # served artifacts
            assert reg.client.get_logged_model(r["model_id"]).artifact_location.startswith("mlflow-artifacts:/")
        assert reg.show(NAME, "1")["metrics"]["identity_similarity"] == 0.30  # a metric of the model


def _bucket_keys(team) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=team.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=team.bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_read_only_user_lists_and_downloads_but_cannot_change(team, flow, tmp_path):
    from pipeline.digests import sha256_file
    from training.registry import Registry, RegistryAccessError, RegistryConfig

    from tests.test_registry import evaluation

    params = flow["params"]
    with as_client(team, team.reader):
        rc, out, err = cli("registry", "list", "--name", NAME, "--params", params)
        assert rc == 0 and "v  2 champion" in out and "v  3 candidate" in out

        # generation from the champion: the adapter comes down through the server (no S3 keys here)
        np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((18, 512)).astype(np.float32))
        rc, out, err = cli("generate", "--adapter", f"models:/{NAME}@champion", "--input", f"wplus={tmp_path / 'w.npy'}",
                           "--prompt", "a face", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "gen"),
                           "--params", params)
        assert rc == 0, err
        rec = json.loads(next((tmp_path / "gen").glob("*.json")).read_text())
        assert rec["adapter"]["uri"] == f"models:/{NAME}/2" and rec["adapter"]["registry"]["tracking_uri"] == team.url
        assert rec["adapter"]["sha256"] == sha256_file(flow["adapters"]["better"] / "adapter.safetensors")
        flow["outputs"].append(out + err + json.dumps(rec))

        # ... but registers, promotes, rolls back nothing: one clear line each, no traceback
        ad = flow["adapters"]["worse"]
        (tmp_path / "e.json").write_text(json.dumps(evaluation(ad, 0.99)))
        attempts = [("registry", "register", "--adapter", str(ad), "--metrics", str(tmp_path / "e.json"),
                     "--out", str(tmp_path / "r.json")),
                    ("registry", "promote", "--version", "3", "--force"),
                    ("registry", "rollback")]
        for argv in attempts:
            rc, out, err = cli(*argv, "--params", params)
            flow["outputs"].append(out + err)
            assert rc == 1, (argv, out, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
            line = err.strip().splitlines()[0]
            assert "user 'persona-reader' may not" in line and "403 permission denied" in line, line
        reg = Registry(RegistryConfig(model_name=NAME))
        with pytest.raises(RegistryAccessError, match=r"may not set_registered_model_alias\('persona-wplus', 'champion'\)"):
            reg.client.set_registered_model_alias(NAME, "champion", "3")
        assert reg.show(NAME)["version"] == "2" and len(reg.list(NAME)) == 3  # nothing moved, nothing added
        assert reg.show(NAME)["champion_history"] == ["1"]
        assert not (tmp_path / "r.json").exists()


def test_credentials_never_appear_in_logs_params_or_tags(team, flow):
    from mlflow import MlflowClient

    secret_values = team.secret_values()
    tokens = [base64.b64encode(f"{u['MLFLOW_TRACKING_USERNAME']}:{u['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
              for u in (team.admin, team.reader)]
    texts = {"server log": team.server_log(), "init steps": "\n".join(team.outputs),
             "client output": "\n".join(flow["outputs"])}
    texts["postgres log"] = team.pg.log.read_text(errors="replace") if team.pg.log.exists() else ""
    for f in flow["tmp"].rglob("*"):  # params, adapter.json, register.json, metrics, generation records
        if f.is_file() and f.suffix in (".json", ".yaml", ".csv", ".txt", ".log"):
            texts[str(f)] = f.read_text(errors="replace")
    with as_client(team, team.admin):
        client = MlflowClient()
        exps = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in exps], max_results=1000)
        assert len(runs) >= 3  # the training run and two registration runs
        for run in runs:
            texts[f"run {run.info.run_id}"] = json.dumps({"params": run.data.params, "tags": run.data.tags})
        for mv in client.search_model_versions(f"name='{NAME}'"):
            texts[f"{NAME} v{mv.version}"] = json.dumps({"tags": mv.tags, "description": mv.description})
        texts[NAME] = json.dumps(client.get_registered_model(NAME).tags)
    assert "MLFLOW_TRACKING_PASSWORD" not in texts[f"run {flow['train']['run_id']}"]
    assert len(texts["server log"]) > 1000 and "users/create" in texts["server log"]  # the log is the real one
    for where, text in texts.items():
        for s in secret_values + tokens:
            assert s not in text, f"a credential appears in {where}"
