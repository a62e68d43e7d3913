"""Hybrid guidance training memory and step time on SD 1.5 shapes (CUDA only): the adapter (UNet
frozen, this project's default) against `train_unet: true` (the paper: the whole UNet trains).

The real SD 1.5 UNet/VAE/text-encoder configs with random weights (`build_random('sd15')`); the
hybrid_guidance conditioner (`HybridLinear`, clip_dim 1792 = the paper's three CLIPs, 4 tokens) and
region attention installed and trainable in float32; 512 px (4 x 64 x 64 latents): VAE encode + text
encoder (frozen, no grad) -> UNet + adapter forward / backward -> AdamW over the trained tensors.
Grid: train_unet off / on x batch 1 / 4 x gradient checkpointing off / on; mixed precision: the frozen
networks in float16 (a trained UNet stays float32) under float16 autocast with a GradScaler. Per cell:
peak allocated / reserved memory, the trained parameter count and the mean step time over `--steps`
steps after `--warmup`; an out-of-memory cell is recorded as such.

Without CUDA the result records only that it was skipped, and why.

    python -m benchmarks.gpu_memory_hybrid [--steps 5] [--check-on-cpu]
"""
from __future__ import annotations

import gc
import time

from benchmarks.common import gpu_benchmark_args, table, write_result
from benchmarks.workload import quiet

BATCHES = (1, 4)
CLIP_DIM = 1792


def build(preset: str, device, train_unet: bool, checkpointing: bool):
    import torch

    from pipeline.models.diffusion import build_random
    from training.adapter import PersonaAdapter
    from training.methods.hybrid_guidance import HybridLinear
    from training.adapters.region_attention import RegionAttention

    frozen = torch.float16 if device.type == "cuda" else torch.float32
    comps = build_random(preset, device=device, dtype=frozen).freeze()
    if train_unet:
        comps.unet.to(torch.float32)
    adapter = PersonaAdapter("hybrid_guidance", HybridLinear(comps.cross_attention_dim, CLIP_DIM),
                             RegionAttention()).install(comps, dtype=torch.float32)
    params = list(adapter.parameters())
    if train_unet:
        comps.unet.requires_grad_(True)
        own = {id(p) for p in params}
        params += [p for p in comps.unet.parameters() if id(p) not in own]
    if checkpointing:
        comps.unet.enable_gradient_checkpointing()
        comps.unet.train()
    opt = torch.optim.AdamW(params, lr=1e-6 if train_unet else 1e-4)
    return comps, adapter, opt, sum(p.numel() for p in params)


def measure(preset: str, device, px: int, batch: int, train_unet: bool, checkpointing: bool, steps: int,
            warmup: int) -> dict:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    comps, adapter, opt, trained = build(preset, device, train_unet, checkpointing)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    sched = comps.noise_scheduler
    images = torch.rand(batch, 3, px, px, device=device) * 2 - 1
    inputs = {"clip": torch.randn(batch, CLIP_DIM, device=device), "face": torch.randn(batch, 512, device=device)}
    prompts = ["a photo of a person"] * batch
    weights_mb = (torch.cuda.memory_allocated() / 2**20) if cuda else None

    def step():
        with torch.no_grad():
            lat = comps.encode_images(images.to(comps.vae.dtype)).float()
            text = comps.encode_prompt(prompts)
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noisy = sched.add_noise(lat, noise, t)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            with adapter.injection.conditioned(adapter.tokens(inputs), scale=1.0):
                pred = comps.unet(noisy.to(comps.unet.dtype), t, text.to(comps.unet.dtype)).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
                scaler.scale(loss).backward()
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
    out = {"trained_parameters": trained, "step_seconds": round(dt, 4), "samples_per_s": round(batch / dt, 2)}
    if cuda:
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   weights_and_optimizer_mib=round(weights_mb, 0))
    del comps, adapter, opt
    gc.collect()
    return out


def main() -> None:
    args = gpu_benchmark_args(__doc__)
    quiet()
    import torch

    if args.check_on_cpu:
        for tu in (False, True):
            for ck in (False, True):
                print("tiny cpu train_unet", tu, "checkpointing", ck,
                      measure("tiny", torch.device("cpu"), 64, 2, tu, ck, 1, 1))
        return
    if not torch.cuda.is_available():
        reason = (f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda or 'none'}): this machine has no usable GPU, and SD 1.5 training memory is "
                  "only meaningful on one")
        path = write_result("gpu_memory_hybrid", {"skipped": True, "reason": reason, "targets": {}})
        print(f"gpu_memory_hybrid: skipped: {reason} -> {path}")
        return

    dev = torch.device("cuda")
    cells, rows = [], []
    for tu in (False, True):
        for ck in (False, True):
            for b in BATCHES:
                cell = {"train_unet": tu, "batch": b, "gradient_checkpointing": ck, "precision": "fp16-autocast"}
                try:
                    cell.update(measure("sd15", dev, 512, b, tu, ck, args.steps, args.warmup))
                except torch.cuda.OutOfMemoryError as e:
                    cell.update(oom=True, error=str(e).splitlines()[0][:200])
                    gc.collect()
                    torch.cuda.empty_cache()
                cells.append(cell)
                rows.append(("on" if tu else "off", "on" if ck else "off", b, cell.get("trained_parameters", "-"),
                             cell.get("peak_allocated_gib", "OOM"), cell.get("peak_reserved_gib", "-"),
                             cell.get("step_seconds", "-"), cell.get("samples_per_s", "-")))
    props = torch.cuda.get_device_properties(0)
    result = {
        "skipped": False,
        "gpu": {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda},
        "model": "SD 1.5 UNet/VAE/CLIP-L configs, random weights; hybrid_guidance adapter (HybridLinear clip_dim "
                 "1792 + region attention, float32, trainable), UNet frozen (fp16) or trained (fp32); 512 px",
        "steps": args.steps, "warmup": args.warmup,
        "cells": cells,
        "targets": {},
    }
    path = write_result("gpu_memory_hybrid", result)
    print(table(rows, ("train_unet", "checkpointing", "batch", "trained params", "peak alloc GiB", "peak reserved GiB",
                       "s/step", "samples/s")))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
