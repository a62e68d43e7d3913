"""Near-duplicate search over 64-bit perceptual hashes by multi-index hashing (sub-quadratic).

Pigeonhole: split the 64 bits into `m` disjoint blocks. Two hashes within Hamming distance `t`
differ in at most `t` blocks, so at least `m - t` blocks are equal. For every choice of
`k = m - t` blocks we bucket the hashes by those blocks (an exact-match key of about 64k/m bits,
found by sorting) and verify only the pairs inside a bucket. Every pair with distance <= t is found
(recall 1 by construction); the expected candidate count for well-spread hashes is
C(m, k) * N^2 / 2^(64k/m), i.e. near-linear for the key widths chosen below.
"""
from __future__ import annotations

import itertools
from math import comb

import numpy as np

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bit count of each uint64 (vectorised via a byte lookup table)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _POPCOUNT8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.int64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return popcount64(np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64)))


def _block_masks(m: int) -> list[np.uint64]:
    sizes = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    masks, start = [], 0
    for s in sizes:
        masks.append(np.uint64(((1 << s) - 1) << start))
        start += s
    return masks


def choose_blocks(threshold: int, n: int) -> tuple[int, int]:
    """Pick (m blocks, k equal blocks needed) minimising estimated work for n hashes."""
    best = None
    for k in range(1, 6):
        m = threshold + k
        if m > 64:
            break
        bits = 64 * k / m
        # measured: sorting one element costs about as much as verifying one candidate pair
        cost = comb(m, k) * (n + n * n / 2 ** (bits + 1))
        if best is None or cost < best[0]:
            best = (cost, m, k)
    assert best is not None
    return best[1], best[2]


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs (i < j) with Hamming(h_i, h_j) <= threshold, and their distances.

    `hashes`: (N,) uint64. Returns (i, j, d), sorted by (i, j), each pair once.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))
    if n < 2:
        return empty
    m, k = choose_blocks(threshold, n)
    masks = _block_masks(m)
    found_i, found_j = [], []
    for combo in itertools.combinations(range(m), k):
        mask = np.uint64(0)
        for c in combo:
            mask |= masks[c]
        keys = h & mask
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        # runs of equal keys
        boundaries = np.flatnonzero(np.diff(sk) != 0) + 1
        starts = np.concatenate(([0], boundaries))
        ends = np.concatenate((boundaries, [n]))
        sizes = ends - starts
        multi = sizes > 1
        if not multi.any():
            continue
        starts, sizes = starts[multi], sizes[multi]
        # all pairs within each run, vectorised: for run offset a < b
        ii, jj = _pairs_in_runs(starts, sizes)
        a, b = order[ii], order[jj]
        d = hamming(h[a], h[b])
        keep = d <= threshold
        a, b = a[keep], b[keep]
        found_i.append(np.minimum(a, b))
        found_j.append(np.maximum(a, b))
    if not found_i:
        return empty
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    pair = np.unique(i.astype(np.int64) * n + j.astype(np.int64))
    i, j = pair // n, pair % n
    return i, j, hamming(h[i], h[j])


def _pairs_in_runs(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (p, q), p < q, of every pair inside each run [start, start+size)."""
    run_end = np.repeat(starts + sizes, sizes)
    pos = np.concatenate([np.arange(s, s + z) for s, z in zip(starts, sizes)]) if len(starts) < 64 else (
        np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
    )
    ps, qs = [], []
    d = 1
    while len(pos):
        room = pos + d < run_end
        pos, run_end = pos[room], run_end[room]
        if not len(pos):
            break
        ps.append(pos)
        qs.append(pos + d)
        d += 1
    if not ps:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(ps), np.concatenate(qs)


def clusters_from_pairs(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label (0..n-1 space) of each of n items given undirected pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return labels


def brute_force_pairs(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Reference O(N^2) search, for tests and benchmarks on small subsets."""
    h = np.asarray(hashes, dtype=np.uint64)
    out = set()
    for a in range(len(h)):
        d = hamming(np.full(len(h) - a - 1, h[a], dtype=np.uint64), h[a + 1 :])
        for off in np.flatnonzero(d <= threshold):
            out.add((a, a + 1 + int(off)))
    return out
