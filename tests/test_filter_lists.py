"""Per-query Filters (issue 15): allowed= as one mipscan.Filter per query, the batched
exact plans of per-query filters (BLAS products over all rows, or each query's bitset
scored a block of rows at a time by exact_bitsets), checked against numpy exact top-k,
against each other and against the id lists they were built from; the errors of the
list-of-Filters API."""

import numpy as np
import pytest

import mipscan
from mipscan import _filters, _mipscan


def _exact_topk(db, q, rows, k):
    rows = np.asarray(sorted(rows), np.int64)
    s = db[rows] @ q
    order = np.argsort(-s, kind="stable")[:k]
    return rows[order], s[order]


def _check(ids, dists, db, q, eligible, k):
    """ids/dists (one query, padded with -1 / -inf) are the exact top-k of the eligible
    rows."""
    want_rows, want = _exact_topk(db, q, eligible, k)
    got = ids[ids >= 0]
    assert len(got) == len(want_rows) == min(k, len(eligible))
    assert set(got.tolist()) <= set(int(r) for r in eligible)
    assert len(set(got.tolist())) == len(got)
    np.testing.assert_allclose(dists[:len(got)], want, rtol=1e-4, atol=1e-3)
    assert (ids[len(got):] == -1).all() and np.isneginf(dists[len(got):]).all()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1515)
    db = rng.normal(size=(3000, 24)).astype(np.float32)
    qs = rng.normal(size=(40, 24)).astype(np.float32)
    return db, qs


@pytest.fixture(scope="module")
def ah(data):
    db, _ = data
    return mipscan.builder(db, 10, "dot_product").tree(30, 3).score_ah(2).reorder(60).build()


def _lists(n, nq, seed):
    """Per-query allowed rows of many densities, unsorted, one empty, one shorter than k,
    one with repeats."""
    rng = np.random.default_rng(seed)
    fracs = rng.choice([0.0005, 0.002, 0.01, 0.05, 0.2, 0.5, 0.9], nq)
    out = [rng.choice(n, max(1, int(f * n)), replace=False) for f in fracs]
    out[1] = np.zeros(0, np.int64)
    out[2] = out[2][:3]
    out[3] = np.concatenate([out[3], out[3][:5], out[3][:2]])  # repeated ids count once
    return out


@pytest.mark.parametrize("strategy", ["auto", "index", "exact"])
def test_filter_list_same_as_id_lists_and_exact(data, ah, strategy):
    db, qs = data
    lists = _lists(len(db), len(qs), 7)
    flts = [ah.make_filter(allowed=a) for a in lists]
    by_ids = ah.search_batched(qs, 10, leaves_to_search=6, allowed=lists, filter_strategy=strategy)
    by_flt = ah.search_batched(qs, 10, leaves_to_search=6, allowed=flts, filter_strategy=strategy)
    np.testing.assert_array_equal(by_flt.indices, by_ids.indices)
    np.testing.assert_allclose(by_flt.distances, by_ids.distances, rtol=1e-5)
    for i, a in enumerate(lists):
        got = by_flt.indices[i]
        assert np.isin(got[got >= 0], a).all()  # never an ineligible row, any plan
        if strategy == "exact":
            _check(got, by_flt.distances[i], db, qs[i], set(a.tolist()), 10)
    # a tuple and an object array of Filters are taken as the list
    t = ah.search_batched(qs, 10, allowed=tuple(flts), filter_strategy=strategy,
                          leaves_to_search=6)
    np.testing.assert_array_equal(t.indices, by_flt.indices)
    o = np.empty(len(flts), object)
    o[:] = flts
    np.testing.assert_array_equal(ah.search_batched(qs, 10, allowed=o, filter_strategy=strategy,
                                                    leaves_to_search=6).indices, by_flt.indices)


@pytest.mark.parametrize("k", [1, 10, 33])
def test_every_exact_plan_is_exact_and_they_agree(data, ah, k):
    """The three exact plans of per-query filters (the engine's gather, BLAS products over
    all rows, exact_bitsets) give the exact top-k, the same ids (ties aside: none here),
    whichever is forced."""
    db, qs = data
    lists = _lists(len(db), len(qs), 11)
    st = ah._state
    r = _filters.resolve("t", st, len(qs), lists, None, False, searcher=ah)
    store = st.arrays["reorder_rows"]
    q = ah._to_mips(qs)
    sel = np.arange(len(qs))
    gemm = _filters.exact_lists(st, r, sel, q, store, k, np.zeros(len(qs), bool))
    bits = _filters.exact_lists(st, r, sel, q, store, k, np.ones(len(qs), bool))
    mixed = _filters.exact_lists(st, r, sel, q, store, k, np.arange(len(qs)) % 2 == 0)
    # Filters: their kept rows (exact_rows) and their stacked bitsets (BLAS products)
    rf = _filters.resolve("t", st, len(qs), [ah.make_filter(allowed=a) for a in lists], None,
                          False, searcher=ah)
    f_rows = _filters.exact_lists(st, rf, sel, q, store, k, np.ones(len(qs), bool))
    f_mixed = _filters.exact_lists(st, rf, sel, q, store, k, np.arange(len(qs)) % 3 == 0)
    for i, a in enumerate(lists):
        one = ah.search(qs[i], k, allowed=a, filter_strategy="exact")  # the engine gathers
        for ids, scores, counts in (gemm, bits, mixed, f_rows, f_mixed):
            assert counts[i] == min(k, len(set(a.tolist())))
            got = ids[i][:counts[i]].astype(np.int64)
            np.testing.assert_array_equal(got, one.indices)
            np.testing.assert_allclose(scores[i][:counts[i]], one.distances, rtol=1e-5, atol=1e-5)
            assert (ids[i][counts[i]:] == 0xFFFFFFFF).all()
        _check(np.concatenate([one.indices, -np.ones(k - len(one.indices), np.int64)]),
               np.concatenate([one.distances, np.full(k - len(one.indices), -np.inf)]),
               db, qs[i], set(a.tolist()), k)
    # exact_bitsets scores as the engine's dot kernel does, bit for bit
    for i in range(len(qs)):
        c = bits[2][i]
        np.testing.assert_array_equal(
            bits[1][i][:c], ah.search(qs[i], k, allowed=lists[i], filter_strategy="exact").distances)


def test_plan_picks_bitsets_for_sparse_and_products_for_dense(data, ah):
    db, qs = data
    n = len(db)
    st = ah._state
    for frac, want in ((0.02, _filters.EXACT_BITS), (0.9, _filters.EXACT_GEMM)):
        lists = [np.arange(0, n, int(1 / frac))[:int(frac * n)]] * len(qs)
        r = _filters.resolve("t", st, len(qs), lists, None, False, searcher=ah)
        codes = _filters.plan(ah, st, r, 3, 60, 10, "exact", True, True)
        assert (codes == want).all(), (frac, codes)


def test_filters_with_excluded_and_padding(data, ah):
    db, qs = data
    n = len(db)
    rng = np.random.default_rng(5)
    lists = _lists(n, len(qs), 3)
    flts = [ah.make_filter(allowed=a) for a in lists]
    shared_ex = rng.choice(n, 300, replace=False)
    per_ex = [rng.choice(n, 200, replace=False) for _ in qs]
    for ex, name in ((shared_ex, "shared"), (per_ex, "per query")):
        r = ah.search_batched(qs, 10, allowed=flts, excluded=ex, filter_strategy="exact")
        for i, a in enumerate(lists):
            e = ex if name == "shared" else ex[i]
            eligible = set(a.tolist()) - set(e.tolist())
            _check(r.indices[i], r.distances[i], db, qs[i], eligible, 10)
    # fewer eligible than k everywhere: k = the largest count, padded with -1 / -inf
    small = [ah.make_filter(allowed=[i, i + 1]) for i in range(len(qs))]
    small[0] = ah.make_filter(allowed=[])
    r = ah.search_batched(qs, 10, allowed=small)
    assert r.indices.shape == (len(qs), 2)
    assert (r.indices[0] == -1).all() and np.isneginf(r.distances[0]).all()
    for i in range(1, len(qs)):
        _check(r.indices[i], r.distances[i], db, qs[i], {i, i + 1}, 10)


def test_filter_list_errors(data, ah):
    db, qs = data
    other = mipscan.builder(db, 10, "dot_product").tree(30, 3).score_ah(2).reorder(60).build()
    flts = [ah.make_filter(allowed=[i, i + 7]) for i in range(len(qs))]
    with pytest.raises(ValueError, match=rf"one Filter per query \({len(qs)}\); got 3"):
        ah.search_batched(qs, 10, allowed=flts[:3])
    bad = list(flts)
    bad[4] = other.make_filter(allowed=[1, 2])
    with pytest.raises(ValueError, match=r"allowed\[4\] is a Filter of another searcher"):
        ah.search_batched(qs, 10, allowed=bad)
    bad = list(flts)
    bad[2] = [1, 2, 3]
    with pytest.raises(TypeError, match=r"allowed\[2\] is a list, but allowed\[0\] is a Filter"):
        ah.search_batched(qs, 10, allowed=bad)
    bad = [[1, 2]] * len(qs)
    bad[3] = flts[3]
    with pytest.raises(TypeError, match=r"allowed\[3\] is a Filter, which goes alone"):
        ah.search_batched(qs, 10, allowed=bad)
    with pytest.raises(TypeError, match="Filters go in allowed="):
        ah.search_batched(qs, 10, excluded=flts)
    with pytest.raises(TypeError, match="one Filter for one query"):
        ah.search(qs[0], 10, allowed=flts[:1])
    # search_batched_parallel takes them too
    p = ah.search_batched_parallel(qs, 10, allowed=flts, filter_strategy="exact")
    np.testing.assert_array_equal(
        p.indices, ah.search_batched(qs, 10, allowed=flts, filter_strategy="exact").indices)


def test_live_filter_list_per_snapshot(data):
    """Filters of a live index follow its updates: deleted rows never come back, new
    docids are allowed by an excluded-only Filter, per snapshot."""
    db, qs = data
    s = (mipscan.builder(db[:2000], 10, "dot_product").tree(20, 4).score_ah(2).reorder(50)
         .build(docids=list(range(2000))))
    lists = _lists(2000, len(qs), 9)
    flts = [s.make_filter(allowed=a) for a in lists]
    ex_only = [s.make_filter(excluded=a) for a in lists]
    s.delete(list(range(0, 2000, 3)))
    s.upsert(list(range(2000, 2300)), db[2000:2300])
    live = (set(range(2000)) - set(range(0, 2000, 3))) | set(range(2000, 2300))
    for strat in ("exact", "auto"):
        r = s.search_batched(qs, 10, allowed=flts, filter_strategy=strat)
        e = s.search_batched(qs, 10, allowed=ex_only, filter_strategy=strat)
        for i, a in enumerate(lists):
            el = set(a.tolist()) & live
            assert set(r.indices[i][r.indices[i] >= 0].tolist()) <= el
            if strat == "exact":
                _check(r.indices[i], r.distances[i], db, qs[i], el, 10)
                _check(e.indices[i], e.distances[i], db, qs[i], live - set(a.tolist()), 10)


def test_exact_bitsets_kernel(data):
    """The kernel alone: heaps carried over calls (two halves of the queries' bits), bits
    past the rows ignored, a NaN-free exact top-k."""
    db, qs = data
    rng = np.random.default_rng(2)
    n = 1000
    rows = np.ascontiguousarray(db[:n])
    words = (n + 63) // 64
    mask = rng.random((len(qs), words * 64)) < 0.05
    bits = np.packbits(mask, axis=1, bitorder="little").view(np.uint64).copy()
    k = 7
    hs = np.empty((len(qs), k), np.float32)
    hi = np.empty((len(qs), k), np.uint32)
    sz = np.zeros(len(qs), np.int64)
    _mipscan.exact_bitsets(qs, rows, bits, hs, hi, sz, 64, 1)
    _mipscan.topk_finish_rows(hs, hi, sz, 1)
    for i in range(len(qs)):
        el = np.flatnonzero(mask[i, :n])
        want, _ = _exact_topk(rows, qs[i], el, k)
        np.testing.assert_array_equal(hi[i][:sz[i]], want)
    with pytest.raises(ValueError, match="bits must be"):
        _mipscan.exact_bitsets(qs, rows, bits[:, :3].copy(), hs, hi, sz, 0, 1)
    # the same from row lists (exact_rows), which must ascend
    lists = [np.flatnonzero(mask[i, :n]).astype(np.uint32) for i in range(len(qs))]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    flat = np.concatenate(lists)
    hs2, hi2, sz2 = np.empty_like(hs), np.empty_like(hi), np.zeros(len(qs), np.int64)
    _mipscan.exact_rows(qs, rows, offsets, flat, hs2, hi2, sz2, 128, 1)
    _mipscan.topk_finish_rows(hs2, hi2, sz2, 1)
    np.testing.assert_array_equal(hi2, hi)
    np.testing.assert_array_equal(hs2, hs)
    flat[[0, 1]] = flat[[1, 0]]
    with pytest.raises(ValueError, match="ascend"):
        _mipscan.exact_rows(qs, rows, offsets, flat, hs2, hi2, np.zeros(len(qs), np.int64), 0, 1)


@pytest.mark.parametrize("metric", ["squared_l2", "cosine"])
def test_filter_list_metrics(data, metric):
    """The per-query exact plans in the MIPS space of squared_l2 (one more dimension) and
    cosine (normalized rows): distances as the metric gives them, exact."""
    db, qs = data
    s = mipscan.builder(db, 10, metric).tree(20, 3).score_ah(2).reorder(50).build()
    ref = db / np.linalg.norm(db, axis=1, keepdims=True) if metric == "cosine" else db
    lists = _lists(len(db), len(qs), 21)
    flts = [s.make_filter(allowed=a) for a in lists]
    r = s.search_batched(qs, 10, allowed=flts, filter_strategy="exact")
    for i, a in enumerate(lists):
        q = qs[i] / np.linalg.norm(qs[i]) if metric == "cosine" else qs[i]
        rows = np.asarray(sorted(set(a.tolist())), np.int64)
        if metric == "squared_l2":
            sc = -((ref[rows] - q) ** 2).sum(1)
        else:
            sc = ref[rows] @ q
        want = rows[np.argsort(-sc, kind="stable")[:10]]
        got = r.indices[i][r.indices[i] >= 0]
        np.testing.assert_array_equal(np.sort(got), np.sort(want))
        if metric == "squared_l2":
            np.testing.assert_allclose(r.distances[i][:len(got)], -np.sort(sc)[::-1][:len(got)],
                                       rtol=1e-3, atol=1e-3)
