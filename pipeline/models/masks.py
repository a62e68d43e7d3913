"""Face-mask geometry (pure): the masks stage and generation draw face masks with these.

A face mask is the filled convex hull of the face points (the 478-point mesh, or an ellipse inside
the FFHQ quad when there is no mesh), eroded and then blurred with kernels given at 1024 px (the W+
Adapter paper: 32 and 7) and scaled to the mask's size. Masks are uint8, 255 = face.
"""
from __future__ import annotations

import cv2
import numpy as np


def scaled_kernel(k_at_1024: int, size: int, odd: bool = False) -> int:
    """A kernel size given at 1024 px, scaled to `size` px (>= 1; odd if asked)."""
    k = max(1, int(round(k_at_1024 * size / 1024)))
    return k + 1 if odd and k % 2 == 0 else k


def hull_mask(points: np.ndarray, size: int, erode_at_1024: int, blur_at_1024: int) -> np.ndarray:
    """uint8 (size, size) mask: filled convex hull of `points` (N, 2 px), eroded then blurred."""
    m = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.round(points).astype(np.int32))
    cv2.fillConvexPoly(m, hull, 255, lineType=cv2.LINE_8)
    e = scaled_kernel(erode_at_1024, size)
    if e > 1:
        m = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (e, e)))
    b = scaled_kernel(blur_at_1024, size, odd=True)
    if b > 1:
        m = cv2.GaussianBlur(m, (b, b), 0)
    return m


def quad_ellipse_points(quad: np.ndarray, n: int = 64) -> np.ndarray:
    """(n, 2) points of an ellipse inside the FFHQ quad (4x2 px) covering the face (no mesh)."""
    q = np.asarray(quad, dtype=np.float64)
    c = q.mean(0)
    ux, uy = (q[3] - q[0]) / 2, (q[1] - q[0]) / 2  # half right, half down
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return c + 0.1 * uy * 2 + np.outer(np.cos(t), ux * 0.62) + np.outer(np.sin(t), uy * 0.78)
