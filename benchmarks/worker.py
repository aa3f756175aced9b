"""One benchmarked variant in its own process: ``python -m benchmarks.worker JOB.json``.

A separate process per variant keeps peak-RSS readings apart, lets a crashing library fail
alone and keeps libraries with their own OpenMP/BLAS runtimes out of each other's way.

Memory method: the dataset is loaded and the library imported first; then the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``) and the index built. ``build_peak_rss``
is VmHWM after the build minus VmRSS before it (the build's transient peak, including the
index), and ``rss_after_build`` the same difference once the build has returned.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

from benchmarks import systems
from benchmarks.common import (CpuNoise, peak_rss_bytes, pinned_threads, reset_peak_rss,
                               rss_bytes, threadpool_info, time_median)


def recall_at_k(train: np.ndarray, queries: np.ndarray, ids: np.ndarray, gt: np.ndarray,
                kth: np.ndarray, metric: str) -> tuple[float, float]:
    """(recall, recall_ids) at k = gt.shape[1].

    ``recall`` counts a returned id as a hit when its exact float64 score is at least as good
    as the k-th true neighbour's (relative tolerance 1e-5), as ann-benchmarks does, so exact
    ties never cost recall; ``recall_ids`` is the plain id-set intersection with ``gt``.
    """
    nq, k = gt.shape
    ids = np.asarray(ids, dtype=np.int64).reshape(nq, -1)[:, :k]
    valid = (ids >= 0) & (ids < train.shape[0])
    safe = np.where(valid, ids, 0)
    x = train[safe].astype(np.float64)
    q = queries.astype(np.float64)[:, None, :]
    tol = 1e-5 * (1.0 + np.abs(kth))[:, None]
    if metric == "squared_l2":
        score = ((x - q) ** 2).sum(-1)
        good = score <= kth[:, None] + tol
    else:
        score = (x * q).sum(-1)
        good = score >= kth[:, None] - tol
    hits = 0
    hits_ids = 0
    for row in range(nq):
        seen = set()
        for j in range(ids.shape[1]):
            i = int(ids[row, j])
            if valid[row, j] and good[row, j] and i not in seen:
                hits += 1
            seen.add(i)
        hits_ids += len(set(ids[row][valid[row]].tolist()) & set(gt[row].tolist()))
    return hits / (nq * k), hits_ids / (nq * k)


def measure_point(v: systems.Variant, knobs: dict, data: dict, job: dict) -> dict:
    test = data["test"]
    repeats, threads = job["repeats"], job["threads"]
    nq = test.shape[0]
    with pinned_threads(1):
        ids = v.search_batched(test, knobs, 1)
        recall, recall_ids = recall_at_k(data["train"], test, ids, data["gt"], data["kth"],
                                         job["cfg"]["metric"])
    # The thread counts take turns (1, 2, 1, 2, ...; one untimed run each first): each
    # repeat's 1-thread and n-thread runs are then milliseconds apart, and
    # "thread_scaling" (the median of those paired ratios) measures the scaling, not the
    # VM's drift between a block of 1-thread runs and a block of n-thread runs.
    times = {n: [] for n in threads}
    for n in threads:
        if n != 1:
            with pinned_threads(n):
                v.search_batched(test, knobs, n)
    for _ in range(repeats):
        for n in threads:
            with pinned_threads(n):
                t0 = time.perf_counter()
                v.search_batched(test, knobs, n)
                times[n].append(time.perf_counter() - t0)
    point = {"knobs": knobs, "recall": recall, "recall_ids": recall_ids,
             "qps_batched": {str(n): nq / statistics.median(ts) for n, ts in times.items()},
             "qps_batched_best": {str(n): nq / min(ts) for n, ts in times.items()},
             "paired_scaling": {str(n): statistics.median(a / b for a, b in zip(times[1], ts))
                                for n, ts in times.items() if n != 1}}
    single = test[:job["nq_single"]]

    def loop():
        for q in single:
            v.search_one(q, knobs)

    with pinned_threads(1):
        for q in single[:10]:
            v.search_one(q, knobs)
        t, ts = time_median(loop, repeats, warmup=0)
    point["qps_single"] = len(single) / t
    point["qps_single_best"] = len(single) / min(ts)
    return point


def run(job: dict) -> dict:
    data = {name: np.load(path) for name, path in job["arrays"].items()}
    out = {"name": job["variant"], "family": job["family"]}
    try:
        v = systems.make(job["variant"], job["cfg"])
    except systems.Unavailable as exc:
        out["skipped"] = str(exc)
        return out
    out.update(version=v.version, exact=v.exact, build_params=v.build_params(),
               simd_level=v.simd_level, python=sys.executable)
    try:
        rss0 = rss_bytes()
        reset_ok = reset_peak_rss()
        with pinned_threads(job["cfg"]["build_threads"]), CpuNoise() as noise:
            t0 = time.perf_counter()
            v.build(data["train"])
            build_s = time.perf_counter() - t0
        out["build"] = {
            "seconds": build_s,
            "foreign_cores": noise.foreign_cores,
            "threads": job["cfg"]["build_threads"],
            "index_bytes": v.index_bytes(),
            "build_peak_rss": peak_rss_bytes() - rss0,
            "rss_after_build": rss_bytes() - rss0,
            "rss_before_build": rss0,
            "rss_method": ("VmHWM after build (reset via /proc/self/clear_refs) - VmRSS before"
                           if reset_ok else
                           "ru_maxrss after build (not resettable: includes data loading) "
                           "- VmRSS before"),
        }
        out["threadpools"] = threadpool_info()
        out["default_knobs"] = v.default_knobs()
        points, point_errors = [], []
        out["point_errors"] = point_errors
        for knobs in v.knob_grid():
            t0 = time.perf_counter()
            try:
                with CpuNoise() as noise:
                    p = measure_point(v, knobs, data, job)
            except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                point_errors.append({"knobs": knobs, "error": repr(exc)})
                print(f"  {v.name:15s} {json.dumps(knobs):45s} FAILED: {exc!r}", flush=True)
                continue
            p["foreign_cores"] = noise.foreign_cores
            p["loadavg"] = os.getloadavg()[0]
            points.append(p)
            print(f"  {v.name:15s} {json.dumps(knobs):45s} recall={p['recall']:.4f} "
                  f"qps1={p['qps_single']:9.0f} batch={p['qps_batched']} "
                  f"({time.perf_counter() - t0:.1f}s; others used "
                  f"{noise.foreign_cores or 0:.2f} cores)",
                  flush=True)
        out["points"] = points
    except Exception:  # noqa: BLE001 - one failing library must not stop the others
        out["error"] = traceback.format_exc()
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    result = run(job)
    with open(job["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
