"""Helpers shared by the benchmark scripts: machine description and result files."""
from __future__ import annotations

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
                    f"on {os.cpu_count()} cores (other jobs shared the machine: compare ratios from one run)"}
    payload = {"benchmark": name, "machine": machine(), "load_average": load, **result}
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
        from training import methods
        from training.adapter import PersonaAdapter
        from training.config import train_params
        from training.data import PersonaDataModule
        from training.module import PersonaModule

        self.device = torch.device(device)
        self.precision = precision
        tp = train_params({"train": {"resolution": resolution, "synthetic": synthetic, "num_workers": 0,
                                     "base_model": {"preset": preset}}})
        self.method = methods.get(method)
        self.phase = self.method.phases[phase]
        pcfg = dataclasses.replace(tp.phase(method, phase), batch_size=batch_size,
                                   gradient_checkpointing=checkpointing, accumulate=1)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        comps = build_random(preset, device=self.device, dtype=dtype).freeze()
        mcfg = tp.method(method)
        torch.manual_seed(0)
        cond = self.method.conditioner(**self.method.conditioner_config(mcfg, comps))
        inj = self.method.injection(**self.method.injection_config(mcfg, comps))
        adapter = PersonaAdapter(self.method.name, cond, inj, phase=phase).install(comps, dtype=torch.float32)
        self.module = PersonaModule(self.method, self.phase, pcfg, 0, comps, adapter).to(self.device)
        self.module.train()
        self.dm = PersonaDataModule(self.method, self.phase, tp.train, pcfg)
        self.data = self.dm.dataset()
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


def quiet_lightning() -> None:
    """No "self.log without a Trainer" warnings from the bare module steps."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*trainer.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
