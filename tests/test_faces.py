"""Face detectors on real photos (MediaPipe and SCRFD), SCRFD decoding, selfie segmentation."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pipeline.config import AlignConfig
from pipeline.models import faces as F


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    from skimage import data

    model_dir = F.insightface_model_dir()
    return {
        "grace_hopper": _load(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"),
        "astronaut": np.ascontiguousarray(data.astronaut()),
        "yaoming": _load(model_dir / "yaoming.jpg"),
        "players": _load(model_dir / "players.jpg"),
    }


@pytest.fixture(scope="module")
def mediapipe():
    with F.MediaPipeFaces.load(AlignConfig()) as det:
        yield det


@pytest.fixture(scope="module")
def scrfd():
    return F.ScrfdFaces.load(AlignConfig(detector="scrfd"))


def assert_plausible_upright(face: F.Face) -> None:
    """Landmarks of an upright frontal face: eyes above nose above mouth, right/left order."""
    eye_r, eye_l, nose, mouth_r, mouth_l = face.lm5
    assert eye_r[0] < eye_l[0] and mouth_r[0] < mouth_l[0]  # subject's right is the image's left
    eyes_y, mouth_y = (eye_r[1] + eye_l[1]) / 2, (mouth_r[1] + mouth_l[1]) / 2
    assert eyes_y < nose[1] < mouth_y
    eye_dist = np.hypot(*(eye_l - eye_r))
    assert 0.5 * eye_dist < mouth_y - eyes_y < 2.0 * eye_dist
    x0, y0, x1, y1 = face.bbox
    w = x1 - x0
    assert ((face.lm5[:, 0] > x0 - 0.1 * w) & (face.lm5[:, 0] < x1 + 0.1 * w)).all()
    assert ((face.lm5[:, 1] > y0 - 0.1 * w) & (face.lm5[:, 1] < y1 + 0.1 * w)).all()
    assert 0.15 * w < eye_dist < 0.7 * w


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut", "yaoming"])
def test_single_face_photos(name, photos, mediapipe, scrfd):
    img = photos[name]
    mp_faces = mediapipe.detect(img)
    sc_faces = scrfd.detect(img)
    assert len(mp_faces) == 1, [f.bbox for f in mp_faces]
    assert len(sc_faces) == 1
    f = mp_faces[0]
    assert f.landmarks_source == "mesh" and f.mesh is not None and f.mesh.shape == (478, 2)
    assert 0.5 <= f.score <= 1.0
    assert_plausible_upright(f)
    assert_plausible_upright(sc_faces[0])
    # lm5 are the named mesh points
    np.testing.assert_array_equal(f.lm5, f.mesh[list(F.MESH_LM5)])
    # two independent models agree on the five points within a quarter of the eye distance
    eye_dist = np.hypot(*(f.lm5[1] - f.lm5[0]))
    err = np.hypot(*(f.lm5 - sc_faces[0].lm5).T)
    assert err.max() < 0.25 * eye_dist, err / eye_dist
    # the dense mesh lies around the detected box
    mb = np.r_[f.mesh.min(0), f.mesh.max(0)]
    assert F.box_iou(f.bbox, mb)[0, 0] > 0.5
    json.dumps(f.as_dict())  # serialisable for metadata


def test_group_photo_finds_many_faces(photos, mediapipe, scrfd):
    img = photos["players"]
    h, w = img.shape[:2]
    mp_faces = mediapipe.detect(img)
    sc_faces = scrfd.detect(img)
    # 16 team members in front, a crowd behind; SCRFD at 640 finds 22 faces
    assert len(sc_faces) >= 20
    assert len(mp_faces) >= 14
    assert sum(f.landmarks_source == "mesh" for f in mp_faces) >= 14
    for faces in (mp_faces, sc_faces):
        boxes = np.stack([f.bbox for f in faces])
        iou = F.box_iou(boxes, boxes) - np.eye(len(boxes))
        assert iou.max() < 0.4  # no duplicates from ranges/tiles
        assert (boxes[:, 0] > -5).all() and (boxes[:, 2] < w + 5).all() and (boxes[:, 3] < h + 5).all()
    # every MediaPipe face matches a SCRFD face (same people found)
    mp_boxes = np.stack([f.bbox for f in mp_faces])
    sc_boxes = np.stack([f.bbox for f in sc_faces])
    matched = (F.box_iou(mp_boxes, sc_boxes).max(axis=1) > 0.3).mean()
    assert matched >= 0.9


def test_detection_is_deterministic_and_ordered(photos, mediapipe):
    img = photos["players"]
    a, b = mediapipe.detect(img), mediapipe.detect(img)
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        assert np.array_equal(fa.bbox, fb.bbox) and np.array_equal(fa.mesh, fb.mesh)
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in a if f.landmarks_source == "mesh"]
    assert areas == sorted(areas, reverse=True)


def test_max_faces_and_closed_detector(photos):
    det = F.MediaPipeFaces(max_faces=3, tile_min_side=0)
    try:
        assert len(det.detect(photos["players"])) <= 3
    finally:
        det.close()
    with pytest.raises(RuntimeError):
        det.detect(photos["astronaut"])
    with pytest.raises(ValueError):
        F.ScrfdFaces().detect(np.zeros((10, 10), dtype=np.uint8))


def test_model_info(mediapipe, scrfd):
    assert mediapipe.info.weights_real and "Apache" in mediapipe.info.license
    assert scrfd.info.weights_real and "non-commercial" in scrfd.info.license
    assert len(mediapipe.fingerprint) == 16 and len(scrfd.fingerprint) == 16
    assert scrfd.fingerprint == F.file_fingerprint(F.insightface_model_dir() / "scrfd_500m_bnkps.onnx")
    assert isinstance(F.load(AlignConfig(detector="scrfd")), F.ScrfdFaces)


# ------------------------------------------------------------------------------ pure helpers


def test_detector_keypoint_fallback_by_hand():
    kps = np.array([[100, 100], [140, 100], [120, 120], [120, 140], [80, 105], [160, 105]], float)
    lm5 = F.lm5_from_detector_keypoints(kps)
    half = 0.415 * 40
    np.testing.assert_allclose(lm5, [[100, 100], [140, 100], [120, 120], [120 - half, 140], [120 + half, 140]])
    np.testing.assert_allclose(lm5[3:].mean(0), kps[3])  # FFHQ quad sees the true mouth centre


def test_scrfd_decoding_helpers_by_hand():
    c = F.anchor_centers(2, 3, 8, 2)
    assert c.shape == (12, 2)
    np.testing.assert_array_equal(c[:6], [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0]])
    np.testing.assert_array_equal(c[6:8], [[0, 8], [0, 8]])
    pts = np.array([[10.0, 20.0]])
    np.testing.assert_allclose(F.distance2bbox(pts, np.array([[1.0, 2.0, 3.0, 4.0]])), [[9, 18, 13, 24]])
    np.testing.assert_allclose(F.distance2kps(pts, np.array([[1.0, -1.0, 2.0, 5.0]])), [[[11, 19], [12, 25]]])
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], float)
    keep = F.nms(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.4)
    assert keep.tolist() == [3, 2]


def test_tiles_cover_the_image():
    tiles = F._tiles(1000, 600, 300, 0.3)
    cover = np.zeros((600, 1000), bool)
    for x, y, w, h in tiles:
        assert w == 300 and h == 300 and x + w <= 1000 and y + h <= 600
        cover[y : y + h, x : x + w] = True
    assert cover.all()


def test_selfie_segmentation(photos):
    img = photos["grace_hopper"]
    with F.SelfieSegmenter() as seg:
        m = seg.segment(img)
        assert seg.info.weights_real
    assert m.shape == img.shape[:2] and m.dtype == np.float32
    assert 0.0 <= m.min() and m.max() <= 1.0
    assert m[200:300, 200:300].mean() > 0.9  # her face
    assert m[:50, :50].mean() < 0.1 and m[:50, -50:].mean() < 0.1  # backdrop corners
    np.testing.assert_array_equal(F.selfie_segmentation(img), m)
