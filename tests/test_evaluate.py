"""Evaluation: the real-photo control, honest missing metrics, CLIP-T / LPIPS / FID code paths, MLflow."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import Params, load_params
from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training.evaluate import (
    FaceScorer,
    clip_t,
    contained,
    control_from_photos,
    eval_set_id,
    evaluate,
    evaluate_config,
    fid_from_features,
    fid_metric,
    frechet_distance,
    identity_control,
    labeled_faces,
    lpips_metric,
    slug,
)
from tests.test_generate import make_tiny_adapter


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def scorer():
    s = FaceScorer.load(Params())
    yield s
    s.close()


def _imgs(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------ the control
def test_control_on_the_real_sample_photos(sample_raw, scorer):
    obama = sorted((sample_raw / "sample" / "obama").glob("*.jpg"))
    biden = sorted((sample_raw / "sample" / "biden").glob("*.jpg"))
    assert len(obama) == 3 and len(biden) == 1
    out = control_from_photos({"obama": obama, "biden": biden}, scorer)
    assert out["no_face"] == []
    same = [p for p in out["pairs"] if p[0] == p[1] == "obama"]
    cross = [p for p in out["pairs"] if {p[0], p[1]} == {"obama", "biden"}]
    assert len(same) == 3 and len(cross) == 3
    assert all(p[4] > 0.5 for p in same), same
    assert all(p[4] < 0.3 for p in cross), cross
    assert out["same_identity"]["value"] > 0.5 and out["same_identity"]["n"] == 3
    assert out["different_identity"]["value"] < 0.3 and out["different_identity"]["n"] == 3


def test_identity_control_pairs_and_missing_sides():
    e = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    out = identity_control(["a", "a", "b", "c"], e, with_pairs=True)
    assert out["same_identity"] == pytest.approx({"value": 0.8, "n": 1, "min": 0.8, "max": 0.8, "std": 0.0, "identities": 1})
    # different pairs: a0-b 0, a0-c 0, a1-b 0.6, a1-c 0, b-c 0
    assert out["different_identity"]["value"] == pytest.approx(0.12) and out["different_identity"]["n"] == 5
    assert len(out["pairs"]) == 6
    one_each = identity_control(["a", "b"], e[:2])
    assert one_each["same_identity"]["value"] is None and "2 faces" in one_each["same_identity"]["missing"]
    only_a = identity_control(["a", "a"], e[:2])
    assert only_a["different_identity"]["value"] is None and only_a["same_identity"]["value"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------ evaluate end to end
def _write_shards(root: Path) -> Path:
    """6 synthetic identities x 2 faces: synthetic_000..003 -> train, 004..005 -> val."""
    samples = synthetic_samples(12, identities=6, seed=3, encoded=True)
    for split, ids in (("train", {0, 1, 2, 3}), ("val", {4, 5})):
        sel = [s for s in samples if int(json.loads(s["json"])["identity"][-3:]) in ids]
        write_tar(root / split / f"{split}-000000.tar", (encoded_members(s) for s in sorted(sel, key=lambda s: s["__key__"])))
    return root


def test_evaluate_stage_on_tiny_shards_reports_missing_metrics_and_logs_to_the_training_run(tmp_path):
    from mlflow import MlflowClient

    shards = _write_shards(tmp_path / "shards")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("persona-wplus", artifact_location=str(tmp_path / "mlartifacts"))
    run_id = client.create_run(exp, run_name="wplus-stage2").info.run_id
    client.set_terminated(run_id)
    adapter = make_tiny_adapter(tmp_path / "adapter", mlflow={"tracking_uri": uri, "run_id": run_id, "experiment": "persona-wplus"})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {
        "adapter": str(adapter), "shards": str(shards), "max_identities": 2, "faces_per_identity": 1,
        "prompts": ["a photo of a face", "a face at night"], "steps": 2, "device": "cpu", "batch_size": 3,
        "metrics_out": str(tmp_path / "metrics" / "evaluate.json"), "grid_out": str(tmp_path / "plots" / "grid.png"),
        "report_out": str(tmp_path / "report.json"), "images_out": str(tmp_path / "eval"),
        "control": {"max_faces_per_identity": 2}}}))
    assert main(["evaluate", "--params", str(params)]) == 0

    res = json.loads((tmp_path / "report.json").read_text())  # the full report
    m = res["metrics"]
    # the DVC metrics file: the numbers only, one column each for `dvc metrics diff` / `dvc exp show`
    assert json.loads((tmp_path / "metrics" / "evaluate.json").read_text()) == {
        k: v["value"] for k, v in m.items() if v["value"] is not None}
    # the tiny random model draws no faces: similarity 0 (no face counts 0) and detection 0 are the honest values
    assert m["identity_similarity"] == {"value": 0.0, "n": 4, "no_face_counts_as": 0.0}
    assert m["face_detection_rate"] == {"value": 0.0, "n": 4}
    assert m["identity_similarity_detected"]["value"] is None and "no face detected" in m["identity_similarity_detected"]["missing"]
    for k, word in (("clip_t", "CLIP"), ("lpips", "LPIPS"), ("fid", "Inception")):
        assert m[k]["value"] is None and word in m[k]["missing"], m[k]
    # control from the shards' labeled faces of both splits (synthetic id embeddings: same person close)
    assert m["control_same_identity"]["n"] == 6 and m["control_same_identity"]["value"] > 0.8
    assert abs(m["control_different_identity"]["value"]) < 0.2
    assert res["control"]["embedding_sources"]["shard_id"] == 12  # synthetic landmarks are unusable
    assert res["weights_real"] is False and "RANDOM WEIGHTS" in res["warning"]
    assert "base.unet" in res["random_weights"] and "shards.wplus" in res["random_weights"] and res["method"] == "wplus"
    assert res["eval_set"]["identities"] == ["synthetic_004", "synthetic_005"] and len(res["samples"]) == 4
    assert res["adapter"]["sha256"] and res["mlflow"] == {"tracking_uri": uri, "run_id": run_id, "new_run": False,
                                                          "model_id": None}  # the adapter was not logged as a model
    assert len(list((tmp_path / "eval").rglob("*.png"))) == 4
    from PIL import Image

    with Image.open(tmp_path / "plots" / "grid.png") as im:
        assert im.size[0] == 3 * 128 and im.size[1] > 2 * 128  # reference + 2 prompts, 2 rows

    run = client.get_run(run_id)
    assert run.data.metrics["eval.identity_similarity"] == 0.0
    assert run.data.metrics["eval.control_same_identity"] == pytest.approx(m["control_same_identity"]["value"])
    assert "eval.clip_t" not in run.data.metrics and "CLIP" in run.data.tags["eval.missing.clip_t"]
    assert run.data.tags["eval.set"] == res["eval_set"]["id"] and run.data.tags["eval.weights_real"] == "false"
    assert sorted(a.path for a in client.list_artifacts(run_id, "evaluation")) == [
        "evaluation/evaluate.json", "evaluation/grid.png", "evaluation/report.json"]
    # the metrics refer to the evaluation set, logged as the run's dataset input
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "eval-set" and ds.dataset.digest == res["eval_set"]["id"]


def test_eval_set_id_changes_with_faces_and_protocol(tmp_path):
    shards = _write_shards(tmp_path / "shards")
    faces = labeled_faces(shards, ("val",), 2, 1, need=("wplus.npy",))
    assert [f.identity for f in faces] == ["synthetic_004", "synthetic_005"]
    assert set(faces[0].sample) >= {"face.jpg", "json", "wplus.npy", "id.npy"} and "jpg" not in faces[0].sample
    inputs = [{"wplus": f.sample["wplus.npy"].astype(np.float32)} for f in faces]
    cfg = evaluate_config({"prompts": ["a"]})
    models = {"arcface": {"fingerprint": "x"}}
    base = eval_set_id(faces, inputs, cfg, 64, models)
    assert base == eval_set_id(faces, inputs, evaluate_config({"prompts": ["a"]}), 64, models)
    assert base != eval_set_id(faces[:1], inputs, cfg, 64, models)
    assert base != eval_set_id(faces, [inputs[1], inputs[0]], cfg, 64, models)  # the conditioner inputs count
    assert base != eval_set_id(faces, inputs, evaluate_config({"prompts": ["b"]}), 64, models)
    assert base != eval_set_id(faces, inputs, evaluate_config({"prompts": ["a"], "steps": 7}), 64, models)
    assert base != eval_set_id(faces, inputs, evaluate_config({"prompts": ["a"], "scheduler": "euler_a"}), 64, models)
    assert base != eval_set_id(faces, inputs, cfg, 64, {"arcface": {"fingerprint": "y"}})


def test_identities_from_shard_metadata_cannot_write_outside_images_out(tmp_path, scorer):
    """Identity and key strings come from shard json: '../x' or an absolute path must not escape."""
    from training.generate import Generator

    hostile = ["../escape", str(tmp_path / "abs")]
    samples = synthetic_samples(2, identities=2, seed=3, encoded=True)
    for smp, ident in zip(samples, hostile):
        meta = json.loads(smp["json"])
        meta["identity"] = ident
        smp["json"] = json.dumps(meta).encode()
    write_tar(tmp_path / "shards" / "val" / "val-000000.tar", (encoded_members(x) for x in samples))
    out = tmp_path / "eval" / "images"
    cfg = evaluate_config({"shards": str(tmp_path / "shards"), "prompts": ["a face"], "steps": 1, "device": "cpu",
                           "images_out": str(out), "metrics_out": str(tmp_path / "m.json"), "report_out": str(tmp_path / "r.json"),
                           "grid_out": str(tmp_path / "g.png"), "control": {"enabled": False}})
    gen = Generator.load(str(make_tiny_adapter(tmp_path / "adapter")), device="cpu", dtype="fp32")
    res = evaluate(cfg, generator=gen, scorer=scorer, log_mlflow=False)
    files = [Path(x["file"]) for x in res["samples"]]
    assert sorted(x["identity"] for x in res["samples"]) == sorted(hostile) and len(files) == 2
    assert all(f.is_file() and out.resolve() in f.resolve().parents for f in files)
    assert not (tmp_path / "eval" / "escape").exists() and not (tmp_path / "abs").exists()
    assert slug("obama") == "obama" and slug("../x") != slug("__x") and "/" not in slug("/etc/passwd")
    with pytest.raises(ValueError, match="outside"):
        contained(out, "..", "x")


def test_params_yaml_evaluate_section_is_valid():
    cfg = evaluate_config(load_params(Path(__file__).resolve().parents[1] / "params.yaml"))
    assert cfg.prompts and cfg.split == "val"
    with pytest.raises(Exception, match="unknown key"):
        evaluate_config({"bogus": 1})


# ------------------------------------------------------------------------------ optional metrics
def test_clip_t_with_a_tiny_random_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipeline.models.diffusion import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    proc.save_pretrained(tmp_path / "clip")

    imgs = _imgs(3, 0)
    out = clip_t(imgs, ["a face", "a dog", "a face"], str(tmp_path / "clip"), device="cpu", batch_size=2)
    assert out["n"] == 3 and -1.0 <= out["value"] <= 1.0 and out["fingerprint"]
    # same images and prompts -> same score; other prompts -> another score
    assert clip_t(imgs, ["a face", "a dog", "a face"], str(tmp_path / "clip"), device="cpu")["value"] == pytest.approx(out["value"], abs=1e-6)
    assert clip_t(imgs, ["zzz", "qqq", "xx"], str(tmp_path / "clip"), device="cpu")["value"] != pytest.approx(out["value"], abs=1e-6)
    assert clip_t(imgs, ["a"] * 3, None)["missing"].startswith("no CLIP checkpoint")
    assert "does not exist" in clip_t(imgs, ["a"] * 3, str(tmp_path / "nope"))["missing"]


def test_lpips_with_a_local_backbone_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), tmp_path / "squeeze.pth")
    a, b = _imgs(2, 1), _imgs(2, 2)
    same = lpips_metric(a, a, str(tmp_path / "squeeze.pth"), "squeeze", "cpu", size=64)
    diff = lpips_metric(a, b, str(tmp_path / "squeeze.pth"), "squeeze", "cpu", size=64)
    assert same["value"] == pytest.approx(0.0, abs=1e-6) and same["n"] == 2 and same["lower_is_better"]
    assert diff["value"] > 1e-4
    assert lpips_metric(a, b, None)["value"] is None


def test_frechet_distance_and_fid_missing_reasons(tmp_path):
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([2.0]), np.array([[4.0]])) == pytest.approx(5.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4))
    s = np.cov(x, rowvar=False)
    assert frechet_distance(x.mean(0), s, x.mean(0), s) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x.mean(0), s, x.mean(0) + 1, s) == pytest.approx(4.0, abs=1e-6)
    # the sample-space shortcut (fewer samples than dimensions) equals the covariance formula
    for na, nb, d in ((5, 7, 40), (30, 20, 6)):
        a, b = rng.standard_normal((na, d)), rng.standard_normal((nb, d)) * 1.5 + 0.3
        full = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert fid_from_features(a, b) == pytest.approx(full, rel=1e-6)
        assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert "Inception" in fid_metric(_imgs(2, 0), _imgs(2, 1), None)["missing"]
    assert "does not exist" in fid_metric(_imgs(2, 0), _imgs(2, 1), str(tmp_path / "nope.pth"))["missing"]
    (tmp_path / "w.pth").write_bytes(b"")
    assert ">= 2 images" in fid_metric(_imgs(1, 0), _imgs(2, 1), str(tmp_path / "w.pth"))["missing"]


def test_fid_with_a_local_inception_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(),
               tmp_path / "inception.pth")
    a, b = _imgs(3, 1), _imgs(2, 2)
    same = fid_metric(a, a, str(tmp_path / "inception.pth"), "cpu")
    # a randomly initialised Inception's features are huge (no trained BN statistics): FID(a, a) is 0 to
    # float64 precision relative to the covariance trace Tr(S_a + S_a), not to 1
    from training.evaluate import inception_features, load_inception

    f = inception_features(a, load_inception(str(tmp_path / "inception.pth"), "cpu")).astype(np.float64)
    trace = 2 * float(((f - f.mean(0)) ** 2).sum()) / (len(f) - 1)
    assert abs(same["value"]) <= 1e-12 * max(1.0, trace) and same["n"] == 3
    diff = fid_metric(a, b, str(tmp_path / "inception.pth"), "cpu")
    assert diff["value"] > 0 and diff["n"] == 2 and diff["references"] == 3
