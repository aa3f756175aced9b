"""The LUT16 kernels against a numpy reference, bit for bit, at every SIMD level."""

import numpy as np
import pytest

import mipscan
from mipscan import _mipscan

LEVELS = ["scalar"] + (["avx2"] if _mipscan.cpu_has_avx2() else [])


@pytest.fixture(params=LEVELS)
def level(request):
    return request.param


@pytest.mark.parametrize("n,num_blocks", [(1, 1), (31, 3), (32, 16), (100, 17), (257, 64), (64, 300)])
def test_pack_unpack_is_identity(rng, n, num_blocks):
    codes = rng.integers(0, 16, size=(n, num_blocks), dtype=np.uint8)
    packed = _mipscan.pack_codes(codes)
    assert packed.shape == (((n + 63) // 64) * num_blocks * 32,)
    np.testing.assert_array_equal(_mipscan.unpack_codes(packed, n, num_blocks), codes)


@pytest.mark.parametrize("n,num_blocks", [(32, 2), (96, 16), (50, 17), (320, 64), (64, 300), (130, 1), (200, 25), (70, 9)])
def test_scan_equals_numpy_reference_exactly(rng, level, n, num_blocks):
    cap = min(127, 65535 // num_blocks)  # the bound the searcher keeps (lut16.h)
    codes = rng.integers(0, 16, size=(n, num_blocks), dtype=np.uint8)
    lut = rng.integers(0, cap + 1, size=(num_blocks, 16)).astype(np.uint8)
    lut[0, :] = cap  # hit the bound on purpose
    packed = _mipscan.pack_codes(codes)
    ref = lut[np.arange(num_blocks)[None, :], codes].sum(axis=1)
    assert ref.max() <= 65535
    cut = int(np.median(ref))
    sums, masks = _mipscan.scan_lut16(packed, num_blocks, lut, level, cut)
    np.testing.assert_array_equal(sums[:n], ref.astype(np.uint16))
    bits = np.unpackbits(masks.view(np.uint8), bitorder="little")[:len(sums)]
    np.testing.assert_array_equal(bits.astype(bool), sums >= cut)


def test_levels_agree_on_whole_searches(rng):
    if len(LEVELS) < 2:
        pytest.skip("this CPU has only the scalar kernel")
    db = rng.normal(size=(3000, 20)).astype(np.float32)
    q = rng.normal(size=(50, 20)).astype(np.float32)
    s = mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).build()
    before = mipscan.simd_level()
    try:
        results = {}
        for lv in LEVELS:
            assert _mipscan.set_simd_level(lv)
            assert mipscan.simd_level() == lv
            results[lv] = s.search_batched(q)
    finally:
        _mipscan.set_simd_level(before)
    np.testing.assert_array_equal(results["scalar"].indices, results["avx2"].indices)
    np.testing.assert_array_equal(results["scalar"].distances, results["avx2"].distances)


def test_simd_env_override_is_honoured():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import mipscan; print(mipscan.simd_level())"],
                         env={**__import__("os").environ, "MIPSCAN_SIMD": "scalar"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


@pytest.mark.parametrize("d", [1, 7, 8, 9, 16, 20, 33, 50, 64])
def test_centroid_dots_are_identical_across_levels_and_batch_sizes(rng, d):
    # Batched searches score a chunk of queries against the centroids in one pass; every
    # value must equal the one-query kernel's, at every level, or results would depend on
    # how the queries were chunked.
    rows = rng.normal(size=(13, d)).astype(np.float32)
    qs = rng.normal(size=(9, d)).astype(np.float32)
    ref = np.stack([_mipscan.dots(q[None, :], rows, "scalar")[0] for q in qs])
    np.testing.assert_allclose(ref, qs.astype(np.float64) @ rows.T.astype(np.float64),
                               rtol=1e-4, atol=1e-4)
    for lv in LEVELS:
        for nq in (1, 4, 5, 9):
            np.testing.assert_array_equal(_mipscan.dots(qs[:nq], rows, lv), ref[:nq])
