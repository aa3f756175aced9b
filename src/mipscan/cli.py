"""The ``mipscan`` command line.

``mipscan demo`` reproduces the Keras-RS ScaNN tutorial end to end: it trains the
two-tower model on MovieLens 100K, builds the tutorial's 270,882 candidates, and compares
keras-rs brute force, mipscan's exact brute force and mipscan's approximate index (as the
Keras layer mipscan.keras.ApproximateRetrieval and through the ScaNN-style API) on
build time, latency and recall@k for the tutorial's 4 users and for all 943 users.
Needs the ``recsys`` extra (``pip install "mipscan[recsys]"``). ``mipscan serve DIR``
serves an index folder over HTTP (:mod:`mipscan.serve`, the ``serve`` extra); ``demo
--save-index DIR`` saves the demo's index and page data for it. ``mipscan --help`` and
``mipscan --version`` need only the core (the parser is the standard library's argparse).
Errors go to stderr with a non-zero exit status: 2 for bad arguments or data, 1 for a
missing extra (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import mipscan
from mipscan.recsys._extras import MissingExtraError, require_recsys, reraise

SearchFn = Callable[[np.ndarray], np.ndarray]


# --- the methods compared. Each builds its index from the candidates and returns a
# --- search function: (nq, d) float32 queries -> (nq, k) candidate rows.

def keras_rs_brute_force(candidates: np.ndarray, k: int) -> SearchFn:
    """(a) keras_rs.layers.BruteForceRetrieval, called eagerly as the tutorial does."""
    import keras
    import keras_rs

    layer = keras_rs.layers.BruteForceRetrieval(candidate_embeddings=candidates, k=k,
                                                return_scores=False)
    # convert_to_numpy waits for the result (JAX dispatches asynchronously).
    return lambda q: keras.ops.convert_to_numpy(layer(q))


def mipscan_brute_force(candidates: np.ndarray, k: int) -> SearchFn:
    """(b) mipscan.brute_force: exact, BLAS products plus a C++ top-k."""
    return lambda q: mipscan.brute_force(candidates, q, k).indices


# The tutorial's ScaNN parameters: 100 leaves, 30 searched, AH with 2 dimensions per
# block, 500 candidates reordered, 12 k-means iterations.
TUTORIAL_INDEX = dict(num_leaves=100, num_leaves_to_search=30, training_iterations=12,
                      dimensions_per_block=2, reordering_num_neighbors=500)


def tutorial_index(builder):
    """The tutorial's stages on a ScaNN-style builder (mipscan's or ScaNN's), built."""
    p = TUTORIAL_INDEX
    return (builder.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
                         training_iterations=p["training_iterations"])
            .score_ah(p["dimensions_per_block"])
            .reorder(p["reordering_num_neighbors"])
            .build())


def mipscan_keras_layer(candidates: np.ndarray, k: int) -> SearchFn:
    """(c) mipscan.keras.ApproximateRetrieval, the Keras-RS layer ScaNN never had, called
    eagerly like keras-rs's BruteForceRetrieval, with the tutorial's ScaNN parameters."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    layer = ApproximateRetrieval(candidate_embeddings=candidates, k=k, return_scores=False,
                                 **TUTORIAL_INDEX)
    return lambda q: keras.ops.convert_to_numpy(layer(q))


def mipscan_approximate(candidates: np.ndarray, k: int) -> SearchFn:
    """(d) the same index through mipscan's ScaNN-compatible API, as the tutorial calls
    ScaNN: ``search_batched_parallel(...).indices``."""
    searcher = tutorial_index(mipscan.builder(candidates, k, "dot_product"))
    return lambda q: np.asarray(searcher.search_batched_parallel(q, final_num_neighbors=k).indices)


class MethodUnavailable(Exception):
    """A peer that is not installed here: its row says how to add it."""


def scann_approximate(candidates: np.ndarray, k: int) -> SearchFn:
    """(e) Google's ScaNN itself, when installed (the ``scann`` wheel, or ``scann-core``,
    which installs the same module), built and called as the tutorial does, with the
    same parameters as (c) and (d): the tutorial's own comparison, completed."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # scann imports TensorFlow if present
    try:
        from scann import scann_ops_pybind
    except Exception as exc:  # ImportError, or a wheel that fails to load beside TensorFlow
        raise MethodUnavailable("not installed: `pip install scann` (or scann-core) adds "
                                f"this row ({type(exc).__name__}: {exc})") from None
    searcher = tutorial_index(scann_ops_pybind.builder(candidates, k, "dot_product"))
    return lambda q: np.asarray(searcher.search_batched_parallel(q, final_num_neighbors=k)[0])


METHODS: list[tuple[str, Callable[[np.ndarray, int], SearchFn]]] = [
    ("keras-rs brute force", keras_rs_brute_force),
    ("mipscan brute force", mipscan_brute_force),
    ("mipscan ApproximateRetrieval (Keras layer)", mipscan_keras_layer),
    ("mipscan searcher (ScaNN API)", mipscan_approximate),
    ("ScaNN (scann_ops_pybind), same parameters", scann_approximate),
]


# --- "never recommend what the user already rated": the same searches with, per query,
# --- the candidate rows of the user's training ratings excluded. Each maker returns
# --- (queries, excluded lists) -> (nq, k) candidate rows (-1 where fewer remain).

def mipscan_approximate_excluding(candidates: np.ndarray, k: int):
    """(d) with ``excluded=`` per query: filtered in the engine, planned by selectivity."""
    searcher = tutorial_index(mipscan.builder(candidates, k, "dot_product"))
    return lambda q, ex: np.asarray(searcher.search_batched_parallel(
        q, final_num_neighbors=k, excluded=ex).indices)


def mipscan_keras_layer_excluding(candidates: np.ndarray, k: int):
    """(c) with ``excluded_ids=`` (one padded row of ids per query) in the layer's call.
    The padded matrix is made once per query set (in the untimed warm-up call), as a
    user keeps it between calls; the searcher likewise gets its lists ready-made."""
    import keras

    from mipscan.keras import ApproximateRetrieval, pad_ids

    layer = ApproximateRetrieval(candidate_embeddings=candidates, k=k, return_scores=False,
                                 **TUTORIAL_INDEX)
    last = [None, None]  # the query set's lists and their padded matrix

    def search(q, ex):
        if last[0] is not ex:
            last[:] = ex, pad_ids(ex)
        return keras.ops.convert_to_numpy(layer(q, excluded_ids=last[1]))

    return search


def exact_excluding(candidates: np.ndarray, queries: np.ndarray, excluded, k: int,
                    block: int = 64) -> np.ndarray:
    """Exact top-k rows of each query over the candidates it does not exclude (numpy,
    blocks of queries, excluded scores set to -inf)."""
    out = np.empty((len(queries), k), np.int64)
    for b in range(0, len(queries), block):
        sc = queries[b:b + block] @ candidates.T
        for i, ex in enumerate(excluded[b:b + block]):
            sc[i, ex] = -np.inf
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sc, part, axis=1)
        out[b:b + block] = np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), 1)
    return out


FILTERED_METHODS = [
    ("mipscan ApproximateRetrieval (Keras layer), excluding rated", mipscan_keras_layer_excluding),
    ("mipscan searcher (ScaNN API), excluding rated", mipscan_approximate_excluding),
]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (rows of candidate indices)."""
    found = np.asarray(found).reshape(exact.shape[0], -1)
    hits = [np.intersect1d(f, e).size for f, e in zip(found, exact)]
    return float(np.mean(hits) / exact.shape[1])


def _time(fn: Callable[[], object], repeats: int) -> tuple[object, float]:
    """One untimed warm-up call, then the median of ``repeats`` timed calls (seconds)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def compare(candidates: np.ndarray, query_sets: dict[str, np.ndarray], k: int,
            repeats: int = 3, log: Callable[[str], None] = lambda s: None,
            exclusions: dict[str, list] | None = None) -> list[dict]:
    """Builds each method once and measures it on every query set against brute force.
    With ``exclusions`` (query set -> one array of excluded candidate rows per query),
    adds the filtered methods, measured against exact filtered search; their rows carry
    ``"filter"`` and ``"excluded_returned"`` (excluded rows found in the results: 0)."""
    exact = {name: mipscan.brute_force(candidates, q, k).indices
             for name, q in query_sets.items()}
    rows = []
    for method, make in METHODS:
        log(f"building {method}")
        t0 = time.perf_counter()
        try:
            search = make(candidates, k)
        except MethodUnavailable as exc:
            rows += [{"method": method, "queries": name, "num_queries": len(q),
                      "status": str(exc)} for name, q in query_sets.items()]
            continue
        build_s = time.perf_counter() - t0
        for name, q in query_sets.items():
            log(f"searching {method} on {name}")
            found, latency = _time(lambda: search(q), repeats)
            rows.append({"method": method, "queries": name, "num_queries": len(q),
                         "status": "ok", "build_s": build_s, "latency_s": latency,
                         "recall": recall_at_k(found, exact[name])})
    if not exclusions:
        return rows
    truth = {}
    for name, q in query_sets.items():
        ex = exclusions[name]
        log(f"exact search excluding rated on {name}")
        truth[name], latency = _time(lambda: exact_excluding(candidates, q, ex, k), repeats)
        rows.append({"method": "numpy exact, excluding rated", "queries": name,
                     "num_queries": len(q), "status": "ok", "build_s": 0.0,
                     "latency_s": latency, "recall": 1.0, "filter": "exclude rated (train)",
                     "excluded_returned": 0})
    for method, make in FILTERED_METHODS:
        log(f"building {method}")
        t0 = time.perf_counter()
        search = make(candidates, k)
        build_s = time.perf_counter() - t0
        for name, q in query_sets.items():
            ex = exclusions[name]
            log(f"searching {method} on {name}")
            found, latency = _time(lambda: search(q, ex), repeats)
            found = np.asarray(found).reshape(len(q), -1)
            leaked = sum(int(np.isin(f, e).sum()) for f, e in zip(found, ex))
            rows.append({"method": method, "queries": name, "num_queries": len(q),
                         "status": "ok", "build_s": build_s, "latency_s": latency,
                         "recall": recall_at_k(found, truth[name]),
                         "filter": "exclude rated (train)", "excluded_returned": leaked})
    return rows


def _render(rows: list[dict], k: int, repeats: int, title: str, caption: str):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption=caption)
    table.add_column("method", no_wrap=True)
    table.add_column("queries", no_wrap=True)
    for col in ("build", "latency", "per query", f"recall@{k}"):
        table.add_column(col, justify="right", no_wrap=True)
    notes = {}  # a method that did not run: why, once, under the table
    for r in rows:
        queries = f"{r['queries']} ({r['num_queries']})"
        if r["status"] != "ok":
            notes.setdefault(r["method"], r["status"])
            table.add_row(r["method"], queries, "—", "—", "—", "—")
            continue
        table.add_row(r["method"], queries, f"{r['build_s']:.2f} s",
                      f"{r['latency_s'] * 1e3:.1f} ms",
                      f"{r['latency_s'] / r['num_queries'] * 1e3:.2f} ms",
                      f"{r['recall']:.4f}")
    if notes:
        table.caption = caption + "".join(f"\n{m}: {why}" for m, why in notes.items())
    return table


class _Fail(Exception):
    """A demo error: its message goes to stderr and the command exits with ``status``."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def demo(data: Path | None = None, epochs: int = 50, copies: int = 100, k: int = 10,
         out: Path | None = None, seed: int = 42, repeats: int = 3,
         save_index: Path | None = None, serve: bool = False) -> Path | None:
    """Train the Keras-RS tutorial's two-tower model on MovieLens 100K and compare
    keras-rs brute force, mipscan.brute_force and mipscan's approximate search."""
    require_recsys("mipscan demo")  # before the data: one line instead of a traceback
    from mipscan.recsys import DataNotFoundError, load_ml100k

    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
            TimeElapsedColumn

        from mipscan.recsys.model import TABLE_SLACK, TUTORIAL_QUERY_USERS, tutorial_embeddings
    except ImportError as exc:  # a backend that is present but broken, say
        raise reraise("mipscan demo", exc) from None

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: room for the whole table
        console = Console(width=120)
    t_start = time.perf_counter()
    try:
        ml = load_ml100k(data)
    except (DataNotFoundError, ValueError) as exc:  # missing or damaged
        raise _Fail(str(exc)) from None
    num_candidates = (ml.num_movies + TABLE_SLACK) * (copies + 1)
    if k > num_candidates:
        raise _Fail(f"--k must be at most the {num_candidates:,} candidates; got {k}")
    console.print(f"MovieLens 100K from {ml.source}: {ml.num_ratings:,} ratings, "
                  f"{ml.num_users:,} users, {ml.num_movies:,} movies "
                  "(GroupLens; Harper & Konstan, ACM TiiS 2015)")

    import keras

    t0 = time.perf_counter()
    with Progress(TextColumn("training two-tower ({task.fields[backend]})"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("train", total=epochs, backend=keras.backend.backend(), losses="")
        val: list[str] = []

        def on_epoch(epoch: int, logs: dict) -> None:
            if "val_loss" in logs:
                val[:] = [f"val_loss {logs['val_loss']:.4f}"]
            bar.update(task, completed=epoch,
                       losses=" ".join([f"loss {logs.get('loss', float('nan')):.4f}", *val]))

        emb = tutorial_embeddings(ml, epochs=epochs, copies=copies, seed=seed, cache=False,
                                  progress=on_epoch)
    train_s = time.perf_counter() - t0
    console.print(f"candidates: {emb.candidates.shape[0]:,} x {emb.candidates.shape[1]} "
                  f"(the {emb.movie_table_rows:,}-row movie table + {copies} noisy copies)")
    query_sets = {"tutorial": emb.tutorial_queries, "all": emb.all_users}
    from mipscan.recsys.model import rated_candidates
    exclusions = {
        name: rated_candidates(ml, ids, emb.movie_table_rows, copies, seed)
        for name, ids in (("tutorial", list(TUTORIAL_QUERY_USERS)), ("all", emb.all_user_ids))}
    with console.status("measuring") as status:
        rows = compare(emb.candidates, query_sets, k, repeats,
                       log=lambda s: status.update(s), exclusions=exclusions)
    total_s = time.perf_counter() - t_start
    console.print(_render(
        rows, k, repeats, f"Top-{k} retrieval over {emb.candidates.shape[0]:,} candidates",
        f"tutorial = users {', '.join(map(str, TUTORIAL_QUERY_USERS))}, all = users 1.."
        f"{emb.all_users.shape[0]}; latency = one call "
        f"with all the queries, median of {repeats} after a warm-up; recall@{k} vs exact "
        f"mipscan.brute_force; \"excluding rated\": the candidates of each user's training "
        f"ratings (all copies) excluded, recall vs exact search over the rest"))
    console.print(f"total {total_s:.1f} s (training and candidates {train_s:.1f} s); "
                  f"mipscan {mipscan.__version__}, simd {mipscan.simd_level()}, "
                  f"{mipscan.get_num_threads()} threads")

    if out is not None:
        import keras_rs

        report = {
            "command": "mipscan demo",
            "config": {"epochs": epochs, "copies": copies, "k": k, "seed": seed,
                       "repeats": repeats, "tutorial_users": list(TUTORIAL_QUERY_USERS),
                       "latency": "median of repeats after one warm-up call"},
            "data": {"source": ml.source, "sha256": ml.sha256, "ratings": ml.num_ratings,
                     "users": ml.num_users, "movies": ml.num_movies},
            "training": {**emb.history, "seconds": train_s},
            "candidates": list(emb.candidates.shape),
            "rows": rows,
            "total_seconds": total_s,
            "environment": {"mipscan": mipscan.__version__, "keras": keras.__version__,
                            "keras_rs": keras_rs.__version__,
                            "backend": keras.backend.backend(),
                            "simd_level": mipscan.simd_level(),
                            "threads": mipscan.get_num_threads(),
                            "python": platform.python_version(),
                            "machine": platform.machine()},
        }
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise _Fail(f"--out: cannot write {out}: {exc.strerror or exc}") from None
        console.print(f"wrote {out}")

    if save_index is None and serve:
        import tempfile

        save_index = Path(tempfile.mkdtemp(prefix="mipscan-demo-")) / "index"
    if save_index is not None:
        save_demo_index(save_index, emb, ml, seed)
        console.print(f"saved the index in {save_index} and the page's data in "
                      f"{save_index}.page (serve them: mipscan serve {save_index})")
    return save_index


def save_demo_index(folder: Path, emb, ml, seed: int = 42) -> None:
    """The tutorial's approximate index in ``folder`` and, beside it in ``folder.page``,
    the user embeddings, movie titles and each user's rated movies (the training split of
    ``seed``) of the service's page (``mipscan serve``)."""
    from mipscan.recsys.model import rated_candidates
    from mipscan.serve import page_dir_for, save_page_data

    searcher = tutorial_index(mipscan.builder(emb.candidates, 10, "dot_product"))
    try:
        searcher.serialize(folder)
        # Candidate i is a copy of movie-table row i % rows, and a row is a movie id.
        rows = emb.movie_table_rows
        titles: list[str | None] = [None] * rows
        for movie_id, title in zip(ml.movie_ids.tolist(), ml.titles.tolist()):
            if 0 <= movie_id < rows:
                titles[movie_id] = title
        # copies=0: the rated movie-table rows; the page excludes every copy of each.
        rated = rated_candidates(ml, emb.all_user_ids, rows, 0, seed)
        save_page_data(page_dir_for(folder), emb.users, emb.all_user_ids.tolist(), titles,
                       rows, rated=[r.tolist() for r in rated])
    except (ValueError, OSError) as exc:
        raise _Fail(f"--save-index: {exc}") from None


# --- the command line (argparse: the core install has no other dependency)

def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not in the range x>={low}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``mipscan`` parser: ``--version`` and the ``demo`` and ``serve`` commands."""
    parser = argparse.ArgumentParser(
        prog="mipscan", description="mipscan: fast top-k retrieval for learned embeddings.")
    parser.add_argument("--version", action="version", version=f"mipscan {mipscan.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doc = demo.__doc__
    p = commands.add_parser(
        "demo", help="train the Keras-RS tutorial's model on MovieLens 100K and compare "
        "brute force with mipscan's approximate search",
        description=" ".join(doc.split()) + ' Needs the recsys extra: pip install '
        '"mipscan[recsys]".')
    p.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="ml-100k folder or ml-100k.zip (default: $MIPSCAN_DATA_DIR, the user "
                   "cache folder, else download from GroupLens)")
    p.add_argument("--epochs", type=_int_at_least(1), default=50,
                   help="training epochs (default and the tutorial: 50)")
    p.add_argument("--copies", type=_int_at_least(0), default=100,
                   help="noisy copies of the movie table to add (default and the tutorial: "
                   "100 -> 270,882 candidates)")
    p.add_argument("--k", type=_int_at_least(1), default=10, help="neighbours per query (default: 10)")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON here")
    p.add_argument("--seed", type=_int_at_least(0), default=42,
                   help="seeds the split, Keras and the noise (default: 42)")
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="timed calls per measurement (default: 3)")
    p.add_argument("--save-index", type=Path, default=None, metavar="DIR",
                   help="also save the approximate index in DIR and the page's user "
                   "embeddings and titles in DIR.page, for `mipscan serve DIR`")
    p.add_argument("--serve", action="store_true",
                   help="then serve the index and its page on http://127.0.0.1:PORT/ "
                   "(needs the serve extra)")
    p.add_argument("--port", type=_int_at_least(0), default=8080,
                   help="the port of --serve (default: 8080)")

    s = commands.add_parser(
        "serve", help="serve an index folder over HTTP (search, updates, hot reload, metrics)",
        description="Serve the index in INDEX_DIR over HTTP: POST /search, /upsert, /delete, "
        "/snapshot, /reload; GET /healthz, /stats, /metrics, and the demo page at / when "
        "INDEX_DIR.page exists. Write endpoints need 'Authorization: Bearer TOKEN' "
        "(MIPSCAN_SERVE_TOKEN or --token-file); without a token they are disabled, and a "
        "non-loopback --host is refused unless --read-only. Needs the serve extra: "
        'pip install "mipscan[serve]". With --ray: the same API as a Ray Serve deployment '
        "whose replicas share one sharded index (INDEX_DIR: a folder written by "
        "ShardedIndex.serialize, or a plain index folder as one shard); needs "
        'pip install "mipscan[serve,ray]".')
    s.add_argument("index_dir", type=Path, metavar="INDEX_DIR", help="the index folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=_int_at_least(0), default=8080,
                   help="port (default: 8080; 0 picks a free one)")
    s.add_argument("--token-file", type=Path, default=None, metavar="F",
                   help="file whose first line is the write token (default: "
                   "$MIPSCAN_SERVE_TOKEN)")
    s.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="engine threads per batched search (default: the CPUs available)")
    s.add_argument("--read-only", action="store_true",
                   help="disable the write endpoints (upsert, delete, snapshot, reload)")
    s.add_argument("--max-body-bytes", type=_int_at_least(1), default=16 << 20, metavar="B",
                   help="largest request body (default: 16 MiB)")
    s.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve deployment over a sharded index on Ray actors "
                   "(--threads: engine threads per shard, default 1)")
    s.add_argument("--replicas", type=_int_at_least(1), default=2, metavar="N",
                   help="with --ray: Serve replicas (default: 2)")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="with --ray: the Ray cluster (default: $RAY_ADDRESS, else a new "
                   "local cluster)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mipscan`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 (usage on stderr) on bad arguments
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "serve":
        return _serve_command(args)
    try:
        if args.serve:  # before training: one line instead of a traceback at the end
            from mipscan.serve import require_serve
            require_serve("mipscan demo --serve")
        saved = demo(data=args.data, epochs=args.epochs, copies=args.copies, k=args.k,
                     out=args.out, seed=args.seed, repeats=args.repeats,
                     save_index=args.save_index, serve=args.serve)
        if args.serve:
            return _serve_command(argparse.Namespace(
                index_dir=saved, host="127.0.0.1", port=args.port, token_file=None,
                threads=None, read_only=False, max_body_bytes=16 << 20, ray=False,
                replicas=2, address=None), "mipscan demo")
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 1
    except _Fail as exc:
        print(f"mipscan demo: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("mipscan demo: interrupted", file=sys.stderr)
        return 130
    return 0


def _serve_command(args: argparse.Namespace, what: str = "mipscan serve") -> int:
    """``mipscan serve``: exit status 2 for a refused start, 1 for a missing extra."""
    from mipscan.serve import ServeError, serve

    try:
        serve(args.index_dir, host=args.host, port=args.port, token_file=args.token_file,
              threads=args.threads, read_only=args.read_only,
              max_body_bytes=args.max_body_bytes, ray=args.ray, replicas=args.replicas,
              address=args.address)
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ServeError as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
