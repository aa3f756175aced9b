"""The C++ training kernels against plain numpy references, value for value."""

import numpy as np
import pytest

from mipscan import _mipscan


def lloyd_reference(data, init, iterations):
    """Codebook k-means as the core specifies it: float32 squared distances (e0^2 + e1^2 +
    ..., in dimension order), the first nearest codeword, float64 sums in point order, an
    empty codeword reseeded from a fixed spread-out row, stop when nothing changes."""
    m = len(data)
    nb, _, dpb = init.shape
    books = init.copy()
    for b in range(nb):
        x = data[:, b * dpb:(b + 1) * dpb]
        book = books[b]
        for it in range(iterations):
            d2 = np.zeros((m, 16), np.float32)
            for j in range(dpb):
                e = x[:, j:j + 1] - book[None, :, j]
                d2 += e * e
            arg = np.argmin(d2, axis=1)
            sums = np.zeros((16, dpb))
            np.add.at(sums, arg, x.astype(np.float64))
            counts = np.bincount(arg, minlength=16)
            new = book.copy()
            for c in range(16):
                if counts[c] > 0:
                    new[c] = (sums[c] / counts[c]).astype(np.float32)
                else:
                    new[c] = data[(c * 7919 + it * 104729 + b) % m, b * dpb:(b + 1) * dpb]
            changed = not np.array_equal(new, book)
            book[:] = new
            if not changed:
                break
    return books


@pytest.mark.parametrize("dpb", [1, 2, 3, 4])
def test_block_codebooks_match_the_reference(rng, dpb):
    # dpb 2 runs the SSE2 assignment on x86-64, the others the portable loop: both must
    # give the reference's codewords exactly (the index must not depend on the CPU).
    nb = 5
    data = rng.normal(size=(3000, nb * dpb)).astype(np.float32)
    data[:50] = data[50:100]  # duplicate rows: exact distance ties
    init = np.ascontiguousarray(data[:16].reshape(16, nb, dpb).transpose(1, 0, 2))
    init[0, 3] = init[0, 2]  # duplicate codewords: ties between codewords, then an empty one
    for threads in (1, 2):
        got = _mipscan.train_block_codebooks(data, init, 6, threads)
        np.testing.assert_array_equal(got, lloyd_reference(data, init, 6))


def test_cluster_sums_match_numpy(rng):
    x = rng.normal(size=(1000, 7)).astype(np.float32)
    labels = rng.integers(0, 13, 1000)
    sums, counts = _mipscan.cluster_sums(x, labels, 13)
    ref = np.zeros((13, 7))
    np.add.at(ref, labels, x.astype(np.float64))
    np.testing.assert_allclose(sums, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=13))
