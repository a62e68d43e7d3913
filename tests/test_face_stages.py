"""The face stages on the real sample photos: align, masks, caption, identity (and wplus)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.images import load_rgb
from pipeline.stage import Context
from stages import align, caption, clip_image, dedup, expression, identity, ingest, instances, masks
from tests.conftest import make_params


@pytest.fixture(scope="module")
def built(tmp_path_factory, sample_raw):
    tmp = tmp_path_factory.mktemp("faces")
    ctx = Context.make(make_params(sample_raw), tmp / "data", tmp / "metrics")
    for mod in (ingest, dedup, align, masks, caption, identity):
        mod.run(ctx)
    return ctx


def _table(ctx, stage):
    return pd.read_parquet(ctx.root / stage / "table.parquet")


def test_every_detected_face_in_group_photo_is_an_item(built, sample_raw):
    from pipeline.models import faces

    cfg = built.params.align
    path = sample_raw / "unlabeled" / "players.jpg"
    rgb, _ = load_rgb(path)
    with faces.load(cfg) as det:
        detected = det.detect(rgb)
    t = _table(built, "align")
    rows = t[t["path"] == str(path)]
    assert len(rows) == min(len(detected), cfg.max_faces) >= 10
    assert rows["key"].is_unique and set(rows["face_index"]) == set(range(len(rows)))
    assert set(rows["status"]) <= {"ok", "too_small", "cut_by_border", "no_landmarks"}
    small = rows[rows["quad_side"] < cfg.min_face_size]
    assert (small["status"] == "too_small").all()
    assert (rows["status"] == "ok").sum() >= 5
    assert rows.loc[rows["status"] != "ok", "error"].str.len().gt(0).all()


def test_align_outputs_upright_faces_with_landmarks_in_place(built):
    t = _table(built, "align")
    ok = t[t["status"] == "ok"]
    assert ok["identity"].notna().sum() == 7  # one face per labeled sample photo
    for r in ok.itertuples():
        lm = np.asarray(json.loads(r.lm5_aligned))
        # FFHQ alignment puts both eyes on a horizontal line in the upper half, mouth below
        assert abs(lm[0, 1] - lm[1, 1]) < 0.03 * 512
        assert lm[0, 0] < lm[1, 0] and lm[:2, 1].max() < 256 < lm[3:, 1].min() + 80
        face = load_rgb(built.root / "align" / r.face_blob)[0]
        assert face.shape == (512, 512, 3)


def test_counts_in_equal_counts_out(built):
    m = json.loads(built.metrics_path("align").read_text())
    assert m["images_in"] == m["images_with_faces"] + m["images_no_face"] + m["images_failed"]
    assert sum(m["faces_by_status"].values()) == m["faces_detected"]
    for stage in ("masks", "caption", "identity"):
        ms = json.loads(built.metrics_path(stage).read_text())
        assert ms["faces_in"] == sum(ms["by_status"].values()) == m["faces_by_status"]["ok"]


def test_masks_cover_the_face_not_the_background(built):
    t = _table(built, "masks")
    assert (t["status"] == "ok").all() and (t["mask_source"] == "mesh").all()
    for r in t.itertuples():
        m = load_rgb(built.root / "masks" / r.face_mask_blob)[0][..., 0]
        assert m[256, 256] > 200  # face centre
        assert m[5, 5] == 0 and m[5, 506] == 0  # corners of the aligned crop
        assert 0.15 < (m > 127).mean() < 0.7


def test_caption_none_backend_says_so(built):
    t = _table(built, "caption")
    assert (t["caption_backend"] == "none").all() and (~t["caption_weights_real"]).all()
    assert (t["caption"] == "").all()


def test_identity_embeddings_separate_people(built):
    a = _table(built, "align").set_index("key")
    t = _table(built, "identity")
    emb = {}
    for r in t.itertuples():
        name = a.loc[r.key, "path"].split("/")[-1]
        e = np.load(built.root / "identity" / r.id_blob)
        assert e.shape == (512,) and e.dtype == np.float32 and abs(np.linalg.norm(e) - 1) < 1e-4
        emb[name] = e
    obama = [emb[n] for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    for i in range(3):
        for j in range(i + 1, 3):
            assert obama[i] @ obama[j] > 0.5
        assert obama[i] @ emb["biden.jpg"] < 0.3


def test_rerun_computes_nothing(built):
    for mod, name in ((align, "align"), (masks, "masks"), (identity, "identity")):
        stats = mod.run(built)
        assert stats["computed"] == 0 and stats["cached"] == stats["inputs"] > 0, name


def _outputs(root, stage) -> dict:
    """A stage's table and blobs by relative path (not the journal: its split into parts may differ)."""
    d = root / stage
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and (p.name == "table.parquet" or "blobs" in p.relative_to(d).parts)}


STAGES = ("masks", "identity", "clip_image", "instances", "expression")


def test_in_process_runs_write_the_bytes_of_actor_runs(built, tmp_path):
    """Few items run in the stage's process (no Ray), pinned like a 1-CPU actor: ArcFace (onnxruntime),
    the masks, CLIP (torch), instances and expression give the bytes an actor run gives."""
    import copy
    import dataclasses
    import shutil

    runs = {}
    for name, runtime in (("inline", {"executor": "ray", "inline_below": 1000}),
                          ("actors", {"executor": "ray", "inline_below": 0, "workers": 2})):
        root = tmp_path / name
        for stage in ("ingest", "dedup", "align"):
            shutil.copytree(built.root / stage, root / stage)
        params = copy.deepcopy(built.params)
        params.runtime = dataclasses.replace(params.runtime, **runtime)
        ctx = Context.make(params, root, tmp_path / f"{name}-metrics")
        for mod in (masks, identity, clip_image, instances, expression):
            mod.run(ctx)
        runs[name] = {s: _outputs(root, s) for s in STAGES}
        reports = {s: json.loads((root / "runs" / f"{s}.json").read_text()) for s in STAGES}
        want = "in-process" if name == "inline" else "ray"
        assert all(r["executor"] == want and r["computed"] == r["inputs"] > 16 for r in reports.values()), reports
    for stage in STAGES:
        a, b = runs["inline"][stage], runs["actors"][stage]
        assert sorted(a) == sorted(b) and len(a) > 25, stage
        assert [k for k in a if a[k] != b[k]] == [], f"{stage}: in-process bytes differ from the actor run's"
        if stage in ("masks", "identity"):
            assert _outputs(built.root, stage) == a  # the local executor: the same pinned in-process path
