"""Identity Encoder (training/methods/identity_encoder.py) on the tiny model: the soft
nearest-neighbour loss, convex weights, the identity-drop curriculum, identity-grouped batches
(K groups of M same-identity faces + single faces; short identities reported; DDP ranks draw
disjoint groups), set aggregation and generation with 1..N references (order-free), and the CLI
path train -> evaluate (generation diversity) -> register -> generate --method --ref x3 --ref-weights.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training.adapters.set_encoder import FACES, WEIGHTS, SetEncoder, encoder_face
from training.config import train_params
from training.data import IdentityGroupedSampler, PersonaDataModule
from training.losses import dirichlet_weights, soft_nearest_neighbour_loss
from training.methods import identity_encoder as ie
from training.step import SampleDraws

from tests.test_training import make_params

METHOD = "identity_encoder"
TINY = {"preset": "tiny"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _relabel(sample: dict, identity) -> dict:
    meta = json.loads(sample["json"])
    meta["identity"] = identity
    return {**sample, "json": json.dumps(meta, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real shards: 2 train tars + 1 val tar. Train: synthetic_000/001 with 4 faces, synthetic_002
    with 3, synthetic_003 with 2 and `solo` with 1 (both short for M = 3), 6 unlabelled faces."""
    root = tmp_path_factory.mktemp("ie_shards")
    s = synthetic_samples(20, identities=4, seed=11, size=64, unlabeled=6, encoded=True)
    s[11] = _relabel(s[11], "solo")  # one of synthetic_003's three faces
    val = synthetic_samples(2, identities=1, seed=12, size=64, encoded=True)
    val = [_relabel(v, "val_person") for v in val]
    write_tar(root / "train" / "train-000000.tar", (encoded_members(x) for x in s[:10]))
    write_tar(root / "train" / "train-000001.tar", (encoded_members(x) for x in s[10:]))
    write_tar(root / "val" / "val-000000.tar", (encoded_members(x) for x in val))
    return root


def _params(tmp: Path, shards_dir: Path, mlflow: bool = False, **main) -> dict:
    base = {"max_steps": 3, "batch_size": 6, "identities": 2, "per_identity": 2, "singles": 2, "log_every": 1,
            "sample_every": 0}
    p = make_params(tmp, mlflow=mlflow, train={"synthetic": 0, "shards": str(shards_dir)}, method=METHOD,
                    main={**base, **main})
    p["train"]["methods"].pop("wplus")
    p["train"]["methods"][METHOD]["encoder"] = dict(TINY)
    return p


def _identities(shards_dir: Path) -> dict[str, str]:
    """key -> identity ("" unlabelled), read from the shards' json members."""
    from pipeline.shard_reader import ShardIndex, shard_urls

    idx = ShardIndex(shard_urls(shards_dir, "train"), ("json",))
    return {idx.key(i): (idx.identity(i) or "") for i in range(len(idx))}


# ============================================================================================ losses


def _snn_by_hand(z: np.ndarray, labels: list[int], T: float) -> float:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    terms = []
    for k in range(len(z)):
        num = sum(math.exp(-float(np.sum((z[k] - z[j]) ** 2)) / T) for j in range(len(z)) if j != k and labels[j] == labels[k])
        den = sum(math.exp(-float(np.sum((z[k] - z[j]) ** 2)) / T) for j in range(len(z)) if j != k)
        if num > 0:
            terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


def test_snn_loss_equals_a_hand_computation_and_falls_when_same_identity_points_close_in():
    z = np.array([[1.0, 0.2], [0.8, -0.3], [-0.5, 1.0], [0.1, 0.9], [-1.0, -0.4], [0.3, -1.0]])
    labels = [0, 0, 1, 1, 2, 2]
    for T in (1.0, 0.3):
        got = float(soft_nearest_neighbour_loss(torch.tensor(z), torch.tensor(labels), T))
        assert got == pytest.approx(_snn_by_hand(z, labels, T), rel=1e-5)
    # same-identity points move together: the loss falls (at every step)
    centres = np.array([z[0] + z[1], z[2] + z[3], z[4] + z[5]]) / 2
    before = float(soft_nearest_neighbour_loss(torch.tensor(z), torch.tensor(labels)))
    last = before
    for a in (0.3, 0.6, 0.9):
        moved = (1 - a) * z + a * centres[np.array(labels)]
        now = float(soft_nearest_neighbour_loss(torch.tensor(moved), torch.tensor(labels)))
        assert now < last
        last = now
    assert last < 0.5 * before
    # a point without a same-label partner is only a negative; no partner anywhere: 0 with a graph
    lone = [0, 0, 1, 1, 2, 3]
    want = _snn_by_hand(z, lone, 1.0)
    assert float(soft_nearest_neighbour_loss(torch.tensor(z), torch.tensor(lone))) == pytest.approx(want, rel=1e-5)
    x = torch.tensor(z, requires_grad=True)
    zero = soft_nearest_neighbour_loss(x, torch.arange(6))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    # a learned temperature gets a gradient
    log_t = torch.zeros((), requires_grad=True)
    soft_nearest_neighbour_loss(torch.tensor(z), torch.tensor(labels), log_t.exp()).backward()
    assert log_t.grad is not None and float(log_t.grad) != 0.0


def test_dirichlet_weights_are_convex_and_uniform_on_average():
    for n in (1, 2, 4, 7):
        ws = np.stack([dirichlet_weights(n, 1.0, seed) for seed in range(2000)])
        assert ws.shape == (2000, n) and (ws >= 0).all()
        np.testing.assert_allclose(ws.sum(axis=1), 1.0, atol=1e-6)
        if n > 1:  # E[w_j] = 1/n, Var = (n - 1) / (n^2 (n + 1)) for alpha 1
            se = math.sqrt((n - 1) / (n * n * (n + 1)) / 2000)
            assert np.all(np.abs(ws.mean(axis=0) - 1 / n) < 3 * se)
    assert np.array_equal(dirichlet_weights(4, 1.0, 7), dirichlet_weights(4, 1.0, 7))
    assert not np.array_equal(dirichlet_weights(4, 1.0, 7), dirichlet_weights(4, 1.0, 8))
    with pytest.raises(ValueError):
        dirichlet_weights(0, 1.0, 0)


def test_identity_drop_follows_the_linear_schedule_in_the_drawing_code():
    cfg = ie.MainConfig(max_steps=101, batch_size=16)
    phase = ie.Main()
    n = 2000
    positions = list(range(n))
    for step, p in ((0, 1.0), (50, 0.525), (100, 0.05)):
        assert ie.id_drop_p(cfg, step) == pytest.approx(p)
        ctx = SimpleNamespace(draws=SampleDraws(0, positions), global_step=step)
        ctx.draws.standard((1, 2, 2), 10)  # the draws every step makes first
        own, seeds = phase.plan(ctx, cfg)
        rate = float(own.float().mean())
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(rate - p) <= 3 * se + 1e-9, (step, rate, p)
        assert len(set(seeds)) == n  # one Dirichlet seed per face
    assert ie.id_drop_p(cfg, 500) == pytest.approx(0.05)
    # the generic null-condition dropout stays constant with id_drop: own ...
    assert phase.dropout(cfg, 0) == phase.dropout(cfg, 100) == (0.05, 0.05, 0.05)
    # ... and is the schedule with id_drop: null (identity independent of the text dropout)
    null = ie.MainConfig(max_steps=101, batch_size=16, id_drop="null")
    null.dropout.image = null.dropout.both = 0.0
    i, t, both = phase.dropout(null, 50)
    assert i + both == pytest.approx(0.525) and t + both == pytest.approx(0.05) and both == pytest.approx(0.525 * 0.05)


def test_config_checks():
    with pytest.raises(Exception, match="batch_size"):
        train_params({"train": {"methods": {METHOD: {"main": {"batch_size": 7}}}}})
    with pytest.raises(Exception, match="per_identity"):
        train_params({"train": {"methods": {METHOD: {"main": {"per_identity": 1, "batch_size": 4}}}}})
    with pytest.raises(Exception, match="dropout.image"):
        train_params({"train": {"methods": {METHOD: {"main": {"id_drop": "null"}}}}})
    tp = train_params({"train": {"methods": {METHOD: {"main": {"identities": 3, "per_identity": 4, "singles": 2,
                                                                "batch_size": 14}}}}})
    assert ie.singles(tp.phase(METHOD, "main")) == 2
    d = ie.MainConfig()  # the paper's defaults
    assert (d.lr, d.optimizer, d.a_id, d.a_agnostic, d.id_drop_start, d.id_drop_end, d.per_identity) == \
        (5e-5, "adam", 0.01, 0.01, 1.0, 0.05, 4)
    assert d.batch_size == d.identities * d.per_identity + ie.singles(d)


# ============================================================================================ data


def test_every_batch_holds_k_groups_of_m_same_identity_faces_then_singles(shards, tmp_path, caplog):
    p = _params(tmp_path, shards, identities=2, per_identity=3, singles=4, batch_size=10)
    tp = train_params(p)
    m = ie.METHOD
    dm = PersonaDataModule(m, m.phase("main"), tp.train, tp.phase(METHOD, "main"))
    who = _identities(shards)
    ds = dm.dataset()
    unlabelled = {k for k, v in who.items() if not v}
    for b in range(8):
        batch = ds.batch(b)
        ids = [who[k] for k in batch["key"]]
        assert ids == batch["identity"]  # what the loss reads is what the shards say
        groups = [ids[i * 3:(i + 1) * 3] for i in range(2)]
        assert all(len(set(g)) == 1 and g[0] for g in groups), groups  # M faces of ONE identity
        assert groups[0][0] != groups[1][0]  # K different identities
        assert batch["group"].tolist()[:6] == [2 * b] * 3 + [2 * b + 1] * 3 and batch["group"].tolist()[6:] == [-1] * 4
        assert set(batch["key"][6:]) <= unlabelled  # the singles are the unlabelled faces
        assert batch[FACES].shape == (10, 1, 3, 128, 128) and batch[FACES].dtype == torch.uint8
        assert torch.equal(batch[WEIGHTS], torch.ones(10, 1))
        for g in range(2):  # a group repeats a face only when its identity has fewer than M
            keys = batch["key"][g * 3:(g + 1) * 3]
            n_faces = sum(1 for v in who.values() if v == groups[g][0])
            assert (len(set(keys)) == 3) == (n_faces >= 3)

    # the short identities are counted, named, logged and reach the run's metrics
    with caplog.at_level("WARNING", logger="persona.training.data"):
        rep = dm.describe()["sampler"]
    assert rep["identities"] == 5 and rep["identities_short"] == 2 and rep["short_identities"] == ["solo", "synthetic_003"]
    assert rep["faces_unlabeled"] == 6 and rep["singles_pool"] == "unlabeled" and rep["per_identity"] == 3
    assert "2 of 5 identities have fewer than 3 faces" in caplog.text
    # too few unlabelled faces: labelled faces serve as singles too
    few = IdentityGroupedSampler(2, 3, 4, min_unlabeled=7)
    assert few.describe(dm.train_source)["singles_pool"] == "all"
    keys = {dm.train_source.key(i) for b in range(20) for i, _ in few.slots(dm.train_source, b, 0, 1, 10, 0, False)[6:]}
    assert keys - unlabelled


def test_ranks_draw_disjoint_groups(shards, tmp_path):
    """2 ranks: each indexes all shards (an identity's faces span them); the 2 x K groups of a step
    are distinct identities; over the steps no group (label) is drawn twice; the ranks' streams are
    those of the sampler with (rank, world)."""
    tp = train_params(_params(tmp_path, shards))
    m = ie.METHOD
    dm = PersonaDataModule(m, m.phase("main"), tp.train, tp.phase(METHOD, "main"))
    who = _identities(shards)
    halves = [dm.dataset(0, r, 2) for r in (0, 1)]
    assert not any(h.rank_source for h in halves) and all(len(h.source) == 20 for h in halves)
    labels_seen: set[int] = set()
    per_epoch: list[str] = []
    for b in range(6):
        ids, labels = [], []
        for h in halves:
            batch = h.batch(b)
            for g in range(2):
                sl = slice(g * 2, (g + 1) * 2)
                ident = {who[k] for k in batch["key"][sl]}
                assert len(ident) == 1
                ids.append(ident.pop())
                labels.append(int(batch["group"][sl][0]))
            assert batch["group"].tolist()[4:] == [-1, -1]
        assert len(set(ids)) == 4, f"step {b}: a global batch repeats an identity {ids}"
        assert not labels_seen & set(labels)
        labels_seen |= set(labels)
        per_epoch += ids
    # 5 identities, 4 per global step: an identity epoch = one step, a different one sits out each time
    assert len(set(per_epoch)) == 5
    fresh = IdentityGroupedSampler(2, 2, 2, min_unlabeled=2)
    for r in (0, 1):  # deterministic per (seed, step, rank, world)
        assert fresh.slots(halves[r].source, 3, r, 2, 6, tp.train.seed, False) == \
            halves[r].sampler.slots(halves[r].source, 3, r, 2, 6, tp.train.seed, False)


# ============================================================================================ model


def test_set_encoder_aggregates_encodings_and_has_a_null_identity():
    torch.manual_seed(0)
    enc = SetEncoder(cross_dim=32, **{"widths": [8, 16], "blocks": [1, 1], "image_size": 32})
    faces = torch.randint(0, 256, (2, 3, 3, 128, 128), dtype=torch.uint8)
    z = enc.encode(faces.reshape(6, 3, 128, 128)).view(2, 3, -1)
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    agg = enc.aggregate(faces, w)
    torch.testing.assert_close(agg[0], (w[0, :, None] * z[0]).sum(0))
    torch.testing.assert_close(agg[1], z[1, 0])
    tok = enc({FACES: faces, WEIGHTS: w})
    assert tok.shape == (2, 4, 32)
    null = enc.null_inputs({FACES: faces, WEIGHTS: w}, torch.tensor([True, False]))
    torch.testing.assert_close(enc(null)[0], enc.project(torch.zeros(1, enc.z_dim))[0])
    torch.testing.assert_close(enc(null)[1], tok[1])
    # the weighted sum over a group mixes the group's encodings; own faces and singles keep theirs
    group = torch.tensor([4, 4, 4, -1])
    zz = torch.randn(4, 5)
    out = ie.mix_groups(zz, group, torch.tensor([False, True, False, True]), lambda first, n: np.full(n, 1 / n))
    torch.testing.assert_close(out[0], zz[:3].mean(0))
    torch.testing.assert_close(out[2], zz[:3].mean(0))
    torch.testing.assert_close(out[1], zz[1])
    torch.testing.assert_close(out[3], zz[3])


def test_training_logs_each_term_and_trains_the_unet_only_when_asked(shards, tmp_path):
    from training.adapter import read_adapter_file
    from training.train import train

    res = train(_params(tmp_path, shards), METHOD, "main")
    assert res["global_step"] == 3
    met = res["metrics"]
    assert {"loss", "loss_diff_id", "loss_id", "loss_diff_agnostic"} <= set(met)
    assert met["loss_id"] > 0 and met["sampler_identities_short"] == 1 and met["sampler_identities"] == 5
    plots = tmp_path / "plots" / f"train_{METHOD}_main"  # one DVC plot per logged loss term
    assert {f.name for f in plots.glob("loss*.csv")} == {"loss.csv", "loss_diff_id.csv", "loss_id.csv", "loss_diff_agnostic.csv"}
    tensors, meta = read_adapter_file(res["adapter"])
    assert {k.split(".")[0] for k in tensors} == {"conditioner", "injection"} and json.loads(meta["trained_base"]) == []
    record = json.loads(Path(res["adapter_json"]).read_text())
    assert record["sampler"]["per_identity"] == 2
    res_u = train(_params(tmp_path / "u", shards, max_steps=1, train_unet=True), METHOD, "main")
    tensors_u, meta_u = read_adapter_file(res_u["adapter"])
    assert json.loads(meta_u["trained_base"]) == ["unet"] and any(k.startswith("base.unet.") for k in tensors_u)


# ============================================================================================ generation + CLI


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A tiny adapter trained through `persona train` (the CLI path), with MLflow."""
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("ie_run")
    p = _params(tmp, shards, mlflow=True, max_steps=2)
    p["evaluate"] = {"adapters": {METHOD: str(tmp / "models" / METHOD / "main")}, "shards": str(shards),
                     "prompts": ["a photo of a face", "a face"], "steps": 2, "num_images": 2, "device": "cpu",
                     "metrics_out": str(tmp / "metrics" / "evaluate_{method}.json"),
                     "report_out": str(tmp / "eval" / "{method}" / "report.json"),
                     "grid_out": str(tmp / "plots" / "evaluate_{method}_grid.png"),
                     "images_out": str(tmp / "eval" / "{method}" / "images"), "control": {"enabled": False}}
    p["registry"] = {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "artifact_location": str(tmp / "mlartifacts"),
                     "metrics": str(tmp / "eval" / "{method}" / "report.json"),
                     "out": str(tmp / "metrics" / "register_{method}.json")}
    p["generate"] = {"steps": 2, "guidance": 3.0, "device": "cpu"}
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    try:
        assert main(["train", "--method", METHOD, "--phase", "main", "--params", str(tmp / "params.yaml")]) == 0
    finally:  # MLflow exports the tracking URI: keep it out of later tests (a module fixture outlives conftest's guard)
        for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
            if k not in before:
                del os.environ[k]
        os.environ.update(before)
    return tmp


def test_generation_with_1_and_3_references_is_order_free(trained, shards):
    from pipeline.shard_reader import ShardIndex, shard_urls
    from training.generate import Generator

    gen = Generator.load(str(trained / "models" / METHOD / "main"), device="cpu", dtype="fp32")
    idx = ShardIndex(shard_urls(shards, "train"), ("face.jpg", "json"))
    obama = [idx.get(i, ("face.jpg",)) for i in range(len(idx)) if idx.identity(i) == "synthetic_000"][:3]
    m = gen.method
    kw = dict(steps=2, guidance=3.0)
    one = gen.sample([[m.inputs(obama[:1])]], ["a face"], [3], **kw)[0]
    three = m.inputs(obama)
    assert three[FACES].shape == (ie.MAX_REFERENCES, 3, 128, 128) and three[WEIGHTS].sum() == pytest.approx(1.0)
    assert np.count_nonzero(three[WEIGHTS]) == 3
    img3 = gen.sample([[three]], ["a face"], [3], **kw)[0]
    assert one.shape == img3.shape == (64, 64, 3) and not np.array_equal(one, img3)
    for perm in ([2, 0, 1], [1, 2, 0]):
        shuffled = [obama[i] for i in perm]
        again = m.inputs(shuffled)
        assert all(np.array_equal(again[k], three[k]) for k in three)
        assert np.array_equal(gen.sample([[again]], ["a face"], [3], **kw)[0], img3)
        # explicit weights move with their references
        w = [0.6, 0.3, 0.1]
        a = m.inputs(obama, w)
        b = m.inputs(shuffled, [w[i] for i in perm])
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(m.inputs(obama, [0.6, 0.3, 0.1])[WEIGHTS], three[WEIGHTS])
    # the conditioner sees the mean of the three encodings
    cond = gen.adapter.conditioner
    with torch.no_grad():
        faces = torch.from_numpy(np.stack([encoder_face(s["face.jpg"]) for s in obama]))
        want = cond.project(cond.encode(faces).mean(0, keepdim=True))
        got = cond({FACES: torch.from_numpy(three[FACES])[None], WEIGHTS: torch.from_numpy(three[WEIGHTS])[None]})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        m.inputs(obama * 6)
    with pytest.raises(ValueError, match="weights"):
        m.inputs(obama, [1, -1, 1])


def test_cli_evaluate_register_and_generate_with_references(trained, sample_raw, capsys):
    from pipeline.cli import main

    params = str(trained / "params.yaml")
    assert main(["evaluate", "--method", METHOD, "--params", params, "--no-mlflow"]) == 0
    res = json.loads((trained / "eval" / METHOD / "report.json").read_text())
    div = res["metrics"]["generation_diversity"]
    assert json.loads((trained / "metrics" / f"evaluate_{METHOD}.json").read_text())["generation_diversity"] == div["value"]
    assert res["method"] == METHOD and div["value"] is not None and div["value"] >= 0
    assert div["n"] == 4 and div["conditions"] == 2  # 1 val face x 2 prompts x 2 seeds
    assert main(["registry", "register", "--adapter", str(trained / "models" / METHOD / "main"), "--params", params]) == 0
    reg = json.loads((trained / "metrics" / f"register_{METHOD}.json").read_text())
    assert reg["name"] == f"persona-{METHOD}"

    photos = [str(sample_raw / "sample" / "obama" / n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    out = trained / "gen"
    refs = [a for p in photos for a in ("--ref", p)]
    assert main(["generate", "--method", METHOD, *refs, "--ref-weights", "0.5", "0.3", "0.2", "--prompt", "a face",
                 "--out", str(out), "--params", params, "--name", "three"]) == 0
    assert main(["generate", "--method", METHOD, "--ref", photos[0], "--prompt", "a face", "--out", str(out),
                 "--params", params, "--name", "one"]) == 0
    rec3 = json.loads((out / "three-p00-seed0.json").read_text())
    rec1 = json.loads((out / "one-p00-seed0.json").read_text())
    assert rec3["method"] == METHOD and [r["path"] for r in rec3["conditioning"][0]["references"]] == photos
    assert rec3["conditioning"][0]["weights"] == [0.5, 0.3, 0.2]
    w = np.load(out / rec3["conditioning"][0]["inputs"][WEIGHTS]["file"])
    np.testing.assert_allclose(sorted(w[w > 0]), [0.2, 0.3, 0.5], rtol=1e-6)
    assert rec1["image"]["sha256"] != rec3["image"]["sha256"]
    # --method checks an explicit adapter
    other = trained / "wrong"
    other.mkdir(exist_ok=True)
    meta = json.loads((trained / "models" / METHOD / "main" / "adapter.json").read_text())
    (other / "adapter.json").write_text(json.dumps({**meta, "method": "wplus"}))
    (other / "adapter.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit, match="not --method"):
        main(["generate", "--method", METHOD, "--adapter", str(other), "--ref", photos[0], "--prompt", "a face",
              "--params", params])
