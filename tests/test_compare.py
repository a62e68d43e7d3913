"""`persona compare` end to end on tiny trained adapters of every registered method: one evaluation set,
champion over candidate, folder fallback with its reason, missing metrics with reasons, the files,
the MLflow comparison run; and the DVC stage's deps."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.models import expression as E
from pipeline.shards import encoded_members, synthetic_samples, write_tar
from tests.conftest import PERSONA, REPO
from tests.test_generate import make_tiny_adapter

FIVE = ("face2diffusion", "hybrid_guidance", "identity_encoder", "pidiff", "wplus")
CLIP_DIM = 16  # the tiny random clip_image model's width (train.methods.hybrid_guidance.conditioner.clip_dim)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_all_member_shards(root: Path, seed: int = 5) -> Path:
    """4 identities x 3 faces (64 px) with every member the five methods read (wplus, id, clip, expr):
    synthetic_000/001 in train, synthetic_002/003 in val."""
    rng = np.random.default_rng(seed)
    rows = {"train": [], "val": []}
    for s in synthetic_samples(12, identities=4, seed=seed, size=64, encoded=True):
        meta = json.loads(s["json"])
        meta["models"]["expression"] = {"name": f"mediapipe-{E.VERSION}", "fingerprint": "x", "weights_real": True}
        members = [m for m in encoded_members({**s, "json": json.dumps(meta).encode()}) if not m[0].endswith(".json")]
        members += [(f"{s['__key__']}.clip.npy", _npy(rng.standard_normal(CLIP_DIM).astype(np.float32))),
                    (f"{s['__key__']}.expr.npy", _npy((0.5 + 0.1 * rng.standard_normal(E.DIM)).astype(np.float32))),
                    (f"{s['__key__']}.json", json.dumps(meta).encode())]
        rows["val" if meta["identity"] in ("synthetic_002", "synthetic_003") else "train"].append(members)
    for split, r in rows.items():
        write_tar(root / split / f"{split}-000000.tar", iter(r))
    return root


def train_params(tmp: Path, shards: Path) -> dict:
    small = {"max_steps": 1, "batch_size": 2, "log_every": 1, "checkpoint_every": 1, "sample_every": 0}
    return {"train": {
        "shards": str(shards), "synthetic": 0, "num_workers": 0, "threads": 1, "resolution": 64,
        "out_dir": str(tmp / "models"), "checkpoints_dir": str(tmp / "checkpoints"), "metrics_dir": str(tmp / "metrics"),
        "plots_dir": str(tmp / "plots"), "mlflow": {"enabled": False}, "sampling": {"num_faces": 1, "steps": 1},
        "methods": {
            "wplus": {"stage1": small, "stage2": small},
            "face2diffusion": {"main": small},
            "hybrid_guidance": {"conditioner": {"clip_dim": CLIP_DIM}, "main": small},
            "identity_encoder": {"main": {**small, "batch_size": 4, "identities": 1, "per_identity": 2}},
            "pidiff": {"personalize": {**small, "min_photos": 2, "holdout": 1}},
        }}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny adapters of every method (one training step each), two W+ versions in a registry (champion
    v1, candidate v2), the Identity Encoder as candidate only, the rest only in evaluate.adapters."""
    from training.registry import Registry, RegistryConfig
    from training.train import train

    tmp = tmp_path_factory.mktemp("compare")
    shards = write_all_member_shards(tmp / "shards")
    tp = train_params(tmp, shards)
    adapters = {}
    for m, phases in (("face2diffusion", ["main"]), ("hybrid_guidance", ["main"]), ("identity_encoder", ["main"])):
        for ph in phases:
            adapters[m] = str(Path(train(tp, m, ph)["adapter"]).parent)
    adapters["pidiff"] = str(Path(train(tp, "pidiff", "personalize",
                                        overrides={"pidiff.personalize.identity": "synthetic_000"})["adapter"]).parent)
    champion = make_tiny_adapter(tmp / "wplus_v1", seed=1)
    candidate = make_tiny_adapter(tmp / "wplus_v2", seed=2)
    adapters["wplus"] = str(candidate)  # what evaluate.adapters names; the registry's champion must win over it
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    reg = Registry(RegistryConfig(tracking_uri=uri, artifact_location=str(tmp / "mlartifacts")))
    v1 = reg.register(champion)
    reg.promote(method="wplus", force=True)
    v2 = reg.register(candidate)
    ie = reg.register(adapters["identity_encoder"])
    assert (v1["version"], v2["version"], ie["alias"]) == ("1", "2", "candidate")
    out = tmp / "out"
    params = {
        **tp,
        "evaluate": {"adapters": adapters, "shards": str(shards), "split": "val", "max_identities": 2,
                     "faces_per_identity": 1, "prompts": ["a photo of a face", "a face at night"], "num_images": 1,
                     "steps": 2, "device": "cpu", "batch_size": 4, "control": {"max_faces_per_identity": 2}},
        "registry": {"tracking_uri": uri, "artifact_location": str(tmp / "mlartifacts")},
        "compare": {"scales": [0.0, 1.0], "steps": 2, "metrics_out": str(out / "metrics" / "compare.json"),
                    "report_out": str(out / "eval" / "compare" / "report.json"), "table_out": str(out / "eval" / "compare.md"),
                    "tradeoff_out": str(out / "plots" / "compare_tradeoff.png"), "grid_out": str(out / "plots" / "compare_grid.png"),
                    "work_dir": str(out / "eval" / "compare"),
                    "mlflow": {"artifact_location": str(tmp / "mlartifacts")}},
    }
    pfile = tmp / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    return {"tmp": tmp, "params": pfile, "out": out, "uri": uri, "champion_sha": v1["tags"]["adapter_sha256"],
            "candidate_sha": v2["tags"]["adapter_sha256"]}


def _numbers_only(d) -> bool:
    return all(_numbers_only(v) if isinstance(v, dict) else isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in d.values())


@pytest.mark.slow
def test_persona_compare_scores_every_method_on_one_evaluation_set(project):
    from mlflow import MlflowClient
    from PIL import Image

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    r = subprocess.run(PERSONA + ["compare", "--params", str(project["params"])], cwd=project["tmp"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = project["out"]
    rep = json.loads((out / "eval" / "compare" / "report.json").read_text())
    ms = rep["methods"]
    assert set(FIVE) <= set(ms)
    # one evaluation set: every method's id, computed from its own evaluation report, is the same
    ids = {m: ms[m]["eval_set"] for m in FIVE}
    assert len(set(ids.values())) == 1, ids
    assert rep["eval_set"]["same"] and rep["eval_set"]["id"] == ids["wplus"]
    assert all(ms[m]["faces"] == rep["eval_set"]["faces"] for m in FIVE) and len(rep["eval_set"]["faces"]) == 2
    assert all(p["eval_set"] == rep["eval_set"]["id"] for m in FIVE for p in ms[m]["sweep"])
    # which adapter: the registry's champion over its candidate (and over evaluate.adapters), the candidate
    # where there is no champion, else the evaluate.adapters folder with the reason
    w = ms["wplus"]
    assert (w["source"]["kind"], w["source"]["alias"], w["source"]["version"]) == ("registry", "champion", "1")
    assert w["adapter"]["sha256"] == project["champion_sha"] != project["candidate_sha"]
    assert (ms["identity_encoder"]["source"]["alias"], ms["identity_encoder"]["source"]["version"]) == ("candidate", "1")
    for m in ("face2diffusion", "hybrid_guidance", "pidiff"):
        s = ms[m]["source"]
        assert s["kind"] == "folder" and "no version of persona-" in s["reason"] and "evaluate.adapters" in s["reason"], s
    # the metrics, with reasons where missing
    for m in FIVE:
        g = ms[m]["metrics"]
        assert g["identity_similarity"]["value"] == 0.0 and g["face_detection_rate"]["value"] == 0.0  # tiny model: no faces
        assert g["identity_similarity_detected"]["value"] is None and "no face detected" in g["identity_similarity_detected"]["missing"]
        assert g["clip_t"]["value"] is None and "CLIP" in g["clip_t"]["missing"]
        assert [p["lambda"] for p in ms[m]["sweep"]] == [0.0, 1.0]
    assert ms["pidiff"]["lambda"] == pytest.approx(0.4) and ms["wplus"]["lambda"] == 1.0
    div = ms["identity_encoder"]["metrics"]["generation_diversity"]  # the method's hook, through compare
    assert div["value"] is None and "num_images >= 2" in div["missing"]
    assert ms["identity_encoder"]["method_metrics"] == ["generation_diversity"]
    f2d = ms["face2diffusion"]["metrics"]["expression_distance"]
    assert f2d["value"] is None and "no face with a mesh" in f2d["missing"]
    hy = ms["hybrid_guidance"]["metrics"]
    assert hy["region_identity_similarity"]["value"] == 0.0 and hy["region_identity_similarity"]["n"] == 2  # 1 image x 2 regions
    assert "either person's region" in hy["region_identity_similarity_detected"]["missing"]
    assert rep["weights_real"] is False and "RANDOM WEIGHTS" in rep["warning"]
    # the files: numbers-only DVC metrics, the leaderboard, the plots
    nums = json.loads((out / "metrics" / "compare.json").read_text())
    assert _numbers_only(nums) and nums["weights_real"] == 0 and set(FIVE) <= set(nums)
    assert nums["wplus"]["identity_similarity"] == 0.0 and nums["pidiff"]["sweep"]["s1"]["lambda"] == 1.0
    assert "clip_t" not in nums["wplus"]  # missing: not a number
    md = (out / "eval" / "compare.md").read_text()
    assert "weights_real: false" in md and rep["eval_set"]["id"] in md and "persona-wplus@champion (v1)" in md
    assert all(f"| {m} |" in md for m in FIVE) and "no CLIP checkpoint configured" in md
    with Image.open(out / "plots" / "compare_grid.png") as im:
        assert im.size[0] == (1 + len(FIVE)) * 128  # the reference + one column per method
    with Image.open(out / "plots" / "compare_tradeoff.png") as im:
        assert im.size == (640, 480)
    # one MLflow comparison run
    client = MlflowClient(project["uri"])
    exp = client.get_experiment_by_name("persona-compare")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == rep["mlflow"]["run_id"]
    assert run.data.metrics["wplus.identity_similarity"] == 0.0 and "wplus.clip_t" not in run.data.metrics
    assert run.data.tags["weights_real"] == "false" and run.data.tags["eval.set"] == rep["eval_set"]["id"]
    assert "CLIP" in run.data.tags["missing.wplus.clip_t"] and "registry" in run.data.tags["source_reason.pidiff"]
    hist = client.get_metric_history(run.info.run_id, "sweep.wplus.lambda")
    assert sorted((h.step, h.value) for h in hist) == [(0, 0.0), (1, 1.0)]
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == rep["eval_set"]["id"]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "compare")) == [
        "compare/compare.json", "compare/compare.md", "compare/compare_grid.png", "compare/compare_tradeoff.png",
        "compare/report.json"]


def test_a_method_with_neither_a_registered_version_nor_an_adapter_is_missing_with_its_reason(tmp_path):
    from training.compare import resolve_source
    from training.registry import Registry, RegistryConfig

    reg = Registry(RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}"))
    src = resolve_source("wplus", {}, reg, ["champion", "candidate"])
    assert src["spec"] is None and "champion or candidate" in src["reason"] and "no entry for wplus" in src["reason"]
    src = resolve_source("wplus", {"wplus": "models/wplus/stage2"}, None, ["champion"])
    assert src["spec"] == "models/wplus/stage2" and "could not be opened" in src["reason"]


def test_compare_params_and_dvc_stage_cover_every_evaluated_adapter():
    from pipeline.config import check_params, load_params
    from training.compare import compare_config

    params = load_params(REPO / "params.yaml")
    check_params(params)
    cfg = compare_config(params)
    assert len(cfg.scales) >= 2 and cfg.num_images <= 2  # demo-sized
    adapters = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["adapters"]
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["compare"]
    deps = set(stage["deps"])
    for m, folder in adapters.items():
        assert f"${{evaluate.adapters.{m}}}" in deps or folder in deps, m
        assert f"eval/{m}/register.json" in deps, m
    assert {"compare", "evaluate"} <= set(stage["params"])
    assert list(stage["metrics"][0]) == ["metrics/compare.json"]
    assert {"plots/compare_tradeoff.png", "plots/compare_grid.png"} <= set(stage["plots"])


def test_bad_compare_params_are_refused():
    from pipeline.config import ConfigError
    from training.compare import compare_config

    with pytest.raises(ConfigError, match="scales"):
        compare_config({"scales": []})
    with pytest.raises(ConfigError, match="aliases"):
        compare_config({"aliases": []})
    with pytest.raises(ConfigError):
        compare_config({"no_such_key": 1})
