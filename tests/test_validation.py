"""Every bad argument raises TypeError/ValueError naming the call, the argument and the
value, before any C++ runs. Driven by the builder's own constraint tables."""

import math

import numpy as np
import pytest

import mipscan
from mipscan.builder import STAGES
from mipscan._validation import Bool, Interval, Options

N, D = 500, 8


@pytest.fixture(scope="module")
def db():
    return np.random.default_rng(1).normal(size=(N, D)).astype(np.float32)


@pytest.fixture(scope="module")
def searcher(db):
    return mipscan.builder(db, 10, "dot_product").tree(10, 3, min_partition_size=1).score_ah(2).reorder(40).build()


def bad_values(rule):
    """Values each rule must refuse (sklearn's generate_invalid_param_val, by hand)."""
    if isinstance(rule, Bool):
        return ["yes", 1]
    if isinstance(rule, Options):
        return ["no-such-option", 12345]
    out = ["3", [1]]
    if rule.kind is int:
        out += [2.5, True]
    if rule.low is not None:
        out.append(rule.low - 1)
    if rule.kind is float and not rule.allow_nan:
        out.append(math.nan)
    return out


def minimal_args(stage):
    return {"tree": {"num_leaves": 10, "num_leaves_to_search": 3},
            "score_ah": {"dimensions_per_block": 2},
            "score_brute_force": {},
            "autopilot": {},
            "reorder": {"reordering_num_neighbors": 20},
            "pca": {},
            "truncate": {"reduction_dim": 4},
            "upper_tree": {"num_leaves": 4, "num_leaves_to_search": 2}}[stage]


CASES = [(stage, name, rule) for stage, table in STAGES.items() for name, (rule, _) in table.items()]


@pytest.mark.parametrize("stage,name,rule", CASES, ids=[f"{s}.{n}" for s, n, _ in CASES])
def test_each_stage_argument_rejects_bad_values(db, stage, name, rule):
    for value in bad_values(rule):
        kwargs = {**minimal_args(stage), name: value}
        with pytest.raises((TypeError, ValueError)) as info:
            getattr(mipscan.builder(db, 10, "dot_product"), stage)(**kwargs)
        msg = str(info.value)
        assert f"{stage}()" in msg and name in msg, msg


def test_unknown_and_internal_arguments(db):
    b = mipscan.builder(db, 10, "dot_product")
    with pytest.raises(TypeError, match="num_leafs"):
        b.tree(num_leaves=10, num_leaves_to_search=3, num_leafs=3)
    with pytest.raises(TypeError, match="distance_measure"):
        b.tree(10, 3, distance_measure="dot_product")
    with pytest.raises(TypeError, match="missing required argument 'num_leaves_to_search'"):
        b.tree(num_leaves=10)
    with pytest.raises(ValueError, match=r"overretrieve_factor must be a number in \[1.0, 1000000.0\]"):
        b.tree(10, 3, soar_lambda=1.5, overretrieve_factor=0.5)
    with pytest.raises(ValueError, match=r"soar_lambda must be a number in \[0.0, inf\] or None; got -1"):
        b.tree(10, 3, soar_lambda=-1.0)
    with pytest.raises(ValueError, match="quantize"):
        b.reorder(20, quantize="int4")
    with pytest.raises(ValueError, match="residual_quantization=False is not supported"):
        b.score_ah(2, residual_quantization=False)


def test_cross_argument_rules(db):
    with pytest.raises(ValueError, match=r"num_leaves_to_search must be an int in \[1, num_leaves=10\]; got 20"):
        mipscan.builder(db, 10, "dot_product").tree(10, 20)
    with pytest.raises(ValueError, match=f"num_leaves must be an int in \\[1, n={N}\\]"):
        mipscan.builder(db, 10, "dot_product").tree(N + 1, 1).score_ah(2).build()
    with pytest.raises(ValueError, match="exactly one of score_ah"):
        mipscan.builder(db, 10, "dot_product").build()
    with pytest.raises(ValueError, match="exactly one of score_ah"):
        mipscan.builder(db, 10, "dot_product").score_ah(2).score_brute_force().build()
    with pytest.raises(ValueError, match=f"dimensions_per_block must be an int in \\[1, d={D}\\]"):
        mipscan.builder(db, 10, "dot_product").score_ah(D + 1).build()
    with pytest.raises(ValueError, match="already been configured"):
        mipscan.builder(db, 10, "dot_product").score_ah(2).score_ah(2)
    with pytest.raises(ValueError, match=r"build\(\): docids must have one entry per row of db"):
        mipscan.builder(db, 10, "dot_product").score_ah(2).build(docids=[1])
    with pytest.raises(TypeError, match="copy"):
        mipscan.builder(db, 10, "dot_product").score_ah(2).build(copy=1)
    with pytest.raises(TypeError):
        mipscan.builder(db, 10, "dot_product").score_ah(2).build(unknown=1)
    with pytest.raises(ValueError, match=r"build\(\): score_ah dimensions_per_block gives 65536 "
                                         r"blocks for d=65536 \(dot_product\); at most 65535"):
        wide = np.ones((2, 65536), np.float32)
        mipscan.builder(wide, 1, "dot_product").score_ah(1).build()


@pytest.mark.parametrize("bad,exc,word", [
    (np.zeros((0, 0), np.float32), ValueError, "empty"),
    (np.ones((5, D), np.int64), TypeError, "float dtype"),
    (np.array([[object()] * D]), TypeError, "float dtype"),
    (np.ones(D, np.float32), ValueError, "2-D"),
    (np.full((5, D), np.nan, np.float32), ValueError, "NaN"),
    (np.full((5, D), np.inf, np.float32), ValueError, "NaN or inf"),
    ("db", TypeError, "float array"),
])
def test_builder_rejects_bad_databases(bad, exc, word):
    with pytest.raises(exc, match=word) as info:
        mipscan.builder(bad, 1, "dot_product")
    assert "builder(): db" in str(info.value)


def test_empty_database_builds_only_a_live_index_that_starts_empty():
    # builder() takes (0, d): a live index may start empty (tests/test_live.py); any
    # other build of it names db.
    b = mipscan.builder(np.zeros((0, D), np.float32), 10, "dot_product").score_ah(2)
    with pytest.raises(ValueError, match=r"build\(\): db is empty \(shape \(0, 8\)\)"):
        b.build()


def test_builder_scalar_arguments(db):
    with pytest.raises(ValueError, match=f"num_neighbors must be an int in \\[1, n={N}\\]; got {N + 1}"):
        mipscan.builder(db, N + 1, "dot_product")
    with pytest.raises(ValueError, match="distance_measure must be one of"):
        mipscan.builder(db, 10, "hamming")
    with pytest.raises(TypeError, match="num_neighbors"):
        mipscan.builder(db, 2.0, "dot_product")


def test_float64_and_noncontiguous_input_is_accepted(db):
    wide = np.asfortranarray(db.astype(np.float64))
    s = mipscan.builder(wide, 5, "dot_product").score_brute_force().build()
    q = np.repeat(db[:3], 2, axis=1)[:, ::2]  # a non-contiguous view equal to db[:3]
    assert not q.flags.c_contiguous
    np.testing.assert_array_equal(s.search_batched(q).indices, mipscan.brute_force(db, db[:3], 5).indices)


@pytest.mark.parametrize("method", ["search", "search_batched", "search_batched_parallel"])
def test_search_argument_errors(searcher, method):
    q = np.ones(D, np.float32) if method == "search" else np.ones((3, D), np.float32)
    call = getattr(searcher, method)
    for kwargs, exc, needle in [
        # Above n is allowed: min(k, n) results, as ScaNN (tests/test_live.py).
        ({"final_num_neighbors": 0}, ValueError, "final_num_neighbors must be an int in [1, inf]; got 0"),
        ({"final_num_neighbors": 2.0}, TypeError, "final_num_neighbors"),
        ({"pre_reorder_num_neighbors": -1}, ValueError, "pre_reorder_num_neighbors"),
        ({"leaves_to_search": 11}, ValueError, "leaves_to_search must be an int in [1, num_leaves=10]; got 11"),
    ]:
        with pytest.raises(exc) as info:
            call(q, **kwargs)
        assert f"{method}()" in str(info.value) and needle in str(info.value)
    wrong_dim = np.ones(D + 1, np.float32) if method == "search" else np.ones((3, D + 1), np.float32)
    with pytest.raises(ValueError, match=f"has {D + 1} features, but the index expects {D} features"):
        call(wrong_dim)
    with pytest.raises(TypeError, match="float dtype"):
        call(q.astype(np.int32))
    nan_q = q.copy()
    nan_q[..., 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        call(nan_q)
    if method == "search_batched_parallel":
        with pytest.raises(ValueError, match="batch_size"):
            call(q, batch_size=0)


def test_set_num_threads_validation(db):
    s = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    with pytest.raises(ValueError, match=r"set_num_threads\(\): num_threads must be an int in \[1, 1024\]; got 0"):
        s.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        s.set_num_threads("2")
    assert s.num_threads == mipscan.get_num_threads()  # unchanged by the refused calls
    other = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    s.set_num_threads(3)
    assert s.num_threads == 3 and other.num_threads == mipscan.get_num_threads()


def test_max_abs_finds_every_nan_and_inf_position():
    # The input check's single C++ pass (eight lanes plus a tail): whatever the position
    # of a NaN or inf, and whatever the length, it must be seen.
    from mipscan import _mipscan

    rng = np.random.default_rng(3)
    for n in (1, 7, 8, 9, 16, 23):
        x = rng.normal(size=n).astype(np.float32)
        assert _mipscan.max_abs(x) == np.abs(x).max()
        for i in range(n):
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y[i] = bad
                got = _mipscan.max_abs(y)
                assert (np.isnan(got) if np.isnan(bad) else got == np.inf), (n, i, bad, got)
    assert _mipscan.max_abs(np.zeros((3, 5), np.float32)) == 0.0
