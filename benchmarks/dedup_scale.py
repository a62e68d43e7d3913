"""Dedup at scale: 1,000,000 synthetic 64-bit hashes with planted near duplicates.

Measures the multi-index search of `pipeline.hashing` (what the dedup stage runs) and checks its
recall: every planted pair must be found, and on a 20,000-hash subset the pairs must equal a
brute-force O(N^2) search. Target: under 60 s on 2 cores, recall 100% at the threshold.

    python -m benchmarks.dedup_scale [--n 1000000] [--threshold 6]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import table, write_result
from pipeline.hashing import brute_force_pairs, choose_blocks, near_duplicate_pairs


def planted_hashes(n: int, n_planted: int, threshold: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n uniform 64-bit hashes; the last n_planted are copies of earlier ones with 0..threshold bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    src = rng.choice(n - n_planted, size=n_planted, replace=False)
    planted = set()
    for k, s in enumerate(src):
        dst = n - n_planted + k
        x = int(h[s])
        for b in rng.choice(64, size=int(rng.integers(0, threshold + 1)), replace=False):
            x ^= 1 << int(b)
        h[dst] = np.uint64(x)
        planted.add((int(min(s, dst)), int(max(s, dst))))
    return h, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--planted", type=int, default=10_000)
    ap.add_argument("--threshold", type=int, default=6)
    ap.add_argument("--subset", type=int, default=20_000)
    args = ap.parse_args()

    h, planted = planted_hashes(args.n, args.planted, args.threshold)
    t0, c0 = time.perf_counter(), time.process_time()
    i, j, d = near_duplicate_pairs(h, args.threshold)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    found = set(zip(i.tolist(), j.tolist()))
    recall = len(planted & found) / len(planted)

    sub, sub_planted = planted_hashes(args.subset, args.subset // 100, args.threshold, seed=1)
    t0 = time.perf_counter()
    bf = brute_force_pairs(sub, args.threshold)
    bf_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    si, sj, _ = near_duplicate_pairs(sub, args.threshold)
    mi_seconds = time.perf_counter() - t0
    subset_equal = set(zip(si.tolist(), sj.tolist())) == bf

    m, k = choose_blocks(args.threshold, args.n)
    result = {
        "n": args.n,
        "threshold": args.threshold,
        "blocks": {"m": m, "k_equal": k},
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "pairs_found": len(found),
        "planted_pairs": len(planted),
        "recall_planted": recall,
        "subset": {
            "n": args.subset,
            "brute_force_seconds": round(bf_seconds, 2),
            "multi_index_seconds": round(mi_seconds, 3),
            "pairs_equal_to_brute_force": subset_equal,
            "brute_force_extrapolated_to_n_seconds": round(bf_seconds * (args.n / args.subset) ** 2, 0),
        },
        "targets": {"seconds_lt_60": seconds < 60, "recall_100": recall == 1.0 and subset_equal},
    }
    if seconds >= 60:
        result["missed"] = {"seconds_lt_60": (
            f"{seconds:.1f} s wall for {cpu:.1f} CPU-s: the search runs on one core, so with other jobs on the machine "
            f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) the wall time is the CPU time stretched "
            "by the share it got; on a free core it is about the CPU time. What would fix it: a quiet machine for the "
            "wall time; to cut the CPU, fewer candidate "
            "pairs per block (more blocks at 1M hashes) or a compiled pair check")}
    path = write_result("dedup_scale", result)
    print(table(
        [
            (f"multi-index, {args.n:,} hashes", f"{seconds:.1f}s", f"{recall:.2%}"),
            (f"brute force, {args.subset:,} hashes", f"{bf_seconds:.1f}s", "reference"),
            (f"multi-index, {args.subset:,} hashes", f"{mi_seconds:.2f}s", "equal" if subset_equal else "DIFFERENT"),
        ],
        ("search", "time", "recall"),
    ))
    print(f"targets: {result['targets']}  -> {path}")


if __name__ == "__main__":
    main()
