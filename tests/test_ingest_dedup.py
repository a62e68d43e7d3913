"""ingest and dedup as stages: every file gets a row, duplicates are found, the best copy is kept."""
import io
import re
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
    ctx = _ctx(tmp_path, make_params(raw_copy, executor="ray", runtime={"inline_below": 0}))  # 9 photos: on actors
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


# ------------------------------------------------------------------------------ hostile inputs


def test_build_survives_undecodable_names_fifos_and_a_folder_named_like_a_photo(tmp_path, sample_raw):
    import os
    import shutil
    import subprocess

    from tests.conftest import PERSONA

    src = tmp_path / "photos"
    (src / "obama").mkdir(parents=True)
    shutil.copy(sample_raw / "sample/obama/obama.jpg", src / "obama" / "obama.jpg")
    shutil.copy(sample_raw / "sample/obama/obama2.jpg", os.fsencode(src / "obama") + b"/caf\xe9.jpg")  # latin-1 name
    os.mkdir(os.fsencode(src) + b"/J\xf6rg")  # an identity folder whose name is not UTF-8
    shutil.copy(sample_raw / "sample/biden/biden.jpg", os.fsencode(src) + b"/J\xf6rg/biden.jpg")
    os.mkfifo(src / "obama" / "pipe.jpg")  # reading it would block forever
    (src / "obama" / "folder.jpg").mkdir()  # a folder named like a photo: its contents are photos
    shutil.copy(sample_raw / "sample/obama/obama3.jpg", src / "obama" / "folder.jpg" / "inside.jpg")
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text("runtime: {executor: local, progress: false}\nwplus: {input_size: 64}\n")
    r = subprocess.run(PERSONA + ["build", "--source", str(src), "--out", str(out), "--params", str(params)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    t = pd.read_parquet(out / "ingest" / "table.parquet")
    regular = [os.path.join(d, f) for d, _, fs in os.walk(os.fsencode(src)) for f in fs
               if os.path.isfile(os.path.join(d, f))]
    assert len(regular) == 4
    assert sorted(os.fsencode(os.path.join(str(src), p)) if raw is None else raw
                  for p, raw in zip(t["relpath"], t["path_raw"]) if p != "obama/pipe.jpg") == sorted(regular)
    by = t.set_index("relpath")
    assert by.loc["obama/pipe.jpg", "status"] == "not_a_regular_file"
    cafe = by.loc["obama/caf\ufffd.jpg"]
    assert cafe["status"] == "ok" and cafe["path_raw"] == os.fsencode(src) + b"/obama/caf\xe9.jpg"
    assert by.loc["obama/folder.jpg/inside.jpg", "status"] == "ok"
    jorg = by.loc["J\ufffdrg/biden.jpg"]
    assert jorg["status"] == "ok" and jorg["identity_label"] == "J\ufffdrg"
    assert re.fullmatch(r"J_rg-[0-9a-f]{8}", jorg["identity"])
    # the photo behind the undecodable name was read by align too, and every photo reached the shards
    a = pd.read_parquet(out / "align" / "table.parquet")
    assert (a.loc[a["image_id"] == cafe["image_id"], "status"] == "ok").any()
    index = json.loads((out / "shards" / "index.json").read_text())
    assert set(index["identities"]) == {"obama", jorg["identity"]} and index["identities"]["obama"]["faces"] == 3


def test_table_bytes_do_not_depend_on_part_size(tmp_path, raw_copy):
    make_bad_folder(raw_copy / "sample" / "badperson")  # rows whose width, height, format... are null
    tables = []
    for part_size in (1, 7, 256):
        params = make_params(raw_copy, runtime={"part_size": part_size}, ingest={"batch_size": 1})
        ctx = Context.make(params, tmp_path / f"p{part_size}", tmp_path / f"m{part_size}")
        ingest.run(ctx)
        tables.append((ctx.root / "ingest" / "table.parquet").read_bytes())
        assert len(list((ctx.root / "ingest" / "parts").glob("*.parquet"))) == -(-21 // part_size)
    assert tables[0] == tables[1] == tables[2]


def test_manifest_paths_outside_their_folder_are_an_explicit_opt_in(tmp_path, raw_copy):
    import shutil

    from pipeline.config import SourceConfig

    mdir = tmp_path / "lists"
    (mdir / "sub").mkdir(parents=True)
    shutil.copy(raw_copy / "sample/biden/biden.jpg", mdir / "sub" / "biden.jpg")
    outside = raw_copy / "sample/obama/obama.jpg"
    (mdir / "m.csv").write_text(f"path,identity\nsub/biden.jpg,joe\n{outside},barack\n../raw/sample/obama/obama2.jpg,barack\n"
                                f"{mdir / 'sub' / 'biden.jpg'},joe\n")
    params = make_params(raw_copy)
    for allow in (False, True):
        params.ingest.sources = [SourceConfig(name="m", path=str(mdir / "m.csv"), allow_outside=allow)]
        ctx = _ctx(tmp_path / str(allow), params)
        ingest.run(ctx)
        t = pd.read_parquet(ctx.root / "ingest" / "table.parquet").set_index("relpath")
        assert t.loc["sub/biden.jpg", "status"] == "ok" and t.loc[str(mdir / "sub" / "biden.jpg"), "status"] == "ok"
        for rel in (str(outside), "../raw/sample/obama/obama2.jpg"):
            assert t.loc[rel, "status"] == ("ok" if allow else "outside_source"), (allow, rel)
            if not allow:
                assert "allow_outside" in t.loc[rel, "error"]


def test_identities_become_safe_slugs_with_the_name_kept_as_label(tmp_path, raw_copy):
    import shutil

    from pipeline.config import SourceConfig
    from stages.ingest import identity_slug

    names = ["../../etc", "/abs/olute", "José María", ".hidden", "a" * 80, "ok_name-1.2", "C:\\win"]
    m = tmp_path / "m.jsonl"
    shutil.copy(raw_copy / "sample/obama/obama.jpg", tmp_path / "o.jpg")
    m.write_text("".join(json.dumps({"path": "o.jpg", "identity": n}) + "\n" for n in names[:1])
                 + "".join(json.dumps({"path": f"o{i}.jpg", "identity": n}) + "\n" for i, n in enumerate(names[1:])))
    params = make_params(raw_copy)
    params.ingest.sources = [SourceConfig(name="m", path=str(m))]
    ctx = _ctx(tmp_path, params)
    ingest.run(ctx)
    t = pd.read_parquet(ctx.root / "ingest" / "table.parquet")
    assert sorted(t["identity_label"]) == sorted(names)
    for label, slug in zip(t["identity_label"], t["identity"]):
        assert slug == identity_slug(label) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", slug), slug
    assert t.set_index("identity_label").loc["ok_name-1.2", "identity"] == "ok_name-1.2"  # safe names stay
    assert len(set(t["identity"])) == len(names)
    assert identity_slug("José María") != identity_slug("Jose Maria")  # distinct names stay distinct
