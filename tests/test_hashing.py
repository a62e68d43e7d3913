import numpy as np
import pytest

from pipeline.hashing import brute_force_pairs, choose_blocks, clusters_from_pairs, near_duplicate_pairs, popcount64


def test_popcount():
    x = np.array([0, 1, 3, 2**63, 2**64 - 1], dtype=np.uint64)
    assert popcount64(x).tolist() == [0, 1, 2, 1, 64]


@pytest.mark.parametrize("threshold", [0, 3, 6, 10])
def test_multi_index_equals_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    n = 2000
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    for k in range(0, n - 1, 7):  # planted near copies at every distance up to threshold + 2
        x = int(h[k])
        for b in rng.choice(64, size=int(rng.integers(0, threshold + 3)), replace=False):
            x ^= 1 << int(b)
        h[k + 1] = np.uint64(x)
    h[10:14] = h[9]  # a run of identical hashes
    i, j, d = near_duplicate_pairs(h, threshold)
    got = set(zip(i.tolist(), j.tolist()))
    assert got == brute_force_pairs(h, threshold)
    assert (d <= threshold).all() and (i < j).all()


def test_block_choice_is_pigeonhole_valid():
    for t in range(0, 16):
        m, k = choose_blocks(t, 10**6)
        assert m - k == t and 1 <= k <= m <= 64


def test_clusters_transitive():
    labels = clusters_from_pairs(5, np.array([0, 1]), np.array([1, 2]))
    assert labels[0] == labels[1] == labels[2] != labels[3] != labels[4]
