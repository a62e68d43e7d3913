"""Data roots on an S3-compatible object store, for real: a moto S3 server over HTTP (fixture `s3`).

- `spath` dispatch and the RemotePath subset of pathlib against the server;
- the item store (journal parts, blobs, table) on S3 writes the same bytes as on local disk and
  resumes from its committed parts;
- ingest reads photos from an S3 prefix and writes its store to S3: the same rows as from disk;
- shards written to S3 are read back by the WebDataset reader and the training index;
- `dvc repro` with `data_root: s3://...` tracks the stores as external outputs (by hash), skips an
  unchanged rerun and notices a changed object.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CACHE, REPO, make_params


def _fs():
    from pipeline.storage import filesystem

    return filesystem("s3")


def test_spath_dispatch(tmp_path):
    from pipeline.storage import RemotePath, is_remote, protocol_of, spath

    assert spath("data/x") == Path("data/x") and isinstance(spath("data/x"), Path)
    assert spath(f"file://{tmp_path}") == tmp_path
    r = spath("s3://bucket/a/b.tar")
    assert isinstance(r, RemotePath) and str(r) == "s3://bucket/a/b.tar"
    assert (r.parent / "c" / "d.npy").as_posix() == "s3://bucket/a/c/d.npy"
    assert (r.name, r.suffix, r.stem) == ("b.tar", ".tar", "b")
    assert spath(r) is r and is_remote(r) and not is_remote(tmp_path)
    assert protocol_of("S3://b/k") == "s3" and protocol_of("/x/y") == "file"
    with pytest.raises(ValueError, match="local path"):
        RemotePath("/not/remote")


def test_storage_options_from_env(monkeypatch):
    from pipeline.storage import storage_options

    monkeypatch.setenv("PERSONA_STORAGE_OPTIONS", json.dumps({"s3": {"anon": True}}))
    assert storage_options("s3") == {"anon": True, "use_listings_cache": False}
    assert storage_options("memory") == {}
    monkeypatch.setenv("PERSONA_STORAGE_OPTIONS", "{not json")
    with pytest.raises(ValueError, match="PERSONA_STORAGE_OPTIONS"):
        storage_options("s3")


def test_remote_path_operations(s3):
    from pipeline.storage import list_files, spath

    root = spath(s3) / "dir"
    f = root / "sub" / "a.bin"
    assert not f.exists() and not root.is_dir()
    with pytest.raises(FileNotFoundError):
        f.read_bytes()
    f.write_bytes(b"hello")
    (root / "b.tar").write_text("tar")
    (root / "sub" / "c.tar").write_bytes(b"c" * 10)
    assert f.exists() and f.is_file() and not f.is_dir() and root.is_dir()
    assert f.read_bytes() == b"hello" and (root / "b.tar").read_text() == "tar"
    assert [p.name for p in root.iterdir()] == ["b.tar", "sub"]
    assert [p.name for p in root.glob("*.tar")] == ["b.tar"]
    assert [str(p.relative_to(root)) for p in root.rglob("*.tar")] == ["b.tar", "sub/c.tar"]
    st = f.stat()
    assert st.st_size == 5 and st.version
    f.write_bytes(b"hello, again")
    assert f.stat().version != st.version and f.stat().st_size == 12  # a rewrite changes the version
    files = list_files(root)
    assert [(rel, size) for rel, _, size, _ in files] == [("b.tar", 3), ("sub/a.bin", 12), ("sub/c.tar", 10)]
    with f.open("rb") as fh:
        fh.seek(7)
        assert fh.read() == b"again"
    f.unlink()
    assert not f.exists()
    f.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        f.unlink()


def _rows(keys, tag):
    return [{"key": k, "cache_key": f"ck-{k}", "status": "ok", "error": "", "value": f"{tag}{k}", "vec": [1, 2]}
            for k in keys]


def test_item_store_on_s3_writes_the_bytes_of_a_local_store_and_resumes(s3, tmp_path):
    from pipeline.store import ItemStore, atomic_write_bytes

    stores = {"local": ItemStore(tmp_path / "data", "align"), "s3": ItemStore(f"{s3}/data", "align")}
    for st in stores.values():
        st.commit(_rows(["b", "a"], "x"))
        st.commit(_rows(["c"], "y"))
        rel = st.blobs.put("ck-a", "a.face.jpg", b"\xff\xd8 jpeg bytes")
        assert st.blobs.get(rel) == b"\xff\xd8 jpeg bytes"
    s3_store = stores["s3"]
    assert [p.name for p in s3_store.part_paths()] == ["part-000000.parquet", "part-000001.parquet"]
    assert str(s3_store.table_path).startswith("s3://")

    # a new process (new store object) sees what was committed: the resume set
    again = ItemStore(f"{s3}/data", "align")
    assert again.done() == {"ck-a", "ck-b", "ck-c"} == stores["local"].done()
    again.commit(_rows(["d"], "z"))
    assert again.part_paths()[-1].name == "part-000002.parquet"
    stores["local"].commit(_rows(["d"], "z"))

    current = ["ck-a", "ck-b", "ck-d"]  # c is no longer an input
    tables = {k: st.consolidate(current) for k, st in stores.items()}
    assert list(tables["s3"]["key"]) == ["a", "b", "d"]
    pd.testing.assert_frame_equal(tables["s3"], tables["local"])
    assert ItemStore(f"{s3}/data", "align").table_path.read_bytes() == stores["local"].table_path.read_bytes()
    pd.testing.assert_frame_equal(ItemStore(f"{s3}/data", "align").table(), tables["local"])

    atomic_write_bytes(f"{s3}/data/align/quarantine.csv", b"key,status\n")
    assert _fs().cat_file(f"{s3[5:]}/data/align/quarantine.csv") == b"key,status\n"
    with pytest.raises(FileNotFoundError, match="run the 'masks' stage first"):
        ItemStore(f"{s3}/data", "masks").table()


@pytest.fixture
def s3_raw(s3, sample_raw):
    """The bundled sample uploaded to `<bucket>/raw/` (same layout as on disk)."""
    fs = _fs()
    for f in sorted(sample_raw.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{s3[5:]}/raw/{f.relative_to(sample_raw).as_posix()}")
    return f"{s3}/raw"


def test_ingest_reads_photos_from_s3_and_writes_its_store_there(s3, s3_raw, sample_raw, tmp_path):
    from pipeline.cli import run_stage
    from pipeline.config import SourceConfig
    from pipeline.stage import Context
    from pipeline.store import read_table
    from stages.ingest import list_inputs

    local_params = make_params(sample_raw)
    remote_params = make_params(sample_raw)
    remote_params.ingest.sources = [SourceConfig(name="sample", path=f"{s3_raw}/sample"),
                                    SourceConfig(name="unlabeled", path=f"{s3_raw}/unlabeled", labeled=False)]
    li, ri = list_inputs(local_params.ingest), list_inputs(remote_params.ingest)
    assert [(i["key"], i["relpath"], i["identity"]) for i in li] == [(i["key"], i["relpath"], i["identity"]) for i in ri]
    assert all(i["path"].startswith(f"{s3_raw}/") for i in ri) and len(ri) >= 9

    run_stage("ingest", Context.make(local_params, tmp_path / "local", tmp_path / "m_local"))
    stats = run_stage("ingest", Context.make(remote_params, f"{s3}/data", tmp_path / "m_s3"))
    assert stats["computed"] == len(ri)
    local, remote = read_table(tmp_path / "local", "ingest"), read_table(f"{s3}/data", "ingest")
    same = ["key", "status", "error", "identity", "image_id", "width", "height", "format", "mode", "phash"]
    pd.testing.assert_frame_equal(local[same], remote[same])
    assert (remote["status"] == "ok").sum() == len(ri)
    assert (tmp_path / "m_local" / "ingest.json").read_text() == (tmp_path / "m_s3" / "ingest.json").read_text()

    # incremental on S3: nothing changed -> nothing computed; a new object -> one item
    assert run_stage("ingest", Context.make(remote_params, f"{s3}/data", tmp_path / "m_s3"))["computed"] == 0
    photo = next(sample_raw.glob("sample/obama/*"))
    _fs().put_file(str(photo), f"{s3_raw[5:]}/sample/obama/copy{photo.suffix}")
    again = run_stage("ingest", Context.make(remote_params, f"{s3}/data", tmp_path / "m_s3"))
    assert again["computed"] == 1 and again["inputs"] == len(ri) + 1


def test_shards_on_s3_are_read_by_the_reader_and_the_training_index(s3, tmp_path, monkeypatch):
    from pipeline.shard_reader import ShardIndex, make_dataset, shard_urls
    from pipeline.shards import _npy_bytes, synthetic_samples, write_tar
    from pipeline.storage import local_copy, spath

    samples = synthetic_samples(6, identities=2, seed=3, size=32, encoded=True)
    members = [[(f"{s['__key__']}.{k}", v) for k, v in s.items() if k != "__key__"] for s in samples]
    out = f"{s3}/shards"
    n0, sha0, size0 = write_tar(f"{out}/train/train-000000.tar", members[:4])
    n1, _, _ = write_tar(f"{out}/train/train-000001.tar", members[4:])
    local_ref = tmp_path / "ref.tar"
    assert write_tar(local_ref, members[:4]) == (n0, sha0, size0)  # same bytes on S3 as on disk
    assert spath(f"{out}/train/train-000000.tar").read_bytes() == local_ref.read_bytes()
    assert not list(tmp_path.glob(".persona-shard-*"))  # no temp file left behind

    urls = shard_urls(out, "train")
    assert urls == [f"{out}/train/train-000000.tar", f"{out}/train/train-000001.tar"]
    got = list(make_dataset(out, "train"))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    assert got[0]["wplus.npy"].shape == (18, 512) and got[0]["face.jpg"].shape == (32, 32, 3)

    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path / "cache"))
    idx = ShardIndex(urls, ("face.jpg", "wplus.npy"))
    assert len(idx) == 6 and idx.source_urls == urls
    assert all(Path(u).is_file() and str(tmp_path / "cache") in u for u in idx.urls)
    assert idx.get(5, ("txt",))["txt"] == samples[5]["txt"].decode()
    first = local_copy(urls[0])
    assert local_copy(urls[0]) == first  # fetched once per (url, version)
    write_tar(urls[0], members[:3])  # rewritten object -> new version -> fetched again
    assert local_copy(urls[0]) != first and len(ShardIndex(urls[:1], ("face.jpg",))) == 3


ENV = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
       "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_tracks_item_stores_on_s3(s3, s3_server, sample_raw, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    for d in ("pipeline", "stages", "training"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data_root"] = f"{s3}/data"
    params["runtime"].update(progress=False, part_size=4)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(sample_raw, proj / "data" / "raw")
    (proj / "data" / "cache").mkdir()
    for f in CACHE.glob("*.tar.gz"):  # the sample's registry download
        shutil.copy(f, proj / "data" / "cache" / f.name)
    env = {**ENV, **s3_server.env, "PYTHONPATH": str(proj)}
    env.pop("RAY_ADDRESS", None)
    run = lambda *a, t=600: subprocess.run(["dvc", *a], cwd=proj, env=env, capture_output=True, text=True, timeout=t)
    assert run("init", "--no-scm", "-q").returncode == 0
    run("config", "core.analytics", "false")

    r = run("repro", "dedup")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    assert sorted(o["path"] for o in lock["ingest"]["outs"]) == ["metrics/ingest.json", f"{s3}/data/ingest"]
    assert [d["path"] for d in lock["dedup"]["deps"] if d["path"].startswith("s3://")] == [f"{s3}/data/ingest"]
    (dedup_out,) = [o for o in lock["dedup"]["outs"] if o["path"] == f"{s3}/data/dedup"]
    assert dedup_out["md5"].endswith(".dir") and dedup_out["nfiles"] == 2  # table.parquet, clusters.json
    assert _fs().exists(f"{s3[5:]}/data/runs/dedup.json")  # the run report, outside the DVC output
    fs = _fs()
    assert fs.exists(f"{s3[5:]}/data/dedup/table.parquet") and not (proj / "data" / "ingest").exists()

    r = run("repro", "dedup")
    assert r.returncode == 0 and "didn't change" in r.stdout and "Running stage 'ingest'" not in r.stdout, r.stdout
    assert "up to date" in run("status", "dedup").stdout

    fs.pipe_file(f"{s3[5:]}/data/dedup/clusters.json", b"[{\"edited\": true}]\n")  # someone edits the store behind DVC's back
    st = run("status", "dedup")
    assert "dedup:" in st.stdout and "modified:" in st.stdout and f"{s3}/data/dedup" in st.stdout, st.stdout


def test_build_from_and_into_a_bucket(s3, s3_raw, tmp_path, capsys):
    """`persona build --source s3://... --out s3://...`: photos, item stores and metrics all in the bucket."""
    from pipeline import cli
    from pipeline.storage import spath

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"runtime": {"executor": "local", "progress": False}}))
    out = f"{s3}/built"
    assert cli.main(["build", "--source", f"{s3_raw}/sample", "--out", out, "--until", "dedup",
                     "--params", str(params)]) == 0
    assert f"outputs under {out}" in capsys.readouterr().out
    metrics = json.loads(spath(f"{out}/metrics/dedup.json").read_text())
    table = pd.read_parquet(io.BytesIO(spath(f"{out}/dedup/table.parquet").read_bytes()))
    assert metrics["images_in"] == len(table) == metrics["ok"] >= 7
    assert set(table["identity"]) == {p.name for p in spath(f"{s3_raw}/sample").iterdir()}
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["build", "--source", f"{s3}/nothing-here", "--out", out, "--params", str(params)])
