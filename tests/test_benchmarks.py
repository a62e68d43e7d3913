"""The benchmark harnesses that must work on machines this suite never sees: the GPU memory grid runs
every registered training method's phases (checked here on CPU with the tiny preset)."""
from __future__ import annotations


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
