"""The benchmark harness runs end to end on tiny synthetic data: its structure, and its recalls
and ratios recomputed independently from what the systems return (never timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.worker import recall_at_k  # noqa: E402

pytest.importorskip("threadpoolctl")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick",
           "--dataset", "synthetic:n=2000,d=16,nq=40,copies=10",
           "--systems", "mipscan,scann,faiss,hnswlib,numpy", "--threads", "1,2",
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0], proc.stdout


def test_quick_run_structure(quick_run):
    result, path, _ = quick_run
    assert {"date", "command", "dataset", "env", "config", "systems", "summary"} <= set(result)
    assert result["dataset"]["n"] == 2000 and result["dataset"]["nq"] == 40
    assert result["env"]["cores"] >= 1 and result["env"]["cpu"]
    assert "mipscan_simd_level" in result["env"]
    assert result["config"]["threads"] == [1, 2]
    machine = result["env"]["machine_thread_scaling"]["2"]
    assert len(machine["rounds"]) == 1 and 0 < machine["median"] == machine["rounds"][0] < 4
    assert path.with_suffix(".md").exists() and path.with_suffix(".png").exists()
    names = [s["name"] for s in result["systems"]]
    assert names[:2] == ["mipscan", "mipscan-bf"] and "numpy" in names


def test_quick_run_points(quick_run):
    result, _, stdout = quick_run
    ran = 0
    for s in result["systems"]:
        assert "error" not in s, f"{s['name']} failed:\n{s['error']}"
        if "skipped" in s:
            assert s["skipped"] and s["skipped"] in stdout
            continue
        ran += 1
        assert s["build"]["seconds"] >= 0 and s["build"]["index_bytes"] > 0
        assert s["points"], s["name"]
        for p in s["points"]:
            assert 0.0 <= p["recall"] <= 1.0 and 0.0 <= p["recall_ids"] <= 1.0
            assert p["qps_single"] > 0
            assert set(p["qps_batched"]) == {"1", "2"} and min(p["qps_batched"].values()) > 0
            assert set(p["paired_scaling"]) == {"2"} and p["paired_scaling"]["2"] > 0
            if s["exact"]:
                assert p["recall"] == 1.0, (s["name"], p)
    assert ran >= 1  # numpy never skips
    numpy_run = next(s for s in result["systems"] if s["name"] == "numpy")
    assert numpy_run["points"][0]["recall"] == 1.0


def recount_recall(train, queries, ids, k):
    """(recall, recall_ids) of ``ids`` from float64 brute force, written apart from the
    harness's ``recall_at_k``/``exact_neighbors``: a hit is a distinct returned id whose exact
    score is at least the k-th best exact score (rel. tol 1e-5); recall_ids intersects with
    the ids of the k best exact scores."""
    scores = np.einsum("qd,nd->qn", queries.astype(np.float64), train.astype(np.float64))
    kth = -np.sort(-scores, axis=1)[:, k - 1]
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = hits_ids = 0
    for row, got in enumerate(np.asarray(ids, np.int64)[:, :k]):
        distinct = {int(i) for i in got if 0 <= i < train.shape[0]}
        hits += sum(scores[row, i] >= kth[row] - 1e-5 * (1 + abs(kth[row])) for i in distinct)
        hits_ids += len(distinct & set(best[row].tolist()))
    return hits / (len(ids) * k), hits_ids / (len(ids) * k)


# Variants whose build is deterministic (seeded, or no build), so rebuilding one here gives
# the index the harness measured.
RECOUNTED = ("mipscan", "mipscan-bf", "numpy", "faiss-flat")


def test_recorded_recall_equals_recount_from_returned_ids(quick_run):
    """The harness's recall of each point equals the recall of the ids the same variant
    returns here for the same data and knobs, counted against brute force by other code."""
    from benchmarks import datasets, systems
    from benchmarks.common import pinned_threads

    result, _, _ = quick_run
    ds = datasets.load(result["dataset"]["spec"])
    assert ds.metric == result["dataset"]["metric"] == "dot_product"
    assert (ds.train.shape[0], ds.test.shape[0]) == (result["dataset"]["n"],
                                                     result["dataset"]["nq"])
    cfg = result["config"]
    recounted = []
    for s in result["systems"]:
        if s["name"] not in RECOUNTED or not s.get("points"):
            continue
        v = systems.make(s["name"], cfg)
        with pinned_threads(cfg["build_threads"]):
            v.build(ds.train)
        for p in s["points"]:
            with pinned_threads(1):
                ids = v.search_batched(ds.test, p["knobs"], 1)
            want = recount_recall(ds.train, ds.test, ids, cfg["k"])
            assert (p["recall"], p["recall_ids"]) == pytest.approx(want, abs=1e-12), \
                (s["name"], p["knobs"], want)
        recounted.append(s["name"])
    assert {"mipscan", "numpy"} <= set(recounted), recounted
    # The approximate search really was approximate somewhere on its grid (otherwise the
    # recount above could not tell a harness that counts everything as a hit).
    assert min(p["recall"] for s in result["systems"] if s["name"] == "mipscan"
               for p in s["points"]) < 1.0


def test_quick_run_summary_recomputed_from_points(quick_run):
    """Each summary cell is the fastest point at or above its target recall, and each ratio
    is mipscan's QPS over the system's QPS at that target, both from this run's points."""
    result, _, _ = quick_run
    summary = result["summary"]
    modes = ["single"] + [f"batched:{t}" for t in result["config"]["threads"]]
    assert set(summary) == set(modes) | {"scaling"}
    with_points = {s["name"]: s["points"] for s in result["systems"] if s.get("points")}
    for mode in modes:
        assert set(summary[mode]) == set(with_points)
        for name, points in with_points.items():
            for t in report.TARGETS:
                speed = [p["qps_single"] if mode == "single"
                         else p["qps_batched"][mode.split(":")[1]] for p in points]
                ok = [i for i, p in enumerate(points) if p["recall"] >= t]
                cell = summary[mode][name][f"{t:.2f}"]
                if not ok:
                    assert cell is None, (mode, name, t)
                    continue
                best = max(ok, key=lambda i: speed[i])
                assert cell["qps"] == speed[best] and cell["recall"] == points[best]["recall"]
                assert cell["knobs"] == points[best]["knobs"]
                refs = [summary[mode][v][f"{t:.2f}"] for v in report.REFERENCE_VARIANTS
                        if summary[mode].get(v, {}).get(f"{t:.2f}")]
                if not refs:
                    assert "ratio" not in cell
                else:
                    ref = max(refs, key=lambda c: c["qps"])
                    assert cell["ratio"] == ref["qps"] / speed[best], (mode, name, t)
                    assert cell.get("reference", False) == (cell is ref), (mode, name, t)
    # Thread scaling: at the reference's fastest 2-thread point per target, that point's
    # paired ratio (one round and one timed run per thread count here: its 2-thread QPS
    # over its 1-thread QPS, up to rounding).
    for t, c in summary["scaling"]["2"].items():
        assert summary["batched:2"][c["variant"]][t].get("reference"), (t, c)
        p = next(p for p in with_points[c["variant"]] if p["knobs"] == c["knobs"])
        assert c["ratio"] == p["paired_scaling"]["2"]
        assert c["ratio"] == pytest.approx(p["qps_batched"]["2"] / p["qps_batched"]["1"])
    assert summary["scaling"]["2"], "no 2-thread point reached a target"
    assert summary["single"]["mipscan"]["0.90"] is not None, "mipscan never reached 0.90"
    assert summary["single"]["mipscan"]["0.90"]["ratio"] == 1.0
    assert "| single query, 1 thread |" in report.markdown(result)


def test_recall_counts_ties_and_duplicates():
    train = np.array([[1.0, 0], [1.0, 0], [0.5, 0], [0.0, 1]], np.float32)
    queries = np.array([[1.0, 0]], np.float32)
    gt = np.array([[0, 2]])
    kth = np.array([0.5])
    # id 1 ties id 0: a hit by score, not by id; a repeated id counts once; -1 is a miss.
    assert recall_at_k(train, queries, np.array([[1, 2]]), gt, kth, "dot_product") == (1.0, 0.5)
    assert recall_at_k(train, queries, np.array([[2, 2]]), gt, kth, "dot_product") == (0.5, 0.5)
    assert recall_at_k(train, queries, np.array([[0, -1]]), gt, kth, "dot_product") == (0.5, 0.5)
    assert recall_at_k(train, queries, np.array([[3, 0]]), gt, kth, "dot_product") == (0.5, 0.5)


def test_at_target_and_front():
    pts = [{"recall": r, "qps_single": q, "qps_batched": {"1": q}}
           for r, q in ((0.8, 100.0), (0.92, 50.0), (0.96, 60.0), (0.99, 10.0))]
    assert report.at_target(pts, "single", 0.90)["qps_single"] == 60.0
    assert report.at_target(pts, "batched:1", 0.99)["qps_single"] == 10.0
    assert report.at_target(pts, "single", 0.995) is None
    assert [p["recall"] for p in report.front(pts, "single")] == [0.8, 0.96, 0.99]


def test_best_of_rounds_keeps_each_points_best_timing():
    from benchmarks.run import best_of_rounds

    def run(build_s, qps):
        return {"name": "x", "build": {"seconds": build_s},
                "points": [{"knobs": {"a": i}, "recall": 0.5, "foreign_cores": 0.0,
                            "qps_single": q, "qps_single_best": q,
                            "qps_batched": {"1": q, "2": 2 * q},
                            "qps_batched_best": {"1": q, "2": 2 * q}} for i, q in enumerate(qps)]}

    best = best_of_rounds([run(2.0, [10, 40]), run(1.5, [30, 20]), {"name": "x", "error": "boom"}])
    assert best["rounds"] == 2 and best["build"]["seconds"] == 1.5
    assert [p["qps_single"] for p in best["points"]] == [30, 40]
    assert [p["qps_batched"]["2"] for p in best["points"]] == [60, 80]
    assert [p["recall"] for p in best["points"]] == [0.5, 0.5]
    skipped = {"name": "x", "skipped": "not installed"}
    assert best_of_rounds([skipped]) is skipped


def test_thread_scaling_is_taken_within_each_round():
    """2 threads / 1 thread within each round, the median over rounds; not the best
    2-thread round over the best 1-thread round, which divides one round's speed by
    another's (point 0: 2.0x that way, rounds 1.0x, 1.5x, 3.0x; point 1: 1.2x that way,
    rounds 1.2x, 1.8x, 1.9x)."""
    from benchmarks.run import best_of_rounds

    def run(points):
        return {"name": "x", "build": {"seconds": 1.0},
                "points": [{"knobs": {"a": i}, "recall": 0.5, "foreign_cores": 0.0,
                            "qps_single": one, "qps_single_best": one,
                            "qps_batched": {"1": one, "2": two},
                            "qps_batched_best": {"1": one, "2": two}}
                           for i, (one, two) in enumerate(points)]}

    best = best_of_rounds([run([(10, 10), (30, 36)]), run([(30, 45), (20, 36)]),
                           run([(20, 60), (5, 9.5)])])
    assert best["points"][0]["thread_scaling"] == {"2": pytest.approx(1.5)}
    assert best["points"][1]["thread_scaling"] == {"2": pytest.approx(1.8)}
    assert best["points"][0]["qps_batched"] == {"1": 30, "2": 60}  # best of each, as before
    assert best_of_rounds([run([(10, 19)])])["points"][0]["thread_scaling"] == {"2": 1.9}


def test_thread_scaling_prefers_each_rounds_paired_runs():
    """Where the worker timed 1 and 2 threads in turns ("paired_scaling", the median of the
    adjacent runs' ratios), that ratio is the round's, not its two medians' quotient."""
    from benchmarks.run import best_of_rounds

    def run(one, two, paired):
        return {"name": "x", "build": {"seconds": 1.0},
                "points": [{"knobs": {"a": 0}, "recall": 0.5, "foreign_cores": 0.0,
                            "qps_single": one, "qps_single_best": one,
                            "qps_batched": {"1": one, "2": two},
                            "qps_batched_best": {"1": one, "2": two},
                            "paired_scaling": {"2": paired}}]}

    best = best_of_rounds([run(10, 30, 1.9), run(30, 45, 1.8), run(20, 20, 1.95)])
    assert best["points"][0]["thread_scaling"] == {"2": pytest.approx(1.9)}


def test_ratios_take_the_faster_mipscan_variant_at_each_target():
    def pts(*rq):
        return [{"recall": r, "qps_single": q, "qps_batched": {"1": q}, "knobs": {"i": i}}
                for i, (r, q) in enumerate(rq)]

    result = {"config": {"threads": [1]}, "systems": [
        {"name": "mipscan", "points": pts((0.91, 300.0), (0.96, 100.0))},
        {"name": "mipscan-ah1", "points": pts((0.92, 200.0), (0.97, 150.0))},
        {"name": "hnswlib-M16", "points": pts((0.95, 60.0))},
    ]}
    single = report.summarize(result)["single"]
    # 0.90: mipscan (300) is the reference; 0.95: mipscan-ah1 (150) is.
    assert single["mipscan"]["0.90"]["reference"] and "reference" not in single["mipscan-ah1"]["0.90"]
    assert single["mipscan-ah1"]["0.90"]["ratio"] == 1.5
    assert single["mipscan-ah1"]["0.95"]["reference"] and single["mipscan"]["0.95"]["ratio"] == 1.5
    assert single["hnswlib-M16"]["0.95"]["ratio"] == 2.5
    assert single["hnswlib-M16"]["0.90"]["ratio"] == 5.0
    assert single["mipscan"]["0.99"] is None and "ratio" not in str(single["hnswlib-M16"]["0.99"])
    table = report.markdown(dict(result, dataset={"name": "t", "n": 1, "d": 1, "metric": "m", "nq": 1},
                                 env={"cpu": "c", "cores": 1, "loadavg_start": [0], "versions": {}},
                                 config={"threads": [1], "k": 10, "repeats": 1, "nq_single": 1},
                                 command="x", date="d", systems=[],
                                 summary=report.summarize(result)), heading="#")
    assert "| mipscan | **300** | 100 (1.50x) | — |" in table


def test_ah1_variants_use_one_dimension_per_code():
    from benchmarks import run, systems

    for family in ("mipscan", "scann", "scann-core", "faiss"):
        names = run.variants(family, quick=False)
        assert any(n.endswith(systems.AH1) for n in names), names
        assert not any(n.endswith(systems.AH1) for n in run.variants(family, quick=True))
    cfg = {"k": 10, "metric": "dot_product", "d": 8, "num_leaves": 4, "leaves_to_search": 2,
           "training_sample_size": 100, "training_iterations": 2, "dims_per_block": 2,
           "aq_threshold": 0.2, "reorder": 20}
    v = systems.make("mipscan-ah1", cfg)
    assert v.name == "mipscan-ah1" and v.build_params()["dimensions_per_block"] == 1
    assert systems.make("mipscan", cfg).build_params()["dimensions_per_block"] == 2
    assert cfg["dims_per_block"] == 2  # the run's own config is not changed
    # faiss's factory at one dimension per code (formed without importing faiss)
    ah1 = types.SimpleNamespace(cfg=dict(cfg, dims_per_block=1))
    assert systems.FaissIVF.factory_string(ah1, 8) == "IVF4,PQ8x4fs,RFlat"
    assert systems.FaissIVF.factory_string(types.SimpleNamespace(cfg=cfg), 8) == "IVF4,PQ4x4fs,RFlat"
    for name in ("hnswlib-ah1", "mipscan-bf-ah1", "numpy-ah1"):  # no 4-bit codes to widen
        with pytest.raises(ValueError, match="unknown variant"):
            systems.make(name, cfg)
    # a variant named itself and through its family runs once
    assert run.variants("scann,scann-ah1,mipscan-ah1,mipscan", quick=False) == [
        "scann", "scann-ah1", "mipscan-ah1", "mipscan", "mipscan-bf"]
