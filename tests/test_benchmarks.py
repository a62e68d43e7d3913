"""The benchmark harnesses that must work on machines this suite never sees: the GPU memory grid runs
every registered training method's phases (checked here on CPU with the tiny preset). The committed
results (`make bench`) explain every target they miss."""
from __future__ import annotations

import json


def test_gpu_memory_grid_covers_every_registered_method_phase():
    import torch

    from benchmarks.common import method_phases
    from benchmarks.gpu_memory import cells

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = cells("tiny", "cpu", 64, batches=(1,), precisions=("fp32",), checkpointing=(False, True), steps=1, warmup=0)
    finally:
        torch.set_num_threads(threads)
    phases = method_phases()
    assert ("wplus", "stage1") in phases and ("wplus", "stage2") in phases
    assert {(c["method"], c["phase"]) for c in grid} == set(phases)
    assert len(grid) == 2 * len(phases)
    assert all(c["step_seconds"] > 0 and c["trainable_parameters"] > 0 and not c.get("oom") for c in grid)


def test_every_missed_target_in_the_committed_results_says_why_and_what_would_fix_it():
    from benchmarks.common import RESULTS

    files = sorted(RESULTS.glob("*.json"))
    assert {p.stem for p in files} >= {"run_all", "store_scale", "incremental", "stage_throughput", "loader", "scaling",
                                       "dedup_scale", "gpu_memory"}
    for p in files:
        r = json.loads(p.read_text())
        missed = r.get("missed") or {}
        if isinstance(missed, str):  # one target, one reason
            missed = {t: missed for t in r.get("targets", {})}
        for target, met in r.get("targets", {}).items():
            if met:
                continue
            why = [text for key, text in missed.items() if target.startswith(key)]
            assert why, f"{p.name}: target '{target}' is missed without a reason under 'missed'"
            assert "What would fix it" in why[0], f"{p.name}: the reason for '{target}' does not say what would fix it"
