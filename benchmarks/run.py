"""Recall@10-QPS fronts of mipscan, ScaNN, faiss, hnswlib and exact numpy on one dataset.

Example (from the repository root)::

    python -m benchmarks.run --dataset glove-50-dev --systems mipscan,scann,faiss,hnswlib,numpy \
        --threads 1,2 --out benchmarks/results --update-readme

Each variant runs in its own subprocess (:mod:`benchmarks.worker`): build with
``--build-threads`` threads, then for every point of its knob sweep: recall@10 against the
exact neighbours, batched QPS per ``--threads`` count and single-query QPS with one thread.
Writes ``<out>/<dataset>.json`` (every point), ``.md`` (summary tables) and ``.png`` (fronts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import datasets, report, systems
from benchmarks.common import REPO, environment, machine_thread_scaling, wait_for_quiet


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Recall@10-QPS fronts of mipscan and its peers on one dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", default="glove-50-dev",
                    help="seed | glove-50-dev[:angular] | PATH.hdf5[:metric] | "
                         "synthetic:n=..,d=..,nq=..[,seed=..,copies=..]")
    ap.add_argument("--systems", default=",".join(systems.FAMILIES),
                    help="comma list of families (" + ", ".join(systems.FAMILIES)
                         + ") or single variants (" + ", ".join(
                             v for vs in systems.FAMILIES.values() for v in vs) + ")")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                    help="thread counts for batched QPS (single-query QPS always uses 1)")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="results", help="output folder")
    ap.add_argument("--nq", type=int, default=1000,
                    help="queries used (a seeded random subset when the set has more)")
    ap.add_argument("--nq-single", type=int, default=300,
                    help="queries timed one at a time for single-query QPS")
    ap.add_argument("--max-n", type=int, default=None,
                    help="use only the first N base vectors (ground truth recomputed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    ap.add_argument("--num-leaves", type=int, default=None,
                    help="tree leaves / IVF lists (default: 100 for seed, else ~sqrt(n))")
    ap.add_argument("--leaves-grid", default=None, help="comma list of leaves_to_search/nprobe")
    ap.add_argument("--reorder-grid", default=None,
                    help="comma list of pre_reorder_num_neighbors (faiss: k_factor = it / k)")
    ap.add_argument("--ef-grid", default=None, help="comma list of hnswlib ef")
    ap.add_argument("--aq-threshold", type=float, default=0.2,
                    help="anisotropic_quantization_threshold of score_ah (mipscan and ScaNN)")
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list of systems this many times, interleaved "
                         "(A B C, A B C, ...), and keep each point's best round: this VM's "
                         "speed drifts by tens of percent over minutes, and interleaving "
                         "gives every system the same chance of a quiet round")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run in under 2 minutes: 200 queries, at most 20,000 base "
                         "vectors, small grids, one timed run, hnswlib M=16 only")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other systems of an existing <out>/<dataset>.json made with "
                         "the same settings, replacing only the systems run now")
    ap.add_argument("--update-readme", action="store_true",
                    help="rewrite README.md's bench section from benchmarks/results/")
    ap.add_argument("--python", action="append", default=[], metavar="SYSTEM=PATH",
                    help="run SYSTEM's worker with this Python (its own venv), e.g. "
                         "scann-core=/work/venv-scann-core/bin/python; repeatable")
    ap.add_argument("--scann-core-python", default=os.environ.get("MIPSCAN_BENCH_SCANN_CORE_PYTHON"),
                    help="shorthand for --python scann-core=PATH (default: the environment "
                         "variable MIPSCAN_BENCH_SCANN_CORE_PYTHON)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="before each variant, wait up to this many seconds for other "
                         "processes to use under 0.3 cores (the machine is shared)")
    args = ap.parse_args(argv)
    args.pythons = {}
    if args.scann_core_python:
        args.pythons["scann-core"] = args.scann_core_python
    for item in args.python:
        system, sep, path = item.partition("=")
        if not sep or not path:
            ap.error(f"--python takes SYSTEM=PATH; got {item!r}")
        args.pythons[system] = path
    return args


def python_for(name: str, args) -> str:
    """The interpreter that runs variant ``name``: its own (``--python``), its family's,
    or this one."""
    return args.pythons.get(name) or args.pythons.get(family_of(name)) or sys.executable


def variants(spec: str, quick: bool) -> list[str]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in systems.FAMILIES:
            names = systems.FAMILIES[item]
            if quick:  # one hnswlib, one code width
                names = [n for n in names if not n.endswith(systems.AH1)]
                names = names[:1] if item == "hnswlib" else names
            out += names
        elif any(item in vs for vs in systems.FAMILIES.values()) or item.startswith("hnswlib-M"):
            out.append(item)
        else:
            raise SystemExit(f"unknown system {item!r}; known: {', '.join(systems.FAMILIES)}")
    return list(dict.fromkeys(out))  # a variant named twice (as itself and in its family) runs once


def family_of(variant: str) -> str:
    return next((f for f, vs in systems.FAMILIES.items() if variant in vs),
                variant.split("-")[0])


def exact_neighbors(train: np.ndarray, test: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact top-k by float64 scores (blocks of 64 queries)."""
    x = train.astype(np.float64)
    out = np.empty((test.shape[0], k), np.int64)
    sq = np.einsum("ij,ij->i", x, x) if metric == "squared_l2" else None
    for b0 in range(0, test.shape[0], 64):
        s = test[b0:b0 + 64].astype(np.float64) @ x.T
        if sq is not None:
            s = 2 * s - sq
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(s, part, axis=1)
        out[b0:b0 + 64] = np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), 1)
    return out


def kth_scores(train, test, gt, metric) -> np.ndarray:
    """The exact float64 score of each query's k-th true neighbour."""
    x = train[gt[:, -1]].astype(np.float64)
    q = test.astype(np.float64)
    if metric == "squared_l2":
        return ((x - q) ** 2).sum(1)
    return (x * q).sum(1)


def config(args, ds: datasets.Dataset) -> dict:
    n, d = ds.train.shape
    k = args.k
    leaves = args.num_leaves or (100 if ds.name == "seed" else
                                 max(8, min(2000, round(math.sqrt(n)))))
    leaves = min(leaves, n)
    if args.leaves_grid:
        lgrid = _ints(args.leaves_grid)
    else:
        fracs = ((0.02, 0.05, 0.3) if args.quick else
                 (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0))
        lgrid = sorted({max(1, min(leaves, round(leaves * f))) for f in fracs})
    if args.reorder_grid:
        rgrid = _ints(args.reorder_grid)
    else:
        # Quick: a shallow reorder beside a deep one, so that the systems' approximate
        # scores show (with reorder 5k and up every system reached recall 1.0 there).
        # Up to 200 k: deep enough for recall 0.99 on GloVe (issue 18).
        rgrid = [k * m for m in ((1, 50) if args.quick else (4, 10, 25, 50, 100, 200))]
    rgrid = sorted({min(r, n) for r in rgrid})
    # Deep points for recall 0.99 (issue 18): on GloVe the AH order must be reordered
    # deeper than 2,000 (which stopped at 0.986): mipscan measured 0.988 / 0.992 / 0.995
    # at 3/4 of the leaves x 3,000, all x 3,000, all x 5,000. Only these few pairs, not
    # the whole product, so that the run stays about as long; every tree system gets
    # them (faiss as k_factor 300 / 500).
    deep = []
    if not (args.leaves_grid or args.reorder_grid or args.quick):
        three_q = max(1, min(leaves, round(leaves * 0.75)))
        deep = [[three_q, min(k * 300, n)], [three_q, min(k * 500, n)],
                [leaves, min(k * 300, n)], [leaves, min(k * 500, n)]]
    # The tutorial's knobs scaled to this tree: 30% of the leaves, reorder 50 * k.
    default_ls = max(1, min(leaves, round(leaves * 0.3)))
    default_reorder = min(rgrid, key=lambda r: abs(r - 50 * k))
    ef = _ints(args.ef_grid) if args.ef_grid else (
        [10, 40, 160] if args.quick else [10, 20, 40, 60, 80, 120, 160, 320, 640])
    return {
        "k": k, "metric": ds.metric, "d": d,
        "num_leaves": leaves, "leaves_to_search": default_ls,
        "training_sample_size": min(n, 100_000), "training_iterations": 12,
        "dims_per_block": 2, "aq_threshold": args.aq_threshold, "reorder": default_reorder,
        "leaves_grid": lgrid, "reorder_grid": rgrid, "deep_grid": deep,
        "ef_grid": ef, "ef_construction": 100 if args.quick else args.ef_construction,
        "build_threads": args.build_threads,
    }


def run_variant(name: str, cfg: dict, arrays: dict, tmp: Path, args) -> dict:
    job = {"variant": name, "family": family_of(name), "cfg": cfg, "arrays": arrays,
           "threads": args.threads_list, "repeats": args.repeats,
           "nq_single": args.nq_single, "result": str(tmp / f"{name}.result.json")}
    job_path = tmp / f"{name}.job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stderr = ""
    try:
        proc = subprocess.run([python_for(name, args), "-m", "benchmarks.worker", str(job_path)],
                              cwd=REPO, env=env, timeout=args.timeout, stderr=subprocess.PIPE,
                              text=True)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = f"timeout after {args.timeout}s", str(exc.stderr or "")
    result_path = Path(job["result"])
    if rc == 0 and result_path.exists():
        out = json.loads(result_path.read_text())
    else:
        out = {"name": name, "family": job["family"],
               "error": f"worker exited with {rc}; stderr tail:\n{stderr[-3000:]}"}
    out["date"] = date
    out["wall_seconds"] = time.perf_counter() - t0
    out["loadavg"] = [load0, os.getloadavg()[0]]
    return out


def merge(result: dict, old: dict) -> None:
    """Adds ``old``'s systems that ``result`` did not run (same dataset and settings only)."""
    keys = ("num_leaves", "leaves_grid", "reorder_grid", "deep_grid", "ef_grid", "threads", "repeats",
            "nq_single", "aq_threshold", "k")
    same = (old["dataset"]["spec"] == result["dataset"]["spec"]
            and old["dataset"]["nq"] == result["dataset"]["nq"]
            and all(old["config"].get(k) == result["config"].get(k) for k in keys))
    if not same:
        raise SystemExit("--merge: the existing results were made with other settings")
    ran = {s["name"] for s in result["systems"]}
    kept = [s for s in old["systems"] if s["name"] not in ran]
    for s in kept:
        s.setdefault("date", old["date"])
    order = [v for vs in systems.FAMILIES.values() for v in vs]
    result["systems"] = sorted(result["systems"] + kept, key=lambda s: (
        order.index(s["name"]) if s["name"] in order else len(order), s["name"]))
    result["merged"] = old.get("merged", []) + [
        {"date": old["date"], "command": old["command"], "systems": [s["name"] for s in kept]}]


def _thread_scaling(good: list[dict]) -> None:
    """Adds to each point of good[0] "thread_scaling": {threads: batched QPS at that many
    threads / at one thread}, the median over the rounds of each round's own ratio (the
    worker's "paired_scaling", from runs taken in turns; else the round's two QPS). The
    best-of-rounds QPS would divide one round's speed by another's: the VM's drift, not
    the scaling."""
    for i, p in enumerate(good[0]["points"]):
        same = [r["points"][i] for r in good
                if i < len(r["points"]) and r["points"][i]["knobs"] == p["knobs"]]
        ratios = {}
        for q in same:
            one = q["qps_batched"].get("1")
            paired = q.get("paired_scaling", {})
            for t, v in q["qps_batched"].items():
                if t in paired:
                    ratios.setdefault(t, []).append(paired[t])
                elif t != "1" and one:
                    ratios.setdefault(t, []).append(v / one)
        p["thread_scaling"] = {t: statistics.median(v) for t, v in ratios.items()}


def best_of_rounds(runs: list[dict]) -> dict:
    """One variant's result from its rounds: the first round's, with each timing replaced
    by its best over the rounds (highest QPS, shortest build). Recall and sizes do not
    change between rounds (builds are seeded); a point missing from a later round (an
    error there) keeps the timings it has."""
    out = runs[0]
    good = [r for r in runs if r.get("points")]
    if good and out is good[0]:
        _thread_scaling(good)
    if len(good) < 2 or out is not good[0]:
        return out
    out["rounds"] = len(good)
    out["build"]["seconds"] = min(r["build"]["seconds"] for r in good)
    for i, p in enumerate(out["points"]):
        same = [r["points"][i] for r in good[1:]
                if i < len(r["points"]) and r["points"][i]["knobs"] == p["knobs"]]
        for q in same:
            for key in ("qps_single", "qps_single_best"):
                p[key] = max(p[key], q[key])
            for key in ("qps_batched", "qps_batched_best"):
                for t, v in q[key].items():
                    p[key][t] = max(p[key].get(t, 0), v)
            p["foreign_cores"] = max(p["foreign_cores"] or 0, q["foreign_cores"] or 0)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.threads_list = sorted(set(_ints(args.threads)) | {1})
    if args.quick:
        args.nq = min(args.nq, 200)
        args.nq_single = min(args.nq_single, 100)
        args.repeats = 1
        args.max_n = min(args.max_n or 20_000, 20_000)
    names = variants(args.systems, args.quick)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = environment()
    try:
        ds = datasets.load(args.dataset)
    except datasets.DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc

    if (args.max_n and ds.train.shape[0] > args.max_n
            and args.dataset.startswith("synthetic")):
        # A smaller synthetic set is made at the size used (its name, and so the plot's
        # title, then state that size) rather than cut from the first rows of a larger one.
        kv = datasets._parse_kv(args.dataset.partition(":")[2])
        ds = datasets.synthetic(**{**kv, "n": args.max_n})
    train, test, gt = ds.train, ds.test, ds.neighbors
    notes = []
    if args.max_n and train.shape[0] > args.max_n:
        train, gt = train[:args.max_n], None
        notes.append(f"first {args.max_n} base vectors only; ground truth recomputed")
    if test.shape[0] > args.nq:
        pick = np.sort(np.random.default_rng(0).choice(test.shape[0], args.nq, replace=False))
        test = test[pick]
        gt = None if gt is None else gt[pick]
        notes.append(f"{args.nq} of {ds.test.shape[0]} queries (seeded random subset, seed 0)")
    if gt is None:
        gt = exact_neighbors(train, test, args.k, ds.metric)
        gt_source = "computed here (float64 brute force)"
    else:
        gt = gt[:, :args.k]
        gt_source = ds.info.get("ground_truth", "from the dataset")
    train = np.ascontiguousarray(train)
    test = np.ascontiguousarray(test)
    args.nq_single = min(args.nq_single, test.shape[0])
    cfg = config(args, ds)

    print(f"{ds.name}: n={train.shape[0]} d={train.shape[1]} nq={test.shape[0]} "
          f"metric={ds.metric}; threads {args.threads_list}; {env['cpu']}, "
          f"simd {env.get('mipscan_simd_level')}; loadavg {env['loadavg_start'][0]:.2f}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mipscan-bench-") as tmp:
        tmp = Path(tmp)
        arrays = {}
        for key, arr in (("train", train), ("test", test), ("gt", gt),
                         ("kth", kth_scores(train, test, gt, ds.metric))):
            arrays[key] = str(tmp / f"{key}.npy")
            np.save(arrays[key], arr)
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        machine: dict[str, list[float]] = {str(n): [] for n in args.threads_list if n > 1}
        for rnd in range(max(args.rounds, 1)):
            for n in machine:  # the machine's own scaling, once per round (benchmarks.common)
                machine[n].append(machine_thread_scaling(int(n), runs=3 if args.quick else 9))
            for name in names:
                if rnd > 0 and not rounds[name][0].get("points"):
                    continue  # skipped or failed in the first round
                tag = f"{name}, round {rnd + 1}/{args.rounds}" if args.rounds > 1 else name
                if args.wait_quiet:
                    others = wait_for_quiet(args.wait_quiet)
                    print(f"[{tag}] (others used {others or 0:.2f} cores before it)", flush=True)
                else:
                    print(f"[{tag}]", flush=True)
                r = run_variant(name, cfg, arrays, tmp, args)
                if "skipped" in r:
                    print(f"  skipped {name}: {r['skipped']}", flush=True)
                elif "error" in r:
                    print(f"  FAILED {name}:\n{r['error']}", flush=True)
                rounds[name].append(r)
        results = [best_of_rounds(rounds[name]) for name in names]

    env["loadavg_end"] = list(os.getloadavg())
    env["machine_thread_scaling"] = {
        n: {"median": statistics.median(v), "rounds": v} for n, v in machine.items() if v}
    result = {
        "date": started,
        "command": "python -m benchmarks.run " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "dataset": {"name": ds.name, "spec": args.dataset, "metric": ds.metric,
                    "n": int(train.shape[0]), "d": int(train.shape[1]),
                    "nq": int(test.shape[0]), "ground_truth": gt_source, "notes": notes,
                    **{f"info_{k}": v for k, v in ds.info.items()}},
        "env": env,
        "config": {**cfg, "threads": args.threads_list, "repeats": args.repeats,
                   "rounds": max(args.rounds, 1),
                   "nq_single": args.nq_single, "quick": args.quick,
                   "recall": "hit = returned id whose exact float64 score is at least the "
                             "k-th true neighbour's (rel. tol 1e-5), as ann-benchmarks; "
                             "recall_ids = plain id-set intersection"},
        "systems": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / report.slug(ds.name)
    if args.merge and stem.with_suffix(".json").exists():
        merge(result, json.loads(stem.with_suffix(".json").read_text()))
    result["summary"] = report.summarize(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot_path = stem.with_suffix(".png")
    try:
        report.plot(result, plot_path)
    except ImportError as exc:
        print(f"no plot: {exc}")
        plot_path = None
    md = report.markdown(result, plot_path and plot_path.name)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"wrote {stem}.json, .md, .png")
    if args.update_readme:
        report.update_readme()
        print("updated README.md bench section")
    return result


if __name__ == "__main__":
    main()
