"""Person instance masks: a person probability map split among the faces of an image (pure).

The rule (`split_persons`), in any frame (a whole photo or a face's in-the-wild crop):

1. **Seeds.** Face i's seed is its detector box, cut to the pixels nearer (Euclidean) its own box
   centre than any other face's box centre (a Voronoi cell of the centres inside the box; ties go
   to the lower index). So overlapping boxes never share a pixel, and each face's box centre is
   always its own seed.
2. **People.** The foreground is the person probability >= `threshold`, plus the seeds (a face is
   a person even where the segmenter missed it, e.g. a crowd the selfie model does not see).
3. **Split.** Each connected blob of the foreground (8-connected) is shared by the faces whose seed
   lies in it; a blob pixel outside the seeds takes the face with the smallest body distance
   `(dx / s)^2 + (dy / (k s))^2`, with (dx, dy) the offset from the face's box centre, s the box
   side (mean of width and height) and k = `body_stretch` below the centre (a body hangs under its
   head), 1 above it. Blobs without a face (a person whose face was not found) stay 0: no identity.

The result is a label map, uint8: 0 = no one, i + 1 = face i (at most 255 faces). The masks of
different faces are disjoint by construction and each holds its own box centre.

The person probability of a whole photo (`photo_person_prob`) is the maximum of the selfie
segmentation of the whole photo and of each face's in-the-wild crop (side `scale` x the face quad),
pasted back: the selfie model works at 256 px, so a crowd (the sample's `players.jpg`) is found in
the crops and missed in the whole photo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class InstancesConfig:
    """params `instances:` person instance masks per face (one label map per face sample)."""

    threshold: float = 0.5  # person probability at or above which a pixel is a person
    body_stretch: float = 4.0  # below its head, a body reaches k times further than sideways (split rule)
    batch_size: int = 16


def box_seeds(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 seed labels: face i's box cut to its Voronoi cell of the box centres (see module doc).

    boxes: (N, 4) x0, y0, x1, y1 in pixel coordinates of the frame (pixel centres at integers);
    a box pixel (x, y) is inside when x0 <= x <= x1 and y0 <= y <= y1 (clipped to the frame)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) > 255:
        raise ValueError(f"at most 255 faces per label map, got {len(boxes)}")
    seeds = np.zeros((height, width), np.uint8)
    if len(boxes) == 0:
        return seeds
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        c0, c1 = max(0, int(np.ceil(x0))), min(width - 1, int(np.floor(x1)))
        r0, r1 = max(0, int(np.ceil(y0))), min(height - 1, int(np.floor(y1)))
        if c1 < c0 or r1 < r0:
            continue  # the box lies outside the frame
        ys, xs = np.mgrid[r0:r1 + 1, c0:c1 + 1]
        d = (xs[..., None] - centres[:, 0]) ** 2 + (ys[..., None] - centres[:, 1]) ** 2  # (h, w, N)
        own = np.argmin(d, axis=-1) == i  # argmin: the lower index on ties
        patch = seeds[r0:r1 + 1, c0:c1 + 1]
        patch[own & (patch == 0)] = i + 1
    return seeds


def split_persons(person_prob: np.ndarray, boxes: np.ndarray, threshold: float = 0.5,
                  body_stretch: float = 4.0) -> np.ndarray:
    """(H, W) person probability in [0, 1] + (N, 4) face boxes -> (H, W) uint8 labels (module doc)."""
    from scipy import ndimage

    prob = np.asarray(person_prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"person probability must be (H, W), got {prob.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    seeds = box_seeds(boxes, *prob.shape)
    if not seeds.any():
        return seeds
    fg = (prob >= threshold) | (seeds > 0)
    blobs, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    out = seeds.copy()
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    sides = np.maximum((boxes[:, 2] - boxes[:, 0] + boxes[:, 3] - boxes[:, 1]) / 2, 1e-6)
    for blob in np.unique(blobs[seeds > 0]):
        owners = np.unique(seeds[(blobs == blob) & (seeds > 0)]).astype(np.int64) - 1  # faces seeded here
        ys, xs = np.nonzero((blobs == blob) & (seeds == 0))
        if len(ys) == 0:
            continue
        dx = (xs[:, None] - centres[owners, 0]) / sides[owners]
        dy = (ys[:, None] - centres[owners, 1]) / sides[owners]
        dy = np.where(dy > 0, dy / body_stretch, dy)
        out[ys, xs] = (owners[np.argmin(dx * dx + dy * dy, axis=1)] + 1).astype(np.uint8)
    return out


def label_masks(labels: np.ndarray, count: int) -> np.ndarray:
    """(H, W) label map -> (count, H, W) bool: mask i = pixels of face i (label i + 1)."""
    labels = np.asarray(labels)
    return np.stack([labels == i + 1 for i in range(count)]) if count else np.zeros((0, *labels.shape), bool)


def transform_boxes(matrix: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, 4) boxes through a 3x3 similarity without rotation (scale + shift, e.g. an in-the-wild
    crop's map): the images of the two corners."""
    m = np.asarray(matrix, dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    p0 = b[:, :2] @ m[:2, :2].T + m[:2, 2]
    p1 = b[:, 2:] @ m[:2, :2].T + m[:2, 2]
    return np.concatenate([np.minimum(p0, p1), np.maximum(p0, p1)], axis=1)


def crop_matrix(quad: np.ndarray, scale: float, size: int) -> np.ndarray:
    """3x3 map photo pixels -> in-the-wild crop pixels: the map of `pipeline.models.align.wild_crop`
    (crop = (photo + 0.5 - box0) * size / side - 0.5)."""
    from pipeline.models import align as geom

    cx, cy, side = geom.wild_box(np.asarray(quad, dtype=np.float64), scale)
    s = size / side
    bx0, by0 = cx + 0.5 - side / 2.0, cy + 0.5 - side / 2.0
    return np.array([[s, 0, (0.5 - bx0) * s - 0.5], [0, s, (0.5 - by0) * s - 0.5], [0, 0, 1.0]])


def photo_person_prob(rgb: np.ndarray, faces: Sequence[Any], segmenter: Any, scale: float = 2.5,
                      crop_size: int = 256) -> np.ndarray:
    """(H, W) float32 person probability of a photo: max of the whole-photo segmentation and of each
    face's in-the-wild crop segmentation pasted back (faces: objects with `.lm5`; `segmenter`:
    `pipeline.models.faces.SelfieSegmenter`)."""
    import cv2

    from pipeline.models import align as geom

    h, w = rgb.shape[:2]
    prob = np.asarray(segmenter.segment(rgb), dtype=np.float32)
    for f in faces:
        if getattr(f, "lm5", None) is None:
            continue
        quad = geom.ffhq_quad(np.asarray(f.lm5, dtype=np.float64))
        crop, _ = geom.wild_crop(rgb, quad, scale, crop_size)
        p = np.asarray(segmenter.segment(crop), dtype=np.float32)
        m = crop_matrix(quad, scale, crop_size)
        inv = np.linalg.inv(m)[:2]  # crop -> photo; warp the crop's probability into the photo frame
        back = cv2.warpAffine(p, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        prob = np.maximum(prob, back)
    return np.clip(prob, 0.0, 1.0)
