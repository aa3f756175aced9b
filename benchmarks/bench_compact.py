"""Compact reorder and brute-force copies (issue 14): float32 vs int8 vs bfloat16, mipscan
beside ScaNN's own quantized reorder, in one run.

For each dataset, at the tutorial's parameters (``seed``: 100 leaves, 30 searched, AH 2,
reorder 500; other sets: round(sqrt(n)) leaves, 30% searched, reorder 500), it builds
tree + AH + reorder with each reorder type, and exact brute-force scoring over each copy,
for mipscan and for ScaNN, and measures recall@10 (a returned id is a hit when its exact
float64 score is at least the 10th true neighbour's, relative tolerance 1e-5, as
benchmarks/worker.py), QPS of ``search_batched`` on one thread (median of ``--repeats``
rounds after a warm-up, the variants of a system interleaved so that load from other
processes hits them alike; the best round too; BLAS pinned to one thread) and index bytes (mipscan: its
arrays; ScaNN: its serialized folder).

    python -m benchmarks.bench_compact --dataset seed glove-50-dev --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import datasets
from benchmarks.common import environment, pinned_threads

K = 10
TYPES = ("float32", "int8", "bfloat16")


def ground_truth(train, test, k=K):
    """Exact top-k ids and the k-th score per query (float64, blocks of 64 queries)."""
    ids = np.empty((len(test), k), np.int64)
    kth = np.empty(len(test))
    t64 = train.astype(np.float64)
    for b in range(0, len(test), 64):
        s = test[b:b + 64].astype(np.float64) @ t64.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ids[b:b + 64] = top
        kth[b:b + 64] = np.take_along_axis(s, top, 1).min(axis=1)
    return ids, kth


def recall(train, test, ids, kth) -> float:
    ids = np.asarray(ids, np.int64)
    got = np.einsum("qd,qkd->qk", test.astype(np.float64), train[ids].astype(np.float64))
    return float(np.mean(got >= (kth - 1e-5 * (1 + np.abs(kth)))[:, None]))


def params(ds) -> dict:
    n = len(ds.train)
    leaves = 100 if ds.name == "seed" else int(round(np.sqrt(n)))
    return {"num_leaves": leaves, "leaves_to_search": max(1, round(0.3 * leaves)),
            "training_sample_size": min(n, 100_000), "training_iterations": 12,
            "dims_per_block": 2, "aq_threshold": 0.2, "reorder": 500}


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_mipscan(ds, p, kth, repeats):
    import mipscan

    built = []
    for kind in ("tree_ah_reorder", "brute_force"):
        for t in TYPES:
            b = mipscan.builder(ds.train, K, ds.metric)
            if kind == "brute_force":
                b = b.score_brute_force(quantize=t)
            else:
                b = (b.tree(p["num_leaves"], p["leaves_to_search"],
                            training_sample_size=p["training_sample_size"],
                            training_iterations=p["training_iterations"])
                     .score_ah(p["dims_per_block"], anisotropic_quantization_threshold=p["aq_threshold"])
                     .reorder(p["reorder"], quantize=t))
            t0 = time.perf_counter()
            s = b.build()
            row = {"system": "mipscan", "index": kind, "quantize": t,
                   "build_s": time.perf_counter() - t0, "index_bytes": s.index_bytes,
                   "simd_level": mipscan.simd_level(),
                   "recall@10": recall(ds.train, ds.test, s.search_batched(ds.test).indices, kth)}
            built.append((row, lambda s=s: s.search_batched(ds.test)))
    return timed(built, len(ds.test), repeats)


def timed(built, nq, repeats):
    """QPS of each search function, timed in interleaved rounds (one warm-up each) so that
    load from other processes hits every variant alike: median and best round of wall
    time, and queries per CPU-second of this process (median; steadier on a shared
    machine, and it counts every thread a library might use)."""
    for _, fn in built:
        fn()
    times = [[] for _ in built]
    cpu = [[] for _ in built]
    for _ in range(repeats):
        for i, (_, fn) in enumerate(built):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    rows = []
    for (row, _), ts, cs in zip(built, times, cpu):
        row.update(qps_batched_1t=nq / float(np.median(ts)), qps_batched_1t_best=nq / min(ts),
                   qps_cpu_time=nq / float(np.median(cs)))
        print(row, flush=True)
        rows.append(row)
    return rows


def run_scann(ds, p, kth, repeats):
    try:
        from scann.scann_ops.py import scann_builder, scann_ops_pybind
    except ImportError as exc:
        print(f"scann skipped: {exc}")
        return []
    rt = scann_builder.ReorderType
    built = []
    for kind in ("tree_ah_reorder", "brute_force"):
        for t, q in (("float32", rt.FLOAT32), ("int8", rt.INT8), ("bfloat16", rt.BFLOAT16)):
            b = scann_ops_pybind.builder(ds.train, K, ds.metric)
            if kind == "brute_force":
                b = b.score_brute_force(quantize=q)
            else:
                b = (b.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["leaves_to_search"],
                            training_sample_size=p["training_sample_size"],
                            training_iterations=p["training_iterations"])
                     .score_ah(p["dims_per_block"], anisotropic_quantization_threshold=p["aq_threshold"])
                     .reorder(p["reorder"], quantize=q))
            t0 = time.perf_counter()
            try:
                s = b.set_n_training_threads(1).build()
            except Exception as exc:  # a ScaNN version without this type
                print(f"scann {kind} {t}: {exc}")
                continue
            build_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                s.serialize(tmp)
                size = _dir_bytes(tmp)
            row = {"system": "scann", "index": kind, "quantize": t, "build_s": build_s,
                   "index_bytes": size,
                   "recall@10": recall(ds.train, ds.test, s.search_batched(ds.test)[0], kth)}
            built.append((row, lambda s=s: s.search_batched(ds.test)))
    return timed(built, len(ds.test), repeats)


def table(results: dict) -> str:
    out = []
    for name, r in results.items():
        p = r["params"]
        out.append(f"### {name} (n={r['n']}, d={r['d']}, nq={r['nq']}; {p['num_leaves']} leaves, "
                   f"{p['leaves_to_search']} searched, AH {p['dims_per_block']}, reorder {p['reorder']})\n")
        out.append("| index | quantize | system | recall@10 | QPS median | QPS best | queries/CPU-s | index MB | bytes vs float32 |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
        base = {(row["system"], row["index"]): row["index_bytes"] for row in r["rows"]
                if row["quantize"] == "float32"}
        for row in sorted(r["rows"], key=lambda x: (x["index"], TYPES.index(x["quantize"]), x["system"])):
            ratio = row["index_bytes"] / base.get((row["system"], row["index"]), np.nan)
            out.append(f"| {row['index']} | {row['quantize']} | {row['system']} | "
                       f"{row['recall@10']:.4f} | {row['qps_batched_1t']:.0f} | "
                       f"{row['qps_batched_1t_best']:.0f} | {row['qps_cpu_time']:.0f} | "
                       f"{row['index_bytes'] / 1e6:.2f} | {ratio:.3f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", nargs="+", default=["seed", "glove-50-dev"])
    ap.add_argument("--nq", type=int, default=1000, help="at most this many queries (seeded subset)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-scann", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    results = {}
    with pinned_threads(1):
        for spec in args.dataset:
            ds = datasets.load(spec)
            if len(ds.test) > args.nq:
                pick = np.sort(np.random.default_rng(0).choice(len(ds.test), args.nq, replace=False))
                ds.test = np.ascontiguousarray(ds.test[pick])
            assert ds.metric == "dot_product", "bench_compact measures inner-product sets"
            p = params(ds)
            _, kth = ground_truth(ds.train, ds.test)
            rows = run_mipscan(ds, p, kth, args.repeats)
            if not args.no_scann:
                rows += run_scann(ds, p, kth, args.repeats)
            results[ds.name] = {"n": len(ds.train), "d": ds.train.shape[1], "nq": len(ds.test),
                                "params": p, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compact.json").write_text(json.dumps({"environment": environment(), "results": results},
                                                 indent=1, default=str))
    md = table(results)
    (out / "compact.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
