"""Filtered search (issue 15): allowed / excluded ids, shared or per query, and the
reusable Filter; checked against numpy exact top-k over the eligible rows, for row
numbers and docids, static and live indexes, both plans; the result shapes for empty and
short eligible sets; bad ids; recall of the filtered index search against the unfiltered
one at the same knobs."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import mipscan


def _exact_topk(db, q, eligible_rows, k, metric="dot_product"):
    """Scores (best first) of the exact top-k of q over db[eligible_rows]."""
    rows = np.asarray(sorted(eligible_rows), np.int64)
    if metric == "squared_l2":
        s = -((db[rows] - q) ** 2).sum(1)
    else:
        s = db[rows] @ q
    order = np.argsort(-s, kind="stable")[:k]
    return rows[order], s[order]


def _check_exact(ids, dists, db, q, eligible_rows, k, metric="dot_product"):
    want_rows, want = _exact_topk(db, q, eligible_rows, k, metric)
    got = -dists if metric == "squared_l2" else dists
    assert len(ids) == len(want_rows) == min(k, len(eligible_rows))
    assert set(np.asarray(ids).tolist()) <= set(int(r) for r in eligible_rows)
    assert len(set(np.asarray(ids).tolist())) == len(ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(15)
    db = rng.normal(size=(2000, 16)).astype(np.float32)
    qs = rng.normal(size=(24, 16)).astype(np.float32)
    return db, qs


@pytest.fixture(scope="module")
def brute(data):
    db, _ = data
    return mipscan.builder(db, 10, "dot_product").score_brute_force().build()


@pytest.fixture(scope="module")
def ah(data):
    db, _ = data
    return (mipscan.builder(db, 10, "dot_product").tree(40, 4).score_ah(2)
            .reorder(60).build())


@given(seed=st.integers(0, 10_000), frac=st.sampled_from([0.0005, 0.003, 0.05, 0.3, 0.9]),
       k=st.sampled_from([1, 5, 10, 25]), strategy=st.sampled_from(["auto", "index", "exact"]),
       kind=st.sampled_from(["allowed", "excluded"]))
def test_exact_plans_match_numpy(data, brute, ah, seed, frac, k, strategy, kind):
    """Brute force (any plan) and the exact plan of a tree + AH index are exact over
    the eligible rows, for shared sets, per-query lists and Filters."""
    db, qs = data
    rng = np.random.default_rng(seed)
    n = len(db)
    picked = rng.choice(n, max(1, int(frac * n)), replace=False)
    eligible = set(picked.tolist()) if kind == "allowed" else set(range(n)) - set(picked.tolist())
    q = qs[seed % len(qs)]
    kw = {kind: picked}
    ids, d = brute.search(q, k, filter_strategy=strategy, **kw)
    _check_exact(ids, d, db, q, eligible, k)
    ids, d = ah.search(q, k, filter_strategy="exact", **kw)
    _check_exact(ids, d, db, q, eligible, k)
    # per query lists and a Filter give the same as the shared set
    Q = qs[:3]
    per = brute.search_batched(Q, k, filter_strategy=strategy, **{kind: [picked] * 3})
    flt = brute.search_batched(Q, k, filter_strategy=strategy,
                               allowed=mipscan.Filter(brute, **kw))
    shared = brute.search_batched(Q, k, filter_strategy=strategy, **kw)
    for r in (per, flt):
        np.testing.assert_array_equal(r.indices, shared.indices)
        np.testing.assert_allclose(r.distances, shared.distances, rtol=1e-5)
    for i in range(3):
        _check_exact(shared.indices[i], shared.distances[i], db, Q[i], eligible, k)


def test_index_plan_never_returns_ineligible_rows_and_keeps_recall(data, ah):
    db, qs = data
    rng = np.random.default_rng(1)
    n = len(db)
    gt = np.argsort(-(qs @ db.T), 1)[:, :10]
    base = ah.search_batched(qs).indices
    unfiltered = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(base, gt)])
    for frac in (0.5, 0.1, 0.02):
        allowed = rng.choice(n, int(frac * n), replace=False)
        ids = ah.search_batched(qs, allowed=allowed, filter_strategy="index").indices
        assert np.isin(ids, allowed).all()
        sc = qs @ db[allowed].T
        fgt = allowed[np.argsort(-sc, 1)[:, :10]]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, fgt)])
        assert recall >= unfiltered - 0.02, (frac, recall, unfiltered)
    # far filter: allowed = the rows least aligned with the query batch's mean
    far = np.argsort(db @ qs.mean(0))[: n // 10]
    ids = ah.search_batched(qs, allowed=far, filter_strategy="index").indices
    assert np.isin(ids, far).all() and (ids >= 0).all()


def test_per_query_lists_differ(data, brute):
    db, qs = data
    rng = np.random.default_rng(2)
    lists = [rng.choice(len(db), m, replace=False) for m in (0, 3, 50, 700)]
    Q = qs[:4]
    r = brute.search_batched(Q, 10, allowed=lists)
    assert r.indices.shape == (4, 10) and r.indices.dtype == np.int64
    for i, lst in enumerate(lists):
        c = min(10, len(lst))
        assert (r.indices[i, c:] == -1).all() and np.isneginf(r.distances[i, c:]).all()
        _check_exact(r.indices[i, :c], r.distances[i, :c], db, Q[i], lst, 10)
    # excluded per query, combined with a shared allowed set
    allowed = rng.choice(len(db), 300, replace=False)
    excl = [allowed[:5], allowed[100:200], np.zeros(0, np.int64), allowed]
    r = brute.search_batched(Q, 10, allowed=allowed, excluded=excl)
    for i in range(4):
        elig = set(allowed.tolist()) - set(excl[i].tolist())
        c = min(10, len(elig))
        _check_exact(r.indices[i, :c], r.distances[i, :c], db, Q[i], elig, 10)
    assert r.indices.shape == (4, 10) and (r.indices[3] == -1).all()


def test_empty_and_short_shapes(data, brute, ah):
    db, qs = data
    for s in (brute, ah):
        r = s.search(qs[0], allowed=[])
        assert r.indices.shape == (0,) and r.distances.shape == (0,)
        r = s.search(qs[0], allowed=[7, 3])
        assert sorted(r.indices.tolist()) == [3, 7]
        r = s.search_batched(qs[:2], allowed=[])
        assert r.indices.shape == (2, 0)
        r = s.search_batched(qs[:2], allowed=[[1, 2, 3], [4]])
        assert r.indices.shape == (2, 3) and r.indices[1, 1:].tolist() == [-1, -1]
        r = s.search_batched(qs[:2], excluded=np.arange(len(db) - 4))
        assert r.indices.shape == (2, 4)
        assert set(r.indices[0].tolist()) == set(range(len(db) - 4, len(db)))


def test_bad_ids_and_arguments(data, brute):
    db, qs = data
    with pytest.raises(ValueError, match="allowed holds 2000"):
        brute.search(qs[0], allowed=[1, 2000, 5000])
    with pytest.raises(ValueError, match="excluded holds -1"):
        brute.search(qs[0], excluded=[-1])
    with pytest.raises(ValueError, match=r"allowed\[1\] holds 9999"):
        brute.search_batched(qs[:2], allowed=[[1], [9999]])
    with pytest.raises(ValueError, match="one list of ids per query"):
        brute.search_batched(qs[:2], allowed=[[1], [2], [3]])
    with pytest.raises(TypeError, match="integer"):
        brute.search(qs[0], allowed=[1.5])
    with pytest.raises(ValueError, match="filter_strategy"):
        brute.search(qs[0], allowed=[1], filter_strategy="fast")
    with pytest.raises(ValueError, match="not a row"):
        mipscan.Filter(brute, allowed=[2000])
    with pytest.raises(TypeError, match="Filter goes in allowed"):
        brute.search(qs[0], excluded=mipscan.Filter(brute, allowed=[1]))


@pytest.mark.parametrize("kind", ["int", "str"])
def test_docids_and_live_updates(data, kind):
    db, qs = data
    n = len(db)
    docids = [1000 + 3 * i for i in range(n)] if kind == "int" else [f"d{i}" for i in range(n)]
    s = (mipscan.builder(db, 10, "dot_product").tree(20, 20).score_brute_force()
         .build(docids=docids))
    allowed = docids[::7]
    r = s.search(qs[0], allowed=allowed)
    rows = [docids.index(v) for v in r.indices.tolist()]
    _check_exact(rows, r.distances, db, qs[0], range(0, n, 7), 10)
    bad = 5 if kind == "int" else "nope"
    with pytest.raises(ValueError, match=f"docid {bad!r}" if kind == "str" else "docid 5"):
        s.search(qs[0], allowed=[docids[0], bad])
    f = s.make_filter(excluded=allowed)
    # live: delete some, upsert a new one; the Filter follows the new snapshot
    s.delete(docids[1:50])
    new = 10**6 if kind == "int" else "new"
    s.upsert([new], (qs[0] * 10)[None, :])
    r = s.search(qs[0], allowed=f)
    assert r.indices[0] == new
    assert not set(r.indices.tolist()) & set(allowed) and not set(r.indices.tolist()) & set(docids[1:50])
    # deleted ids in allowed lists are not in the index any more
    with pytest.raises(ValueError):
        s.search(qs[0], allowed=[docids[2]])
    r = s.search_batched(qs[:2], allowed=[[docids[0], new], [docids[60]]], filter_strategy="exact")
    assert r.indices[1, 1:].tolist() == ([-1] if kind == "int" else [""])
    assert set(r.indices[0].tolist()) == {docids[0], new}


@pytest.mark.parametrize("metric", ["squared_l2", "cosine"])
def test_metrics(data, metric):
    db, qs = data
    s = mipscan.builder(db, 10, metric).tree(20, 3).score_ah(2).reorder(50).build()
    allowed = np.arange(0, len(db), 5)
    for strategy in ("exact", "index"):
        r = s.search_batched(qs[:4], allowed=allowed, filter_strategy=strategy)
        assert np.isin(r.indices, allowed).all()
    r = s.search(qs[0], allowed=allowed, filter_strategy="exact")
    ref = db / np.linalg.norm(db, axis=1, keepdims=True) if metric == "cosine" else db
    q = qs[0] / np.linalg.norm(qs[0]) if metric == "cosine" else qs[0]
    _check_exact(r.indices, r.distances, ref, q, allowed, 10, metric)
    r = s.search_batched(qs[:2], allowed=[[1], [2, 3]])
    assert np.isposinf(r.distances[0, 1]) if metric == "squared_l2" else np.isneginf(r.distances[0, 1])
    # the batched exact plans (BLAS products): one shared set, and per-query lists
    for a in (allowed, [allowed] * len(qs)):
        r = s.search_batched(qs, allowed=a, filter_strategy="exact")
        for i in range(len(qs)):
            q = qs[i] / np.linalg.norm(qs[i]) if metric == "cosine" else qs[i]
            _check_exact(r.indices[i], r.distances[i], ref, q, allowed, 10, metric)


def test_spilled_index(data):
    db, qs = data
    s = (mipscan.builder(db, 10, "dot_product").tree(30, 3, soar_lambda=1.0).score_ah(2)
         .reorder(40).build())
    allowed = np.arange(0, len(db), 3)
    r = s.search_batched(qs, allowed=allowed, filter_strategy="index")
    assert np.isin(r.indices, allowed).all()
    for row in r.indices:
        assert len(set(row.tolist())) == 10


def test_unfiltered_unchanged(data, ah):
    _, qs = data
    a = ah.search_batched(qs)
    b = ah.search_batched(qs, allowed=None, excluded=None, filter_strategy="exact")
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.indices.dtype == np.uint32


@pytest.mark.parametrize("k", [1, 10, 40])
def test_batched_exact_plan(data, ah, k):
    """A batch sharing one filter runs the exact plan as one BLAS product (gathered rows,
    cached on a Filter): exact, for arrays, Filters, empty and tiny sets."""
    db, qs = data
    rng = np.random.default_rng(k)
    for size in (37, 1500):  # topk_columns at every level; at 1500, with AVX-512 only
        allowed = rng.choice(len(db), size, replace=False)
        f = ah.make_filter(allowed=allowed)
        for a in (allowed, f, f):
            r = ah.search_batched(qs, k, allowed=a, filter_strategy="exact")
            assert r.indices.shape == (len(qs), min(k, size))
            for i in range(len(qs)):
                _check_exact(r.indices[i], r.distances[i], db, qs[i], allowed, k)
    r = ah.search_batched(qs, k, allowed=[], filter_strategy="exact")
    assert r.indices.shape == (len(qs), 0)
    r = ah.search_batched(qs, k, excluded=np.arange(len(db) - 3), filter_strategy="exact")
    assert r.indices.shape == (len(qs), min(k, 3))
    assert np.isin(r.indices, np.arange(len(db) - 3, len(db))).all()


# ---------------------------------------------------------------- the recommender

@pytest.fixture(scope="module")
def tutorial(ml100k_dir):
    pytest.importorskip("mipscan.recsys.model")
    pytest.importorskip("keras_rs")
    from mipscan.recsys import load_ml100k, rated_candidates, tutorial_embeddings

    ml = load_ml100k(ml100k_dir)
    emb = tutorial_embeddings(ml100k_dir, epochs=50, copies=100, seed=42)  # cached
    excluded = rated_candidates(ml, emb.all_user_ids, emb.movie_table_rows, 100, 42)
    return emb, excluded


def test_recommender_excludes_rated_for_all_users(tutorial):
    """All 943 users: no candidate of a movie the user rated in training is returned,
    and recall@10 of the filtered search (vs exact filtered search) is at least that of
    the unfiltered search (vs exact search) at the same knobs (the tutorial's)."""
    from mipscan import cli

    emb, excluded = tutorial
    users, cands = emb.all_users, emb.candidates
    p = cli.TUTORIAL_INDEX
    s = (mipscan.builder(cands, 10, "dot_product")
         .tree(p["num_leaves"], p["num_leaves_to_search"],
               training_iterations=p["training_iterations"])
         .score_ah(p["dimensions_per_block"]).reorder(p["reordering_num_neighbors"]).build())
    exact_u = mipscan.brute_force(cands, users, 10).indices
    exact_f = cli.exact_excluding(cands, users, excluded, 10)
    unfiltered = cli.recall_at_k(s.search_batched_parallel(users, 10).indices, exact_u)
    for strategy in ("auto", "index"):
        got = s.search_batched_parallel(users, 10, excluded=excluded,
                                        filter_strategy=strategy).indices
        assert got.shape == (943, 10) and (got >= 0).all()
        for row, ex in zip(got, excluded):
            assert not np.isin(row, ex).any()
        assert cli.recall_at_k(got, exact_f) >= unfiltered, strategy


def test_keras_layer_excluded_ids(tutorial):
    keras = pytest.importorskip("keras")
    from mipscan.keras import ApproximateRetrieval, pad_ids

    emb, excluded = tutorial
    users = emb.all_users[:64]
    ex = excluded[:64]
    ids = np.arange(len(emb.candidates)) * 2 + 1  # candidate ids, not rows
    layer = ApproximateRetrieval(candidate_embeddings=emb.candidates, candidate_ids=ids, k=10,
                                 return_scores=False,
                                 num_leaves=100, num_leaves_to_search=30,
                                 dimensions_per_block=2, reordering_num_neighbors=500)
    top = keras.ops.convert_to_numpy(layer(users, excluded_ids=pad_ids([ids[e] for e in ex])))
    assert top.shape == (64, 10) and top.dtype == np.int32
    for row, e in zip(top, ex):
        assert not np.isin(row, ids[e]).any()
    with pytest.raises(ValueError, match="excluded_ids"):
        layer(users, excluded_ids=np.zeros((3, 2), np.int32))


@pytest.mark.parametrize("with_ids", [False, True])
def test_keras_layer_excluded_ids_equal_the_searchers_exclusions(tutorial, with_ids):
    """The layer's padded (nq, m) excluded ids give exactly the searcher's results for the
    same ragged lists: padding (-1) and ids that are not candidates (even numbers, rows
    past the end) are ignored, a query may exclude nothing."""
    keras = pytest.importorskip("keras")
    from mipscan.keras import ApproximateRetrieval, pad_ids

    emb, excluded = tutorial
    users = emb.all_users[:40]
    n = len(emb.candidates)
    ids = np.arange(n) * 2 + 1 if with_ids else None
    ex = [e.copy() for e in excluded[:40]]
    ex[3] = ex[3][:0]  # excludes nothing
    layer = ApproximateRetrieval(candidate_embeddings=emb.candidates, candidate_ids=ids, k=10,
                                 return_scores=False, num_leaves=100, num_leaves_to_search=30,
                                 dimensions_per_block=2, reordering_num_neighbors=500)
    named = [(ids[e] if with_ids else e) for e in ex]
    noise = [np.array([0, 2, 4 * n + 2]) if with_ids else np.array([n, n + 7]) for _ in ex]
    padded = pad_ids([np.concatenate([a, b]) for a, b in zip(named, noise)], width=
                     max(len(a) for a in named) + 5)
    got = keras.ops.convert_to_numpy(layer(users, excluded_ids=padded))
    searcher = layer._state.searcher
    want = searcher.search_batched(users, final_num_neighbors=10,
                                   excluded=[np.asarray(a, np.int64) for a in named]).indices
    np.testing.assert_array_equal(got, want)
    for row, e in zip(got, named):
        assert not np.isin(row, e).any()


# ---------------------------------------------------------------- batched exact plans

@pytest.mark.parametrize("m,nq,k", [(1, 1, 1), (7, 5, 7), (90, 300, 10), (200, 17, 32),
                                    (33, 16, 1)])
def test_topk_columns_matches_a_stable_sort_at_every_level(m, nq, k):
    """topk_columns (the small shared-set exact plan): the best k of each column by
    (score desc, id asc), the same bits at every SIMD level, with ties, -inf and NaN
    (taken as -inf, like the heaps)."""
    from mipscan import _mipscan
    rng = np.random.default_rng(m * 1000 + nq)
    sc = rng.integers(-4, 5, size=(m, nq)).astype(np.float32)  # many ties
    sc[rng.random((m, nq)) < 0.1] = -np.inf
    sc[rng.random((m, nq)) < 0.05] = np.nan
    clean = np.where(np.isnan(sc), -np.inf, sc)
    want = np.argsort(-clean, axis=0, kind="stable")[:k].T
    outs = [_mipscan.topk_columns(sc, k, lv) for lv in mipscan.simd_levels()]
    for s, i in outs:
        np.testing.assert_array_equal(i, want)
        np.testing.assert_array_equal(s, np.take_along_axis(clean.T, want.astype(np.int64), 1))
    with pytest.raises(ValueError, match="k must be in"):
        _mipscan.topk_columns(sc, m + 1)


@pytest.mark.parametrize("kind", ["allowed", "excluded"])
def test_dense_lists_exact_by_blas(data, ah, kind):
    """Per-query lists run the exact plan as BLAS products over all rows, each query's
    eligible rows picked by a bitset: exact, with repeated ids, empty lists, lists
    shorter than k, and the same as the engine's gather plan on one query."""
    db, qs = data
    n = len(db)
    rng = np.random.default_rng(3)
    lists = [rng.choice(n, int(f * n), replace=False) for f in rng.uniform(0.3, 0.7, len(qs))]
    lists[1] = np.concatenate([lists[1], lists[1][:50]])  # repeated ids count once
    lists[2] = np.zeros(0, np.int64)
    lists[3] = lists[3][:4] if kind == "allowed" else np.arange(n - 3)  # fewer than k
    r = ah.search_batched(qs, 10, filter_strategy="exact", **{kind: lists})
    for i, lst in enumerate(lists):
        eligible = set(lst.tolist()) if kind == "allowed" else set(range(n)) - set(lst.tolist())
        got = r.indices[i][r.indices[i] >= 0]
        _check_exact(got, r.distances[i][:len(got)], db, qs[i], eligible, 10)
        if len(got) < r.indices.shape[1]:
            assert (r.indices[i][len(got):] == -1).all()
            assert np.isneginf(r.distances[i][len(got):]).all()
    one = ah.search(qs[0], 10, filter_strategy="exact", **{kind: lists[0]})  # gathers
    np.testing.assert_array_equal(one.indices, r.indices[0])
    # auto mixes plans per query; every result is eligible and exact when exact
    a = ah.search_batched(qs, 10, leaves_to_search=40, **{kind: lists})
    for i, lst in enumerate(lists):
        got = a.indices[i][a.indices[i] >= 0]
        assert np.isin(got, lst).all() == (kind == "allowed") or not len(got)


def test_per_query_list_errors_name_the_query(data, ah):
    db, qs = data
    n = len(db)
    big = [np.arange(n)] * len(qs)
    for bad, msg in ((n, rf"allowed\[5\] holds {n}"), (-1, r"allowed\[5\] holds -1")):
        lists = list(big)
        lists[5] = np.array([0, 1, bad])
        with pytest.raises(ValueError, match=msg):
            ah.search_batched(qs, 10, allowed=lists)
    lists = list(big)
    lists[2] = np.array([0.5])
    with pytest.raises(TypeError, match=r"allowed\[2\]"):
        ah.search_batched(qs, 10, allowed=lists)
    with pytest.raises(ValueError, match="one list of ids per query"):
        ah.search_batched(qs, 10, excluded=big[:3])


def test_live_lists_exact_by_blas_per_snapshot(data):
    """A live index: the BLAS plan of lists skips dead rows and new rows are eligible,
    per snapshot; searches racing updates each see one snapshot."""
    import threading
    db, qs = data
    s = (mipscan.builder(db[:1500], 10, "dot_product").tree(20, 4).score_ah(2).reorder(50)
         .build(docids=list(range(1500))))
    s.delete(list(range(0, 200, 2)))
    lists = [np.arange(200, 1500, 2)] * len(qs)
    r = s.search_batched(qs, 10, allowed=lists, filter_strategy="exact")
    for i in range(len(qs)):
        _check_exact(r.indices[i], r.distances[i], db, qs[i], set(range(200, 1500, 2)), 10)
    errors = []

    def search():
        try:
            for _ in range(20):
                out = s.search_batched(qs, 5, excluded=[np.arange(101, 200, 2)] * len(qs),
                                       filter_strategy="exact")
                assert not np.isin(out.indices, np.arange(101, 200, 2)).any()
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=search)
    t.start()
    for j in range(10):
        s.upsert(list(range(1500 + 10 * j, 1510 + 10 * j)), db[1500 + 10 * j:1510 + 10 * j])
        s.delete(list(range(200 + j, 1500, 97)))
    t.join()
    assert not errors
    dead = set(range(0, 200, 2)) | {v for j in range(10) for v in range(200 + j, 1500, 97)}
    eligible = set(range(1600)) - dead - set(range(101, 200, 2))
    ex = s.search_batched(qs, 10, excluded=[np.arange(101, 200, 2)] * len(qs),
                          filter_strategy="exact")
    for i in range(len(qs)):
        _check_exact(ex.indices[i], ex.distances[i], db, qs[i], eligible, 10)
