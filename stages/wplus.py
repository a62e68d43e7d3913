"""wplus: e4e W+ codes (18 x 512) of the aligned faces, background whitened by the face mask.

With `wplus.checkpoint` set, the official `e4e_ffhq_encode.pt` is loaded; without one the encoder
runs random-initialised, logs a loud warning, and every row says `wplus_weights_real: false`.
Blob `wplus.npy`: float32 (18, 512) (the shards store float16).
"""
from __future__ import annotations

import functools

from pipeline.codefp import code_fingerprint
from pipeline.config import WPlusConfig, section_hash
from pipeline.images import decode_image
from pipeline.models.base import announce
from pipeline.plugins import Member, Stage
from pipeline.stage import (Context, StageSpec, array_columns, array_rows, face_metrics, join_inputs, prepare,
                            run_item_stage, write_metrics)
from pipeline.store import BlobStore, ItemStore

WPLUS_SHAPE = (18, 512)


class _WPlusWorker:
    def __init__(self, cfg: WPlusConfig, root: str, stage_dir: str):
        from pipeline.models import wplus

        self.cfg = cfg
        self.model = wplus.load(cfg)
        self.align = ItemStore(root, "align").blobs
        self.masks = ItemStore(root, "masks").blobs
        self.blobs = BlobStore(stage_dir)

    def prepare(self, batch: list[dict]) -> tuple[list, list | None]:
        """CPU part (overlaps another batch's inference in a GPU actor): decoded faces and masks."""
        faces = [decode_image(self.align.get(it["face_blob"])) for it in batch]
        keep = None
        if self.cfg.whiten_background:
            keep = [decode_image(self.masks.get(it["masks.face_mask_blob"])) for it in batch]
        return faces, keep

    def infer(self, batch: list[dict], prepared: tuple[list, list | None]) -> list[list[dict]]:
        faces, keep = prepared
        codes = self.model.encode(faces, keep_masks=keep)
        return array_rows(batch, codes, self.blobs, "wplus", self.model.info)

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        return self.infer(batch, self.prepare(batch))


def run(ctx: Context) -> dict:
    from pipeline.models import wplus

    cfg = ctx.params.wplus
    store = prepare(ctx, "wplus")
    inputs = join_inputs(ctx, "align", also=("masks",), columns=("face_blob", "masks.face_mask_blob"))
    info = wplus.model_info(cfg)
    announce(info)
    spec = StageSpec("wplus", code_fingerprint(__name__), section_hash(cfg), array_columns("wplus"), info.fingerprint,
                     cfg.batch_size, cfg.num_gpus)
    factory = functools.partial(_WPlusWorker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("wplus"), face_metrics("wplus", inputs, table, info))
    return stats.as_dict()


STAGE = Stage(
    name="wplus", run=run, after=("align", "masks"), section="wplus", shard="required", model="wplus",
    members=(Member("wplus.npy", "wplus_blob", kind="npy", shape=WPLUS_SHAPE, dtype="float16"),),
)
