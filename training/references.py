"""Reference photos -> shard-like samples, so a method turns photos into conditioner inputs with the
same code it uses on shard samples (`Method.inputs`).

    kit = ReferenceKit(params)                        # params: the data stages' sections (align, masks, ...)
    samples = kit.samples(["me.jpg"], needs=("id.npy",))
    # [{"__key__", "face.jpg": aligned face, "face_mask.png", "json": {...}, "id.npy": (512,)}]

Each photo contributes its largest face with real landmarks (`largest_face`), aligned and masked
exactly as the align and masks stages do (FFHQ crop; hull of the face mesh, or the quad ellipse).
Members beyond the aligned face are computed by member encoders: `id.npy` (ArcFace, the identity
stage's crop) is built in; a method registers its own with `register_member(name, fn)` (e.g. W+ codes
with e4e). Models load lazily, once per kit.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pipeline.config import Params, to_dict
from pipeline.digests import sha256_array, sha256_file

log = logging.getLogger("persona.references")

# member name -> fn(kit, faces) -> one array per face
MemberFn = Callable[["ReferenceKit", Sequence["ReferenceFace"]], Sequence[np.ndarray]]
MEMBERS: dict[str, MemberFn] = {}
BASE_MEMBERS = ("face.jpg", "face_mask.png", "json")


def register_member(name: str, fn: MemberFn) -> MemberFn:
    """Teach the kit to compute shard member `name` for reference faces."""
    MEMBERS[name] = fn
    return fn


def largest_face(faces: Sequence[Any]) -> Any:
    """The largest face (bbox area) with real landmarks: 5 points present and not the detector-only
    fallback of a MediaPipe detection whose face mesh failed (the align stage rejects those too, as
    `no_landmarks`; on noise images they are false positives). None when there is none."""
    good = [f for f in faces if f.lm5 is not None and getattr(f, "landmarks_source", "") != "detector"]
    if not good:
        return None
    return max(good, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))


@dataclass
class ReferenceFace:
    """One reference photo's face, aligned like the align stage aligns shard faces."""

    path: str
    sha256: str
    aligned: np.ndarray  # (S, S, 3) uint8 FFHQ-aligned face
    mask: np.ndarray  # (S, S) uint8, 255 = face
    lm5_aligned: np.ndarray  # (5, 2) landmarks in the aligned crop
    info: dict  # bbox, score, lm5, quad side, mask source
    members: dict = field(default_factory=dict)
    mesh: Optional[np.ndarray] = None  # (478, 2) dense MediaPipe mesh in the photo's pixels (None: detector without one)


def align_reference(rgb: np.ndarray, face: Any, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One detected face -> (aligned face (S, S, 3) uint8, face mask (S, S) uint8, aligned 5 landmarks,
    info), exactly as the align + masks stages make them (FFHQ crop; hull of the mesh, or the quad ellipse)."""
    from pipeline.models import align as geom
    from pipeline.models.masks import hull_mask, quad_ellipse_points

    a = params.align
    lm5 = np.asarray(face.lm5, dtype=np.float64)
    quad = geom.ffhq_quad(lm5)
    aligned, tf = geom.align_face(rgb, quad, a.output_size, a.transform_size)
    pts = np.asarray(face.mesh) if face.mesh is not None else quad_ellipse_points(quad)
    mask = hull_mask(geom.apply_matrix(tf.matrix, pts), a.output_size, params.masks.erode_at_1024, params.masks.blur_at_1024)
    side = geom.quad_side(quad)
    if side < a.min_face_size:
        log.warning("reference face is small (quad side %.0f px < align.min_face_size %d): its codes may be poor",
                    side, a.min_face_size)
    info = {"bbox": np.round(face.bbox, 2).tolist(), "score": round(float(face.score), 4),
            "lm5": np.round(lm5, 3).tolist(), "quad_side": round(side, 2),
            "mask_source": "mesh" if face.mesh is not None else "quad_ellipse"}
    return aligned, mask, geom.apply_matrix(tf.matrix, lm5), info


class ReferenceKit:
    """Reference photos -> shard-like samples (see module doc). `close()` when done."""

    def __init__(self, params: Optional[Params] = None, device: Optional[str] = None):
        self.params = params or Params()
        self.device = device
        self._models: dict[str, Any] = {}
        self._faces: dict[str, ReferenceFace] = {}
        self.content: Optional[str] = None  # the request's content photo (image-to-image), for `Method.prepare`

    def model(self, name: str, factory: Callable[[], Any]) -> Any:
        """A model loaded once per kit (`factory()` on first use)."""
        if name not in self._models:
            self._models[name] = factory()
        return self._models[name]

    @property
    def detector(self) -> Any:
        from pipeline.models import faces

        return self.model("detector", lambda: faces.load(self.params.align))

    def models(self) -> dict[str, dict]:
        """Info of every model used so far (recorded with generated images)."""
        return {k: m.info.as_dict() for k, m in self._models.items() if hasattr(m, "info")}

    def close(self) -> None:
        for m in self._models.values():
            close = getattr(m, "close", None)
            if close:
                close()
        self._models.clear()

    def face(self, path: str | os.PathLike) -> ReferenceFace:
        """The aligned largest face of a photo (cached); a photo without one is an error."""
        from pipeline.images import load_rgb

        key = str(path)
        if key not in self._faces:
            rgb, _ = load_rgb(path)
            face = largest_face(self.detector.detect(rgb))
            if face is None:
                raise ValueError(f"reference {path}: no face with landmarks found")
            aligned, mask, lm5a, info = align_reference(rgb, face, self.params)
            mesh = None if face.mesh is None else np.asarray(face.mesh, dtype=np.float64)
            self._faces[key] = ReferenceFace(key, sha256_file(path), aligned, mask, lm5a, info, mesh=mesh)
        return self._faces[key]

    def samples(self, paths: Sequence[str | os.PathLike], needs: Sequence[str] = ()) -> list[dict]:
        """Shard-like decoded samples of the photos, holding the base members and `needs`."""
        faces = [self.face(p) for p in paths]
        for name in dict.fromkeys(needs):
            if name in BASE_MEMBERS:
                continue
            if name not in MEMBERS:
                raise ValueError(f"reference photos cannot provide shard member '{name}' (known: "
                                 f"{', '.join(sorted(set(BASE_MEMBERS) | set(MEMBERS)))}; register_member)")
            todo = [f for f in faces if name not in f.members]
            if todo:
                for f, arr in zip(todo, MEMBERS[name](self, todo)):
                    f.members[name] = arr
        return [{"__key__": f.sha256[:16] + "-ref", "face.jpg": f.aligned, "face_mask.png": f.mask,
                 "json": {"key": f.sha256[:16] + "-ref", "identity": None, "source": f.path,
                          "landmarks_aligned": np.asarray(f.lm5_aligned).tolist(), **f.info},
                 **{k: f.members[k] for k in needs if k in f.members}} for f in faces]

    def persons(self, path: str | os.PathLike) -> tuple[np.ndarray, list[dict]]:
        """A photo's person instances: (labels (H, W) uint8, 0 = no one, i + 1 = person i; the faces
        [{"bbox", "score"}]), persons ordered left to right by face box like the align stage. The
        faces are the detections with real landmarks; the person probability is the selfie
        segmentation of the photo and of each face's in-the-wild crop; the split is the instances
        stage's (`pipeline.models.instances`, params `instances`)."""
        from pipeline.images import load_rgb
        from pipeline.models import faces as fm
        from pipeline.models.instances import photo_person_prob, split_persons

        rgb, _ = load_rgb(path)
        found = [f for f in self.detector.detect(rgb) if f.lm5 is not None and getattr(f, "landmarks_source", "") != "detector"]
        found.sort(key=lambda f: (round(float(f.bbox[0])), round(float(f.bbox[1]))))
        seg = self.model("selfie", fm.SelfieSegmenter)
        prob = photo_person_prob(rgb, found, seg, self.params.align.wild_scale)
        cfg = self.params.instances
        labels = split_persons(prob, np.array([f.bbox for f in found]).reshape(-1, 4), cfg.threshold, cfg.body_stretch)
        return labels, [{"bbox": np.round(f.bbox, 2).tolist(), "score": round(float(f.score), 4)} for f in found]

    def records(self, paths: Sequence[str | os.PathLike]) -> list[dict]:
        """What a generation record keeps of each reference photo."""
        out = []
        for p in paths:
            f = self.face(p)
            out.append({"path": str(p), "sha256": f.sha256, "face": f.info,
                        **{f"{k}_sha256": sha256_array(np.asarray(v, np.float32)) for k, v in f.members.items()}})
        return out

    def settings(self) -> dict:
        """The params sections that shape the reference samples (recorded)."""
        return {"align": to_dict(self.params.align), "masks": to_dict(self.params.masks), "models": self.models()}


def _arcface(kit: ReferenceKit, faces: Sequence[ReferenceFace]) -> list[np.ndarray]:
    """ArcFace of the aligned faces with the identity stage's crop (5 aligned landmarks)."""
    from pipeline.models import align as geom
    from pipeline.models import identity

    model = kit.model("arcface", lambda: identity.load(kit.params.identity))
    crops = [geom.arcface_align(f.aligned, np.asarray(f.lm5_aligned)) for f in faces]
    return list(model.embed(np.stack(crops)).astype(np.float32))


register_member("id.npy", _arcface)
