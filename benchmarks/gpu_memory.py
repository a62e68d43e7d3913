"""Training memory and step time on SD 1.5 shapes (CUDA only).

The real SD 1.5 UNet/VAE/text-encoder configs with random weights (`build_random('sd15')`), the W+
adapter installed (`benchmarks.common.wplus_adapter`, trainable in float32), stage I at 512 px (4 x 64 x 64
latents): VAE encode + text encoder (frozen, no grad) -> UNet + adapter forward/backward -> AdamW.
Grid: batch 1 / 4 / 8 x precision (fp32; fp16 = frozen networks in float16 + autocast + GradScaler)
x gradient checkpointing off / on. Per cell: peak allocated and reserved GPU memory and the mean
step time over `--steps` steps after `--warmup`; an out-of-memory cell is recorded as such.

Without CUDA the result records only that it was skipped, and why.

    python -m benchmarks.gpu_memory [--steps 5]
"""
from __future__ import annotations

import argparse
import gc
import time

from benchmarks.common import table, write_result
from benchmarks.workload import quiet

BATCHES = (1, 4, 8)


def build(preset: str, device, fp16: bool, checkpointing: bool):
    import torch

    from pipeline.models.diffusion import build_random
    from benchmarks.common import wplus_adapter

    comps = build_random(preset, device=device, dtype=torch.float16 if fp16 else torch.float32).freeze()
    adapter = wplus_adapter(comps, dtype=torch.float32)
    if checkpointing:
        comps.unet.enable_gradient_checkpointing()
        comps.unet.train()  # diffusers checkpoints only in training mode; the frozen weights get no grads
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    return comps, adapter, opt


def measure(preset: str, device, px: int, batch: int, fp16: bool, checkpointing: bool, steps: int, warmup: int) -> dict:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    comps, adapter, opt = build(preset, device, fp16, checkpointing)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16 and cuda)
    sched = comps.noise_scheduler
    images = torch.rand(batch, 3, px, px, device=device) * 2 - 1
    w = torch.randn(batch, 18, 512, device=device)
    prompts = ["a photo of a person"] * batch
    weights_mb = (torch.cuda.memory_allocated() / 2**20) if cuda else None

    def step():
        with torch.no_grad():
            lat = comps.encode_images(images.to(comps.vae.dtype)).float()
            text = comps.encode_prompt(prompts)
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noisy = sched.add_noise(lat, noise, t)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16 and cuda):
            tokens = adapter.tokens({"wplus": w})
            with adapter.injection.conditioned(tokens, scale=1.0):
                pred = comps.unet(noisy.to(comps.unet.dtype), t, text.to(comps.unet.dtype)).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
                scaler.scale(loss).backward()  # inside the block: checkpointing recomputes the forward here
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    out = {"step_seconds": round(dt, 4), "samples_per_s": round(batch / dt, 2)}
    if cuda:
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   weights_and_optimizer_mib=round(weights_mb, 0))
    del comps, adapter, opt
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-on-cpu", action="store_true",
                    help="exercise the same code with the tiny preset at 64 px on CPU (no result file)")
    args = ap.parse_args()
    quiet()
    import torch

    if args.check_on_cpu:
        dev = torch.device("cpu")
        for fp16 in (False,):
            for ck in (False, True):
                print("tiny cpu", ck, measure("tiny", dev, 64, 2, fp16, ck, 1, 1))
        return
    if not torch.cuda.is_available():
        reason = (f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda or 'none'}): this machine has no usable GPU, and SD 1.5 training memory is "
                  "only meaningful on one")
        path = write_result("gpu_memory", {"skipped": True, "reason": reason})
        print(f"gpu_memory: skipped: {reason} -> {path}")
        return

    dev = torch.device("cuda")
    cells, rows = [], []
    for fp16 in (False, True):
        for ck in (False, True):
            for b in BATCHES:
                cell = {"batch": b, "precision": "fp16-autocast" if fp16 else "fp32", "gradient_checkpointing": ck}
                try:
                    cell.update(measure("sd15", dev, 512, b, fp16, ck, args.steps, args.warmup))
                except torch.cuda.OutOfMemoryError as e:
                    cell.update(oom=True, error=str(e).splitlines()[0][:200])
                    gc.collect()
                    torch.cuda.empty_cache()
                cells.append(cell)
                rows.append((cell["precision"], "on" if ck else "off", b, cell.get("peak_allocated_gib", "OOM"),
                             cell.get("peak_reserved_gib", "-"), cell.get("step_seconds", "-"), cell.get("samples_per_s", "-")))
    props = torch.cuda.get_device_properties(0)
    result = {
        "skipped": False,
        "gpu": {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda},
        "model": "SD 1.5 UNet/VAE/CLIP-L configs, random weights; W+ adapter (float32, trainable); stage I, 512 px",
        "steps": args.steps, "warmup": args.warmup,
        "cells": cells,
    }
    path = write_result("gpu_memory", result)
    print(table(rows, ("precision", "checkpointing", "batch", "peak alloc GiB", "peak reserved GiB", "s/step", "samples/s")))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
