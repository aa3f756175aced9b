"""Builds the arrays of an index from a checked configuration: trains the partitioning
tree and the AH codebooks, encodes, and lays everything out as the core reads it (the
layout is documented in _core/search.h and _core/lut16.h). The builder (``builder.py``) only compiles the configuration."""

from __future__ import annotations

import math

import numpy as np

from mipscan import _mipscan
from mipscan._schema import (ENCODER_ITERATIONS, ah_num_blocks, leaf_axes_of, quantize_type,
                             resolve_leaf_axes, spread_weight_of)
from mipscan._training import assign_nearest, kmeans, soar_assign, train_codebooks
from mipscan.brute import normalize_rows

# Rows per encoding call: lets Ctrl-C through between calls.
_ENCODE_CHUNK = 1 << 15


def to_mips_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """Maps database rows into the inner-product space the core searches."""
    if metric == "cosine":
        return normalize_rows(x)
    if metric == "squared_l2":
        half = -0.5 * np.einsum("ij,ij->i", x, x)
        return np.ascontiguousarray(np.hstack([x, half[:, None]]), dtype=np.float32)
    return x


def build_arrays(db: np.ndarray, config: dict, threads: int, copy: bool = True
                 ) -> dict[str, np.ndarray]:
    """Trains and lays out every array of the index (layout: _core/search.h, IndexView).

    Every array returned is new memory, except, with ``copy=False``, the float32 reorder
    rows of a dot-product index, which are then ``db`` itself (zero-copy: the caller
    must not change ``db`` while the index lives)."""
    metric = config["distance_measure"]
    rng = np.random.default_rng(config["seed"])
    space = normalize_rows(db) if metric == "cosine" else db  # where partitions are trained
    rows = to_mips_rows(db, metric)
    n, mips_d = rows.shape

    tree = config.get("tree")
    resolve_leaf_axes(config)
    if tree is not None:
        sample = space
        if tree["training_sample_size"] < n:
            sample = space[np.sort(rng.choice(n, tree["training_sample_size"], replace=False))]
        k = min(tree["num_leaves"], len(sample))
        centroids = kmeans(sample, k, tree["training_iterations"], rng,
                           spherical=tree["spherical"], kmeanspp=not tree["random_init"],
                           threads=threads)
        labels = assign_nearest(space, centroids, threads)
        centroids, labels = _merge_small_leaves(space, centroids, labels, tree["min_partition_size"])
        upper = config.get("upper_tree")
        if upper is not None:
            centroids, labels, upper_centroids, upper_offsets = _upper_tree(
                centroids, labels, upper, tree, rng)
        # Slots: every row in its own leaf, and with SOAR a second time in another one.
        slot_rows_of = np.arange(n)
        slot_leaves = labels
        if tree.get("soar_lambda") is not None and len(centroids) > 1:
            second = soar_assign(space, centroids, labels, tree["soar_lambda"])
            slot_rows_of = np.concatenate([slot_rows_of, slot_rows_of])
            slot_leaves = np.concatenate([labels, second])
        avq = tree.get("avq")
        if avq is not None and not math.isnan(avq):
            centroids = avq_centroids(space, labels, centroids, avq)
        if metric == "squared_l2":
            half = -0.5 * np.einsum("ij,ij->i", centroids, centroids)
            centroids = np.hstack([centroids, half[:, None]]).astype(np.float32)
            if upper is not None:
                half = -0.5 * np.einsum("ij,ij->i", upper_centroids, upper_centroids)
                upper_centroids = np.hstack([upper_centroids, half[:, None]]).astype(np.float32)
    else:
        centroids = np.zeros((1, mips_d), np.float32)
        labels = slot_leaves = np.zeros(n, np.int64)
        slot_rows_of = np.arange(n)
    num_leaves = len(centroids)
    order = np.argsort(slot_leaves, kind="stable")
    slot_ids = slot_rows_of[order]  # datapoint row of each slot
    counts = np.bincount(slot_leaves, minlength=num_leaves)
    leaf_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    arrays = {"centroids": np.ascontiguousarray(centroids, dtype=np.float32),
              "leaf_offsets": leaf_offsets,
              "slot_ids": slot_ids.astype(np.uint32)}
    if tree is not None and config.get("upper_tree") is not None:
        arrays["upper_centroids"] = np.ascontiguousarray(upper_centroids, dtype=np.float32)
        arrays["upper_offsets"] = upper_offsets
    # The AH codebooks and codes before the leaf axes: the core's threads run best before
    # BLAS's (the axes' products) spin after their calls, taking a core for ~0.1 s.
    ah = config.get("score_ah")
    if ah is not None:
        arrays.update(_build_ah(rows, centroids, labels, slot_ids, slot_leaves[order], counts, ah,
                                rng, threads))
    else:
        kind = quantize_type(config["score_brute_force"]["quantize"])
        if kind == "float32":
            arrays["slot_rows"] = np.ascontiguousarray(rows[slot_ids])
        else:
            arrays.update(_quantized(rows, kind, "slot", slot_ids))
    if leaf_axes_of(config) > 0:  # the axes, and the spread left outside them
        arrays["leaf_axes"], arrays["leaf_spread"] = leaf_axes(
            rows, arrays["centroids"], slot_ids, counts, leaf_axes_of(config))
    elif spread_weight_of(config) > 0:
        arrays["leaf_spread"] = leaf_spread(rows, arrays["centroids"], slot_ids, counts)
    if tree is not None and quantize_type(tree["quantize_centroids"]) != "float32":
        arrays.update(_quantized(arrays["centroids"], quantize_type(tree["quantize_centroids"]),
                                 "centroids"))
    reorder = config.get("reorder")
    if reorder is not None and quantize_type(reorder["quantize"]) != "float32":
        arrays.update(_quantized(rows, quantize_type(reorder["quantize"]), "reorder"))
    elif reorder is not None:
        reorder_rows = np.ascontiguousarray(rows, dtype=np.float32)
        if copy and np.shares_memory(reorder_rows, db):
            reorder_rows = reorder_rows.copy()
        arrays["reorder_rows"] = reorder_rows
    return arrays


def int8_scales(x: np.ndarray) -> np.ndarray:
    """Per-column scales of ScaNN's scalar (fixed-point) quantization: max |x[:, j]| / 127,
    so that every column spans [-127, 127] (1 for an all-zero column: any scale > 0 works)."""
    amax = np.zeros(x.shape[1], np.float32)
    for b in range(0, len(x), _ENCODE_CHUNK):
        amax = np.maximum(amax, np.abs(x[b:b + _ENCODE_CHUNK]).max(axis=0))
    return np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)


def quantize_int8(x: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, row_scales): x[i, j] ~= row_scales[i] * scales[j] * codes[i, j], codes
    rounded to nearest (ties to even) in [-127, 127]. Per dimension first (``scales``,
    ScaNN's scalar quantization), then per row: a row's largest scaled value spans the
    int8 range, so short rows keep their digits. row_scales are in (0, 1] (1 for a zero
    row). On GloVe-50, brute force over the copy reaches recall@10 0.991 against 0.984
    with the per-dimension scales alone; the row scales cost 4 bytes a row."""
    codes = np.empty(x.shape, np.int8)
    rows = np.empty(len(x), np.float32)
    for b in range(0, len(x), _ENCODE_CHUNK):
        y = x[b:b + _ENCODE_CHUNK] / scales
        r = np.minimum(np.abs(y).max(axis=1, initial=0) / np.float32(127), np.float32(1))
        r = np.where(r > 0, r, np.float32(1)).astype(np.float32)
        codes[b:b + _ENCODE_CHUNK] = np.clip(np.rint(y / r[:, None]), -127, 127)
        rows[b:b + _ENCODE_CHUNK] = r
    return codes, rows


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even (finite
    input; the builder's magnitude bound keeps the result finite)."""
    out = np.empty(x.shape, np.uint16)
    for b in range(0, len(x), _ENCODE_CHUNK):
        bits = np.ascontiguousarray(x[b:b + _ENCODE_CHUNK], dtype=np.float32).view(np.uint32)
        out[b:b + _ENCODE_CHUNK] = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return out


def _quantized(rows, kind, prefix, take=None):
    """The int8 (with scales fitted on ``rows``) or bfloat16 copy of ``rows[take]``, as
    the arrays ``{prefix}_int8`` / ``_scales`` / ``_row_scales`` or ``{prefix}_bf16``."""
    pick = (lambda a: np.ascontiguousarray(a)) if take is None else (lambda a: np.ascontiguousarray(a[take]))
    stem = "centroid" if prefix == "centroids" else prefix
    if kind == "int8":
        scales = int8_scales(rows)
        codes, row_scales = quantize_int8(rows, scales)
        return {f"{prefix}_int8": pick(codes), f"{stem}_scales": scales,
                f"{stem}_row_scales": pick(row_scales)}
    return {f"{prefix}_bf16": pick(to_bfloat16(rows))}


def _upper_tree(centroids, labels, upper, tree, rng):
    """ScaNN's upper_tree, simply: k-means of the leaf centroids into ``upper["num_leaves"]``
    nodes (empty nodes dropped), and the leaves renumbered so that each node's children are
    contiguous. Returns (centroids, labels, upper_centroids, upper_offsets)."""
    k = min(upper["num_leaves"], len(centroids))
    nodes = kmeans(centroids, k, tree["training_iterations"], rng, spherical=tree["spherical"],
                   kmeanspp=not tree["random_init"])
    parent = assign_nearest(centroids, nodes)
    used = np.unique(parent)
    nodes, parent = nodes[used], np.searchsorted(used, parent)
    order = np.argsort(parent, kind="stable")  # new leaf i is old leaf order[i]
    new_of_old = np.empty_like(order)
    new_of_old[order] = np.arange(len(order))
    counts = np.bincount(parent, minlength=len(nodes))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return centroids[order], new_of_old[labels], nodes.astype(np.float32), offsets


def avq_centroids(x, labels, centroids, eta):
    """Anisotropic (AVQ) centroids, as ScaNN's partitioner with ``avq=eta``: each leaf's
    centre minimises sum over its points of |x - c|^2 + (eta - 1) <x - c, x_hat>^2 (the
    error parallel to a point weighted eta times), keeping the points' leaves. Closed form:
    c = eta (m I + (eta - 1) sum x_hat x_hat^T)^-1 sum x, as sum x_hat <x_hat, x> = sum x."""
    out = np.array(centroids, dtype=np.float32, copy=True)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
    d = x.shape[1]
    for leaf in range(len(centroids)):
        pts = x[order[bounds[leaf]:bounds[leaf + 1]]].astype(np.float64)
        if len(pts) == 0:
            continue
        norms = np.linalg.norm(pts, axis=1, keepdims=True)
        unit = pts / np.where(norms > 0, norms, 1.0)
        a = len(pts) * np.eye(d) + (eta - 1.0) * (unit.T @ unit)
        out[leaf] = eta * np.linalg.solve(a, pts.sum(axis=0))
    return out


def _merge_small_leaves(x, centroids, labels, min_size):
    """Drops leaves with fewer than min_size points (ScaNN's min_partition_size) and
    reassigns their points to the nearest remaining centroid; also drops empty leaves."""
    counts = np.bincount(labels, minlength=len(centroids))
    keep = counts >= max(min_size, 1)
    if keep.all():
        return centroids, labels
    if not keep.any():  # every leaf is small: keep the largest one
        keep[np.argmax(counts)] = True
    centroids = centroids[keep]
    return centroids, assign_nearest(x, centroids)


def leaf_spread(rows, centroids, slot_ids, counts, chunk: int = 1 << 16) -> np.ndarray:
    """Each leaf's RMS per-dimension residual sqrt(sum |x - c|^2 / (size * d)) over its
    entries (slot order, leaf by leaf; 0 for an empty leaf), float32: the leaf order's
    spread (_core/search.h, leaf_spread). Chunks of slots bound the temporary memory."""
    num_leaves, width = centroids.shape
    slot_leaf = np.repeat(np.arange(num_leaves), counts)
    sq = np.zeros(num_leaves, np.float64)
    for a in range(0, len(slot_ids), chunk):
        idx, leaves = slot_ids[a:a + chunk], slot_leaf[a:a + chunk]
        r = rows[idx] - centroids[leaves]
        sq += np.bincount(leaves, weights=np.einsum("ij,ij->i", r, r, dtype=np.float64),
                          minlength=num_leaves)
    size = np.maximum(np.asarray(counts, np.float64), 1.0) * width
    return np.sqrt(sq / size).astype(np.float32)


def leaf_axes(rows, centroids, slot_ids, counts, rank) -> tuple[np.ndarray, np.ndarray]:
    """Each leaf's top ``rank`` principal axes of its residuals x - c over its entries
    (slot order, leaf by leaf), scaled to sqrt(lambda_j - rest), and sqrt(rest), rest the
    mean eigenvalue of the others (0 past the width): the anisotropic leaf order
    (_core/search.h, leaf_axes) and its spread. float32 (num_leaves, rank, width) and
    (num_leaves,); zero for an empty leaf. One leaf's residuals at a time."""
    num_leaves, width = centroids.shape
    axes = np.zeros((num_leaves, rank, width), np.float32)
    spread = np.zeros(num_leaves, np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    cov = np.zeros((num_leaves, width, width), np.float64)
    for leaf in range(num_leaves):
        a, b = int(offsets[leaf]), int(offsets[leaf + 1])
        if b > a:
            r = rows[slot_ids[a:b]] - centroids[leaf]  # float32: BLAS's product, summed in
            cov[leaf] = (r.T @ r).astype(np.float64) / (b - a)  # blocks, is accurate enough to rank by
    lam, vec = np.linalg.eigh(cov)  # ascending, every leaf in one call
    lam = np.maximum(lam, 0.0)
    top, other = lam[:, width - rank:], lam[:, :width - rank]
    rest = other.mean(axis=1) if other.shape[1] else np.zeros(num_leaves)
    axes[:] = np.swapaxes(vec[:, :, width - rank:] * np.sqrt(np.maximum(top - rest[:, None], 0.0))[:, None, :], 1, 2)
    spread[:] = np.sqrt(rest)  # (an empty leaf's zero covariance gives zeros)
    return axes, spread


def _build_ah(rows, centroids, labels, slot_ids, slot_leaf, counts, ah, rng, threads):
    """AH arrays. labels: each row's own leaf (codebooks train on those residuals);
    slot_ids / slot_leaf: row and leaf of each slot, in slot order (what is encoded)."""
    n, mips_d = rows.shape
    dpb = ah["dimensions_per_block"]
    num_blocks = ah_num_blocks(mips_d, dpb)
    dp = num_blocks * dpb

    m = min(n, ah["training_sample_size"])
    sample = np.sort(rng.choice(n, m, replace=False)) if m < n else np.arange(n)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    residuals = _mipscan.gather_residuals(rows, sample.astype(np.int64), labels[sample].astype(np.int64),
                                          centroids, dp, threads)
    books = train_codebooks(residuals, num_blocks, dpb, ah["training_iterations"], rng, threads)

    # The encoder weighs every row as ScaNN weights a unit-norm row, with T itself
    # (eta = (d - 1) T^2 / (1 - T^2)), whatever the embeddings' scale. With
    # ScaNN's t = T / |x| instead, rows of large norm (the ones inner-product queries
    # return) get eta = 1 and small ones up to (d - 1) / 3; measured on GloVe-50 IP at
    # 150 of 300 leaves, reorder 500, the uniform weight gives recall@10 0.948 against
    # 0.937 (and 0.942 with no weighting at all). See builder.score_ah.
    threshold = ah["anisotropic_quantization_threshold"]
    threshold = 0.0 if math.isnan(threshold) else float(threshold)
    codes = np.empty((len(slot_ids), num_blocks), np.uint8)
    slot_ids = np.ascontiguousarray(slot_ids, dtype=np.int64)
    slot_leaf = np.ascontiguousarray(slot_leaf, dtype=np.int64)
    for b in range(0, len(slot_ids), _ENCODE_CHUNK):  # (residuals made in the core, per row)
        codes[b:b + _ENCODE_CHUNK] = _mipscan.encode_anisotropic_rows(
            rows, slot_ids[b:b + _ENCODE_CHUNK], slot_leaf[b:b + _ENCODE_CHUNK], centroids, books,
            threshold, ENCODER_ITERATIONS, threads)

    offsets = np.concatenate([[0], np.cumsum(counts)])
    packed = [_mipscan.pack_codes(codes[offsets[l]:offsets[l + 1]]) for l in range(len(counts))]
    groups = (counts + 63) // 64  # lut16.h: groups of 64 points
    return {"codebooks": books,
            "packed_codes": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            "leaf_groups": np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)}
