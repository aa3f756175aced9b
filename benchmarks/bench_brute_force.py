"""Exact top-k on one thread: mipscan.brute_force vs numpy vs keras_rs BruteForceRetrieval.

Example (from the repository root)::

    python -m benchmarks.bench_brute_force --dataset seed --k 10 --threads 1 --out results/

The tutorial's 270,882 x 32 candidates and 943 user queries (``seed``; a synthetic set of
the same shape, with a printed note, when ``mipscan.recsys.tutorial_embeddings`` is not
available). BLAS is pinned with threadpoolctl, mipscan's top-k with ``num_threads``, XLA
with ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` (one thread), and
every contender answers the same queries in the same run. Reported: median seconds over
``--repeats`` timed calls after one warm-up, queries per second, and mipscan's speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", default="seed", help="seed or synthetic:n=..,d=..,nq=..")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=128, help="numpy's query block")
    ap.add_argument("--no-keras", action="store_true", help="skip keras_rs")
    ap.add_argument("--out", default="results", help="output folder")
    return ap.parse_args(argv)


def load(spec: str):
    from benchmarks import datasets

    try:
        ds = datasets.load(spec)
        note = None
    except datasets.DatasetUnavailable as exc:
        if spec != "seed":
            raise
        ds = datasets.synthetic(n=270_882, d=32, nq=943, seed=42)
        note = f"NOTE: seed unavailable ({exc}); using {ds.name} of the same shape"
        print(note, flush=True)
    return ds, note


def topk_scores(db, queries, ids) -> np.ndarray:
    """Float64 scores of the given ids, sorted best first (compared across contenders)."""
    s = np.einsum("qkd,qd->qk", db[ids].astype(np.float64), queries.astype(np.float64))
    return np.sort(s, axis=1)[:, ::-1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    os.environ["KERAS_BACKEND"] = "jax"
    from threadpoolctl import threadpool_limits

    import mipscan
    from benchmarks.common import (CpuNoise, environment, numpy_topk, threadpool_info,
                                   time_median)
    from benchmarks.run import exact_neighbors

    ds, note = load(args.dataset)
    db, queries, k = ds.train, ds.test, args.k
    if ds.metric != "dot_product":
        raise SystemExit(f"{ds.name}: this benchmark runs inner product only")
    nq = queries.shape[0]
    env = environment()
    print(f"{ds.name}: db {db.shape}, {nq} queries, k={k}, {args.threads} thread(s), "
          f"simd {mipscan.simd_level()}", flush=True)

    contenders = {
        "mipscan.brute_force": lambda: mipscan.brute_force(db, queries, k=k,
                                                           num_threads=args.threads).indices,
        f"numpy (blocks of {args.block} queries)": lambda: numpy_topk(db, queries, k,
                                                                      block=args.block),
        "numpy (one matmul)": lambda: numpy_topk(db, queries, k, block=nq),
    }
    keras_note = None
    if not args.no_keras:
        try:
            import keras
            import keras_rs

            if keras.backend.backend() != "jax":
                raise ImportError(f"keras backend is {keras.backend.backend()}, not jax")
            layer = keras_rs.layers.BruteForceRetrieval(candidate_embeddings=db, k=k,
                                                        return_scores=True)

            def keras_call():
                _, ids = layer(queries)
                return np.asarray(ids)

            contenders["keras_rs BruteForceRetrieval (jax, eager)"] = keras_call
        except ImportError as exc:
            keras_note = f"keras_rs skipped: {exc}"
            print(keras_note, flush=True)

    rows = {}
    exact = topk_scores(db, queries, exact_neighbors(db, queries, k, ds.metric))
    with threadpool_limits(limits=args.threads):
        pools = threadpool_info()
        for name, fn in contenders.items():
            ids = np.asarray(fn()).astype(np.int64)
            got = topk_scores(db, queries, ids)
            agree = bool(np.allclose(got, exact, rtol=1e-4, atol=1e-5))
            with CpuNoise() as noise:
                median, times = time_median(fn, args.repeats, warmup=0)
            rows[name] = {"seconds": median, "times": times, "qps": nq / median,
                          "topk_scores_exact": agree, "foreign_cores": noise.foreign_cores}
            print(f"  {name:45s} {median * 1e3:9.1f} ms  {nq / median:10.0f} QPS"
                  f"  (others used {noise.foreign_cores or 0:.2f} cores)"
                  f"{'' if agree else '  (top-k scores differ!)'}", flush=True)

    ref = rows["mipscan.brute_force"]["seconds"]
    for row in rows.values():
        row["mipscan_speedup"] = row["seconds"] / ref
    best_numpy = min((n for n in rows if n.startswith("numpy")), key=lambda n: rows[n]["seconds"])
    env["loadavg_end"] = list(os.getloadavg())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_brute_force " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "dataset": {"name": ds.name, "n": int(db.shape[0]), "d": int(db.shape[1]), "nq": nq,
                    "note": note},
        "k": k, "threads": args.threads, "repeats": args.repeats, "env": env,
        "threadpools": pools, "xla_flags": os.environ.get("XLA_FLAGS"), "keras_note": keras_note,
        "results": rows,
        "ratio_vs_numpy": rows[best_numpy]["seconds"] / ref, "best_numpy": best_numpy,
    }
    lines = [f"mipscan.brute_force vs {best_numpy}: {result['ratio_vs_numpy']:.2f}x "
             f"(target >= 1.0x)"]
    for name, row in rows.items():
        if name != "mipscan.brute_force":
            lines.append(f"mipscan.brute_force vs {name}: {row['mipscan_speedup']:.2f}x")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "brute_force.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
