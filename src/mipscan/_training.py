"""Training in numpy (BLAS does the heavy lifting): k-means for the partitioning tree
and for the per-block AH codebooks."""

from __future__ import annotations

import numpy as np

from mipscan import _mipscan
from mipscan._threads import get_num_threads

# Largest rows per chunk in SOAR's assignment.
_ASSIGN_CHUNK = 16384


def assign_nearest(x: np.ndarray, centroids: np.ndarray, threads: int = 0) -> np.ndarray:
    """Index (int64) of the nearest centroid of each row of x: the first maximum of
    x . c - |c|^2 / 2, in the core (_core/assign.h), on ``threads`` threads (0 = this
    process's CPUs; 1 = the calling thread). Measured against numpy's BLAS product and
    argmax (100,000 x 32 rows, 2 cores, AVX-512): 5.4 ms against 9 ms per assignment at
    100 centroids, 29 ms against 45-50 ms at 520, and BLAS's threads, which spin for ~0.1 s after each call, no longer take
    a core from the codebook training and encoding that follow (those ran up to 2x slower)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    half_norms = np.ascontiguousarray(0.5 * np.einsum("ij,ij->i", centroids, centroids),
                                      dtype=np.float32)
    return _mipscan.nearest_centroids(x, np.ascontiguousarray(centroids.T), half_norms,
                                      threads or get_num_threads())


def soar_assign(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, lam: float,
                chunk: int = _ASSIGN_CHUNK) -> np.ndarray:
    """Second leaf of each row for SOAR spilling (Sun et al., NeurIPS 2023).

    With r = x - c1 the residual to the row's own leaf, the second leaf is the
    c != c1 minimising |x - c|^2 + lam * <x - c, r / |r|>^2: the penalty steers the
    second residual away from r's direction, so the two leaves err differently and a
    query that misses one tends to find the other. Needs at least two centroids.
    """
    c_norms = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty(len(x), np.int64)
    for b in range(0, len(x), chunk):
        xb, lb = x[b:b + chunk], labels[b:b + chunk]
        r = xb - centroids[lb]
        rn = np.sqrt(np.einsum("ij,ij->i", r, r))
        r_hat = r / np.where(rn > 0, rn, 1)[:, None]
        cost = c_norms[None, :] - 2 * (xb @ centroids.T)  # |x - c|^2 less |x|^2
        along = np.einsum("ij,ij->i", r_hat, xb)[:, None] - r_hat @ centroids.T  # <x - c, r_hat>
        cost += lam * along * along
        cost[np.arange(len(xb)), lb] = np.inf
        out[b:b + chunk] = np.argmin(cost, axis=1)
    return out


def kmeans(x: np.ndarray, k: int, iterations: int, rng: np.random.Generator,
           spherical: bool = False, kmeanspp: bool = False, threads: int = 0) -> np.ndarray:
    """Lloyd's k-means on the rows of x (float32). Returns (k, d) float32 centroids.

    Empty clusters are re-seeded with the rows farthest from their centroid, so every
    centroid ends up owning at least one training row when len(x) >= k.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if kmeanspp:
        centroids = _kmeanspp_init(x, k, rng)
    else:
        centroids = x[rng.choice(n, size=k, replace=False)].copy()
    if spherical:
        centroids = _unit(centroids)
    for _ in range(iterations):
        labels = assign_nearest(x, centroids, threads)
        sums, counts = _mipscan.cluster_sums(x, labels, k)
        new = centroids.copy()
        nz = counts > 0
        new[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
        empty = np.flatnonzero(~nz)
        if len(empty):
            d2 = np.einsum("ij,ij->i", x - new[labels], x - new[labels])
            far = np.argsort(-d2)[:len(empty)]
            new[empty] = x[far]
        if spherical:
            new = _unit(new)
        if np.array_equal(new, centroids):
            break
        centroids = new
    return np.ascontiguousarray(centroids, dtype=np.float32)


def _unit(c: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.where(norms > 0, norms, 1)).astype(np.float32)


def _kmeanspp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    centers = [x[rng.integers(n)]]
    d2 = np.einsum("ij,ij->i", x - centers[0], x - centers[0]).astype(np.float64)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.integers(n) if total <= 0 else rng.choice(n, p=d2 / total)
        centers.append(x[i])
        diff = x - x[i]
        d2 = np.minimum(d2, np.einsum("ij,ij->i", diff, diff))
    return np.array(centers, dtype=np.float32)


def train_codebooks(residuals: np.ndarray, num_blocks: int, dims_per_block: int,
                    iterations: int, rng: np.random.Generator, threads: int) -> np.ndarray:
    """16 codewords per block by k-means on residual blocks (C++, blocks in parallel).

    residuals: (m, num_blocks * dims_per_block) float32, m >= 1. Returns (num_blocks, 16,
    dims_per_block) float32, initialised from 16 random training rows.
    """
    m = len(residuals)
    init = residuals[rng.choice(m, size=16, replace=m < 16)]
    init = init.reshape(16, num_blocks, dims_per_block).transpose(1, 0, 2)
    return _mipscan.train_block_codebooks(np.ascontiguousarray(residuals),
                                          np.ascontiguousarray(init), iterations, threads)
