"""The LUT16 kernels against a numpy reference, bit for bit, at every SIMD level.

The levels come from the module (``_mipscan.simd_levels()``: what this CPU and build can
run), so a new level is tested without editing this file. Levels are reached per call
(``scan_lut16(..., level)``, ``dots(..., level)``, ``Index.search_batch(..., level=...)``):
the module's own level is fixed at import (MIPSCAN_SIMD) and nothing here changes it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import mipscan
from mipscan import _mipscan

LEVELS = _mipscan.simd_levels()


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


def test_levels_are_listed_lowest_first_and_include_the_loaded_one():
    assert LEVELS[0] == "scalar"
    assert mipscan.simd_level() in LEVELS
    assert not hasattr(_mipscan, "set_simd_level")  # the level is fixed at load


@pytest.mark.parametrize("stages", ["ah", "ah_reorder", "bf"])
def test_levels_agree_on_whole_searches(rng, level, stages):
    db = rng.normal(size=(3000, 20)).astype(np.float32)
    q = rng.normal(size=(50, 20)).astype(np.float32)
    b = mipscan.builder(db, 10, "dot_product").tree(20, 5)
    b = {"ah": lambda: b.score_ah(2), "ah_reorder": lambda: b.score_ah(2).reorder(40),
         "bf": lambda: b.score_brute_force()}[stages]()
    s = b.build()
    ix = s._index
    for threads in (1, 2):
        ref = ix.search_batch(q, None, 5, 40, 10, threads, level="scalar")
        got = ix.search_batch(q, None, 5, 40, 10, threads, level=level)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    # None (the default) is the level fixed at load
    loaded = ix.search_batch(q, None, 5, 40, 10, 1)
    np.testing.assert_array_equal(loaded[0], ref[0])
    np.testing.assert_array_equal(loaded[1], ref[1])


def test_search_batch_rejects_an_unknown_level(rng):
    db = rng.normal(size=(200, 8)).astype(np.float32)
    s = mipscan.builder(db, 5, "dot_product").tree(4, 2).score_ah(2).build()
    with pytest.raises(ValueError, match="level must be one of 'scalar', 'avx2', 'avx512'; got 'bogus'"):
        s._index.search_batch(db[:2], None, 2, 5, 5, 1, level="bogus")


def _import_with_simd(value):
    env = {**os.environ, "MIPSCAN_SIMD": value}
    return subprocess.run([sys.executable, "-c", "import mipscan; print(mipscan.simd_level())"],
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value", LEVELS)
def test_simd_env_override_is_honoured(value):
    out = _import_with_simd(value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == value


@pytest.mark.parametrize("value", ["bogus", "AVX2", "avx-512", " scalar"])
def test_unknown_simd_env_value_makes_the_import_fail(value):
    out = _import_with_simd(value)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: MIPSCAN_SIMD=" + repr(value)), last
    assert "allowed values: scalar, avx2, avx512" in last, last


def test_a_level_the_cpu_cannot_run_makes_the_import_fail():
    missing = [lv for lv in ("scalar", "avx2", "avx512") if lv not in LEVELS]
    if not missing:
        pytest.skip("this CPU and build run every level")
    out = _import_with_simd(missing[0])
    assert out.returncode != 0
    assert "cannot run here" in out.stderr and "MIPSCAN_SIMD" in out.stderr, out.stderr


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
