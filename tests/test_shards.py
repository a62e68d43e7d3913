"""Shards: join accounting, identity-disjoint split, deterministic bytes, and the streaming reader."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ShardsConfig, params_from_dict
from pipeline.images import encode_jpeg, encode_png
from pipeline.shard_reader import MemorySource, ShardIndex, make_dataset, shard_urls
from pipeline.shards import (
    encoded_members,
    shard_metrics,
    split_identities,
    synthetic_samples,
    write_shards,
    write_tar,
)
from pipeline.stage import Context
from pipeline.store import ItemStore, hash_key
from stages import shards as shards_stage

IDENTITIES = ["alice", "bob", "carol", "dave"]
# the writer's member order with the stages registered today: align's, then caption, identity, masks,
# wplus (pipeline order; ties by name), json last
MEMBER_ORDER = ["jpg", "face.jpg", "txt", "id.npy", "mask.png", "face_mask.png", "wplus.npy", "json"]
SIZE = 48  # px of the fake crops


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _faces(extra: int = 0) -> list[dict]:
    """12 labeled faces (4 identities x 3), 2 unlabeled, 3 that fail later, `extra` new labeled ones."""
    faces = []
    for i in range(12):
        faces.append({"image": f"img{i}", "identity": IDENTITIES[i % 4]})
    faces += [{"image": "group0", "identity": None}, {"image": "group1", "identity": None}]
    faces += [{"image": "failmask", "identity": "alice", "fail": "masks"},
              {"image": "failwplus", "identity": "bob", "fail": "wplus"},
              {"image": "failid", "identity": "carol", "fail": "identity"}]
    faces += [{"image": f"new{i}", "identity": IDENTITIES[i % 4]} for i in range(extra)]
    for f in faces:
        f["image_id"] = hashlib.sha256(f["image"].encode()).hexdigest()
        f["key"] = f"{f['image_id'][:16]}-0"
    return faces


def _commit(store: ItemStore, rows: list[dict]) -> None:
    for r in rows:
        r["cache_key"] = hash_key(store.stage, r["key"], r.get("sig", ""))
    store.commit(rows)
    store.consolidate(r["cache_key"] for r in rows)


def build_tables(root: Path, extra: int = 0, caption: bool = True) -> list[dict]:
    """Fake align/masks/caption/wplus/identity tables with real blobs; returns the face specs."""
    faces = _faces(extra)
    rng = np.random.default_rng(0)
    st = {s: ItemStore(root, s) for s in ("align", "masks", "caption", "wplus", "identity")}
    rows: dict[str, list[dict]] = {s: [] for s in st}
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = ((((yy - SIZE / 2) / 15) ** 2 + ((xx - SIZE / 2) / 12) ** 2) <= 1).astype(np.uint8) * 255
    for f in faces:
        k, ck = f["key"], hash_key("ck", f["key"])
        colour = np.array([40 + 50 * IDENTITIES.index(f["identity"]) if f["identity"] else 220, 120, 90], np.uint8)
        img = np.clip(colour + rng.integers(-10, 10, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        rows["align"].append({
            "key": k, "status": "ok", "error": "", "sig": hash_key("align", k), "image_id": f["image_id"],
            "identity": f["identity"], "source": "sample" if f["identity"] else "unlabeled", "path": f"/raw/{f['image']}.jpg",
            "face_index": 0, "bbox": [1.0, 2.0, 30.5, 40.0], "score": 0.97, "lm5": [[10.0, 12.0]] * 5,
            "quad": [[0.0, 0.0], [0.0, 9.0], [9.0, 9.0], [9.0, 0.0]], "lm5_aligned": [[1.5, 2.5]] * 5,
            "detector_model": "mediapipe", "detector_fingerprint": "det-fp", "detector_weights_real": True,
            "face_blob": st["align"].blobs.put(ck, f"{k}.face.jpg", encode_jpeg(img)),
            "wild_blob": st["align"].blobs.put(ck, f"{k}.wild.jpg", encode_jpeg(img[::-1])),
        })
        fail = f.get("fail")
        rows["masks"].append({
            "key": k, "status": "error" if fail == "masks" else "ok", "error": "boom" if fail == "masks" else "",
            "sig": hash_key("masks", k),
            "mask_blob": None if fail == "masks" else st["masks"].blobs.put(ck, f"{k}.mask.png", encode_png(mask)),
            "face_mask_blob": None if fail == "masks" else st["masks"].blobs.put(ck, f"{k}.face_mask.png", encode_png(mask)),
            "person_blob": None,
        })
        rows["caption"].append({
            "key": k, "status": "ok", "error": "", "sig": hash_key("caption", k),
            "caption": f"a photo of {f['identity'] or 'someone'} smiling", "caption_model": "blip2",
            "caption_fingerprint": "cap-fp", "caption_weights_real": False,
        })
        if fail != "wplus":  # no row at all: the face never reached wplus
            rows["wplus"].append({
                "key": k, "status": "ok", "error": "", "sig": hash_key("wplus", k),
                "wplus_blob": st["wplus"].blobs.put(ck, f"{k}.wplus.npy", _npy(rng.standard_normal((18, 512)).astype(np.float32))),
                "wplus_model": "e4e", "wplus_fingerprint": "e4e-fp", "wplus_weights_real": False,
            })
        e = rng.standard_normal(512).astype(np.float32)
        rows["identity"].append({
            "key": k, "status": "error" if fail == "identity" else "ok", "error": "", "sig": hash_key("identity", k),
            "id_blob": None if fail == "identity" else st["identity"].blobs.put(ck, f"{k}.id.npy", _npy(e / np.linalg.norm(e))),
            "id_model": "arcface", "id_fingerprint": "id-fp", "id_weights_real": True,
        })
    # align rows that are not faces in: an image without faces and a too-small face
    rows["align"].append({"key": "ffffffffffffffff-x", "status": "no_face", "error": "none", "sig": "s1",
                          "image_id": "f" * 64, "identity": "alice", "source": "sample", "path": "/raw/x.jpg", "face_index": -1})
    rows["align"].append({"key": "eeeeeeeeeeeeeeee-0", "status": "too_small", "error": "small", "sig": "s2",
                          "image_id": "e" * 64, "identity": "bob", "source": "sample", "path": "/raw/y.jpg", "face_index": 0})
    for s, store in st.items():
        if s == "caption" and not caption:
            continue
        _commit(store, rows[s])
    return faces


# the stages whose tables `build_tables` fakes (others, e.g. clip_image, are not joined here)
FAKED = {"required": ["masks", "wplus", "identity"], "optional": ["caption"]}


def _cfg(**kw) -> ShardsConfig:
    return ShardsConfig(samples_per_shard=2, val_fraction=0.3, seed=0, grid_size=6, grid_tile=64, **{**FAKED, **kw})


def _read_tar(path: Path) -> list[tuple[str, bytes, tarfile.TarInfo]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read(), m) for m in tf.getmembers()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    faces = build_tables(root)
    cfg = _cfg()
    joined = shards_stage.join(root, cfg)
    index, rewritten = write_shards(joined, root / "shards", cfg)
    assert rewritten
    return root, faces, joined, index


# ---- split


def test_split_identities_disjoint_stable_and_both_non_empty():
    ids = [f"id{i}" for i in range(200)]
    s = split_identities(ids, 0.2, seed=3)
    assert set(s.values()) == {"train", "val"}
    assert 0.1 < sum(v == "val" for v in s.values()) / len(ids) < 0.3
    # adding identities never moves an existing one (hash per identity)
    more = split_identities(ids + [f"new{i}" for i in range(50)], 0.2, seed=3)
    assert all(more[i] == s[i] for i in ids)
    assert split_identities(ids, 0.2, seed=4) != s  # the seed matters
    for pair in (["a", "b"], ["x", "y"], ["p", "q"]):
        assert sorted(split_identities(pair, 0.2, 0).values()) == ["train", "val"]
        assert sorted(split_identities(pair, 0.99, 0).values()) == ["train", "val"]
    assert set(split_identities(["a", "b"], 0.0, 0).values()) == {"train"}
    assert split_identities(["solo"], 0.5, 0) in ({"solo": "train"}, {"solo": "val"})


# ---- writer


def test_join_accounts_for_every_face(built):
    root, faces, joined, index = built
    assert joined.faces_in == 17
    assert {k: len(v) for k, v in joined.excluded.items()} == {"identity:error": 1, "masks:error": 1, "wplus:missing": 1}
    assert joined.base_rejected == {"no_face": 1, "too_small": 1}
    m = shard_metrics(joined, index)
    assert m["faces_in"] == m["written"]["total"] + m["excluded_total"] == 17
    assert m["written"]["total"] == 14 and m["written"]["train"] + m["written"]["val"] == 14
    assert m["identities"]["train"] + m["identities"]["val"] == 4 and m["identities"]["val"] >= 1
    assert m["unlabeled_faces"] == {"train": 2, "val": 0}
    assert m["faces_per_identity"]["min"] == 3 and m["images_per_identity"]["max"] == 3
    assert {x["name"] for x in m["models"]["wplus"]} == {"e4e"} and m["all_weights_real"] is False


def test_shards_split_by_identity_with_all_keys(built):
    root, faces, joined, index = built
    out = root / "shards"
    seen: dict[str, set] = {"train": set(), "val": set()}
    keys = []
    for s in index["shards"]:
        members = _read_tar(out / s["file"])
        assert index["sample_keys"] == MEMBER_ORDER
        assert s["samples"] <= 2 and len(members) == s["samples"] * len(MEMBER_ORDER)
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        for name, data, ti in members:
            assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode) == (0, 0, 0, "", "", 0o644)
        by_key: dict[str, dict] = {}
        for name, data, _ in members:
            k, ext = name.split(".", 1)
            by_key.setdefault(k, {})[ext] = data
        for k, smp in by_key.items():
            assert list(smp) == list(MEMBER_ORDER)  # fixed member order
            meta = json.loads(smp["json"])
            assert meta["split"] == s["split"] and meta["key"] == k
            seen[s["split"]].add(meta["identity"])
            w = np.load(io.BytesIO(smp["wplus.npy"]))
            e = np.load(io.BytesIO(smp["id.npy"]))
            assert w.dtype == np.float16 and w.shape == (18, 512)
            assert e.dtype == np.float32 and e.shape == (512,) and abs(np.linalg.norm(e) - 1) < 1e-4
            assert smp["jpg"][:2] == b"\xff\xd8" and smp["mask.png"][:4] == b"\x89PNG"
            assert smp["txt"].decode().startswith("a photo of")
            assert meta["bbox"] == [1.0, 2.0, 30.5, 40.0] and len(meta["landmarks"]) == 5 and len(meta["quad"]) == 4
            assert meta["models"]["identity"] == {"name": "arcface", "fingerprint": "id-fp", "weights_real": True}
            assert set(meta["models"]) == {"align", "caption", "wplus", "identity"}
            keys.append(k)
    assert keys == sorted(keys[: index["splits"]["train"]["samples"]]) + sorted(keys[index["splits"]["train"]["samples"]:])
    assert len(keys) == len(set(keys)) == 14
    assert not (seen["train"] - {None}) & seen["val"]  # identity-disjoint
    assert None in seen["train"] and None not in seen["val"]  # unlabeled only in train
    assert seen["val"] - {None}
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert index["identities"]["alice"]["faces"] == 3


def test_rewrite_is_byte_identical_and_skips_unchanged(built, tmp_path):
    root, faces, joined, index = built
    out2 = tmp_path / "again"
    index2, rewritten = write_shards(shards_stage.join(root, _cfg()), out2, _cfg())
    assert rewritten and index2 == index
    a, b = root / "shards", out2
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    stamp = (b / "train" / "train-000000.tar").stat().st_mtime_ns
    _, rewritten = write_shards(shards_stage.join(root, _cfg()), out2, _cfg())
    assert not rewritten and (b / "train" / "train-000000.tar").stat().st_mtime_ns == stamp


def test_stage_incremental_stale_shards_and_missing_caption(tmp_path):
    root = tmp_path / "data"
    build_tables(root)
    params = params_from_dict({"shards": {"samples_per_shard": 2, "val_fraction": 0.3, "grid_size": 4, **FAKED}})
    ctx = Context.make(params, root, tmp_path / "metrics")
    stats = shards_stage.run(ctx)
    assert stats["inputs"] == 17 and stats["computed"] == 14 and stats["counts"]["ok"] == 14
    assert sum(stats["counts"].values()) == stats["inputs"]
    assert (root / "shards" / "index.json").exists() and (tmp_path / "metrics" / "shards.json").exists()
    assert json.loads((root / "runs" / "shards.json").read_text())["computed"] == 14
    # one new face -> computed == 1
    for s in ("align", "masks", "caption", "wplus", "identity"):
        shutil.rmtree(root / s)
    build_tables(root, extra=1)
    stats = shards_stage.run(ctx)
    assert stats["computed"] == 1 and stats["rewritten"] and stats["counts"]["ok"] == 15
    stats = shards_stage.run(ctx)
    assert stats["computed"] == 0 and not stats["rewritten"]
    # bigger shards -> fewer files; the stale ones are removed
    before = set(shard_urls(root / "shards"))
    params.shards.samples_per_shard = 100
    stats = shards_stage.run(ctx)
    after = {str(p) for p in (root / "shards").rglob("*.tar")}
    assert len(before) > 2 and len(after) == 2 and after == set(shard_urls(root / "shards"))
    # caption is optional: without its table the shards carry '' captions and say so
    shutil.rmtree(root / "caption")
    stats = shards_stage.run(ctx)
    m = json.loads((tmp_path / "metrics" / "shards.json").read_text())
    report = json.loads((tmp_path / "metrics" / "reports" / "shards.json").read_text())  # names, lists
    assert report["missing_optional_stages"] == ["caption"] and stats["counts"]["ok"] == 15
    assert "missing_optional_stages" not in m and all(not isinstance(v, (str, list)) for v in m.values())  # DVC: numbers
    smp = next(iter(make_dataset(root / "shards", "train")))
    assert smp["txt"] == "" and "caption" not in smp["json"]["models"]
    # a required table missing is a clear error
    shutil.rmtree(root / "wplus")
    with pytest.raises(FileNotFoundError, match="wplus"):
        shards_stage.run(ctx)
    params.shards.out = str(tmp_path / "elsewhere")
    params.shards.required = ["masks", "identity"]
    params.shards.optional = ["caption", "wplus"]
    shards_stage.run(ctx)
    assert (tmp_path / "elsewhere" / "index.json").exists()


# ---- reader


def test_reader_decodes_every_sample(built):
    root, faces, joined, index = built
    got = list(make_dataset(root / "shards", "train"))
    assert len(got) == index["splits"]["train"]["samples"]
    s = got[0]
    assert s["jpg"].dtype == np.uint8 and s["jpg"].shape == (SIZE, SIZE, 3)
    assert s["mask.png"].shape == (SIZE, SIZE) and s["wplus.npy"].dtype == np.float16
    assert s["id.npy"].dtype == np.float32 and isinstance(s["json"], dict) and isinstance(s["txt"], str)


def test_dataloader_two_workers_each_sample_once(built):
    root, faces, joined, index = built
    ds = make_dataset(root / "shards", "train", shuffle=4, seed=1)
    n = index["splits"]["train"]["samples"]
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        keys = [s["__key__"] for s in dl]
        assert len(keys) == n and len(set(keys)) == n
        assert isinstance(next(iter(make_dataset(root / "shards", "train")))["id.npy"], np.ndarray)


def test_shuffle_is_deterministic_per_epoch(built):
    root, *_ = built
    order = lambda ep, seed=0: [s["__key__"] for s in make_dataset(root / "shards", "train", decode=False, shuffle=8, seed=seed, epoch=ep)]
    assert order(0) == order(0)
    assert sorted(order(0)) == sorted(order(1)) and order(0) != order(1)
    assert order(0, seed=5) != order(0)


def test_random_access_decodes_only_asked_members_and_groups_by_identity(built):
    root, *_ = built
    streamed = {s["__key__"]: s for s in make_dataset(root / "shards", "train")}
    idx = ShardIndex(shard_urls(root / "shards", "train"), need=("face.jpg", "wplus.npy"))
    assert len(idx) == len(streamed) and not idx.skipped
    s = idx.get(0, ("face.jpg", "wplus.npy"))
    assert set(s) == {"__key__", "face.jpg", "wplus.npy"}  # nothing else read or decoded
    ref = streamed[s["__key__"]]
    np.testing.assert_array_equal(s["face.jpg"], ref["face.jpg"])  # the one decode path
    np.testing.assert_array_equal(s["wplus.npy"], ref["wplus.npy"])
    groups, unlabeled = idx.by_identity()
    assert list(groups) == sorted(groups) and sum(map(len, groups.values())) + len(unlabeled) == len(idx)
    for ident, members in groups.items():
        assert {streamed[idx.key(i)]["json"]["identity"] for i in members} == {ident}
    assert all(streamed[idx.key(i)]["json"]["identity"] is None for i in unlabeled)
    mem = MemorySource(synthetic_samples(5, identities=2, unlabeled=1))
    assert mem.by_identity() == ({"synthetic_000": [0, 2], "synthetic_001": [1, 3]}, [4])
    assert ShardIndex(shard_urls(root / "shards", "train"), need=("nope.npy",)).skipped == {"lacks nope.npy": len(idx)}


def test_resampled_yields_indefinitely(built):
    root, *_ = built
    ds = make_dataset(root / "shards", "val", resampled=True, decode=False)
    it = iter(ds)
    got = list(itertools.islice(it, 50))
    it.close()
    assert len(got) == 50 and len({s["__key__"] for s in got}) <= 6


def test_corrupt_member_and_truncated_tar_are_skipped_with_warning(tmp_path, caplog):
    samples = synthetic_samples(6, identities=2, seed=1, size=32, encoded=True)
    samples[2]["face.jpg"] = b"\xff\xd8 not a jpeg"
    write_tar(tmp_path / "a.tar", (encoded_members(s) for s in samples[:3]))
    write_tar(tmp_path / "b.tar", (encoded_members(s) for s in samples[3:]))
    # cut b.tar inside the last sample
    data = (tmp_path / "b.tar").read_bytes()
    last = samples[5]["__key__"]
    with tarfile.open(tmp_path / "b.tar") as tf:
        off = next(m.offset_data for m in tf.getmembers() if m.name == f"{last}.wplus.npy")
    (tmp_path / "b.tar").write_bytes(data[: off + 100])
    with caplog.at_level(logging.WARNING, logger="persona.shards"):
        got = [s["__key__"] for s in make_dataset([tmp_path / "a.tar", tmp_path / "b.tar"], None)]
    assert got == [samples[i]["__key__"] for i in (0, 1, 3, 4)]
    text = caplog.text
    assert samples[2]["__key__"] in text and last in text


def test_synthetic_samples_match_the_shard_format(tmp_path):
    dec = synthetic_samples(8, identities=3, seed=0, size=32, unlabeled=2)
    assert [s["json"]["identity"] for s in dec][-2:] == [None, None]
    assert dec[0]["wplus.npy"].dtype == np.float16 and dec[0]["wplus.npy"].shape == (18, 512)
    assert dec[0]["id.npy"].dtype == np.float32 and dec[0]["jpg"].shape == (32, 32, 3)
    enc = synthetic_samples(8, identities=3, seed=0, size=32, unlabeled=2, encoded=True)
    write_tar(tmp_path / "s.tar", (encoded_members(s) for s in enc))
    back = list(make_dataset([tmp_path / "s.tar"], None))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in dec]
    assert set(back[0]) - {"__url__"} == set(dec[0])
    np.testing.assert_array_equal(back[0]["wplus.npy"], dec[0]["wplus.npy"])
    np.testing.assert_array_equal(back[0]["face.jpg"].shape, dec[0]["face.jpg"].shape)
    # same identity embeddings are closer than different ones
    a, b, c = dec[0]["id.npy"], dec[3]["id.npy"], dec[1]["id.npy"]
    assert a @ b > a @ c
