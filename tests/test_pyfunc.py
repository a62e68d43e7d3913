"""A registered adapter is an MLflow model: `mlflow.pyfunc.load_model("models:/<name>@candidate")` loads
it in a fresh process and draws images from a prompt and a real reference photo (bytes or path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_generate import make_tiny_adapter
from tests.test_registry import evaluation

NAME = "persona-test"

LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/%s@candidate")
photo = sys.argv[2]
df = pd.DataFrame({"prompt": ["a photo of a person"] * 3,
                   "reference": [open(photo, "rb").read(), photo, photo],
                   "seed": [0, 0, 1], "scale": [1.0, 1.0, 1.0]})
out = model.predict(df, params={"steps": 2})
ex = model.predict(model.input_example, params={"steps": 2})
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype), "same_seed_same_image": bool(np.array_equal(out[0], out[1])),
                  "seeds_differ": not np.array_equal(out[0], out[2]), "example": list(ex.shape),
                  "inputs": [c["name"] for c in json.loads(model.metadata.get_input_schema().to_json())],
                  "params": sorted(p.name for p in model.metadata.get_params_schema().params)}))
""" % NAME


@pytest.mark.slow
def test_a_registered_version_loads_with_mlflow_pyfunc_in_a_fresh_process(tmp_path, sample_raw, monkeypatch):
    from training.registry import Registry, RegistryConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ad = make_tiny_adapter(tmp_path / "a")
    reg = Registry(RegistryConfig(model_name=NAME, tracking_uri=uri, artifact_location=str(tmp_path / "mlartifacts")))
    out = reg.register(ad, evaluation=evaluation(ad, 0.3))
    assert out["source"] == f"models:/{out['model_id']}"

    # what the model holds: signature, an input example, explicit pinned requirements, the adapter
    local = reg.download(NAME, out["version"], tmp_path / "m")
    mlmodel = (local / "MLmodel").read_text()
    assert "signature:" in mlmodel and "saved_input_example_info" in mlmodel and "python_function" in mlmodel
    reqs = (local / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in reqs and any(r.startswith("diffusers==") for r in reqs) and any(r.startswith("mlflow==") for r in reqs)
    assert (local / "artifacts" / "adapter" / "adapter.safetensors").read_bytes() == (ad / "adapter.safetensors").read_bytes()
    assert not list(local.rglob("*.pkl"))  # models-from-code: nothing pickled

    photo = sample_raw / "sample" / "obama" / "obama.jpg"
    r = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, str(photo)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                                    "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["shape"] == [3, 64, 64, 3] and got["dtype"] == "uint8" and got["example"] == [1, 64, 64, 3]
    assert got["same_seed_same_image"] and got["seeds_differ"]  # bytes and path give the same identity
    assert got["inputs"] == ["prompt", "reference", "seed", "scale"]
    assert got["params"] == sorted(["steps", "guidance", "scheduler", "negative_prompt", "delay_steps", "size", "batch_size"])
