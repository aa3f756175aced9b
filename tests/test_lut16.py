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


@pytest.mark.parametrize("n,num_blocks", [(32, 2), (96, 16), (50, 17), (320, 64), (64, 300), (130, 1), (200, 25), (70, 9), (129, 33), (192, 65), (1000, 16)])
def test_scan_equals_numpy_reference_exactly(rng, level, n, num_blocks):
    cap = min(63, 65535 // num_blocks)  # the bound the searcher keeps (lut16.h)
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


@pytest.mark.parametrize("nq", [1, 2, 3, 4])
@pytest.mark.parametrize("n,num_blocks", [(32, 2), (96, 16), (50, 17), (200, 25), (130, 1), (300, 50),
                                          (320, 64), (192, 65), (64, 300), (70, 9)])
def test_multi_query_scan_equals_one_query_at_a_time(rng, level, nq, n, num_blocks):
    # The kernel that scans a leaf for several queries (search_batch): each query's sums
    # and masks exactly as the one-query kernel's, whatever its neighbours' tables.
    cap = min(63, 65535 // num_blocks)
    codes = rng.integers(0, 16, size=(n, num_blocks), dtype=np.uint8)
    luts = rng.integers(0, cap + 1, size=(nq, num_blocks, 16)).astype(np.uint8)
    luts[0, 0, :] = cap
    packed = _mipscan.pack_codes(codes)
    refs = [lut[np.arange(num_blocks)[None, :], codes].sum(axis=1) for lut in luts]
    cuts = np.array([int(np.quantile(r, 0.3 + 0.15 * t)) for t, r in enumerate(refs)], np.uint16)
    sums, masks = _mipscan.scan_lut16_multi(packed, num_blocks, luts, cuts, level)
    for t in range(nq):
        one_sums, one_masks = _mipscan.scan_lut16(packed, num_blocks, luts[t], level, int(cuts[t]))
        np.testing.assert_array_equal(sums[t, :n], refs[t].astype(np.uint16))
        np.testing.assert_array_equal(sums[t], one_sums)
        np.testing.assert_array_equal(masks[t], one_masks)


def test_multi_query_scan_refuses_bad_shapes(rng, level):
    packed = _mipscan.pack_codes(rng.integers(0, 16, size=(64, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 to kMultiQueries"):
        _mipscan.scan_lut16_multi(packed, 8, np.zeros((5, 8, 16), np.uint8), np.zeros(5, np.uint16), level)
    with pytest.raises(ValueError, match="lut_cap"):
        _mipscan.scan_lut16_multi(packed, 8, np.full((2, 8, 16), 64, np.uint8), np.zeros(2, np.uint16), level)
    with pytest.raises(ValueError, match=r"\(nq, num_blocks, 16\)"):
        _mipscan.scan_lut16_multi(packed, 8, np.zeros((2, 8, 16), np.uint8), np.zeros(3, np.uint16), level)


def test_scan_refuses_lut_entries_above_the_cap(rng, level):
    codes = rng.integers(0, 16, size=(64, 8), dtype=np.uint8)
    lut = np.full((8, 16), 64, np.uint8)  # one past min(63, 65535 // 8)
    with pytest.raises(ValueError, match="lut_cap"):
        _mipscan.scan_lut16(_mipscan.pack_codes(codes), 8, lut, level, 0)


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


def _import_with_simd(value, disable=None):
    env = {**os.environ, "MIPSCAN_SIMD": value}
    env.pop("MIPSCAN_DISABLE_CPU_FEATURES", None)
    if disable is not None:
        env["MIPSCAN_DISABLE_CPU_FEATURES"] = disable
    code = "import mipscan; print(mipscan.simd_level(), ','.join(mipscan.simd_levels()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value", LEVELS)
def test_simd_env_override_is_honoured(value):
    out = _import_with_simd(value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == value


@pytest.mark.parametrize("value", ["bogus", "AVX2", "AVX512", "avx1", " scalar"])
def test_unknown_simd_env_value_makes_the_import_fail(value):
    out = _import_with_simd(value)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: MIPSCAN_SIMD=" + repr(value)), last
    assert "allowed values: scalar, avx2, avx512" in last, last


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_a_level_the_cpu_cannot_run_makes_the_import_fail(level):
    # MIPSCAN_DISABLE_CPU_FEATURES hides the level from detection, so this runs (and
    # asserts) on every machine, whatever it has.
    out = _import_with_simd(level, disable=level)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: MIPSCAN_SIMD=" + repr(level) + " cannot run here"), last
    assert "MIPSCAN_DISABLE_CPU_FEATURES hides" in last, last


@pytest.mark.parametrize("disable,expected", [
    ("avx512", ["scalar", "avx2"]),
    ("avx2", ["scalar"]),           # avx512 goes with avx2
    ("avx2,avx512", ["scalar"]),
    ("", None),                      # empty: nothing hidden
])
def test_disabled_cpu_features_hide_levels_from_detection(disable, expected):
    out = _import_with_simd("", disable=disable)
    assert out.returncode == 0, out.stderr
    best, levels = out.stdout.split()
    want = LEVELS if expected is None else [lv for lv in expected if lv in LEVELS]
    assert levels.split(",") == want
    assert best == want[-1]


@pytest.mark.parametrize("disable", ["sse", "AVX2", "avx2;avx512"])
def test_an_unknown_cpu_feature_makes_the_import_fail(disable):
    out = _import_with_simd("", disable=disable)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: MIPSCAN_DISABLE_CPU_FEATURES=" + repr(disable)), last
    assert "allowed: a comma separated list of avx2, avx512, gfni" in last, last


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f
                         if line.startswith("flags")), None)
    except OSError:
        return None


@pytest.mark.skipif("avx512" not in LEVELS, reason="this CPU has no AVX-512 level")
def test_avx512_scans_with_and_without_gfni_equal_the_scalar_kernels():
    """At the AVX-512 level the LUT16 scans split nibbles with GFNI where the CPU has it
    (detected as /proc/cpuinfo reports it), and without it otherwise (here: hidden by
    MIPSCAN_DISABLE_CPU_FEATURES=gfni, in a fresh process): both exactly the scalar
    kernels' sums and masks, one query and several."""
    flags = _cpuinfo_flags()
    if flags is not None:
        assert _mipscan.cpu_has_gfni() == ("gfni" in flags)
    code = """
import numpy as np
from mipscan import _mipscan
assert _mipscan.cpu_has_gfni() is {gfni}, _mipscan.cpu_has_gfni()
rng = np.random.default_rng(3)
for n, nb in [(64, 1), (130, 2), (200, 25), (300, 50), (50, 17), (320, 64), (70, 9), (192, 65)]:
    cap = min(63, 65535 // nb)
    codes = rng.integers(0, 16, size=(n, nb), dtype=np.uint8)
    packed = _mipscan.pack_codes(codes)
    luts = rng.integers(0, cap + 1, size=(4, nb, 16)).astype(np.uint8)
    cuts = rng.integers(0, 30 * nb, size=4).astype(np.uint16)
    for t in range(4):
        a = _mipscan.scan_lut16(packed, nb, luts[t], "avx512", int(cuts[t]))
        b = _mipscan.scan_lut16(packed, nb, luts[t], "scalar", int(cuts[t]))
        assert all((x == y).all() for x, y in zip(a, b)), (n, nb, t)
    for nq in (1, 3, 4):
        a = _mipscan.scan_lut16_multi(packed, nb, luts[:nq], cuts[:nq], "avx512")
        b = _mipscan.scan_lut16_multi(packed, nb, luts[:nq], cuts[:nq], "scalar")
        assert all((x == y).all() for x, y in zip(a, b)), (n, nb, nq)
print("ok")
"""
    runs = [("gfni", False)] + ([("", True)] if _mipscan.cpu_has_gfni() else [])
    for disable, gfni in runs:
        env = {**os.environ, "MIPSCAN_DISABLE_CPU_FEATURES": disable}
        env.pop("MIPSCAN_SIMD", None)
        out = subprocess.run([sys.executable, "-c", code.format(gfni=gfni)], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (disable, out.stderr[-2000:])


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


@pytest.mark.parametrize("d", [1, 7, 8, 9, 16, 20, 33, 50, 64])
def test_reorder_dot_rows_equal_the_dot_kernel_at_every_level(rng, d):
    # The float32 reorder scores its candidates several rows at a time (dot_rows): every
    # value must be the one-row kernel's (the scalar spec), bit for bit, signed zeros too.
    rows = rng.normal(size=(37, d)).astype(np.float32)
    rows[3] = 0.0
    rows[5] = -0.0
    q = rng.normal(size=d).astype(np.float32)
    ids = rng.integers(0, 37, size=23).astype(np.uint32)
    ids[:3] = [3, 5, 3]
    ref = _mipscan.dots(q[None, :], rows, "scalar")[0][ids]
    for lv in LEVELS:
        for m in (0, 1, 3, 4, 5, 23):
            got = _mipscan.dot_rows(q, rows, ids[:m], lv)
            np.testing.assert_array_equal(got.view(np.uint32), ref[:m].view(np.uint32))
    neg = -np.abs(q)  # lanes that sum to -0.0: q < 0 times rows of +0.0
    zero_rows = np.zeros((2, d), np.float32)
    for lv in LEVELS:
        np.testing.assert_array_equal(
            _mipscan.dot_rows(neg, zero_rows, np.array([0, 1, 0, 1, 0], np.uint32), lv).view(np.uint32),
            _mipscan.dots(neg[None, :], zero_rows, "scalar")[0][[0, 1, 0, 1, 0]].view(np.uint32))


@pytest.mark.parametrize("build", ["ah", "ah_reorder", "soar", "tiny_leaves", "ah1", "upper", "axes",
                                   "bf16_centroids"])
def test_batched_searches_equal_one_query_at_a_time(rng, level, build):
    # search_batch scans the leaves of a chunk's queries together, leaf by leaf and in an
    # order of its own (search_chunk), scores their centroids in one pass and reuses
    # scratch between them; every result must be the one a single-query search gives,
    # ties (duplicate rows), widening (leaves that run short), SOAR, one dimension per
    # code, an upper tree and the leaf axes order included.
    db = rng.normal(size=(4000, 24)).astype(np.float32)
    db[1000:1100] = db[:100]  # exact duplicates: tied approximate scores
    db[2000:2050] = db[:50]
    q = rng.normal(size=(37, 24)).astype(np.float32)
    q[20:30] = q[:10] + 1e-3  # neighbouring queries share leaves
    if build == "tiny_leaves":  # few points per leaf: the searched leaves run short (widening)
        b = mipscan.builder(db, 10, "dot_product").tree(100, 2).score_ah(2).reorder(60)
    else:
        extra = {"soar": {"soar_lambda": 1.0}, "axes": {"leaf_axes": 4, "spread_weight": 3.0},
                 "bf16_centroids": {"quantize_centroids": mipscan.ReorderType.BFLOAT16}}.get(build, {})
        b = mipscan.builder(db, 10, "dot_product").tree(40, 8, **extra).score_ah(1 if build == "ah1" else 2)
        if build == "upper":
            b = b.upper_tree(6, 2)
        if build != "ah":
            b = b.reorder(60)
    searcher = b.build()
    ix = searcher._index
    assert searcher.num_leaves >= 20
    for leaves, pre_k in ((1, 20), (1, 300), (2, 300), (8, 60), (40, 200)):
        leaves = min(leaves, searcher.num_leaves)
        one = [ix.search_batch(q[i:i + 1], None, leaves, pre_k, 10, 1, level=level) for i in range(len(q))]
        for threads in (1, 2):
            ids, scores = ix.search_batch(q, None, leaves, pre_k, 10, threads, level=level)
            np.testing.assert_array_equal(ids, np.concatenate([o[0] for o in one]))
            np.testing.assert_array_equal(scores, np.concatenate([o[1] for o in one]))
