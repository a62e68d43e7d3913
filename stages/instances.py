"""instances: person instance masks of each face's in-the-wild crop (`inst.png`, face index per pixel).

For every `ok` face, in the frame of its in-the-wild crop (the shard's `jpg`): the masks stage's
person probability of that crop (`person.png`, selfie segmentation, `masks.person_mask`)
split among ALL the faces of its photo whose boxes fall in the crop, by
`pipeline.models.instances.split_persons` (box seeds, then each person blob split by a body
distance; see there). The seeds are the photo's detected faces with landmarks (align statuses ok,
too_small, cut_by_border: every real face, also the ones not aligned; `no_landmarks` detections are
mostly false faces and are left out), their boxes mapped into the crop.

`inst.png`: uint8 label map of the crop, 0 = no one, `face_index + 1` = the person of face
`face_index` of the photo (the `face_index` in the sample's json; align orders faces left to right);
the sample's own person is label `json.face_index + 1`. Single-face photos get a map with one label.
The sibling faces' boxes are part of each face's cache key (a new face found in the photo recomputes
its siblings). Without a person probability (`masks.person_mask: false`) the map holds the face
seeds only (`inst_source: boxes`, else `person_mask`).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa

from pipeline.codefp import code_fingerprint
from pipeline.config import section_hash
from pipeline.images import decode_image, encode_png
from pipeline.models.instances import InstancesConfig, split_persons, transform_boxes
from pipeline.plugins import Member, Stage
from pipeline.stage import Context, StageSpec, face_metrics, join_inputs, prepare, run_item_stage, write_metrics
from pipeline.store import BlobStore, ItemStore, hash_key, read_table

COLUMNS = {"inst_blob": pa.string(), "inst_faces": pa.int64(), "inst_fraction": pa.float64(), "inst_source": pa.string()}
SEED_STATUSES = ("ok", "too_small", "cut_by_border")  # align statuses of faces with landmarks


def photo_faces(align_rows) -> dict[str, list[tuple[int, list[float]]]]:
    """{image_id: [(face_index, bbox)]} of the faces that seed the split (SEED_STATUSES), by index."""
    out: dict[str, list[tuple[int, list[float]]]] = {}
    for r in align_rows:
        idx, bbox = r.get("face_index"), r.get("bbox")
        if r.get("status") not in SEED_STATUSES or idx is None or not isinstance(bbox, str) or int(idx) < 0:
            continue
        out.setdefault(str(r["image_id"]), []).append((int(idx), json.loads(bbox)))
    return {k: sorted(v) for k, v in out.items()}


class _InstancesWorker:
    def __init__(self, cfg: InstancesConfig, root: str, stage_dir: str):
        self.cfg = cfg
        self.masks = ItemStore(root, "masks").blobs
        self.align = ItemStore(root, "align").blobs
        self.blobs = BlobStore(stage_dir)

    def __call__(self, batch: list[dict]) -> list[list[dict]]:
        out = []
        for it in batch:
            k = it["key"]
            faces = json.loads(it["siblings"])
            if isinstance(it.get("masks.person_blob"), str) and it["masks.person_blob"]:
                prob = decode_image(self.masks.get(it["masks.person_blob"])).astype(np.float32) / 255.0
                source = "person_mask"
            else:  # masks.person_mask is off: the face seeds alone
                prob = np.zeros(decode_image(self.align.get(it["wild_blob"])).shape[:2], np.float32)
                source = "boxes"
            idx = np.array([f[0] for f in faces], dtype=np.int64)
            boxes = transform_boxes(np.asarray(json.loads(it["wild_matrix"])), np.array([f[1] for f in faces]))
            labels = split_persons(prob, boxes, self.cfg.threshold, self.cfg.body_stretch)
            inst = np.where(labels > 0, idx[np.maximum(labels.astype(np.int64) - 1, 0)] + 1, 0).astype(np.uint8)
            own = int(it["face_index"]) + 1
            out.append([{"key": k, "status": "ok", "error": "",
                         "inst_blob": self.blobs.put(it["cache_key"], f"{k}.inst.png", encode_png(inst)),
                         "inst_faces": int(len(faces)), "inst_fraction": round(float((inst == own).mean()), 4),
                         "inst_source": source}])
        return out


def run(ctx: Context) -> dict:
    cfg = ctx.params.instances
    store = prepare(ctx, "instances")
    inputs = join_inputs(ctx, "align", also=("masks",), columns=("image_id", "face_index", "wild_matrix", "wild_blob",
                                                                  "masks.person_blob"))
    faces = photo_faces(read_table(ctx.root, "align").to_dict("records"))
    for it in inputs:
        sib = faces.get(str(it["image_id"]), [])
        it["siblings"] = json.dumps(sib, separators=(",", ":"))
        it["sig"] = hash_key(it["sig"], it["siblings"])  # the photo's other faces shape this face's map
    spec = StageSpec("instances", code_fingerprint(__name__), section_hash(cfg), COLUMNS, "none", cfg.batch_size)
    factory = functools.partial(_InstancesWorker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("instances"), face_metrics("instances", inputs, table))
    return stats.as_dict()


STAGE = Stage(
    name="instances", run=run, after=("align", "masks"), section="instances", shard="optional",
    members=(Member("inst.png", "inst_blob"),), meta=(("group_faces", "inst_faces"),),
)
