"""Training memory and step time on SD 1.5 shapes, for every registered training method (CUDA only).

For each (method, phase) in the method registry (`training.methods`: the methods added later are
measured without a change here): the real SD 1.5 UNet/VAE/text-encoder configs with random weights
(`build_random('sd15')`), the method's conditioner + injection installed (float32, trainable as the
phase says), 512 px, one optimizer step of the real training code (`benchmarks.common.MethodStep`:
the phase's data module batch from synthetic samples, `PersonaModule.training_step` = the phase's
loss with its extra frozen passes, backward, AdamW). Grid: batch 1 / 4 / 8 x precision (fp32; bf16 =
frozen networks in bfloat16 + autocast) x gradient checkpointing off / on. Per cell: peak allocated
and reserved GPU memory and the mean step time over `--steps` steps after `--warmup`; an
out-of-memory cell is recorded as such. `samples_per_s` of the batch-8 cells is the SD-1.5-shape
step rate the loader benchmark compares its shard reader with.

Without CUDA the result records that it was skipped, why, and the cells it would measure.

    python -m benchmarks.gpu_memory [--steps 5] [--check-on-cpu]
"""
from __future__ import annotations

import gc
import time

from benchmarks.common import MethodStep, gpu_benchmark_args, method_phases, quiet_lightning, table, write_result
from benchmarks.workload import quiet

BATCHES = (1, 4, 8)
PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = (False, True)


def measure(method: str, phase: str, *, preset: str, device: str, px: int, batch: int, precision: str,
            checkpointing: bool, steps: int, warmup: int) -> dict:
    """One cell: peak memory (CUDA) and mean seconds per optimizer step."""
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = MethodStep(method, phase, preset=preset, device=device, resolution=px, batch_size=batch,
                      precision=precision, checkpointing=checkpointing, synthetic=max(32, 2 * batch))
    weights_mb = (torch.cuda.memory_allocated() / 2**20) if cuda else None
    batches = [step.batch(b) for b in range(warmup + steps)]
    for b in batches[:warmup]:
        step(b)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / max(1, steps)
    out = {"step_seconds": round(dt, 4), "samples_per_s": round(step.batch_size / dt, 2),
           "trainable_parameters": step.trainable}
    if step.batch_size != batch:  # a phase whose sampler fixes the batch layout (identity groups)
        out["effective_batch"] = step.batch_size
    if cuda:
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   weights_mib=round(weights_mb, 0))
    del step, batches
    gc.collect()
    return out


def cells(preset: str, device: str, px: int, batches=BATCHES, precisions=PRECISIONS, checkpointing=CHECKPOINTING,
          steps: int = 5, warmup: int = 2) -> list[dict]:
    """Every (method, phase) x batch x precision x checkpointing cell (OOM recorded, not raised)."""
    import torch

    out = []
    for method, phase in method_phases():
        for precision in precisions:
            for ck in checkpointing:
                for b in batches:
                    cell = {"method": method, "phase": phase, "batch": b, "precision": precision,
                            "gradient_checkpointing": ck}
                    try:
                        cell.update(measure(method, phase, preset=preset, device=device, px=px, batch=b,
                                            precision=precision, checkpointing=ck, steps=steps, warmup=warmup))
                    except torch.cuda.OutOfMemoryError as e:
                        cell.update(oom=True, error=str(e).splitlines()[0][:200])
                        gc.collect()
                        torch.cuda.empty_cache()
                    out.append(cell)
                    print(f"  {cell}", flush=True)
    return out


def main() -> None:
    args = gpu_benchmark_args(__doc__)
    quiet()
    quiet_lightning()
    import torch

    plan = [{"method": m, "phase": p} for m, p in method_phases()]
    if args.check_on_cpu:
        torch.set_num_threads(1)
        for c in cells("tiny", "cpu", 64, batches=(2,), precisions=("fp32",), steps=1, warmup=1):
            print(c)
        return
    if not torch.cuda.is_available():
        reason = (f"skipped: no CUDA (torch.cuda.is_available() is False; torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda or 'none'}): SD 1.5 training memory is only meaningful on a GPU")
        path = write_result("gpu_memory", {
            "skipped": True, "reason": reason, "targets": {},
            "would_measure": {"methods_phases": plan, "batches": list(BATCHES), "precisions": list(PRECISIONS),
                              "gradient_checkpointing": list(CHECKPOINTING), "resolution": 512, "preset": "sd15"},
            "to_run": "python -m benchmarks.gpu_memory on a machine with CUDA (about 1 minute per method phase "
                      "on one modern GPU); its batch-8 samples/s is the loader benchmark's SD-1.5 comparator"})
        print(f"gpu_memory: {reason} -> {path}")
        return

    grid = cells("sd15", "cuda", 512, steps=args.steps, warmup=args.warmup)
    props = torch.cuda.get_device_properties(0)
    rate = {f"{c['method']}.{c['phase']}": c["samples_per_s"] for c in grid
            if c["batch"] == 8 and c["precision"] == "bf16" and not c["gradient_checkpointing"] and "samples_per_s" in c}
    result = {
        "skipped": False,
        "gpu": {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda},
        "model": "SD 1.5 UNet/VAE/CLIP-L configs, random weights; each method's adapter (float32, trainable); 512 px",
        "steps": args.steps, "warmup": args.warmup,
        "cells": grid,
        "sd15_samples_per_s_batch8_bf16": rate,
        "targets": {},
    }
    path = write_result("gpu_memory", result)
    rows = [(f"{c['method']}.{c['phase']}", c["precision"], "on" if c["gradient_checkpointing"] else "off", c["batch"],
             c.get("peak_allocated_gib", "OOM" if c.get("oom") else "-"), c.get("peak_reserved_gib", "-"),
             c.get("step_seconds", "-"), c.get("samples_per_s", "-")) for c in grid]
    print(table(rows, ("method.phase", "precision", "checkpointing", "batch", "peak alloc GiB", "peak reserved GiB",
                       "s/step", "samples/s")))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
