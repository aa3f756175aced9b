"""mipscan.brute_force against a numpy reference (hypothesis), and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mipscan

METRICS = ("dot_product", "squared_l2", "cosine")


def reference_scores(db: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """(nq, n) float64 scores, larger = better (squared_l2 is negated)."""
    x = db.astype(np.float64)
    q = np.atleast_2d(queries).astype(np.float64)
    if metric == "cosine":  # all-zero rows stay zero, as documented
        x = x / np.where((n := np.linalg.norm(x, axis=1, keepdims=True)) > 0, n, 1)
        q = q / np.where((n := np.linalg.norm(q, axis=1, keepdims=True)) > 0, n, 1)
    if metric == "squared_l2":
        return -((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return q @ x.T


def reference_topk(db, queries, k, metric):
    """Ids best first, ties broken by the smaller id, and their float64 scores."""
    s = reference_scores(db, queries, metric)
    ids = np.stack([np.lexsort((np.arange(s.shape[1]), -row))[:k] for row in s])
    return ids, np.take_along_axis(s, ids, 1)


def as_distances(scores: np.ndarray, metric: str) -> np.ndarray:
    return -scores if metric == "squared_l2" else scores


@st.composite
def problems(draw, elements):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 8))
    nq = draw(st.integers(1, 6))
    k = draw(st.integers(1, n))
    db = draw(hnp.arrays(np.float32, (n, d), elements=elements))
    if n > 1 and draw(st.booleans()):  # duplicate rows
        db[draw(st.integers(0, n - 1))] = db[0]
    queries = draw(hnp.arrays(np.float32, (nq, d), elements=elements))
    return db, queries, k


# Multiples of 1/4 in [-2, 2]: every product and sum is exact in float32, whatever order
# BLAS adds in, so ids (with their tie-breaking) and scores can be compared exactly.
exact_grid = st.integers(-8, 8).map(lambda v: v / 4)
# General floats, kept away from underflow so that float32 norms stay meaningful.
general = st.one_of(st.just(0.0), st.floats(0.0625, 10, width=32),
                    st.floats(-10, -0.0625, width=32))


@given(problems(exact_grid), st.sampled_from(("dot_product", "squared_l2")))
def test_exact_on_a_grid(problem, metric):
    db, queries, k = problem
    res = mipscan.brute_force(db, queries, k, metric)
    ids, scores = reference_topk(db, queries, k, metric)
    assert res.indices.dtype == np.uint32 and res.distances.dtype == np.float32
    assert res.indices.shape == res.distances.shape == (len(queries), k)
    np.testing.assert_array_equal(res.indices, ids)
    np.testing.assert_array_equal(res.distances, as_distances(scores, metric))


@given(problems(general), st.sampled_from(METRICS))
def test_matches_reference_scores(problem, metric):
    db, queries, k = problem
    res = mipscan.brute_force(db, queries, k, metric)
    all_scores = reference_scores(db, queries, metric)
    _, best = reference_topk(db, queries, k, metric)
    scale = 1 + np.abs(all_scores).max() + (np.square(queries).sum(1).max()
                                            if metric == "squared_l2" else 0)
    tol = 1e-5 * scale
    assert res.indices.shape == (len(queries), k)
    for r in range(len(queries)):
        got = res.indices[r].astype(np.int64)
        assert len(set(got.tolist())) == k, "an id came back twice"
        assert (got >= 0).all() and (got < len(db)).all()
        # each returned id's exact score is the returned distance
        np.testing.assert_allclose(as_distances(all_scores[r, got], metric),
                                   res.distances[r], rtol=0, atol=tol)
        # the returned scores are the true top-k scores (ids may differ within ties)
        np.testing.assert_allclose(all_scores[r, got], best[r], rtol=0, atol=tol)
        # best first
        step = np.diff(as_distances(res.distances[r].astype(np.float64), metric))
        assert (step <= tol).all()


@given(problems(general), st.sampled_from(METRICS))
def test_one_query_is_one_row(problem, metric):
    db, queries, k = problem
    single = mipscan.brute_force(db, queries[0], k, metric)
    batch = mipscan.brute_force(db, queries[:1], k, metric)
    assert single.indices.shape == single.distances.shape == (k,)
    np.testing.assert_array_equal(single.indices, batch.indices[0])
    np.testing.assert_array_equal(single.distances, batch.distances[0])


@pytest.mark.parametrize("metric", METRICS)
def test_k_equals_n_returns_every_row(rng, metric):
    db = rng.standard_normal((9, 3)).astype(np.float32)
    res = mipscan.brute_force(db, db[:2], k=9, distance_measure=metric)
    assert sorted(res.indices[0].tolist()) == list(range(9))
    if metric != "dot_product":  # a point is its own nearest neighbour
        assert res.indices[:, 0].tolist() == [0, 1]


@pytest.mark.parametrize("metric", METRICS)
def test_across_blocks(rng, metric):
    """Sizes past the 8192-row and 128-query blocks, with more threads than one."""
    db = rng.standard_normal((20_000, 12)).astype(np.float32)
    queries = rng.standard_normal((300, 12)).astype(np.float32)
    res = mipscan.brute_force(db, queries, 25, metric, num_threads=2)
    one = mipscan.brute_force(db, queries, 25, metric, num_threads=1)
    np.testing.assert_array_equal(res.indices, one.indices)
    ids, best = reference_topk(db, queries, 25, metric)
    np.testing.assert_allclose(res.distances, as_distances(best, metric), rtol=1e-4,
                               atol=1e-4)
    assert (res.indices == ids).mean() > 0.999  # only near-ties may swap


def test_float64_and_noncontiguous_inputs(rng):
    big = rng.standard_normal((50, 16))  # float64
    db, queries = big[::2, ::2], big[1:8:3, ::2]  # strided views
    assert not db.flags.c_contiguous and db.dtype == np.float64
    res = mipscan.brute_force(db, queries, 5)
    ref = mipscan.brute_force(np.ascontiguousarray(db, np.float32),
                              np.ascontiguousarray(queries, np.float32), 5)
    np.testing.assert_array_equal(res.indices, ref.indices)
    np.testing.assert_array_equal(res.distances, ref.distances)
    assert np.array_equal(db, big[::2, ::2])  # the input is not modified


def test_list_input_and_unpacking():
    ids, dists = mipscan.brute_force([[1.0, 0.0], [0.0, 2.0]], [0.0, 1.0], k=1)
    assert ids.tolist() == [1] and dists.tolist() == [2.0]


# ---------------------------------------------------------------- bad arguments
DB = np.arange(12, dtype=np.float32).reshape(4, 3)
Q = np.ones((2, 3), np.float32)


def _with(arr, index, value):
    out = arr.copy()
    out[index] = value
    return out


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"k": 0}, ValueError, "k"),
    ({"k": -1}, ValueError, "k"),
    ({"k": 5}, ValueError, "k"),  # k > n = 4
    ({"k": 2.0}, TypeError, "k"),
    ({"k": True}, TypeError, "k"),
    ({"k": "3"}, TypeError, "k"),
    ({"db": DB.astype(np.int64)}, TypeError, "db"),
    ({"queries": Q.astype(np.int32)}, TypeError, "queries"),
    ({"db": DB.astype(bool)}, TypeError, "db"),
    ({"db": DB.astype(object)}, TypeError, "db"),
    ({"queries": np.array([[1.0, "a", None]], dtype=object)}, TypeError, "queries"),
    ({"db": _with(DB, (1, 2), np.nan)}, ValueError, "db"),
    ({"queries": _with(Q, (0, 0), np.inf)}, ValueError, "queries"),
    ({"queries": _with(Q, (1, 1), -np.inf)}, ValueError, "queries"),
    ({"db": np.empty((0, 3), np.float32), "k": 1}, ValueError, "db"),
    ({"db": np.empty((4, 0), np.float32)}, ValueError, "db"),
    ({"queries": np.empty((0, 3), np.float32)}, ValueError, "queries"),
    ({"queries": np.ones((2, 4), np.float32)}, ValueError, "queries"),  # d mismatch
    ({"queries": np.ones(2, np.float32)}, ValueError, "queries"),
    ({"queries": np.ones((1, 2, 3), np.float32)}, ValueError, "queries"),
    ({"db": np.ones(3, np.float32)}, ValueError, "db"),
    ({"distance_measure": "l2"}, ValueError, "distance_measure"),
    ({"distance_measure": "DOT_PRODUCT"}, ValueError, "distance_measure"),
    ({"distance_measure": None}, TypeError, "distance_measure"),
    ({"num_threads": 0}, ValueError, "num_threads"),
    ({"num_threads": 1.5}, TypeError, "num_threads"),
    ({"db": None}, TypeError, "db"),
    ({"queries": "abc"}, TypeError, "queries"),
])
def test_bad_arguments(kwargs, exc, name):
    args = {"db": DB, "queries": Q, "k": 2, **kwargs}
    with pytest.raises(exc) as info:
        mipscan.brute_force(**args)
    msg = str(info.value)
    assert msg.startswith("brute_force(): "), msg
    assert f" {name} " in msg or f"{name} must" in msg, msg


def test_dimension_mismatch_message_names_both_sizes():
    with pytest.raises(ValueError, match="queries has 4 features, but db expects 3"):
        mipscan.brute_force(DB, np.ones((2, 4), np.float32), 2)


@given(st.sampled_from(METRICS), st.integers(1, 4),
       st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 11))
def test_nonfinite_anywhere_is_rejected(metric, k, bad, where):
    db = _with(DB, np.unravel_index(where, DB.shape), bad)
    assume(not np.isfinite(db).all())
    with pytest.raises(ValueError, match="db contains NaN or inf"):
        mipscan.brute_force(db, Q, k, metric)
