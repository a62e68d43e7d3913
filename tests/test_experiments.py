"""DVC experiments for real: README's "Experiments" commands, as written, in a small git + DVC project
holding the repository's training stages (dvc.yaml `vars` + `train`) on prebuilt tiny shards and the
tiny profile, run with `.venv/bin/dvc` and no venv on PATH; the changed param's metric read back."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.shards import encoded_members, synthetic_samples, write_tar
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def readme_commands(section: str = "## Experiments") -> list[str]:
    """The lines of the first bash block of README's `section`."""
    text = (REPO / "README.md").read_text()
    part = text[text.index(section):]
    block = part[part.index("```bash") + len("```bash"):]
    return [ln.strip() for ln in block[:block.index("```")].strip().splitlines() if ln.strip()]


def make_project(root: Path) -> tuple[Path, dict]:
    """git + DVC project: the code, the training stages of dvc.yaml, tiny params, prebuilt shards."""
    proj = root / "proj"
    proj.mkdir()
    for d in ("pipeline", "stages", "training"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", ".gitignore"):
        shutil.copy(REPO / f, proj / f)
    (proj / ".venv").symlink_to(Path(sys.prefix))  # the project's venv, as `make` creates it
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"vars": dvc["vars"], "stages": {"train": dvc["stages"]["train"]}},
                                                  sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    t = params["train"]
    t.update(num_workers=0, threads=1, sampling={**t["sampling"], "num_faces": 2, "steps": 2})
    t["mlflow"]["enabled"] = False
    small = {"batch_size": 2, "log_every": 1, "checkpoint_every": 2, "sample_every": 0}
    t["methods"]["wplus"]["stage1"].update(max_steps=4, **small)
    t["methods"]["wplus"]["stage2"].update(max_steps=3, **small)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shards = proj / "data" / "shards"
    samples = synthetic_samples(10, identities=5, seed=3, size=96, encoded=True)
    write_tar(shards / "train" / "train-000000.tar", (encoded_members(s) for s in samples[:8]))
    write_tar(shards / "val" / "val-000000.tar", (encoded_members(s) for s in samples[8:]))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(root), "PYTHONPATH": str(proj), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "DVC_NO_ANALYTICS": "1"}
    assert shutil.which("persona", path=env["PATH"]) is None  # not activated: no persona on PATH
    return proj, env


def sh(proj: Path, env: dict, cmd: str, timeout: int = 900) -> str:
    r = subprocess.run(cmd, shell=True, cwd=proj, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_readme_experiment_commands_on_the_tiny_profile(tmp_path):
    cmds = readme_commands()
    assert any(c.startswith(".venv/bin/dvc exp run -S ") for c in cmds), cmds
    proj, env = make_project(tmp_path)
    sh(proj, env, "git init -q && .venv/bin/dvc init -q && git add -A && git commit -q -m code")
    out = sh(proj, env, ".venv/bin/dvc repro")  # no activation: the stages find .venv/bin themselves
    assert "Running stage 'train@wplus-stage2'" in out
    base = json.loads((proj / "metrics" / "train_wplus_stage2.json").read_text())

    outputs = {c: sh(proj, env, c) for c in cmds}  # the README's commands, as written

    (key, value), = re.findall(r"-S (\S+)=(\S+)", next(c for c in cmds if " exp run " in c))
    # the experiment's params and metrics, read back from DVC
    exps = json.loads(sh(proj, env, ".venv/bin/dvc exp show --json"))
    runs = [e for b in exps for e in (b.get("experiments") or []) for e in e.get("revs", [])]
    assert len(runs) == 1
    data = runs[0]["data"]
    node = data["params"]["params.yaml"]["data"]
    for k in key.split("."):
        node = node[k]
    assert float(node) == float(value)
    got = data["metrics"]["metrics/train_wplus_stage2.json"]["data"]
    assert got["loss"] != base["loss"] and got["global_step"] == base["global_step"] == 3
    assert all(isinstance(v, (int, float)) for v in got.values())  # numbers only
    # `dvc metrics diff`: numeric deltas against HEAD, not "-"
    diff = json.loads(sh(proj, env, ".venv/bin/dvc metrics diff --json"))["metrics/train_wplus_stage2.json"]
    assert diff["loss"]["old"] == base["loss"] and diff["loss"]["diff"] == pytest.approx(got["loss"] - base["loss"])
    text = outputs[next(c for c in cmds if "metrics diff" in c)]
    assert "metrics/train_wplus_stage2.json" in text and "loss_rec" in text
    # `dvc exp show --only-changed`: a short table with the changed param and the changed metrics
    table = next(v for c, v in outputs.items() if "exp show" in c)
    assert key.split(".")[-1] in table or key in table
    header = next(csv.reader(io.StringIO(sh(proj, env, ".venv/bin/dvc exp show --only-changed --csv"))))
    assert key in header and "loss" in " ".join(header) and len(header) < 80, header
    # `dvc plots diff`: every loss term of the phase, for both revisions
    assert (proj / "dvc_plots" / "index.html").is_file()
    html = (proj / "dvc_plots" / "index.html").read_text()
    for series in ("loss_rec.csv", "loss_dis.csv", "loss_reg.csv", "lr.csv"):
        assert series in html, series
    assert "workspace" in html
    # the baseline commit holds the metrics and plot CSVs (git), not the images (DVC cache)
    tracked = sh(proj, env, "git ls-files metrics plots").split()
    assert "metrics/train_wplus_stage2.json" in tracked and "plots/train_wplus_stage2/loss_dis.csv" in tracked
    assert "plots/train_wplus_stage2_samples.png" not in tracked
