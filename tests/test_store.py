"""The item store at scale: the journal's vectorised index, journal index files, counted commits,
streamed consolidation (same bytes however the rows were split into parts) and blobs made durable
once per batch instead of once per file."""
from __future__ import annotations

import functools
import os

import pandas as pd
import pyarrow as pa
import pytest

import pipeline.store as store_mod
from pipeline.store import ItemStore

SCHEMA = {"value": pa.string(), "n": pa.int64()}


def _rows(keys, tag, status="ok"):
    return [{"key": k, "cache_key": f"ck-{k}", "status": status, "error": "", "sig": f"s-{k}", "value": f"{tag}{k}",
             "n": sum(map(ord, k))} for k in keys]


def _store(root, stage="toy") -> ItemStore:
    from pipeline.store import table_schema

    return ItemStore(root, stage, schema=table_schema(SCHEMA))


def _reference_results(j: pd.DataFrame, transient) -> dict:
    """The journal semantics as written before the vectorised index (pandas, per key)."""
    j = j.copy()
    j["bad"] = j["status"].isin(set(transient))
    last = j[j["part"] == j.groupby("cache_key")["part"].transform("max")]
    last_bad = last.groupby("cache_key")["bad"].any()
    fails = j.drop_duplicates(["cache_key", "part"]).groupby("cache_key")["bad"].sum()
    return {ck: (bool(last_bad[ck]), int(fails[ck])) for ck in last_bad.index}


def test_the_journal_index_agrees_with_the_per_key_semantics(tmp_path):
    st = _store(tmp_path)
    st.commit(_rows(["a", "b", "c"], "x"))
    st.commit(_rows(["b"], "x", status="error"))  # b retried: failed
    st.commit(_rows(["b", "d"], "x", status="error"))
    st.commit(_rows(["b"], "y") + _rows(["e"], "y", status="worker_crashed"))
    st.commit(_rows(["d"], "z"))
    res = st.results({"error", "worker_crashed"})
    assert res == _reference_results(st.journal(), {"error", "worker_crashed"})
    assert res["ck-b"] == (False, 2) and res["ck-d"] == (False, 1) and res["ck-e"] == (True, 1)
    ix = st.index({"error", "worker_crashed"})
    pos = ix.lookup(["ck-e", "ck-zz", "ck-a"])
    assert pos[1] == -1 and ix.last_bad[pos[0]] and not ix.last_bad[pos[2]]
    assert st.done() == {"ck-a", "ck-b", "ck-c", "ck-d", "ck-e"}


def test_commits_count_parts_instead_of_listing_them(tmp_path, monkeypatch):
    st = _store(tmp_path)
    st.commit(_rows(["a"], "x"))
    calls = []
    orig = ItemStore.part_paths
    monkeypatch.setattr(ItemStore, "part_paths", lambda self: calls.append(1) or orig(self))
    for k in "bcdefg":
        st.commit(_rows([k], "x"))
    assert not calls, "a commit listed the parts folder"
    assert [p.name for p in orig(st)][-1] == "part-000006.parquet"
    again = _store(tmp_path)  # a new store object lists once, on its first commit
    again.commit(_rows(["h"], "x"))
    again.commit(_rows(["i"], "x"))
    assert len(calls) == 1 and orig(again)[-1].name == "part-000008.parquet"


def test_journal_index_files_give_the_same_journal_and_are_ignored_when_a_part_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "JOURNAL_GROUP", 2)
    st = _store(tmp_path)
    for i, k in enumerate("abcde"):
        st.commit(_rows([k, f"{k}2"], "x", status="error" if i == 1 else "ok"))
    before = st.journal_table()
    assert st.compact_journal() == 2  # parts 0-1 and 2-3; part 4 has no complete group yet
    names = sorted(p.name for p in st.parts_dir.iterdir())
    assert "journal-000000-000001.parquet" in names and "journal-000002-000003.parquet" in names
    assert st.compact_journal() == 0
    read = []
    orig = store_mod.read_parquet
    monkeypatch.setattr(store_mod, "read_parquet", lambda p, *a, **k: read.append(p.name) or orig(p, *a, **k))
    assert _store(tmp_path).journal_table().equals(before)
    assert sorted(read) == ["journal-000000-000001.parquet", "journal-000002-000003.parquet", "part-000004.parquet"]
    (st.parts_dir / "part-000002.parquet").unlink()  # its group's index no longer applies
    read.clear()
    j = _store(tmp_path).journal_table()
    assert sorted(read) == ["journal-000000-000001.parquet", "part-000003.parquet", "part-000004.parquet"]
    assert sorted(set(j.column("part").to_pylist())) == [0, 1, 3, 4]


@pytest.mark.parametrize("group", [3, 100])
def test_consolidate_streams_the_latest_rows_in_key_order_and_bytes_do_not_depend_on_parts(tmp_path, monkeypatch, group):
    monkeypatch.setattr(store_mod, "CONSOLIDATE_GROUP", group)
    monkeypatch.setattr(store_mod._Buckets, "BUDGET", 1)  # every bucket spills to its temp file at once
    keys = [f"k{i:02d}" for i in range(11)]
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b")
    # a: three parts, a retry of k03 and k07 (the later commit wins), an old input that is not current
    a.commit(_rows(keys[:5], "v") + _rows(["old"], "v"))
    a.commit(_rows(["k03", "k07"], "bad", status="error"))
    a.commit(_rows(keys[5:], "v"))
    a.commit(_rows(["k03"], "v"))
    # b: the same final rows committed in another split and order
    b.commit(_rows(keys[6:][::-1], "v"))
    b.commit(_rows(keys[:6], "v"))
    b.commit(_rows(["k07"], "v"))
    current = [f"ck-{k}" for k in keys]
    ta, tb = a.consolidate(current), b.consolidate(current)
    assert list(ta["key"]) == keys and (ta["status"] == "ok").all() and list(ta["value"]) == [f"v{k}" for k in keys]
    assert a.table_path.read_bytes() == b.table_path.read_bytes()
    import pyarrow.parquet as pq

    assert pq.ParquetFile(a.table_path).metadata.num_row_groups == -(-len(keys) // group)
    assert not list((tmp_path / "a" / "toy" / ".tmp").glob("*")), "consolidation temp files left"
    pd.testing.assert_frame_equal(ta, b.table())


class _BlobWriter:
    def __init__(self, stage_dir: str):
        self.blobs = store_mod.BlobStore(stage_dir)

    def __call__(self, batch):
        return [[{"key": it["key"], "status": "ok", "error": "",
                  "blob": self.blobs.put(it["key"] * 2, f"{it['key']}.bin", it["key"].encode())}] for it in batch]


def test_blobs_are_synced_once_per_batch_not_once_per_file(tmp_path, monkeypatch):
    from pipeline.config import RuntimeConfig
    from pipeline.runtime import map_batches

    fsyncs, syncfs = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    monkeypatch.setattr(store_mod, "_syncfs", lambda d: syncfs.append(d) or True)
    items = [{"key": f"k{i}"} for i in range(6)]
    cfg = RuntimeConfig(executor="local", progress=False)
    out = [r for _, res in map_batches(functools.partial(_BlobWriter, str(tmp_path / "s")), items, 3, cfg) for r in res]
    assert len(out) == 6 and (tmp_path / "s" / out[0][0]["blob"]).read_bytes() == b"k0"
    assert not fsyncs, "a blob was fsynced on its own"
    assert len(syncfs) == 2, "one filesystem sync per batch"
    assert store_mod.sync_written() == 0
