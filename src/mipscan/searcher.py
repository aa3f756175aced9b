"""The Searcher: holds the index arrays and answers queries through one C++ call; and
``load_searcher``, which makes one from an index folder."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np

from mipscan import _filters, _live, _mipscan
from mipscan._build import build_arrays, leaf_axes, leaf_spread, to_mips_rows
from mipscan._policy import BRUTE_FORCE_BELOW, suggest_config
from mipscan._io import check_state, read_index, write_index
from mipscan._schema import (ARRAYS, CORE_ARRAYS, check_stage_args, docids_from_arrays, mips_width,
                             leaf_axes_of, spread_weight_of, static_only)
from mipscan._threads import get_num_threads
from mipscan._validation import MAX_THREADS, as_float_array, check_int, max_abs_value
from mipscan.brute import SearchResult, normalize_rows

__all__ = ["Searcher", "load_searcher"]

# Above this many leaves, batched searches score centroids with one BLAS product per
# batch instead of per query in C++. Kept high: a multi-threaded BLAS call between
# searches costs more than it saves at moderate sizes (its threads spin, and the calling
# thread waits for them: GloVe-50, 300 leaves: 63 us per query with BLAS, 44 without).
_BLAS_LEAF_SCORES_MIN_LEAVES = _live.BLAS_LEAF_SCORES_MIN_LEAVES

# The arrays the core's Index takes after the three every index has, in its order.
_OPTIONAL = tuple(name for name in CORE_ARRAYS if ARRAYS[name][2] is not None)


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


class Searcher:
    """A built (or loaded) index. Create one with :func:`mipscan.builder` or
    :func:`mipscan.load_searcher`; search with :meth:`search`, :meth:`search_batched` or
    :meth:`search_batched_parallel`. Thread-safe: searches may run concurrently.

    Every search returns ``min(final_num_neighbors, size())`` results per query: when the
    searched leaves hold fewer (live) candidates than needed, further leaves are searched
    in order of their centroid score until there are enough, so an index with k live
    points always gives k; an index shrunk (or built) below k gives all it has, as ScaNN
    does; an empty batch of queries (0, d) gives results of shape (0, k).

    Built with ``docids`` (see :meth:`mipscan.builder`), searches return docids and the
    index is live: :meth:`upsert`, :meth:`delete`, :meth:`update` and :meth:`rebalance`
    change it while other threads search. Each update builds the next version aside
    (copy-on-write of the leaves it touches, a new tombstone bitset) and publishes it with
    one assignment; a search reads the current version once and uses it to the end, so
    it sees the index before or after each update call, never a mix, and never waits
    (updates wait for each other). Layout and ownership: ``mipscan._live``.

    A searcher owns its arrays and its thread count (``num_threads``, default
    :func:`mipscan.get_num_threads`; change it with :meth:`set_num_threads`). It pickles
    as its configuration and arrays (no C++ state), so it can be sent to worker
    processes; the copy answers identically.
    """

    def __init__(self, config: dict, arrays: dict[str, np.ndarray], num_threads: int | None = None,
                 docids=None):
        config = _live.SearcherConfig(config)
        # Read-only views: the core checked the integer arrays' structure once, when the
        # Index was made, and trusts it from then on (offsets and ids index memory).
        arrays = {name: _read_only(a) for name, a in arrays.items()}
        self.num_threads = get_num_threads() if num_threads is None else check_int(
            "Searcher()", "num_threads", num_threads, 1, MAX_THREADS)
        n = int(config["n"])
        self.d = int(config["d"])
        self.distance_measure = config["distance_measure"]
        self.num_neighbors = int(config["num_neighbors"])
        self._max_abs = max_abs_value(self.d)  # as_float_array's bound (search()'s one call)
        # An empty index (a live index that starts empty: builder._check_empty_start)
        # has no static layout; it is live from the start.
        index = None if n == 0 else _mipscan.Index(
            arrays["centroids"], arrays["leaf_offsets"], arrays["slot_ids"],
            **{k: arrays.get(k) for k in _OPTIONAL}, n=n, spread_weight=spread_weight_of(config))
        kind, store = (None, None) if docids is None else _docid_store("build()", docids, n)
        # Updates (upsert, delete, rebalance) take this lock; searches never do. They read
        # self._state once and search that snapshot (see mipscan._live).
        self._write_lock = threading.Lock()
        self._state = _live.State(config=config, n_live=n, docids=store, docid_kind=kind,
                                  index=index, arrays=arrays,
                                  **_search_shape(config, arrays))
        if n == 0:
            if store is None:
                raise ValueError("Searcher(): an empty index must have docids (build(docids=[]))")
            self._state = _live.to_live(self._state, self.num_threads)
        # docid -> row, the writer's: made by the first update (an index that is never
        # updated, such as the Keras layer's, never pays for it).
        self._rows_of = None

    # State of the published snapshot (static names kept for the code that reads them).
    @property
    def config(self) -> "_live.SearcherConfig":
        """The configuration (a dict: stages -> arguments); calling it, ``config()``,
        returns ScaNN's text naming the active method (equal after serialize + load)."""
        return self._state.config

    @property
    def n(self) -> int:
        return self._state.n_live

    # Per snapshot: an autopilot phase change or a rebalance may change them.
    @property
    def num_leaves(self) -> int:
        return self._state.num_leaves

    @property
    def num_leaves_to_search(self) -> int:
        return self._state.leaves_to_search

    @property
    def max_leaves_to_search(self) -> int:
        """The largest ``leaves_to_search`` a search accepts: the configured num_leaves, as
        ScaNN accepts, even where small leaves were merged at build time (searches clamp
        it to the leaves built)."""
        return self._state.configured_leaves

    @property
    def reordering_num_neighbors(self) -> int | None:
        return self._state.reorder_k

    @property
    def _index(self):
        return self._state.index

    @property
    def _arrays(self) -> dict:
        st = self._state
        if st.arrays is not None:
            return st.arrays
        return _compact(st, "_arrays")[1]

    # ---------------------------------------------------------------- properties
    @property
    def index_bytes(self) -> int:
        """Bytes of all index arrays (what serialize() writes, less the JSON)."""
        if self._state.n_live == 0:
            return 0  # nothing to store (serialize() refuses an empty index)
        return int(sum(a.nbytes for a in self._arrays.values()))

    def __repr__(self) -> str:
        stages = [s for s in ("tree", "score_ah", "score_brute_force", "reorder") if s in self.config]
        return (f"Searcher(n={self.n}, d={self.d}, distance_measure={self.distance_measure!r}, "
                f"num_leaves={self.num_leaves}, stages={stages}, index_bytes={self.index_bytes})")

    def size(self) -> int:
        """Number of live datapoints (as ScaNN's ``size()``)."""
        return self._state.n_live

    def set_num_threads(self, num_threads: int) -> None:
        """Threads of this searcher's :meth:`search_batched_parallel` (as ScaNN's
        ``set_num_threads``), an int in [1, 1024]. Other searchers are not affected."""
        self.num_threads = check_int("set_num_threads()", "num_threads", num_threads, 1,
                                     MAX_THREADS)

    def __getstate__(self) -> dict:
        # Plain arrays (a memory-mapped file's pages are read into the pickle).
        config, arrays, docids = _compact(self._state, "pickle")
        return {"config": dict(config), "num_threads": self.num_threads,
                "arrays": {k: np.asarray(v) for k, v in arrays.items()}, "docids": docids}

    def __setstate__(self, state: dict) -> None:
        # The loader's checks: a pickle from elsewhere gets no more trust than a folder.
        if not isinstance(state, dict) or not (
                {"config", "num_threads", "arrays"} <= set(state) <= {"config", "num_threads",
                                                                      "arrays", "docids"}):
            raise ValueError("Searcher.__setstate__(): state must be a dict with config, "
                             "num_threads, arrays and optionally docids")
        config, arrays = check_state(state["config"], state["arrays"], "Searcher.__setstate__()")
        self.__init__(config, arrays, state["num_threads"], docids=state.get("docids"))

    # ---------------------------------------------------------------- searching
    def search(self, q, final_num_neighbors=None, pre_reorder_num_neighbors=None,
               leaves_to_search=None, allowed=None, excluded=None,
               filter_strategy="auto") -> SearchResult:
        """Neighbours of one query.

        Args:
            q: (d,) float array.
            final_num_neighbors: results to return, in [1, n] (default: the builder's
                num_neighbors).
            pre_reorder_num_neighbors: approximate candidates rescored exactly when the
                index reorders, in [1, n] (default: reordering_num_neighbors); at least
                final_num_neighbors are always kept.
            leaves_to_search: leaves scanned, in [1, num_leaves] (default: the tree's
                num_leaves_to_search).
            allowed: only these may be returned: ids (docids for an index built with
                docids, row numbers otherwise; any iterable or 1-D array), or a
                :class:`mipscan.Filter` built once and reused. None: all.
            excluded: ids that must not be returned (as allowed, not a Filter). With
                both, the eligible ids are allowed minus excluded.
            filter_strategy: with a filter, "auto" (default) picks per query, by a cost
                model, between searching the index with the filter (filtered-out rows
                never take a candidate slot; more leaves are searched the fewer rows are
                eligible) and scoring the eligible rows exactly; "index" or "exact"
                forces one ("exact" needs float rows: reorder or a live index, else the
                index is searched). See mipscan._filters.

        Returns:
            SearchResult(indices (k,), distances (k,) float32), best first, with k =
            min(final_num_neighbors, size()): an index shrunk (or built) below k returns
            the results there are, as ScaNN does. indices are uint32 rows, or, for an
            index built with docids, the docids (int64, or str for string docids).
            Filtered: the best min(k, eligible) eligible ids (an empty allowed set gives
            empty arrays); rows are then int64.

        Raises:
            TypeError: non-float q, non-int counts, ids of the wrong type.
            ValueError: wrong shape, NaN/inf, dimension mismatch, counts out of range,
            an id in allowed/excluded that is not in the index (the first is named).
        """
        if (allowed is None and excluded is None and type(filter_strategy) is str
                and filter_strategy == "auto"):
            st = self._state
            one = st.one if st.one is not None else st.one_query()
            if one is not False:  # one C++ call; None: anything unusual, checked below
                metric = self.distance_measure
                x = q if metric == "dot_product" else self._one_call_query(q)
                r = None if x is None else one(
                    x, self.num_neighbors if final_num_neighbors is None else final_num_neighbors,
                    pre_reorder_num_neighbors, leaves_to_search)
                if r is not None:
                    dist = r[1] if metric != "squared_l2" else self._from_mips(q[None, :],
                                                                                 r[1][None, :])[0]
                    return SearchResult(r[0] if st.docids is None else self._ids_out(st, r[0]),
                                        dist)
        call = "search()"
        q = as_float_array(call, "q", q, 1, d=self.d)
        r = self._run(call, q[None, :], final_num_neighbors, pre_reorder_num_neighbors,
                      leaves_to_search, threads=1, allowed=allowed, excluded=excluded,
                      strategy=filter_strategy, single=True)
        return SearchResult(r.indices[0], r.distances[0])

    def _one_call_query(self, q):
        """A cosine or squared_l2 query mapped into the inner-product space exactly as
        _run's path maps it (_to_mips of a C-contiguous float32 (1, d) row), or None where
        that path must check or convert it first."""
        if (type(q) is np.ndarray and q.dtype == np.float32 and q.ndim == 1
                and q.flags.c_contiguous and q.shape[0] == self.d
                and _mipscan.max_abs(q) <= self._max_abs):  # False for NaN
            return self._to_mips(q[None, :])[0]
        return None

    def search_batched(self, queries, final_num_neighbors=None, pre_reorder_num_neighbors=None,
                       leaves_to_search=None, allowed=None, excluded=None,
                       filter_strategy="auto") -> SearchResult:
        """Neighbours of each row of ``queries`` (nq, d), on the calling thread only.
        Arguments as :meth:`search`; returns (nq, k) arrays.

        ``allowed`` / ``excluded`` are one set shared by all queries (a list or 1-D
        array of ids, or for allowed a :class:`mipscan.Filter`), or one list of ids per
        query (a list of nq lists/arrays, or a 2-D array), or for allowed one
        :class:`mipscan.Filter` per query (a list, tuple or object array of nq Filters of
        this searcher, built once: no ids are resolved per call; not mixed with id lists;
        ``excluded`` may then be shared ids or per-query lists). Filtered results have
        k = min(final_num_neighbors, size(), the largest eligible count of the batch)
        columns; a query with fewer eligible ids than that is padded at the end with id
        -1 (rows and int docids; "" for str docids) and distance -inf (+inf for
        squared_l2). Rows are then int64."""
        call = "search_batched()"
        empty = self._empty_batch(call, queries, final_num_neighbors)
        if empty is not None:
            return empty
        queries = as_float_array(call, "queries", queries, 2, d=self.d)
        return self._run(call, queries, final_num_neighbors, pre_reorder_num_neighbors,
                         leaves_to_search, threads=1, allowed=allowed, excluded=excluded,
                         strategy=filter_strategy)

    def search_batched_parallel(self, queries, final_num_neighbors=None,
                                pre_reorder_num_neighbors=None, leaves_to_search=None,
                                batch_size: int = 256, allowed=None, excluded=None,
                                filter_strategy="auto") -> SearchResult:
        """As :meth:`search_batched`, on ``num_threads`` threads (C++, GIL released; see
        :meth:`set_num_threads`). ``batch_size`` (an int >= 1) is how many queries get their centroid
        scores from one BLAS product; results do not depend on it."""
        call = "search_batched_parallel()"
        empty = self._empty_batch(call, queries, final_num_neighbors)
        if empty is not None:
            return empty
        queries = as_float_array(call, "queries", queries, 2, d=self.d)
        batch_size = check_int(call, "batch_size", batch_size, 1, None)
        return self._run(call, queries, final_num_neighbors, pre_reorder_num_neighbors,
                         leaves_to_search, threads=self.num_threads, batch_size=batch_size,
                         allowed=allowed, excluded=excluded, strategy=filter_strategy)

    def make_filter(self, allowed=None, excluded=None) -> "_filters.Filter":
        """A reusable :class:`mipscan.Filter` over this searcher (see there)."""
        return _filters.Filter(self, allowed=allowed, excluded=excluded)

    def _k(self, call, final_k, n) -> int:
        k = self.num_neighbors if final_k is None else check_int(
            call, "final_num_neighbors", final_k, 1, None)
        return min(k, n)

    def _empty_batch(self, call, queries, final_k) -> SearchResult | None:
        """An empty batch (0, d) gets empty results (0, k), as faiss and hnswlib give."""
        shape = getattr(queries, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != 0 \
                or getattr(getattr(queries, "dtype", None), "kind", None) != "f":
            return None  # as_float_array checks (and refuses) everything else
        if shape[1] != self.d:
            raise ValueError(f"{call}: queries has {shape[1]} features, but the index "
                             f"expects {self.d} features")
        st = self._state
        k = self._k(call, final_k, st.n_live)
        return SearchResult(self._ids_out(st, np.zeros((0, k), np.uint32)),
                            np.zeros((0, k), np.float32))

    @staticmethod
    def _ids_out(st, ids: np.ndarray) -> np.ndarray:
        if st.docids is None:
            return ids
        out = st.docids[ids]
        return out.astype(str) if st.docid_kind == "str" else out

    def _run(self, call, queries, final_k, pre_k, leaves, threads, batch_size=256,
             allowed=None, excluded=None, strategy="auto", single=False) -> SearchResult:
        st = self._state  # one snapshot for the whole search (mipscan._live)
        n = st.n_live
        final_k = self._k(call, final_k, n)
        default_pre = st.reorder_k or final_k
        pre_k = default_pre if pre_k is None else check_int(
            call, "pre_reorder_num_neighbors", pre_k, 1, None)
        pre_k = max(1, min(pre_k, n))
        leaves = st.leaves_to_search if leaves is None else min(st.num_leaves, check_int(
            call, "leaves_to_search", leaves, 1, st.configured_leaves, high_name="num_leaves"))
        nq = len(queries)
        if strategy not in _filters.STRATEGIES:
            raise ValueError(f"{call}: filter_strategy must be one of {list(_filters.STRATEGIES)}; "
                             f"got {strategy!r}")
        if final_k == 0:  # an empty index: (nq, 0), after the checks of the ids
            if allowed is not None or excluded is not None:
                _filters.resolve(call, st, nq, allowed, excluded, single, searcher=self)
            return SearchResult(self._ids_out(st, np.zeros((nq, 0), np.uint32)),
                                np.zeros((nq, 0), np.float32))
        if allowed is not None or excluded is not None:
            return self._run_filtered(call, st, queries, final_k, pre_k, leaves, threads,
                                      allowed, excluded, strategy, single)
        q = self._to_mips(queries)
        # Positional arguments: a single query's call is a few microseconds, and keyword
        # parsing was a measurable share of it.
        if st.live is not None:
            ids, scores = st.live.search_batch(q, None, leaves, pre_k, final_k, threads,
                                               st.overretrieve)
        elif st.num_leaves < _BLAS_LEAF_SCORES_MIN_LEAVES or st.core_leaf_scores:
            ids, scores = st.index.search_batch(q, None, leaves, pre_k, final_k, threads, None,
                                                st.overretrieve, st.upper_to_search)
        else:
            ids = np.empty((nq, final_k), np.uint32)
            scores = np.empty((nq, final_k), np.float32)
            c = st.arrays["centroids"]
            for b in range(0, nq, batch_size):
                qb = q[b:b + batch_size]
                leaf_scores = np.ascontiguousarray(qb @ c.T, dtype=np.float32)
                ids[b:b + len(qb)], scores[b:b + len(qb)] = st.index.search_batch(
                    qb, leaf_scores, leaves, pre_k, final_k, threads, overretrieve=st.overretrieve)
        return SearchResult(self._ids_out(st, ids), self._from_mips(queries, scores))

    def _run_filtered(self, call, st, queries, final_k, pre_k, leaves, threads, allowed,
                      excluded, strategy, single) -> SearchResult:
        nq = len(queries)
        r = _filters.resolve(call, st, nq, allowed, excluded, single, searcher=self)
        engine = st.live if st.live is not None else st.index
        # Float32 rows for the batched exact plan (a quantized copy is scored in the core).
        store = st.row_data if st.live is not None else st.arrays.get("reorder_rows")
        if store is not None and store.dtype != np.float32:
            store = None
        codes = _filters.plan(self, st, r, leaves, pre_k, final_k, strategy,
                              engine.has_exact_rows, store is not None)
        q = self._to_mips(queries)
        # batched: the exact plan by BLAS products or per-query bitsets (mipscan._filters)
        batched = np.zeros(nq, bool) if codes is None else codes >= _filters.EXACT_GEMM
        if batched.all() and not r.lists:
            ids, scores, counts = _filters.exact_batched(st, r, q, store, final_k)
        elif batched.any():  # lists only (a shared filter has one plan for the batch)
            sel = np.arange(nq) if batched.all() else np.flatnonzero(batched)
            sparse = codes[sel] == _filters.EXACT_BITS
            if batched.all():
                ids, scores, counts = _filters.exact_lists(st, r, sel, q, store, final_k, sparse,
                                                           threads)
            else:
                ids = np.empty((nq, final_k), np.uint32)
                scores = np.empty((nq, final_k), np.float32)
                counts = np.empty(nq, np.uint32)
                ids[sel], scores[sel], counts[sel] = _filters.exact_lists(
                    st, r, sel, q, store, final_k, sparse, threads)
        if not batched.all():
            rest = np.flatnonzero(~batched)
            part = _filters.lists(r if len(rest) == nq else _filters.subset(r, rest))
            exact = None if codes is None else (codes[rest] == _filters.EXACT).astype(np.uint8)
            walk_rows = exact is not None and exact.any() and not (r.lists and not r.list_excludes)
            out = engine.search_batch_filtered(
                q if len(rest) == nq else q[rest], None, leaves, pre_k, final_k, threads,
                part.allow, part.list_offsets, part.list_rows, part.list_excludes, None, exact,
                _filters.LEAF_EXPONENT, _filters.shared_rows(st, r) if walk_rows else None,
                **_knobs(st))
            if len(rest) == nq:
                ids, scores, counts = out
            else:
                ids[rest], scores[rest], counts[rest] = out
        cols = int(counts.max()) if nq else final_k  # one query: its count (no padding)
        ids, scores = ids[:, :cols], scores[:, :cols]
        pad = ids == np.uint32(0xFFFFFFFF)
        if st.docids is None:
            out = ids.astype(np.int64)
            out[pad] = -1
        else:
            out = st.docids[np.where(pad, 0, ids)]
            if st.docid_kind == "str":
                out = out.astype(str)
                out[pad] = ""
            else:
                out = out.astype(np.int64)
                out[pad] = -1
        return SearchResult(out, self._from_mips(queries, scores))

    def _to_mips(self, q: np.ndarray) -> np.ndarray:
        if self.distance_measure == "cosine":
            return normalize_rows(q)
        if self.distance_measure == "squared_l2":  # [q, 1] per row
            x = np.empty((len(q), q.shape[1] + 1), np.float32)
            x[:, :-1] = q
            x[:, -1] = 1.0
            return x
        return q

    def _from_mips(self, q: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.distance_measure == "squared_l2":
            # MIPS score = q.x - |x|^2/2, so |q - x|^2 = |q|^2 - 2 * score
            qn = np.einsum("ij,ij->i", q, q)[:, None]
            return np.maximum(qn - 2.0 * scores, 0).astype(np.float32)
        return scores

    # ---------------------------------------------------------------- persistence
    def serialize(self, directory) -> None:
        """Writes the index to ``directory`` (a folder of .npy files plus mipscan.json),
        atomically: readers see the old index or the complete new one, never a mix.

        ``directory`` may be absent, an empty folder, or a mipscan index holding only its
        listed files; anything else is refused with ValueError and left untouched. A
        symlink is followed: the folder it names is replaced and the link stays.
        """
        config, arrays, docids = _compact(self._state, "serialize()")
        write_index(directory, dict(config), arrays, docids=docids)

    # ---------------------------------------------------------------- live index
    @property
    def docids(self):
        """The live docids (a list, in internal row order), or None for an index built
        without docids."""
        st = self._state
        if st.docids is None:
            return None
        if st.live is None:
            return st.docids[:st.n_live].tolist()
        return st.docids[_live.live_rows(st)].tolist()

    def upsert(self, docids, vectors, batch_size: int = 1) -> None:
        """Inserts or replaces datapoints, as ScaNN's ``upsert``: ``docids`` (one or a
        list) with ``vectors`` ((m, d), or (d,) for one). An existing docid is replaced.

        Atomic: searches see the index before or after the whole call, never a mix, and a
        bad call changes nothing. New points go to their nearest leaf (and SOAR second
        leaf), AH-encoded against the current centroids and codebooks, appended to those
        leaves only. With ``tree(incremental_threshold=t)``, a leaf whose entries changed
        by more than t times its size since it was trained gets its centroid moved to the
        mean of its points and its codes re-encoded (and its tombstones dropped). With
        ``autopilot(mode=ONLINE_INCREMENTAL)``, crossing mipscan's brute-force size
        (``mipscan._policy.BRUTE_FORCE_BELOW``) rebuilds the index as autopilot would.
        ``batch_size`` (an int >= 1, ScaNN's argument) does not change the result.

        Raises:
            ValueError: an index built without docids; a docid repeated in the batch;
                docids and vectors of different lengths; NaN/inf or a wrong dimension.
            TypeError: a docid of another type than the index's (int or str).
        """
        call = "upsert()"
        check_int(call, "batch_size", batch_size, 1, None)
        if vectors is None:
            raise TypeError(f"{call}: vectors must be a float array (one row per docid); got None")
        self._update(call, docids, vectors, [])

    def delete(self, docids) -> None:
        """Deletes datapoints by docid (one or a list), as ScaNN's ``delete``. Their
        slots are tombstoned (skipped by searches); a leaf whose tombstones reach 5%
        of its entries is compacted by the same call (``mipscan._live.COMPACT_SHARE``),
        and :meth:`rebalance` reclaims everything, rows included.

        Raises:
            KeyError: a docid not in the index (named; nothing is deleted).
            ValueError: a docid repeated in the batch; an index built without docids.
        """
        self._update("delete()", [], None, docids)

    def update(self, docids, vectors, delete=()) -> None:
        """:meth:`upsert` of ``docids`` / ``vectors`` and :meth:`delete` of ``delete``
        in one atomic call (searches see neither half alone). A docid may not be in both.
        Raises as those two."""
        self._update("update()", docids, vectors, delete)

    @property
    def has_docids(self) -> bool:
        """True when searches return docids (the index was built or loaded with them)."""
        return self._state.docids is not None

    def _update(self, call, up, vectors, dels) -> None:
        with self._write_lock:
            st = self._state
            why = static_only(st.config)
            if why is not None:
                raise ValueError(f"{call}: {why}")
            up_ids = self._docid_list(call, st, up) if vectors is not None else []
            del_ids = self._docid_list(call, st, dels)
            if self._rows_of is None:
                self._reindex(st)
            rows_of = self._rows_of
            for docid in del_ids:
                if docid not in rows_of:
                    raise KeyError(f"{call}: docid {docid!r} is not in the index; nothing was deleted")
            both = set(up_ids) & set(del_ids)
            if both:
                raise ValueError(f"{call}: docid {next(iter(both))!r} is both upserted and deleted")
            width = mips_width(self.d, self.distance_measure)
            mips = np.zeros((0, width), np.float32)
            if vectors is not None:
                vectors = np.asarray(vectors) if not isinstance(vectors, np.ndarray) else vectors
                if vectors.ndim == 1:
                    vectors = vectors[None, :]
                if len(up_ids) or vectors.size:
                    vectors = as_float_array(call, "vectors", vectors, 2, d=self.d)
                    if len(vectors) != len(up_ids):
                        raise ValueError(f"{call}: got {len(up_ids)} docids but {len(vectors)} vectors")
                    if self.distance_measure == "cosine":
                        norms = np.einsum("ij,ij->i", vectors, vectors)
                        if not np.all(norms > 0):
                            raise ValueError(f"{call}: vector of docid {up_ids[int(np.argmin(norms > 0))]!r} "
                                             "is zero; cosine needs a direction")
                    mips = np.ascontiguousarray(to_mips_rows(vectors, self.distance_measure), np.float32)
            if not up_ids and not del_ids:
                return
            if st.live is None:
                st = _live.to_live(st, self.num_threads)
            if st.docid_kind is None and up_ids:  # started empty: the first docids set the kind
                kind = "str" if isinstance(up_ids[0], str) else "int"
                st = replace(st, docid_kind=kind, docids=np.zeros(0, np.int64 if kind == "int" else object))
            replaced = np.array([rows_of[i] for i in up_ids if i in rows_of], np.int64)
            deleted = np.array([rows_of[i] for i in del_ids], np.int64)
            base = st.num_rows
            nxt = _live.apply(st, mips, up_ids, replaced, deleted, self.num_threads,
                              self._incremental())
            nxt, renumbered = self._autopilot_phase(nxt)
            self._state = nxt  # publish
            if renumbered:
                self._reindex(nxt)
            else:
                for docid in del_ids:
                    del rows_of[docid]
                for i, docid in enumerate(up_ids):
                    rows_of[docid] = base + i

    def rebalance(self, config=None) -> str:
        """Compacts and retrains, as ScaNN's ``rebalance``: a fresh build (same
        configuration, same seed; autopilot re-chooses for the current size) on the live
        points, which drops every tombstone and returns their memory. Searches go on
        against the old snapshot meanwhile and never wait. Returns :meth:`config` text.
        (An AH-only index without reorder keeps no float rows: it is retrained on the
        decoded points, centroid + codewords.)"""
        if config not in (None, ""):
            raise ValueError("rebalance(): config must be None (mipscan rebuilds with the "
                             f"searcher's own configuration); got {config!r}")
        with self._write_lock:
            st = self._state
            if st.live is not None and st.n_live > 0:
                nxt = self._rebuild(st)
                self._state = nxt
                self._reindex(nxt)
            return self._state.config()

    # ---------------------------------------------------------------- live helpers
    def _incremental(self):
        tree = self._state.config.get("tree")
        return None if tree is None else tree.get("incremental_threshold")

    def _docid_list(self, call, st, docids) -> list:
        if st.docids is None:
            raise ValueError(f"{call}: this searcher was built without docids; build it with "
                             "build(docids=...) to update it")
        if isinstance(docids, (str, int, np.integer)) and not isinstance(docids, bool):
            docids = [docids]
        kind, ids = _docid_values(call, docids)
        if ids and st.docid_kind is not None and kind != st.docid_kind:
            raise TypeError(f"{call}: docids must be {st.docid_kind} like the index's; got "
                            f"{type(ids[0]).__name__} {ids[0]!r}")
        seen = set()
        for docid in ids:
            if docid in seen:
                raise ValueError(f"{call}: docid {docid!r} is repeated in the batch")
            seen.add(docid)
        return ids

    def _reindex(self, st) -> None:
        rows = np.arange(st.n_live) if st.live is None else _live.live_rows(st)
        self._rows_of = {v: int(r) for v, r in zip(st.docids[rows].tolist(), rows)}

    def _rebuild(self, st):
        """A static state built afresh on st's live points (same config and seed)."""
        rows = _live.live_rows(st)
        space = _live.space_of(st.row_data[rows], self.distance_measure, self.d)
        config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in st.config.items()}
        n = len(rows)
        config["n"] = n
        auto = config.get("autopilot")
        if auto is not None and auto.get("mode") == "ONLINE_INCREMENTAL":
            for stage in ("tree", "score_ah", "score_brute_force", "reorder"):
                config.pop(stage, None)
            for stage, kwargs in suggest_config(n, self.d, min(self.num_neighbors, n),
                                                self.distance_measure).items():
                config[stage] = check_stage_args(f"{stage}()", stage, (), kwargs)
        arrays = build_arrays(np.ascontiguousarray(space, np.float32), config, self.num_threads)
        config["build_seconds"] = st.config.get("build_seconds", 0.0)
        fresh = Searcher(config, arrays, self.num_threads)
        store = st.docids[rows].copy()
        return replace(fresh._state, docids=store, docid_kind=st.docid_kind)

    def _autopilot_phase(self, st):
        """(state, renumbered): an autopilot(ONLINE_INCREMENTAL) index that crossed the
        brute-force size is rebuilt as autopilot would build it now."""
        auto = st.config.get("autopilot")
        if auto is None or auto.get("mode") != "ONLINE_INCREMENTAL" or st.n_live == 0:
            return st, False
        want_tree = st.n_live >= BRUTE_FORCE_BELOW
        if want_tree == ("tree" in st.config):
            return st, False
        return self._rebuild(st), True


def load_searcher(directory, mmap: bool = True, verify: bool = True) -> Searcher:
    """Loads an index written by :meth:`Searcher.serialize`.

    Args:
        directory: the index folder.
        mmap: memory-map the arrays (no copy, fast start, pages shared between processes
            and read as searches touch them). Safe with :meth:`Searcher.serialize`: it
            never writes into an existing file (it swaps whole folders and unlinks the old
            files, whose mapped pages stay valid), so a live searcher keeps answering. A
            file truncated or rewritten in place by another program while mapped makes
            the kernel send SIGBUS on the next access; for folders others may edit in
            place, pass ``mmap=False`` (reads each file once into memory).
        verify: check every file's sha256 against mipscan.json (reads each file once).
            Values are checked either way (one pass per array).

    Returns:
        A :class:`Searcher`.

    Raises:
        ValueError: a missing, damaged, truncated, foreign or tampered folder; the
            message names the path and the offending field.
    """
    config, arrays = read_index(directory, mmap=mmap, verify=verify)
    docids = docids_from_arrays(arrays)
    config.pop("docids", None)
    try:
        return Searcher(config, arrays, docids=docids)
    except ValueError as exc:  # the structural checks of the C++ index view
        raise ValueError(f"load_searcher(): {str(directory)!r}: inconsistent arrays: {exc}"
                         ) from None


def _docid_values(call: str, docids) -> tuple[str | None, list]:
    """(kind, list) of ScaNN docids: all ints ("int") or all strings ("str")."""
    if isinstance(docids, np.ndarray):
        docids = docids.tolist()
    try:
        ids = list(docids)
    except TypeError:
        raise TypeError(f"{call}: docids must be a list of ints or strings; got "
                        f"{type(docids).__name__}") from None
    kind = None
    for v in ids:
        k = ("str" if isinstance(v, str) else
             "int" if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) else None)
        if k is None:
            raise TypeError(f"{call}: docids must be ints or strings; got {type(v).__name__} {v!r}")
        if kind is not None and k != kind:
            raise TypeError(f"{call}: docids must be all ints or all strings; got {ids[0]!r} and {v!r}")
        kind = k
    if kind == "int":
        ids = [int(v) for v in ids]
    return kind, ids


def _docid_store(call: str, docids, n: int) -> tuple[str, np.ndarray]:
    kind, ids = _docid_values(call, docids)
    if len(ids) != n:
        raise ValueError(f"{call}: docids must have one entry per row of db ({n}); got {len(ids)}")
    if len(set(ids)) != len(ids):
        seen = set()
        dup = next(v for v in ids if v in seen or seen.add(v))
        raise ValueError(f"{call}: docids must be unique; {dup!r} is repeated")
    if kind == "int" or n == 0:  # an empty index's kind is set by its first upsert
        return kind, np.array(ids, np.int64)
    store = np.empty(n, object)
    store[:] = ids
    return kind, store


def _compact(st, call: str) -> tuple[dict, dict, list | None]:
    """(config, flat arrays, docids) of a state: a static state as it is; a live one
    compacted (tombstones dropped, rows renumbered densely in row order, codes kept).
    An empty index has no flat layout (ValueError naming ``call``)."""
    if st.n_live == 0:
        raise ValueError(f"{call}: the index holds no live datapoints (built empty, or all "
                         "deleted); an empty index cannot be stored: upsert at least one "
                         "datapoint first")
    if st.live is None:
        docids = None if st.docids is None else st.docids[:st.n_live].tolist()
        return st.config, st.arrays, docids
    keep = _live.live_rows(st)
    new_of = np.full(st.num_rows, -1, np.int64)
    new_of[keep] = np.arange(len(keep))
    dead = _live.dead_mask(st)
    L = len(st.centroids)
    nb = 0 if st.codebooks is None else st.codebooks.shape[0]
    slot_ids, counts, packed = [], [], []
    for leaf in range(L):
        rows, codes = st.live.leaf(leaf)
        alive = ~dead[rows]
        rows = rows[alive]
        slot_ids.append(new_of[rows])
        counts.append(len(rows))
        if nb:
            unpacked = _mipscan.unpack_codes(codes, len(alive), nb)[alive]
            packed.append(_mipscan.pack_codes(np.ascontiguousarray(unpacked)))
    counts = np.array(counts, np.int64)
    slot_ids = np.concatenate(slot_ids).astype(np.uint32)
    arrays = {"centroids": np.ascontiguousarray(st.centroids),
              "leaf_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
              "slot_ids": slot_ids}
    rows = st.row_data[keep]
    if nb:
        arrays["codebooks"] = st.codebooks
        arrays["packed_codes"] = np.concatenate(packed) if packed else np.zeros(0, np.uint8)
        groups = (counts + 63) // 64
        arrays["leaf_groups"] = np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)
    else:
        arrays["slot_rows"] = np.ascontiguousarray(rows[slot_ids])
    if "reorder" in st.config:
        arrays["reorder_rows"] = np.ascontiguousarray(rows)
    if spread_weight_of(st.config):
        # The live index's own spreads (the copy then orders leaves as it did), or, for
        # an index that started empty, those of its rows (MIPS-space rows, as built).
        arrays["leaf_spread"] = (np.array(st.leaf_spread, np.float32) if st.leaf_spread is not None
                                 else leaf_spread(rows, arrays["centroids"], slot_ids, counts))
    if leaf_axes_of(st.config) > 0:  # the same, for the axes (and their spreads)
        if st.leaf_axes is not None:
            arrays["leaf_axes"] = np.array(st.leaf_axes, np.float32)
        else:
            arrays["leaf_axes"], arrays["leaf_spread"] = leaf_axes(
                rows, arrays["centroids"], slot_ids, counts, leaf_axes_of(st.config))
    config = _live.SearcherConfig(st.config)
    config["n"] = len(keep)
    return config, arrays, st.docids[keep].tolist()


def _search_shape(config: dict, arrays: dict) -> dict:
    """The per-snapshot search defaults (State fields) of an index of this config."""
    tree, reorder, upper = config.get("tree"), config.get("reorder"), config.get("upper_tree")
    num_leaves = len(arrays["centroids"])
    factor = tree.get("overretrieve_factor") if tree else None
    return {"num_leaves": num_leaves,
            "leaves_to_search": min(tree["num_leaves_to_search"], num_leaves) if tree else 1,
            # leaves_to_search may go up to the configured num_leaves, as ScaNN accepts,
            # even when small partitions were merged at build time (min_partition_size);
            # searches clamp it to the leaves built.
            "configured_leaves": max(num_leaves, tree["num_leaves"] if tree else 1),
            "reorder_k": reorder["reordering_num_neighbors"] if reorder else None,
            # SOAR: slots kept per distinct row reordered (ScaNN's overretrieve_factor).
            "overretrieve": 2.0 if factor is None else float(min(factor, 1e6)),
            "upper_to_search": (min(upper["num_leaves_to_search"], len(arrays["upper_offsets"]) - 1)
                                if upper else 1),
            # Quantized centroids and upper trees score the leaves in C++ (never by BLAS).
            "core_leaf_scores": bool(upper) or "centroids_int8" in arrays
                                or "centroids_bf16" in arrays}


def _knobs(st) -> dict:
    """The index's own search knobs for the core's search calls."""
    if st.live is not None:
        return {"overretrieve": st.overretrieve}
    return {"overretrieve": st.overretrieve, "upper_to_search": st.upper_to_search}
