"""Face alignment geometry: the FFHQ quad and crop, the ArcFace 112x112 crop, in-the-wild crops.

Coordinate convention (everything in this module and in `faces.py`):
- points are (x, y) in pixels of the image they refer to, x to the right, y downwards;
- integer coordinates are pixel centres: pixel column i covers [i - 0.5, i + 0.5], so an image of
  width W spans x in [-0.5, W - 0.5] (the convention of cv2.warpAffine and skimage);
- five-point landmarks `lm5` are ordered like the ArcFace template and SCRFD:
  0 subject's right eye centre (on the image's left in an upright frontal photo),
  1 subject's left eye centre, 2 nose tip, 3 subject's right mouth corner, 4 subject's left mouth
  corner;
- a quad is 4 corners in the order of PIL's QUAD transform: top-left, bottom-left, bottom-right,
  top-right of the aligned output (as seen upright in the aligned image).

FFHQ recipe (Karras et al., ffhq-dataset): the quad is an oriented square centred a little below the
eyes, of side max(4 * |eye_to_eye|, 3.6 * |eye_to_mouth|). `align_face` shrinks very large images,
crops, reflect-pads and blurs towards the padded border, then resamples the quad to
`transform_size` (bilinear) and down to `output_size` (Lanczos). Because the quad is a square, the
whole operation is one affine map, returned as `AlignTransform` (forward original -> aligned and
inverse) so landmarks can be carried between the two images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import scipy.ndimage
from PIL import Image

# ArcFace 112x112 template (insightface `arcface_dst`), same point order as `lm5`.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


# --------------------------------------------------------------------------------------------
# small helpers


def _as_points(pts: np.ndarray | Sequence) -> np.ndarray:
    a = np.asarray(pts, dtype=np.float64)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"expected (N, 2) points, got shape {a.shape}")
    return a


def apply_matrix(m: np.ndarray, pts: np.ndarray | Sequence) -> np.ndarray:
    """Apply a 2x3 affine or 3x3 projective matrix to (N, 2) points -> (N, 2) float64."""
    p = _as_points(pts)
    m = np.asarray(m, dtype=np.float64)
    h = np.concatenate([p, np.ones((len(p), 1))], axis=1)
    if m.shape == (2, 3):
        return h @ m.T
    if m.shape == (3, 3):
        q = h @ m.T
        return q[:, :2] / q[:, 2:3]
    raise ValueError(f"expected a 2x3 or 3x3 matrix, got {m.shape}")


def _check_image(img: np.ndarray) -> None:
    if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
        raise ValueError("expected an HxWx3 uint8 RGB array")


# --------------------------------------------------------------------------------------------
# FFHQ quad


def ffhq_quad(*args: np.ndarray | Sequence) -> np.ndarray:
    """FFHQ crop quad from landmarks: `ffhq_quad(lm5)` or `ffhq_quad(eye_r, eye_l, mouth_r, mouth_l)`.

    With one argument it is the (5, 2) `lm5` array (points 0, 1, 3, 4 are used). With four, the
    subject's right eye, left eye, right mouth corner, left mouth corner as (x, y) pixels (FFHQ's
    `eye_left`/`mouth_left` are the points on the image's left). Returns (4, 2) float64 corners
    top-left, bottom-left, bottom-right, top-right (pixel-centre coordinates).
    """
    if len(args) == 1:
        lm = _as_points(args[0])
        if lm.shape != (5, 2):
            raise ValueError(f"ffhq_quad(lm5) needs (5, 2) landmarks, got {lm.shape}")
        eye_l, eye_r, mouth_l, mouth_r = lm[0], lm[1], lm[3], lm[4]
    elif len(args) == 4:
        eye_l, eye_r, mouth_l, mouth_r = (np.asarray(a, dtype=np.float64).reshape(2) for a in args)
    else:
        raise TypeError("ffhq_quad takes lm5 or (eye_left, eye_right, mouth_left, mouth_right)")

    eye_avg = (eye_l + eye_r) * 0.5
    eye_to_eye = eye_r - eye_l
    mouth_avg = (mouth_l + mouth_r) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1.0, 1.0]
    norm = np.hypot(*x)
    if not np.isfinite(norm) or norm <= 0:
        raise ValueError("degenerate landmarks: cannot orient the FFHQ quad")
    x = x / norm
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1.0, 1.0]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]).astype(np.float64)


def quad_side(quad: np.ndarray) -> float:
    """Side length in pixels of a (square) quad: mean of its top and left edges."""
    q = _as_points(quad)
    return float((np.hypot(*(q[3] - q[0])) + np.hypot(*(q[1] - q[0]))) * 0.5)


def quad_to_aligned_matrix(quad: np.ndarray, output_size: int) -> np.ndarray:
    """3x3 forward map (pixel-centre coords) from the original image to the aligned crop.

    The aligned pixel (U, V) samples the original at q0 + e_u (U + 0.5) + e_v (V + 0.5), with
    e_u = (q3 - q0) / size and e_v = (q1 - q0) / size (exact for a parallelogram quad); this
    matrix is the inverse of that map.
    """
    q = _as_points(quad)
    if q.shape != (4, 2):
        raise ValueError(f"quad must be (4, 2), got {q.shape}")
    skew = q[2] - q[1] - q[3] + q[0]  # zero for a parallelogram
    if np.hypot(*skew) > 1e-6 * max(1.0, quad_side(q)):
        raise ValueError("quad is not a parallelogram; the aligned map would not be affine")
    e_u = (q[3] - q[0]) / output_size
    e_v = (q[1] - q[0]) / output_size
    inv = np.array(
        [
            [e_u[0], e_v[0], q[0, 0] + 0.5 * (e_u[0] + e_v[0])],
            [e_u[1], e_v[1], q[0, 1] + 0.5 * (e_u[1] + e_v[1])],
            [0.0, 0.0, 1.0],
        ]
    )
    return np.linalg.inv(inv)


@dataclass
class AlignTransform:
    """How an aligned crop relates to its original image (pixel-centre coordinates)."""

    quad: np.ndarray  # (4, 2) quad in the original image
    output_size: int
    matrix: np.ndarray  # 3x3 original -> aligned
    shrink: int = 1  # FFHQ shrink factor applied before cropping (1 = none)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # crop box in the (shrunk) image, x0 y0 x1 y1
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # reflect padding left, top, right, bottom
    notes: list[str] = field(default_factory=list)

    def forward(self, pts: np.ndarray) -> np.ndarray:
        """Original-image points (N, 2) -> aligned-crop points (N, 2)."""
        return apply_matrix(self.matrix, pts)

    def inverse(self, pts: np.ndarray) -> np.ndarray:
        """Aligned-crop points (N, 2) -> original-image points (N, 2)."""
        return apply_matrix(np.linalg.inv(self.matrix), pts)

    def as_dict(self) -> dict:
        return {
            "quad": np.asarray(self.quad, dtype=float).round(4).tolist(),
            "output_size": int(self.output_size),
            "matrix": np.asarray(self.matrix, dtype=float).tolist(),
            "shrink": int(self.shrink),
            "crop": [int(v) for v in self.crop],
            "pad": [int(v) for v in self.pad],
            "notes": list(self.notes),
        }


def align_face(
    img: np.ndarray,
    quad: np.ndarray,
    output_size: int = 512,
    transform_size: int = 4096,
    enable_padding: bool = True,
) -> tuple[np.ndarray, AlignTransform]:
    """FFHQ-style aligned crop of `quad` from an HxWx3 uint8 RGB image.

    Returns (output_size x output_size x 3 uint8 RGB, AlignTransform). Deterministic. Regions of
    the quad outside the image are reflect-padded and blurred towards the border (FFHQ); with
    `enable_padding=False` they are black.
    """
    _check_image(img)
    q = _as_points(quad).copy()
    if q.shape != (4, 2):
        raise ValueError(f"quad must be (4, 2), got {q.shape}")
    matrix = quad_to_aligned_matrix(q, output_size)
    pil = Image.fromarray(img)
    qc = q + 0.5  # continuous coordinates (pixel i spans [i, i+1]), what PIL's QUAD expects
    qsize = float(np.hypot(*(q[3] - q[0])))
    notes: list[str] = []

    # Shrink: downscale huge images first so the bilinear quad resampling does not alias.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        w0, h0 = pil.size
        rsize = (max(1, int(np.rint(w0 / shrink))), max(1, int(np.rint(h0 / shrink))))
        pil = pil.resize(rsize, Image.Resampling.LANCZOS)
        qc = qc * [rsize[0] / w0, rsize[1] / h0]  # exact scale, so the affine map stays exact
        qsize /= shrink
    else:
        shrink = 1

    # Crop to the quad plus a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    qp = qc - 0.5
    crop = (
        int(np.floor(qp[:, 0].min())),
        int(np.floor(qp[:, 1].min())),
        int(np.ceil(qp[:, 0].max())),
        int(np.ceil(qp[:, 1].max())),
    )
    crop = (
        max(crop[0] - border, 0),
        max(crop[1] - border, 0),
        min(crop[2] + border, pil.size[0]),
        min(crop[3] + border, pil.size[1]),
    )
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        notes.append("quad_outside_image")
        crop = (0, 0, pil.size[0], pil.size[1])
    if crop[2] - crop[0] < pil.size[0] or crop[3] - crop[1] < pil.size[1]:
        pil = pil.crop(crop)
        qc = qc - [crop[0], crop[1]]

    # Pad: reflect the image where the quad leaves it, blur and fade the padding to the median.
    qp = qc - 0.5
    pad = (
        max(-int(np.floor(qp[:, 0].min())) + border, 0),
        max(-int(np.floor(qp[:, 1].min())) + border, 0),
        max(int(np.ceil(qp[:, 0].max())) - pil.size[0] + border, 0),
        max(int(np.ceil(qp[:, 1].max())) - pil.size[1] + border, 0),
    )
    applied_pad = (0, 0, 0, 0)
    if enable_padding and max(pad) > border - 4:
        p = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.asarray(pil, dtype=np.float32), ((p[1], p[3]), (p[0], p[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        pl, pt, pr, pb = (float(max(v, 1)) for v in p)
        mask = np.maximum(
            1.0 - np.minimum(xx.astype(np.float32) / pl, (w - 1 - xx).astype(np.float32) / pr),
            1.0 - np.minimum(yy.astype(np.float32) / pt, (h - 1 - yy).astype(np.float32) / pb),
        )
        blur = qsize * 0.02
        arr += (scipy.ndimage.gaussian_filter(arr, [blur, blur, 0]) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        pil = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        qc = qc + [p[0], p[1]]
        applied_pad = tuple(int(v) for v in p)
        notes.append("padded")

    # Transform: sample the quad at transform_size, then Lanczos down to output_size.
    tsize = max(int(transform_size), int(output_size))
    out = pil.transform((tsize, tsize), Image.Transform.QUAD, tuple(qc.flatten()), Image.Resampling.BILINEAR)
    if output_size < tsize:
        out = out.resize((output_size, output_size), Image.Resampling.LANCZOS)
    info = AlignTransform(
        quad=q, output_size=int(output_size), matrix=matrix, shrink=shrink, crop=crop, pad=applied_pad, notes=notes
    )
    return np.asarray(out, dtype=np.uint8).copy(), info


# --------------------------------------------------------------------------------------------
# in-the-wild crop


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map integer indices onto [0, n) by mirror reflection without repeating the edge (reflect-101)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def wild_box(quad: np.ndarray, scale: float = 2.5) -> tuple[float, float, float]:
    """Axis-aligned square around the face: (centre x, centre y, side) in pixel-centre coords."""
    q = _as_points(quad)
    c = q.mean(axis=0)
    return float(c[0]), float(c[1]), float(scale * quad_side(q))


def wild_crop(
    img: np.ndarray, quad: np.ndarray, scale: float = 2.5, size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Square in-the-wild crop centred on the face quad, side `scale` x quad side, resized to `size`.

    Parts outside the image are filled by mirror reflection. Returns (size x size x 3 uint8 RGB,
    (4, 2) face quad in crop pixel coordinates). The map is crop = (orig + 0.5 - box0) * size / side
    - 0.5 with box0 = centre - side / 2.
    """
    _check_image(img)
    h, w = img.shape[:2]
    cx, cy, side = wild_box(quad, scale)
    if side <= 0:
        raise ValueError("degenerate quad")
    # continuous box [bx0, bx0 + side] x [by0, by0 + side]
    bx0, by0 = cx + 0.5 - side / 2.0, cy + 0.5 - side / 2.0
    ix0, iy0 = int(np.floor(bx0)), int(np.floor(by0))
    ix1, iy1 = int(np.ceil(bx0 + side)), int(np.ceil(by0 + side))
    xs = _reflect_index(np.arange(ix0, ix1), w)
    ys = _reflect_index(np.arange(iy0, iy1), h)
    region = img[ys[:, None], xs[None, :]]
    box = (bx0 - ix0, by0 - iy0, bx0 - ix0 + side, by0 - iy0 + side)
    out = Image.fromarray(np.ascontiguousarray(region)).resize((size, size), Image.Resampling.LANCZOS, box=box)
    s = size / side
    q = (_as_points(quad) + 0.5 - [bx0, by0]) * s - 0.5
    return np.asarray(out, dtype=np.uint8).copy(), q


# --------------------------------------------------------------------------------------------
# ArcFace crop


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst as a 2x3 matrix.

    Umeyama (1991): minimises sum |dst_i - (s R src_i + t)|^2 with det(R) = +1 (no reflection).
    """
    s_pts, d_pts = _as_points(src), _as_points(dst)
    if s_pts.shape != d_pts.shape or len(s_pts) < 2:
        raise ValueError("need matching (N >= 2, 2) point sets")
    mu_s, mu_d = s_pts.mean(0), d_pts.mean(0)
    sc, dc = s_pts - mu_s, d_pts - mu_d
    var_s = (sc**2).sum() / len(s_pts)
    if var_s <= 0:
        raise ValueError("degenerate source points")
    cov = dc.T @ sc / len(s_pts)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    r = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    t = mu_d - scale * r @ mu_s
    return np.concatenate([scale * r, t[:, None]], axis=1)


def arcface_matrix(lm5: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 similarity mapping `lm5` (original pixels) onto the ArcFace template scaled to `size`."""
    lm = _as_points(lm5)
    if lm.shape != (5, 2):
        raise ValueError(f"arcface alignment needs (5, 2) landmarks, got {lm.shape}")
    return umeyama_similarity(lm, ARCFACE_TEMPLATE * (size / 112.0))


def arcface_align(img: np.ndarray, lm5: np.ndarray, size: int = 112) -> np.ndarray:
    """ArcFace input crop: similarity warp of `lm5` onto the template -> size x size x 3 uint8 RGB."""
    _check_image(img)
    m = arcface_matrix(lm5, size)
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# --------------------------------------------------------------------------------------------
# border checks


def _polygon_area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) * 0.5)


def _clip_polygon(poly: np.ndarray, axis: int, bound: float, keep_greater: bool) -> np.ndarray:
    """One Sutherland-Hodgman step against the half-plane x[axis] >= bound (or <= bound)."""
    if len(poly) == 0:
        return poly
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina = (a[axis] >= bound) if keep_greater else (a[axis] <= bound)
        inb = (b[axis] >= bound) if keep_greater else (b[axis] <= bound)
        if ina:
            out.append(a)
        if ina != inb:
            t = (bound - a[axis]) / (b[axis] - a[axis])
            out.append(a + t * (b - a))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def quad_fraction_outside(quad: np.ndarray, width: int, height: int) -> float:
    """Fraction (0..1) of the quad's area that lies outside the image [-0.5, W-0.5] x [-0.5, H-0.5]."""
    q = _as_points(quad)
    total = _polygon_area(q)
    if total <= 0:
        return 1.0
    p = q
    p = _clip_polygon(p, 0, -0.5, True)
    p = _clip_polygon(p, 0, width - 0.5, False)
    p = _clip_polygon(p, 1, -0.5, True)
    p = _clip_polygon(p, 1, height - 0.5, False)
    inside = _polygon_area(p)
    return float(min(1.0, max(0.0, 1.0 - inside / total)))
