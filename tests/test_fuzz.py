"""Property-based fuzzing of every public entry point (issue 7).

Strategies draw valid and invalid inputs alike: shapes with 0 and 1, d == 1, every dtype
family (float16/32/64, int, bool, object, complex), NaN/inf and values large enough to
overflow float32 scores, non-contiguous and negative-stride views, lists, wrong ranks,
k > n, duplicate and all-zero rows, and counts that are huge, negative, bool, float or
numpy scalars. Each case must end in one of two ways:

* a correct result: shapes and dtypes, best first, ids in range and unique, every returned
  distance the exact distance of its id (when the index reorders or scores exactly), the
  exact top-k distances when the whole index is searched exactly, and search /
  search_batched / search_batched_parallel bit-identical; or
* the documented exception: TypeError for a wrong type, ValueError for a wrong value,
  whose message names the offending argument.

The oracle for "is this input valid" (``array_problem``, ``count_problem``) is written
from the documented rules, not from the validator's code.

Profiles (tests/conftest.py): ``ci`` runs 50 examples per test; ``long``
(HYPOTHESIS_PROFILE=long) 1,200 per test, >= 10,000 cases in total.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import mipscan
from mipscan._validation import MAX_THREADS, max_abs_value

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

METRICS = ("dot_product", "squared_l2", "cosine")
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- oracles


class Problem(NamedTuple):
    exc: type | tuple  # the exception type(s) allowed
    name: str  # what the message must name


def array_problem(x, name: str, ndims: tuple[int, ...], d: int | None = None):
    """The documented outcome of passing x where a float array is expected:
    None (accepted) or Problem(TypeError/ValueError, name)."""
    if x is None or isinstance(x, (str, bytes)):
        return Problem(TypeError, name)
    if not isinstance(x, np.ndarray):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = np.asarray(x)
        except Exception:
            return Problem(TypeError, name)
    if x.dtype.kind != "f":
        return Problem(TypeError, name)
    if x.ndim not in ndims or x.size == 0:
        return Problem(ValueError, name)
    if d is not None and x.shape[-1] != d:
        return Problem(ValueError, name)
    with np.errstate(all="ignore"):
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all() or np.abs(x32).max() > max_abs_value(x.shape[-1]):
        return Problem(ValueError, name)
    return None


def count_problem(v, name: str, low: int, high: int | None, allow_none: bool = False):
    """Outcome for a count argument documented as 'an int in [low, high]'."""
    if v is None and allow_none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        return Problem(TypeError, name)
    if v < low or (high is not None and v > high):
        return Problem(ValueError, name)
    return None


def expect_outcome(problems, fn):
    """Runs fn; if problems (a list of Problem or None) has any, fn must raise one of
    their exception types with a message naming that argument; otherwise it must not
    raise. Returns fn's result (or None after an expected error)."""
    problems = [p for p in problems if p is not None]
    if not problems:
        event("valid input: result checked")
        return fn()
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    event(f"invalid input: {type(info.value).__name__}")
    msg = str(info.value)
    ok = [p for p in problems if isinstance(info.value, p.exc)
          and re.search(rf"(?<![A-Za-z_]){re.escape(p.name)}(?![A-Za-z_])", msg)]
    assert ok, f"{type(info.value).__name__}: {msg!r} names none of {problems}"
    return None


# ---------------------------------------------------------------- strategies
VALUE_KINDS = st.sampled_from(["normal", "normal", "normal", "int-like", "zeros", "dupes",
                               "tiny", "large", "nan", "inf", "overflow"])


@st.composite
def values(draw, shape, kind=None):
    """float64 contents of a given shape; `kind` picks a family (edge cases included)."""
    kind = kind or draw(VALUE_KINDS)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if kind == "int-like":
        out = rng.integers(-3, 4, size=shape).astype(np.float64)
    elif kind == "zeros":
        out = np.zeros(shape)
        if size:
            out.reshape(-1)[: size // 2] = rng.normal(size=size // 2)
    elif kind == "dupes" and len(shape) >= 1 and shape[0] > 0:
        base = rng.normal(size=(1,) + tuple(shape[1:]))
        out = np.repeat(base, shape[0], axis=0)
        if shape[0] > 2:
            out[-1] = rng.normal(size=shape[1:])
    elif kind == "tiny":
        out = rng.normal(size=shape) * 1e-30
    elif kind == "large":  # large but acceptable
        d = shape[-1] if len(shape) and shape[-1] else 1
        out = rng.uniform(-1, 1, size=shape) * max_abs_value(d) * 0.5
    else:
        out = rng.normal(size=shape)
    if size and kind in ("nan", "inf", "overflow"):
        i = draw(st.integers(0, size - 1))
        out.reshape(-1)[i] = {"nan": np.nan, "inf": -np.inf, "overflow": 1e19}[kind]
    return np.asarray(out, np.float64)


@st.composite
def any_array(draw, ndim=2, d=None, n_max=10, d_max=5, valid_only=False):
    """An ndarray (or a list, scalar, None, str) for an argument expecting a float array."""
    if not valid_only:
        form = draw(st.sampled_from(["array"] * 12 + ["list", "none", "str", "scalar", "ragged"]))
        if form == "none":
            return None
        if form == "str":
            return "1,2,3"
        if form == "scalar":
            return draw(st.sampled_from([1.5, np.float32(2.0), 3]))
        if form == "ragged":
            return [[1.0, 2.0], [3.0]]
    else:
        form = "array"
    if valid_only:
        nd = ndim
    else:
        nd = draw(st.sampled_from([ndim] * 6 + [0, 1, 2, 3]))
    shape = []
    for axis in range(nd):
        last = axis == nd - 1
        if last and d is not None and (valid_only or draw(st.integers(0, 5)) > 0):
            shape.append(d)
        elif last:
            shape.append(draw(st.integers(1 if valid_only else 0, d_max)))
        else:
            shape.append(draw(st.integers(1 if valid_only else 0, n_max)))
    shape = tuple(shape)
    v = draw(values(shape, "normal" if valid_only and draw(st.booleans()) else
                    draw(st.sampled_from(["normal", "int-like", "zeros", "dupes", "tiny", "large"]))
                    if valid_only else None))
    dtype = (draw(st.sampled_from([np.float16, np.float32, np.float32, np.float64]))
             if valid_only else
             draw(st.sampled_from([np.float32] * 4 + [np.float64, np.float16, np.int64, np.int32,
                                                     np.uint8, np.bool_, object, np.complex64])))
    with np.errstate(all="ignore"):
        x = v.astype(dtype)
    layout = draw(st.sampled_from(["c", "c", "f", "strided", "reversed", "readonly"]))
    if layout == "f":
        x = np.asfortranarray(x)
    elif layout == "strided" and x.ndim >= 1:
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "reversed" and x.ndim >= 1:
        x = x[::-1].copy()[::-1]
    elif layout == "readonly":
        x = x.copy()
        x.flags.writeable = False
    if form == "list":
        return x.tolist()
    return x


def counts(low=1, high=20):
    """Counts: mostly in a plausible range, plus every kind of bad value."""
    return st.one_of(
        st.integers(low - 2, high + 3),
        st.integers(low - 2, high + 3).map(np.int64),
        st.integers(0, high + 3).map(np.uint32),
        st.sampled_from([0, -1, 2**31, 2**63, 2**64 + 1, -(2**70), True, False, 2.0, 2.5,
                         float("nan"), np.float64(3), "3", None, [3], np.bool_(True)]),
    )


METRIC_ARGS = st.one_of(st.sampled_from(METRICS * 3),
                        st.sampled_from(["DOT_PRODUCT", "l2", "", None, 1, b"cosine"]))


def _metric_problem(m):
    if isinstance(m, str) and m in METRICS:
        return None
    return Problem(ValueError if isinstance(m, str) else TypeError, "distance_measure")


# ---------------------------------------------------------------- exact references
def exact_scores(db32, q32, ids, metric):
    """float64 distance of each returned id to its query (rows of ids)."""
    x = db32.astype(np.float64)[ids.astype(np.int64)]
    q = q32.astype(np.float64)[:, None, :]
    if metric == "cosine":
        qn = np.linalg.norm(q, axis=-1, keepdims=True)
        xn = np.linalg.norm(x, axis=-1, keepdims=True)
        return ((q / np.where(qn > 0, qn, 1)) * (x / np.where(xn > 0, xn, 1))).sum(-1)
    if metric == "squared_l2":
        return ((q - x) ** 2).sum(-1)
    return (q * x).sum(-1)


def tolerance(db32, q32, metric):
    """Absolute tolerance of a float32 score: a few ulps of the largest term involved."""
    if metric == "cosine":
        return 1e-4
    qn = float(np.max(np.linalg.norm(q32.astype(np.float64), axis=-1)))
    xn = float(np.max(np.linalg.norm(db32.astype(np.float64), axis=-1)))
    scale = (qn + xn) ** 2 if metric == "squared_l2" else qn * xn
    return 1e-5 * scale * max(1, db32.shape[1]) ** 0.5 + 1e-30


def check_result(res, db32, q32, k, metric, *, exact_scores_expected, exact_topk):
    """Structural invariants, plus exactness checks when the configuration promises them."""
    ids, dist = res
    nq = q32.shape[0]
    assert ids.shape == (nq, k) and dist.shape == (nq, k), (ids.shape, dist.shape, nq, k)
    assert ids.dtype == np.uint32 and dist.dtype == np.float32
    assert np.isfinite(dist).all()
    assert (ids < db32.shape[0]).all(), ids
    for row in ids:
        assert len(set(row.tolist())) == k, f"duplicate ids {row}"
    if metric == "squared_l2":
        assert (np.diff(dist, axis=1) >= 0).all(), dist
    else:
        assert (np.diff(dist, axis=1) <= 0).all(), dist
    tol = tolerance(db32, q32, metric)
    if exact_scores_expected:
        np.testing.assert_allclose(dist, exact_scores(db32, q32, ids, metric), rtol=0, atol=tol)
    if exact_topk:
        truth = mipscan.brute_force(db32, q32, k, metric)
        np.testing.assert_allclose(dist, truth.distances, rtol=0, atol=2 * tol)


# ---------------------------------------------------------------- brute_force
def _mode():
    """'valid': every argument valid; 'one': one argument from the full strategy; 'any'."""
    return st.sampled_from(["valid", "valid", "one", "any"])


def _pick(data, mode, bad_arg, name, valid, anything):
    use_any = mode == "any" or (mode == "one" and bad_arg == name)
    return data.draw(anything if use_any else valid, label=name)


@FUZZ
@given(data=st.data(), mode=_mode(),
       bad_arg=st.sampled_from(["db", "queries", "k", "metric", "threads"]))
def test_fuzz_brute_force(data, mode, bad_arg):
    db = _pick(data, mode, bad_arg, "db", any_array(2, valid_only=True, n_max=12), any_array(2))
    db_problem = array_problem(db, "db", (2,))
    d = np.asarray(db).shape[1] if db_problem is None else 3
    n = np.asarray(db).shape[0] if db_problem is None else 1
    ndim = data.draw(st.sampled_from([1, 2]))
    queries = _pick(data, mode, bad_arg, "queries", any_array(ndim, d=d, valid_only=True),
                    any_array(ndim, d=d))
    k = _pick(data, mode, bad_arg, "k", st.integers(1, n), counts(1, n))
    metric = _pick(data, mode, bad_arg, "metric", st.sampled_from(METRICS), METRIC_ARGS)
    threads = _pick(data, mode, bad_arg, "threads", st.one_of(st.none(), st.integers(1, 4)),
                    st.one_of(st.none(), counts(1, 4), st.just(MAX_THREADS + 1)))
    problems = [_metric_problem(metric), db_problem,
                array_problem(queries, "queries", (1, 2), d) if db_problem is None else None,
                count_problem(k, "k", 1, n),
                count_problem(threads, "num_threads", 1, MAX_THREADS, allow_none=True)]
    res = expect_outcome(problems, lambda: mipscan.brute_force(db, queries, k, metric,
                                                               num_threads=threads))
    if res is None:
        return
    db32 = np.asarray(db, np.float32)
    q32 = np.asarray(queries, np.float32)
    single = q32.ndim == 1
    q2 = q32.reshape(-1, db32.shape[1])
    ids, dist = res
    assert ids.ndim == dist.ndim == (1 if single else 2)
    check_result((ids.reshape(len(q2), k), dist.reshape(len(q2), k)), db32, q2, k, metric,
                 exact_scores_expected=True, exact_topk=False)
    # The exact top-k: no id outside the result beats the k-th returned score.
    full = exact_scores(db32, q2, np.tile(np.arange(len(db32)), (len(q2), 1)), metric)
    kth = dist.reshape(len(q2), k)[:, -1:]
    tol = 2 * tolerance(db32, q2, metric)
    better = full > kth + tol if metric != "squared_l2" else full < kth - tol
    for r in range(len(q2)):
        assert set(np.flatnonzero(better[r])) <= set(ids.reshape(len(q2), k)[r].tolist())


# ---------------------------------------------------------------- builder stages
def _stage_value():
    """Any value for a stage argument: plausible numbers and every kind of bad one."""
    return st.one_of(st.integers(-2, 40), st.floats(allow_nan=True, allow_infinity=True),
                     st.booleans(), st.none(), st.sampled_from(["lut16", "float32", "x", 2**64]),
                     st.integers(0, 40).map(np.int32))


@FUZZ
@given(data=st.data(), mode=_mode(), bad_arg=st.sampled_from(["db", "nn", "metric"]))
def test_fuzz_builder(data, mode, bad_arg):
    db = _pick(data, mode, bad_arg, "db", any_array(2, n_max=40, valid_only=True),
               any_array(2, n_max=40))
    n0 = np.asarray(db).shape[0] if array_problem(db, "db", (2,)) is None else 1
    nn = _pick(data, mode, bad_arg, "nn", st.integers(1, n0), counts(1, 45))
    metric = _pick(data, mode, bad_arg, "metric", st.sampled_from(METRICS), METRIC_ARGS)
    db_problem = array_problem(db, "db", (2,))
    n = np.asarray(db).shape[0] if db_problem is None else 1
    problems = [db_problem, count_problem(nn, "num_neighbors", 1, n) if db_problem is None else
                None, _metric_problem(metric)]
    b = expect_outcome(problems, lambda: mipscan.builder(db, nn, metric))
    if b is not None:
        assert b.db.dtype == np.float32 and b.db.flags.c_contiguous
        np.testing.assert_array_equal(b.db, np.asarray(db).astype(np.float32))


@FUZZ
@given(stage=st.sampled_from(["tree", "score_ah", "score_brute_force", "reorder"]),
       data=st.data())
def test_fuzz_stage_arguments(stage, data):
    """Each stage with random values for random arguments: accepted values are stored as
    given (normalised), refused ones raise TypeError/ValueError naming the argument."""
    from mipscan.builder import STAGES
    from mipscan._schema import CALL_ONLY
    from mipscan._validation import Bool, Interval, Options, Quantize

    db = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    table = STAGES[stage]
    required = {"tree": {"num_leaves": 5, "num_leaves_to_search": 2},
                "score_ah": {"dimensions_per_block": 2},
                "reorder": {"reordering_num_neighbors": 10}}.get(stage, {})
    names = data.draw(st.lists(st.sampled_from(list(table) + ["bogus"]), max_size=3, unique=True))
    kwargs = dict(required)
    for name in names:
        kwargs[name] = data.draw(_stage_value(), label=name)
    problems = []
    for name, v in kwargs.items():
        if name == "bogus":
            problems.append(Problem(TypeError, "bogus"))
            continue
        rule = table[name][0]
        if isinstance(rule, Bool):
            ok = isinstance(v, (bool, np.bool_))
            problems.append(None if ok else Problem(TypeError, name))
        elif isinstance(rule, Quantize):  # ScaNN's ReorderType spellings, normalised
            ok = rule.normalize(v) is not None
            problems.append(None if ok else Problem((TypeError, ValueError), name))
        elif isinstance(rule, Options):
            ok = any(v is o or (type(v) is type(o) and v == o) for o in rule.values)
            problems.append(None if ok else Problem(ValueError, name) if isinstance(
                v, (str, bool, int, float, type(None))) else Problem(TypeError, name))
            if not ok:  # unsupported ScaNN options may raise either; the name is what matters
                problems[-1] = Problem((TypeError, ValueError), name)
        else:  # Interval
            if v is None and rule.allow_none:
                problems.append(None)
                continue
            numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
                v, (bool, np.bool_))
            if rule.kind is int and not isinstance(v, (int, np.integer)) or not numeric:
                problems.append(Problem(TypeError, name))
                continue
            fv = float(v)
            bad = (math.isnan(fv) and not rule.allow_nan) or (
                not math.isnan(fv) and ((rule.low is not None and fv < rule.low)
                                        or (rule.high is not None and fv > rule.high)))
            problems.append(Problem(ValueError, name) if bad else None)
    if stage == "tree" and not any(problems):
        if kwargs["num_leaves_to_search"] > kwargs["num_leaves"]:
            problems.append(Problem(ValueError, "num_leaves_to_search"))
    b = mipscan.builder(db, 5, "dot_product")
    out = expect_outcome(problems, lambda: getattr(b, stage)(**kwargs))
    if out is not None:
        stored = b.params[stage]
        for name, v in kwargs.items():
            if name in CALL_ONLY.get(stage, ()):
                assert name not in stored  # checked, not stored
            elif isinstance(table[name][0], Quantize):
                assert stored[name] == table[name][0].normalize(v)
            elif isinstance(v, float) and math.isnan(v):
                assert math.isnan(stored[name])
            else:
                assert stored[name] == v and type(stored[name]) in (int, float, bool, str,
                                                                      type(None))
        # configuring a stage twice is refused, naming the stage
        with pytest.raises(ValueError, match=stage):
            getattr(b, stage)(**required)


# ---------------------------------------------------------------- build + search
@st.composite
def index_config(draw):
    """A database (valid, with edge cases) and a stage configuration (valid or not
    against n and d)."""
    n = draw(st.integers(1, 48))
    d = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["normal", "normal", "int-like", "zeros", "dupes", "tiny",
                                 "large"]))
    db = draw(values((n, d), kind)).astype(np.float32)
    metric = draw(st.sampled_from(METRICS))
    cfg = {"metric": metric, "num_neighbors": draw(st.integers(1, n))}
    if draw(st.booleans()):
        leaves = draw(st.integers(1, n + 2))
        cfg["tree"] = dict(num_leaves=leaves,
                           num_leaves_to_search=draw(st.integers(1, leaves)),
                           min_partition_size=draw(st.sampled_from([0, 1, 2, 5, 1000])),
                           training_iterations=draw(st.integers(1, 4)),
                           spherical=draw(st.booleans()), random_init=draw(st.booleans()),
                           training_sample_size=draw(st.sampled_from([1, 3, 100_000])))
    if draw(st.integers(0, 3)):
        cfg["score_ah"] = dict(dimensions_per_block=draw(st.integers(1, d + 2)),
                               anisotropic_quantization_threshold=draw(
                                   st.sampled_from([0.0, 0.2, 1.0, float("nan"), 5.0])),
                               training_sample_size=draw(st.sampled_from([16, 100_000])),
                               training_iterations=draw(st.integers(1, 3)))
    else:
        cfg["score_brute_force"] = {}
    if draw(st.booleans()):
        cfg["reorder"] = dict(reordering_num_neighbors=draw(st.integers(1, n + 2)))
    cfg["seed"] = draw(st.integers(0, 2**40))
    cfg["layout"] = draw(st.sampled_from(["c", "c", "float64", "fortran", "strided", "list"]))
    return db, cfg


def build(db, cfg):
    layout = cfg.get("layout", "c")
    if layout == "float64":
        db = db.astype(np.float64)  # exactly representable: converts back to the same db
    elif layout == "fortran":
        db = np.asfortranarray(db)
    elif layout == "strided":
        wide = np.zeros((db.shape[0], 2 * db.shape[1]), db.dtype)
        wide[:, ::2] = db
        db = wide[:, ::2]
    elif layout == "list":
        db = db.tolist()
    b = mipscan.builder(db, cfg["num_neighbors"], cfg["metric"]).set_seed(cfg["seed"])
    for stage in ("tree", "score_ah", "score_brute_force", "reorder"):
        if stage in cfg:
            b = getattr(b, stage)(**cfg[stage])
    return b.build()


def build_problems(db, cfg):
    n, d = db.shape
    out = []
    if "tree" in cfg and cfg["tree"]["num_leaves"] > n:
        out.append(Problem(ValueError, "num_leaves"))
    if "score_ah" in cfg and cfg["score_ah"]["dimensions_per_block"] > d:
        out.append(Problem(ValueError, "dimensions_per_block"))
    if "reorder" in cfg and cfg["reorder"]["reordering_num_neighbors"] > n:
        out.append(Problem(ValueError, "reordering_num_neighbors"))
    return out


@FUZZ
@given(cfg_db=index_config(), data=st.data())
def test_fuzz_build_and_search(cfg_db, data):
    db, cfg = cfg_db
    n, d = db.shape
    note(f"n={n} d={d} cfg={cfg}")
    s = expect_outcome(build_problems(db, cfg), lambda: build(db, cfg))
    if s is None:
        return
    assert s.n == n and s.d == d and 1 <= s.num_leaves <= cfg.get("tree", {}).get("num_leaves", 1)
    metric = cfg["metric"]
    def count_arg(high, label):  # mostly valid (None or in range), else any count
        return data.draw(st.one_of(st.none(), st.integers(1, high), st.integers(1, high),
                                   st.integers(1, high), counts(1, high)), label=label)

    k = count_arg(n, "final_num_neighbors")
    pre = count_arg(n, "pre_reorder_num_neighbors")
    # leaves_to_search may go up to the configured num_leaves (as in ScaNN), even when
    # small partitions were merged and fewer leaves were built; it is then clamped.
    configured = max(s.num_leaves, cfg.get("tree", {}).get("num_leaves", 1))
    leaves = count_arg(configured, "leaves_to_search")
    batch = data.draw(st.one_of(st.integers(1, 5), counts(1, 5)), label="batch_size")
    nq = data.draw(st.integers(1, 6))
    q = data.draw(values((nq, d), data.draw(st.sampled_from(["normal", "zeros", "int-like"])))
                  ).astype(np.float32)
    if data.draw(st.booleans()):
        q[0] = db[data.draw(st.integers(0, n - 1))]  # a query equal to a datapoint
    # Counts above n are valid: min(k, n) results (issue 13, as ScaNN).
    problems = [count_problem(k, "final_num_neighbors", 1, None, allow_none=True),
                count_problem(pre, "pre_reorder_num_neighbors", 1, None, allow_none=True),
                count_problem(leaves, "leaves_to_search", 1, configured, allow_none=True)]
    kw = dict(final_num_neighbors=k, pre_reorder_num_neighbors=pre, leaves_to_search=leaves)
    a = expect_outcome(problems, lambda: s.search_batched(q, **kw))
    b = expect_outcome(problems + [count_problem(batch, "batch_size", 1, None)],
                       lambda: s.search_batched_parallel(q, batch_size=batch, **kw))
    singles = [expect_outcome(problems, lambda i=i: s.search(q[i], **kw)) for i in range(nq)]
    if a is None:
        return
    kk = min(n, cfg["num_neighbors"] if k is None else int(k))
    pre_k = int(pre) if pre is not None else (cfg.get("reorder", {}).get(
        "reordering_num_neighbors") or kk)
    all_leaves = min(leaves if leaves is not None else s.num_leaves_to_search,
                     s.num_leaves) == s.num_leaves
    exact_dist = "score_brute_force" in cfg or "reorder" in cfg
    event(f"exact top-k checked: {bool(all_leaves and ('score_brute_force' in cfg or ('reorder' in cfg and pre_k >= n)))}")
    exact_topk = all_leaves and ("score_brute_force" in cfg or ("reorder" in cfg and pre_k >= n))
    check_result(a, db, q, kk, metric, exact_scores_expected=exact_dist, exact_topk=exact_topk)
    # one thread, all threads, one query at a time: bit-identical
    if b is not None:
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.distances, b.distances)
    for i, r in enumerate(singles):
        np.testing.assert_array_equal(r.indices, a.indices[i])
        np.testing.assert_array_equal(r.distances, a.distances[i])


# ---------------------------------------------------------------- search inputs
@pytest.fixture(scope="module")
def searchers():
    rng = np.random.default_rng(5)
    db = rng.normal(size=(300, 5)).astype(np.float32)
    db[10] = db[11]  # duplicate rows
    db[12] = 0  # all-zero row
    out = {}
    for metric in METRICS:
        out[metric] = (db, mipscan.builder(db, 7, metric).tree(8, 3, min_partition_size=1)
                       .score_ah(2).reorder(60).build())
    return out


@FUZZ
@given(metric=st.sampled_from(METRICS), data=st.data(),
       method=st.sampled_from(["search", "search_batched", "search_batched_parallel"]))
def test_fuzz_search_inputs(searchers, metric, data, method):
    db, s = searchers[metric]
    ndim = 1 if method == "search" else 2
    q = data.draw(any_array(ndim, d=5, n_max=6, d_max=7, valid_only=data.draw(st.booleans())))
    name = "q" if method == "search" else "queries"
    problem = array_problem(q, name, (ndim,), 5)
    empty_batch = (ndim == 2 and isinstance(q, np.ndarray) and q.ndim == 2 and q.shape == (0, 5)
                   and q.dtype.kind == "f")
    if empty_batch:  # (0, d) queries: empty (0, k) results, as faiss and hnswlib (issue 13)
        problem = None
    res = expect_outcome([problem], lambda: getattr(s, method)(q))
    if res is None:
        return
    if empty_batch:
        assert res.indices.shape == res.distances.shape == (0, s.num_neighbors)
        return
    q32 = np.asarray(q, np.float32).reshape(-1, 5)
    ids, dist = res
    if method == "search":
        ids, dist = ids[None], dist[None]
    check_result((ids, dist), db, q32, 7, metric, exact_scores_expected=True, exact_topk=False)
    ref = s.search_batched(np.ascontiguousarray(q32))
    np.testing.assert_array_equal(ids, ref.indices)
    np.testing.assert_array_equal(dist, ref.distances)


# ---------------------------------------------------------------- serialize / load
@FUZZ
@given(cfg_db=index_config(), mmap=st.booleans(), verify=st.booleans())
def test_fuzz_serialize_round_trip(cfg_db, mmap, verify, tmp_path_factory):
    db, cfg = cfg_db
    assume(not build_problems(db, cfg))
    s = build(db, cfg)
    path = tmp_path_factory.mktemp("rt") / "idx"
    s.serialize(path)
    s.serialize(path)  # replacing an index by itself
    loaded = mipscan.load_searcher(path, mmap=mmap, verify=verify)
    q = np.concatenate([db[:3], -db[-2:]])
    a, b = s.search_batched(q), loaded.search_batched(q)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)
    assert (loaded.n, loaded.d, loaded.num_leaves, loaded.distance_measure) == (
        s.n, s.d, s.num_leaves, s.distance_measure)
    assert sorted(p.name for p in path.parent.iterdir()) == ["idx"]  # nothing left behind


@FUZZ
@given(directory=st.one_of(st.none(), st.integers(), st.just(""), st.just(b""),
                           st.just("a\0b"), st.sampled_from(["missing", "file", "empty",
                                                             "foreign", "index"])),
       mmap=st.one_of(st.booleans(), st.booleans(), st.booleans(),
                      st.sampled_from([0, 1, "yes", None, np.bool_(True)])),
       verify=st.one_of(st.booleans(), st.booleans(), st.booleans(),
                        st.sampled_from([0, "no", None])))
def test_fuzz_load_and_serialize_arguments(searchers, directory, mmap, verify, tmp_path_factory):
    db, s = searchers["dot_product"]
    root = tmp_path_factory.mktemp("args")
    kind = directory
    if directory == "missing":
        directory = root / "nope"
    elif directory == "file":
        directory = root / "f.txt"
        directory.write_text("x")
    elif directory == "empty":
        directory = root / "empty"
        directory.mkdir()
    elif directory == "foreign":
        directory = root / "foreign"
        directory.mkdir()
        (directory / "notes.txt").write_text("precious")
    elif directory == "index":
        directory = root / "index"
        s.serialize(directory)
    bool_problems = [None if isinstance(mmap, (bool, np.bool_)) else Problem(TypeError, "mmap"),
                     None if isinstance(verify, (bool, np.bool_)) else Problem(TypeError, "verify")]
    if directory is None or isinstance(directory, int):
        dir_problem = Problem(TypeError, "directory")
    elif directory in ("", b"", "a\0b"):
        dir_problem = Problem(ValueError, "directory")
    else:
        dir_problem = None if kind == "index" else Problem(ValueError, str(directory))
    loaded = expect_outcome([dir_problem] + bool_problems,
                            lambda: mipscan.load_searcher(directory, mmap=mmap, verify=verify))
    if loaded is not None:
        np.testing.assert_array_equal(loaded.search_batched(db[:4]).indices,
                                      s.search_batched(db[:4]).indices)
    # serialize: folders that are files or foreign are refused and left untouched
    if kind in ("file", "foreign"):
        before = {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        expect_outcome([Problem(ValueError, "directory" if kind == "file" else "not a mipscan index"
                                ) if kind == "file" else Problem(ValueError, "mipscan index")],
                       lambda: s.serialize(directory))
        assert {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    elif dir_problem is not None and kind not in ("missing", "empty"):
        expect_outcome([dir_problem], lambda: s.serialize(directory))
    elif kind in ("missing", "empty", "index"):
        s.serialize(directory)
        assert mipscan.load_searcher(directory).n == s.n


# ---------------------------------------------------------------- settings
@FUZZ
@given(threads=counts(0, 8), training=counts(0, 8), seed=counts(0, 10),
       big=st.sampled_from([MAX_THREADS, MAX_THREADS + 1, 2**31, 2**40]))
def test_fuzz_thread_and_seed_settings(threads, training, seed, big):
    db = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    b = mipscan.builder(db, 3, "dot_product")
    expect_outcome([count_problem(training, "threads", 0, MAX_THREADS)],
                   lambda: b.set_n_training_threads(training))
    expect_outcome([count_problem(seed, "seed", 0, None)], lambda: b.set_seed(seed))
    s = b.tree(4, 2, min_partition_size=1).score_ah(1).reorder(10).build()
    for value in (threads, big):
        before = s.num_threads
        ok = expect_outcome([count_problem(value, "num_threads", 1, MAX_THREADS)],
                            lambda: s.set_num_threads(value) or True)
        assert s.num_threads == (int(value) if ok else before)
    r = s.search_batched_parallel(db[:5])
    check_result(r, db, db[:5], 3, "dot_product", exact_scores_expected=True,
                 exact_topk=False)


# ---------------------------------------------------------------- Keras layer (JAX)
@pytest.fixture(scope="module")
def keras_jax():
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("the Keras fuzz runs on the JAX backend")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("keras was imported with another backend")
    pytest.importorskip("keras_rs")
    import mipscan.keras as mk

    return keras, mk


@st.composite
def keras_candidates(draw):
    valid = draw(st.booleans())  # half the examples: valid candidates (for k <= 6)
    n = draw(st.integers(6 if valid else 0, 14))
    d = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["normal", "normal", "int-like", "dupes", "zeros"]
                                + ([] if valid else ["nan", "overflow"])))
    v = draw(values((n, d), kind))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16, np.int32,
                                  np.bool_] + ([] if valid else [object])))
    with np.errstate(all="ignore"):
        emb = v.astype(dtype)
    if not valid and draw(st.integers(0, 6)) == 0:
        emb = emb.reshape(-1)  # wrong rank
    ids_kind = draw(st.sampled_from(["none", "none", "ok", "ok", "float"] + (
        [] if valid else ["short", "huge", "2d", "str"])))
    ids = {"none": None,
           "ok": np.arange(100, 100 + n, dtype=np.int64)[::-1].copy(),
           "short": np.arange(max(n - 1, 0)),
           "float": np.arange(n, dtype=np.float64) + 0.5,
           "huge": np.full(n, 2**40, np.int64),
           "2d": np.zeros((n, 2), np.int32),
           "str": np.array([str(i) for i in range(n)])}[ids_kind]
    return emb, ids, ids_kind


@FUZZ
@given(cands=keras_candidates(), k=st.one_of(st.integers(1, 6), st.integers(1, 6),
                                            st.sampled_from([0, -1, True, 2.0, None])),
       metric=st.sampled_from(METRICS * 3 + ("hamming",)), return_scores=st.booleans(),
       data=st.data())
def test_fuzz_keras_layer(keras_jax, cands, k, metric, return_scores, data):
    keras, mk = keras_jax
    emb, ids, ids_kind = cands
    problems = []
    if isinstance(k, bool) or not isinstance(k, int):
        problems.append(Problem((TypeError, ValueError), "k"))
    elif k < 1:
        problems.append(Problem((TypeError, ValueError), "k"))
    if metric not in METRICS:
        problems.append(Problem(ValueError, "distance_measure"))
    n = emb.shape[0]
    emb_bad = emb.dtype == object or emb.ndim != 2 or emb.size == 0
    if not emb_bad:
        e32 = emb.astype(np.float32)
        emb_bad = not np.isfinite(e32).all()
        if not emb_bad and np.abs(e32).max() > max_abs_value(emb.shape[1]):
            # mipscan.builder refuses it (naming its `db`, the layer's candidates)
            problems.append(Problem(ValueError, "db"))
    if emb_bad:
        problems.append(Problem(ValueError, "candidate_embeddings"))
    if isinstance(k, int) and not isinstance(k, bool) and emb.ndim == 2 and n < k:
        problems.append(Problem(ValueError, "k"))
    if ids_kind in ("short", "huge", "2d", "str", "float"):  # float: 0.5, 1.5, ...
        problems.append(Problem(ValueError, "candidate_ids"))
    if ids_kind in ("short",):
        problems.append(Problem(ValueError, "candidate_embeddings"))
    layer = expect_outcome(problems, lambda: mk.ApproximateRetrieval(
        emb, ids, k=k, return_scores=return_scores, distance_measure=metric))
    if layer is None:
        return
    d = emb.shape[1]
    nq = data.draw(st.integers(0, 5))
    qdim = data.draw(st.sampled_from([d] * 5 + [d + 1]))
    q = data.draw(values((nq, qdim), data.draw(st.sampled_from(["normal", "zeros", "nan",
                                                                "overflow"]))))
    qdtype = data.draw(st.sampled_from(["float32", "float64", "float16", "int32"]))
    with np.errstate(all="ignore"):
        q = q.astype(qdtype)
    with np.errstate(all="ignore"):
        q32 = q.astype(np.float32)
    bad_q = qdim != d or (nq and (not np.isfinite(q32).all()
                                  or np.abs(q32).max() > max_abs_value(d)))
    if bad_q:
        # eager call: a ValueError naming the queries (`inputs`; `queries` when
        # mipscan's own check of the magnitude fires inside the layer)
        with pytest.raises(ValueError) as info:
            layer(keras.ops.convert_to_tensor(q))
        assert re.search(r"inputs|queries", str(info.value)), str(info.value)
        return
    out = layer(keras.ops.convert_to_tensor(q))
    scores, top = out if return_scores else (None, out)
    top = np.asarray(top)
    assert top.shape == (nq, k)
    if nq == 0:
        return
    e32 = emb.astype(np.float32)
    q32 = q.astype(np.float32)
    truth = mipscan.brute_force(e32, q32, k, metric)
    rows = truth.indices
    if ids_kind == "ok":
        mapping = {int(i): r for r, i in enumerate(ids)}
        got_rows = np.vectorize(lambda i: mapping[int(i)])(top)
    else:
        got_rows = top.astype(np.int64)
    assert ((got_rows >= 0) & (got_rows < n)).all()
    exact = exact_scores(e32, q32, got_rows, metric)
    tol = tolerance(e32, q32, metric) * 4
    np.testing.assert_allclose(exact, exact_scores(e32, q32, rows.astype(np.int64), metric),
                               rtol=0, atol=tol)
    if scores is not None:
        np.testing.assert_allclose(np.asarray(scores, np.float64), exact, rtol=0, atol=tol)
