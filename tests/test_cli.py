import subprocess

import pandas as pd

from tests.conftest import PERSONA


def test_help_lists_commands():
    out = subprocess.run(PERSONA + ["--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("sample", "stage", "build", "stages"):
        assert cmd in out
    out = subprocess.run(PERSONA + ["build", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--source" in out and "--until" in out


def test_unknown_stage_is_clear_error(tmp_path):
    r = subprocess.run(PERSONA + ["stage", "nope", "--params", str(tmp_path / "none.yaml")], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown stage 'nope'" in r.stderr


def test_build_on_any_folder(tmp_path, sample_raw):
    out = tmp_path / "out"
    r = subprocess.run(
        PERSONA + ["build", "--source", str(sample_raw / "sample"), "--out", str(out), "--until", "dedup",
                   "--params", str(tmp_path / "defaults.yaml")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    t = pd.read_parquet(out / "dedup" / "table.parquet")
    assert len(t) == 7 and set(t["identity"]) == {"obama", "biden", "yao_ming", "grace_hopper", "eileen_collins"}
    assert (out / "metrics" / "ingest.json").exists()
    assert not (out / "align").exists()  # --until stops after dedup
