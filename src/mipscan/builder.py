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

import time
from typing import Any

import numpy as np

from mipscan._build import build_arrays
from mipscan._policy import suggest_config
from mipscan._schema import (CALL_ONLY, STAGES, ReorderType, check_stage_args,
                             cross_rule_errors, static_only)
from mipscan._threads import get_num_threads
from mipscan._validation import (MAX_THREADS, Bool, as_float_array, check_distance_measure,
                                 check_int, check_value)
from mipscan._live import SearcherConfig
from mipscan.searcher import Searcher

__all__ = ["STAGES", "ScannBuilder", "builder"]


class ScannBuilder:
    """Collects the configuration; :meth:`build` trains and returns a :class:`Searcher`.

    Cross-argument rules are checked where both sides are known: ``tree()`` checks
    num_leaves_to_search <= num_leaves; ``build()`` checks num_leaves <= n,
    dimensions_per_block <= d (and at most 65,535 AH blocks), reordering_num_neighbors
    and num_neighbors <= n, and that exactly one of score_ah / score_brute_force was
    called. The rules live in ``mipscan._schema``, which the index loader reads too.
    """

    def __init__(self, db, num_neighbors: int, distance_measure: str):
        call = "builder()"
        self.db = _empty_db(db)
        if self.db is None:
            self.db = as_float_array(call, "db", db, 2)
        n = self.db.shape[0]
        # An empty db (a live index that starts empty) bounds no k: searches return
        # min(k, live items).
        self.num_neighbors = check_int(call, "num_neighbors", num_neighbors, 1, n or None,
                                       high_name="n")
        self.distance_measure = check_distance_measure(call, distance_measure)
        self.params: dict[str, dict] = {}
        self.training_threads = 0
        self.seed = 0

    def _set(self, stage: str, args: tuple, kwargs: dict) -> "ScannBuilder":
        call = f"{stage}()"
        if stage in self.params:
            raise ValueError(f"{call}: {stage} has already been configured")
        params = check_stage_args(call, stage, args, kwargs)
        for name in CALL_ONLY.get(stage, ()):
            del params[name]  # checked, equivalent to mipscan's behaviour, not stored
        self.params[stage] = params
        return self

    def tree(self, *args, **kwargs) -> "ScannBuilder":
        """Partitioning: k-means into ``num_leaves`` leaves, ``num_leaves_to_search``
        searched per query. Same arguments and defaults as ScaNN's ``tree()``.

        ``quantize_centroids``: ``True`` (int8 with per-dimension scales, ScaNN's
        FIXED_POINT_INT8) or ``ReorderType.BFLOAT16`` scores the leaves from a quantized
        copy of the centroids (the float32 ones are kept too: the build and the index
        layout use them). ``avq=eta`` (dot_product / cosine): after k-means, each leaf's
        centre minimises the anisotropic loss of its points (ScaNN's AVQ partitioner; the
        points keep their leaves). Measured at 30% of the leaves, reorder 500: GloVe-50 IP
        recall@10 +0.011 with eta 10; the tutorial candidates +0.000 at 30 leaves but
        -0.09 at 3 leaves, so it stays off by default, as in ScaNN.
        ``overretrieve_factor`` (with ``soar_lambda``): candidate slots kept per distinct
        row to reorder (None: 2); without spilling it has no effect, as in ScaNN.

        ``spread_weight`` (mipscan's; None: 2 for dot_product and cosine, 0 for
        squared_l2) orders the leaves searched by ``q . c + spread_weight * |q| * s``, s
        the leaf's RMS per-dimension residual (stored per leaf): the mean plus two
        standard deviations of ``q . x`` over the leaf, were its residuals isotropic,
        rather than the mean alone. Leaves whose points spread widely hold more of the
        largest inner products than their centre says. 0 is ScaNN's order (``q . c``).
        The scores the scan adds to stay ``q . c``. Measured on GloVe-50 IP, 300 leaves,
        reorder 500, all 10,000 queries: recall@10 0.811 -> 0.837 at 30 leaves searched,
        0.886 -> 0.906 at 60, 0.948 -> 0.953 at 150; 0.95 needs 150 leaves instead of
        225. squared_l2 is off by default: its extra dimension (-|x|^2 / 2) spreads
        unlike the others, and recall fell.

        ``leaf_axes`` (mipscan's; None: 8 where cheap, else 0) replaces the isotropic
        spread by each leaf's top principal axes of its residuals plus an isotropic rest:
        leaves are ranked by ``q . c + w * sqrt(sum_j (a_j . q)^2 + |q|^2 s^2)`` (a_j the
        scaled axes, s the RMS residual outside them), the mean plus w standard deviations
        of ``q . x`` for a leaf that is not round. It costs ``leaf_axes * d`` multiply-adds
        per leaf and query, so None turns it on only where few, large leaves make that
        small beside the scan (num_leaves^2 * 8 <= 0.015 * num_leaves_to_search * n): the
        tutorial's 270,882 candidates in 100 leaves, yes; GloVe-50 in 300 leaves or the
        seed candidates in 520, no. The default weight is then 3. Measured on the
        tutorial-shaped candidates (5 seeds x 2,000 queries, 30 of 100 leaves, reorder
        500): recall@10 0.812 -> 0.840 (ScaNN 1.4.2: 0.813), at 75 instead of 68 us per
        query (the spread order needs about 35 leaves, and more time, for 0.840).
        """
        self._set("tree", args, kwargs)
        p = self.params["tree"]
        if p["num_leaves_to_search"] > p["num_leaves"]:
            del self.params["tree"]
            raise ValueError(f"tree(): num_leaves_to_search must be an int in [1, num_leaves="
                             f"{p['num_leaves']}]; got {p['num_leaves_to_search']}")
        return self

    def score_ah(self, *args, **kwargs) -> "ScannBuilder":
        """Anisotropic 4-bit asymmetric hashing (LUT16), ScaNN's arguments.

        ``anisotropic_quantization_threshold`` T (default 0.2; NaN or 0 turns the
        anisotropic weighting off) weights every datapoint as ScaNN weights a unit-norm
        one: the parallel error counts eta = max(1, (d - 1) t^2 / (1 - t^2)) times the
        orthogonal, t = T capped at 0.5. For unit-norm data (ScaNN's recommended
        setting) this is ScaNN's encoding. For embeddings of another scale it keeps that
        meaning: ScaNN's t = T / |x| degenerates there (an absolute 0.2 exceeds every
        norm of the Keras-RS tutorial's candidates, ~0.1, and cost 0.09 recall@10), and
        even relative to the median norm it gives the large-norm rows that
        inner-product queries return eta = 1 (GloVe-50 IP, 150 of 300 leaves, reorder
        500: recall@10 0.948 with one eta for all rows, 0.937 with t = T * median / |x|).

        ``min_cluster_size`` is accepted and checked for ScaNN code (which may pass it
        positionally) but has no effect: ScaNN re-seeds codeword clusters smaller than
        it, mipscan's codebook k-means re-seeds empty ones only. ``build()`` refuses
        more than 65,535 blocks (d / dimensions_per_block): a point's sum over blocks
        must fit the scan's 16-bit accumulators.
        """
        return self._set("score_ah", args, kwargs)

    def score_brute_force(self, *args, **kwargs) -> "ScannBuilder":
        """Exact scoring of the searched leaves, over a float32 copy of the rows or, with
        ``quantize`` (``ReorderType.INT8`` / ``True``, ``ReorderType.BFLOAT16``; ScaNN's
        spellings), over an int8 (per-dimension scales) or bfloat16 copy only: 1/4 or 1/2
        of the memory, scores then exact on the quantized rows."""
        return self._set("score_brute_force", args, kwargs)

    def reorder(self, *args, **kwargs) -> "ScannBuilder":
        """Exact rescoring of the best ``reordering_num_neighbors`` candidates.

        ``quantize`` chooses what is stored for it, as ScaNN's ``ReorderType``: FLOAT32
        (default; ``False``), INT8 (``True``: per-dimension scales max |x[:, j]| / 127,
        as ScaNN's fixed-point reorder) or BFLOAT16 (rounded to nearest even). Quantized
        types keep no float32 copy; the query stays float32. ``build()`` refuses a
        non-NaN ``anisotropic_quantization_threshold`` with INT8 (ScaNN's noise shaping
        is not implemented).
        """
        return self._set("reorder", args, kwargs)

    def pca(self, *args, **kwargs) -> "ScannBuilder":
        """ScaNN's PCA projection stage: arguments checked here; ``build()`` refuses it
        (projections are not supported by mipscan yet)."""
        return self._set("pca", args, kwargs)

    def truncate(self, *args, **kwargs) -> "ScannBuilder":
        """ScaNN's truncation stage (MRL embeddings): arguments checked here; ``build()``
        refuses it (projections are not supported by mipscan yet)."""
        return self._set("truncate", args, kwargs)

    def upper_tree(self, *args, **kwargs) -> "ScannBuilder":
        """ScaNN's second tree level (requires ``tree()``), for very many leaves: the leaf
        centroids are clustered into ``num_leaves`` upper nodes, and a query scores the
        upper nodes, then only the leaves under its best ``num_leaves_to_search`` nodes
        (further leaves are scored only if those hold too few points). ``scoring_mode``
        is accepted; the upper centroids are scored in float32 (at least as precise as
        any mode asks). ``soar_lambda``, ``avq`` and ``anisotropic_quantization_threshold``
        on the upper level are refused by ``build()``; ``overretrieve_factor`` has no
        effect there (no spilling), as in ScaNN without SOAR."""
        return self._set("upper_tree", args, kwargs)

    def autopilot(self, mode: str = "NONE", quantize: Any = False) -> "ScannBuilder":
        """Lets mipscan choose the stages from the data's size, as ScaNN's ``autopilot()``:
        the stages of :func:`mipscan.suggest_config` (the one policy the Keras layer and
        the CLI use too). It must be the only stage configured. ``mode``:
        ``IncrementalMode.NONE`` (or "NONE") or ``ONLINE_INCREMENTAL``: the index then
        changes method as upserts and deletes move its size across the brute-force
        threshold (see ``Searcher.upsert``). ``quantize`` (a ``ReorderType``, as ScaNN's)
        is the storage type of the exact scores' copy; an index that updates keeps it in
        float32 (ONLINE_INCREMENTAL refuses the others).
        """
        if self.params:
            raise ValueError("autopilot(): must be the only stage; already configured: "
                             + ", ".join(self.params))
        # ScaNN's enums (mipscan.scann_builder.IncrementalMode / ReorderType) by name.
        mode = getattr(mode, "name", mode)
        quantize = getattr(quantize, "name", quantize)
        self._set("autopilot", (mode, quantize), {})
        n, d = self.db.shape
        n = max(n, 1)  # an empty start is brute force, as any small one
        for stage, kwargs in suggest_config(n, d, min(self.num_neighbors, n),
                                            self.distance_measure).items():
            if stage in ("reorder", "score_brute_force"):  # the exact scores' copy
                kwargs = {**kwargs, "quantize": self.params["autopilot"]["quantize"]}
            getattr(self, stage)(**kwargs)
        return self

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
        config = {"num_neighbors": self.num_neighbors, "distance_measure": self.distance_measure,
                  "n": n, "d": d, "seed": self.seed,
                  **{k: dict(v) for k, v in self.params.items()}}
        for where, message in cross_rule_errors(config):
            raise ValueError(f"build(): {message}" if where == "stages" else
                             f"build(): {where.replace('.', ' ', 1)} {message}")
        return SearcherConfig(config)

    def build(self, shared_name: str | None = None, docids=None, *, copy: bool = True
              ) -> Searcher:
        """Trains the index and returns a :class:`mipscan.searcher.Searcher`.

        Args:
            shared_name: accepted for code written for ScaNN's TensorFlow op (which uses
                it to name a shared resource); mipscan searchers are plain Python
                objects, so it has no effect.
            docids: ScaNN's user ids, one per row of ``db``, all ints or all strings,
                distinct. Searches then return docids (a numpy array: int64, or str)
                instead of row numbers, and the searcher can be updated
                (``upsert``, ``delete``, ``rebalance``). None: results are row numbers.
            copy: the index keeps its own copy of everything it stores (default), as
                ScaNN does, so changing ``db`` afterwards changes nothing. ``False``
                lets a dot-product index with ``reorder()`` keep ``db`` itself as its
                reorder rows when it is already float32 and C-contiguous (no second
                copy of the largest array); ``db`` must then not change while the
                searcher lives.

        Raises:
            ValueError: the cross-stage rules (see the class docstring), or ``db``
                changed since ``builder()`` to hold NaN/inf.
        """
        copy = check_value("build()", "copy", copy, Bool())
        if len(self.db) == 0:
            self._check_empty_start(docids)
        config = self.create_config()
        # Checked again: the caller may have changed db since builder() checked it.
        db = self.db if len(self.db) == 0 else as_float_array("build()", "db", self.db, 2)
        t0 = time.perf_counter()
        arrays = build_arrays(db, config, self.training_threads or get_num_threads(), copy=copy)
        config["build_seconds"] = time.perf_counter() - t0
        return Searcher(config, arrays, docids=docids)

    def _check_empty_start(self, docids) -> None:
        """An empty db builds only a live index that starts empty (ScaNN's
        autopilot(ONLINE_INCREMENTAL) may): build(docids=[]) with autopilot(mode=
        ONLINE_INCREMENTAL) or a float32 score_brute_force() alone. Everything else needs
        data to train on (tree, AH) or to bound (reorder)."""
        stages = set(self.params)
        auto = self.params.get("autopilot")
        live_auto = auto is not None and auto["mode"] == "ONLINE_INCREMENTAL"
        why = None
        if docids is None or (hasattr(docids, "__len__") and len(docids) != 0):
            why = ("build(docids=[]) makes a live index that starts empty; got "
                   f"docids={'None' if docids is None else f'{len(docids)} entries'}")
        elif live_auto:
            why = None
        elif auto is not None:
            why = "autopilot() needs mode=IncrementalMode.ONLINE_INCREMENTAL to start empty"
        elif stages != {"score_brute_force"}:
            extra = sorted(stages - {"score_brute_force"})
            why = (f"{', '.join(s + '()' for s in extra)} cannot be built without data"
                   if extra else "score_brute_force() must be configured")
        else:
            why = static_only(self.params)
        if why is not None:
            raise ValueError(f"build(): db is empty (shape {self.db.shape}); only a live index "
                             "may start empty: build(docids=[]) with autopilot(mode="
                             "IncrementalMode.ONLINE_INCREMENTAL) or score_brute_force() as the "
                             f"only stage ({why})")


def _empty_db(db):
    """A float32 (0, d) array for an empty float array of d >= 1 columns, else None (the
    builder then checks db as any other array, and refuses it if empty)."""
    shape, dtype = getattr(db, "shape", None), getattr(db, "dtype", None)
    if shape is None or len(shape) != 2 or shape[0] != 0 or shape[1] < 1 \
            or getattr(dtype, "kind", None) != "f":
        return None
    return np.zeros((0, int(shape[1])), np.float32)


def builder(db, num_neighbors: int, distance_measure: str) -> ScannBuilder:
    """Starts a searcher configuration, as ``scann_ops_pybind.builder``.

    Args:
        db: (n, d) float array (float64/float16 and non-contiguous input are converted).
            An empty (0, d) float array starts a live index that is empty: only
            ``build(docids=[])`` with ``autopilot(mode=IncrementalMode.ONLINE_INCREMENTAL)``
            or a float32 ``score_brute_force()`` alone builds it (searches then return
            (nq, 0) results until upserts add points); any other build of it raises
            ValueError naming db.
        num_neighbors: default number of neighbours returned, an int in [1, n] (any int
            >= 1 for an empty db).
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
