"""The expression descriptor on REAL MediaPipe meshes of the sample photos, and the expression stage
(landmarks and precomputed backends: quarantine reasons, counts, incremental reruns)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.images import load_rgb
from pipeline.models import expression as E
from pipeline.stage import Context
from tests.conftest import make_params

PHOTOS = ("obama/obama.jpg", "obama/obama2.jpg", "obama/obama3.jpg", "biden/biden.jpg", "grace_hopper/grace_hopper.jpg",
          "eileen_collins/astronaut.png")
BILATERAL = [i for i, t in enumerate(E.TERMS) if t.endswith(("_r", "_l"))]


@pytest.fixture(scope="module")
def meshes(sample_raw):
    """{photo: (mesh of the photo, mesh of its horizontal mirror)} from MediaPipe FaceMesh."""
    from pipeline.models.faces import MediaPipeFaces
    from training.references import largest_face

    out = {}
    with MediaPipeFaces() as det:
        for rel in PHOTOS:
            rgb, _ = load_rgb(sample_raw / "sample" / rel)
            a = largest_face(det.detect(rgb))
            b = largest_face(det.detect(np.ascontiguousarray(rgb[:, ::-1])))
            assert a is not None and b is not None and a.mesh is not None and b.mesh is not None, rel
            out[rel] = (a.mesh, b.mesh)
    return out


def test_flip_permutation_swaps_right_and_left_terms_only():
    perm = np.array(E.FLIP)
    assert sorted(perm.tolist()) == list(range(E.DIM)) and np.array_equal(perm[perm], np.arange(E.DIM))
    for i, t in enumerate(E.TERMS):
        other = E.TERMS[perm[i]]
        if t.endswith("_r"):
            assert other == t[:-2] + "_l"
        elif t.endswith("_l"):
            assert other == t[:-2] + "_r"
        else:
            assert other == t
    assert 16 <= E.DIM <= 32 and len(BILATERAL) >= 12


def test_mirrored_photo_gives_the_descriptor_with_right_and_left_swapped(meshes):
    swapped, unswapped = [], []
    for rel, (m, mf) in meshes.items():
        d, f = E.descriptor(m), E.descriptor(mf)
        assert d.shape == (E.DIM,) and d.dtype == np.float32
        err = np.abs(f - E.flip(d))
        # MediaPipe is not exactly mirror-equivariant: a few hundredths of the eye / nose distances
        assert err.mean() < 0.03 and err.max() < 0.12, (rel, err.round(3))
        swapped.append(err[BILATERAL].mean())
        unswapped.append(np.abs(f - d)[BILATERAL].mean())
    # the swap is what makes them agree: without it the right / left terms disagree clearly more
    assert np.mean(swapped) < 0.75 * np.mean(unswapped), (swapped, unswapped)


def test_moving_the_mouth_open_raises_mouth_opening_and_leaves_the_eyes(meshes):
    mesh = np.asarray(meshes["obama/obama.jpg"][0], dtype=np.float64)
    d0 = E.descriptor(mesh)
    fr = E.canonical(mesh)
    moved = mesh.copy()
    # the lower lip (inner and outer midline points and their neighbours) 0.1 nose-heights towards the chin
    lower_lip = [14, 87, 178, 88, 95, 317, 402, 318, 324, 17, 84, 181, 91, 314, 405, 321]
    moved[lower_lip] += 0.1 * fr.sy * fr.v
    d1 = E.descriptor(moved)
    assert d1[E.MOUTH_OPEN] == pytest.approx(d0[E.MOUTH_OPEN] + 0.1, abs=1e-4)
    assert np.array_equal(d1[list(E.EYE_TERMS)], d0[list(E.EYE_TERMS)])
    # and the frame (eyes, nose) did not move: every brow term is unchanged too
    brows = [i for i, t in enumerate(E.TERMS) if t.startswith("brow")]
    assert np.array_equal(d1[brows], d0[brows])


def test_descriptor_is_invariant_to_translation_rotation_and_scale(meshes):
    mesh = np.asarray(meshes["biden/biden.jpg"][0], dtype=np.float64)
    a = np.deg2rad(17.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = (mesh @ rot.T) * 0.37 + [120.0, -40.0]
    assert np.allclose(E.descriptor(moved), E.descriptor(mesh), atol=1e-5)
    with pytest.raises(E.BadMesh):
        E.descriptor(np.zeros((478, 2)))
    with pytest.raises(E.BadMesh):
        E.descriptor(mesh[:100])


# ---------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, sample_raw):
    """ingest + dedup + align of four labeled sample photos (a folder source) and one manifest photo."""
    from stages import align, dedup, ingest

    base = tmp_path_factory.mktemp("expression")
    raw = base / "raw"
    for rel in PHOTOS[:4]:
        (raw / "people" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample_raw / "sample" / rel, raw / "people" / rel)
    (raw / "listed").mkdir()
    shutil.copy2(sample_raw / "sample" / PHOTOS[4], raw / "listed" / "grace.jpg")
    vec = np.arange(4, dtype=np.float32)
    (raw / "listed" / "list.csv").write_text(f"path,identity,expression_vector\ngrace.jpg,grace,\"{json.dumps(vec.tolist())}\"\n")
    params = make_params(raw, runtime={"part_size": 2})
    params.ingest.sources = [type(params.ingest.sources[0])(name="people", path=str(raw / "people")),
                             type(params.ingest.sources[0])(name="listed", path=str(raw / "listed" / "list.csv"))]
    ctx = Context.make(params, base / "data", base / "metrics")
    for mod in (ingest, dedup, align):
        mod.run(ctx)
    shutil.copytree(base / "data", base / "pristine")
    return ctx


def _fresh(ctx: Context) -> Context:
    root = Path(ctx.root)
    shutil.rmtree(root)
    shutil.copytree(root.parent / "pristine", root)
    return ctx


def test_landmarks_backend_writes_raw_descriptors_and_reruns_compute_nothing(aligned):
    from stages import expression

    ctx = _fresh(aligned)
    stats = expression.run(ctx)
    assert stats["counts"] == {"ok": 5} and stats["computed"] == 5
    t = pd.read_parquet(Path(ctx.root) / "expression" / "table.parquet")
    assert (t["expr_dim"] == E.DIM).all() and t["expr_weights_real"].all()
    assert set(t["expr_model"]) == {f"mediapipe-{E.VERSION}"}
    al = pd.read_parquet(Path(ctx.root) / "align" / "table.parquet").set_index("key")
    for r in t.itertuples():  # the blob is exactly the descriptor of align's stored mesh
        v = np.load(Path(ctx.root) / "expression" / r.expr_blob)
        mesh = np.load(Path(ctx.root) / "align" / al.loc[r.key, "mesh_blob"])
        assert np.array_equal(v, E.descriptor(mesh))
    m = json.loads(ctx.metrics_path("expression").read_text())
    assert m["faces_in"] == 5 and m["by_status"] == {"ok": 5} and m["descriptor"]["faces"] == 5
    assert set(m["descriptor"]["mean"]) == set(E.TERMS) and m["model"]["weights_real"] is True
    again = expression.run(ctx)
    assert again["computed"] == 0 and again["cached"] == 5


def test_a_face_without_a_mesh_is_quarantined_with_a_reason(aligned):
    from stages import expression

    ctx = _fresh(aligned)
    path = Path(ctx.root) / "align" / "table.parquet"
    t = pd.read_parquet(path)
    ok = t[t["status"] == "ok"].sort_values("key")
    victim = ok["key"].iloc[0]
    t.loc[t["key"] == victim, "mesh_blob"] = None  # e.g. the SCRFD detector keeps no mesh
    t.loc[t["key"] == victim, "sig"] = "changed"
    t.to_parquet(path)
    stats = expression.run(ctx)
    assert stats["counts"] == {"no_landmarks": 1, "ok": 4}
    row = pd.read_parquet(Path(ctx.root) / "expression" / "table.parquet").set_index("key").loc[victim]
    assert row["status"] == "no_landmarks" and "mesh" in row["error"] and row["expr_blob"] is None
    m = json.loads(ctx.metrics_path("expression").read_text())
    assert m["faces_in"] == sum(m["by_status"].values()) == 5


def test_precomputed_backend_reads_manifest_and_npy_vectors_and_recomputes_an_edited_one(aligned, tmp_path):
    from stages import expression

    ctx = _fresh(aligned)
    npy = tmp_path / "vectors"
    (npy / "people" / "obama").mkdir(parents=True)
    np.save(npy / "people" / "obama" / "obama.npy", np.full(4, 0.5, np.float32))
    np.save(npy / "people" / "obama" / "obama2.npy", np.ones(7, np.float32))  # wrong length
    ctx.params.expression.backend = "precomputed"
    ctx.params.expression.precomputed.dim = 4
    ctx.params.expression.precomputed.npy_dir = str(npy)
    stats = expression.run(ctx)
    assert stats["counts"] == {"bad_expression": 1, "no_expression": 2, "ok": 2}, stats
    t = pd.read_parquet(Path(ctx.root) / "expression" / "table.parquet")
    al = pd.read_parquet(Path(ctx.root) / "align" / "table.parquet").set_index("key")
    got = {al.loc[r.key, "path"].rsplit("/", 1)[-1]: np.load(Path(ctx.root) / "expression" / r.expr_blob)
           for r in t.itertuples() if r.status == "ok"}
    assert np.array_equal(got["grace.jpg"], np.arange(4, dtype=np.float32))  # the manifest column
    assert np.array_equal(got["obama.jpg"], np.full(4, 0.5, np.float32))  # the .npy file
    bad = t[t["status"] == "bad_expression"]["error"].iloc[0]
    assert "length 7" in bad
    assert set(t["expr_model"]) == {"precomputed:precomputed"}
    np.save(npy / "people" / "obama" / "obama.npy", np.full(4, 0.25, np.float32))
    again = expression.run(ctx)
    assert again["computed"] == 1 and again["counts"] == stats["counts"]
