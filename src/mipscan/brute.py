"""Exact top-k search: blocked BLAS matrix products plus a C++ partial top-k."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mipscan import _mipscan
from mipscan._validation import MAX_THREADS, as_float_array, check_distance_measure, check_int


class SearchResult(NamedTuple):
    """Neighbours best first: ``indices`` (uint32 rows of the database) and ``distances``
    (float32; the inner product for ``dot_product``, the cosine similarity for ``cosine``,
    the squared Euclidean distance for ``squared_l2``). Unpacks like ScaNN's pybind result
    (``ids, dists = ...``) and has ``.indices`` like its TensorFlow op."""

    indices: np.ndarray
    distances: np.ndarray


# Scores per block: 128 queries x 8192 rows of float32 = 4 MiB, which stays in cache
# between the BLAS product that writes it and the top-k pass that reads it. With fewer
# queries the database block grows to keep that size (small BLAS calls are slow).
_QUERY_BLOCK = 128
_BLOCK_SCORES = 1 << 20


def normalize_rows(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm rows (float32); all-zero rows stay zero. ``out`` (float32, x's shape;
    may be x itself) receives them instead of a new array."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    # Below ~1e-19 the float32 squares underflow (a row of 1e-31 would get norm 0 and
    # stay unnormalised): recompute those rows' norms in float64.
    tiny = norms < 1e-18
    if tiny.any():
        norms = norms.astype(np.float64)
        rows = np.flatnonzero(tiny.reshape(-1))
        flat = x.reshape(-1, x.shape[-1])
        norms.reshape(-1)[rows] = np.linalg.norm(flat[rows].astype(np.float64), axis=-1)
    if out is not None:
        return np.divide(x, np.where(norms > 0, norms, 1), out=out, casting="same_kind")
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32, copy=False)


def brute_force(db, queries, k: int = 10, distance_measure: str = "dot_product",
                *, num_threads: int | None = None) -> SearchResult:
    """Exact top-k neighbours of each query.

    Args:
        db: (n, d) float array, the database.
        queries: (d,) or (nq, d) float array.
        k: neighbours per query, an int in [1, n].
        distance_measure: ``"dot_product"`` (largest first), ``"cosine"`` (largest
            similarity first) or ``"squared_l2"`` (smallest distance first).
        num_threads: threads for the top-k pass (default 1). The matrix products already
            run on BLAS's threads (set them with threadpoolctl or OMP_NUM_THREADS), and
            OpenBLAS's threads spin between calls: a parallel top-k then competes with
            them (943 x 270,882, 2 cores: 1.5 s against 0.85 s). With BLAS pinned to one
            thread, ``num_threads=mipscan.get_num_threads()`` is fastest (0.59 s).

    Returns:
        SearchResult(indices (nq, k) uint32, distances (nq, k) float32), best first; 1-D
        when ``queries`` is 1-D. Ties are broken by the smaller index.

    Raises:
        TypeError: a non-float array or a non-int k.
        ValueError: empty arrays, NaN/inf, mismatched dimensions, k outside [1, n], an
            unknown distance_measure.

    Example:
        >>> import numpy as np, mipscan
        >>> db = np.eye(3, dtype=np.float32)
        >>> mipscan.brute_force(db, db[1], k=1).indices
        array([1], dtype=uint32)
    """
    call = "brute_force()"
    metric = check_distance_measure(call, distance_measure)
    x = as_float_array(call, "db", db, 2)
    n, d = x.shape
    q = as_float_array(call, "queries", queries, (1, 2), d=d, d_owner="db")
    k = check_int(call, "k", k, 1, n, high_name="n")
    threads = 1 if num_threads is None else check_int(
        call, "num_threads", num_threads, 1, MAX_THREADS)
    single = q.ndim == 1
    q2 = q.reshape(1, d) if single else q
    nq = q2.shape[0]

    bias = None
    if metric == "cosine":
        x = normalize_rows(x)
        q2 = normalize_rows(q2)
    elif metric == "squared_l2":
        # argmin |q - x|^2 = argmax 2 q.x - |x|^2
        bias = -np.einsum("ij,ij->i", x, x)
        q2 = np.ascontiguousarray(2.0 * q2, dtype=np.float32)

    heap_s = np.empty((nq, k), np.float32)
    heap_i = np.empty((nq, k), np.uint32)
    sizes = np.zeros(nq, np.int64)
    db_block = max(8192, _BLOCK_SCORES // min(nq, _QUERY_BLOCK))
    for qb in range(0, nq, _QUERY_BLOCK):
        qs = slice(qb, min(nq, qb + _QUERY_BLOCK))
        for db0 in range(0, n, db_block):
            db1 = min(n, db0 + db_block)
            scores = q2[qs] @ x[db0:db1].T
            _mipscan.topk_update_rows(scores, None if bias is None else bias[db0:db1], db0,
                                      heap_s[qs], heap_i[qs], sizes[qs], threads)
    _mipscan.topk_finish_rows(heap_s, heap_i, sizes, threads)

    if metric == "squared_l2":
        qn = np.einsum("ij,ij->i", q2, q2) / 4.0
        heap_s = np.maximum(qn[:, None] - heap_s, 0).astype(np.float32)
    if single:
        return SearchResult(heap_i[0], heap_s[0])
    return SearchResult(heap_i, heap_s)
