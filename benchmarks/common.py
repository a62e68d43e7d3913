"""Helpers shared by the benchmark scripts: machine description and result files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOADED = 3.0  # 1-minute load average above which the machine counts as loaded (2 cores)


def load_average() -> list[float]:
    """The machine's 1/5/15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


LOAD_AT_START = load_average()  # this benchmark process starts (each runs in its own process)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for pkg in ("numpy", "ray", "torch", "pandas", "pyarrow", "mediapipe", "onnxruntime", "webdataset"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    from pipeline.gitinfo import git_commit

    commit = git_commit(short=True) or ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    end = load_average()
    load = {"start": LOAD_AT_START, "end": end, "loaded": max(LOAD_AT_START[0], end[0]) > LOADED,
            "note": f"1/5/15-minute load averages when the benchmark started and ended; loaded = above {LOADED:g} "
                    f"on {os.cpu_count()} cores"}
    payload = {"benchmark": name, "machine": machine(), "load_average": load, **result}
    payload["noise"] = ("the machine was shared with other jobs while measured: compare ratios from the same run, not "
                        "absolute times" if load["loaded"] else
                        f"the machine was quiet while measured (1-minute load at most {LOADED:g} at start and end)")
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows])


def method_phases() -> list[tuple[str, str]]:
    """(method, phase) of every registered training method (the registry, not a list here)."""
    from training import methods

    return [(m, p) for m in methods.names() for p in methods.get(m).phases]


class MethodStep:
    """One optimizer step of a registered method's phase, with the real training code: the phase's
    data module builds batch b (synthetic samples unless `source` is given), `PersonaModule`
    computes the phase's loss, AdamW steps the trained parameters.

    preset: "tiny" | "sd15" (random weights from the config); precision: "fp32" | "bf16" (frozen
    networks in bfloat16 + autocast; the adapter stays float32)."""

    def __init__(self, method: str, phase: str, *, preset: str = "tiny", device: str = "cpu", resolution: int = 64,
                 batch_size: int = 8, precision: str = "fp32", checkpointing: bool = False, synthetic: int = 64):
        import dataclasses

        import torch

        from pipeline.models.diffusion import build_random
        from pipeline.shards import synthetic_samples
        from training import methods
        from training.adapter import PersonaAdapter
        from training.config import train_params
        from training.data import PersonaDataModule, StepBatches
        from training.module import PersonaModule

        self.device = torch.device(device)
        self.precision = precision
        tp = train_params({"train": {"resolution": resolution, "synthetic": synthetic, "num_workers": 0,
                                     "base_model": {"preset": preset}}})
        self.method = methods.get(method)
        self.phase = self.method.phases[phase]
        pcfg = dataclasses.replace(tp.phase(method, phase), batch_size=batch_size,
                                   gradient_checkpointing=checkpointing, accumulate=1)
        if getattr(pcfg, "identity", "") is None:  # a per-identity phase (personalisation): the first synthetic one
            pcfg = dataclasses.replace(pcfg, identity=synthetic_samples(1)[0]["json"]["identity"])
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        comps = build_random(preset, device=self.device, dtype=dtype).freeze()
        mcfg = tp.method(method)
        torch.manual_seed(0)
        ccfg = self.method.conditioner_config(mcfg, comps)
        self.dm = _synthetic_data(PersonaDataModule)(self.method, self.phase, tp.train, pcfg)
        self.dm.widths = ccfg
        self.dm.setup()
        self.phase = self.dm.phase  # bound to the data (`Phase.bind`), as training does
        cond = self.method.conditioner(**ccfg)
        self.method.calibrate(cond, self.dm.train_source, mcfg)  # as a phase without an init adapter does
        inj = self.method.injection(**self.method.injection_config(mcfg, comps))
        adapter = PersonaAdapter(self.method.name, cond, inj, phase=phase).install(comps, dtype=torch.float32)
        self.module = PersonaModule(self.method, self.phase, pcfg, 0, comps, adapter).to(self.device)
        self.module.train()
        sampler, self.batch_size = sized_sampler(self.phase.sampler(pcfg), batch_size)
        self.data = StepBatches(self.dm.train_source, self.dm.examples, sampler, self.batch_size, tp.train.seed)
        self.params = self.module.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.trainable = sum(p.numel() for p in self.params)

    def batch(self, b: int) -> dict:
        import torch

        out = self.data.batch(b)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def __call__(self, batch: dict) -> float:
        import torch

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.module.training_step(batch, 0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def sized_sampler(sampler, batch_size: int):
    """(sampler, batch) for about `batch_size` samples. A sampler that fixes the batch layout
    (identity groups: groups x faces + singles) gets one group of max(2, B/2) faces plus as many
    singles when it draws singles (a same-identity pair is the least a group holds, so B=1 -> 2)."""
    from training.data import IdentityGroupedSampler

    if not isinstance(sampler, IdentityGroupedSampler):
        return sampler, batch_size
    m = max(2, batch_size // 2 if sampler.s else batch_size)
    s = max(0, batch_size - m) if sampler.s else 0
    return IdentityGroupedSampler(1, m, s, min_unlabeled=sampler.min_unlabeled), m + s


def add_missing_members(samples: list[dict], members, widths: dict, seed: int = 0) -> None:
    """Give synthetic samples the `.npy` vector members a method needs that `synthetic_samples` lacks
    (those of later stages: `NAME.npy` of width `widths["NAME_dim"]`, the method's conditioner
    config), as unit float32 vectors, deterministic per sample. Other missing members: an error."""
    import numpy as np

    for m in members:
        if all(m in s for s in samples):
            continue
        stem, ext = m.rsplit(".", 1) if "." in m else (m, "")
        width = widths.get(f"{stem}_dim")
        if ext != "npy" or not isinstance(width, int):
            raise KeyError(f"the benchmark's synthetic samples lack {m!r} and cannot make it (a .npy vector member "
                           f"needs `{stem}_dim` in the method's conditioner config)")
        for i, s in enumerate(samples):
            if m not in s:
                v = np.random.default_rng([seed, i, len(stem)]).standard_normal(width).astype(np.float32)
                s[m] = v / np.linalg.norm(v)


def _synthetic_data(base):
    """The phase's data module on synthetic samples completed with the members the method needs."""

    class SyntheticData(base):
        widths: dict = {}

        def load_sources(self) -> None:
            super().load_sources()
            need = tuple(dict.fromkeys(tuple(self.phase.members) + tuple(self.method.needs)))
            for src in (self.train_source, self.val_source):
                add_missing_members(src.samples, need, self.widths, seed=self.cfg.seed)

    return SyntheticData


def quiet_lightning() -> None:
    """No "self.log without a Trainer" warnings from the bare module steps."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*trainer.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def gpu_benchmark_args(doc: str) -> argparse.Namespace:
    """The command line of a GPU benchmark: timed steps, warm-up steps, and a CPU dry run."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-on-cpu", action="store_true",
                    help="exercise the same code with the tiny preset at 64 px on CPU (no result file)")
    return ap.parse_args()
