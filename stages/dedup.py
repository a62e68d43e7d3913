"""dedup: exact duplicates (sha256) then near duplicates (perceptual-hash Hamming distance).

Within a duplicate cluster the best copy is kept: highest resolution, then earliest
(source, relpath). The others get status `duplicate_of:<kept key>`. Near duplicates are found by
multi-index hashing (`pipeline.hashing`), sub-quadratic, across identities unless
`dedup.across_identities` is false. The pass reads only the hashes in the ingest table (no image
is decoded), so it is recomputed as a whole each run; `computed` counts the items new to it.
Outputs: `table.parquet` (every ok ingest row, with status and cluster), `clusters.json`.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import section_hash
from pipeline.hashing import clusters_from_pairs, near_duplicate_pairs
from pipeline.plugins import Stage
from pipeline.stage import Context, prepare, write_metrics
from pipeline.store import (atomic_write_bytes, hash_key, read_parquet, read_table, status_counts, table_schema,
                            write_table)

log = logging.getLogger("persona.dedup")

CARRY = ["source", "path", "path_raw", "relpath", "identity", "identity_label", "image_id", "width", "height", "phash"]
COLUMNS = {
    "source": pa.string(), "path": pa.string(), "path_raw": pa.binary(), "relpath": pa.string(),
    "identity": pa.string(), "identity_label": pa.string(), "image_id": pa.string(), "width": pa.int64(),
    "height": pa.int64(), "phash": pa.string(), "dup_kind": pa.string(), "cluster": pa.string(),
    "distance": pa.int64(),
}


def _best_first(df: pd.DataFrame) -> np.ndarray:
    """Row positions ordered so that the best copy of each cluster comes first: highest resolution,
    then (source, relpath)."""
    px = -(df["width"].to_numpy(dtype=np.int64) * df["height"].to_numpy(dtype=np.int64))
    src = pd.factorize(df["source"], sort=True)[0]
    rel = pd.factorize(df["relpath"], sort=True)[0]
    return np.lexsort((rel, src, px))


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if not len(x):
        return np.zeros(0, dtype=np.int64)
    return np.unpackbits(np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8)).reshape(len(x), 64).sum(axis=1).astype(np.int64)


def _hashes(phash: np.ndarray) -> np.ndarray:
    """16-hex-digit perceptual hashes -> uint64."""
    if not len(phash):
        return np.zeros(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(phash)), dtype=">u8").astype(np.uint64)


def deduplicate(df: pd.DataFrame, threshold: int, across_identities: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Assign `status` (ok / duplicate_of:<key>), `dup_kind` and `cluster` to every row.

    `df` needs key, image_id, phash (16 hex chars), width, height, source, relpath, identity.
    Returns (rows sorted by key, clusters as dicts for the report). Array operations throughout (one
    Python step per cluster, none per row).
    """
    df = df.reset_index(drop=True)
    n = len(df)
    status = np.full(n, "ok", dtype=object)
    dup_kind = np.full(n, "", dtype=object)
    cluster = np.full(n, "", dtype=object)
    distance = np.zeros(n, dtype=np.int64)
    keys = df["key"].to_numpy(dtype=object)
    paths = df["path"].to_numpy(dtype=object)
    clusters: list[dict] = []
    if n:
        order = _best_first(df)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)

        # 1. exact duplicates: same sha256; the best copy of each is kept
        sha_code, shas = pd.factorize(df["image_id"])
        kept_of_code = np.full(len(shas), -1, dtype=np.int64)
        codes_best_first = sha_code[order]
        _, first = np.unique(codes_best_first, return_index=True)
        kept_of_code[codes_best_first[first]] = order[first]
        kept = kept_of_code[sha_code]
        exact = kept != np.arange(n)
        status[exact] = "duplicate_of:" + keys[kept[exact]].astype(object)
        dup_kind[exact] = "exact"

        # 2. near duplicates among the unique images
        uniq = np.flatnonzero(~exact)
        hashes = _hashes(df["phash"].to_numpy(dtype=object)[uniq])
        i, j, _ = near_duplicate_pairs(hashes, threshold)
        if not across_identities and len(i):
            ident = df["identity"].fillna("\x00unlabeled").to_numpy(dtype=object)[uniq]
            same = ident[i] == ident[j]
            i, j = i[same], j[same]
        labels = clusters_from_pairs(len(uniq), i, j)
        sizes = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
        multi = np.flatnonzero(sizes[labels] > 1) if len(labels) else np.zeros(0, dtype=np.int64)
        # clusters as runs of one label, each in best-first order
        multi = multi[np.lexsort((rank[uniq[multi]], labels[multi]))]
        rows_m, labs, hs = uniq[multi], labels[multi], hashes[multi]
        starts = np.flatnonzero(np.r_[True, labs[1:] != labs[:-1]]) if len(labs) else np.zeros(0, dtype=np.int64)
        ends = np.r_[starts[1:], len(labs)].astype(np.int64)
        kept_at = np.repeat(starts, ends - starts)
        dists = _popcount(hs ^ hs[kept_at])  # to the kept copy (may exceed t via a chain)
        idents = df["identity"].to_numpy(dtype=object)
        for a, b in zip(starts.tolist(), ends.tolist()):
            r = rows_m[a:b]
            kept_key = keys[r[0]]
            cid = hash_key("cluster", *sorted(keys[r]), length=12)
            dup = r[1:]
            status[dup] = f"duplicate_of:{kept_key}"
            dup_kind[dup] = "near"
            distance[dup] = dists[a + 1:b]
            cluster[r] = cid
            members = [{"key": k, "path": p, "identity": ident, "distance": d}
                       for k, p, ident, d in zip(keys[dup], paths[dup], idents[dup], dists[a + 1:b].tolist())]
            clusters.append({"cluster": cid, "kind": "near", "kept": {"key": kept_key, "path": paths[r[0]]},
                             "duplicates": members})

        # exact clusters in the report too: by sha, each cluster's copies in table order
        ex = np.flatnonzero(exact)
        ex = ex[np.argsort(sha_code[ex], kind="stable")]
        c = sha_code[ex]
        cuts = np.flatnonzero(c[1:] != c[:-1]) + 1 if len(c) else np.zeros(0, dtype=np.int64)
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(c)].tolist()):
            if a == b:
                continue
            r = ex[a:b]
            k0 = kept[r[0]]
            clusters.append({
                "cluster": hash_key("exact", shas[c[a]], length=12),
                "kind": "exact",
                "kept": {"key": keys[k0], "path": paths[k0]},
                "duplicates": [{"key": k, "path": p, "distance": 0} for k, p in zip(keys[r], paths[r])],
            })
    clusters.sort(key=lambda c: (c["kind"], c["kept"]["key"]))
    out = df.assign(status=status, error="", dup_kind=dup_kind, cluster=cluster, distance=distance)
    if not out["key"].is_monotonic_increasing:
        out = out.sort_values("key", kind="mergesort").reset_index(drop=True)
    return out, clusters


def run(ctx: Context) -> dict:
    t0 = time.perf_counter()
    cfg = ctx.params.dedup
    store = prepare(ctx, "dedup")
    src = read_table(ctx.root, "ingest", ok_only=True, columns=["key", "sig"] + CARRY)
    previous = set()
    if store.table_path.exists():
        previous = set(read_parquet(store.table_path, columns=["key"]).column("key").to_pylist())
    rows, clusters = deduplicate(src, cfg.hamming_threshold, cfg.across_identities)
    phash = section_hash(cfg)
    code = code_fingerprint(__name__)
    # a row's signature: its upstream signature + a short hash of (status, code, params), one hash per
    # distinct status (not one per row): it changes exactly when the row's input or verdict does
    status_sig = {st: hash_key("dedup", st, code, phash, length=12) for st in rows["status"].unique()}
    rows["sig"] = rows["sig"] + "." + rows["status"].map(status_sig)
    write_table(rows, store.table_path, table_schema(COLUMNS), store.tmp_dir)
    atomic_write_bytes(store.dir / "clusters.json",  # compact: a big file read by programs
                       (json.dumps(clusters, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode())
    counts = status_counts(rows)
    stats = {
        "stage": "dedup",
        "inputs": int(len(src)),
        "computed": int(len(set(rows["key"]) - previous)),
        "cached": int(len(set(rows["key"]) & previous)),
        "seconds": round(time.perf_counter() - t0, 3),
        "counts": counts,
    }
    store.write_report(stats)
    metrics = {
        "images_in": int(len(src)),
        "ok": counts.get("ok", 0),
        "exact_duplicates": int((rows["dup_kind"] == "exact").sum()),
        "near_duplicates": int((rows["dup_kind"] == "near").sum()),
        "clusters": len(clusters),
        "hamming_threshold": cfg.hamming_threshold,
    }
    assert metrics["ok"] + metrics["exact_duplicates"] + metrics["near_duplicates"] == len(src)
    write_metrics(ctx.metrics_path("dedup"), metrics)
    log.info("dedup: %s", metrics)
    store.clean_temps()
    return stats


STAGE = Stage(name="dedup", run=run, after=("ingest",), section="dedup")
