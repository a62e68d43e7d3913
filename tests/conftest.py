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

    out = tmp_path_factory.mktemp("raw")
    try:
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
