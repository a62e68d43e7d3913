"""Training data for the W+ Adapter: shard samples -> per-step batches (LightningDataModule).

Stage I:  aligned face (`face.jpg`) resized to the training resolution + a neutral prompt drawn
          from `NEUTRAL_PROMPTS` + the W+ code.
Stage II: in-the-wild crop (`jpg`) + caption (`txt`, a neutral prompt when empty) + face mask
          (`mask.png`, 255 = face) -> M = 1 - mask / 255 (1 = NON-face), with colour jitter,
          rotation and a square crop that contains the whole face (chosen from the mask's bounding
          box), resized to the training resolution.
Images are (B, 3, R, R) float32 in [-1, 1]; M is (B, 1, R, R) float32 in [0, 1]; W+ codes are
(B, 18, 512) float32. VAE latents are computed on the fly by the LightningModule.

Determinism (exact resume). Batch `b` (micro-batch index; b = global_step * accumulate at the
start of a run) is a pure function of (seed, b, rank, world): sample i of it has the global
position g = (b * world + rank) * B + i (its position in the one-process batch of world * B),
data epoch e = g // N, sample = permutation(seed, e)[g % N], and every random choice of that
sample (prompt, crop, jitter) comes from rng(seed, g). So each sample (and its augmentation) is
the same whether the global batch is read by one process or split over `world` ranks. The batch
carries `pos` (B,) = g, from which the LightningModule seeds its per-sample draws. With W
DataLoader workers, worker w yields batches b = start + w, start + w + W, ... and the DataLoader
returns them in order, so the stream is the same for any worker count. Shards are read by random
access: one scan of the tar headers builds an index (sample -> member offsets).

Distributed (world W > 1) with at least W train shards: rank r reads samples only from shards
r, r + W, ... (disjoint files per worker; the header index of every shard is still built once per
process, for the data signature and the validation samples). Its local
position l = b * B + i walks a permutation of its own samples (seed, epoch, r, W); the global
position g, and with it every random draw, is as above. With fewer shards than workers every rank
indexes all shards and the ranks read disjoint samples (the same global batch as one process).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import shard_urls, synthetic_samples
from pipeline.storage import local_copy, spath
from training.config import ImageAugConfig, StageConfig, TrainConfig

log = logging.getLogger("persona.training.data")

# W+ Adapter supplement, section V: the Stage I prompts.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "a face",
    "a photo of a face",
    "a close-up of a face",
    "a depiction of a face",
    "a good photo of a face",
    "a photography of a face",
    "a cropped photo of a face",
    "a good photography of a face",
    "a close-up photography of a face",
)
GRID_PROMPT_STAGE1 = "a photo of a face"

# Members each stage reads (val examples also read the aligned face for the grid's reference row).
STAGE_KEYS: dict[int, tuple[str, ...]] = {1: ("face.jpg", "wplus.npy"), 2: ("jpg", "mask.png", "txt", "wplus.npy")}
VAL_EXTRA_KEYS = ("face.jpg", "txt")


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from arbitrary parts (sha256; stable across processes and platforms)."""
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:15], 16)


# ============================================================================================
# sample sources


def _decode(ext: str, data: bytes) -> Any:
    if ext.endswith(("jpg", "jpeg", "png")):
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            return np.array(im)
    if ext.endswith("npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext.endswith("json"):
        return json.loads(data)
    if ext.endswith("txt"):
        return data.decode("utf-8")
    return data


def _split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """'dir/abc-0.face.jpg' -> ('dir/abc-0', 'face.jpg') (the extension starts at the first dot)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, None
    return (f"{head}/{stem}" if head else stem), ext.lower()


@dataclass
class _Entry:
    url: int  # index into ShardIndex.urls
    key: str
    members: dict[str, tuple[int, int]]  # ext -> (data offset in the tar, size)


class ShardIndex:
    """Random access to the samples of local WebDataset tars (one header scan, no data read).

    Samples lacking a member of `need` are skipped and counted in `skipped` (reason -> count).
    `get(i, keys)` returns {"__key__": key, ext: decoded value} for the members in `keys`.
    """

    def __init__(self, urls: Sequence[str], need: Sequence[str]):
        # shards in an object store are read from a local copy (fetched once per node, by ETag)
        self.source_urls = [str(u) for u in urls]
        self.urls = [str(local_copy(u)) for u in self.source_urls]
        self.need = tuple(need)
        self.entries: list[_Entry] = []
        self.skipped: dict[str, int] = {}
        for ui, url in enumerate(self.urls):
            self._scan(ui, url)

    def _scan(self, ui: int, url: str) -> None:
        cur: Optional[_Entry] = None
        with tarfile.open(url, mode="r:") as tf:
            for ti in tf:
                if not ti.isreg():
                    continue
                key, ext = _split_member(ti.name)
                if key is None:
                    continue
                if cur is None or cur.key != key:
                    self._add(cur)
                    cur = _Entry(ui, key, {})
                cur.members[ext] = (ti.offset_data, ti.size)
        self._add(cur)

    def _add(self, e: Optional[_Entry]) -> None:
        if e is None:
            return
        lacking = [k for k in self.need if k not in e.members]
        if lacking:
            reason = "lacks " + ",".join(lacking)
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            return
        self.entries.append(e)

    def subset(self, urls: Sequence[str]) -> "ShardIndex":
        """The samples of the given shards (a sublist of `source_urls`), from this index (no rescan)."""
        wanted = set(urls)
        keep = {i for i, u in enumerate(self.source_urls) if u in wanted}
        out = object.__new__(ShardIndex)
        out.source_urls, out.urls, out.need, out.skipped = self.source_urls, self.urls, self.need, {}
        out.entries = [e for e in self.entries if e.url in keep]
        return out

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        return self.entries[i].key

    def get(self, i: int, keys: Sequence[str]) -> dict:
        e = self.entries[i]
        want = [k for k in keys if k in e.members]
        out: dict[str, Any] = {"__key__": e.key}
        if not want:
            return out
        lo = min(e.members[k][0] for k in want)
        hi = max(e.members[k][0] + e.members[k][1] for k in want)
        with open(self.urls[e.url], "rb") as f:
            f.seek(lo)
            buf = f.read(hi - lo)
        for k in want:
            off, size = e.members[k]
            out[k] = _decode(k, buf[off - lo : off - lo + size])
        return out


class MemorySource:
    """Decoded samples held in memory (synthetic mode); same `get(i, keys)` API as ShardIndex."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, i: int) -> str:
        return self.samples[i]["__key__"]

    def get(self, i: int, keys: Sequence[str]) -> dict:
        s = self.samples[i]
        return {"__key__": s["__key__"], **{k: s[k] for k in keys if k in s}}


def models_weights_real(source, limit: int = 64) -> dict[str, bool]:
    """{"shards.<stage>": weights_real} from the `json.models` of the first `limit` samples
    (a model counts as real only if every sample says so; unknown counts as not real)."""
    out: dict[str, bool] = {}
    for i in range(min(limit, len(source))):
        meta = source.get(i, ("json",)).get("json") or {}
        for stage, m in (meta.get("models") or {}).items():
            if not m:
                continue
            k = f"shards.{stage}"
            out[k] = out.get(k, True) and bool(m.get("weights_real"))
    return out


# ============================================================================================
# image transforms (pure functions of the sample and an rng)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, H, W) float32 in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def _rgb(a: np.ndarray) -> Image.Image:
    im = Image.fromarray(a)
    return im if im.mode == "RGB" else im.convert("RGB")


def face_box(mask: np.ndarray, threshold: int = 128) -> Optional[tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1), end-exclusive, of mask >= threshold; None when empty."""
    ys, xs = np.nonzero(mask >= threshold)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def choose_crop(
    width: int, height: int, box: Optional[tuple[int, int, int, int]], u: Sequence[float],
    min_scale: float = 0.6, min_face_fraction: float = 0.15,
) -> tuple[int, int, int]:
    """Square crop (x0, y0, side) inside a width x height image that contains `box` entirely.

    u: three uniforms in [0, 1) (side, x, y). The side is drawn from
    [max(face side, min_scale * S), min(S, face side / min_face_fraction)] (S = min(width, height)),
    so the face is never cut and never smaller than `min_face_fraction` of the crop (unless the
    image itself is that small). Without a face box: a crop of side in [min_scale * S, S].
    """
    S = min(width, height)
    if box is None:
        side = int(round(min_scale * S + u[0] * (S - min_scale * S)))
        side = max(1, min(S, side))
        return int(u[1] * (width - side + 1)), int(u[2] * (height - side + 1)), side
    x0, y0, x1, y1 = box
    f = max(x1 - x0, y1 - y0)
    if f >= S:  # the face does not fit in any square crop: the largest one, centred on it
        side = S
    else:
        lo = max(f, math.ceil(min_scale * S))
        hi = S if min_face_fraction <= 0 else max(f, min(S, int(f / min_face_fraction)))
        lo = min(lo, hi)  # small face: tighter than min_scale so it keeps min_face_fraction
        side = min(hi, lo + int(u[0] * (hi - lo + 1)))
    # offsets keeping the box inside: x <= x0 and x + side >= x1, within the image
    xa, xb = max(0, x1 - side), min(x0, width - side)
    ya, yb = max(0, y1 - side), min(y0, height - side)
    if xb < xa:
        xa = xb = max(0, min(width - side, (x0 + x1 - side) // 2))
    if yb < ya:
        ya = yb = max(0, min(height - side, (y0 + y1 - side) // 2))
    return xa + int(u[1] * (xb - xa + 1)), ya + int(u[2] * (yb - ya + 1)), side


def _jitter(im: Image.Image, aug: ImageAugConfig, u: Sequence[float]) -> Image.Image:
    """Brightness, contrast, saturation factors 1 + a * (2u - 1); hue shift h * (2u - 1) turns."""
    if aug.brightness:
        im = ImageEnhance.Brightness(im).enhance(1 + aug.brightness * (2 * u[0] - 1))
    if aug.contrast:
        im = ImageEnhance.Contrast(im).enhance(1 + aug.contrast * (2 * u[1] - 1))
    if aug.saturation:
        im = ImageEnhance.Color(im).enhance(1 + aug.saturation * (2 * u[2] - 1))
    if aug.hue:
        shift = int(round(aug.hue * (2 * u[3] - 1) * 256)) % 256
        if shift:
            h, s, v = im.convert("HSV").split()
            h = h.point(lambda x: (x + shift) % 256)
            im = Image.merge("HSV", (h, s, v)).convert("RGB")
    return im


def stage1_example(sample: dict, res: int) -> dict:
    """Aligned face -> {"image": (3, res, res), "wplus": (18, 512)} (no augmentation: W+ describes it)."""
    face = _rgb(sample["face.jpg"])
    if face.size != (res, res):
        face = face.resize((res, res), Image.Resampling.BICUBIC)
    return {"image": to_tensor(face), "wplus": torch.from_numpy(np.asarray(sample["wplus.npy"], dtype=np.float32))}


def stage2_example(sample: dict, res: int, aug: Optional[ImageAugConfig], u: Sequence[float]) -> dict:
    """In-the-wild crop + mask -> {"image": (3, res, res), "mask": (1, res, res) M (1 = non-face),
    "wplus": (18, 512)}. `u`: 8 uniforms (rotation, crop side/x/y, jitter x4); aug None = full
    image, no jitter (validation)."""
    img = _rgb(sample["jpg"])
    mask = Image.fromarray(np.asarray(sample["mask.png"], dtype=np.uint8))
    if mask.mode != "L":
        mask = mask.convert("L")
    if mask.size != img.size:
        mask = mask.resize(img.size, Image.Resampling.BILINEAR)
    W, H = img.size
    if aug is not None and aug.rotation:
        angle = aug.rotation * (2 * u[0] - 1)
        m0 = np.asarray(mask, dtype=np.float32).sum()
        rmask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
        if m0 == 0 or np.asarray(rmask, dtype=np.float32).sum() >= 0.97 * m0:  # the face stays inside
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
            mask = rmask
    if aug is not None:
        box = face_box(np.asarray(mask))
        x, y, s = choose_crop(W, H, box, u[1:4], aug.min_crop_scale, aug.min_face_fraction)
    else:
        s = min(W, H)
        x, y = (W - s) // 2, (H - s) // 2
    img, mask = img.crop((x, y, x + s, y + s)), mask.crop((x, y, x + s, y + s))
    if s != res:
        img = img.resize((res, res), Image.Resampling.BICUBIC)
        mask = mask.resize((res, res), Image.Resampling.BILINEAR)
    if aug is not None:
        img = _jitter(img, aug, u[4:8])
    m = 1.0 - torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return {"image": to_tensor(img), "mask": m.clamp_(0, 1),
            "wplus": torch.from_numpy(np.asarray(sample["wplus.npy"], dtype=np.float32))}


def pick_prompt(stage: int, caption: Optional[str], u: float) -> str:
    """Stage I: a neutral prompt; Stage II: the caption, or a neutral prompt when it is empty."""
    if stage == 2 and caption and caption.strip():
        return caption.strip()
    return NEUTRAL_PROMPTS[min(int(u * len(NEUTRAL_PROMPTS)), len(NEUTRAL_PROMPTS) - 1)]


# ============================================================================================
# batches


class StepBatches(IterableDataset):
    """Infinite stream of whole batches, batch b = f(seed, b, rank, world) (see module doc); starts at `start`.

    A batch: {"image", "wplus", ("mask"), "prompt": [str], "key": [str], "step": b,
    "pos": (B,) int64 global positions g}.
    """

    def __init__(self, source, stage: int, resolution: int, batch_size: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1, aug: Optional[ImageAugConfig] = None, rank_source: bool = False):
        if len(source) == 0:
            raise ValueError("no training samples")
        self.source, self.stage, self.res, self.B = source, stage, resolution, batch_size
        self.seed, self.start, self.rank, self.world, self.aug = seed, start, rank, world, aug
        self.rank_source = rank_source  # source = this rank's own shards (not the whole dataset)
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    def position(self, b: int, i: int) -> int:
        """Global position g of sample i of batch b: its index in the one-process batch of world * B."""
        return (b * self.world + self.rank) * self.B + i

    def index(self, b: int, i: int) -> int:
        """Source index of sample i of batch b: a per-epoch permutation of the whole source walked
        by global position (ranks read disjoint samples), or, with `rank_source`, of this rank's own
        shards walked by the rank's local position b * B + i."""
        n = len(self.source)
        if self.rank_source:
            epoch, pos = divmod(b * self.B + i, n)
            seed = seed_of("perm", self.seed, epoch, "rank", self.rank, self.world)
        else:
            epoch, pos = divmod(self.position(b, i), n)
            seed = seed_of("perm", self.seed, epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(seed).permutation(n))
        return int(self._perm[1][pos])

    def batch(self, b: int) -> dict:
        items, prompts, keys, positions = [], [], [], []
        for i in range(self.B):
            g = self.position(b, i)
            u = np.random.default_rng(seed_of("sample", self.seed, g)).random(9)
            s = self.source.get(self.index(b, i), STAGE_KEYS[self.stage])
            ex = stage1_example(s, self.res) if self.stage == 1 else stage2_example(s, self.res, self.aug, u[1:])
            items.append(ex)
            prompts.append(pick_prompt(self.stage, s.get("txt"), u[0]))
            keys.append(s["__key__"])
            positions.append(g)
        out = {k: torch.stack([e[k] for e in items]) for k in items[0]}
        out.update(prompt=prompts, key=keys, step=b, pos=torch.tensor(positions, dtype=torch.long))
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + wid
        while True:
            yield self.batch(b)
            b += nw


def val_examples(source, stage: int, resolution: int, k: int) -> dict:
    """The first k samples, unaugmented: {"face": (k, 3, R, R) aligned faces, "wplus", "prompt", "key"}."""
    k = min(k, len(source))
    faces, ws, prompts, keys = [], [], [], []
    for i in range(k):
        s = source.get(i, tuple(dict.fromkeys(STAGE_KEYS[stage] + VAL_EXTRA_KEYS)))
        faces.append(stage1_example({"face.jpg": s["face.jpg"], "wplus.npy": s["wplus.npy"]}, resolution)["image"]
                     if "face.jpg" in s else torch.zeros(3, resolution, resolution))
        ws.append(torch.from_numpy(np.asarray(s["wplus.npy"], dtype=np.float32)))
        prompts.append(GRID_PROMPT_STAGE1 if stage == 1 else pick_prompt(2, s.get("txt"), 0.1))
        keys.append(s["__key__"])
    return {"face": torch.stack(faces), "wplus": torch.stack(ws), "prompt": prompts, "key": keys}


# ============================================================================================
# DataModule


class WPlusDataModule(L.LightningDataModule):
    """Shards (or synthetic samples) -> deterministic per-step batches for Stage I or II."""

    def __init__(self, stage: int, train: TrainConfig, stage_cfg: StageConfig):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.stage_n, self.cfg, self.scfg = stage, train, stage_cfg
        self.train_source = None
        self.val_source = None
        self.signature = ""
        self._pin = False

    # ------------------------------------------------------------------ sources
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_source is not None:
            return
        need = STAGE_KEYS[self.stage_n]
        if self.cfg.synthetic > 0:
            size = max(64, self.cfg.resolution)
            self.train_source = MemorySource(synthetic_samples(self.cfg.synthetic, seed=self.cfg.seed, size=size))
            self.val_source = MemorySource(synthetic_samples(max(1, self.cfg.sampling.num_faces), seed=self.cfg.seed + 1,
                                                             size=size))
            self.signature = f"synthetic:{self.cfg.synthetic}:{self.cfg.seed}:{size}"
            return
        root = spath(self.cfg.shards)
        train_urls = shard_urls(root, "train")
        if not train_urls:
            raise FileNotFoundError(f"no train shards under {root} (run the shards stage, or set train.synthetic)")
        self.train_source = ShardIndex(train_urls, need)
        if self.train_source.skipped:
            log.warning("train shards: skipped samples %s", self.train_source.skipped)
        if len(self.train_source) == 0:
            raise ValueError(f"no usable train samples in {root} (skipped: {self.train_source.skipped})")
        val_urls = shard_urls(root, "val")
        val = ShardIndex(val_urls, need + ("face.jpg",)) if val_urls else None
        self.val_source = val if val is not None and len(val) else self.train_source
        idx = root / "index.json"
        sig = json.loads(idx.read_text()).get("signature") if idx.is_file() else None
        files = [(str(u)[len(str(root)):].lstrip("/"), os.path.getsize(c))
                 for u, c in zip(self.train_source.source_urls, self.train_source.urls)]
        self.signature = f"shards:{sig}:{hashlib.sha256(repr(files).encode()).hexdigest()[:16]}"

    def describe(self) -> dict:
        self.setup()
        return {"source": "synthetic" if self.cfg.synthetic > 0 else str(self.cfg.shards),
                "train_samples": len(self.train_source), "val_samples": len(self.val_source),
                "skipped": dict(self.train_source.skipped), "signature": self.signature}

    def weights_real(self) -> dict[str, bool]:
        self.setup()
        return models_weights_real(self.train_source)

    # ------------------------------------------------------------------ loaders
    def rank_source(self, rank: int, world: int):
        """(source, own) for rank r of W: with W > 1 and at least W train shards, a ShardIndex of the
        shards r, r + W, r + 2W, ... (disjoint per rank; own=True); otherwise the whole source, from
        which the ranks read disjoint samples (own=False; a warning when shards are too few)."""
        self.setup()
        urls = getattr(self.train_source, "source_urls", None)  # None: synthetic samples
        if world <= 1 or not urls:
            return self.train_source, False
        if len(urls) < world:
            log.warning("train shards: %d shard(s) for %d workers: every worker indexes all shards and reads "
                        "disjoint samples (write >= %d shards, shards.samples_per_shard, to split them)",
                        len(urls), world, world)
            return self.train_source, False
        key = (rank, world)
        if getattr(self, "_rank_sources", {}).get(key) is None:
            own = self.train_source.subset(urls[rank::world])
            if len(own) == 0:
                raise ValueError(f"rank {rank}/{world}: no usable samples in shards {urls[rank::world]}")
            self._rank_sources = {key: own}
        return self._rank_sources[key], True

    def dataset(self, start: int = 0, rank: int = 0, world: int = 1) -> StepBatches:
        source, own = self.rank_source(rank, world)
        aug = getattr(self.scfg, "image_aug", None) if self.stage_n == 2 else None
        return StepBatches(source, self.stage_n, self.cfg.resolution, self.scfg.batch_size, self.cfg.seed,
                           start=start, rank=rank, world=world, aug=aug, rank_source=own)

    def train_dataloader(self) -> DataLoader:
        start, rank, world = 0, 0, 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # called after a checkpoint is restored: continue with the batch after the last step
            start = int(trainer.global_step) * self.scfg.accumulate
            rank, world = int(trainer.global_rank), int(trainer.world_size)
            self._pin = trainer.strategy.root_device.type == "cuda"
        ds = self.dataset(start, rank, world)
        nw = self.cfg.num_workers
        return DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=self._pin,
                          prefetch_factor=2 if nw > 0 else None, persistent_workers=False)

    def val_examples(self, k: Optional[int] = None) -> dict:
        self.setup()
        return val_examples(self.val_source, self.stage_n, self.cfg.resolution, k or self.cfg.sampling.num_faces)
