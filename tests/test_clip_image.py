"""The data FaceStudio (Hybrid guidance) trains on: CLIP style embeddings (`clip_image` stage, real
loading of local CLIP vision folders, a tiny random model tagged as such) and per-face person instance
masks (`instances` stage; the split rule on the sample group photo players.jpg)."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import AlignConfig, Params
from pipeline.models.clip import ClipImageConfig, ClipStyleEncoder, model_info, style_image, tiny_model
from pipeline.models.instances import box_seeds, split_persons
from tests.conftest import make_params


def _save_clip(folder: Path, seed: int, projection_dim: int) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_local_clip_folders_load_through_the_real_path_and_concatenate(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    f1, f2 = _save_clip(tmp_path / "a", 0, 8), _save_clip(tmp_path / "b", 1, 12)
    enc = ClipStyleEncoder(ClipImageConfig(models=[str(f1), str(f2)]), device="cpu")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    e = enc.embed(imgs)
    assert e.shape == (3, 20) and e.dtype == np.float32 and enc.dim == 20
    expect = []
    for f in (f1, f2):  # what transformers gives for each folder, L2-normalised, concatenated
        m = CLIPVisionModelWithProjection.from_pretrained(f).eval()
        pix = CLIPImageProcessor.from_pretrained(f)(images=imgs, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            x = m(pixel_values=pix).image_embeds
        expect.append((x / x.norm(dim=-1, keepdim=True)).numpy())
    np.testing.assert_allclose(e, np.concatenate(expect, 1), atol=1e-5)
    info = enc.info
    assert info.weights_real and info == model_info(ClipImageConfig(models=[str(f1), str(f2)]))
    # the fingerprint hashes the weights: another checkpoint in the same folder changes it
    _save_clip(f2, 2, 12)
    assert model_info(ClipImageConfig(models=[str(f1), str(f2)])).fingerprint != info.fingerprint
    with pytest.raises(FileNotFoundError, match="not a CLIP folder"):
        ClipStyleEncoder(ClipImageConfig(models=[str(tmp_path)]), device="cpu")


def test_tiny_random_clip_is_tagged_and_seeded():
    a = model_info(ClipImageConfig())
    assert a.weights_real is False and "random" in a.name
    assert a == model_info(ClipImageConfig()) and a.fingerprint != model_info(ClipImageConfig(random_seed=1)).fingerprint
    assert torch.equal(tiny_model(0).visual_projection.weight, tiny_model(0).visual_projection.weight)


def test_style_image_greys_the_face_out():
    rgb = np.full((4, 4, 3), 200, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 255
    mask[0, 0] = 128
    out = style_image(rgb, mask, fill=100)
    assert (out[1:3, 1:3] == 100).all() and (out[3] == 200).all() and (out[0, 0] == 150).all()


# ============================================================================================
# instance masks


def test_split_rule_on_touching_and_overlapping_faces():
    boxes = np.array([[10, 10, 30, 30], [25, 12, 45, 32], [80, 10, 90, 20]], float)  # 0 and 1 overlap
    seeds = box_seeds(boxes, 100, 100)
    assert seeds[20, 20] == 1 and seeds[22, 35] == 2 and seeds[15, 85] == 3
    prob = np.zeros((100, 100), np.float32)
    prob[10:100, 5:50] = 1.0  # one blob holding faces 0 and 1 (bodies below), face 2 has no person pixels
    lab = split_persons(prob, boxes)
    assert lab[90, 12] == 1 and lab[90, 44] == 2  # each body to the head above it
    assert lab[90, 80] == 0 and lab[15, 85] == 3  # a face is a person even where the segmenter saw none
    assert lab[5, 60] == 0


@pytest.fixture(scope="module")
def players(sample_raw):
    from pipeline.images import load_rgb
    from pipeline.models import faces

    rgb, _ = load_rgb(sample_raw / "unlabeled" / "players.jpg")
    det = faces.load(AlignConfig())
    try:
        found = det.detect(rgb)
    finally:
        det.close()
    return rgb, found


def test_players_one_disjoint_mask_per_aligned_face_holding_its_box_centre(sample_raw, players):
    """The whole-photo instance masks (`ReferenceKit.persons`, what generation uses) of players.jpg."""
    from training.references import ReferenceKit

    kit = ReferenceKit(Params(), device="cpu")
    try:
        labels, faces = kit.persons(sample_raw / "unlabeled" / "players.jpg")
    finally:
        kit.close()
    _, found = players
    aligned = [f for f in found if f.lm5 is not None and f.landmarks_source != "detector"]
    assert len(faces) == len(aligned) >= 10
    masks = [labels == i + 1 for i in range(len(faces))]
    assert all(m.any() for m in masks)  # one mask per aligned face
    assert (np.sum(masks, axis=0) <= 1).all()  # disjoint
    for m, f in zip(masks, faces):  # each holds its face's box centre
        x0, y0, x1, y1 = f["bbox"]
        assert m[int(round((y0 + y1) / 2)), int(round((x0 + x1) / 2))]
    assert sum(int(m.sum()) for m in masks) > 3 * sum((f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1])
                                                        for f in faces), "bodies, not just the face boxes"


# ============================================================================================
# the stages


def _tar_members(shards: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for t in sorted(shards.rglob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.mark.slow
def test_clip_image_and_instances_stages_shards_and_incremental(tmp_path, sample_raw):
    import io

    from pipeline import plugins
    from pipeline.images import decode_image
    from pipeline.models.instances import transform_boxes
    from pipeline.stage import Context

    raw = tmp_path / "raw"
    (raw / "sample" / "obama").mkdir(parents=True)
    (raw / "unlabeled").mkdir()
    shutil.copy2(sample_raw / "sample" / "obama" / "obama.jpg", raw / "sample" / "obama")
    shutil.copy2(sample_raw / "unlabeled" / "players.jpg", raw / "unlabeled")
    names = ("ingest", "dedup", "align", "masks", "clip_image", "instances", "shards")

    def build(**sections):
        params = make_params(raw, shards={"required": ["masks", "clip_image", "instances"], "optional": []}, **sections)
        ctx = Context.make(params, tmp_path / "data", tmp_path / "metrics")
        return {n: plugins.stage(n).run(ctx) for n in names}

    first = build()
    n = first["align"]["counts"]["ok"]
    assert first["clip_image"]["counts"] == {"ok": n} and first["instances"]["counts"] == {"ok": n} and n >= 11
    members = _tar_members(tmp_path / "data" / "shards")
    assert len(members) == n
    align = pd.read_parquet(tmp_path / "data" / "align" / "table.parquet").set_index("key")
    for key, m in members.items():
        clip = np.load(io.BytesIO(m["clip.npy"]))
        meta = json.loads(m["json"])
        assert clip.shape == (16,) and clip.dtype == np.float32 and abs(np.linalg.norm(clip) - 1) < 1e-4
        assert meta["models"]["clip_image"]["weights_real"] is False
        inst = decode_image(m["inst.png"])
        assert inst.shape == decode_image(m["jpg"]).shape[:2]
        box = transform_boxes(np.array(json.loads(align.loc[key, "wild_matrix"])), np.array([meta["bbox"]]))[0]
        own = meta["face_index"] + 1
        assert inst[int(round((box[1] + box[3]) / 2)), int(round((box[0] + box[2]) / 2))] == own, key
        assert meta["group_faces"] == (1 if meta["source"] == "sample" else meta["group_faces"]) >= 1
        assert (inst == own).mean() > 0.05, "a person, not just a face box"
    assert len({json.loads(m["json"])["group_faces"] for m in members.values()}) == 2  # 1 and the players' count

    # incremental: a rerun computes nothing; the style fill recomputes the embeddings only
    again = build()
    assert all(again[s]["computed"] == 0 for s in names[:-1])
    fill = build(clip_image={"fill": 0})
    assert fill["clip_image"]["computed"] == n and fill["instances"]["computed"] == 0 and fill["masks"]["computed"] == 0
    # a face's siblings are in its cache key: drop one players face from align -> only that photo recomputes
    t = pd.read_parquet(tmp_path / "data" / "align" / "table.parquet")
    players_id = t[t["source"] == "unlabeled"]["image_id"].iloc[0]
    victim = t[(t["image_id"] == players_id) & (t["status"] == "ok")]["key"].iloc[-1]
    t[t["key"] != victim].to_parquet(tmp_path / "data" / "align" / "table.parquet", index=False)
    ctx = Context.make(make_params(raw), tmp_path / "data", tmp_path / "metrics")
    st = plugins.stage("instances").run(ctx)
    assert st["inputs"] == n - 1 and st["computed"] == n - 2  # every players face but the dropped one, not obama
    # without person masks the maps hold the face seeds only, still one label per face at its centre
    ctx = Context.make(make_params(raw, masks={"person_mask": False}), tmp_path / "data", tmp_path / "metrics")
    plugins.stage("masks").run(ctx)
    plugins.stage("instances").run(ctx)
    t = pd.read_parquet(tmp_path / "data" / "instances" / "table.parquet")
    assert set(t["status"]) == {"ok"} and set(t["inst_source"]) == {"boxes"}
