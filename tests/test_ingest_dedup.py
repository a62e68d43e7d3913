"""ingest and dedup as stages: every file gets a row, duplicates are found, the best copy is kept."""
import io
import json

import pandas as pd
import pytest
from PIL import Image

from pipeline.stage import Context
from stages import dedup, ingest
from tests.badfiles import EXPECTED, make_bad_folder
from tests.conftest import make_params


def _ctx(tmp_path, params):
    return Context.make(params, tmp_path / "data", tmp_path / "metrics")


def test_bad_files_all_recorded(tmp_path, raw_copy):
    make_bad_folder(raw_copy / "sample" / "badperson")
    ctx = _ctx(tmp_path, make_params(raw_copy))
    stats = ingest.run(ctx)
    table = pd.read_parquet(ctx.root / "ingest" / "table.parquet")
    bad = table[table["identity"] == "badperson"].set_index("relpath")
    for name, status in EXPECTED.items():
        assert bad.loc[f"badperson/{name}", "status"] == status, name
        if status != "ok":
            assert bad.loc[f"badperson/{name}", "error"]
    n_files = sum(1 for p in raw_copy.rglob("*") if p.is_file() and not p.name.startswith("."))
    metrics = json.loads(ctx.metrics_path("ingest").read_text())
    assert metrics["files_in"] == n_files == len(table) == stats["inputs"]
    assert sum(metrics["by_status"].values()) == n_files
    q = pd.read_csv(ctx.root / "ingest" / "quarantine.csv")
    assert sorted(q["path"].map(lambda p: p.split("/")[-1])) == sorted(n for n, s in EXPECTED.items() if s != "ok")


def test_identities_and_unlabeled(tmp_path, raw_copy):
    ctx = _ctx(tmp_path, make_params(raw_copy))
    ingest.run(ctx)
    t = pd.read_parquet(ctx.root / "ingest" / "table.parquet")
    assert set(t["identity"].dropna()) == {"obama", "biden", "yao_ming", "grace_hopper", "eileen_collins"}
    assert t[t["source"] == "unlabeled"]["identity"].isna().all()
    assert (t["status"] == "ok").all() and t["image_id"].str.len().eq(64).all()


def test_manifest_source(tmp_path, raw_copy):
    m = tmp_path / "m.jsonl"
    m.write_text(
        json.dumps({"path": str(raw_copy / "sample/obama/obama.jpg"), "identity": "barack"}) + "\n"
        + json.dumps({"path": "missing.jpg", "identity": "x"}) + "\n"
    )
    c = tmp_path / "m.csv"
    c.write_text("path,identity\n" + str(raw_copy / "sample/biden/biden.jpg") + ",joe\n")
    params = make_params(raw_copy)
    from pipeline.config import SourceConfig

    params.ingest.sources = [SourceConfig(name="j", path=str(m)), SourceConfig(name="c", path=str(c))]
    ctx = _ctx(tmp_path, params)
    ingest.run(ctx)
    t = pd.read_parquet(ctx.root / "ingest" / "table.parquet").set_index("relpath")
    assert t.loc["missing.jpg", "status"] == "missing_file"
    assert set(t["identity"]) == {"barack", "joe", "x"}


def test_dedup_near_copy_and_same_person(tmp_path, raw_copy):
    src = raw_copy / "sample/obama/obama.jpg"
    im = Image.open(src)
    buf = io.BytesIO()
    im.resize((im.width // 2, im.height // 2)).save(buf, "JPEG", quality=70)
    (raw_copy / "sample/obama/obama_small_copy.jpg").write_bytes(buf.getvalue())
    (raw_copy / "sample/zz_copies").mkdir()
    (raw_copy / "sample/zz_copies/exact_copy_of_obama.jpg").write_bytes(src.read_bytes())
    ctx = _ctx(tmp_path, make_params(raw_copy))
    ingest.run(ctx)
    dedup.run(ctx)
    t = pd.read_parquet(ctx.root / "dedup" / "table.parquet").set_index("relpath")
    kept = t.loc["obama/obama.jpg"]
    assert kept["status"] == "ok"  # highest resolution, earliest path among exact copies
    assert t.loc["obama/obama_small_copy.jpg", "status"] == f"duplicate_of:{kept['key']}"
    assert t.loc["obama/obama_small_copy.jpg", "dup_kind"] == "near"
    assert t.loc["zz_copies/exact_copy_of_obama.jpg", "status"] == f"duplicate_of:{kept['key']}"
    assert t.loc["zz_copies/exact_copy_of_obama.jpg", "dup_kind"] == "exact"
    for other in ("obama/obama2.jpg", "obama/obama3.jpg"):  # different photos of the same person
        assert t.loc[other, "status"] == "ok"
    clusters = json.loads((ctx.root / "dedup" / "clusters.json").read_text())
    assert {c["kind"] for c in clusters} == {"near", "exact"}
    m = json.loads(ctx.metrics_path("dedup").read_text())
    assert m["ok"] + m["exact_duplicates"] + m["near_duplicates"] == m["images_in"]


def test_dedup_within_identity_only(tmp_path, raw_copy):
    src = raw_copy / "sample/obama/obama.jpg"
    im = Image.open(src)
    im.resize((im.width // 2, im.height // 2)).save(raw_copy / "sample/biden/shrunk.jpg", quality=80)
    ctx = _ctx(tmp_path, make_params(raw_copy, dedup={"across_identities": False}))
    ingest.run(ctx)
    dedup.run(ctx)
    t = pd.read_parquet(ctx.root / "dedup" / "table.parquet").set_index("relpath")
    assert t.loc["biden/shrunk.jpg", "status"] == "ok"


def test_ingest_incremental_and_ray_executor(tmp_path, raw_copy):
    ctx = _ctx(tmp_path, make_params(raw_copy, executor="ray"))
    first = ingest.run(ctx)
    assert first["computed"] == first["inputs"] == 9
    again = ingest.run(ctx)
    assert again["computed"] == 0 and again["cached"] == 9
    Image.open(raw_copy / "sample/biden/biden.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        raw_copy / "sample/biden/biden_flipped.jpg"
    )
    third = ingest.run(ctx)
    assert third["computed"] == 1 and third["inputs"] == 10
    # a changed param invalidates everything the stage computed
    ctx.params.ingest.min_side = 65
    assert ingest.run(ctx)["computed"] == 10
