"""Latency of mipscan.keras.ApproximateRetrieval vs keras_rs BruteForceRetrieval, per backend.

Example (from the repository root)::

    python benchmarks/bench_keras.py --backends jax tensorflow torch --out results/

The Keras-RS ScaNN tutorial's setting: the two-tower MovieLens model
(``mipscan.recsys.tutorial_embeddings``: ``--epochs`` 50, ``--copies`` 100, i.e. 270,882
x 32 candidates), trained once (with JAX) and shared by every backend; queries are the
tutorial's 4 users (10, 5, 42, 345) and all 943 users. Each backend runs in its own
subprocess (Keras picks its backend on first import), and times, for both layers:

- ``eager``: ``layer(queries)``, the tutorial's uncompiled forward pass;
- ``predict_on_batch``: the layer in a Keras model, through the model's compiled predict
  function (jax.jit on JAX, tf.function on TensorFlow; PyTorch runs it eagerly);
- and, for reference, the layer's mipscan searcher called directly on numpy queries
  (the layer's own cost is the difference).

Each time is the median of ``--repeats`` calls after one warm-up call, and includes
converting the outputs to numpy (so JAX's asynchronous dispatch is waited for). Also
reported: the layers' build times, the index size, recall@10 of the approximate layer
against brute force, the SIMD level, the CPU, versions and the load average (other
processes on the machine skew every number). Threads: all cores unless ``--threads``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(REPO))
TUTORIAL_USERS = (10, 5, 42, 345)
MARKER = "BENCH_KERAS_JSON: "


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="pin every library to N threads")
    ap.add_argument("--layer-kwargs", default="{}",
                    help='ApproximateRetrieval arguments as JSON, e.g. the tutorial\'s ScaNN '
                         'settings: \'{"num_leaves": 100, "num_leaves_to_search": 30, '
                         '"dimensions_per_block": 2, "reordering_num_neighbors": 500}\'')
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each backend, wait up to this long for other processes "
                         "to leave the CPU idle")
    ap.add_argument("--out", default=None, help="folder for bench_keras-<time>.json")
    ap.add_argument("--worker", metavar="BACKEND", help=argparse.SUPPRESS)
    ap.add_argument("--embeddings", help=argparse.SUPPRESS)
    ap.add_argument("--make-embeddings", metavar="OUT", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- worker (one backend)
def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, caches, thread pools
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pin_threads(threads: int | None, backend: str) -> None:
    if threads is None:
        return
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)


def worker(args) -> dict:
    import keras
    import keras_rs

    import mipscan
    from mipscan.keras import ApproximateRetrieval

    backend = keras.backend.backend()
    _pin_threads(args.threads, backend)
    with np.load(args.embeddings) as z:
        candidates, users = z["candidates"], z["users"]
    queries = {"4 users": users[list(TUTORIAL_USERS)], "943 users": users[1:]}

    t0 = time.perf_counter()
    approx = ApproximateRetrieval(candidates, k=args.k, **json.loads(args.layer_kwargs))
    build_approx = time.perf_counter() - t0
    t0 = time.perf_counter()
    brute = keras_rs.layers.BruteForceRetrieval(candidates, k=args.k)
    build_brute = time.perf_counter() - t0

    def as_model(layer):
        inputs = keras.Input(shape=(candidates.shape[1],))
        return keras.Model(inputs, layer(inputs))

    models = {"approx": as_model(approx), "brute": as_model(brute)}
    layers = {"approx": approx, "brute": brute}
    result = {"backend": backend, "n": int(len(candidates)), "d": int(candidates.shape[1]),
              "k": args.k, "searcher": repr(approx.searcher),
              "index_bytes": int(approx.searcher.index_bytes),
              "build_seconds": {"approx": build_approx, "brute": build_brute},
              "predict_jit_compile": bool(models["approx"].jit_compile),
              "queries": {}}
    for qname, q in queries.items():
        row = {}
        for lname in ("approx", "brute"):
            layer, model = layers[lname], models[lname]
            row[f"{lname}_eager"] = _median_seconds(
                lambda: [keras.ops.convert_to_numpy(t) for t in layer(q)], args.repeats)
            row[f"{lname}_predict_on_batch"] = _median_seconds(
                lambda: [np.asarray(t) for t in model.predict_on_batch(q)], args.repeats)
        search = (approx.searcher.search_batched_parallel if len(q) >= 64
                  else approx.searcher.search_batched)  # what the layer calls
        row["searcher_numpy"] = _median_seconds(lambda: search(q, final_num_neighbors=args.k),
                                                args.repeats)
        ids = keras.ops.convert_to_numpy(approx(q)[1])
        truth = keras.ops.convert_to_numpy(brute(q)[1])
        row["recall@k"] = float(np.mean([len(set(a) & set(b)) / args.k
                                         for a, b in zip(ids, truth)]))
        result["queries"][qname] = row
    result["versions"] = {"keras": keras.__version__, "keras_rs": keras_rs.__version__,
                          "mipscan": mipscan.__version__,
                          backend: __import__(backend).__version__}
    result["load_average"] = os.getloadavg()
    result["simd_level"] = mipscan.simd_level()
    result["mipscan_threads"] = mipscan.get_num_threads()
    return result


# ---------------------------------------------------------------- driver
def _env(backend: str, threads: int | None) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   MIPSCAN_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads))
        if threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                " intra_op_parallelism_threads=1").strip()
    return env


def _child(args, backend: str, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend,
           "--k", str(args.k), "--repeats", str(args.repeats),
           "--layer-kwargs", args.layer_kwargs, *extra]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=_env(backend, args.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{backend} worker failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def print_table(results: list[dict]) -> None:
    print(f"\n{'backend':<11} {'queries':<10} {'mode':<17} {'approx ms':>10} {'brute ms':>10} "
          f"{'speed-up':>9} {'recall@k':>9} {'searcher ms':>12}")
    for r in results:
        for qname, row in r["queries"].items():
            for mode in ("eager", "predict_on_batch"):
                a, b = row[f"approx_{mode}"], row[f"brute_{mode}"]
                print(f"{r['backend']:<11} {qname:<10} {mode:<17} {_ms(a):>10} {_ms(b):>10} "
                      f"{b / a:8.1f}x {row['recall@k']:9.4f} {_ms(row['searcher_numpy']):>12}")
    print("(searcher ms: the layer's mipscan searcher called directly on numpy queries)")
    for r in results:
        print(f"{r['backend']}: {r['searcher']}; build {r['build_seconds']['approx']:.2f} s "
              f"(BruteForceRetrieval {r['build_seconds']['brute']:.2f} s); predict "
              f"jit_compile={r['predict_jit_compile']}; load average after timing "
              f"{r['load_average'][0]:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_embeddings:
        from mipscan.recsys import tutorial_embeddings

        emb = tutorial_embeddings(data_dir=args.data_dir, epochs=args.epochs,
                                  copies=args.copies, seed=args.seed)
        np.savez(args.make_embeddings, candidates=emb.candidates, users=emb.users)
        return 0
    if args.worker:
        print(MARKER + json.dumps(worker(args)), flush=True)
        return 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "tutorial.npz")
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--make-embeddings", npz,
               "--data-dir", args.data_dir, "--epochs", str(args.epochs),
               "--copies", str(args.copies), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, env=_env("jax", None), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"tutorial_embeddings failed:\n{proc.stdout}\n{proc.stderr}")
        print(f"tutorial embeddings (epochs={args.epochs}, copies={args.copies}): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for backend in args.backends:
            if args.wait_quiet:
                from benchmarks.common import wait_for_quiet

                wait_for_quiet(args.wait_quiet)
            proc = _child(args, backend, ["--embeddings", npz])
            line = next(l for l in proc.stdout.splitlines() if l.startswith(MARKER))
            results.append(json.loads(line[len(MARKER):]))
            print(f"{backend}: done", flush=True)
    print_table(results)
    from benchmarks.common import cpu_model

    report = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
              "threads": args.threads, "epochs": args.epochs, "copies": args.copies,
              "layer_kwargs": json.loads(args.layer_kwargs),
              "seed": args.seed, "repeats": args.repeats, "results": results}
    print(f"cpu: {report['cpu']} x {report['cores']}; load average {report['load_average']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench_keras-{report['time'].replace(':', '')}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
