"""Training data for any method: shard samples -> per-step batches (LightningDataModule).

A phase says which shard members it reads (`Phase.members` + the method's `needs`; only those are
decoded, by `pipeline.shard_reader`; with `train.jpeg_draft` JPEGs at about the training resolution,
`Phase.decode_sizes`), how a sample becomes an example (`Phase.example`; the
conditioner inputs come from `Method.inputs([sample])`), how examples become a batch
(`Phase.collate`) and which samples make a batch (`Phase.sampler`: `PlainSampler` or
`IdentityGroupedSampler`). The phase reads the shard splits it names (`Phase.splits`, default the
train split) and is bound to that source once per process (`Phase.bind`) before any batch.

Determinism (exact resume). Batch `b` (micro-batch index; b = global_step * accumulate at the
start of a run) is a pure function of (seed, b, rank, world): sample i of it has the global
position g = (b * world + rank) * B + i (its position in the one-process batch of world * B), the
sampler picks its source index from (seed, b, rank, world) and every random choice of the example
(prompt, crop, jitter) comes from rng(seed, g). So each sample (and its augmentation) is the same
whether the global batch is read by one process or split over `world` ranks. The batch carries
`pos` (B,) = g, from which the LightningModule seeds its per-sample draws (`training.step`), and
`group` (B,) = the sampler's group label (-1: none). With W DataLoader workers, worker w yields
batches b = start + w, start + w + W, ... and the DataLoader returns them in order, so the stream is
the same for any worker count.

Distributed (world W > 1) with at least W train shards: rank r reads samples only from shards
r, r + W, ... (disjoint files per worker; the header index of every shard is still built once per
process, for the data signature and the validation samples). Its local position l = b * B + i walks
a permutation of its own samples (seed, epoch, r, W); the global position g, and with it every
random draw, is as above. With fewer shards than workers every rank indexes all shards and the
ranks read disjoint samples (the same global batch as one process). A sampler that needs every
sample in every rank (`whole_source`, e.g. `IdentityGroupedSampler`: an identity's faces are spread
over the shards) gets the whole source; its ranks draw disjoint groups by global group index.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterator, Optional, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shard_reader import MemorySource, ShardIndex, models_weights_real, shard_urls
from pipeline.shards import synthetic_samples
from pipeline.storage import spath
from training.config import TrainConfig
from training.methods.base import Method, Phase, PhaseConfig
from training.step import seed_of
from training.transforms import aligned_face

log = logging.getLogger("persona.training.data")

VAL_EXTRA_KEYS = ("face.jpg", "txt")  # validation samples also read the aligned face (grid reference row)


# ============================================================================================
# samplers: which source samples make batch b


class Sampler(Protocol):
    """Optional: `whole_source = True` (every rank indexes the whole dataset instead of its own shards)
    and `describe(source) -> dict` (what the batches are drawn from: in the run's data record and,
    its scalars, in the run's metrics as `sampler_<key>`)."""

    def slots(self, source: Any, b: int, rank: int, world: int, batch_size: int, seed: int,
              rank_source: bool) -> list[tuple[int, int]]:
        """[(source index, group label)] for the batch_size slots of batch b (label -1: no group)."""
        ...


class _Permutation:
    """A per-epoch permutation of n items, cached for the current epoch."""

    def __init__(self) -> None:
        self._cur: tuple[Any, Optional[np.ndarray]] = (None, None)

    def __call__(self, n: int, key: tuple, pos: int) -> int:
        if self._cur[0] != key:
            self._cur = (key, np.random.default_rng(seed_of(*key)).permutation(n))
        return int(self._cur[1][pos])


class PlainSampler:
    """Every sample once per data epoch, in a per-epoch permutation walked by global position (ranks
    read disjoint samples), or, with `rank_source`, of this rank's own shards walked by the rank's
    local position b * B + i."""

    def __init__(self) -> None:
        self._perm = _Permutation()

    def slots(self, source, b, rank, world, batch_size, seed, rank_source):
        n = len(source)
        out = []
        for i in range(batch_size):
            if rank_source:
                epoch, pos = divmod(b * batch_size + i, n)
                key = ("perm", seed, epoch, "rank", rank, world)
            else:
                epoch, pos = divmod((b * world + rank) * batch_size + i, n)
                key = ("perm", seed, epoch)
            out.append((self._perm(n, key, pos), -1))
        return out


SHORT_LISTED = 100  # short identities named in a sampler report (all are counted)


class IdentityGroupedSampler:
    """Batches of `identities` groups of `per_identity` faces of ONE identity each, then `singles`
    single faces (label -1). batch_size must be identities * per_identity + singles.

    Group G = (b * world + rank) * identities + k (its global index; unique over steps and ranks):
    the identity is a per-epoch permutation of the labeled identities walked by G, its faces drawn
    (without replacement when it has enough, else with: such short identities are counted by
    `describe`, never dropped) by rng(seed, G); the group label is G. An identity epoch holds a whole
    number of global batches (world * identities groups; the remaining n mod that many identities sit
    the epoch out, a different few each epoch), so the groups of one global step, over all ranks,
    are distinct identities whenever there are at least world * identities of them.
    Singles walk a per-epoch permutation of the unlabeled faces by global position; with fewer than
    `min_unlabeled` unlabeled faces (default 1: none) the pool is every face (labeled ones too).
    Every rank indexes the whole source (`whole_source`), so an identity's faces are never split over
    ranks. With `rank_source` (a caller-given per-rank source) the walks use the rank's local
    counters over its own samples.
    """

    whole_source = True  # PersonaDataModule: every rank indexes all shards (identities are not split by shard)

    def __init__(self, identities: int, per_identity: int, singles: int = 0, min_unlabeled: int = 1):
        if identities < 1 or per_identity < 1 or singles < 0 or min_unlabeled < 0:
            raise ValueError("IdentityGroupedSampler: identities, per_identity >= 1, singles, min_unlabeled >= 0")
        self.k, self.m, self.s = int(identities), int(per_identity), int(singles)
        self.min_unlabeled = int(min_unlabeled)
        self._groups: Optional[tuple] = None
        self._perm_ids, self._perm_single = _Permutation(), _Permutation()

    def _index(self, source):
        """(identity names, {identity: [indices]}, singles pool, pool kind, source), cached per source."""
        if self._groups is None or self._groups[4] is not source:
            groups, unlabeled = source.by_identity()
            if not groups:
                raise ValueError("identity-grouped batches need labeled faces; the source has none")
            if len(unlabeled) >= max(1, self.min_unlabeled):
                pool, kind = list(unlabeled), "unlabeled"
            else:
                pool, kind = list(range(len(source))), "all"
            self._groups = (list(groups), groups, pool, kind, source)
        return self._groups

    def epoch_size(self, n: int, world: int, rank_source: bool = False) -> int:
        """Identities per identity epoch: n rounded down to whole global batches (n when fewer)."""
        span = self.k * (1 if rank_source else world)
        return n - n % span if n >= span else n

    def describe(self, source, world: int = 1) -> dict[str, Any]:
        """What the batches are drawn from: identity and face counts, the identities with fewer than
        per_identity faces (their groups repeat faces), the singles pool. Logs a warning for short ones."""
        names, groups, pool, kind, _ = self._index(source)
        short = sorted(n for n in names if len(groups[n]) < self.m)
        labeled = sum(len(v) for v in groups.values())
        if short:
            log.warning("identity-grouped batches: %d of %d identities have fewer than %d faces (their groups repeat "
                        "faces): %s%s", len(short), len(names), self.m, ", ".join(short[:10]),
                        " ..." if len(short) > 10 else "")
        if self.s and kind == "all":
            log.warning("identity-grouped batches: %d unlabeled face(s) (< min_unlabeled %d): the single faces "
                        "come from all %d faces, labeled ones included", len(source) - labeled,
                        max(1, self.min_unlabeled), len(source))
        return {"identities": len(names), "identities_short": len(short), "short_identities": short[:SHORT_LISTED],
                "per_identity": self.m, "groups_per_batch": self.k, "singles_per_batch": self.s,
                "faces_labeled": labeled, "faces_unlabeled": len(source) - labeled, "singles_pool": kind,
                "singles_pool_size": len(pool) if self.s else 0,
                "identities_per_epoch": self.epoch_size(len(names), world)}

    def slots(self, source, b, rank, world, batch_size, seed, rank_source):
        if batch_size != self.k * self.m + self.s:
            raise ValueError(f"identity-grouped batch: batch_size {batch_size} != {self.k} x {self.m} + {self.s}")
        names, groups, singles, _, _ = self._index(source)
        out: list[tuple[int, int]] = []
        unit = b if rank_source else b * world + rank
        tag = ("rank", rank, world) if rank_source else ()
        n = self.epoch_size(len(names), world, rank_source)
        for k in range(self.k):
            G = unit * self.k + k
            epoch, pos = divmod(G, n)
            ident = names[self._perm_ids(len(names), ("ids", seed, epoch, *tag), pos)]
            faces = groups[ident]
            rng = np.random.default_rng(seed_of("group", seed, G, *tag))
            pick = rng.choice(len(faces), size=self.m, replace=len(faces) < self.m)
            label = G if not rank_source else G * world + rank
            out += [(faces[int(j)], int(label)) for j in pick]
        for s in range(self.s):
            epoch, pos = divmod(unit * self.s + s, len(singles))
            out.append((singles[self._perm_single(len(singles), ("singles", seed, epoch, *tag), pos)], -1))
        return out


# ============================================================================================
# examples and batches


class Examples:
    """Sample -> example for one method phase (picklable for DataLoader workers)."""

    def __init__(self, method: Method, phase: Phase, cfg: PhaseConfig, resolution: int, draft: bool = False):
        self.method, self.phase, self.cfg, self.res = method, phase, cfg, resolution
        self.keys = tuple(dict.fromkeys(phase.members + method.needs))
        self.sizes = phase.decode_sizes(cfg, resolution) if draft else {}  # JPEG member -> min decoded side

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        ex = self.phase.example(sample, resolution=self.res, cfg=self.cfg, rng=rng)
        for k, v in self.method.inputs([sample]).items():
            if k not in ex:
                ex[k] = torch.from_numpy(np.ascontiguousarray(v))
        return ex


class StepBatches(IterableDataset):
    """Infinite stream of whole batches, batch b = f(seed, b, rank, world) (see module doc); starts at `start`.

    A batch: the phase's collated examples + "key": [str], "step": b, "pos": (B,) int64 global
    positions g, "group": (B,) int64 group labels.
    """

    def __init__(self, source, examples: Examples, sampler: Sampler, batch_size: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1, rank_source: bool = False):
        if len(source) == 0:
            raise ValueError("no training samples")
        self.source, self.examples, self.sampler, self.B = source, examples, sampler, batch_size
        self.seed, self.start, self.rank, self.world = seed, start, rank, world
        self.rank_source = rank_source  # source = this rank's own shards (not the whole dataset)

    def position(self, b: int, i: int) -> int:
        """Global position g of sample i of batch b: its index in the one-process batch of world * B."""
        return (b * self.world + self.rank) * self.B + i

    def batch(self, b: int) -> dict:
        slots = self.sampler.slots(self.source, b, self.rank, self.world, self.B, self.seed, self.rank_source)
        items, keys, positions, groups = [], [], [], []
        for i, (idx, group) in enumerate(slots):
            g = self.position(b, i)
            s = self.source.get(idx, self.examples.keys, self.examples.sizes)
            items.append(self.examples(s, np.random.default_rng(seed_of("sample", self.seed, g))))
            keys.append(s["__key__"])
            positions.append(g)
            groups.append(group)
        out = self.examples.phase.collate(items, groups)
        out.update(key=keys, step=b, pos=torch.tensor(positions, dtype=torch.long),
                   group=torch.tensor(groups, dtype=torch.long))
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + wid
        while True:
            yield self.batch(b)
            b += nw


# ============================================================================================
# DataModule


class PersonaDataModule(L.LightningDataModule):
    """Shards (or synthetic samples) -> deterministic per-step batches for one method phase."""

    def __init__(self, method: Method, phase: Phase, train: TrainConfig, cfg: PhaseConfig):
        super().__init__()
        self.method, self.phase, self.cfg, self.pcfg = method, phase, train, cfg
        self.examples = Examples(method, phase, cfg, train.resolution, draft=train.jpeg_draft)
        self.train_source = None
        self.val_source = None
        self.signature = ""
        self._pin = False
        self._rank_sources: dict = {}

    # ------------------------------------------------------------------ sources
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_source is not None:
            return
        self.load_sources()
        # the phase bound to this run's data (`Phase.bind`): the loaders and the objective use it
        self.phase = self.phase.bind(self.pcfg, self.train_source)
        self.examples = Examples(self.method, self.phase, self.pcfg, self.cfg.resolution, draft=self.cfg.jpeg_draft)

    def load_sources(self) -> None:
        """The train source (the phase's splits of the shards, or synthetic samples), the validation
        source and the data signature, without binding the phase (see `setup`)."""
        need = self.examples.keys
        if self.cfg.synthetic > 0:
            size = max(64, self.cfg.resolution)
            self.train_source = MemorySource(synthetic_samples(self.cfg.synthetic, seed=self.cfg.seed, size=size))
            self.val_source = MemorySource(synthetic_samples(max(1, self.cfg.sampling.num_faces), seed=self.cfg.seed + 1,
                                                             size=size))
            self.signature = f"synthetic:{self.cfg.synthetic}:{self.cfg.seed}:{size}"
            return
        root = spath(self.cfg.shards)
        splits = tuple(self.phase.splits)
        train_urls = list(dict.fromkeys(u for split in splits for u in shard_urls(root, split)))
        if not train_urls:
            raise FileNotFoundError(f"no {'/'.join(splits)} shards under {root} (run the shards stage, or set "
                                    "train.synthetic)")
        self.train_source = ShardIndex(train_urls, need)
        if self.train_source.skipped:
            log.warning("train shards: skipped samples %s", self.train_source.skipped)
        if len(self.train_source) == 0:
            raise ValueError(f"no usable train samples in {root} (skipped: {self.train_source.skipped})")
        val_urls = shard_urls(root, "val") if "val" not in splits else []
        val = ShardIndex(val_urls, tuple(dict.fromkeys(need + ("face.jpg",)))) if val_urls else None
        self.val_source = val if val is not None and len(val) else self.train_source
        idx = root / "index.json"
        sig = json.loads(idx.read_text()).get("signature") if idx.is_file() else None
        files = [(str(u)[len(str(root)):].lstrip("/"), os.path.getsize(c))
                 for u, c in zip(self.train_source.source_urls, self.train_source.urls)]
        self.signature = f"shards:{sig}:{hashlib.sha256(repr(files).encode()).hexdigest()[:16]}"

    def describe(self) -> dict:
        self.setup()
        out = {"source": "synthetic" if self.cfg.synthetic > 0 else str(self.cfg.shards),
               "train_samples": len(self.train_source), "val_samples": len(self.val_source),
               "skipped": dict(self.train_source.skipped), "signature": self.signature}
        sampler = self.phase.sampler(self.pcfg)
        if hasattr(sampler, "describe"):  # what the batches are drawn from (e.g. identities with too few faces)
            out["sampler"] = sampler.describe(self.train_source)
        return out

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
        if key not in self._rank_sources:
            own = self.train_source.subset(urls[rank::world])
            if len(own) == 0:
                raise ValueError(f"rank {rank}/{world}: no usable samples in shards {urls[rank::world]}")
            self._rank_sources = {key: own}
        return self._rank_sources[key], True

    def dataset(self, start: int = 0, rank: int = 0, world: int = 1) -> StepBatches:
        sampler = self.phase.sampler(self.pcfg)
        if getattr(sampler, "whole_source", False):  # e.g. identity groups: every rank indexes all shards
            self.setup()
            source, own = self.train_source, False
        else:
            source, own = self.rank_source(rank, world)
        return StepBatches(source, self.examples, sampler, self.pcfg.batch_size, self.cfg.seed,
                           start=start, rank=rank, world=world, rank_source=own)

    def train_dataloader(self) -> DataLoader:
        start, rank, world = 0, 0, 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # called after a checkpoint is restored: continue with the batch after the last step
            start = int(trainer.global_step) * self.pcfg.accumulate
            rank, world = int(trainer.global_rank), int(trainer.world_size)
            self._pin = trainer.strategy.root_device.type == "cuda"
        ds = self.dataset(start, rank, world)
        nw = self.cfg.num_workers
        return DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=self._pin,
                          prefetch_factor=2 if nw > 0 else None, persistent_workers=False)

    def val_examples(self, k: Optional[int] = None) -> dict:
        """The first k validation samples, unaugmented: {"face": (k, 3, R, R) aligned faces (zeros
        without one), "inputs": [conditioner inputs per face], "prompt": [str], "key": [str]}."""
        self.setup()
        k = min(k or self.cfg.sampling.num_faces, len(self.val_source))
        res = self.cfg.resolution
        keys = tuple(dict.fromkeys(self.examples.keys + VAL_EXTRA_KEYS))
        faces, inputs, prompts, names = [], [], [], []
        for i in range(k):
            s = self.val_source.get(i, keys)
            faces.append(aligned_face(s["face.jpg"], res) if "face.jpg" in s else torch.zeros(3, res, res))
            inputs.append(self.method.inputs([s]))
            prompts.append(self.phase.val_prompt(s, self.pcfg))
            names.append(s["__key__"])
        return {"face": torch.stack(faces), "inputs": inputs, "prompt": prompts, "key": names}
