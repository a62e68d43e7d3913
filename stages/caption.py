"""caption: BLIP-2 captions of the in-the-wild crops.

Backends (`caption.backend`): `transformers` (Blip2ForConditionalGeneration from a local folder,
batched, GPU when present), `lavis` (salesforce-lavis in its own environment), `none` (no caption;
rows say so with `caption_backend: none` and `caption_weights_real: false`). `auto` picks
`transformers` when `caption.model_path` is set, else `none`.
"""
from __future__ import annotations

import functools

import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import CaptionConfig, section_hash
from pipeline.images import decode_image
from pipeline.models.base import announce
from pipeline.plugins import Member, Stage
from pipeline.stage import Context, StageSpec, face_metrics, join_inputs, model_columns, prepare, run_item_stage, write_metrics
from pipeline.store import ItemStore

COLUMNS = {"caption": pa.string(), "caption_backend": pa.string(), **model_columns("caption")}


class _CaptionWorker:
    def __init__(self, cfg: CaptionConfig, root: str):
        from pipeline.models import caption

        self.model = caption.load(cfg)
        self.backend = caption.resolve_backend(cfg)
        self.align = ItemStore(root, "align").blobs

    def prepare(self, batch: list[dict]) -> list:
        """CPU part (overlaps another batch's inference in a GPU actor): the decoded crops."""
        return [decode_image(self.align.get(it["wild_blob"])) for it in batch]

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        return self.infer(batch, self.prepare(batch))

    def infer(self, batch: list[dict], images: list) -> list[list[dict]]:
        texts = self.model.caption(images)
        info = self.model.info
        return [
            [{
                "key": it["key"], "status": "ok", "error": "", "caption": t or "",
                "caption_backend": self.backend, "caption_model": info.name,
                "caption_fingerprint": info.fingerprint, "caption_weights_real": info.weights_real,
            }]
            for it, t in zip(batch, texts)
        ]


def model_info(cfg: CaptionConfig):
    from pipeline.models import caption

    return caption.model_info(cfg)


def run(ctx: Context) -> dict:
    cfg = ctx.params.caption
    store = prepare(ctx, "caption")
    inputs = join_inputs(ctx, "align", columns=("wild_blob",))
    info = model_info(cfg)
    announce(info)
    spec = StageSpec("caption", code_fingerprint(__name__), section_hash(cfg), COLUMNS, info.fingerprint,
                     cfg.batch_size, cfg.num_gpus)
    factory = functools.partial(_CaptionWorker, cfg, str(ctx.root))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("caption"), face_metrics("caption", inputs, table, info))
    return stats.as_dict()


STAGE = Stage(
    name="caption", run=run, after=("align",), section="caption", shard="optional", model="caption",
    members=(Member("txt", "caption", kind="text", missing="", role="grid_text"),),
)
