"""Alignment geometry: FFHQ quad, FFHQ crop map, ArcFace similarity, in-the-wild crop, border test."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.models import align


def rot(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def lm5_from(eye_r, eye_l, mouth_r, mouth_l, nose=None) -> np.ndarray:
    eye_r, eye_l, mouth_r, mouth_l = map(np.asarray, (eye_r, eye_l, mouth_r, mouth_l))
    if nose is None:
        nose = (eye_r + eye_l + mouth_r + mouth_l) / 4.0
    return np.array([eye_r, eye_l, nose, mouth_r, mouth_l], dtype=np.float64)


# ------------------------------------------------------------------------------- ffhq_quad


def test_ffhq_quad_symmetric_by_hand():
    # eye_avg (50,50), eye_to_eye (20,0), eye_to_mouth (0,20): x = (20,0) - (-20,0) = (40,0),
    # |x| -> max(20*2, 20*1.8) = 40; y = (0,40); c = (50,52)
    lm = lm5_from((40, 50), (60, 50), (42, 70), (58, 70))
    expected = np.array([[10, 12], [10, 92], [90, 92], [90, 12]], dtype=float)
    np.testing.assert_allclose(align.ffhq_quad(lm), expected, atol=1e-9)
    # the four-point form gives the same quad
    np.testing.assert_allclose(align.ffhq_quad((40, 50), (60, 50), (42, 70), (58, 70)), expected, atol=1e-9)


def test_ffhq_quad_rotated_by_hand():
    # face turned 90 deg (top of the head towards +x): eye_to_eye (0,20), eye_to_mouth (-20,0)
    # x = (0,20) - (0,-20) = (0,40); y = flipud(x)*[-1,1] = (-40,0); c = (50,50) + (-2,0) = (48,50)
    lm = lm5_from((50, 40), (50, 60), (30, 42), (30, 58))
    expected = np.array([[88, 10], [8, 10], [8, 90], [88, 90]], dtype=float)
    np.testing.assert_allclose(align.ffhq_quad(lm), expected, atol=1e-9)


def test_ffhq_quad_mouth_dominant_by_hand():
    # eye distance 10, eye-to-mouth 30: side driven by 1.8 * 30 = 54; c = (50, 53)
    lm = lm5_from((45, 50), (55, 50), (47, 80), (53, 80))
    expected = np.array([[-4, -1], [-4, 107], [104, 107], [104, -1]], dtype=float)
    np.testing.assert_allclose(align.ffhq_quad(lm), expected, atol=1e-9)


def test_ffhq_quad_is_rotation_and_translation_equivariant():
    lm = lm5_from((40, 50), (60, 50), (42, 70), (58, 70), nose=(50, 60))
    r, t = rot(33.0), np.array([17.0, -5.0])
    q1 = align.ffhq_quad(lm @ r.T + t)
    q0 = align.ffhq_quad(lm) @ r.T + t
    np.testing.assert_allclose(q1, q0, atol=1e-9)
    # always a square: equal sides, right angles
    e1, e2 = q1[3] - q1[0], q1[1] - q1[0]
    assert np.isclose(np.hypot(*e1), np.hypot(*e2)) and abs(np.dot(e1, e2)) < 1e-6


def test_ffhq_quad_rejects_bad_input():
    with pytest.raises(ValueError):
        align.ffhq_quad(np.zeros((4, 2)))
    with pytest.raises(ValueError):
        align.ffhq_quad(np.zeros((5, 2)))  # degenerate


# ------------------------------------------------------------------------------- align_face


def blob_image(h: int, w: int, pts: np.ndarray, sigma: float, bg: int = 40) -> np.ndarray:
    """Dark image with one bright Gaussian blob per point (channels R, G, B cycled)."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    img = np.full((h, w, 3), float(bg))
    for i, (x, y) in enumerate(pts):
        img[..., i % 3] += 215.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def blob_centre(img: np.ndarray, channel: int, guess: np.ndarray, radius: int, bg: int = 40) -> np.ndarray:
    x0, y0 = int(round(guess[0])), int(round(guess[1]))
    win = img[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1, channel].astype(np.float64)
    wgt = np.clip(win - bg - 20, 0, None)
    yy, xx = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
    return np.array([(wgt * xx).sum() / wgt.sum(), (wgt * yy).sum() / wgt.sum()])


@pytest.mark.parametrize(
    "case",
    [
        dict(h=420, w=400, centre=(200, 210), eye_dist=60.0, angle=0.0, out=256, tsize=1024),
        dict(h=420, w=400, centre=(190, 215), eye_dist=50.0, angle=27.0, out=256, tsize=1024),
        # large face -> the FFHQ shrink step (shrink = 2) is exercised
        dict(h=1400, w=1400, centre=(700, 690), eye_dist=300.0, angle=-12.0, out=256, tsize=512),
        # face at the border -> the reflect padding step is exercised
        dict(h=300, w=300, centre=(60, 240), eye_dist=50.0, angle=8.0, out=256, tsize=1024),
    ],
)
def test_align_face_maps_landmarks_exactly(case):
    """Blobs drawn at the eyes appear in the aligned crop where `forward` says, and map back."""
    c = np.array(case["centre"], dtype=float)
    d = case["eye_dist"]
    base = np.array([[-d / 2, -0.3 * d], [d / 2, -0.3 * d], [0, 0.2 * d], [-0.4 * d, 0.7 * d], [0.4 * d, 0.7 * d]])
    lm = base @ rot(case["angle"]).T + c
    eyes = lm[:2]
    img = blob_image(case["h"], case["w"], eyes, sigma=d / 12)
    quad = align.ffhq_quad(lm)
    aligned, tf = align.align_face(img, quad, output_size=case["out"], transform_size=case["tsize"])
    assert aligned.shape == (case["out"], case["out"], 3) and aligned.dtype == np.uint8
    pred = tf.forward(eyes)
    # the FFHQ quad puts the eyes level in the aligned crop
    assert abs(pred[0, 1] - pred[1, 1]) < 1e-6 and pred[0, 0] < pred[1, 0]
    radius = max(4, int(case["out"] * 0.06))
    for i in range(2):
        found = blob_centre(aligned, i % 3, pred[i], radius)
        assert np.hypot(*(found - pred[i])) < 0.25, (i, found, pred[i])
        back = tf.inverse(found[None])[0]
        scale = np.hypot(*(quad[3] - quad[0])) / case["out"]  # original px per aligned px
        assert np.hypot(*(back - eyes[i])) < max(1.0, scale), (i, back, eyes[i])
    np.testing.assert_allclose(tf.inverse(tf.forward(lm)), lm, atol=1e-8)
    # quad corners land on the output corners
    corners = tf.forward(quad)
    n = case["out"]
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [-0.5, n - 0.5], [n - 0.5, n - 0.5], [n - 0.5, -0.5]], atol=1e-8)
    if case["h"] == 1400:
        assert tf.shrink == 2
    if case["centre"] == (60, 240):
        assert "padded" in tf.notes and max(tf.pad) > 0
        assert tf.as_dict()["pad"] == list(tf.pad)


def test_align_face_is_deterministic_and_pads_smoothly():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(200, 220, 3), dtype=np.uint8)
    lm = lm5_from((20, 30), (50, 30), (24, 70), (46, 70))  # face hanging off the top-left corner
    quad = align.ffhq_quad(lm)
    a1, t1 = align.align_face(img, quad, output_size=128, transform_size=512)
    a2, _ = align.align_face(img, quad, output_size=128, transform_size=512)
    assert np.array_equal(a1, a2)
    assert "padded" in t1.notes
    a3, _ = align.align_face(img, quad, output_size=128, transform_size=512, enable_padding=False)
    # without padding the outside is black; with padding it is filled
    assert (a3[:5, :5] == 0).all() and a1[:5, :5].mean() > 20


def test_quad_matrix_rejects_non_parallelogram():
    with pytest.raises(ValueError):
        align.quad_to_aligned_matrix(np.array([[0, 0], [0, 10], [12, 13], [10, 0]], float), 64)


# ------------------------------------------------------------------------------- arcface


def test_umeyama_recovers_similarity_and_never_reflects():
    src = np.array([[3.0, 4.0], [10.0, 2.0], [7.0, 9.0], [1.0, 12.0], [8.0, 15.0]])
    s, r, t = 1.7, rot(-40.0), np.array([5.0, -3.0])
    m = align.umeyama_similarity(src, s * src @ r.T + t)
    np.testing.assert_allclose(m[:, :2], s * r, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)
    mirrored = src * [-1, 1]
    m2 = align.umeyama_similarity(src, mirrored)
    assert np.linalg.det(m2[:, :2]) > 0


def test_arcface_align_puts_landmarks_on_template():
    # a face in the image = the template scaled x3, rotated 20 deg, shifted
    lm = (align.ARCFACE_TEMPLATE - 56) * 3.0 @ rot(20.0).T + [250, 230]
    img = blob_image(500, 480, lm, sigma=5.0)
    crop = align.arcface_align(img, lm)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for i in (0, 1, 2):  # one blob per channel without overlap among the first three
        found = blob_centre(crop, i % 3, align.ARCFACE_TEMPLATE[i], radius=5)
        assert np.hypot(*(found - align.ARCFACE_TEMPLATE[i])) < 0.5
    m = align.arcface_matrix(lm)
    np.testing.assert_allclose(align.apply_matrix(m, lm), align.ARCFACE_TEMPLATE, atol=1e-6)
    assert np.isclose(np.sqrt(abs(np.linalg.det(m[:, :2]))), 1 / 3.0)


# ------------------------------------------------------------------------------- wild crop


def test_wild_crop_geometry_and_reflection():
    h, w = 300, 400
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx % 256, yy % 256, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    quad = np.array([[150.5, 100.5], [150.5, 180.5], [230.5, 180.5], [230.5, 100.5]])  # side 80
    crop, q = align.wild_crop(img, quad, scale=2.5, size=200)
    assert crop.shape == (200, 200, 3)
    # side 2.5 x 80 = 200 original px -> scale 1; centre (190.5, 140.5) -> the crop starts at
    # pixel (91, 41): a pure integer translation of the image
    np.testing.assert_allclose(q, quad - [91, 41], atol=1e-9)
    assert np.array_equal(crop, img[41 : 41 + 200, 91 : 91 + 200])
    # a face at the corner: the crop leaves the image, reflected content, no black
    quad2 = quad - [140, 90]
    crop2, q2 = align.wild_crop(img, quad2, scale=3.0, size=128)
    assert crop2.shape == (128, 128, 3) and crop2[..., 2].min() > 150
    np.testing.assert_allclose(q2.mean(0), [63.5, 63.5], atol=1e-9)
    np.testing.assert_allclose(align.quad_side(q2), 128 / 3.0, atol=1e-9)


# ------------------------------------------------------------------------------- border


def test_quad_fraction_outside():
    w, h = 100, 80
    inside = np.array([[10, 10], [10, 50], [50, 50], [50, 10]], float)
    assert align.quad_fraction_outside(inside, w, h) == 0.0
    half = inside + [-30.5 + 0.0, 0]  # x from -20.5 to 19.5: 20 of 40 px left of -0.5
    assert np.isclose(align.quad_fraction_outside(half, w, h), 0.5)
    away = inside + [500, 0]
    assert align.quad_fraction_outside(away, w, h) == 1.0
    # a square centred on the image corner (-0.5, -0.5) rotated 45 deg: 3/4 outside
    c = np.array([-0.5, -0.5])
    diamond = c + np.array([[0, -10], [-10, 0], [0, 10], [10, 0]], float)
    assert np.isclose(align.quad_fraction_outside(diamond, w, h), 0.75)
