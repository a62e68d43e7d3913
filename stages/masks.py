"""masks: face-region masks from the dense landmarks, and a person mask (selfie segmentation).

Per face: the convex hull of the 478-point mesh (or, without a mesh, an ellipse fitted to the FFHQ
quad) is filled, eroded and blurred with kernels scaled from 32 and 7 px at 1024 px (the W+ Adapter
paper) to the crop size. Blobs: `mask.png` on the in-the-wild crop (255 = face; the stage II loss
uses M = 1 - mask), `face_mask.png` on the aligned face, `person.png` (selfie segmentation of the
in-the-wild crop, 0-255 probability) when `masks.person_mask` is on.
"""
from __future__ import annotations

import functools
import io
import json

import numpy as np
import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import MasksConfig, section_hash
from pipeline.images import decode_image, encode_png
from pipeline.models import align as geom
from pipeline.models.base import ModelInfo, text_fingerprint
from pipeline.models.masks import hull_mask, quad_ellipse_points
from pipeline.plugins import Member, Stage
from pipeline.stage import Context, StageSpec, face_metrics, join_inputs, prepare, run_item_stage, write_metrics
from pipeline.store import BlobStore, ItemStore

COLUMNS = {"mask_source": pa.string(), "mask_blob": pa.string(), "face_mask_blob": pa.string(),
           "face_fraction": pa.float64(), "person_blob": pa.string()}


class _MasksWorker:
    def __init__(self, cfg: MasksConfig, root: str, stage_dir: str):
        self.cfg = cfg
        self.align = ItemStore(root, "align").blobs
        self.blobs = BlobStore(stage_dir)
        self.seg = None
        if cfg.person_mask:
            from pipeline.models import faces

            self.seg = faces.SelfieSegmenter()

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        out = []
        for it in batch:
            wild = decode_image(self.align.get(it["wild_blob"]))
            size_w, size_f = wild.shape[0], int(it["output_size"])
            if isinstance(it.get("mesh_blob"), str) and it["mesh_blob"]:
                pts = np.load(io.BytesIO(self.align.get(it["mesh_blob"])))
                source = "mesh"
            else:
                pts = quad_ellipse_points(np.asarray(json.loads(it["quad"])))
                source = "quad_ellipse"
            wild_pts = geom.apply_matrix(np.asarray(json.loads(it["wild_matrix"])), pts)
            face_pts = geom.apply_matrix(np.asarray(json.loads(it["align_matrix"])), pts)
            mask_w = hull_mask(wild_pts, size_w, self.cfg.erode_at_1024, self.cfg.blur_at_1024)
            mask_f = hull_mask(face_pts, size_f, self.cfg.erode_at_1024, self.cfg.blur_at_1024)
            ck, k = it["cache_key"], it["key"]
            row = {
                "key": k, "status": "ok", "error": "", "mask_source": source,
                "mask_blob": self.blobs.put(ck, f"{k}.mask.png", encode_png(mask_w)),
                "face_mask_blob": self.blobs.put(ck, f"{k}.face_mask.png", encode_png(mask_f)),
                "face_fraction": round(float(mask_w.mean() / 255.0), 4),
                "person_blob": None,
            }
            if self.seg is not None:
                prob = self.seg.segment(wild)
                row["person_blob"] = self.blobs.put(ck, f"{k}.person.png", encode_png(np.round(prob * 255).astype(np.uint8)))
            out.append([row])
        return out


def run(ctx: Context) -> dict:
    cfg = ctx.params.masks
    store = prepare(ctx, "masks")
    inputs = join_inputs(ctx, "align", columns=("wild_blob", "mesh_blob", "quad", "wild_matrix", "align_matrix"))
    for it in inputs:
        it["output_size"] = ctx.params.align.output_size
    fp = "none"
    info = None
    if cfg.person_mask:
        from pipeline.models import faces

        info = faces.selfie_info()  # from the model files: nothing is loaded when nothing is computed
        fp = info.fingerprint
    else:
        info = ModelInfo("none", text_fingerprint("no-person-mask"), False, "-")
    spec = StageSpec("masks", code_fingerprint(__name__), section_hash(cfg), COLUMNS, fp, cfg.batch_size)
    factory = functools.partial(_MasksWorker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("masks"), face_metrics("masks", inputs, table, info))
    return stats.as_dict()


STAGE = Stage(
    name="masks", run=run, after=("align",), section="masks", shard="required",
    members=(Member("mask.png", "mask_blob"), Member("face_mask.png", "face_mask_blob", role="grid_mask")),
)
