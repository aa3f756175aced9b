"""Filtered search (issue 15): recall@10 against exact filtered search, and QPS on one
thread, for mipscan, faiss (IVF,Flat + IDSelectorBitmap), hnswlib (filter callable) and
numpy exact over the allowed rows, in one run, on one dataset.

Allowed sets, at fractions 50 %, 10 %, 1 %, 0.1 % of the rows:

* ``random``: one random subset shared by all queries;
* ``far``: per query, the rows nearest (by inner product) to a leaf centroid far from
  the query (the centroid ranked at 75 % of the query's centroid order): correlated with
  the query, the hard case for index search. Every system gets them prebuilt: faiss one
  bitmap and selector per query, hnswlib one membership array per query, mipscan one
  ``Filter`` per query (``mipscan (id lists)``: the lists of row ids instead, converted in
  every call).

Every system gets the same queries and filters; each is swept over its knob (mipscan:
leaves_to_search with filter_strategy auto, plus the forced exact plan; faiss: nprobe;
hnswlib: ef) and the table shows, per system, the fastest point reaching recall 0.95 (or
its best recall when none does). QPS is batched (one call for the batch when the filter
is shared, per query for per-query filters in faiss and hnswlib, as their APIs take them).

    python -m benchmarks.bench_filtered --dataset glove-50-dev --queries 300
    python -m benchmarks.bench_filtered --calibrate     # the planner's cost constants

Writes a markdown table to stdout (and --out FILE.md / FILE.json when given).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from benchmarks import common, datasets

FRACTIONS = (0.5, 0.1, 0.01, 0.001)
TARGET = 0.95


def _timed(fn, repeats=3, budget=0.5, most=20):
    """(result, best time) of at least `repeats` runs, more (up to `most`) while the runs
    took less than `budget` seconds in all: on a shared machine a fast call needs more
    samples for its best to be a quiet one, the same rule for every system."""
    best = math.inf
    out = None
    spent = 0.0
    runs = 0
    while runs < repeats or (spent < budget and runs < most):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return out, best


def _recall(ids, gt):
    hits = 0
    for a, b in zip(ids, gt):
        b = [x for x in b if x >= 0]
        if b:
            hits += len(set(int(x) for x in a if x >= 0) & set(int(x) for x in b)) / len(b)
    return hits / len(gt)


def _exact(train, Q, allowed_per_query, k):
    out = np.full((len(Q), k), -1, np.int64)
    for i, rows in enumerate(allowed_per_query):
        s = train[rows] @ Q[i]
        top = np.argsort(-s, kind="stable")[:k]
        out[i, :len(top)] = rows[top]
    return out


def make_filters(train, Q, centroids, kind, frac, rng):
    n = len(train)
    m = max(1, int(round(frac * n)))
    if kind == "random":
        rows = np.sort(rng.choice(n, m, replace=False))
        return rows, [rows] * len(Q)
    per = []
    order = np.argsort(-(Q @ centroids.T), axis=1)
    for i in range(len(Q)):
        c = centroids[order[i, int(0.75 * len(centroids))]]
        per.append(np.sort(np.argpartition(-(train @ c), m - 1)[:m]))
    return None, per


def run(args):
    ds = datasets.load(args.dataset)
    train, Q = ds.train, ds.test[:args.queries]
    n, d = train.shape
    k = 10
    rng = np.random.default_rng(0)
    L = 100 if ds.name == "seed" else max(8, min(2000, round(math.sqrt(n))))
    import faiss
    import hnswlib

    import mipscan

    with common.pinned_threads(1):
        t0 = time.perf_counter()
        s = (mipscan.builder(train, k, "dot_product")
             .tree(num_leaves=L, num_leaves_to_search=max(1, L // 10),
                   training_sample_size=min(n, 100_000))
             .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100)
             .set_n_training_threads(1).build())
        build_m = time.perf_counter() - t0
        centroids = np.asarray(s._arrays["centroids"])[:, :d]
        quant = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quant, d, L, faiss.METRIC_INNER_PRODUCT)
        ivf.train(train)
        ivf.add(train)
        t0 = time.perf_counter()
        hn = hnswlib.Index(space="ip", dim=d)
        hn.init_index(max_elements=n, M=16, ef_construction=args.hnsw_ef_construction,
                      random_seed=0)
        hn.add_items(train, np.arange(n), num_threads=1)
        build_h = time.perf_counter() - t0
    print(f"# {ds.name}: {n} x {d}, {len(Q)} queries; mipscan build {build_m:.1f} s, "
          f"hnswlib build {build_h:.1f} s", file=sys.stderr)
    rows_out = []
    leaves_grid = sorted({max(1, round(L * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.4)})
    with common.pinned_threads(1):
        for kind in args.kinds.split(","):
            for frac in FRACTIONS:
                shared, per = make_filters(train, Q, centroids, kind, frac, rng)
                gt = _exact(train, Q, per, k)
                points = {}

                def add(system, knob, ids, secs):
                    r = _recall(ids, gt)
                    points.setdefault(system, []).append(
                        {"knob": knob, "recall": r, "qps": len(Q) / secs})

                # mipscan: a shared set as a Filter built once, per-query sets as one Filter
                # per query built once (as faiss's bitmaps and hnswlib's membership arrays
                # are built outside the timing); "mipscan (id lists)": the per-query sets
                # as lists of row ids, converted in every call. numpy gets the shared
                # set's rows gathered once (a Filter caches them too)
                allowed = (s.make_filter(allowed=shared) if shared is not None
                           else [s.make_filter(allowed=p) for p in per])
                for ls in leaves_grid:
                    res, secs = _timed(lambda: s.search_batched(
                        Q, k, leaves_to_search=ls, allowed=allowed))
                    add("mipscan", f"leaves {ls} (auto)", res.indices, secs)
                    if shared is None:
                        res, secs = _timed(lambda: s.search_batched(
                            Q, k, leaves_to_search=ls, allowed=per))
                        add("mipscan (id lists)", f"leaves {ls} (auto)", res.indices, secs)
                for strat in ("exact", "index"):
                    grid = leaves_grid if strat == "index" and not args.quick else leaves_grid[:1]
                    for ls in grid:
                        res, secs = _timed(lambda: s.search_batched(
                            Q, k, leaves_to_search=ls, allowed=allowed, filter_strategy=strat))
                        add(f"mipscan ({strat})", f"leaves {ls}" if strat == "index" else "-",
                            res.indices, secs)
                # numpy exact over the allowed rows
                if shared is not None:
                    sub = train[shared]  # gathered once, as a Filter keeps its rows

                    def np_exact():
                        sc = Q @ sub.T
                        kk = min(k, len(shared))
                        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
                        top = np.take_along_axis(sc, part, 1)
                        o = np.argsort(-top, 1)
                        return shared[np.take_along_axis(part, o, 1)]
                else:
                    def np_exact():
                        out = np.full((len(Q), k), -1, np.int64)
                        for i, rws in enumerate(per):
                            sc = train[rws] @ Q[i]
                            kk = min(k, len(rws))
                            part = np.argpartition(-sc, kk - 1)[:kk]
                            out[i, :kk] = rws[part[np.argsort(-sc[part])]]
                        return out
                ids, secs = _timed(np_exact)
                add("numpy exact", "-", ids, secs)
                # faiss IVF,Flat + IDSelectorBitmap
                def bitmap(rows):
                    bits = np.zeros((n + 7) // 8, np.uint8)
                    np.bitwise_or.at(bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))
                    return bits
                # the bitmaps must outlive the selectors (faiss keeps a raw pointer)
                bms = [bitmap(r) for r in per] if shared is None else [bitmap(shared)]
                sels = [faiss.IDSelectorBitmap(n, faiss.swig_ptr(b)) for b in bms]
                for nprobe in sorted({1, 4, 16, 32, 64, 128, L} & set(range(1, L + 1))):
                    if shared is not None:
                        p = faiss.SearchParametersIVF(sel=sels[0], nprobe=nprobe)
                        (_, ids), secs = _timed(lambda: ivf.search(Q, k, params=p))
                    else:
                        ps = [faiss.SearchParametersIVF(sel=sl, nprobe=nprobe) for sl in sels]

                        def per_q():
                            return np.vstack([ivf.search(Q[i:i + 1], k, params=ps[i])[1]
                                              for i in range(len(Q))])
                        ids, secs = _timed(per_q)
                    add("faiss IVF,Flat+bitmap", f"nprobe {nprobe}", ids, secs)
                # hnswlib with a filter callable
                for ef in (10, 40, 160):
                    hn.set_ef(max(ef, k))
                    if shared is not None:
                        member = np.zeros(n, bool)
                        member[shared] = True
                        flt = lambda i: bool(member[i])  # noqa: E731

                        def hq():
                            return hn.knn_query(Q, k=min(k, len(shared)), num_threads=1,
                                                filter=flt)[0]
                    else:
                        members = []
                        for r in per:
                            mb = np.zeros(n, bool)
                            mb[r] = True
                            members.append(mb)

                        def hq():
                            out = []
                            for i in range(len(Q)):
                                mb = members[i]
                                out.append(hn.knn_query(Q[i:i + 1], k=min(k, len(per[i])),
                                                        num_threads=1,
                                                        filter=lambda j: bool(mb[j]))[0][0])
                            return out
                    try:
                        t0 = time.perf_counter()
                        ids = hq()
                        secs = time.perf_counter() - t0
                    except RuntimeError:  # hnswlib: fewer than k results reachable
                        continue
                    add("hnswlib M16+filter", f"ef {ef}", ids, secs)
                    if secs > 10:
                        break
                rows_out.append({"kind": kind, "fraction": frac, "points": points})
                print(_table_row(kind, frac, points), file=sys.stderr)
    return ds, rows_out


def _best(pts):
    ok = [p for p in pts if p["recall"] >= TARGET]
    if ok:
        return max(ok, key=lambda p: p["qps"]), True
    return max(pts, key=lambda p: p["recall"]), False


def _fmt(p, ok):
    return (f"{p['recall']:.3f} @ {p['qps']:,.0f} ({p['knob']})" if ok
            else f"max {p['recall']:.3f} @ {p['qps']:,.0f} ({p['knob']})")


SYSTEMS = ("mipscan", "mipscan (exact)", "mipscan (index)", "mipscan (id lists)",
           "faiss IVF,Flat+bitmap", "hnswlib M16+filter", "numpy exact")
#: The peers (the ratio column compares mipscan's best with theirs).
PEERS = SYSTEMS[4:]


def _table_row(kind, frac, points):
    cells = []
    for sname in SYSTEMS:
        pts = points.get(sname)
        cells.append(_fmt(*_best(pts)) if pts else "-")
    best_m, ok_m = _best(points["mipscan"])
    peers = [(_best(points[s])) for s in PEERS if s in points]
    peer_qps = max([p["qps"] for p, ok in peers if ok], default=0)
    ratio = f"{best_m['qps'] / peer_qps:.2f}x" if ok_m and peer_qps else "-"
    return f"| {kind} | {frac * 100:g} % | " + " | ".join(cells) + f" | {ratio} |"


def markdown(ds, rows):
    head = ("| allowed | fraction | " + " | ".join(SYSTEMS) +
            " | mipscan / best peer @0.95 |\n|" + "---|" * (len(SYSTEMS) + 3))
    lines = [f"### {ds.name}: filtered search, recall@10 vs exact filtered search, "
             f"QPS batched on one thread (fastest point at recall >= {TARGET}, else the best recall)",
             "", head]
    for r in rows:
        lines.append(_table_row(r["kind"], r["fraction"], r["points"]))
    return "\n".join(lines)


def calibrate(args):
    """Times the two plans on glove-50-dev and prints per-unit costs for _filters."""
    import mipscan
    from mipscan import _filters
    ds = datasets.load(args.dataset)
    train, Q = ds.train, ds.test[:200]
    n, d = train.shape
    L = max(8, round(math.sqrt(n)))
    with common.pinned_threads(1):
        s = (mipscan.builder(train, 10, "dot_product").tree(L, L // 10)
             .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
        rng = np.random.default_rng(0)
        for frac in (0.5, 0.1, 0.01, 0.001):
            allowed = rng.choice(n, int(frac * n), replace=False)
            lst = [allowed] * len(Q)
            out = {}
            for strat in ("index", "exact"):
                for name, a in (("shared", allowed), ("lists", lst)):
                    _, secs = _timed(lambda: s.search_batched(Q, 10, allowed=a,
                                                              filter_strategy=strat), 5)
                    out[f"{strat}/{name}"] = secs / len(Q) * 1e9
            r = _filters.resolve("x", s._state, len(Q), allowed, None, False)
            st = s._state
            code = _filters.plan(s, st, r, L // 10, 100, 10, "auto", True, True)[0]
            print(f"fraction {frac}: measured ns/query " +
                  ", ".join(f"{k} {v:,.0f}" for k, v in out.items()) +
                  f"; auto picks {('index', 'exact', 'exact (BLAS)', 'exact (bitsets)')[code]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="glove-50-dev")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", default=None, help="FILE (writes FILE.md and FILE.json)")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--kinds", default="random,far", help="allowed-set kinds to run")
    ap.add_argument("--quick", action="store_true", help="mipscan's forced index plan at one knob only")
    ap.add_argument("--hnsw-ef-construction", type=int, default=100,
                    help="hnswlib build quality (lower builds faster on a busy machine)")
    args = ap.parse_args(argv)
    if args.calibrate:
        calibrate(args)
        return
    ds, rows = run(args)
    md = markdown(ds, rows)
    print(md)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"dataset": ds.name, "queries": args.queries, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
