"""The one reader of Persona's WebDataset shards (written by `pipeline.shards`): training, evaluation
and streaming consumers all decode members here.

Members (see `pipeline.shards` for the format) are decoded by `decode_member`: images -> uint8
numpy arrays (RGB HxWx3, grayscale HxW), `.npy` -> arrays (`wplus.npy` float16 (18, 512), `id.npy`
float32 (512,), validated), `json` -> dict, `txt` -> str. A reader asks only for the members it needs
(`keys`); the others are never decoded. A training reader may also ask for JPEGs decoded at about
its resolution (`sizes`: DCT-scaled decoding, several times cheaper than a full decode + resize).

Two ways to read:

* `ShardIndex(urls, need)`: random access. One scan of the tar headers (no data read) builds an
  index sample -> member offsets; `get(i, keys)` reads and decodes the asked members of sample i.
  Samples lacking a member of `need` are skipped and counted in `skipped` (reason -> count).
  `by_identity()` groups the samples by their `json` identity (the identity-grouped mode of the
  training samplers; unlabeled samples are listed separately). Deterministic and resumable: the
  training DataModule builds every batch from it as a pure function of (seed, step, rank).
  `MemorySource` holds decoded samples in memory behind the same API (synthetic training data).
* `make_dataset(src, split)`: streaming, open_clip style. A declarative `webdataset.DataPipeline`:
  shard list -> split by node and worker -> tar samples -> sample shuffle -> decode. Errors are
  logged through `logging` and skipped (`warn_and_continue`); tar files are always closed. Shuffling
  is deterministic: the shard order depends on (seed, epoch) only (identical in every worker, so the
  worker split stays exact), the sample buffer on (seed, epoch, rank, worker).

Shards in an object store are read through `pipeline.storage` (random access: a local copy fetched
once per node, by ETag; streaming: the fsspec file).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import webdataset as wds

from .shards import ID_SHAPE, REQUIRED_KEYS, WPLUS_SHAPE, _identity, _read_index
from .storage import local_copy, spath

log = logging.getLogger("persona.shards")

NPY_SHAPES = {"wplus.npy": WPLUS_SHAPE, "id.npy": ID_SHAPE}
# a sample's {member: decoded width / stored width} for the JPEGs `get` decoded reduced (`sizes`);
# absent when every member is at its stored size
SCALE_KEY = "__scale__"
PICTURES = ("jpg", "jpeg", "png")  # member extensions decoded as images (`decode_picture`)


# ============================================================================================
# decoding (the one decode path)


def decode_picture(data: bytes, min_side: Optional[int] = None) -> tuple[np.ndarray, float]:
    """Image bytes -> (uint8 array, RGB HxWx3 or grayscale HxW; its width / the stored width).
    `min_side`: a JPEG may be decoded reduced (libjpeg DCT scaling by 1/2, 1/4 or 1/8, PIL `draft`)
    as long as both sides stay >= min_side: much cheaper, but not the full-size decode's pixels, and
    pixel coordinates recorded in the stored frame (landmarks) scale by the returned factor."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width = im.size[0]
        if min_side and im.format == "JPEG":
            im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", (int(min_side), int(min_side)))
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        arr = np.array(im)
    return arr, arr.shape[1] / width


def decode_member(ext: str, data: bytes, key: str = "?", min_side: Optional[int] = None) -> Any:
    """One member's bytes -> value: image -> uint8 array (RGB HxWx3 or grayscale HxW), npy -> array
    (shape-checked for the known members), json -> dict, txt -> str; anything else stays bytes.
    `min_side`: a JPEG may be decoded reduced (see `decode_picture`)."""
    if ext.endswith(PICTURES):
        return decode_picture(data, min_side)[0]
    if ext.endswith("npy"):
        a = np.load(io.BytesIO(data), allow_pickle=False)
        want = NPY_SHAPES.get(ext)
        if want is not None and a.shape != want:
            raise ValueError(f"sample {key}: {ext} shape {a.shape}, expected {want}")
        return a if a.flags.writeable else a.copy()
    if ext.endswith("json"):
        return json.loads(data)
    if ext.endswith("txt"):
        return data.decode("utf-8")
    return data


def decode_sample(sample: dict, keys: Optional[Sequence[str]] = None) -> dict:
    """Raw sample {__key__, ext: bytes} -> decoded values (only `keys` when given, plus the `__*__`
    entries). Raises on missing required members or bad data."""
    lacking = [k for k in REQUIRED_KEYS if k not in sample]
    if lacking:
        raise ValueError(f"sample {sample.get('__key__')} lacks {lacking}")
    key = str(sample.get("__key__"))
    out: dict = {}
    for k, v in sample.items():
        if k.startswith("__"):
            out[k] = v
        elif keys is None or k in keys:
            out[k] = decode_member(k, v, key)
    return out


def split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """'dir/abc-0.face.jpg' -> ('dir/abc-0', 'face.jpg') (the extension is everything after the first dot)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def sample_identity(sample: dict) -> Optional[str]:
    """The identity of a (raw or decoded) sample from its `json` member (None when unlabeled)."""
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray, str)):
        meta = json.loads(meta)
    return _identity((meta or {}).get("identity"))


def shard_urls(src: str | os.PathLike | Sequence[str | os.PathLike], split: str | None = None) -> list[str]:
    """Shard paths: a list as given; a shards folder -> its `index.json` shards of `split` (or
    `<folder>/<split>/*.tar`, or `<folder>/*.tar`); a string pattern -> brace-expanded."""
    if isinstance(src, (list, tuple)):
        return [str(u) for u in src]
    p = spath(src)
    if p.is_dir():
        idx = _read_index(p)
        if idx is not None:
            return [str(p / s["file"]) for s in idx["shards"] if split is None or s["split"] == split]
        d = p / split if split and (p / split).is_dir() else p
        return sorted(str(x) for x in d.glob("*.tar"))
    return list(wds.shardlists.expand_urls(str(src)))


# ============================================================================================
# random access


@dataclass
class _Entry:
    url: int  # index into ShardIndex.urls
    key: str
    members: dict[str, tuple[int, int]]  # ext -> (data offset in the tar, size)


class ShardIndex:
    """Random access to the samples of WebDataset tars (one header scan, no data read); see module doc."""

    def __init__(self, urls: Sequence[str], need: Sequence[str] = ()):
        # shards in an object store are read from a local copy (fetched once per node, by ETag)
        self.source_urls = [str(u) for u in urls]
        self.urls = [str(local_copy(u)) for u in self.source_urls]
        self.need = tuple(need)
        self.entries: list[_Entry] = []
        self.skipped: dict[str, int] = {}
        self._identities: Optional[list[Optional[str]]] = None
        for ui, url in enumerate(self.urls):
            self._scan(ui, url)

    def _scan(self, ui: int, url: str) -> None:
        cur: Optional[_Entry] = None
        with tarfile.open(url, mode="r:") as tf:
            for ti in tf:
                if not ti.isreg():
                    continue
                key, ext = split_member(ti.name)
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
        out._identities = None
        return out

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        return self.entries[i].key

    def get(self, i: int, keys: Sequence[str], sizes: Optional[dict[str, int]] = None) -> dict:
        """{"__key__": key, ext: decoded value} for the members of sample i named in `keys` (absent
        ones omitted); `sizes`: member -> min_side for a reduced JPEG decode (`decode_picture`), whose
        scale is recorded under `SCALE_KEY` (`{member: factor}`) when it is not 1."""
        e = self.entries[i]
        want = [k for k in dict.fromkeys(keys) if k in e.members]
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
            data, side = buf[off - lo: off - lo + size], (sizes or {}).get(k)
            if k.endswith(PICTURES):  # only a JPEG asked for a reduced decode gets a scale other than 1
                out[k], scale = decode_picture(data, side)
                if scale != 1.0:
                    out.setdefault(SCALE_KEY, {})[k] = scale
            else:
                out[k] = decode_member(k, data, e.key, side)
        return out

    def identity(self, i: int) -> Optional[str]:
        """The identity of sample i (its `json` member; read once for all samples, then cached)."""
        if self._identities is None:
            self._identities = [sample_identity(self.get(j, ("json",))) for j in range(len(self))]
        return self._identities[i]

    def by_identity(self) -> tuple[dict[str, list[int]], list[int]]:
        """({identity: [sample indices]} sorted by name, [unlabeled sample indices])."""
        return group_by_identity(self)


class MemorySource:
    """Decoded samples held in memory (synthetic training data); the `ShardIndex` API."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, i: int) -> str:
        return self.samples[i]["__key__"]

    def get(self, i: int, keys: Sequence[str], sizes: Optional[dict[str, int]] = None) -> dict:
        s = self.samples[i]
        return {"__key__": s["__key__"], **{k: s[k] for k in keys if k in s}}

    def identity(self, i: int) -> Optional[str]:
        return sample_identity(self.samples[i])

    def by_identity(self) -> tuple[dict[str, list[int]], list[int]]:
        return group_by_identity(self)


def group_by_identity(source) -> tuple[dict[str, list[int]], list[int]]:
    """Sample indices of a random-access source grouped by identity (sorted names; indices ascending)."""
    groups: dict[str, list[int]] = {}
    unlabeled: list[int] = []
    for i in range(len(source)):
        ident = source.identity(i)
        (unlabeled if ident is None else groups.setdefault(ident, [])).append(i)
    return {k: groups[k] for k in sorted(groups)}, unlabeled


def models_weights_real(source, limit: int = 64) -> dict[str, bool]:
    """{"shards.<stage>": weights_real} from the `json.models` of the first `limit` samples of a
    random-access source (a model counts as real only if every sample says so)."""
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
# streaming


def warn_and_continue(exn: BaseException) -> bool:
    """webdataset handler: log the error through `logging` and go on with the next sample/shard."""
    log.warning("shards reader: skipping after %s: %s", type(exn).__name__, exn)
    return True


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:16], 16)


class SharedEpoch:
    """Epoch counter shared with DataLoader workers (shared memory, so persistent workers see it)."""

    def __init__(self, epoch: int = 0):
        self._v = mp.Value("i", int(epoch), lock=False)

    def set(self, epoch: int) -> None:
        self._v.value = int(epoch)

    def get(self) -> int:
        return int(self._v.value)


class _ShardList:
    """First stage: dict(url=...) per shard, permuted by (seed, epoch) when `shuffle` (same in every worker)."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int, epoch: SharedEpoch):
        self.urls, self.shuffle, self.seed, self.epoch = list(urls), shuffle, seed, epoch

    def __call__(self) -> Iterator[dict]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(_seed("shards", self.seed, self.epoch.get())).shuffle(urls)
        for u in urls:
            yield {"url": u}


class _ResampledShards:
    """First stage: shards drawn with replacement forever; rng from (seed, epoch, rank, worker)."""

    def __init__(self, urls: list[str], seed: int, epoch: SharedEpoch):
        self.urls, self.seed, self.epoch = list(urls), seed, epoch

    def __call__(self) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(_seed("resample", self.seed, self.epoch.get(), rank, worker))
        while True:
            yield {"url": rng.choice(self.urls)}


def _open(url: str):
    if url.startswith("pipe:") or url.startswith(("http://", "https://")):
        return wds.gopen(url, "rb")
    return spath(url).open("rb")  # local, file://, or an fsspec URL (s3://...)


def tar_samples(src: Iterable[dict], handler: Callable[[BaseException], bool] = warn_and_continue,
                keys: Optional[Sequence[str]] = None) -> Iterator[dict]:
    """Shard dicts (url) -> samples {__key__, __url__, <ext>: bytes} (only the `keys` members, plus
    the required ones, when given). Each tar is closed when done (also when the consumer stops
    early); a read error drops the sample being assembled."""
    keep = None if keys is None else set(keys) | set(REQUIRED_KEYS)
    for shard in src:
        url = shard["url"]
        cur: dict | None = None
        skip: str | None = None  # key of a sample dropped for a duplicate member
        try:
            with _open(url) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
                for ti in tf:
                    if not ti.isreg():
                        continue
                    key, ext = split_member(ti.name)
                    if key is None or (key.startswith("__") and key.endswith("__")) or key == skip:
                        continue
                    if cur is not None and cur["__key__"] != key:
                        yield cur
                        cur = None
                    if cur is None:
                        cur = {"__key__": key, "__url__": url}
                    if ext in cur:
                        cur, skip = None, key
                        if not handler(ValueError(f"duplicate member {ti.name} in {url}: sample {key} dropped")):
                            return
                        continue
                    tf.members = []
                    if keep is not None and ext not in keep:
                        continue
                    cur[ext] = tf.extractfile(ti).read()
            if cur is not None:
                yield cur
        except Exception as exn:
            dropped = f" (partial sample {cur['__key__']} dropped)" if cur else ""
            exn.args = (f"{exn} @ {url}{dropped}",)
            if not handler(exn):
                break


def map_samples(src: Iterable[dict], fn: Callable[[dict], dict], handler: Callable = warn_and_continue) -> Iterator[dict]:
    for s in src:
        try:
            r = fn(s)
        except Exception as exn:
            exn.args = (f"{exn} (sample {s.get('__key__')} from {s.get('__url__')})",)
            if handler(exn):
                continue
            break
        yield r


class _Shuffle:
    """Buffer shuffle; rng from (seed, epoch, rank, worker) so each worker differs and reruns repeat."""

    def __init__(self, bufsize: int, seed: int, epoch: SharedEpoch):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(_seed("samples", self.seed, self.epoch.get(), rank, worker))
        buf: list = []
        for s in src:
            buf.append(s)
            if len(buf) >= self.bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class ShardDataset(wds.DataPipeline):
    """The streaming reader pipeline; `set_epoch(e)` re-seeds shard and sample shuffling for epoch e."""

    epoch: SharedEpoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)


def make_dataset(
    src: str | os.PathLike | Sequence[str | os.PathLike],
    split: str | None = "train",
    *,
    decode: bool = True,
    keys: Optional[Sequence[str]] = None,
    shuffle: int = 0,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    shardshuffle: bool | None = None,
    handler: Callable[[BaseException], bool] = warn_and_continue,
) -> ShardDataset:
    """Stream shard samples (an IterableDataset for torch DataLoader).

    src: shards folder (uses index.json / `<split>/`), list of tar paths, or a brace pattern.
    keys: read only these members (plus the required ones); decode: bytes -> values (`decode_sample`).
    shuffle: sample buffer size (0 = file order). shardshuffle: permute shards per epoch
    (default: shuffle > 0). resampled: draw shards with replacement forever (use islice or
    `.with_epoch(n)`; each worker its own stream; shardshuffle ignored). Without resampling, shards
    are split across nodes and DataLoader workers, so each sample comes once per epoch.
    """
    urls = shard_urls(src, split)
    if not urls:
        raise ValueError(f"no shards found in {src!r} for split {split!r}")
    ep = SharedEpoch(epoch)
    stages: list = []
    if resampled:
        stages.append(_ResampledShards(urls, seed, ep))
    else:
        stages += [_ShardList(urls, bool(shuffle > 0 if shardshuffle is None else shardshuffle), seed, ep),
                   wds.split_by_node, wds.split_by_worker]
    stages.append(functools.partial(tar_samples, handler=handler, keys=keys))
    if shuffle > 0:
        stages.append(_Shuffle(shuffle, seed, ep))
    if decode:
        stages.append(functools.partial(map_samples, fn=decode_sample, handler=handler))
    ds = ShardDataset(*stages)
    ds.epoch = ep
    return ds
