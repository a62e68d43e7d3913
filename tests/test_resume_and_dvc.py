"""Crash safety and incrementality, for real: SIGKILL mid-stage, and `dvc repro` on the sample."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import CACHE, PERSONA, REPO

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def _synthetic_raw(sample_raw: Path, out: Path, n: int) -> Path:
    """n distinct photos derived from the sample: crops, flips, scales (deterministic)."""
    rng = np.random.default_rng(0)
    photos = sorted((sample_raw / "sample").rglob("*.jp*g"))
    for i in range(n):
        src = photos[i % len(photos)]
        im = Image.open(src).convert("RGB")
        w, h = im.size
        x0, y0 = int(rng.integers(0, w // 5)), int(rng.integers(0, h // 5))
        im = im.crop((x0, y0, w - int(rng.integers(0, w // 5)), h - int(rng.integers(0, h // 5))))
        if i % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        s = 0.6 + 0.8 * rng.random()
        im = im.resize((max(80, int(im.width * s)), max(80, int(im.height * s))))
        d = out / "sample" / f"person{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img{i:04d}.jpg", quality=90)
    (out / "unlabeled").mkdir(exist_ok=True)
    return out


def _params_file(tmp: Path, raw: Path) -> Path:
    p = tmp / "params.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "runtime": {"executor": "ray", "part_size": 4, "progress": False},
                "ingest": {
                    "batch_size": 2,
                    "sources": [
                        {"name": "sample", "path": str(raw / "sample")},
                        {"name": "unlabeled", "path": str(raw / "unlabeled"), "labeled": False},
                    ],
                },
            }
        )
    )
    return p


def _stage(params: Path, root: Path, metrics: Path, name: str = "ingest", **kw) -> subprocess.Popen:
    cmd = PERSONA + ["stage", name, "--params", str(params), "--root", str(root), "--metrics-dir", str(metrics)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_is_byte_identical(tmp_path, sample_raw):
    raw = _synthetic_raw(sample_raw, tmp_path / "raw", 160)
    params = _params_file(tmp_path, raw)

    # uninterrupted reference run
    ref = _stage(params, tmp_path / "ref", tmp_path / "ref_metrics")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    # a run killed with SIGKILL (whole process group: driver, raylet, workers) once parts exist
    victim = _stage(params, tmp_path / "run", tmp_path / "run_metrics", start_new_session=True)
    parts = tmp_path / "run" / "ingest" / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert 3 <= n_parts < 40, f"kill landed outside the run ({n_parts} parts)"
    assert not (tmp_path / "run" / "ingest" / "table.parquet").exists()

    resumed = _stage(params, tmp_path / "run", tmp_path / "run_metrics")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    stats = json.loads((tmp_path / "run" / "runs" / "ingest.json").read_text())
    assert 0 < stats["computed"] < 160 and stats["cached"] + stats["computed"] == 160

    a = (tmp_path / "ref" / "ingest" / "table.parquet").read_bytes()
    b = (tmp_path / "run" / "ingest" / "table.parquet").read_bytes()
    assert a == b, "resumed output differs from an uninterrupted run"
    assert (tmp_path / "ref_metrics" / "ingest.json").read_bytes() == (tmp_path / "run_metrics" / "ingest.json").read_bytes()
    t = pd.read_parquet(tmp_path / "run" / "ingest" / "table.parquet")
    assert len(t) == 160 and t["key"].is_unique
    # the journal itself holds no input twice
    journal = pd.concat(pd.read_parquet(p) for p in sorted(parts.glob("part-*.parquet")))
    assert journal["cache_key"].is_unique


def _dvc_project(tmp: Path, sample_raw: Path) -> Path:
    proj = tmp / "proj"
    proj.mkdir()
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    # the repo's params, lighter where it only costs time: the labeled photos (the group photos' 18
    # faces are covered by tests/test_face_stages.py) and e4e at 128 px
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = [s for s in params["ingest"]["sources"] if s.get("labeled", True)]
    params["wplus"]["input_size"] = 128
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for d in ("pipeline", "stages", "training"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(sample_raw, proj / "data" / "raw")
    (proj / "data" / "cache").mkdir()
    for f in CACHE.glob("*.tar.gz"):
        shutil.copy(f, proj / "data" / "cache" / f.name)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, env=ENV, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=proj, env=ENV, check=True)
    return proj


def _report(proj: Path, stage: str) -> Path:
    return proj / "data" / "runs" / f"{stage}.json"


def _item_stages(proj: Path) -> list[str]:
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    return [s for s in stages if s not in ("sample", "shards") and _report(proj, s).exists()]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the data DAG, then every method trained, evaluated and registered
def test_dvc_repro_noop_then_one_new_photo_costs_one_item(tmp_path, sample_raw):
    proj = _dvc_project(tmp_path, sample_raw)
    r = subprocess.run(["dvc", "repro", "shards"], cwd=proj, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    stages = _item_stages(proj)
    assert {"ingest", "dedup", "align", "masks", "caption", "wplus", "identity"} <= set(stages)
    _check_sample_shards(proj / "data" / "shards")
    stamps = {s: _report(proj, s).stat().st_mtime_ns for s in stages}

    r = subprocess.run(["dvc", "repro", "shards"], cwd=proj, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage" not in r.stdout, r.stdout
    assert all(_report(proj, s).stat().st_mtime_ns == stamps[s] for s in stages)

    # a forced rerun that computes nothing leaves its outputs' hashes as they were: nothing downstream runs
    r = subprocess.run(["dvc", "repro", "-f", "-s", "align"], cwd=proj, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Running stage 'align'" in r.stdout, r.stdout + r.stderr
    assert _report(proj, "align").stat().st_mtime_ns != stamps["align"]
    r = subprocess.run(["dvc", "repro", "shards"], cwd=proj, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Running stage" not in r.stdout, r.stdout

    new = proj / "data" / "raw" / "sample" / "obama" / "obama_mirrored.jpg"
    Image.open(proj / "data/raw/sample/obama/obama2.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new, quality=92)
    r = subprocess.run(["dvc", "repro", "shards"], cwd=proj, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in stages + ["shards"]:
        run = json.loads(_report(proj, s).read_text())
        assert run["computed"] == 1, (s, run)
    index = json.loads((proj / "data" / "shards" / "index.json").read_text())
    assert index["identities"]["obama"]["faces"] == 4
    _full_repro_checks(proj)


def _check_sample_shards(shards: Path) -> None:
    """The real sample in real shards: ArcFace separates Obama from Biden; the reader streams them."""
    import torch

    from pipeline.shard_reader import make_dataset

    samples = []
    for split in ("train", "val"):
        samples += list(make_dataset(shards, split))
    emb = {}
    for smp in samples:
        meta = smp["json"]
        assert smp["wplus.npy"].shape == (18, 512) and smp["wplus.npy"].dtype == np.float16
        assert smp["id.npy"].shape == (512,) and smp["id.npy"].dtype == np.float32
        assert smp["face.jpg"].shape == (512, 512, 3)
        if meta.get("identity") in ("obama", "biden"):
            emb.setdefault(meta["identity"], []).append(smp["id.npy"])
    obama, biden = emb["obama"], emb["biden"]
    assert len(obama) == 3 and len(biden) == 1
    for i in range(3):
        for j in range(i + 1, 3):
            assert float(obama[i] @ obama[j]) > 0.5
        assert float(obama[i] @ biden[0]) < 0.3
    loader = torch.utils.data.DataLoader(make_dataset(shards, "train"), batch_size=None, num_workers=2)
    keys = [smp["__key__"] for smp in loader]
    n_train = sum(1 for smp in samples if smp["json"]["split"] == "train")
    assert len(keys) == len(set(keys)) == n_train > 0


def _full_repro_checks(proj: Path) -> None:
    """`dvc repro` end to end: training stages, evaluation and a registered candidate."""
    r = subprocess.run(["dvc", "repro"], cwd=proj, env=ENV, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for phase in ("stage1", "stage2"):  # train@wplus-<phase>: the runs listed in params train.runs
        meta = json.loads((proj / "models" / "wplus" / phase / "adapter.json").read_text())
        assert meta["phase"] == phase and (proj / "models" / "wplus" / phase / "adapter.safetensors").exists()
        assert meta["lineage"]["shards_hash"] not in ("", "none", None)
    assert json.loads((proj / "eval" / "wplus" / "report.json").read_text())["method"] == "wplus"
    metrics = json.loads((proj / "metrics" / "evaluate_wplus.json").read_text())
    assert "face_detection_rate" in metrics and all(isinstance(v, (int, float)) for v in metrics.values())
    reg = json.loads((proj / "eval" / "wplus" / "register.json").read_text())
    assert reg["name"] == "persona-wplus" and reg["source"] == f"models:/{reg['model_id']}"  # an MLflow model
    # the training run's dataset input is the shards, with the md5 DVC recorded for them
    from mlflow import MlflowClient

    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["shards"]["outs"] if o["path"] == "data/shards")
    meta = json.loads((proj / "models" / "wplus" / "stage2" / "adapter.json").read_text())
    run = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}").get_run(meta["mlflow"]["run_id"])
    # (its evaluation logs the evaluation set to the same run as a second input, context "evaluation")
    (ds,) = [d for d in run.inputs.dataset_inputs if d.dataset.name == "shards"]
    assert ds.dataset.name == "shards" and ds.dataset.digest == md5 == meta["lineage"]["shards_hash"]
    assert json.loads(ds.dataset.source)["uri"] == str((proj / "data" / "shards").resolve())
    # Hybrid guidance: trained, evaluated, registered, and its multi-person generation in plots/
    assert json.loads((proj / "eval" / "hybrid_guidance" / "register.json").read_text())["name"] == "persona-hybrid_guidance"
    group = json.loads((proj / "plots" / "hybrid_guidance_group" / "group-p00-seed0.json").read_text())
    assert group["method"] == "hybrid_guidance" and len(group["content"]["assignment"]) == 3
    assert (proj / "plots" / "hybrid_guidance_group" / "group-p00-seed0.png").is_file()
    # compare: every method's registered candidate on one evaluation set, all tagged weights_real false
    rep = json.loads((proj / "eval" / "compare" / "report.json").read_text())
    evaluated = yaml.safe_load((proj / "params.yaml").read_text())["evaluate"]["adapters"]
    assert set(evaluated) <= set(rep["methods"]) and rep["eval_set"]["same"]
    for m in evaluated:
        e = rep["methods"][m]
        assert e["eval_set"] == rep["eval_set"]["id"] and e["source"]["alias"] == "candidate", (m, e.get("source"))
        assert e["metrics"]["clip_t"]["value"] is None and e["metrics"]["clip_t"]["missing"]
    assert rep["weights_real"] is False and "weights_real: false" in (proj / "eval" / "compare.md").read_text()
    nums = json.loads((proj / "metrics" / "compare.json").read_text())
    assert nums["weights_real"] == 0 and set(evaluated) <= set(nums)
    assert (proj / "plots" / "compare_tradeoff.png").is_file() and (proj / "plots" / "compare_grid.png").is_file()
    (cmp_run,) = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}").search_runs(
        [MlflowClient(f"sqlite:///{proj / 'mlruns.db'}").get_experiment_by_name("persona-compare").experiment_id])
    assert cmp_run.data.tags["weights_real"] == "false" and cmp_run.data.tags["eval.set"] == rep["eval_set"]["id"]
