"""Shared fixtures: the real sample photos (fetched once per machine), params builders, Ray."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "tests" / ".cache"
PERSONA = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """data/raw-style folder with the bundled sample (sample/<identity>/..., unlabeled/...)."""
    from stages import sample

    from filelock import FileLock

    out = tmp_path_factory.mktemp("raw")
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(CACHE / ".download.lock")):  # parallel test workers share the download
            sample.run(out, CACHE)
    except RuntimeError as e:  # pragma: no cover - registry unreachable
        pytest.skip(f"sample photos unavailable: {e}")
    return out


@pytest.fixture
def raw_copy(sample_raw, tmp_path) -> Path:
    """A private, writable copy of the sample raw folder."""
    dst = tmp_path / "raw"
    shutil.copytree(sample_raw, dst)
    return dst


def make_params(raw: Path, executor: str = "local", **sections):
    """Params for a raw folder laid out like data/raw, overriding sections with dicts."""
    from pipeline.config import params_from_dict

    d = {
        "runtime": {"executor": executor, "progress": False, "part_size": 4},
        "ingest": {
            "sources": [
                {"name": "sample", "path": str(raw / "sample")},
                {"name": "unlabeled", "path": str(raw / "unlabeled"), "labeled": False},
            ]
        },
    }
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return params_from_dict(d)


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# ---------------------------------------------------------------------------------------- S3

S3_KEYS = {"AWS_ACCESS_KEY_ID": "persona-test", "AWS_SECRET_ACCESS_KEY": "persona-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


_BUCKETS = __import__("itertools").count()


class S3Server:
    """A real S3 API server (moto) in its own process on loopback; `env` points botocore at it."""

    def __init__(self, port: int, proc):
        self.port, self.proc = port, proc
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, **S3_KEYS}

    def new_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in S3_KEYS.items()
                                                            if k != "AWS_DEFAULT_REGION"},
                     region_name=S3_KEYS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    import socket
    import subprocess
    import time
    import urllib.request

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "w")
    code = ("import logging, sys, time\n"
            "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
            "from moto.server import ThreadedMotoServer\n"
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
            "while True: time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"moto S3 server did not start (see {log.name})")
            time.sleep(0.3)
    yield S3Server(port, proc)
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """This test's own bucket on the S3 server, with the AWS_* environment pointing at it."""
    import re

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PERSONA_STORAGE_OPTIONS", raising=False)
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:48].strip("-")
    bucket = s3_server.new_bucket(f"t{next(_BUCKETS):03d}-{name}".rstrip("-"))
    return f"s3://{bucket}"


# ---------------------------------------------------------------------------------------- xdist

# `make test` runs two workers (`-n 2 --dist loadfile`): each file stays whole on one worker (its
# module fixtures, such as a two-node Ray cluster, are built once per file), and the longest files
# are handed out first so that none of them starts last and runs alone at the end.
LONGEST_FIRST = ("test_resume_and_dvc", "test_train_cluster", "test_cluster", "test_personalize_cluster",
                 "test_incremental", "test_training",
                 "test_storage", "test_team_mlflow", "test_crash_consistency")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        stem = Path(str(item.fspath)).stem
        return LONGEST_FIRST.index(stem) if stem in LONGEST_FIRST else len(LONGEST_FIRST)

    items[:] = [it for _, _, it in sorted((rank(it), i, it) for i, it in enumerate(items))]


@pytest.fixture(autouse=True)
def _restore_mlflow_env():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI: keep one test's store out of the next
    (in-process training followed by evaluate in the same worker)."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)
