"""ScaNN-shaped builder: each stage stores its (checked) arguments, build() does the work.

    searcher = (mipscan.builder(db, 10, "dot_product")
                .tree(num_leaves=1000, num_leaves_to_search=100)
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(100)
                .build())

Every argument of ScaNN's builder stages is accepted. Those mipscan cannot honour yet
(int8/bfloat16 reorder, lut256, ...) raise ValueError when set to anything but their
"off" value, instead of being silently ignored.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from mipscan import _mipscan
from mipscan._threads import get_num_threads
from mipscan._training import assign_nearest, kmeans, soar_assign, train_codebooks
from mipscan._validation import (MAX_THREADS, Bool, Interval, Options, as_float_array,
                                 check_distance_measure, check_int, check_value)
from mipscan.brute import normalize_rows

_NAN = float("nan")

# One table per stage: argument -> (rule, default). Read by _stage() and by the tests.
STAGES: dict[str, dict[str, tuple[Any, Any]]] = {
    "tree": {
        "num_leaves": (Interval(int, 1, None), None),
        "num_leaves_to_search": (Interval(int, 1, None), None),
        "training_sample_size": (Interval(int, 1, None), 100_000),
        "min_partition_size": (Interval(int, 0, None), 50),
        "training_iterations": (Interval(int, 1, None), 12),
        "spherical": (Bool(), False),
        "quantize_centroids": (Options((False,)), False),
        "random_init": (Bool(), True),
        "incremental_threshold": (Options((None,)), None),
        "avq": (Options((None, False)), None),
        "soar_lambda": (Interval(float, 0.0, None, allow_none=True), None),
        "overretrieve_factor": (Options((None,)), None),
    },
    "score_ah": {
        "dimensions_per_block": (Interval(int, 1, None), None),
        "anisotropic_quantization_threshold": (Interval(float, 0.0, None, allow_nan=True), 0.2),
        "training_sample_size": (Interval(int, 16, None), 100_000),
        "min_cluster_size": (Interval(int, 0, None, allow_none=True), 100),
        "hash_type": (Options(("lut16",)), "lut16"),
        "training_iterations": (Interval(int, 1, None), 10),
    },
    "autopilot": {
        "mode": (Options(("NONE",)), "NONE"),
        "quantize": (Options((False, "float32", "FLOAT32")), False),
    },
    "score_brute_force": {
        "quantize": (Options((False, "float32")), False),
    },
    "reorder": {
        "reordering_num_neighbors": (Interval(int, 1, None), None),
        "quantize": (Options((False, "float32")), False),
        "anisotropic_quantization_threshold": (Interval(float, None, None, allow_nan=True), _NAN),
    },
}

# Arguments ScaNN derives itself; a user passing them is told so.
_INTERNAL = {"distance_measure", "projection", "upper_tree", "residual_quantization", "n_dims"}

# Rows per encoding call: bounds temporary memory and lets Ctrl-C through between calls.
_ENCODE_CHUNK = 1 << 18


def _stage(call: str, table: dict, args: tuple, kwargs: dict) -> dict:
    names = list(table)
    if len(args) > len(names):
        raise TypeError(f"{call}: takes at most {len(names)} positional arguments; got {len(args)}")
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in given:
            raise TypeError(f"{call}: got multiple values for argument {key!r}")
        if key in _INTERNAL:
            raise TypeError(f"{call}: {key} is set automatically by mipscan; do not pass it")
        if key not in table:
            raise TypeError(f"{call}: unexpected argument {key!r}; allowed: {', '.join(names)}")
        given[key] = value
    out = {}
    for name, (rule, default) in table.items():
        if name not in given:
            if default is None and not (isinstance(rule, Options) or getattr(rule, "allow_none", False)):
                raise TypeError(f"{call}: missing required argument {name!r}")
            out[name] = default
            continue
        value = given[name]
        if isinstance(rule, Options) and value not in rule.values and len(rule.values) <= 2 \
                and rule.values[0] in (None, False):
            raise ValueError(f"{call}: {name}={value!r} is not supported by mipscan yet; "
                             f"allowed: {rule.describe()}")
        out[name] = check_value(call, name, value, rule)
    return out


class ScannBuilder:
    """Collects the configuration; :meth:`build` trains and returns a :class:`Searcher`.

    Cross-argument rules are checked where both sides are known: ``tree()`` checks
    num_leaves_to_search <= num_leaves; ``build()`` checks num_leaves <= n,
    dimensions_per_block <= d, reordering_num_neighbors and num_neighbors <= n, and that
    exactly one of score_ah / score_brute_force was called.
    """

    def __init__(self, db, num_neighbors: int, distance_measure: str):
        call = "builder()"
        self.db = as_float_array(call, "db", db, 2)
        n = self.db.shape[0]
        self.num_neighbors = check_int(call, "num_neighbors", num_neighbors, 1, n, high_name="n")
        self.distance_measure = check_distance_measure(call, distance_measure)
        self.params: dict[str, dict] = {}
        self.training_threads = 0
        self.seed = 0

    def _set(self, stage: str, args: tuple, kwargs: dict) -> "ScannBuilder":
        call = f"{stage}()"
        if stage in self.params:
            raise ValueError(f"{call}: {stage} has already been configured")
        self.params[stage] = _stage(call, STAGES[stage], args, kwargs)
        return self

    def tree(self, *args, **kwargs) -> "ScannBuilder":
        """Partitioning: k-means into ``num_leaves`` leaves, ``num_leaves_to_search``
        searched per query. Same arguments and defaults as ScaNN's ``tree()``."""
        self._set("tree", args, kwargs)
        p = self.params["tree"]
        if p["num_leaves_to_search"] > p["num_leaves"]:
            del self.params["tree"]
            raise ValueError(f"tree(): num_leaves_to_search must be an int in [1, num_leaves="
                             f"{p['num_leaves']}]; got {p['num_leaves_to_search']}")
        return self

    def score_ah(self, *args, **kwargs) -> "ScannBuilder":
        """Anisotropic 4-bit asymmetric hashing (LUT16), ScaNN's arguments.

        ``anisotropic_quantization_threshold`` (default 0.2; NaN or 0 turns the
        anisotropic weighting off) is relative to the median datapoint norm: for
        unit-norm data (ScaNN's recommended setting) it is ScaNN's absolute threshold T,
        and for embeddings of another scale it keeps that meaning instead of
        degenerating (an absolute 0.2 exceeds every norm of the Keras-RS tutorial's
        candidates, ~0.1, and cost 0.09 recall@10 there). The parallel-error weight is
        eta = max(1, (d - 1) t^2 / (1 - t^2)) with t = T / |x| capped at 0.5.
        """
        return self._set("score_ah", args, kwargs)

    def score_brute_force(self, *args, **kwargs) -> "ScannBuilder":
        """Exact float32 scoring of the searched leaves."""
        return self._set("score_brute_force", args, kwargs)

    def reorder(self, *args, **kwargs) -> "ScannBuilder":
        """Exact float32 rescoring of the best ``reordering_num_neighbors`` candidates."""
        return self._set("reorder", args, kwargs)

    def autopilot(self, mode: str = "NONE", quantize: Any = False) -> "ScannBuilder":
        """Lets mipscan choose the stages from the data's size, as ScaNN's ``autopilot()``.

        Below 10,000 datapoints: exact scoring (``score_brute_force``). Above: a tree of
        round(sqrt(n)) leaves searching 15% of them, AH with 2 dimensions per block and
        threshold 0.2, and a reorder of max(250, 25 * num_neighbors) candidates (recall@10
        0.94 on the Keras-RS tutorial's candidates and 0.93 on GloVe-50 with inner
        product, as measured when this rule was chosen). It must be the only stage
        configured; ``mode`` (incremental updates) and ``quantize`` (int8/bfloat16
        reorder data) accept only their "off" values for now.
        """
        if self.params:
            raise ValueError("autopilot(): must be the only stage; already configured: "
                             + ", ".join(self.params))
        self._set("autopilot", (mode, quantize), {})
        n = self.db.shape[0]
        if n < 10_000:
            return self.score_brute_force()
        leaves = int(round(math.sqrt(n)))
        self.tree(leaves, max(1, math.ceil(0.15 * leaves)))
        self.score_ah(2, anisotropic_quantization_threshold=0.2)
        return self.reorder(min(n, max(250, 25 * self.num_neighbors)))

    def set_n_training_threads(self, threads: int) -> "ScannBuilder":
        """Threads for training and encoding (0 = all cores), as in ScaNN."""
        self.training_threads = check_int("set_n_training_threads()", "threads", threads, 0,
                                           MAX_THREADS)
        return self

    def set_seed(self, seed: int) -> "ScannBuilder":
        """Seed of the training samples and k-means initialisation (default 0)."""
        self.seed = check_int("set_seed()", "seed", seed, 0, None)
        return self

    def create_config(self) -> dict:
        """The checked configuration that build() would use (also stored in the index)."""
        n, d = self.db.shape
        has_ah, has_bf = "score_ah" in self.params, "score_brute_force" in self.params
        if has_ah == has_bf:
            raise ValueError("build(): exactly one of score_ah() or score_brute_force() must be "
                             f"called; got {'both' if has_ah else 'neither'}")
        tree = self.params.get("tree")
        if tree is not None and tree["num_leaves"] > n:
            raise ValueError(f"build(): tree num_leaves must be an int in [1, n={n}]; "
                             f"got {tree['num_leaves']}")
        if has_ah and self.params["score_ah"]["dimensions_per_block"] > d:
            raise ValueError(f"build(): score_ah dimensions_per_block must be an int in [1, d={d}]; "
                             f"got {self.params['score_ah']['dimensions_per_block']}")
        reorder = self.params.get("reorder")
        if reorder is not None and reorder["reordering_num_neighbors"] > n:
            raise ValueError(f"build(): reorder reordering_num_neighbors must be an int in "
                             f"[1, n={n}]; got {reorder['reordering_num_neighbors']}")
        return {"num_neighbors": self.num_neighbors, "distance_measure": self.distance_measure,
                "n": n, "d": d, "seed": self.seed,
                **{k: dict(v) for k, v in self.params.items()}}

    def build(self, shared_name: str | None = None, **kwargs) -> "Searcher":
        """Trains the index and returns a :class:`mipscan.searcher.Searcher`.

        ``shared_name`` is accepted for code written for ScaNN's TensorFlow op (which
        uses it to name a shared resource); mipscan searchers are plain Python objects,
        so it has no effect.
        """
        if kwargs:
            raise TypeError(f"build(): unexpected argument(s) {', '.join(map(repr, kwargs))}; "
                            "allowed: shared_name")
        from mipscan.searcher import Searcher

        config = self.create_config()
        t0 = time.perf_counter()
        arrays = build_arrays(self.db, config, self.training_threads or get_num_threads())
        config["build_seconds"] = time.perf_counter() - t0
        return Searcher(config, arrays)


def builder(db, num_neighbors: int, distance_measure: str) -> ScannBuilder:
    """Starts a searcher configuration, as ``scann_ops_pybind.builder``.

    Args:
        db: (n, d) float array (float64/float16 and non-contiguous input are converted).
        num_neighbors: default number of neighbours returned, an int in [1, n].
        distance_measure: ``"dot_product"``, ``"squared_l2"`` or ``"cosine"``.

    Raises:
        TypeError, ValueError: as described in ``mipscan._validation``.

    Example:
        >>> import numpy as np, mipscan
        >>> db = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
        >>> s = mipscan.builder(db, 5, "dot_product").score_ah(2).reorder(50).build()
        >>> s.search(db[0]).indices.shape
        (5,)
    """
    return ScannBuilder(db, num_neighbors, distance_measure)


def to_mips_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """Maps database rows into the inner-product space the core searches."""
    if metric == "cosine":
        return normalize_rows(x)
    if metric == "squared_l2":
        half = -0.5 * np.einsum("ij,ij->i", x, x)
        return np.ascontiguousarray(np.hstack([x, half[:, None]]), dtype=np.float32)
    return x


def build_arrays(db: np.ndarray, config: dict, threads: int) -> dict[str, np.ndarray]:
    """Trains and lays out every array of the index (see DESIGN.md, Data layout)."""
    metric = config["distance_measure"]
    rng = np.random.default_rng(config["seed"])
    space = normalize_rows(db) if metric == "cosine" else db  # where partitions are trained
    rows = to_mips_rows(db, metric)
    n, mips_d = rows.shape

    tree = config.get("tree")
    if tree is not None:
        sample = space
        if tree["training_sample_size"] < n:
            sample = space[np.sort(rng.choice(n, tree["training_sample_size"], replace=False))]
        k = min(tree["num_leaves"], len(sample))
        centroids = kmeans(sample, k, tree["training_iterations"], rng,
                           spherical=tree["spherical"], kmeanspp=not tree["random_init"])
        labels = assign_nearest(space, centroids)
        centroids, labels = _merge_small_leaves(space, centroids, labels, tree["min_partition_size"])
        # Slots: every row in its own leaf, and with SOAR a second time in another one.
        slot_rows_of = np.arange(n)
        slot_leaves = labels
        if tree.get("soar_lambda") is not None and len(centroids) > 1:
            second = soar_assign(space, centroids, labels, tree["soar_lambda"])
            slot_rows_of = np.concatenate([slot_rows_of, slot_rows_of])
            slot_leaves = np.concatenate([labels, second])
        if metric == "squared_l2":
            half = -0.5 * np.einsum("ij,ij->i", centroids, centroids)
            centroids = np.hstack([centroids, half[:, None]]).astype(np.float32)
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

    ah = config.get("score_ah")
    if ah is not None:
        arrays.update(_build_ah(rows, centroids, labels, slot_ids, slot_leaves[order], counts, ah,
                                rng, threads))
    else:
        arrays["slot_rows"] = np.ascontiguousarray(rows[slot_ids])
    if config.get("reorder") is not None:
        arrays["reorder_rows"] = np.ascontiguousarray(rows, dtype=np.float32)
    return arrays


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


def _build_ah(rows, centroids, labels, slot_ids, slot_leaf, counts, ah, rng, threads):
    """AH arrays. labels: each row's own leaf (codebooks train on those residuals);
    slot_ids / slot_leaf: row and leaf of each slot, in slot order (what is encoded)."""
    n, mips_d = rows.shape
    dpb = ah["dimensions_per_block"]
    num_blocks = math.ceil(mips_d / dpb)
    dp = num_blocks * dpb

    def padded_residuals(idx, leaves):
        out = np.zeros((len(idx), dp), np.float32)
        out[:, :mips_d] = rows[idx] - centroids[leaves]
        return out

    def padded_rows(idx):
        out = np.zeros((len(idx), dp), np.float32)
        out[:, :mips_d] = rows[idx]
        return out

    m = min(n, ah["training_sample_size"])
    sample = np.sort(rng.choice(n, m, replace=False)) if m < n else np.arange(n)
    books = train_codebooks(padded_residuals(sample, labels[sample]), num_blocks, dpb,
                            ah["training_iterations"], rng, threads)

    threshold = ah["anisotropic_quantization_threshold"]
    # Relative to the median row norm: for unit-norm rows (ScaNN's recommended setting)
    # this is ScaNN's absolute threshold; for embeddings of any other scale it keeps the
    # same meaning instead of degenerating (t = T / |x| >= 1 when norms are below T).
    threshold = 0.0 if math.isnan(threshold) else threshold * float(
        np.median(np.linalg.norm(rows[sample], axis=1)))
    codes = np.empty((len(slot_ids), num_blocks), np.uint8)
    for b in range(0, len(slot_ids), _ENCODE_CHUNK):
        idx, leaves = slot_ids[b:b + _ENCODE_CHUNK], slot_leaf[b:b + _ENCODE_CHUNK]
        codes[b:b + len(idx)] = _mipscan.encode_anisotropic(
            padded_residuals(idx, leaves), padded_rows(idx), books, threshold, mips_d, 10, threads)

    offsets = np.concatenate([[0], np.cumsum(counts)])
    packed = [_mipscan.pack_codes(codes[offsets[l]:offsets[l + 1]]) for l in range(len(counts))]
    groups = (counts + 63) // 64  # lut16.h: groups of 64 points
    return {"codebooks": books,
            "packed_codes": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            "leaf_groups": np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)}
