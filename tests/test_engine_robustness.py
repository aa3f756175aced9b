"""The C++ core under garbage floats and odd shapes: memory-safe and well-formed.

The Python layer validates what users pass, but the core cannot rely on it: another thread
may write NaN into a query after validation, and a loaded folder may hold NaN or inf.
These tests write NaN, +-inf and +-3e38 straight into the very buffers the core reads
(``searcher._arrays``, the arrays the C++ view points at) and into queries and
precomputed leaf scores that bypass validation, then search through every path and SIMD
level. Results may be meaningless, but each must be well-formed: k distinct ids in
[0, n) per query, no NaN score, no crash (run under tools/sanitize.sh for ASan/UBSan).

Also here: AH indexes with more blocks than the quantized scan allows (issue 12, defect
2), and the index-owned scratch's bounds.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

import mipscan
from mipscan import _mipscan

LEVELS = _mipscan.simd_levels()
VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 3e38, "-huge": -3e38}
PATTERNS = ("all", "one", "some")


def well_formed(ids, scores, n, k, *, scores_checked=True):
    ids = np.asarray(ids)
    assert ids.ndim == 2 and ids.shape[1] == k, ids.shape
    assert ids.dtype == np.uint32
    assert (ids < n).all(), "id out of range"
    for row in ids:
        assert len(np.unique(row)) == k, f"duplicate ids in a result: {row}"
    if scores_checked:
        assert not np.isnan(scores).any(), "NaN score"


@pytest.fixture(scope="module")
def searchers():
    rng = np.random.default_rng(12)
    db = rng.normal(size=(2500, 12)).astype(np.float32)
    return {
        "ah_reorder": mipscan.builder(db.copy(), 10, "dot_product").tree(30, 6).score_ah(2)
        .reorder(60).build(),
        "ah": mipscan.builder(db.copy(), 10, "squared_l2").tree(30, 6).score_ah(3).build(),
        "soar": mipscan.builder(db.copy(), 10, "cosine").tree(30, 6, soar_lambda=1.0).score_ah(2)
        .reorder(40).build(),
        "bf": mipscan.builder(db.copy(), 10, "dot_product").tree(30, 6).score_brute_force().build(),
    }


def poison(a: np.ndarray, value: float, pattern: str, rng) -> None:
    flat = a.reshape(-1)
    if pattern == "all":
        flat[:] = value
    elif pattern == "one":
        flat[int(rng.integers(len(flat)))] = value
    else:
        flat[int(rng.integers(3))::3] = value


def search_every_way(s, q, rng):
    """Every search path on q: the Python methods, then the core directly (no validation),
    at every SIMD level, one and two threads, with and without precomputed leaf scores."""
    n, k = s.n, 10
    ix = s._index
    valid = bool(np.isfinite(q).all() and np.abs(q).max() < 1e15)  # what validation lets in
    mips_q = s._to_mips(q) if valid else np.ascontiguousarray(
        np.hstack([q, np.ones((len(q), 1), np.float32)]) if s.distance_measure == "squared_l2" else q)
    if valid:
        well_formed(s.search_batched(q).indices, None, n, k, scores_checked=False)
        well_formed(s.search_batched_parallel(q).indices, None, n, k, scores_checked=False)
        well_formed(s.search(q[0]).indices[None, :], None, n, k, scores_checked=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in the product: intended
        leaf_scores = np.ascontiguousarray(mips_q @ s._arrays["centroids"].T, dtype=np.float32)
    for level in LEVELS:
        for threads in (1, 2):
            for ls in (None, leaf_scores):
                for pre_k in (k, 50):
                    ids, scores = ix.search_batch(mips_q, ls, int(rng.integers(1, 7)), pre_k, k,
                                                  threads, level=level)
                    well_formed(ids, scores, n, k)
    # k = n: a result must hold every row exactly once, whatever the scores
    ids, scores = ix.search_batch(mips_q[:2], None, 6, n, n, 1)
    well_formed(ids, scores, n, n)


FLOAT_ARRAYS = {
    "ah_reorder": ["centroids", "codebooks", "reorder_rows"],
    "ah": ["centroids", "codebooks"],
    "soar": ["centroids", "codebooks", "reorder_rows"],
    "bf": ["centroids", "slot_rows"],
}


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("name,array", [(n, a) for n, arrs in FLOAT_ARRAYS.items() for a in arrs])
def test_garbage_in_index_arrays_gives_well_formed_results(searchers, name, array, value):
    s = searchers[name]
    rng = np.random.default_rng(5)
    q = rng.normal(size=(20, 12)).astype(np.float32)
    a = s._arrays[array]
    a.flags.writeable = True  # the searcher's views are read-only; the test writes anyway
    saved = a.copy()
    try:
        for pattern in PATTERNS:
            poison(a, VALUES[value], pattern, rng)
            search_every_way(s, q, rng)
            a[...] = saved
    finally:
        a[...] = saved
        a.flags.writeable = False
    ref = s.search_batched(q)  # restored: the searcher still works normally
    well_formed(ref.indices, ref.distances, s.n, 10)


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("name", list(FLOAT_ARRAYS))
def test_garbage_queries_give_well_formed_results(searchers, name, value):
    s = searchers[name]
    rng = np.random.default_rng(6)
    for pattern in PATTERNS:
        q = rng.normal(size=(20, 12)).astype(np.float32)
        poison(q, VALUES[value], pattern, rng)
        search_every_way(s, q, rng)


@pytest.mark.parametrize("value", ["nan", "inf", "huge"])
def test_garbage_centroid_in_a_consistent_folder(searchers, tmp_path, value):
    """Issue 12 defect 1, as reported: a folder whose centroids.npy holds a NaN, with its
    sha256 recomputed in mipscan.json. It used to make select_leaves write past leaf_keys
    (heap-buffer-overflow, then 'double free or corruption'); inf or 3e38 gave duplicate
    ids. Now either the loader refuses the folder (ValueError) or every result is
    well-formed."""
    import hashlib
    import json

    s = searchers["ah_reorder"]
    folder = tmp_path / "ix"
    s.serialize(folder)
    path = folder / "centroids.npy"
    c = np.load(path)
    c[3, 1] = VALUES[value]
    np.save(path, c)
    meta = json.loads((folder / "mipscan.json").read_text())
    meta["arrays"]["centroids"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "mipscan.json").write_text(json.dumps(meta))
    try:
        loaded = mipscan.load_searcher(folder)
    except ValueError:
        return  # the loader validates values (another layer's fix): also fine
    q = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    for method in (loaded.search_batched, loaded.search_batched_parallel):
        r = method(q)
        well_formed(r.indices, r.distances, loaded.n, 10)


def test_a_query_changed_to_nan_after_validation(searchers):
    """Another thread writes NaN into the query buffer while searches run on it."""
    s = searchers["soar"]
    rng = np.random.default_rng(8)
    q = rng.normal(size=(400, 12)).astype(np.float32)
    stop = threading.Event()

    def vandal():
        r = np.random.default_rng(9)
        while not stop.is_set():
            i = int(r.integers(q.size))
            q.reshape(-1)[i] = [np.nan, np.inf, -3e38][i % 3]

    t = threading.Thread(target=vandal)
    t.start()
    try:
        for _ in range(20):
            ids, scores = s._index.search_batch(q, None, 6, 40, 10, 2)
            well_formed(ids, scores, s.n, 10)
    finally:
        stop.set()
        t.join()


def test_topk_rows_fill_to_k_with_nan_scores():
    """Brute force's heaps: NaN scores count as -inf, so every heap still fills to k with
    distinct ids (an unfilled heap would return uninitialised memory)."""
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(6, 50)).astype(np.float32)
    scores[0] = np.nan
    scores[1, ::2] = np.nan
    scores[2, :] = -np.inf
    scores[3, 5] = np.inf
    k = 20
    heap_s = np.empty((6, k), np.float32)
    heap_i = np.empty((6, k), np.uint32)
    sizes = np.zeros(6, np.int64)
    _mipscan.topk_update_rows(scores, None, 0, heap_s, heap_i, sizes, 2)
    _mipscan.topk_finish_rows(heap_s, heap_i, sizes, 2)
    assert (sizes == k).all()
    well_formed(heap_i, heap_s, 50, k)
    assert heap_i[3, 0] == 5
    finite = scores[4]
    np.testing.assert_array_equal(heap_i[4], np.argsort(-finite, kind="stable")[:k])


# ------------------------------------------------------------------ many AH blocks

def ah_index(rng, d, n, with_tree=False):
    """An AH Index with d one-dimensional blocks, made directly (the builder refuses more
    than 65535 blocks)."""
    nb = d
    codebooks = rng.normal(size=(nb, 16, 1)).astype(np.float32)
    codes = rng.integers(0, 16, size=(n, nb), dtype=np.uint8)
    packed = _mipscan.pack_codes(codes)
    centroids = rng.normal(size=(1, d)).astype(np.float32) * 0.1
    leaf_offsets = np.array([0, n], np.int64)
    leaf_groups = np.array([0, (n + 63) // 64], np.int64)
    slot_ids = np.arange(n, dtype=np.uint32)
    ix = _mipscan.Index(centroids, leaf_offsets, slot_ids, codebooks, packed, leaf_groups,
                        None, None, n=n)
    return ix, centroids, codebooks, codes


@pytest.mark.parametrize("d", [65_536, 70_001])
def test_ah_with_more_blocks_than_the_lut_allows_is_scored_exactly(d):
    """Issue 12 defect 2: with >= 65,536 blocks the LUT cap was 0 and the scale inf (ids 0,
    scores +-inf). Such indexes are now scored in float: the exact AH scores, best first."""
    rng = np.random.default_rng(d)
    n = 150
    ix, centroids, codebooks, codes = ah_index(rng, d, n)
    q = rng.normal(size=(2, d)).astype(np.float32)
    k = 10
    for level in LEVELS:
        ids, scores = ix.search_batch(q, None, 1, k, k, 1, level=level)
        well_formed(ids, scores, n, k)
        assert np.isfinite(scores).all()
        for i in range(len(q)):
            decoded = codebooks[np.arange(d)[None, :], codes, 0]  # (n, d)
            ref = (decoded.astype(np.float64) @ q[i]) + float(centroids[0] @ q[i])
            order = np.argsort(-ref, kind="stable")[:k]
            np.testing.assert_array_equal(ids[i], order)
            np.testing.assert_allclose(scores[i], ref[order], rtol=1e-3, atol=1e-2)


def test_ah_at_the_block_bound_stays_quantized_and_well_formed():
    rng = np.random.default_rng(1)
    d = 65_535  # cap = 1: the coarsest quantized LUT still sums within 16 bits
    ix, *_ = ah_index(rng, d, 100)
    q = rng.normal(size=(2, d)).astype(np.float32)
    for level in LEVELS:
        ids, scores = ix.search_batch(q, None, 1, 10, 10, 1, level=level)
        well_formed(ids, scores, 100, 10)
        assert np.isfinite(scores).all()


# ------------------------------------------------------------------ scratch ownership

def test_scratch_is_cached_per_index_and_bounded():
    rng = np.random.default_rng(4)
    db = rng.normal(size=(4000, 8)).astype(np.float32)
    s = mipscan.builder(db, 10, "dot_product").tree(20, 4).score_ah(2).reorder(50).build()
    ix = s._index
    assert ix.cached_scratch == (0, 0)  # nothing until the first search
    q = rng.normal(size=(64, 8)).astype(np.float32)
    s.search(q[0])
    count, nbytes = ix.cached_scratch
    assert count == 1 and 0 < nbytes < 1 << 20
    s.search(q[1])
    assert ix.cached_scratch[0] == 1  # reused, not a second one

    errors = []

    def run():
        try:
            for _ in range(5):
                ix.search_batch(q, None, 4, 50, 10, 4)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    count, nbytes = ix.cached_scratch
    assert 1 <= count <= 8, count  # ScratchCache::kMaxCached
    assert nbytes <= 8 * (16 << 20)


def test_a_scratch_that_grew_past_the_bound_is_not_kept():
    rng = np.random.default_rng(7)
    n = 700_000
    db = rng.normal(size=(n, 2)).astype(np.float32)
    s = mipscan.builder(db, 10, "dot_product").tree(1, 1).score_brute_force().build()
    ix = s._index
    q = rng.normal(size=(1, 2)).astype(np.float32)
    ids, scores = ix.search_batch(q, None, 1, n, n, 1)  # buffers of ~4n pairs: > 16 MiB
    assert len(np.unique(ids[0])) == n
    assert ix.cached_scratch == (0, 0)
    ix.search_batch(q, None, 1, 10, 10, 1)
    count, nbytes = ix.cached_scratch
    assert count == 1 and nbytes < 16 << 20
