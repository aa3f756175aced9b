"""The C++ training kernels against plain numpy references, value for value."""

import math

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


def anisotropic_reference(residuals, rows, books, threshold, d_eff, max_iterations):
    """encode_anisotropic_rows as specified, in float32 scalar steps: nearest codewords
    first, then coordinate descent on |e|^2 + (eta - 1) <e, x_hat>^2 over blocks, eta that
    of a unit-norm row for every nonzero row."""
    f32 = np.float32
    n, dp = residuals.shape
    nb, _, dpb = books.shape
    codes = np.zeros((n, nb), np.uint8)
    for i in range(n):
        r, x = residuals[i], rows[i]
        norm2 = 0.0
        for v in x:
            norm2 += float(v) * float(v)
        norm = math.sqrt(norm2)
        eta = 1.0
        if threshold > 0 and norm > 0 and d_eff > 1:
            t = min(float(f32(threshold)), 0.5)
            eta = max(1.0, (d_eff - 1) * t * t / (1.0 - t * t))
        w = f32(eta - 1.0)
        direc = (x.astype(np.float64) / norm).astype(np.float32) if norm > 0 else np.zeros(dp, f32)
        sq = np.zeros((nb, 16), f32)
        par = np.zeros((nb, 16), f32)
        for j in range(dpb):
            e = r.reshape(nb, 1, dpb)[:, :, j] - books[:, :, j]
            sq += e * e
            par += e * direc.reshape(nb, 1, dpb)[:, :, j]
        code = np.argmin(sq, axis=1)
        if w != 0:
            total = f32(0)
            for b in range(nb):
                total = f32(total + par[b, code[b]])
            for _ in range(max_iterations):
                changed = False
                for b in range(nb):
                    rest = f32(total - par[b, code[b]])
                    p = (rest + par[b]).astype(f32)
                    loss = (sq[b] + (w * p) * p).astype(f32)
                    arg = int(np.argmin(loss))
                    changed |= arg != code[b]
                    code[b] = arg
                    total = f32(rest + par[b, arg])
                if not changed:
                    break
        codes[i] = code
    return codes


@pytest.mark.parametrize("level", _mipscan.simd_levels())
@pytest.mark.parametrize("dpb", [1, 2, 3])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 5.0])
def test_encoding_gathered_rows_matches_the_reference(rng, level, dpb, threshold):
    # encode_anisotropic_rows gathers each slot's row and leaf itself (the build's and the
    # live index's encoder): its codes are the reference's on those residuals, with every
    # nonzero row weighted as a unit row, at every level, in any row order, and for batch
    # remainders (23 slots: batches of four and three left over) and zero rows.
    nb, width = 5, 5 * dpb - (1 if dpb > 1 else 0)  # (a padded last block when dpb > 1)
    rows = rng.normal(size=(40, width)).astype(np.float32)
    rows[:6] *= 0.01
    rows[7] = 0
    centroids = rng.normal(size=(3, width)).astype(np.float32) * 0.3
    ids = rng.permutation(40)[:23].astype(np.int64)
    leaves = rng.integers(0, 3, 23).astype(np.int64)
    books = rng.normal(size=(nb, 16, dpb)).astype(np.float32) * 0.5
    books[:, 5] = books[:, 4]  # tied codewords
    got = _mipscan.encode_anisotropic_rows(rows, ids, leaves, centroids, books, threshold, 10, 2,
                                           level)
    pad = lambda a: np.pad(a, ((0, 0), (0, nb * dpb - width)))
    want = anisotropic_reference(pad(rows[ids] - centroids[leaves]), pad(rows[ids]), books,
                                 threshold, width, 10)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="row id is out of range"):
        _mipscan.encode_anisotropic_rows(rows, np.array([40]), np.array([0]), centroids, books,
                                         threshold, 10, 1)
    with pytest.raises(ValueError, match="leaf is out of range"):
        _mipscan.encode_anisotropic_rows(rows, np.array([0]), np.array([-1]), centroids, books,
                                         threshold, 10, 1)


@pytest.mark.parametrize("dpb", [1, 2, 4])
def test_codebook_training_is_the_same_at_every_level(rng, dpb):
    # The AVX-512 assignment step (two dimensions per block) must pick the codewords the
    # SSE2 / portable loops pick: the trained codebooks equal bit for bit.
    data = rng.normal(size=(3000, 6 * dpb)).astype(np.float32)
    data[:40] = data[40:80]  # repeated rows: tied distances
    init = np.ascontiguousarray(data[rng.choice(3000, 16)].reshape(16, 6, dpb).transpose(1, 0, 2))
    books = {level: _mipscan.train_block_codebooks(data, init, 8, 2, level)
             for level in _mipscan.simd_levels()}
    for level, b in books.items():
        np.testing.assert_array_equal(b, books["scalar"], err_msg=level)


@pytest.mark.parametrize("level", _mipscan.simd_levels())
def test_fused_assignment_step_equals_numpy_argmax(level):
    # assign_nearest's argmax(s - h) in one pass must give numpy's labels exactly: float32
    # subtraction, the first maximum on ties, the first NaN, all -inf -> 0.
    rng = np.random.default_rng(7)
    for trial in range(120):
        m, k = int(rng.integers(1, 40)), int(rng.integers(1, 70))
        s = rng.normal(size=(m, k)).astype(np.float32)
        h = rng.normal(size=k).astype(np.float32)
        if trial % 3 == 0:
            s, h = np.round(s), np.round(h)  # ties
        if trial % 5 == 0:
            s[rng.random(s.shape) < 0.05] = np.nan
        if trial % 7 == 0:
            s[rng.random(s.shape) < 0.4] = -np.inf
        if trial % 11 == 0:
            s[:] = -np.inf
        if trial % 13 == 0:
            s[rng.random(s.shape) < 0.3] = np.inf
            h[rng.random(k) < 0.2] = np.inf
        with np.errstate(invalid="ignore"):
            ref = np.argmax(s - h, axis=1)
        np.testing.assert_array_equal(_mipscan.argmax_shifted(s, h, level), ref)


def test_nearest_centroids_at_every_level():
    # The tree's assignment (_core/assign.h), every tail of rows (blocks of four) and of
    # centroids (registers of 8 and 16), 1 or 2 threads:
    # - the portable level sums each score in float32 in dimension order, acc + x[k] * c[k]
    #   (no fused multiply-add), less |c|^2 / 2, and takes the first maximum: exactly a
    #   numpy loop of float32 multiply-adds;
    # - the AVX2 and AVX-512 levels fuse each step: the same labels as each other, bit for
    #   bit, and the float64 argmax wherever the best two scores are apart by more than
    #   float32 rounding could move them;
    # - tied centroids (the same vector twice) give the first at every level.
    rng = np.random.default_rng(11)
    fused = [lv for lv in _mipscan.simd_levels() if lv != "scalar"]
    compared = []
    for L in (1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 47, 100):
        for n in (1, 3, 4, 9, 301):
            d = int(rng.integers(1, 40))
            x = rng.normal(size=(n, d)).astype(np.float32)
            c = rng.normal(size=(L, d)).astype(np.float32)
            if L > 3:
                c[3] = c[1]
                x[0] = c[1]  # row 0 is centroid 1 (and 3): the first, 1, wins
            h = (np.float32(0.5) * np.einsum("ij,ij->i", c, c)).astype(np.float32)
            ct = np.ascontiguousarray(c.T)
            s = np.zeros((n, L), np.float32)
            for k in range(d):
                s = s + x[:, k:k + 1] * c[:, k]
            exact = x.astype(np.float64) @ c.T.astype(np.float64) - h
            top2 = -np.sort(-exact, axis=1)[:, :2] if L > 1 else np.zeros((n, 2))
            clear = (top2[:, 0] - top2[:, 1] > 1e-4 * (1 + np.abs(top2[:, 0]))) if L > 1 else np.ones(n, bool)
            for threads in (1, 2):
                got = _mipscan.nearest_centroids(x, ct, h, threads, "scalar")
                np.testing.assert_array_equal(got, np.argmax(s - h, axis=1), err_msg=f"L={L} n={n}")
                labels = {lv: _mipscan.nearest_centroids(x, ct, h, threads, lv) for lv in fused}
                for lv, lab in labels.items():
                    np.testing.assert_array_equal(lab, labels[fused[0]], err_msg=lv)
                    np.testing.assert_array_equal(lab[clear], np.argmax(exact, axis=1)[clear],
                                                  err_msg=f"{lv} L={L} n={n}")
                    if L > 3:
                        assert lab[0] == 1, (lv, L, n)
            compared.append(clear)
    assert np.concatenate(compared).mean() > 0.9  # the float64 check covers most rows
    with pytest.raises(ValueError, match="centroids_t must be"):
        _mipscan.nearest_centroids(x, np.ascontiguousarray(c), h, 1)


@pytest.mark.parametrize("level", _mipscan.simd_levels())
def test_nearest_centroids_answers_numpy_for_nan_and_infinite_scores(level):
    # Scores that overflow or are NaN (unreachable through the builder's input checks, but
    # the kernel is also a binding): the first NaN, else the first maximum, as numpy's
    # argmax of the same scores; an all -inf row answers 0.
    x = np.array([[1.0, 1.0], [np.nan, 0.0], [np.inf, 0.0], [-np.inf, 0.0]], np.float32)
    for L in (3, 9, 20, 40):
        c = np.ones((L, 2), np.float32)
        c[L // 2] = [2.0, 0.0]
        h = np.zeros(L, np.float32)
        got = _mipscan.nearest_centroids(x, np.ascontiguousarray(c.T), h, 1, level)
        with np.errstate(invalid="ignore"):
            want = np.argmax(x @ c.T - h, axis=1)
        np.testing.assert_array_equal(got, want, err_msg=f"L={L}")
