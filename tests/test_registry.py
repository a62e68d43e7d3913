"""Registry: gate rules, register / promote / rollback on a local store, and a REAL mlflow server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from training.generate import sha256_file
from training.registry import (
    PromotionRefused,
    Registry,
    RegistryConfig,
    RegistryError,
    gate,
    metric_tags,
    metric_values,
    resolve_uris,
    tag_metrics,
)
from tests.test_generate import make_tiny_adapter

NAME = "persona-test"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def evaluation(adapter: Path, ident: float, eval_set: str = "E1", clip: float | None = None) -> dict:
    """What `persona evaluate` writes, reduced to what `register` reads."""
    return {
        "adapter": {"sha256": sha256_file(adapter / "adapter.safetensors")},
        "eval_set": {"id": eval_set},
        "weights_real": False,
        "metrics": {
            "identity_similarity": {"value": ident, "n": 4},
            "face_detection_rate": {"value": 0.5, "n": 4},
            "clip_t": {"value": clip, "missing": None if clip is not None else "no CLIP checkpoint configured", "n": 0},
        },
    }


def _write(path: Path, obj: dict) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _params(tmp_path: Path, **registry) -> str:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"registry": {"model_name": NAME, "artifact_location": str(tmp_path / "mlartifacts"),
                                              "out": str(tmp_path / "register.json"), **registry}}))
    return str(p)


# ------------------------------------------------------------------------------ pure rules
def test_gate_rules():
    g = ["identity_similarity", "clip_t"]
    first = gate({"identity_similarity": 0.1, "clip_t": 0.2}, None, g, candidate_eval_set="E")
    assert first["ok"] and first["first_champion"]
    assert not gate({"identity_similarity": 0.1, "clip_t": None}, None, g)["ok"]  # candidate lacks a gate metric

    champ = {"identity_similarity": 0.40, "clip_t": 0.20}
    kw = dict(candidate_eval_set="E", champion_eval_set="E")
    assert gate({"identity_similarity": 0.45, "clip_t": 0.20}, champ, g, **kw)["ok"]
    worse = gate({"identity_similarity": 0.90, "clip_t": 0.19}, champ, g, **kw)
    assert not worse["ok"] and any("clip_t: worse" in r for r in worse["reasons"])
    assert [r["verdict"] for r in worse["rows"]] == ["better", "worse"]
    equal = gate(dict(champ), champ, g, **kw)
    assert not equal["ok"] and "improves" in equal["reasons"][0]
    small = gate({"identity_similarity": 0.41, "clip_t": 0.20}, champ, g, min_improvement=0.05, **kw)
    assert not small["ok"]
    other_set = gate({"identity_similarity": 0.9, "clip_t": 0.9}, champ, g, candidate_eval_set="E", champion_eval_set="F")
    assert not other_set["ok"] and "different evaluation sets" in other_set["reasons"][0]
    assert gate({"identity_similarity": 0.9, "clip_t": 0.9}, champ, g, candidate_eval_set="E", champion_eval_set="F",
                require_same_eval_set=False)["ok"]
    assert not gate({"identity_similarity": 0.9, "clip_t": 0.9}, {"identity_similarity": 0.1, "clip_t": None}, g, **kw)["ok"]


def test_metric_tags_round_trip_and_uri_resolution(monkeypatch):
    ev = {"a": {"value": 0.25}, "b": {"value": None, "missing": "no CLIP"}, "c": {"value": float("nan")}}
    assert metric_values(ev) == ({"a": 0.25}, {"b": "no CLIP", "c": "no value"})
    tags = metric_tags(ev)  # versions registered before MLflow models are still read
    assert tags == {"metric.a": "0.25", "metric.b": "missing: no CLIP", "metric.c": "missing: no value"}
    assert tag_metrics({**tags, "other": "x"}) == {"a": 0.25, "b": None, "c": None}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    assert resolve_uris() == ("sqlite:///mlruns.db", "sqlite:///mlruns.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_uris(cfg=RegistryConfig(tracking_uri="sqlite:///x.db")) == ("http://127.0.0.1:1", "http://127.0.0.1:1")
    assert resolve_uris("sqlite:///a.db", "sqlite:///b.db") == ("sqlite:///a.db", "sqlite:///b.db")


# ------------------------------------------------------------------------------ local store
def test_register_promote_refuse_rollback_on_a_local_store(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("persona-wplus", artifact_location=str(tmp_path / "mlartifacts"))
    run_id = client.create_run(exp, run_name="wplus-stage2", tags={"persona.kind": "train"}).info.run_id
    client.log_param(run_id, "train.lr", "0.0001")
    client.set_terminated(run_id)
    ad = make_tiny_adapter(tmp_path / "a", mlflow={"tracking_uri": uri, "run_id": run_id, "experiment": "persona-wplus"})
    params = _params(tmp_path, tracking_uri=uri)
    cli = ["--params", params]

    # register v1 from the adapter's own training run
    assert main(["registry", "register", "--adapter", str(ad), "--metrics", _write(tmp_path / "e1.json", evaluation(ad, 0.30)), *cli]) == 0
    out = json.loads((tmp_path / "register.json").read_text())
    assert out["version"] == "1" and out["run_id"] == run_id and out["reused_training_run"] is True
    assert out["source"] == f"models:/{out['model_id']}" and out["alias"] == "candidate"  # a version of an MLflow model
    model = client.get_logged_model(out["model_id"])
    assert model.source_run_id == run_id and [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    reg = Registry(RegistryConfig(model_name=NAME, tracking_uri=uri))
    v1 = reg.show(NAME, "candidate")
    assert v1["metrics"] == {"identity_similarity": 0.30, "face_detection_rate": 0.5, "clip_t": None}
    # the numbers are real MLflow metrics of the model (searchable), not tags; a missing one says why
    assert {m.key: m.value for m in model.metrics} == {"eval.identity_similarity": 0.30, "eval.face_detection_rate": 0.5}
    assert client.search_logged_models([exp], filter_string="metrics.`eval.identity_similarity` > 0.2")[0].model_id == model.model_id
    t = v1["tags"]
    assert t["eval_set"] == "E1" and t["method"] == "wplus" and t["phase"] == "stage2" and t["weights_real"] == "false"
    assert t["git_commit"] == "test" and t["shards_hash"] == "test-shards" and len(t["params_hash"]) == 16
    assert t["adapter_sha256"] == sha256_file(ad / "adapter.safetensors") and t["missing.clip_t"] == "no CLIP checkpoint configured"
    assert not any(k.startswith("metric.") for k in t)

    # same adapter + same evaluation again: the same version, no duplicate
    assert reg.register(ad, evaluation=evaluation(ad, 0.30))["reused_version"] is True
    # evaluation results of another adapter are refused
    with pytest.raises(RegistryError, match="not for"):
        reg.register(ad, evaluation={**evaluation(ad, 0.3), "adapter": {"sha256": "f" * 64}})
    # without a configured name the registered model is persona-<the adapter's method>
    default = Registry(RegistryConfig(tracking_uri=uri, artifact_location=str(tmp_path / "mlartifacts")))
    assert default.register(ad, evaluation=evaluation(ad, 0.3))["name"] == "persona-wplus"
    with pytest.raises(RegistryError, match="--method"):
        default.promote()

    assert main(["registry", "promote", *cli]) == 0  # first champion
    assert reg.show(NAME)["version"] == "1"
    assert reg.register(ad, evaluation=evaluation(ad, 0.45))["version"] == "2"
    assert reg.promote()["promoted"] is True and reg.show(NAME)["version"] == "2"
    assert reg.show(NAME)["champion_history"] == ["1"]

    # a worse candidate is refused with the numbers, and nothing moves
    assert reg.register(ad, evaluation=evaluation(ad, 0.20))["version"] == "3"
    capsys.readouterr()
    assert main(["registry", "promote", *cli]) == 1
    err = capsys.readouterr().err
    assert "REFUSED" in err and "0.2000" in err and "0.4500" in err and "worse" in err
    with pytest.raises(PromotionRefused) as exc:
        reg.promote()
    assert exc.value.decision["rows"][0]["delta"] == pytest.approx(-0.25)
    assert reg.show(NAME)["version"] == "2"
    # a better number on ANOTHER evaluation set is not comparable
    reg.register(ad, evaluation=evaluation(ad, 0.99, eval_set="E2"))
    with pytest.raises(PromotionRefused, match="different evaluation sets"):
        reg.promote()
    # --force moves it anyway and says so on the version
    forced = reg.promote(force=True)
    assert forced["forced"] and reg.show(NAME)["tags"]["promoted_forced"]
    assert reg.show(NAME)["champion_history"] == ["1", "2"]

    # rollback walks the history back
    assert main(["registry", "rollback", *cli]) == 0
    assert reg.show(NAME)["version"] == "2"
    assert reg.rollback()["champion_version"] == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    assert main(["registry", "rollback", *cli]) == 1

    capsys.readouterr()
    assert main(["registry", "list", *cli]) == 0
    listing = capsys.readouterr().out
    assert "v  1 champion" in listing and "identity_similarity=0.3000" in listing
    versions = reg.list(NAME)
    assert [v["version"] for v in versions] == ["4", "3", "2", "1"] and versions[0]["aliases"] == ["candidate"]

    # generation from the local registry; the record pins version and server, so it re-runs anywhere
    np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((18, 512)).astype(np.float32))
    assert main(["generate", "--adapter", f"models:/{NAME}@champion", "--input", f"wplus={tmp_path / 'w.npy'}", "--prompt", "a face",
                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "gen"), "--tracking-uri", uri, *cli]) == 0
    rec_path = next((tmp_path / "gen").glob("*.json"))
    rec = json.loads(rec_path.read_text())
    assert rec["adapter"]["uri"] == f"models:/{NAME}/1" and rec["adapter"]["registry"]["tracking_uri"] == uri
    assert main(["generate", "--from-json", str(rec_path), "--check", "--device", "cpu"]) == 0


# ------------------------------------------------------------------------------ a real server
@pytest.fixture
def mlflow_server(tmp_path):
    from training.mlflow_server import start_server

    srv = start_server(backend=f"sqlite:///{tmp_path / 'server.db'}", artifacts=tmp_path / "server-artifacts",
                       workers=1, timeout=180, log_path=tmp_path / "server.log")
    try:
        yield srv
    finally:
        srv.stop()
        assert not srv.alive()


@pytest.mark.integration
@pytest.mark.slow
def test_registry_and_generation_over_http_against_a_real_mlflow_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    assert mlflow_server.url.startswith("http://127.0.0.1:")
    # two tiny adapters, trained a few steps each; their training runs are not on this server
    a = make_tiny_adapter(tmp_path / "a", steps=2, seed=0)
    b = make_tiny_adapter(tmp_path / "b", steps=3, seed=1)
    assert sha256_file(a / "adapter.safetensors") != sha256_file(b / "adapter.safetensors")
    cli = ["--params", _params(tmp_path)]

    def register(ad: Path, ident: float, tag: str) -> dict:
        assert main(["registry", "register", "--adapter", str(ad), "--metrics",
                     _write(tmp_path / f"{tag}.json", evaluation(ad, ident)), *cli]) == 0
        return json.loads((tmp_path / "register.json").read_text())

    r1 = register(a, 0.30, "a")
    assert r1["version"] == "1" and r1["reused_training_run"] is False and r1["tracking_uri"] == mlflow_server.url
    from mlflow import MlflowClient

    model = MlflowClient(mlflow_server.url).get_logged_model(r1["model_id"])  # an MLflow model over HTTP
    assert r1["source"] == f"models:/{model.model_id}" and str(model.status) == "READY"
    assert model.artifact_location.startswith("mlflow-artifacts:/")  # artifacts went through the server
    assert {m.key: m.value for m in model.metrics} == {"eval.identity_similarity": 0.30, "eval.face_detection_rate": 0.5}
    assert main(["registry", "promote", *cli]) == 0
    assert register(b, 0.45, "b")["version"] == "2"
    assert main(["registry", "promote", *cli]) == 0  # the better one is promoted
    reg = Registry(RegistryConfig(model_name=NAME))
    assert reg.tracking_uri == mlflow_server.url and reg.show(NAME)["version"] == "2"
    assert register(a, 0.10, "a-worse")["version"] == "3"
    assert main(["registry", "promote", *cli]) == 1  # the worse one is refused
    assert reg.show(NAME)["version"] == "2" and reg.show(NAME, "candidate")["version"] == "3"
    assert main(["registry", "rollback", *cli]) == 0
    assert reg.show(NAME)["version"] == "1"

    # generate from the champion over HTTP; the record pins the version; re-running it is identical
    np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((18, 512)).astype(np.float32))
    out = tmp_path / "gen"
    assert main(["generate", "--adapter", f"models:/{NAME}@champion", "--input", f"wplus={tmp_path / 'w.npy'}",
                 "--prompt", "a photo of a face", "--steps", "3", "--device", "cpu", "--out", str(out), *cli]) == 0
    rec_path = next(out.glob("*.json"))
    rec = json.loads(rec_path.read_text())
    assert rec["adapter"]["uri"] == f"models:/{NAME}/1" and rec["adapter"]["registry"]["alias"] == "champion"
    assert rec["adapter"]["sha256"] == sha256_file(a / "adapter.safetensors")
    assert main(["generate", "--from-json", str(rec_path), "--check", "--device", "cpu"]) == 0
