"""The Searcher: holds the index arrays and answers queries through one C++ call; and
``load_searcher``, which makes one from an index folder."""

from __future__ import annotations

import numpy as np

from mipscan import _mipscan
from mipscan._io import check_state, read_index, write_index
from mipscan._schema import ARRAYS
from mipscan._threads import get_num_threads
from mipscan._validation import MAX_THREADS, as_float_array, check_int
from mipscan.brute import SearchResult, normalize_rows

__all__ = ["Searcher", "load_searcher"]

# Above this many leaves, batched searches score centroids with one BLAS product per
# batch instead of per query in C++. Kept high: a multi-threaded BLAS call between
# searches costs more than it saves at moderate sizes (its threads spin, and the calling
# thread waits for them: GloVe-50, 300 leaves: 63 us per query with BLAS, 44 without).
_BLAS_LEAF_SCORES_MIN_LEAVES = 4096

# The arrays the core's Index takes after the three every index has, in its order.
_OPTIONAL = tuple(name for name, (_, _, stage) in ARRAYS.items() if stage is not None)


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


class Searcher:
    """A built (or loaded) index. Create one with :func:`mipscan.builder` or
    :func:`mipscan.load_searcher`; search with :meth:`search`, :meth:`search_batched` or
    :meth:`search_batched_parallel`. Thread-safe: searches may run concurrently.

    Every search returns exactly ``final_num_neighbors`` results per query: when the
    searched leaves hold fewer candidates than needed, further leaves are searched in
    order of their centroid score until there are enough (so k <= n always gives k).

    A searcher owns its arrays and its thread count (``num_threads``, default
    :func:`mipscan.get_num_threads`; change it with :meth:`set_num_threads`). It pickles
    as its configuration and arrays (no C++ state), so it can be sent to worker
    processes; the copy answers identically.
    """

    def __init__(self, config: dict, arrays: dict[str, np.ndarray], num_threads: int | None = None):
        self.config = config
        # Read-only views: the core checked the integer arrays' structure once, when the
        # Index was made, and trusts it from then on (offsets and ids index memory).
        self._arrays = {name: _read_only(a) for name, a in arrays.items()}
        arrays = self._arrays
        self.num_threads = get_num_threads() if num_threads is None else check_int(
            "Searcher()", "num_threads", num_threads, 1, MAX_THREADS)
        self.n = int(config["n"])
        self.d = int(config["d"])
        self.distance_measure = config["distance_measure"]
        self.num_neighbors = int(config["num_neighbors"])
        tree = config.get("tree")
        self.num_leaves = len(arrays["centroids"])
        self.num_leaves_to_search = min(tree["num_leaves_to_search"], self.num_leaves) if tree else 1
        # leaves_to_search may go up to the configured num_leaves, as ScaNN accepts, even
        # when small partitions were merged at build time (min_partition_size); searches
        # clamp it to the leaves built.
        self._configured_leaves = max(self.num_leaves, tree["num_leaves"] if tree else 1)
        # SOAR: slots kept per distinct row reordered (ScaNN's overretrieve_factor).
        factor = tree.get("overretrieve_factor") if tree else None
        self._overretrieve = 2.0 if factor is None else float(min(factor, 1e6))
        # Quantized centroids score the leaves in C++ (never through float32 BLAS).
        self._quantized_centroids = "centroids_int8" in arrays or "centroids_bf16" in arrays
        # upper_tree(): upper nodes whose children are scored (leaf scores come from C++).
        upper = config.get("upper_tree")
        self._upper_to_search = (min(upper["num_leaves_to_search"], len(arrays["upper_offsets"]) - 1)
                                 if upper else 1)
        reorder = config.get("reorder")
        self.reordering_num_neighbors = reorder["reordering_num_neighbors"] if reorder else None
        self._index = _mipscan.Index(arrays["centroids"], arrays["leaf_offsets"], arrays["slot_ids"],
                                     *(arrays.get(k) for k in _OPTIONAL), n=self.n)

    # ---------------------------------------------------------------- properties
    @property
    def index_bytes(self) -> int:
        """Bytes of all index arrays (what serialize() writes, less the JSON)."""
        return int(sum(a.nbytes for a in self._arrays.values()))

    def __repr__(self) -> str:
        stages = [s for s in ("tree", "score_ah", "score_brute_force", "reorder") if s in self.config]
        return (f"Searcher(n={self.n}, d={self.d}, distance_measure={self.distance_measure!r}, "
                f"num_leaves={self.num_leaves}, stages={stages}, index_bytes={self.index_bytes})")

    def size(self) -> int:
        """Number of datapoints (as ScaNN's ``size()``)."""
        return self.n

    def set_num_threads(self, num_threads: int) -> None:
        """Threads of this searcher's :meth:`search_batched_parallel` (as ScaNN's
        ``set_num_threads``), an int in [1, 1024]. Other searchers are not affected."""
        self.num_threads = check_int("set_num_threads()", "num_threads", num_threads, 1,
                                     MAX_THREADS)

    def __getstate__(self) -> dict:
        # Plain arrays (a memory-mapped file's pages are read into the pickle).
        return {"config": self.config, "num_threads": self.num_threads,
                "arrays": {k: np.asarray(v) for k, v in self._arrays.items()}}

    def __setstate__(self, state: dict) -> None:
        # The loader's checks: a pickle from elsewhere gets no more trust than a folder.
        if not isinstance(state, dict) or set(state) != {"config", "num_threads", "arrays"}:
            raise ValueError("Searcher.__setstate__(): state must be a dict with config, "
                             "num_threads and arrays")
        config, arrays = check_state(state["config"], state["arrays"], "Searcher.__setstate__()")
        self.__init__(config, arrays, state["num_threads"])

    # ---------------------------------------------------------------- searching
    def search(self, q, final_num_neighbors=None, pre_reorder_num_neighbors=None,
               leaves_to_search=None) -> SearchResult:
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

        Returns:
            SearchResult(indices (k,) uint32, distances (k,) float32), best first.

        Raises:
            TypeError: non-float q, non-int counts. ValueError: wrong shape, NaN/inf,
            dimension mismatch, counts out of range.
        """
        call = "search()"
        q = as_float_array(call, "q", q, 1, d=self.d)
        r = self._run(call, q[None, :], final_num_neighbors, pre_reorder_num_neighbors,
                      leaves_to_search, threads=1)
        return SearchResult(r.indices[0], r.distances[0])

    def search_batched(self, queries, final_num_neighbors=None, pre_reorder_num_neighbors=None,
                       leaves_to_search=None) -> SearchResult:
        """Neighbours of each row of ``queries`` (nq, d), on the calling thread only.
        Arguments as :meth:`search`; returns (nq, k) arrays."""
        call = "search_batched()"
        queries = as_float_array(call, "queries", queries, 2, d=self.d)
        return self._run(call, queries, final_num_neighbors, pre_reorder_num_neighbors,
                         leaves_to_search, threads=1)

    def search_batched_parallel(self, queries, final_num_neighbors=None,
                                pre_reorder_num_neighbors=None, leaves_to_search=None,
                                batch_size: int = 256) -> SearchResult:
        """As :meth:`search_batched`, on ``num_threads`` threads (C++, GIL released; see
        :meth:`set_num_threads`). ``batch_size`` (an int >= 1) is how many queries get their centroid
        scores from one BLAS product; results do not depend on it."""
        call = "search_batched_parallel()"
        queries = as_float_array(call, "queries", queries, 2, d=self.d)
        batch_size = check_int(call, "batch_size", batch_size, 1, None)
        return self._run(call, queries, final_num_neighbors, pre_reorder_num_neighbors,
                         leaves_to_search, threads=self.num_threads, batch_size=batch_size)

    def _run(self, call, queries, final_k, pre_k, leaves, threads, batch_size=256) -> SearchResult:
        n = self.n
        final_k = self.num_neighbors if final_k is None else check_int(
            call, "final_num_neighbors", final_k, 1, n, high_name="n")
        default_pre = self.reordering_num_neighbors or final_k
        pre_k = default_pre if pre_k is None else check_int(
            call, "pre_reorder_num_neighbors", pre_k, 1, n, high_name="n")
        configured = self._configured_leaves
        leaves = self.num_leaves_to_search if leaves is None else min(self.num_leaves, check_int(
            call, "leaves_to_search", leaves, 1, configured, high_name="num_leaves"))
        q = self._to_mips(queries)
        nq = len(q)
        if (self.num_leaves < _BLAS_LEAF_SCORES_MIN_LEAVES or self._quantized_centroids
                or "upper_tree" in self.config):
            ids, scores = self._index.search_batch(q, None, leaves, pre_k, final_k, threads,
                                                   overretrieve=self._overretrieve,
                                                   upper_to_search=self._upper_to_search)
        else:
            ids = np.empty((nq, final_k), np.uint32)
            scores = np.empty((nq, final_k), np.float32)
            c = self._arrays["centroids"]
            for b in range(0, nq, batch_size):
                qb = q[b:b + batch_size]
                leaf_scores = np.ascontiguousarray(qb @ c.T, dtype=np.float32)
                ids[b:b + len(qb)], scores[b:b + len(qb)] = self._index.search_batch(
                    qb, leaf_scores, leaves, pre_k, final_k, threads,
                    overretrieve=self._overretrieve)
        return SearchResult(ids, self._from_mips(queries, scores))

    def _to_mips(self, q: np.ndarray) -> np.ndarray:
        if self.distance_measure == "cosine":
            return normalize_rows(q)
        if self.distance_measure == "squared_l2":
            return np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1), np.float32)]))
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
        write_index(directory, self.config, self._arrays)


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
    try:
        return Searcher(config, arrays)
    except ValueError as exc:  # the structural checks of the C++ index view
        raise ValueError(f"load_searcher(): {str(directory)!r}: inconsistent arrays: {exc}"
                         ) from None
