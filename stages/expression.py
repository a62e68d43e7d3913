"""expression: a per-face expression vector (`expr.npy`) from the align stage's dense mesh, or precomputed.

Backend `landmarks` (default, real): the pose-normalised mesh descriptor of
`pipeline.models.expression` (23 geometric terms such as mouth opening, smile width, eye openness and
brow raise, with right / left terms; NOT the paper's 64-d 3DMM vector) on the 478-point MediaPipe mesh
align stored (`mesh.npy`). A face without a stored mesh (the SCRFD detector keeps none) gets
`no_landmarks`; a mesh the descriptor cannot use gets `bad_landmarks`. Backend `precomputed`: the
user's per-photo vector (e.g. a 3DMM code) from a manifest column or a .npy file (see
`PrecomputedExpressionConfig`); its bytes are part of the face's cache key. A photo without one gets
`no_expression`, an unusable one `bad_expression` (ambiguous for a photo with several faces, wrong
length, non-finite).

Blob `expr.npy`: float32 (D,), RAW values (D = 23 for landmarks, `precomputed.dim` otherwise). The
row of a face depends on that face alone, so adding photos recomputes only theirs; standardising
over a dataset is the consumer's job with that dataset's statistics (Face2Diffusion's conditioner
holds its training set's). The metrics report each term's mean / std over the first
`stats_faces` faces by key.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging

import numpy as np
import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import Params, section_hash
from pipeline.images import encode_npy
from pipeline.models import expression as expr
from pipeline.plugins import Member, Stage
from pipeline.stage import Context, StageSpec, face_metrics, join_inputs, model_columns, prepare, run_item_stage, write_metrics
from pipeline.storage import spath
from pipeline.store import BlobStore, ItemStore, hash_key, read_table

log = logging.getLogger("persona.expression")

COLUMNS = {"expr_blob": pa.string(), "expr_dim": pa.int64(), **model_columns("expr")}
NO_LANDMARKS, BAD_LANDMARKS = "no_landmarks", "bad_landmarks"
NO_EXPRESSION, BAD_EXPRESSION = "no_expression", "bad_expression"


class _ExpressionWorker:
    def __init__(self, cfg: expr.ExpressionConfig, root: str, stage_dir: str):
        self.cfg = cfg
        self.info = expr.model_info(cfg)
        self.align = ItemStore(root, "align").blobs
        self.blobs = BlobStore(stage_dir)

    def vector(self, it: dict) -> tuple[str, str, np.ndarray | None]:
        """(status, error, vector) of one face."""
        if self.cfg.backend == "precomputed":
            if it.get("vector") is None:
                return it.get("vector_status") or NO_EXPRESSION, it.get("vector_error") or "no precomputed vector", None
            return "ok", "", np.asarray(it["vector"], dtype=np.float32)
        if not (isinstance(it.get("mesh_blob"), str) and it["mesh_blob"]):
            return NO_LANDMARKS, "align stored no dense mesh for this face (the descriptor needs the 478-point MediaPipe mesh)", None
        mesh = np.load(io.BytesIO(self.align.get(it["mesh_blob"])), allow_pickle=False)
        try:
            return "ok", "", expr.descriptor(mesh)
        except expr.BadMesh as e:
            return BAD_LANDMARKS, str(e), None

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        out = []
        info = self.info
        for it in batch:
            status, error, v = self.vector(it)
            row = {"key": it["key"], "status": status, "error": error, "expr_blob": None, "expr_dim": None,
                   "expr_model": info.name, "expr_fingerprint": info.fingerprint, "expr_weights_real": info.weights_real}
            if v is not None:
                row["expr_blob"] = self.blobs.put(it["cache_key"], f"{it['key']}.expr.npy", encode_npy(v))
                row["expr_dim"] = int(v.shape[0])
            out.append([row])
        return out


# ------------------------------------------------------------------------------- precomputed vectors


def _manifest_rows(path) -> list[dict]:
    p = spath(path)
    if p.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(p.read_text(), newline="")))
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def photo_vectors(params: Params, root) -> dict[str, tuple[str, object]]:
    """{image_id: ("ok", array) | (reason, error text)} of every ingested photo that has a precomputed
    vector, looked up by (source, path relative to the source) as ingest recorded them."""
    cfg = params.expression.precomputed
    wanted: dict[tuple[str, str], str] = {}
    for r in read_table(root, "ingest", ok_only=True).to_dict("records"):
        wanted.setdefault((r["source"], r["relpath"]), r["image_id"])
    found: dict[tuple[str, str], tuple[str, object]] = {}
    if cfg.column:
        for src in params.ingest.sources:
            if spath(src.path).suffix.lower() not in (".csv", ".jsonl"):
                continue
            base = str(spath(src.path).parent)
            for r in _manifest_rows(src.path):
                cell = r.get(cfg.column)
                if cell in (None, ""):
                    continue
                try:
                    found[(src.name, r["path"])] = ("ok", expr.parse_vector(cell, base))
                except (ValueError, OSError) as e:
                    found[(src.name, r["path"])] = (BAD_EXPRESSION, f"manifest {src.path} column {cfg.column}: {e}")
    if cfg.npy_dir:
        for (source, rel), _ in wanted.items():
            if (source, rel) in found:
                continue
            f = spath(cfg.npy_dir) / source / (rel.rsplit(".", 1)[0] + ".npy")
            if f.exists():
                try:
                    found[(source, rel)] = ("ok", expr.load_npy(str(f)))
                except (ValueError, OSError) as e:
                    found[(source, rel)] = (BAD_EXPRESSION, f"{f}: {e}")
    out: dict[str, tuple[str, object]] = {}
    for k in sorted(found):  # a photo listed by two sources: the first (source, relpath) wins
        if k in wanted:
            out.setdefault(wanted[k], found[k])
    return out


def attach_vectors(ctx: Context, inputs: list[dict]) -> None:
    """Each face's precomputed vector (or the reason it has none) into its input; the vector's bytes
    go into the input's signature, so editing one photo's vector recomputes that photo's faces."""
    cfg = ctx.params.expression.precomputed
    vectors = photo_vectors(ctx.params, ctx.root)
    align = read_table(ctx.root, "align")
    faces_per_photo = align[align["face_index"] >= 0].groupby("image_id")["face_index"].count().to_dict()
    for it in inputs:
        status, val = vectors.get(it["image_id"], (NO_EXPRESSION, "no precomputed vector for this photo"))
        it["vector"] = None
        if status == "ok":
            try:
                v = expr.vector_for_face(val, int(it["face_index"]), int(faces_per_photo.get(it["image_id"], 1)), cfg.dim)
                it["vector"] = v.tolist()
                it["sig"] = hash_key(it["sig"], hash_key(v.tobytes()))
            except ValueError as e:
                status, val = BAD_EXPRESSION, str(e)
        if it["vector"] is None:
            it["vector_status"], it["vector_error"] = status, str(val)
            it["sig"] = hash_key(it["sig"], status, str(val))


# ------------------------------------------------------------------------------------------- stage


def descriptor_stats(ctx: Context, table, limit: int) -> dict:
    """Per-term mean / std over the first `limit` ok faces by key (deterministic)."""
    ok = table[table["status"] == "ok"].sort_values("key", kind="mergesort").head(max(0, limit))
    if ok.empty:
        return {"faces": 0}
    blobs = ItemStore(ctx.root, "expression").blobs
    a = np.stack([np.load(io.BytesIO(blobs.get(b)), allow_pickle=False) for b in ok["expr_blob"]]).astype(np.float64)
    names = list(expr.TERMS) if a.shape[1] == expr.DIM and ctx.params.expression.backend == "landmarks" \
        else [f"e{i}" for i in range(a.shape[1])]
    return {"faces": int(len(a)), "mean": {n: round(float(m), 5) for n, m in zip(names, a.mean(0))},
            "std": {n: round(float(s), 5) for n, s in zip(names, a.std(0))}}


def run(ctx: Context) -> dict:
    cfg = ctx.params.expression
    store = prepare(ctx, "expression")
    inputs = join_inputs(ctx, "align", columns=("mesh_blob", "image_id", "face_index"))
    if cfg.backend == "precomputed":
        attach_vectors(ctx, inputs)
    info = expr.model_info(cfg)
    spec = StageSpec("expression", code_fingerprint(__name__), section_hash(cfg, ("batch_size", "stats_faces")), COLUMNS,
                     info.fingerprint, cfg.batch_size)
    factory = functools.partial(_ExpressionWorker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    metrics = face_metrics("expression", inputs, table, info, backend=cfg.backend, dim=cfg.dim,
                           note="not a 3DMM expression vector" if cfg.backend == "landmarks" else "user vectors",
                           descriptor=descriptor_stats(ctx, table, cfg.stats_faces))
    write_metrics(ctx.metrics_path("expression"), metrics)
    return stats.as_dict()


STAGE = Stage(
    name="expression", run=run, after=("align",), section="expression", shard="optional", model="expr",
    members=(Member("expr.npy", "expr_blob", kind="npy", dtype="float32"),),
)
