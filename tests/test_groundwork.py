"""The groundwork every later feature stands on: the index owns its data, searchers own
their threads and pickle, one auto-configuration policy, both centroid-scoring paths,
and an import graph without cycles."""

from __future__ import annotations

import ast
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mipscan
import mipscan.searcher as searcher_module
from mipscan._threads import _cgroup_cpu_limit

SRC = Path(mipscan.__file__).resolve().parent


def clustered(rng, n, d, centers=50, nq=100):
    c = rng.normal(size=(centers, d)).astype(np.float32)
    db = (c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    q = (c[rng.integers(0, centers, nq)] + 0.3 * rng.normal(size=(nq, d))).astype(np.float32)
    return db, q


CONFIGS = {
    "dot_ah_reorder": lambda b: b.tree(20, 5).score_ah(2).reorder(50),
    "dot_bf": lambda b: b.tree(20, 5).score_brute_force(),
    "l2_ah_reorder": lambda b: b.tree(20, 5).score_ah(2).reorder(50),
    "cos_ah": lambda b: b.tree(20, 5).score_ah(1),
}


# ---------------------------------------------------------------- the index owns its data
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_changing_the_callers_array_after_build_changes_nothing(rng, name):
    db, q = clustered(rng, 3000, 8)
    metric = {"l2": "squared_l2", "cos": "cosine"}.get(name.split("_")[0], "dot_product")
    s = CONFIGS[name](mipscan.builder(db, 10, metric)).build()
    before = s.search_batched(q)
    db[:] = 0
    db[::7] = 5.0
    after = s.search_batched(q)
    np.testing.assert_array_equal(before.indices, after.indices)
    np.testing.assert_array_equal(before.distances, after.distances)
    for arr in s._arrays.values():
        assert not np.shares_memory(arr, db)


def test_copy_false_keeps_the_callers_rows_as_documented(rng):
    db, q = clustered(rng, 3000, 8)
    s = mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(50).build(copy=False)
    assert np.shares_memory(s._arrays["reorder_rows"], db)
    copied = mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(50).build()
    np.testing.assert_array_equal(s.search_batched(q).indices, copied.search_batched(q).indices)


def test_build_rechecks_the_array_it_was_given(rng):
    db, _ = clustered(rng, 500, 4)
    b = mipscan.builder(db, 5, "dot_product").score_brute_force()
    db[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"build\(\): db contains NaN or inf \(first at index \(3, 1\)\)"):
        b.build()


# ---------------------------------------------------------------- threads and pickling
def test_searcher_pickles_to_identical_results(rng, tmp_path):
    db, q = clustered(rng, 3000, 8)
    s = mipscan.builder(db, 10, "squared_l2").tree(20, 5, soar_lambda=1.0).score_ah(2).reorder(60).build()
    s.set_num_threads(2)
    ref = s.search_batched(q)
    for copy in (pickle.loads(pickle.dumps(s)),
                 pickle.loads(pickle.dumps(_serialized(s, tmp_path / "ix")))):
        assert copy.num_threads == s.num_threads or copy.num_threads == mipscan.get_num_threads()
        got = copy.search_batched(q)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_array_equal(got.distances, ref.distances)
    # ... and in another process, as multiprocessing or Ray would send it.
    (tmp_path / "s.pkl").write_bytes(pickle.dumps(s))
    np.save(tmp_path / "q.npy", q)
    code = textwrap.dedent(f"""
        import pickle, numpy as np
        s = pickle.loads(open({str(tmp_path / 's.pkl')!r}, 'rb').read())
        r = s.search_batched(np.load({str(tmp_path / 'q.npy')!r}))
        np.save({str(tmp_path / 'ids.npy')!r}, r.indices)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ref.indices)


def test_unpickling_checks_the_state_like_the_loader(rng):
    db, q = clustered(rng, 2000, 8)
    s = mipscan.builder(db, 10, "dot_product").tree(10, 3).score_ah(2).reorder(40).build()
    state = s.__getstate__()
    for name, change in [("centroids", lambda a: a.__setitem__((0, 0), np.nan)),
                         ("leaf_offsets", lambda a: a.__setitem__(1, 10**9)),
                         ("slot_ids", lambda a: a.__setitem__(0, 10**6)),
                         ("reorder_rows", lambda a: a.__setitem__((3, 3), np.inf))]:
        arrays = {k: np.array(v) for k, v in state["arrays"].items()}
        change(arrays[name])
        bad = dict(state, arrays=arrays)
        with pytest.raises(ValueError, match=rf"Searcher.__setstate__\(\).*{name}"):
            pickle.loads(pickle.dumps(s)).__setstate__(bad)
    with pytest.raises(ValueError, match="config.n"):
        pickle.loads(pickle.dumps(s)).__setstate__(dict(state, config=dict(state["config"], n=-1)))


def _serialized(s, path):
    s.serialize(path)
    return mipscan.load_searcher(path, mmap=True)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC.parent)] + env.get("PYTHONPATH", "").split(os.pathsep))
    env.update(extra)
    return env


def _threads_in_subprocess(env_value=None, affinity=None):
    setup = f"import os; os.sched_setaffinity(0, {affinity!r}); " if affinity else ""
    env = _env()
    env.pop("MIPSCAN_NUM_THREADS", None)
    if env_value is not None:
        env["MIPSCAN_NUM_THREADS"] = env_value
    return subprocess.run([sys.executable, "-c", setup + "import mipscan; print(mipscan.get_num_threads())"],
                          env=env, capture_output=True, text=True)


def test_thread_count_follows_affinity_and_the_environment():
    out = _threads_in_subprocess(affinity={0})
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    out = _threads_in_subprocess("3")
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr
    for bad in ("0", "two", "1025", "-1"):
        out = _threads_in_subprocess(bad)
        assert out.returncode != 0
        assert f"MIPSCAN_NUM_THREADS must be an int in [1, 1024]; got {bad!r}" in out.stderr


def test_cgroup_quota_is_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_limit(tmp_path) == 1


def test_thread_count_belongs_to_the_searcher(rng):
    db, q = clustered(rng, 2000, 8)
    a = mipscan.builder(db, 10, "dot_product").tree(10, 3).score_ah(2).reorder(40).build()
    b = mipscan.builder(db, 10, "dot_product").tree(10, 3).score_ah(2).reorder(40).build()
    a.set_num_threads(1)
    b.set_num_threads(2)
    assert (a.num_threads, b.num_threads) == (1, 2)
    np.testing.assert_array_equal(a.search_batched_parallel(q).indices,
                                  b.search_batched_parallel(q).indices)
    assert not hasattr(mipscan, "set_num_threads")  # no process-wide setting


# ---------------------------------------------------------------- one policy
@pytest.mark.parametrize("n", [500, 9_999, 10_000, 270_882])
def test_autopilot_builds_what_suggest_config_says(n):
    cfg = mipscan.suggest_config(n, 32, k=10)
    db = np.zeros((n, 32), np.float32)
    auto = mipscan.builder(db, 10, "dot_product").autopilot()
    manual = mipscan.builder(db, 10, "dot_product")
    for stage, kwargs in cfg.items():
        manual = getattr(manual, stage)(**kwargs)
    a, m = auto.create_config(), manual.create_config()
    a.pop("autopilot")
    assert a == m
    if n < 10_000:
        assert list(cfg) == ["score_brute_force"]
    else:
        # d = 32: one dimension per code, a third of the leaves and 150 for 0.95
        assert cfg["tree"]["num_leaves"] == round(n ** 0.5)
        assert cfg["score_ah"]["dimensions_per_block"] == 1
        assert cfg["reorder"]["reordering_num_neighbors"] == 150
        assert cfg["tree"]["num_leaves_to_search"] == math.ceil(0.33 * cfg["tree"]["num_leaves"])
    low = mipscan.suggest_config(n, 32, k=20, target_recall=0.9)
    if n >= 10_000:
        assert low["reorder"]["reordering_num_neighbors"] == 200  # 100 at k=10, scaled by k
        assert low["tree"]["num_leaves_to_search"] < cfg["tree"]["num_leaves_to_search"]
        wide = mipscan.suggest_config(n, 65, k=10)  # wider than AH1_MAX_D: two per code
        assert wide["score_ah"]["dimensions_per_block"] == 2
        assert wide["reorder"]["reordering_num_neighbors"] == 500
        assert wide["tree"]["num_leaves_to_search"] == -(-wide["tree"]["num_leaves"] // 4)


def test_suggest_config_validates():
    with pytest.raises(ValueError, match=r"suggest_config\(\): k must be an int in \[1, 5\]; got 6"):
        mipscan.suggest_config(5, 3, k=6)
    with pytest.raises(TypeError, match="n must be an int"):
        mipscan.suggest_config(5.0, 3)
    with pytest.raises(ValueError, match="distance_measure"):
        mipscan.suggest_config(5, 3, 1, "l1")
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target_recall"):
            mipscan.suggest_config(5, 3, 1, target_recall=bad)


# ---------------------------------------------------------------- centroid scoring paths
@pytest.fixture(scope="module")
def many_leaves():
    """More leaves than the BLAS path's threshold, so batched searches take it."""
    db, q = clustered(np.random.default_rng(7), 30_000, 16, centers=300, nq=200)
    s = (mipscan.builder(db, 10, "dot_product")
         .tree(4200, 200, min_partition_size=1, training_iterations=3).score_ah(2).reorder(100)
         .build())
    assert s.num_leaves >= searcher_module._BLAS_LEAF_SCORES_MIN_LEAVES
    return s, q


def test_blas_and_core_centroid_scores_give_identical_results(many_leaves, monkeypatch):
    s, q = many_leaves
    blas = s.search_batched_parallel(q)
    monkeypatch.setattr(searcher_module, "_BLAS_LEAF_SCORES_MIN_LEAVES", 10**9)
    core = s.search_batched_parallel(q)
    np.testing.assert_array_equal(blas.indices, core.indices)
    np.testing.assert_array_equal(blas.distances, core.distances)
    exact = mipscan.brute_force(s._arrays["reorder_rows"], q, 10).indices
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(core.indices, exact)])
    assert recall >= 0.9, f"recall@10 {recall:.3f} < 0.9"


@pytest.mark.parametrize("leaves_threshold", [1, 10**9])
def test_results_do_not_depend_on_batch_size(many_leaves, monkeypatch, leaves_threshold):
    s, q = many_leaves
    monkeypatch.setattr(searcher_module, "_BLAS_LEAF_SCORES_MIN_LEAVES", leaves_threshold)
    ref = s.search_batched(q)
    for batch_size in (1, 7, 64, 500):
        got = s.search_batched_parallel(q, batch_size=batch_size)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_array_equal(got.distances, ref.distances)
    single = np.stack([s.search(row).indices for row in q[:20]])
    np.testing.assert_array_equal(single, ref.indices[:20])


# ---------------------------------------------------------------- the import graph
# Integrations may import optional dependencies (and each other) inside functions; the
# core modules import each other at the top only, so a cycle cannot hide.
INTEGRATIONS = {"keras", "cli", "recsys", "serve", "distributed", "__main__"}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield "mipscan" + "".join("." + p for p in parts), path


def _mipscan_imports(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mipscan"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
            and node.module.split(".")[0] == "mipscan":
        if node.module == "mipscan":
            return ["mipscan." + a.name for a in node.names]
        return [node.module]
    return []


def test_core_import_graph_has_no_cycle_and_no_hidden_imports():
    graph, hidden = {}, []
    for name, path in _modules():
        tree = ast.parse(path.read_text())
        top = set()
        for node in tree.body:
            top.update(_mipscan_imports(node))
        graph[name] = {m for m in top if m != name and not m.startswith(name + ".")}
        if name == "mipscan" or name.split(".")[1] in INTEGRATIONS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    hidden += [f"{name} imports {m} inside {node.name}()"
                               for m in _mipscan_imports(inner)]
    assert not hidden, hidden
    state: dict[str, int] = {}

    def visit(m, stack):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack + [m]))
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            if dep != "mipscan":  # the package itself: its __init__ imports the API
                visit(dep, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_index_arrays_are_read_only(rng):
    # The core trusts the integer arrays it checked when the searcher was made: they must
    # not be writable through the searcher afterwards.
    db, q = clustered(rng, 2000, 8)
    s = mipscan.builder(db, 10, "dot_product").tree(10, 3).score_ah(2).reorder(40).build(copy=False)
    for name, a in s._arrays.items():
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
    db[0] = 1.0  # the caller's own array stays writable (copy=False shares it)
    assert mipscan.simd_levels()[0] == "scalar" and mipscan.simd_level() in mipscan.simd_levels()
