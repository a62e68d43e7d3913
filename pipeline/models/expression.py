"""A facial-expression descriptor from the 478-point MediaPipe face mesh, and precomputed vectors.

NOT a 3DMM expression vector (the Face2Diffusion paper uses a 64-d one from a 3D face reconstruction
model, which does not install offline): a documented, geometric, approximately pose-normalised
measure of what the face is doing, from the dense 2-D mesh the align stage stores (`mesh.npy`,
(478, 2) float32, original-image pixels, MediaPipe FaceMesh topology with refined irises).

Pose normalisation (`canonical`). The frame uses rigid points only (eye corners and the bottom of the
nose, never the mouth, brows or chin, which move with the expression):
  origin o  = midpoint of the two eye centres (each eye centre = mean of its two corners)
  x axis u  = unit vector from the subject's right eye centre to the left one (in-plane rotation removed)
  y axis v  = u turned 90 degrees towards the chin (image y down)
  x unit sx = inter-ocular distance |EL - ER| (scale; yaw foreshortens it like the face's widths)
  y unit sy = v . (nose bottom (2) - o), eye line to nose bottom (pitch foreshortens it like the
              face's heights)
So translation, scale and in-plane rotation are removed exactly; out-of-plane yaw / pitch approximately
(horizontal terms are in units of a horizontal rigid length, vertical terms of a vertical one). A
point p has canonical coordinates x = u.(p - o) / sx, y = v.(p - o) / sy.

Terms (`TERMS`, D = 23; "_r" / "_l" = the SUBJECT's right / left; y grows towards the chin):
   0/1  eye_open_r/l      mean lid gap of 3 upper/lower lid pairs            (blink -> 0)
   2/3  brow_raise_r/l    eye centre y - mean y of the 5 upper brow points   (raised brows -> up)
   4/5  brow_inner_r/l    inner eye corner y - inner brow end y              (worried / surprised)
   6/7  brow_outer_r/l    outer eye corner y - outer brow end y
   8    brow_gap          |x(inner brow r) - x(inner brow l)|                 (frown -> down)
   9    mouth_open        inner lower lip y - inner upper lip y               (open mouth -> up)
  10    lip_height        outer lower lip y - outer upper lip y
  11    mouth_width       |x(left corner) - x(right corner)|                  (smile, stretch -> up)
 12/13  corner_lift_r/l   inner-lip centre y - mouth corner y                 (smile -> up, frown -> down)
 14/15  corner_out_r/l    |x(corner) - x(lip midline)|                         (one-sided smile)
 16     upper_lip_drop    upper lip top y - nose bottom y                      (sneer -> down)
 17     jaw_drop          chin y - nose bottom y                               (open jaw -> up)
 18/19  cheek_low_r/l     cheek point y - eye centre y                         (smile raises cheeks -> down)
 20/21  lower_lid_r/l     lower lid middle y - eye corner line y               (squint -> down)
 22     nose_width        |x(nose wing r) - x(nose wing l)|                    (nostril flare, sneer)
Every term is symmetric under a horizontal flip of the photo: the mesh of the mirrored face labels
the mirrored points anatomically, so x -> -x, y -> y and the right/left terms trade places
(`FLIP`: the permutation a flipped face's descriptor is the original's under; training with horizontal
flips permutes the expression input with it).

Values are raw canonical lengths (about 0.02 .. 2); standardisation over a dataset (mean 0, std 1 per
term) belongs to whoever uses them with that dataset's statistics (the Face2Diffusion conditioner holds
its training set's), so a per-face row never depends on the other faces (incremental stages).

Precomputed vectors (`PrecomputedExpressionConfig`): per photo, a user's own vector (e.g. a 3DMM
expression code) from a column of the ingest manifests or from .npy files; see `read_vector`.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

VERSION = "mesh-expression-v1"
MESH_POINTS = 478

# MediaPipe FaceMesh indices (subject's right / left; verified mirror pairs on a frontal mesh)
EYE_R = {"outer": 33, "inner": 133, "upper": (160, 159, 158), "lower": (144, 145, 153)}
EYE_L = {"outer": 263, "inner": 362, "upper": (387, 386, 385), "lower": (373, 374, 380)}
BROW_R = (70, 63, 105, 66, 107)  # outer -> inner, upper edge
BROW_L = (300, 293, 334, 296, 336)
LIP_UPPER_OUTER, LIP_UPPER_INNER, LIP_LOWER_INNER, LIP_LOWER_OUTER = 0, 13, 14, 17
CORNER_R, CORNER_L = 61, 291
NOSE_BOTTOM = 2
CHIN = 152
CHEEK_R, CHEEK_L = 205, 425
NOSE_WING_R, NOSE_WING_L = 98, 327

TERMS: tuple[str, ...] = (
    "eye_open_r", "eye_open_l", "brow_raise_r", "brow_raise_l", "brow_inner_r", "brow_inner_l",
    "brow_outer_r", "brow_outer_l", "brow_gap", "mouth_open", "lip_height", "mouth_width",
    "corner_lift_r", "corner_lift_l", "corner_out_r", "corner_out_l", "upper_lip_drop", "jaw_drop",
    "cheek_low_r", "cheek_low_l", "lower_lid_r", "lower_lid_l", "nose_width",
)
DIM = len(TERMS)


def _flip_permutation() -> tuple[int, ...]:
    idx = {n: i for i, n in enumerate(TERMS)}
    out = []
    for n in TERMS:
        if n.endswith("_r"):
            out.append(idx[n[:-2] + "_l"])
        elif n.endswith("_l"):
            out.append(idx[n[:-2] + "_r"])
        else:
            out.append(idx[n])
    return tuple(out)


FLIP: tuple[int, ...] = _flip_permutation()  # descriptor(flipped photo) == descriptor(photo)[FLIP]
EYE_TERMS: tuple[int, ...] = tuple(i for i, n in enumerate(TERMS) if n.startswith(("eye_open", "lower_lid")))
MOUTH_OPEN = TERMS.index("mouth_open")


class BadMesh(ValueError):
    """A mesh the descriptor cannot use (wrong shape, non-finite, degenerate frame)."""


@dataclass(frozen=True)
class Frame:
    """The canonical frame of one mesh (see module doc)."""

    origin: np.ndarray  # (2,) px
    u: np.ndarray  # (2,) unit, subject's right eye -> left eye
    v: np.ndarray  # (2,) unit, towards the chin
    sx: float  # inter-ocular distance, px
    sy: float  # eye line -> nose bottom, px

    def coords(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) px -> (N, 2) canonical (x in sx units, y in sy units)."""
        d = np.asarray(pts, np.float64) - self.origin
        return np.stack([d @ self.u / self.sx, d @ self.v / self.sy], axis=-1)


def canonical(mesh: np.ndarray) -> Frame:
    """The pose-normalising frame of a (478, 2) mesh; BadMesh when it cannot be built."""
    m = np.asarray(mesh, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 468 or m.shape[1] < 2:
        raise BadMesh(f"expected a ({MESH_POINTS}, 2) MediaPipe mesh, got shape {m.shape}")
    m = m[:, :2]
    if not np.all(np.isfinite(m)):
        raise BadMesh("mesh has non-finite coordinates")
    er = m[[EYE_R["outer"], EYE_R["inner"]]].mean(0)
    el = m[[EYE_L["outer"], EYE_L["inner"]]].mean(0)
    sx = float(np.linalg.norm(el - er))
    if sx < 1e-3:
        raise BadMesh("eye centres coincide")
    u = (el - er) / sx
    v = np.array([-u[1], u[0]])
    o = (er + el) / 2.0
    sy = float((m[NOSE_BOTTOM] - o) @ v)
    if sy < 0.1 * sx:
        raise BadMesh(f"nose bottom is not below the eye line (eye line -> nose {sy:.2f} px, eyes {sx:.2f} px apart)")
    return Frame(o, u, v, sx, sy)


def descriptor(mesh: np.ndarray) -> np.ndarray:
    """(478, 2) mesh (any pixel frame) -> (DIM,) float32 expression descriptor (`TERMS`)."""
    m = np.asarray(mesh, dtype=np.float64)
    fr = canonical(m)
    c = fr.coords(m[:, :2])
    x, y = c[:, 0], c[:, 1]

    def side(eye: dict, brow: tuple, corner: int, cheek: int) -> dict[str, float]:
        ey = (y[eye["outer"]] + y[eye["inner"]]) / 2.0
        return {
            "eye_open": float(np.mean([y[lo] - y[up] for up, lo in zip(eye["upper"], eye["lower"])])),
            "brow_raise": float(ey - np.mean(y[list(brow)])),
            "brow_inner": float(y[eye["inner"]] - y[brow[-1]]),
            "brow_outer": float(y[eye["outer"]] - y[brow[0]]),
            "corner_lift": float((y[LIP_UPPER_INNER] + y[LIP_LOWER_INNER]) / 2.0 - y[corner]),
            "corner_out": float(abs(x[corner] - (x[LIP_UPPER_OUTER] + x[LIP_LOWER_OUTER]) / 2.0)),
            "cheek_low": float(y[cheek] - ey),
            "lower_lid": float(y[eye["lower"][1]] - ey),
        }

    r = side(EYE_R, BROW_R, CORNER_R, CHEEK_R)
    lft = side(EYE_L, BROW_L, CORNER_L, CHEEK_L)
    vals = {f"{k}_r": v for k, v in r.items()} | {f"{k}_l": v for k, v in lft.items()}
    vals.update(
        brow_gap=float(abs(x[BROW_R[-1]] - x[BROW_L[-1]])),
        mouth_open=float(y[LIP_LOWER_INNER] - y[LIP_UPPER_INNER]),
        lip_height=float(y[LIP_LOWER_OUTER] - y[LIP_UPPER_OUTER]),
        mouth_width=float(abs(x[CORNER_L] - x[CORNER_R])),
        upper_lip_drop=float(y[LIP_UPPER_OUTER] - y[NOSE_BOTTOM]),
        jaw_drop=float(y[CHIN] - y[NOSE_BOTTOM]),
        nose_width=float(abs(x[NOSE_WING_L] - x[NOSE_WING_R])),
    )
    return np.array([vals[t] for t in TERMS], dtype=np.float32)


def flip(desc: np.ndarray) -> np.ndarray:
    """The descriptor of the horizontally flipped photo: right / left terms swapped (`FLIP`)."""
    d = np.asarray(desc)
    if d.shape[-1] != DIM:
        raise ValueError(f"flip: a {DIM}-term mesh descriptor expected, got last dim {d.shape[-1]}")
    return d[..., list(FLIP)]


def fingerprint() -> str:
    """Identity of the descriptor definition (its version, indices and terms)."""
    import hashlib

    spec = json.dumps({"version": VERSION, "terms": TERMS, "eyes": [EYE_R, EYE_L], "brows": [BROW_R, BROW_L],
                       "lips": [LIP_UPPER_OUTER, LIP_UPPER_INNER, LIP_LOWER_INNER, LIP_LOWER_OUTER, CORNER_R, CORNER_L],
                       "rigid": NOSE_BOTTOM, "chin": CHIN, "cheeks": [CHEEK_R, CHEEK_L],
                       "nose": [NOSE_WING_R, NOSE_WING_L]}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


# ============================================================================================
# params (section `expression:`)


@dataclass
class PrecomputedExpressionConfig:
    """Per-photo vectors supplied by the user (e.g. a 3DMM's expression code), backend `precomputed`.

    Looked up per ingested photo (its source name and its path relative to the source, as ingest
    records them): the `column` of a manifest source's row (a JSON list of numbers, or a `.npy` path
    relative to the manifest), else `<npy_dir>/<source>/<relpath with its extension replaced by .npy>`.
    A vector is (dim,) for a photo with one detected face, or (faces, dim) in the align stage's face
    order."""

    column: Optional[str] = "expression_vector"  # manifest column (CSV / JSONL sources); null: none
    npy_dir: Optional[str] = None  # folder of per-photo .npy files (see above); null: none
    dim: int = 64  # the vectors' length (the paper's 3DMM: 64)
    name: str = "precomputed"  # what made them (recorded as the model name in the shards)
    weights_real: bool = True  # whether a real model made them (recorded)


@dataclass
class ExpressionConfig:
    """`expression:` the expression stage (backend `landmarks`: this module's mesh descriptor)."""

    backend: Literal["landmarks", "precomputed"] = "landmarks"
    precomputed: PrecomputedExpressionConfig = field(default_factory=PrecomputedExpressionConfig)
    batch_size: int = 64
    stats_faces: int = 2000  # faces (first by key) whose per-term mean / std go into the metrics

    def validate(self, path: str) -> None:
        from pipeline.config import ConfigError

        if self.precomputed.dim < 1 or self.batch_size < 1:
            raise ConfigError(f"{path}: precomputed.dim and batch_size must be >= 1")
        if self.backend == "precomputed" and not (self.precomputed.column or self.precomputed.npy_dir):
            raise ConfigError(f"{path}.precomputed: give a manifest column or an npy_dir")

    @property
    def dim(self) -> int:
        return DIM if self.backend == "landmarks" else int(self.precomputed.dim)


def parse_vector(value, base_dir: Optional[str] = None) -> np.ndarray:
    """A manifest cell -> float32 array: a JSON list (of lists) of numbers, or a path to a .npy file
    (relative to `base_dir`). ValueError when it is neither."""
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=np.float32)
    text = str(value).strip()
    if text.startswith("["):
        return np.asarray(json.loads(text), dtype=np.float32)
    path = text if os.path.isabs(text) or base_dir is None else os.path.join(base_dir, text)
    if not text.endswith(".npy"):
        raise ValueError(f"not a JSON list of numbers or a .npy path: {text[:60]!r}")
    return load_npy(path)


def load_npy(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False).astype(np.float32)


def vector_for_face(vec: np.ndarray, face_index: int, faces_in_photo: int, dim: int) -> np.ndarray:
    """The face's row of a photo's precomputed vector; ValueError (with the reason) when it has none."""
    v = np.asarray(vec, dtype=np.float32)
    if v.ndim == 1:
        if faces_in_photo != 1:
            raise ValueError(f"ambiguous: one vector for a photo with {faces_in_photo} detected faces "
                             f"(give ({faces_in_photo}, {dim}) rows in face order)")
        row = v
    elif v.ndim == 2:
        if face_index >= v.shape[0]:
            raise ValueError(f"the photo's vectors have {v.shape[0]} rows, this is face {face_index}")
        row = v[face_index]
    else:
        raise ValueError(f"vector of shape {v.shape}: expected (dim,) or (faces, dim)")
    if row.shape != (dim,):
        raise ValueError(f"vector of length {row.shape[0]}, expression.precomputed.dim is {dim}")
    if not np.all(np.isfinite(row)):
        raise ValueError("vector has non-finite values")
    return row.astype(np.float32)


def model_info(cfg: ExpressionConfig):
    """The ModelInfo recorded with every row: the mesh descriptor (on MediaPipe's real FaceMesh), or
    the user's precomputed vectors (named and tagged as configured)."""
    from pipeline.models.base import ModelInfo, text_fingerprint

    if cfg.backend == "landmarks":
        return ModelInfo(f"mediapipe-{VERSION}", fingerprint(), True,
                         "Apache-2.0 (MediaPipe FaceMesh); a geometric descriptor, not a 3DMM",
                         "pipeline/models/expression.py")
    p = cfg.precomputed
    return ModelInfo(f"precomputed:{p.name}", text_fingerprint("precomputed", p.name, p.dim), bool(p.weights_real),
                     "as supplied by the user", p.npy_dir or f"manifest column {p.column}")
