"""The `mutable` scenario (issue 13): a live index under churn, mipscan beside ScaNN and
hnswlib, one thread each, same data, same run.

Build on the first half of the base vectors (docids 0 .. n/2-1), upsert the second half in
batches of ``--batch``, then delete every 4th docid in batches of ``--batch``. Reported per
system: upsert vectors/s, delete ids/s, recall@10 and single-thread QPS (search_batched)
after the churn, after ``rebalance()``, and for a fresh build on the final set with the
same knobs (each QPS measured alternately with the fresh build's, best of --repeats). Ground truth: exact inner-product top-10 over the final set (numpy).

Then a steady stream of updates: one updater thread re-upserts deleted docids (their
own vectors) and deletes them again, in batches of ``--batch``, at ``--stream-rate``
updates/s (vectors upserted + ids deleted; less if the system cannot keep up), while the
measuring thread runs ``search_batched`` over the queries for ``--stream-seconds``.
Reported: the QPS of the same loop without the updater (``qps_idle``), with it
(``qps_stream``) and the updates/s achieved (``stream_updates_per_s``); ``cpu_qps_*``
count queries per second of the searching thread's CPU time (the machine is shared: the
wall clock also measures what other jobs left), ``updater_cpu_share`` the updater's. ScaNN's searches
are not safe while it updates, so its updater and searcher share a lock (what a ScaNN user
must do); mipscan and hnswlib run without one.

    python -m benchmarks.bench_mutable --dataset glove-50-dev --out benchmarks/results
    python -m benchmarks.bench_mutable --dataset seed --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import datasets
from benchmarks.common import environment, pinned_threads


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(map(int, f[:k])) & set(map(int, t[:k]))) / k
                          for f, t in zip(found, truth)]))


def _qps(fn, nq: int, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nq / best


def _qps_pair(fn_a, fn_b, nq: int, repeats: int) -> tuple[float, float, float, float]:
    """Best QPS of two searches measured alternately (a, b, a, b, ...), so that the
    machine's drift and the other jobs hit both alike: (a, b) by the wall clock, then
    (a, b) per second of the calling thread's CPU time (what a loaded machine's
    preemption does not count)."""
    fn_a(), fn_b()
    wall, cpu = [math.inf, math.inf], [math.inf, math.inf]
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.thread_time() - c0)
    return nq / wall[0], nq / wall[1], nq / cpu[0], nq / cpu[1]


def _after_churn(out: dict, index, fresh, found, test, truth, k, repeats) -> None:
    """Recall and QPS of the churned index and of it after rebalance(), each measured
    alternately with the fresh build (qps_fresh: the better of its two measures;
    *_vs_fresh: the ratio within each pair)."""
    out["recall_churn"] = _recall(found(index), truth, k)
    out["recall_fresh"] = _recall(found(fresh), truth, k)
    qc, qf1, cc, cf1 = _qps_pair(lambda: index.search_batched(test),
                                 lambda: fresh.search_batched(test), len(test), repeats)
    t0 = time.perf_counter()
    index.rebalance()
    out["rebalance_s"] = time.perf_counter() - t0
    out["recall_rebalanced"] = _recall(found(index), truth, k)
    qr, qf2, cr, cf2 = _qps_pair(lambda: index.search_batched(test),
                                 lambda: fresh.search_batched(test), len(test), repeats)
    out.update(qps_churn=qc, qps_rebalanced=qr, qps_fresh=max(qf1, qf2),
               qps_churn_vs_fresh=qc / qf1, qps_rebalanced_vs_fresh=qr / qf2,
               cpu_qps_churn=cc, cpu_qps_rebalanced=cr, cpu_qps_fresh=max(cf1, cf2),
               cpu_churn_vs_fresh=cc / cf1, cpu_rebalanced_vs_fresh=cr / cf2)


def _stream(search, nq: int, upsert, delete, dels, batch: int, seconds: float, rate: float,
            lock: threading.Lock | None = None) -> dict:
    """Search QPS without and with a steady stream of updates (see the module docstring).
    ``dels`` are (docids, vectors) of deleted points: the updater upserts a batch of
    them, then deletes that batch, and so on, so the index keeps its size."""
    guard = lock if lock is not None else contextlib.nullcontext()

    def loop(stop_at):
        done, c0 = 0, time.thread_time()
        while time.perf_counter() < stop_at:
            with guard:
                search()
            done += 1
        return done, time.thread_time() - c0

    search()
    t0 = time.perf_counter()
    idle, idle_cpu = loop(t0 + seconds)
    idle_s = time.perf_counter() - t0
    ids, vecs = dels
    half = max(1, batch // 2)
    stop = threading.Event()
    tally = {"updates": 0, "cpu_s": 0.0}
    errors = []

    def updater():
        try:
            c0 = time.thread_time()
            start = time.perf_counter()
            b = 0
            while not stop.is_set():
                lo = (b * half) % max(1, len(ids) - half)
                chunk = ids[lo:lo + half]
                with guard:
                    upsert(chunk, vecs[lo:lo + half])
                tally["updates"] += len(chunk)
                with guard:
                    delete(chunk)
                tally["updates"] += len(chunk)
                b += 1
                # Steady rate: sleep until this many updates are due.
                ahead = tally["updates"] / rate - (time.perf_counter() - start)
                if ahead > 0:
                    stop.wait(ahead)
            tally["cpu_s"] = time.thread_time() - c0
        except Exception as exc:  # reported below
            errors.append(exc)

    th = threading.Thread(target=updater)
    t0 = time.perf_counter()
    th.start()
    busy, busy_cpu = loop(t0 + seconds)
    busy_s = time.perf_counter() - t0
    stop.set()
    th.join()
    if errors:
        raise errors[0]
    # cpu_*: queries per second of the searching thread's CPU time; the machine is
    # shared, so the wall-clock QPS also measures what the other jobs left us.
    return {"qps_idle": idle * nq / idle_s, "qps_stream": busy * nq / busy_s,
            "stream_updates_per_s": tally["updates"] / busy_s,
            "cpu_qps_idle": idle * nq / idle_cpu, "cpu_qps_stream": busy * nq / busy_cpu,
            "updater_cpu_share": tally["cpu_s"] / busy_s}


def _knobs(n: int) -> dict:
    # The GloVe knobs (300 leaves, 30 searched, AH 2, reorder 250), scaled to the
    # base size n: sqrt(n) leaves (300 at 90,000), a tenth searched.
    leaves = max(10, int(round(math.sqrt(n))))
    return {"leaves": leaves, "search": max(1, leaves // 10), "reorder": 250}


def run_mipscan(train, test, truth, k, batch, knobs, repeats, stream):
    import mipscan

    half = len(train) // 2

    def build(db, ids, incremental=True):
        b = mipscan.builder(db, k, "dot_product").set_n_training_threads(1)
        b = b.tree(knobs["leaves"], knobs["search"],
                   incremental_threshold=0.2 if incremental else None)
        s = b.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(knobs["reorder"]) \
            .build(docids=ids)
        s.set_num_threads(1)
        return s

    out = {}
    s = build(train[:half], list(range(half)))
    t0 = time.perf_counter()
    for b in range(half, len(train), batch):
        e = min(b + batch, len(train))
        s.upsert(list(range(b, e)), train[b:e], batch_size=batch)
    out["upsert_per_s"] = (len(train) - half) / (time.perf_counter() - t0)
    dels = list(range(0, len(train), 4))
    t0 = time.perf_counter()
    for b in range(0, len(dels), batch):
        s.delete(dels[b:b + batch])
    out["delete_per_s"] = len(dels) / (time.perf_counter() - t0)
    keep = np.setdiff1d(np.arange(len(train)), dels)
    f = build(train[keep], keep.tolist(), incremental=False)
    _after_churn(out, s, f, lambda ix: ix.search_batched(test).indices, test, truth, k, repeats)
    del f
    out.update(_stream(lambda: s.search_batched(test), len(test), s.upsert, s.delete,
                       (dels, train[dels]), batch, **stream))
    return out


def run_scann(train, test, truth, k, batch, knobs, repeats, stream):
    import scann

    half = len(train) // 2

    def build(db, ids):
        b = scann.scann_ops_pybind.builder(db, k, "dot_product")
        b.set_n_training_threads(1)
        s = b.tree(knobs["leaves"], knobs["search"], incremental_threshold=0.2) \
            .score_ah(2, anisotropic_quantization_threshold=0.2) \
            .reorder(knobs["reorder"]).build(docids=ids)
        s.set_num_threads(1)
        return s

    out = {}
    s = build(train[:half], [str(i) for i in range(half)])
    t0 = time.perf_counter()
    for b in range(half, len(train), batch):
        e = min(b + batch, len(train))
        s.upsert([str(i) for i in range(b, e)], train[b:e], batch_size=batch)
    out["upsert_per_s"] = (len(train) - half) / (time.perf_counter() - t0)
    dels = [str(i) for i in range(0, len(train), 4)]
    t0 = time.perf_counter()
    for b in range(0, len(dels), batch):
        s.delete(dels[b:b + batch])
    out["delete_per_s"] = len(dels) / (time.perf_counter() - t0)

    def found(sr):
        ids, _ = sr.search_batched(test)
        return np.array([[int(x) for x in row] for row in ids])

    keep = np.setdiff1d(np.arange(len(train)), np.arange(0, len(train), 4))
    f = build(train[keep], [str(i) for i in keep])
    _after_churn(out, s, f, found, test, truth, k, repeats)
    del f
    gone = np.arange(0, len(train), 4)
    out.update(_stream(lambda: s.search_batched(test), len(test),
                       lambda ids, v: s.upsert(ids, v, batch_size=batch), s.delete,
                       (dels, train[gone]), batch, lock=threading.Lock(), **stream))
    return out


def run_hnswlib(train, test, truth, k, batch, repeats, stream, ef=100):
    import hnswlib

    half = len(train) // 2
    p = hnswlib.Index(space="ip", dim=train.shape[1])
    p.init_index(max_elements=len(train), M=16, ef_construction=200, random_seed=0)
    p.set_num_threads(1)
    p.add_items(train[:half], np.arange(half))
    out = {}
    t0 = time.perf_counter()
    for b in range(half, len(train), batch):
        e = min(b + batch, len(train))
        p.add_items(train[b:e], np.arange(b, e))
    out["upsert_per_s"] = (len(train) - half) / (time.perf_counter() - t0)
    dels = np.arange(0, len(train), 4)
    t0 = time.perf_counter()
    for d in dels:
        p.mark_deleted(int(d))
    out["delete_per_s"] = len(dels) / (time.perf_counter() - t0)
    p.set_ef(ef)
    search = lambda: p.knn_query(test, k=k)[0]  # noqa: E731
    out["recall_churn"] = _recall(search(), truth, k)
    out["qps_churn"] = _qps(search, len(test), repeats)
    out["ef"] = ef

    def delete(ids):
        for i in ids:
            p.mark_deleted(int(i))

    # add_items of a deleted label replaces its point and clears the mark.
    out.update(_stream(search, len(test), lambda ids, v: p.add_items(v, ids), delete,
                       (dels, train[dels]), batch, **stream))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="glove-50-dev")
    ap.add_argument("--systems", default="mipscan,scann,hnswlib")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--max-n", type=int, default=0, help="use at most this many base vectors")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stream-seconds", type=float, default=5.0,
                    help="length of each search loop of the update-stream phase")
    ap.add_argument("--stream-rate", type=float, default=5000.0,
                    help="updates/s the updater aims at during the stream phase")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ds = datasets.load(args.dataset)
    train = np.ascontiguousarray(ds.train[:args.max_n] if args.max_n else ds.train, np.float32)
    test = np.ascontiguousarray(ds.test[:args.queries], np.float32)
    keep = np.setdiff1d(np.arange(len(train)), np.arange(0, len(train), 4))
    scores = test @ train[keep].T
    truth = keep[np.argsort(-scores, axis=1)[:, :args.k]]
    knobs = _knobs(len(train))
    stream = {"seconds": args.stream_seconds, "rate": args.stream_rate}
    results = {"dataset": ds.name, "n": len(train), "final_n": len(keep), "nq": len(test),
               "batch": args.batch, "knobs": knobs, "stream": stream, "systems": {},
               "loadavg": {"start": list(os.getloadavg())}}
    with pinned_threads(1):
        for name in args.systems.split(","):
            t0 = time.perf_counter()
            if name == "mipscan":
                r = run_mipscan(train, test, truth, args.k, args.batch, knobs, args.repeats,
                                stream)
            elif name == "scann":
                r = run_scann(train, test, truth, args.k, args.batch, knobs, args.repeats, stream)
            elif name == "hnswlib":
                r = run_hnswlib(train, test, truth, args.k, args.batch, args.repeats, stream)
            else:
                raise SystemExit(f"unknown system {name!r}")
            r["wall_s"] = time.perf_counter() - t0
            r["loadavg_after"] = list(os.getloadavg())
            results["systems"][name] = r
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                  flush=True)
    results["loadavg"]["end"] = list(os.getloadavg())
    results["table"] = table(results)
    print(results["table"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results["environment"] = environment()
        (out / f"mutable-{ds.name.replace(':', '-')}.json").write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    cols = ["upsert_per_s", "delete_per_s", "recall_churn", "recall_rebalanced", "recall_fresh",
            "qps_churn", "qps_rebalanced", "qps_fresh", "cpu_churn_vs_fresh",
            "cpu_rebalanced_vs_fresh", "qps_idle", "qps_stream", "cpu_qps_idle",
            "cpu_qps_stream", "stream_updates_per_s"]
    lines = [f"{results['dataset']}: n={results['n']} -> {results['final_n']}, "
             f"batches of {results['batch']}, knobs {results['knobs']}, one thread, "
             f"stream {results['stream']}, load average {results['loadavg']}",
             "| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results["systems"].items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.4f}" if "recall" in c else
                         f"{v:.2f}" if c.endswith("_vs_fresh") else f"{v:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
