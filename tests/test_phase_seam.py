"""The seam for data-bound and per-identity phases, with a method defined in this file alone:

- `Phase.splits`: the phase reads the val shards too; `Phase.bind`: the data module binds the phase
  to its source once, and the loaders and the objective use the bound instance (here: only one
  identity's faces, whichever split they are in);
- `Phase.record`: lands in adapter.json (`phase_record`) and the safetensors metadata; its
  `registry` tags and aliases are added by `Registry.register`; its `evaluation_faces` select the
  faces `labeled_faces` reads;
- `Method.inference_scale`: recorded as adapter.json `scale`, the lambda of a generation that leaves
  it unset;
- `DataVerdict` keeps its reason across processes (pickling, as Ray does);
- `persona generate` flags declared by methods (`Method.flags`).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training import methods
from training.adapter import read_adapter_file
from training.adapters.residual_attention import ResidualAttention
from training.adapters.wproj import WProj
from training.methods.base import DataVerdict, Method, Phase, PhaseConfig
from training.methods.wplus import Stage1
from training.transforms import aligned_face

from tests.test_training import make_params

WHO = "synthetic_001"


@dataclass
class BoundConfig(PhaseConfig):
    identity: str = WHO


@dataclass
class BoundMethodConfig:
    main: BoundConfig = field(default_factory=BoundConfig)


class KeySampler:
    """The samples with the given keys, in order, cycling."""

    def __init__(self, keys):
        self.keys = list(keys)

    def slots(self, source, b, rank, world, batch_size, seed, rank_source):
        where = {source.key(i): i for i in range(len(source))}
        return [(where[self.keys[(b * batch_size + i) % len(self.keys)]], -1) for i in range(batch_size)]


class BoundMain(Stage1):
    """Trains on one identity's faces from both splits; remembers them once bound."""

    name = "main"
    config = BoundConfig
    splits = ("train", "val")

    def __init__(self, keys=None):
        self.keys = keys

    def bind(self, cfg, source):
        groups, _ = source.by_identity()
        if cfg.identity not in groups:
            raise DataVerdict(f"no faces of {cfg.identity}", reason="no_photos")
        return BoundMain(sorted(source.key(i) for i in groups[cfg.identity]))

    def sampler(self, cfg):
        return KeySampler(self.keys)

    def example(self, sample, *, resolution, cfg, rng):
        assert self.keys is not None, "examples made by an unbound phase"
        return {"image": aligned_face(sample["face.jpg"], resolution), "prompt": "a photo of a face"}

    def record(self, cfg):
        return {"faces": self.keys, "evaluation_faces": self.keys[-1:],
                "registry": {"tags": {"bound_identity": cfg.identity, "method": "must-not-win"},
                             "aliases": [f"{cfg.identity}-bound"]}}


class BoundMethod(Method):
    name = "toybound"
    conditioner = WProj
    injection = ResidualAttention
    config = BoundMethodConfig
    phases = {"main": BoundMain()}
    needs = ("wplus.npy",)
    input_keys = ("wplus",)

    def conditioner_config(self, cfg, comps):
        return {"cross_dim": comps.cross_attention_dim, "key": "wplus"}

    def inference_scale(self, cfg) -> float:
        return 0.25

    def inputs(self, samples, weights=None):
        return {"wplus": np.asarray(samples[0]["wplus.npy"], np.float32)}


methods.register(BoundMethod())


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory) -> Path:
    """Train and val tars; identity synthetic_001's faces are in both."""
    root = tmp_path_factory.mktemp("seam_shards")
    samples = synthetic_samples(12, identities=3, seed=11, size=64, encoded=True)
    write_tar(root / "train" / "train-000000.tar", (encoded_members(s) for s in samples[:8]))
    write_tar(root / "val" / "val-000000.tar", (encoded_members(s) for s in samples[8:]))
    return root


def _keys_of(shards: Path, who: str) -> dict[str, str]:
    from pipeline.shard_reader import ShardIndex

    out = {}
    for split in ("train", "val"):
        idx = ShardIndex([str(shards / split / f"{split}-000000.tar")], ("json",))
        out.update({idx.key(i): split for i in range(len(idx)) if idx.identity(i) == who})
    return out


def test_bound_phase_reads_both_splits_records_and_registers(split_shards, tmp_path):
    from training.config import train_params
    from training.data import PersonaDataModule
    from training.evaluate import labeled_faces
    from training.generate import Generator, GenerateConfig, Request, generate
    from training.registry import Registry
    from training.train import train

    want = _keys_of(split_shards, WHO)
    assert set(want.values()) == {"train", "val"}  # the identity spans both splits
    raw = make_params(tmp_path, mlflow=True, train={"synthetic": 0, "shards": str(split_shards)})
    raw["train"]["methods"] = {"toybound": {"main": {"max_steps": 2, "batch_size": 3, "log_every": 1,
                                                     "checkpoint_every": 2, "sample_every": 0}}}
    tp = train_params(raw)
    m = methods.get("toybound")
    dm = PersonaDataModule(m, m.phase("main"), tp.train, tp.phase("toybound", "main"))
    dm.setup()
    assert dm.phase is not m.phase("main") and sorted(dm.phase.keys) == sorted(want)
    seen = {k for b in range(4) for k in dm.dataset(0).batch(b)["key"]}
    assert seen == set(want)  # only the bound identity's faces, from both splits

    res = train(raw, "toybound", "main")
    rec = json.loads(Path(res["adapter_json"]).read_text())
    assert rec["scale"] == 0.25
    assert rec["phase_record"]["faces"] == sorted(want)
    _, meta = read_adapter_file(res["adapter"])
    assert json.loads(meta["phase_record"]) == rec["phase_record"]

    reg = Registry(tracking_uri=raw["train"]["mlflow"]["tracking_uri"])
    out = reg.register(Path(res["adapter"]).parent)
    mv = reg.version(out["name"], f"{WHO}-bound")
    assert str(mv.version) == out["version"] and out["extra_aliases"] == [f"{WHO}-bound"]
    assert mv.tags["bound_identity"] == WHO and mv.tags["method"] == "toybound"  # generic tags win

    faces = labeled_faces(split_shards, ("train", "val"), 10, 10, keys=set(rec["phase_record"]["evaluation_faces"]))
    assert [f.key for f in faces] == rec["phase_record"]["evaluation_faces"]

    gen = Generator.load(str(Path(res["adapter"]).parent))
    assert gen.default_scale == 0.25
    code = tmp_path / "w.npy"
    np.save(code, np.zeros((18, 512), np.float32))

    class Inputs(BoundMethod):  # this method's prepare takes a code file (its own test input)
        def prepare(self, identity, files, options, kit):
            from training.methods.base import Prepared

            return Prepared({"wplus": np.load(files["wplus"])}, {})

    gen.method = Inputs()
    recs = generate(Request(prompts=["a face"], inputs={"wplus": str(code)}),
                    GenerateConfig(steps=2, out=str(tmp_path / "gen")), generator=gen)
    assert recs[0]["lambda"] == 0.25  # unset: the method's inference default
    recs = generate(Request(prompts=["a face"], inputs={"wplus": str(code)}),
                    GenerateConfig(steps=2, scale=1.0, out=str(tmp_path / "gen1")), generator=gen)
    assert recs[0]["lambda"] == 1.0


def test_bind_verdict_is_raised_and_survives_pickling(split_shards, tmp_path):
    from training.config import train_params
    from training.data import PersonaDataModule

    raw = make_params(tmp_path, train={"synthetic": 0, "shards": str(split_shards)})
    raw["train"]["methods"] = {"toybound": {"main": {"identity": "nobody"}}}
    tp = train_params(raw)
    m = methods.get("toybound")
    dm = PersonaDataModule(m, m.phase("main"), tp.train, tp.phase("toybound", "main"))
    with pytest.raises(DataVerdict, match="no faces of nobody") as e:
        dm.setup()
    back = pickle.loads(pickle.dumps(e.value))
    assert isinstance(back, DataVerdict) and back.reason == "no_photos" and str(back) == "no faces of nobody"


def test_pidiff_generate_flags_are_method_flags():
    """PIDiff's --style-ref / --split are its `Method.flags`: parsed once the adapter's method is
    known, they fill --input style=PATH / --option split=N; an unknown flag names the method's flags."""
    from training import methods, registry_cli

    m = methods.get("pidiff")
    files, options = registry_cli._method_flags(m, ["--style-ref", "s.jpg", "--split", "6"])
    assert files == {"style": "s.jpg"} and options == {"split": "6"}
    with pytest.raises(SystemExit, match="--style-ref"):
        registry_cli._method_flags(m, ["--expression-ref", "e.jpg"])
