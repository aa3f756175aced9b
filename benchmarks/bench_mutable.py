"""The `mutable` scenario (issue 13): a live index under churn, mipscan beside ScaNN and
hnswlib, one thread each, same data, same run.

Build on the first half of the base vectors (docids 0 .. n/2-1), upsert the second half in
batches of ``--batch``, then delete every 4th docid in batches of ``--batch``. Reported per
system: upsert vectors/s, delete ids/s, recall@10 and single-thread QPS (search_batched)
after the churn, after ``rebalance()``, and for a fresh build on the final set with the
same knobs. Ground truth: exact inner-product top-10 over the final set (numpy).

    python -m benchmarks.bench_mutable --dataset glove-50-dev --out benchmarks/results
    python -m benchmarks.bench_mutable --dataset seed --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
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


def _knobs(n: int) -> dict:
    # The GloVe knobs (300 leaves, 30 searched, AH 2, reorder 250), scaled to the
    # base size n: sqrt(n) leaves (300 at 90,000), a tenth searched.
    leaves = max(10, int(round(math.sqrt(n))))
    return {"leaves": leaves, "search": max(1, leaves // 10), "reorder": 250}


def run_mipscan(train, test, truth, k, batch, knobs, repeats):
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
    search = lambda: s.search_batched(test)  # noqa: E731
    out["recall_churn"] = _recall(search().indices, truth, k)
    out["qps_churn"] = _qps(search, len(test), repeats)
    t0 = time.perf_counter()
    s.rebalance()
    out["rebalance_s"] = time.perf_counter() - t0
    out["recall_rebalanced"] = _recall(search().indices, truth, k)
    out["qps_rebalanced"] = _qps(search, len(test), repeats)
    keep = np.setdiff1d(np.arange(len(train)), dels)
    f = build(train[keep], keep.tolist(), incremental=False)
    fresh = lambda: f.search_batched(test)  # noqa: E731
    out["recall_fresh"] = _recall(fresh().indices, truth, k)
    out["qps_fresh"] = _qps(fresh, len(test), repeats)
    return out


def run_scann(train, test, truth, k, batch, knobs, repeats):
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

    def search(sr):
        ids, _ = sr.search_batched(test)
        return np.array([[int(x) for x in row] for row in ids])

    out["recall_churn"] = _recall(search(s), truth, k)
    out["qps_churn"] = _qps(lambda: s.search_batched(test), len(test), repeats)
    t0 = time.perf_counter()
    s.rebalance()
    out["rebalance_s"] = time.perf_counter() - t0
    out["recall_rebalanced"] = _recall(search(s), truth, k)
    out["qps_rebalanced"] = _qps(lambda: s.search_batched(test), len(test), repeats)
    keep = np.setdiff1d(np.arange(len(train)), np.arange(0, len(train), 4))
    f = build(train[keep], [str(i) for i in keep])
    out["recall_fresh"] = _recall(search(f), truth, k)
    out["qps_fresh"] = _qps(lambda: f.search_batched(test), len(test), repeats)
    return out


def run_hnswlib(train, test, truth, k, batch, repeats, ef=100):
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
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="glove-50-dev")
    ap.add_argument("--systems", default="mipscan,scann,hnswlib")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--max-n", type=int, default=0, help="use at most this many base vectors")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ds = datasets.load(args.dataset)
    train = np.ascontiguousarray(ds.train[:args.max_n] if args.max_n else ds.train, np.float32)
    test = np.ascontiguousarray(ds.test[:args.queries], np.float32)
    keep = np.setdiff1d(np.arange(len(train)), np.arange(0, len(train), 4))
    scores = test @ train[keep].T
    truth = keep[np.argsort(-scores, axis=1)[:, :args.k]]
    knobs = _knobs(len(train))
    results = {"dataset": ds.name, "n": len(train), "final_n": len(keep), "nq": len(test),
               "batch": args.batch, "knobs": knobs, "systems": {}}
    with pinned_threads(1):
        for name in args.systems.split(","):
            t0 = time.perf_counter()
            if name == "mipscan":
                r = run_mipscan(train, test, truth, args.k, args.batch, knobs, args.repeats)
            elif name == "scann":
                r = run_scann(train, test, truth, args.k, args.batch, knobs, args.repeats)
            elif name == "hnswlib":
                r = run_hnswlib(train, test, truth, args.k, args.batch, args.repeats)
            else:
                raise SystemExit(f"unknown system {name!r}")
            r["wall_s"] = time.perf_counter() - t0
            results["systems"][name] = r
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                  flush=True)
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
            "qps_churn", "qps_rebalanced", "qps_fresh"]
    lines = [f"{results['dataset']}: n={results['n']} -> {results['final_n']}, "
             f"batches of {results['batch']}, knobs {results['knobs']}, one thread",
             "| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results["systems"].items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.4f}" if "recall" in c else f"{v:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
