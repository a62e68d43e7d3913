"""Training input: the shard loader's samples/s vs the training step rate, for every registered method.

Data: the faces of the `stage_throughput` build (built here when missing), written with the real shard
writer (`pipeline.shards.write_shards`) at `--per-shard` samples per tar. The e4e stage is not built in
the benchmarks (no real weights here, ~4 s per face on this CPU), so the `wplus.npy` members are random
(18, 512) codes of the real shape and dtype, written by a `wplus` table made here (the reader's cost of
that member is the same; their values are not used for anything but feeding the step). The
`expression`, `clip_image` (tiny random CLIP) and `instances` stages run on that build, so the shards
hold every member a registered method reads.

For each (method, phase) in the method registry whose members the shards hold:
- loader: the training data module itself (`training.data.PersonaDataModule`: `ShardIndex` random
  access, the phase's members only, `Phase.example` augmentation, `Method.inputs`, collate) in a torch
  DataLoader with 2 workers, batch 8, at 64 px (and 512 px, draft only, one pass), with `train.jpeg_draft` on (the default:
  JPEGs decoded at about the training size by libjpeg DCT scaling) and off (full-size decodes).
  Samples/s per pass after its first batch (worker start excluded); the best of `--passes`;
- step: one optimizer step of the real training code on the tiny SD preset at 64 px, batch 8
  (`benchmarks.common.MethodStep`: the phase's loss incl. its extra frozen passes, backward, AdamW),
  with 1 torch thread and with torch's default, fastest of `--trials`; the faster is the comparator;
- where a sample's time goes: one process, per member read + decode, and the example.
Target: loader >= 3 x the step's samples/s at 64 px, per method phase. The SD-1.5-shape comparator
(>= 1 x the GPU benchmark's batch-8 rate at 512 px) applies where `benchmarks/results/gpu_memory.json`
holds a GPU run; without one it is recorded as not measured.

    python -m benchmarks.loader [--passes 2] [--trials 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, MethodStep, method_phases, quiet_lightning, sized_sampler, table, write_result
from benchmarks.workload import WORK, params_for, photo_set, quiet

TARGET = 3.0
BATCH = 8


# ============================================================================================
# data


def ensure_build(n: int) -> Path:
    """The item store of a full build of the photo set (the stage_throughput one when present)."""
    root = WORK / "stage_throughput" / "persona"
    if (root / "identity" / "table.parquet").exists():
        return root
    from benchmarks.workload import context, start_ray, stop_ray
    from stages import align, dedup, identity, ingest, masks

    root = WORK / "loader" / f"data-{n}"
    if (root / "identity" / "table.parquet").exists():
        return root
    params = params_for(photo_set(n), root, None)
    ctx = context(params, root)
    start_ray(params)
    try:
        for mod in (ingest, dedup, align, masks, identity):
            mod.run(ctx)
    finally:
        stop_ray()
    return root


LATER = ("expression", "clip_image", "instances")  # cheap on CPU (mesh geometry, the tiny CLIP, label maps)


def later_stages(root: Path) -> None:
    """The members the other methods read (expr.npy, clip.npy, inst.png), by their real stages."""
    import importlib

    from benchmarks.workload import context, start_ray, stop_ray

    todo = [s for s in LATER if not (root / s / "table.parquet").exists()]
    if not todo:
        return
    params = params_for(Path("."), root, None)
    start_ray(params)
    try:
        for s in todo:
            importlib.import_module(f"stages.{s}").run(context(params, root))
    finally:
        stop_ray()


def random_wplus(root: Path) -> int:
    """A `wplus` table of random (18, 512) codes for the aligned faces (see the module doc)."""
    from pipeline.images import encode_npy
    from pipeline.stage import array_columns
    from pipeline.store import ItemStore, hash_key, read_table, table_schema

    store = ItemStore(root, "wplus", schema=table_schema(array_columns("wplus")))
    if store.table_path.exists():
        return len(store.table())
    faces = read_table(root, "align", ok_only=True)
    rows = []
    for k, sig in zip(faces["key"], faces["sig"]):
        ck = hash_key("bench-random-wplus", k, sig)
        w = np.random.default_rng(int(ck[:8], 16)).standard_normal((18, 512)).astype(np.float32)
        rows.append({"key": k, "cache_key": ck, "status": "ok", "error": "", "sig": ck,
                     "wplus_blob": store.blobs.put(ck, f"{k}.wplus.npy", encode_npy(w)),
                     "wplus_model": "random-codes (benchmark)", "wplus_fingerprint": "none", "wplus_weights_real": False})
    store.commit(rows)
    store.consolidate([r["cache_key"] for r in rows])
    return len(rows)


def make_shards(root: Path, out: Path, per_shard: int) -> dict:
    from pipeline.shards import write_shards
    from stages.shards import join

    cfg = params_for(Path("."), root, None, shards={"samples_per_shard": per_shard, "val_fraction": 0.0,
                                                     "required": ["masks", "identity", "wplus", *LATER], "optional": ["caption"]}).shards
    joined = join(root, cfg)
    index, _ = write_shards(joined, out, cfg)
    return index


# ============================================================================================
# loader and step


def train_config(shards: Path, resolution: int, draft: bool):
    from training.config import train_params

    return train_params({"train": {"shards": str(shards), "resolution": resolution, "num_workers": 2,
                                   "jpeg_draft": draft, "seed": 0}})


def phase_config(tp, method: str, phase: str, shards: Path):
    """The phase's config; a per-identity phase (personalisation) on the identity with most train faces."""
    import dataclasses

    from pipeline.shard_reader import ShardIndex, shard_urls

    pcfg = dataclasses.replace(tp.phase(method, phase), accumulate=1)
    if getattr(pcfg, "identity", "") is None:
        groups, _ = ShardIndex(shard_urls(shards, "train"), ("json",)).by_identity()
        pcfg = dataclasses.replace(pcfg, identity=max(sorted(groups), key=lambda k: len(groups[k])))
    return pcfg


def measure_loader(method: str, phase: str, shards: Path, resolution: int, draft: bool, passes: int,
                   batches: int) -> dict:
    """samples/s of the phase's training DataLoader (2 workers), per pass after its first batch."""
    import dataclasses

    from training import methods
    from training.data import PersonaDataModule

    tp = train_config(shards, resolution, draft)
    m = methods.get(method)
    pcfg = phase_config(tp, method, phase, shards)
    dm = PersonaDataModule(m, m.phases[phase], tp.train, pcfg)
    dm.setup()
    own = dm.phase.sampler(pcfg)
    if sized_sampler(own, BATCH)[0] is own:  # a free batch size; else the phase's own batch layout
        pcfg = dataclasses.replace(pcfg, batch_size=BATCH)  # (identity groups: samples/s compare all the same)
        dm = PersonaDataModule(m, m.phases[phase], tp.train, pcfg)
        dm.setup()
    rates, first = [], []
    for _ in range(passes):
        dl = dm.train_dataloader()
        t0 = time.perf_counter()
        it = iter(dl)
        b = next(it)
        t1 = time.perf_counter()
        first.append(t1 - t0)
        k = 0
        for _ in range(batches):
            b = next(it)
            k += len(b["key"])
        rates.append(k / (time.perf_counter() - t1))
        del it, dl
    return {"samples_per_s": round(max(rates), 1), "median_samples_per_s": round(float(np.median(rates)), 1),
            "per_pass": [round(r, 1) for r in rates], "first_batch_s": [round(x, 3) for x in first],
            "samples_per_pass": batches * pcfg.batch_size, "image_shape": list(b["image"].shape),
            "members_read": list(dm.examples.keys), "draft_sizes": dict(dm.examples.sizes)}


def step_rate(method: str, phase: str, steps: int, trials: int, warmup: int = 2) -> dict:
    """The phase's training step on the tiny preset, 64 px, batch 8, on this CPU (fastest trial)."""
    import torch

    st = MethodStep(method, phase, preset="tiny", device="cpu", resolution=64, batch_size=BATCH)
    data = [st.batch(b) for b in range(steps)]
    out = {"trainable_parameters": st.trainable, "trials": trials, "steps_per_trial": steps}
    default = torch.get_num_threads()
    try:
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            for b in data[:warmup]:
                st(b)
            times = []
            for _ in range(trials):
                t0 = time.perf_counter()
                for b in data:
                    st(b)
                times.append((time.perf_counter() - t0) / steps)
            best = min(times)
            out[f"{threads}_threads"] = {"seconds_per_step": round(best, 4), "samples_per_s": round(st.batch_size / best, 1),
                                         "per_trial_seconds_per_step": [round(t, 4) for t in times]}
    finally:
        torch.set_num_threads(default)
    best = max((v for k, v in out.items() if k.endswith("_threads")), key=lambda v: v["samples_per_s"])
    out["samples_per_s"] = best["samples_per_s"]
    return out


def sample_costs(method: str, phase: str, shards: Path, resolution: int, limit: int = 64) -> dict:
    """Milliseconds per sample in one process: reading + decoding each member the phase reads (full
    size and draft), and the phase's example (augmentation) at `resolution`."""
    import dataclasses

    from pipeline.shard_reader import ShardIndex, shard_urls
    from training import methods
    from training.data import Examples

    tp = train_config(shards, resolution, True)
    m = methods.get(method)
    pcfg = dataclasses.replace(phase_config(tp, method, phase, shards), batch_size=BATCH)
    keys = tuple(dict.fromkeys((*m.phases[phase].members, *m.needs, "json")))
    src = ShardIndex(shard_urls(shards, "train"), keys)
    bound = m.phases[phase].bind(pcfg, src)  # as the data module binds it
    ex_draft = Examples(m, bound, pcfg, resolution, draft=True)
    ex_full = Examples(m, bound, pcfg, resolution, draft=False)
    n = min(limit, len(src))
    out = {"samples": n}
    for k in ex_full.keys:
        t0 = time.perf_counter()
        for i in range(n):
            src.get(i, (k,))
        out[f"read_decode_{k}_ms"] = round((time.perf_counter() - t0) / n * 1e3, 3)
        if k in ex_draft.sizes:
            t0 = time.perf_counter()
            for i in range(n):
                src.get(i, (k,), ex_draft.sizes)
            out[f"read_decode_{k}_draft_ms"] = round((time.perf_counter() - t0) / n * 1e3, 3)
    rng = np.random.default_rng(0)
    for name, ex in (("full", ex_full), ("draft", ex_draft)):
        samples = [src.get(i, ex.keys, ex.sizes) for i in range(n)]
        t0 = time.perf_counter()
        for s in samples:
            ex(s, rng)
        out[f"example_{name}_ms"] = round((time.perf_counter() - t0) / n * 1e3, 3)
    return out


def _default_draft() -> bool:
    from training.config import train_params

    return train_params({}).train.jpeg_draft


def sd15_comparator() -> dict:
    p = RESULTS / "gpu_memory.json"
    if not p.exists():
        return {"measured": False, "why": "no benchmarks/results/gpu_memory.json"}
    r = json.loads(p.read_text())
    if r.get("skipped"):
        return {"measured": False, "why": f"the GPU benchmark did not run here: {r.get('reason', '')}"}
    return {"measured": True, "samples_per_s": r.get("sd15_samples_per_s_batch8_bf16", {}), "gpu": r.get("gpu")}


# ============================================================================================


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="photo set size (when the build is missing)")
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12, help="batches per pass after the first")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    quiet()
    quiet_lightning()
    import cv2

    cv2.setNumThreads(1)  # the DataLoader workers are the parallelism
    work = WORK / "loader"
    root = ensure_build(args.n)
    random_wplus(root)
    later_stages(root)
    shards = work / "shards"
    index = make_shards(root, shards, args.per_shard)
    have = set(index["sample_keys"])
    sd15 = sd15_comparator()

    phases, rows, targets, missed = {}, [], {}, {}
    for method, phase in method_phases():
        from training import methods

        m = methods.get(method)
        need = set(m.phases[phase].members) | set(m.needs)
        if not need <= have:
            phases[f"{method}.{phase}"] = {"skipped": f"the benchmark shards lack {sorted(need - have)}"}
            continue
        step = step_rate(method, phase, args.steps, args.trials)
        loaders = {}
        for res, draft in ((64, True), (64, False), (512, True)):  # 512 px: the default (draft) decode, one pass
            loaders[f"{res}px_{'draft' if draft else 'full_decode'}"] = measure_loader(
                method, phase, shards, res, draft, args.passes if res == 64 else 1, args.batches)
        costs = {f"{r}px": sample_costs(method, phase, shards, r) for r in (64, 512)}
        name = f"{method}.{phase}"
        ratio = loaders["64px_draft"]["samples_per_s"] / step["samples_per_s"]
        ratio_full = loaders["64px_full_decode"]["samples_per_s"] / step["samples_per_s"]
        targets[f"{name}_loader_ge_{TARGET:g}x_step_64px"] = ratio >= TARGET
        entry = {"step": step, "loaders": loaders, "per_sample_ms_one_process": costs,
                 "ratio_64px": round(ratio, 3), "ratio_64px_full_decode": round(ratio_full, 3)}
        if sd15["measured"] and name in sd15["samples_per_s"]:
            r512 = loaders["512px_draft"]["samples_per_s"] / sd15["samples_per_s"][name]
            entry["ratio_512px_vs_sd15_gpu_step"] = round(r512, 3)
            targets[f"{name}_loader_ge_1x_sd15_step_512px"] = r512 >= 1.0
        phases[name] = entry
        rows.append((name, f"{step['samples_per_s']:.0f}", f"{loaders['64px_draft']['samples_per_s']:.0f}",
                     f"{ratio:.2f}x", f"{loaders['64px_full_decode']['samples_per_s']:.0f}", f"{ratio_full:.2f}x",
                     f"{loaders['512px_draft']['samples_per_s']:.0f}"))
        if ratio < TARGET:
            c = costs["64px"]
            missed[name] = (f"loader {loaders['64px_draft']['samples_per_s']:.0f} samples/s vs step "
                            f"{step['samples_per_s']:.0f} ({ratio:.2f}x). One process, per sample: "
                            + ", ".join(f"{k} {v} ms" for k, v in c.items() if k != "samples")
                            + ". Two DataLoader workers share the 2 cores with the training step. What would fix it: "
                            "less decoding per sample (a reduced JPEG decode for more of the phase's members, "
                            "`Phase.decode_sizes`, or smaller stored members), or more DataLoader workers on "
                            "more cores")
    result = {
        "data": {"faces": sum(s["samples"] for s in index["shards"]), "tars": len(index["shards"]),
                 "samples_per_shard": args.per_shard, "members": index["sample_keys"],
                 "build": str(root.relative_to(WORK.parent.parent)),
                 "wplus.npy": "random codes of the real shape (the e4e stage is not built in the benchmarks)"},
        "config": {"batch_size": BATCH, "dataloader_workers": 2, "passes_64px": args.passes, "passes_512px": 1,
                   "batches_per_pass": args.batches, "default_jpeg_draft": _default_draft(),
                   "figure": "fastest pass / fastest trial (the least disturbed on a shared machine); medians beside"},
        "phases": phases,
        "sd15_comparator": sd15 if sd15["measured"] else {**sd15, "target": "loader at 512 px >= 1x the SD-1.5-shape "
                                                          "step rate: not measured (no GPU benchmark ran)"},
        "target": f"loader samples/s at 64 px >= {TARGET:g} x the tiny model's training samples/s, per method phase; "
                  ">= 1 x the SD-1.5 GPU step rate at 512 px where the GPU benchmark ran",
        "targets": targets,
    }
    if missed:
        result["missed"] = missed
    path = write_result("loader", result)
    print(table(rows, ("method.phase", "step/s", "loader 64 draft", "ratio", "64 full", "ratio full", "512 draft")))
    print(f"targets met: {sum(targets.values())}/{len(targets)} -> {path}")
    for k, v in missed.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
