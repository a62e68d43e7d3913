"""dedup: exact duplicates (sha256) then near duplicates (perceptual-hash Hamming distance).

Within a duplicate cluster the best copy is kept: highest resolution, then earliest
(source, relpath). The others get status `duplicate_of:<kept key>`. Near duplicates are found by
multi-index hashing (`pipeline.hashing`), sub-quadratic, across identities unless
`dedup.across_identities` is false. The pass reads only the hashes in the ingest table (no image
is decoded), so it is recomputed as a whole each run; `computed` counts the items new to it.
Outputs: `table.parquet` (every ok ingest row, with status and cluster), `clusters.json`.
"""
from __future__ import annotations

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
from pipeline.store import atomic_write_json, hash_key, read_table, status_counts, table_schema, write_table

log = logging.getLogger("persona.dedup")

CARRY = ["source", "path", "path_raw", "relpath", "identity", "identity_label", "image_id", "width", "height", "phash"]
COLUMNS = {
    "source": pa.string(), "path": pa.string(), "path_raw": pa.binary(), "relpath": pa.string(),
    "identity": pa.string(), "identity_label": pa.string(), "image_id": pa.string(), "width": pa.int64(),
    "height": pa.int64(), "phash": pa.string(), "dup_kind": pa.string(), "cluster": pa.string(),
    "distance": pa.int64(),
}


def _best_first(df: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered so that the best copy of each cluster comes first."""
    return df.assign(_px=-(df["width"].astype(np.int64) * df["height"].astype(np.int64))).sort_values(
        ["_px", "source", "relpath"], kind="mergesort"
    )


def deduplicate(df: pd.DataFrame, threshold: int, across_identities: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Assign `status` (ok / duplicate_of:<key>), `dup_kind` and `cluster` to every row.

    `df` needs key, image_id, phash (16 hex chars), width, height, source, relpath, identity.
    Returns (rows sorted by key, clusters as dicts for the report).
    """
    df = df.reset_index(drop=True).copy()
    df["status"] = "ok"
    df["error"] = ""
    df["dup_kind"] = ""
    df["cluster"] = ""
    df["distance"] = 0
    if df.empty:
        return df, []

    # 1. exact duplicates: same sha256
    ordered = _best_first(df)
    first = ordered.drop_duplicates("image_id", keep="first")
    keep_for_sha = dict(zip(first["image_id"], first["key"]))
    exact = df["key"] != df["image_id"].map(keep_for_sha)
    df.loc[exact, "status"] = "duplicate_of:" + df.loc[exact, "image_id"].map(keep_for_sha)
    df.loc[exact, "dup_kind"] = "exact"

    # 2. near duplicates among the unique images
    uniq = df[~exact]
    hashes = np.array([int(h, 16) for h in uniq["phash"]], dtype=np.uint64)
    i, j, d = near_duplicate_pairs(hashes, threshold)
    if not across_identities and len(i):
        ident = uniq["identity"].fillna("\x00unlabeled").to_numpy()
        same = ident[i] == ident[j]
        i, j, d = i[same], j[same], d[same]
    labels = clusters_from_pairs(len(uniq), i, j)
    uniq = uniq.assign(_label=labels)
    sizes = uniq["_label"].value_counts()
    multi = uniq[uniq["_label"].map(sizes) > 1]
    clusters = []
    upd_status: dict[str, str] = {}
    upd_dist: dict[str, int] = {}
    upd_cluster: dict[str, str] = {}
    for _, grp in _best_first(multi).groupby("_label", sort=False):
        keys, paths, idents = grp["key"].tolist(), grp["path"].tolist(), grp["identity"].tolist()
        hs = [int(h, 16) for h in grp["phash"]]
        kept_key = keys[0]
        cid = hash_key("cluster", *sorted(keys), length=12)
        members = []
        for k, p, ident, hk in zip(keys[1:], paths[1:], idents[1:], hs[1:]):
            dist = bin(hk ^ hs[0]).count("1")  # to the kept copy (may exceed t via a chain)
            upd_status[k] = f"duplicate_of:{kept_key}"
            upd_dist[k] = dist
            members.append({"key": k, "path": p, "identity": ident, "distance": dist})
        for k in keys:
            upd_cluster[k] = cid
        clusters.append({"cluster": cid, "kind": "near", "kept": {"key": kept_key, "path": paths[0]}, "duplicates": members})
    near = df["key"].isin(upd_status.keys())
    df.loc[near, "status"] = df.loc[near, "key"].map(upd_status)
    df.loc[near, "dup_kind"] = "near"
    df.loc[near, "distance"] = df.loc[near, "key"].map(upd_dist)
    in_cluster = df["key"].isin(upd_cluster.keys())
    df.loc[in_cluster, "cluster"] = df.loc[in_cluster, "key"].map(upd_cluster)
    # exact clusters in the report too
    path_of = dict(zip(df["key"], df["path"]))
    for sha, grp in df[exact].groupby("image_id"):
        kept_key = keep_for_sha[sha]
        kept_path = path_of[kept_key]
        clusters.append(
            {
                "cluster": hash_key("exact", sha, length=12),
                "kind": "exact",
                "kept": {"key": kept_key, "path": kept_path},
                "duplicates": [{"key": k, "path": p, "distance": 0} for k, p in zip(grp["key"], grp["path"])],
            }
        )
    clusters.sort(key=lambda c: (c["kind"], c["kept"]["key"]))
    df = df.sort_values("key", kind="mergesort").reset_index(drop=True)
    return df, clusters


def run(ctx: Context) -> dict:
    t0 = time.perf_counter()
    cfg = ctx.params.dedup
    store = prepare(ctx, "dedup")
    src = read_table(ctx.root, "ingest", ok_only=True)
    previous = set()
    if store.table_path.exists():
        previous = set(store.table()["key"])
    rows, clusters = deduplicate(src[["key", "sig"] + CARRY], cfg.hamming_threshold, cfg.across_identities)
    phash = section_hash(cfg)
    code = code_fingerprint(__name__)
    rows["sig"] = [hash_key("dedup", s, st, code, phash) for s, st in zip(rows["sig"], rows["status"])]
    write_table(rows, store.table_path, table_schema(COLUMNS), store.tmp_dir)
    atomic_write_json(store.dir / "clusters.json", clusters)
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
