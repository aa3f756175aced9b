"""mipscan.distributed on this machine: per-shard bytes, fan-out overhead, batch throughput.

For each dataset (``seed``: the tutorial's 270,882 x 32 candidates and 943 users;
``glove-50-dev``: 90,000 x 50, dot product) and each shard count (1 = one in-process index,
then 2, 4, 8 shards on a local Ray cluster of 2 CPUs):

- bytes per item per shard (the index folders' ``.npy`` bytes over the items they hold),
  split into AH codes, reorder rows and the rest;
- single-query latency: ``ShardedIndex.search`` (fan-out to every actor, merge) against
  ``Searcher.search`` on one in-process index with the same knobs; the difference is the
  fan-out overhead per query;
- recall@10 of both against exact search;
- batch retrieval: ``batch_search`` (Ray Data, ``map_batches``, one memory-mapped index per
  worker, 2 engine threads) against in-process ``search_batched_parallel`` on 2 threads,
  over the queries repeated to ``--batch-queries``.

    python -m benchmarks.bench_distributed [--datasets seed,glove-50-dev] [--shards 2,4,8]
        [--queries 200] [--batch-queries 50000] [--out benchmarks/results/distributed.json]

Shares 2 cores with other work: figures are medians of a few repeats and carry the
machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import mipscan
from benchmarks import datasets

# Per-shard knobs: leaves ~ sqrt(items per shard) * 2, 10% of them searched, AH with 2
# dimensions per block, 100 rows reordered. The single index uses the same rule for its n.
def knobs(n: int):
    leaves = max(8, int(2 * np.sqrt(n)))

    def configure(b):
        return (b.tree(num_leaves=leaves, num_leaves_to_search=max(1, leaves // 10),
                       training_sample_size=min(n, 50_000))
                .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).set_seed(1))
    return configure


def recall(found, truth, k=10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def folder_bytes(root: Path) -> dict:
    """Bytes by kind over every shard folder under root (or root itself)."""
    out = {"codes": 0, "reorder": 0, "ids": 0, "other": 0}
    for f in root.rglob("*.npy"):
        size = f.stat().st_size
        if f.name == "packed_codes.npy":
            out["codes"] += size
        elif f.name in ("reorder_rows.npy", "slot_rows.npy"):
            out["reorder"] += size
        elif f.name == "slot_ids.npy" or f.name.endswith(".docids.npy"):
            out["ids"] += size
        else:  # centroids, codebooks, leaf offsets and groups
            out["other"] += size
    return out


def latency_us(fn, qs, repeats=3) -> float:
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        for q in qs:
            fn(q)
        best.append((time.perf_counter() - t) / len(qs) * 1e6)
    return statistics.median(best)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="seed,glove-50-dev")
    ap.add_argument("--shards", default="2,4,8")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch-queries", type=int, default=50_000)
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    args = ap.parse_args(argv)

    import ray

    from mipscan.distributed import ShardedIndex, batch_search

    package_root = str(Path(mipscan.__file__).resolve().parents[1])
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=500 * 1024 * 1024, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": package_root}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {"load_average_start": os.getloadavg(), "ray": ray.__version__,
               "simd": mipscan.simd_level(), "datasets": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    for name in args.datasets.split(","):
        ds = datasets.load(name)
        db, queries = ds.train, ds.test
        n, d = db.shape
        truth = mipscan.brute_force(db, queries, 10, ds.metric).indices
        qs = queries[: args.queries]
        reps = -(-args.batch_queries // len(queries))
        batch = np.ascontiguousarray(np.tile(queries, (reps, 1))[: args.batch_queries])
        entry = {"n": n, "d": d, "rows": []}

        # One index in this process.
        single = knobs(n)(mipscan.builder(db, 10, ds.metric)).build()
        single.serialize(work / f"{name}-single")
        single.set_num_threads(2)
        b = folder_bytes(work / f"{name}-single")
        t = time.perf_counter()
        single.search_batched_parallel(batch)
        inproc_qps = len(batch) / (time.perf_counter() - t)
        t = time.perf_counter()
        out = batch_search(batch, work / f"{name}-single", 10, num_threads=2,
                           batch_size=8192).materialize()
        ray_qps_single = len(batch) / (time.perf_counter() - t)
        assert out.count() == len(batch)
        row = {"shards": 1, "bytes_per_item": {k: v / n for k, v in b.items()},
               "single_query_us": latency_us(single.search, qs),
               "recall@10": recall(single.search_batched_parallel(queries).indices, truth),
               "inprocess_batch_qps": inproc_qps, "ray_data_batch_qps": ray_qps_single}
        entry["rows"].append(row)
        print(name, row, flush=True)

        for shards in map(int, args.shards.split(",")):
            root = work / f"{name}-{shards}"
            # Per-shard knobs from the expected shard size, the same for every shard.
            configure = knobs(n // shards)
            t = time.perf_counter()
            index = ShardedIndex.build(db, shards, 10, ds.metric, configure=configure,
                                       directory=root)
            build_s = time.perf_counter() - t
            index.search(qs[0])  # warm
            fan = latency_us(index.search, qs)
            rec = recall(index.search_batched(queries).indices, truth)
            t = time.perf_counter()
            index.search_batched(batch[:10_000])
            actor_batch_qps = 10_000 / (time.perf_counter() - t)
            index.shutdown()
            b = folder_bytes(root)
            t = time.perf_counter()
            out = batch_search(batch, root, 10, num_threads=2, batch_size=8192).materialize()
            ray_qps = len(batch) / (time.perf_counter() - t)
            row = {"shards": shards, "build_s": build_s,
                   "bytes_per_item": {k: v / n for k, v in b.items()},
                   "sharded_single_query_us": fan,
                   "fanout_overhead_us": fan - entry["rows"][0]["single_query_us"],
                   "recall@10": rec, "actor_batch_qps": actor_batch_qps,
                   "ray_data_batch_qps": ray_qps}
            entry["rows"].append(row)
            print(name, row, flush=True)
        results["datasets"][name] = entry
    results["load_average_end"] = os.getloadavg()
    ray.shutdown()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
