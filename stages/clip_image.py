"""clip_image: CLIP image embedding of each face's style image (the in-the-wild crop, face masked out).

The style image is the in-the-wild crop (align's `wild.jpg`) with the face region (the masks
stage's `mask.png`, 255 = face) replaced by grey `clip_image.fill` (`pipeline.models.clip.style_image`),
as FaceStudio (Hybrid guidance) trains on "raw images with the face region masked". Its embedding
is the concatenation of the configured CLIP vision models' image embeddings
(`pipeline.models.clip`; `clip_image.models: []` = one tiny random model, tagged weights_real
false). Blob `clip.npy`: float32 (D,), D = the sum of the models' projection dims. The model
fingerprint (a hash of the weights) is part of every row's cache key.
"""
from __future__ import annotations

import functools

from pipeline.codefp import code_fingerprint
from pipeline.config import section_hash
from pipeline.images import decode_image
from pipeline.models.base import announce
from pipeline.models.clip import ClipImageConfig, style_image
from pipeline.plugins import Member, Stage
from pipeline.stage import (Context, StageSpec, array_columns, array_rows, face_metrics, join_inputs, prepare,
                            run_item_stage, write_metrics)
from pipeline.store import BlobStore, ItemStore

# params that cannot change an embedding (left out of the cache key)
NOT_IN_KEY = ("batch_size", "num_gpus", "device")


class _ClipWorker:
    def __init__(self, cfg: ClipImageConfig, root: str, stage_dir: str):
        from pipeline.models import clip

        self.cfg = cfg
        self.model = clip.load(cfg)
        self.align = ItemStore(root, "align").blobs
        self.masks = ItemStore(root, "masks").blobs
        self.blobs = BlobStore(stage_dir)

    def prepare(self, batch: list[dict]) -> list:
        """CPU part (overlaps another batch's inference in a GPU actor): the style images."""
        return [style_image(decode_image(self.align.get(it["wild_blob"])), decode_image(self.masks.get(it["masks.mask_blob"])),
                            self.cfg.fill) for it in batch]

    def infer(self, batch: list[dict], styles: list) -> list[list[dict]]:
        return array_rows(batch, self.model.embed(styles), self.blobs, "clip", self.model.info)

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        return self.infer(batch, self.prepare(batch))


def run(ctx: Context) -> dict:
    from pipeline.models import clip

    cfg = ctx.params.clip_image
    store = prepare(ctx, "clip_image")
    inputs = join_inputs(ctx, "align", also=("masks",), columns=("wild_blob", "masks.mask_blob"))
    info = clip.model_info(cfg)
    announce(info)
    spec = StageSpec("clip_image", code_fingerprint(__name__), section_hash(cfg, exclude=NOT_IN_KEY),
                     array_columns("clip"), info.fingerprint, cfg.batch_size, cfg.num_gpus)
    factory = functools.partial(_ClipWorker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("clip_image"), face_metrics("clip_image", inputs, table, info))
    return stats.as_dict()


STAGE = Stage(
    name="clip_image", run=run, after=("align", "masks"), section="clip_image", shard="optional", model="clip",
    members=(Member("clip.npy", "clip_blob", kind="npy", dtype="float32"),),
)
