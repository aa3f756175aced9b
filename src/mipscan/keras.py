"""Keras-RS retrieval layer backed by a mipscan index.

``ApproximateRetrieval`` is a drop-in for ``keras_rs.layers.BruteForceRetrieval``: same
constructor arguments, attributes, ``update_candidates()``, outputs ``(scores, ids)`` (or
``ids`` alone), shapes and dtypes. It answers with a mipscan searcher (k-means tree,
anisotropic AH, exact reorder) instead of scoring every candidate.

It runs on the JAX, TensorFlow and PyTorch backends, eagerly and inside compiled
functions: under ``jax.jit`` the search is a ``jax.pure_callback``, under ``tf.function``
a ``tf.numpy_function``; PyTorch runs eagerly. Every backend branch lives in
:func:`_host_call` and the two helpers after it.

This module imports Keras and Keras-RS (the ``recsys`` extra); ``import mipscan`` does not.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any

import numpy as np

import mipscan
from mipscan.recsys._extras import reraise

try:
    import keras
    import keras_rs
except ImportError as _exc:  # one line naming the extra, not the import's traceback
    raise reraise("mipscan.keras", _exc) from None

__all__ = ["ApproximateRetrieval"]

# Defaults, chosen for recall first (recall@10 >= 0.95 vs brute force) on the Keras-RS
# tutorial's embeddings, which are barely trained and so nearly isotropic: the hardest
# case for partitioning and quantization.
# Below this many candidates the index has no tree: one AH scan over all of them (16 bytes
# per candidate at d=32) takes well under a millisecond per query, and a tree that keeps
# recall >= 0.95 on near-isotropic data must search a large share of its leaves anyway.
_MIN_CANDIDATES_FOR_TREE = 100_000
# Fraction of the leaves searched when num_leaves_to_search is not given. On the
# tutorial's embeddings with round(sqrt(n)) leaves, recall@10 with 1/4 of them is 0.944
# (110k candidates, 10 epochs) to 0.984 (270k, 50 epochs); with 1/3, 0.970 to 0.992.
# The misses come from the tree: a larger reorder does not recover them.
_LEAVES_TO_SEARCH_FRACTION = 1 / 3
# Below this many candidates the index scores exactly (score_brute_force): an AH
# codebook of 16 codewords per block needs a few hundred points to be worth training.
_MIN_CANDIDATES_FOR_AH = 1_000
# dimensions_per_block when not given: 1 up to this many dimensions (4 bits per
# dimension: recall@10 0.997 vs 0.96 for 2 on the tutorial's 32-d embeddings), else 2.
_MAX_DIMS_FOR_ONE_PER_BLOCK = 64
# Batches at least this large go to search_batched_parallel (all cores); smaller ones to
# search_batched, whose single thread avoids the pool's start-up cost.
_PARALLEL_MIN_QUERIES = 64

_SEARCHER_DIR = "searcher"
_EMBEDDINGS_FILE = "candidate_embeddings.npy"
_IDS_FILE = "candidate_ids.npy"


def _host_call(fn, xs: tuple, out_dtypes: tuple[str, ...], out_shape: tuple):
    """Runs ``fn`` (numpy arrays in, tuple of numpy arrays out) on the host for backend
    tensors ``xs`` (float32) and returns backend tensors of ``out_dtypes``, each of
    ``out_shape`` (None for a dimension only known at run time).

    With the two helpers below, the only per-backend code: JAX traces become a
    ``jax.pure_callback``, TensorFlow graphs a ``tf.numpy_function``; eager tensors of
    every backend go through numpy directly.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if any(isinstance(x, jax.core.Tracer) for x in xs):
            specs = tuple(jax.ShapeDtypeStruct(out_shape, dt) for dt in out_dtypes)
            # One call for a vmapped batch of queries; with candidates as a second
            # operand, which vmap must not batch, one call per element.
            method = "broadcast_all" if len(xs) == 1 else "sequential"
            return jax.pure_callback(fn, specs, *xs, vmap_method=method)
    elif backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            # stateful: the results depend on the layer's candidates, not only on x.
            outs = tf.numpy_function(fn, list(xs), list(out_dtypes), stateful=True)
            for out in outs:
                out.set_shape(out_shape)
            return tuple(outs)
    outs = fn(*(keras.ops.convert_to_numpy(x) for x in xs))
    return tuple(keras.ops.convert_to_tensor(o) for o in outs)


def _host_call_supports_jit() -> bool:
    """Whether :func:`_host_call` can run inside ``jit_compile=True`` code: XLA runs
    jax.pure_callback, but cannot compile tf.numpy_function, and torch.compile would
    only break its graph at the numpy conversion. Elsewhere Keras's
    ``model.compile(jit_compile=True)`` falls back (with a warning) to tf.function on
    TensorFlow and to eager execution on PyTorch."""
    return keras.backend.backend() == "jax"


def _top_k_index_dtype() -> str:
    """The dtype of ``keras.ops.top_k``'s indices, which BruteForceRetrieval returns
    when it has no candidate ids: torch.topk gives int64, JAX and TensorFlow int32."""
    return "int64" if keras.backend.backend() == "torch" else "int32"


def _to_numpy(name: str, x: Any) -> np.ndarray:
    """Any tensor or array-like as a numpy array; ValueError naming the argument if it
    cannot be converted."""
    if isinstance(x, np.ndarray):
        return x
    try:
        arr = np.asarray(x) if isinstance(x, (list, tuple)) else keras.ops.convert_to_numpy(x)
    except Exception as exc:  # backend-specific conversion errors
        raise ValueError(f"`{name}` could not be converted to an array: {exc}") from None
    if arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def _embeddings_array(x: Any) -> np.ndarray:
    arr = _to_numpy("candidate_embeddings", x)
    if arr.dtype.kind not in "biuf":
        raise ValueError("`candidate_embeddings` must have a real numeric dtype (float, int "
                         f"or bool), received `candidate_embeddings` with dtype {arr.dtype}")
    return arr


def _ids_array(x: Any) -> np.ndarray:
    arr = _to_numpy("candidate_ids", x)
    if arr.dtype.kind not in "biuf":
        raise ValueError("`candidate_ids` must have an integer dtype, received "
                         f"`candidate_ids` with dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        # Float ids are accepted only when they are whole numbers: truncating 0.5 to 0
        # would silently return the wrong identifiers.
        raise ValueError("`candidate_ids` must hold whole numbers; received float "
                         f"`candidate_ids` such as {arr[~(arr == np.round(arr))][:3].tolist()}")
    return arr


def _check_ids_values(ids: np.ndarray) -> np.ndarray:
    """int32 ids (the dtype BruteForceRetrieval stores them in), checked to fit."""
    if ids.ndim != 1:
        raise ValueError("`candidate_ids` must be a tensor of rank 1 (num_candidates,), "
                         f"received `candidate_ids` with shape {ids.shape}")
    info = np.iinfo(np.int32)
    if ids.size and (ids.dtype.kind == "f" and not np.all(np.isfinite(ids))
                     or ids.min() < info.min or ids.max() > info.max):
        raise ValueError(f"`candidate_ids` must fit in int32 [{info.min}, {info.max}], "
                         f"received values in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


def _check_int(name: str, value: Any, low: int, allow_none: bool = True) -> int | None:
    """An int >= low (or None); TypeError/ValueError naming the argument otherwise."""
    allowed = f"an int >= {low}" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"ApproximateRetrieval(): `{name}` must be {allowed}; received {value!r}")
    if value < low:
        raise ValueError(f"ApproximateRetrieval(): `{name}` must be {allowed}; received {value!r}")
    return int(value)


@keras.saving.register_keras_serializable(package="mipscan")
class ApproximateRetrieval(keras_rs.layers.Retrieval):
    """Approximate top-k retrieval with a mipscan index (ScaNN's algorithm).

    Same contract as ``keras_rs.layers.BruteForceRetrieval``: it keeps a set of
    candidates and returns, for each query, the top ``k`` candidates by score, sorted
    highest first, as ``(top_scores, top_ids)`` (or ``top_ids`` when
    ``return_scores=False``). The scores are the exact inner products of the returned
    candidates (the index reorders its approximate hits exactly); which candidates are
    returned is approximate (recall@10 is typically >= 0.95 with the defaults).

    The index is built when candidates are given (in the constructor or by
    ``update_candidates``) from the tuning arguments below; their ``None`` defaults
    adapt to the number of candidates ``n``. Or pass an already built ``searcher``
    (``mipscan.builder(...).build()`` or ``mipscan.load_searcher(...)``).

    Unlike ``BruteForceRetrieval``, ``model.save()`` keeps the candidates: the index
    and the candidates are written as assets of the ``.keras`` file, and
    ``keras.models.load_model()`` restores a layer that gives identical results, on any
    backend. ``get_config()`` holds the arguments, not the candidates.

    As with ``BruteForceRetrieval`` in the Keras-RS tutorials, a model's ``build()`` may
    link the layer to its candidate tower's variable (``self.retrieval.candidate_embeddings
    = self.candidate_embedding.embeddings``): the index then follows the variable through
    ``fit()`` (see the ``candidate_embeddings`` property).

    Other differences: otherwise ``candidate_embeddings`` and ``candidate_ids`` are
    read-only tensors, not ``keras.Variable``s (change them with ``update_candidates``,
    which rebuilds the index), and ``update_candidates`` may add ids to candidates that
    had none. The search runs on the host, outside autodiff: the outputs carry no
    gradient (a retrieval layer serves; training uses the exact scores).

    Args:
        candidate_embeddings: (n, d) candidate embeddings (any backend tensor, numpy
            array or nested list; float, int or bool). If `None`, candidates must be
            provided with `update_candidates` (or `searcher`) before using this layer.
        candidate_ids: (n,) integer identifiers of the candidates, returned instead of
            row indices; stored as int32. If `None` the indices of the candidates are
            returned instead.
        k: number of candidates to retrieve.
        return_scores: when `True`, return a tuple with the top scores and the top
            identifiers; when `False`, a single tensor with the top identifiers.
        searcher: an already built `mipscan.Searcher` over the candidates; the tuning
            arguments are then used only by later `update_candidates` calls.
        distance_measure: `"dot_product"` (as `BruteForceRetrieval`), `"cosine"`, or
            `"squared_l2"` (scores are then squared distances, smallest first). With
            `searcher`, the searcher's own measure is used.
        num_leaves: k-means leaves of the tree; `None` means no tree below 100,000
            candidates and `round(sqrt(n))` above. Clamped to `n`; 1 means no tree.
        num_leaves_to_search: leaves searched per query; `None` means a third of the
            leaves (at least 1). Clamped to the number of leaves.
        training_iterations: k-means iterations of the tree.
        dimensions_per_block: dimensions per 4-bit AH code; `None` means 1 for
            `d <= 64`, else 2. Clamped to `d`. Below 1,000 candidates the index scores
            exactly instead of with AH.
        anisotropic_quantization_threshold: AH's anisotropic threshold T (NaN turns
            the anisotropic weighting off).
        reordering_num_neighbors: approximate hits rescored exactly per query; `None`
            means `max(20 * k, 200)`. Clamped to `[k, n]`.
        seed: seed of the index training (k-means and codebooks).
        **kwargs: Args to pass to the base class.

    Raises:
        ValueError: the errors of `BruteForceRetrieval`, with the same messages (rank
            of `candidate_embeddings`, fewer candidates than `k`, `candidate_ids` of
            the wrong length or without `candidate_embeddings`); also an unusable
            dtype of `candidate_embeddings` or `candidate_ids`, NaN/inf candidates,
            queries whose last dimension differs from the candidates', and a call
            before any candidates were given. Checked in the constructor,
            `update_candidates` and `call`.
        TypeError: a tuning argument of the wrong type, or a `searcher` that is not
            a mipscan searcher.

    Example:

    ```python
    retrieval = mipscan.keras.ApproximateRetrieval(k=100)

    # At some later point, we update the candidates (this builds the index).
    retrieval.update_candidates(candidate_embeddings, candidate_ids)

    # We can then retrieve the top candidates for any number of queries.
    # Scores are stored highest first. Scores correspond to ids in the same row.
    top_scores, top_ids = retrieval(query_embeddings)
    ```
    """

    def __init__(
        self,
        candidate_embeddings: Any = None,
        candidate_ids: Any = None,
        k: int = 10,
        return_scores: bool = True,
        *,
        searcher: Any = None,
        distance_measure: str = "dot_product",
        num_leaves: int | None = None,
        num_leaves_to_search: int | None = None,
        training_iterations: int = 12,
        dimensions_per_block: int | None = None,
        anisotropic_quantization_threshold: float = 0.2,
        reordering_num_neighbors: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(k=k, return_scores=return_scores, **kwargs)
        self.supports_jit = _host_call_supports_jit()
        _check_int("k", k, 1, allow_none=False)
        if not isinstance(return_scores, (bool, np.bool_)):
            raise TypeError("ApproximateRetrieval(): `return_scores` must be a bool; "
                            f"received {return_scores!r}")
        if distance_measure not in ("dot_product", "cosine", "squared_l2"):
            raise ValueError("ApproximateRetrieval(): `distance_measure` must be one of "
                             "'dot_product', 'cosine', 'squared_l2'; received "
                             f"{distance_measure!r}")
        self.distance_measure = distance_measure
        self.num_leaves = _check_int("num_leaves", num_leaves, 1)
        self.num_leaves_to_search = _check_int("num_leaves_to_search", num_leaves_to_search, 1)
        self.training_iterations = _check_int("training_iterations", training_iterations, 1,
                                              allow_none=False)
        self.dimensions_per_block = _check_int("dimensions_per_block", dimensions_per_block, 1)
        threshold = anisotropic_quantization_threshold
        if not (isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
                and (math.isnan(threshold) or threshold >= 0)):
            raise (ValueError if isinstance(threshold, numbers.Real) else TypeError)(
                "ApproximateRetrieval(): `anisotropic_quantization_threshold` must be a "
                f"number >= 0 or nan; received {threshold!r}")
        self.anisotropic_quantization_threshold = float(threshold)
        self.reordering_num_neighbors = _check_int("reordering_num_neighbors",
                                                   reordering_num_neighbors, 1)
        self.seed = _check_int("seed", seed, 0, allow_none=False)

        self._candidate_embeddings = None
        self.candidate_ids = None
        self.searcher = None
        self._ids_np: np.ndarray | None = None
        self._dim: int | None = None
        # A keras.Variable given as `candidate_embeddings` (see the property), and the
        # values the searcher was last built from.
        self._linked = None
        self._linked_snapshot: np.ndarray | None = None

        if searcher is not None:
            self._use_searcher(searcher, candidate_embeddings, candidate_ids)
        elif candidate_embeddings is None:
            if candidate_ids is not None:
                raise ValueError(
                    "You cannot provide `candidate_ids` without providing "
                    "`candidate_embeddings`"
                )
        else:
            self.update_candidates(candidate_embeddings, candidate_ids)

    # ------------------------------------------------------------------ candidates
    def update_candidates(self, candidate_embeddings: Any, candidate_ids: Any = None) -> None:
        """Replaces the candidates (and optionally their IDs) and rebuilds the index.

        As in `BruteForceRetrieval`, passing no `candidate_ids` keeps the previous IDs
        (which must then match the new number of candidates).

        Args:
            candidate_embeddings: (n, d) candidate embeddings.
            candidate_ids: (n,) identifiers for the candidates. If `None`, the previous
                identifiers, or the indices of the candidates if there were none.

        Raises:
            ValueError: as the class docstring describes; the layer is left unchanged.
        """
        if candidate_embeddings is None:
            raise ValueError("`candidate_embeddings` is required.")
        ids = None if candidate_ids is None else _ids_array(candidate_ids)
        emb, ids = self._checked_candidates(_embeddings_array(candidate_embeddings), ids)
        searcher = self._build_searcher(emb)
        self._set_state(searcher, emb, ids)

    def _checked_candidates(self, emb: np.ndarray, ids: np.ndarray | None):
        """(n, d) float32 candidates and (n,) int32 ids (None: the current ones), after
        every check."""
        if ids is None:
            ids = self._ids_np
        self._validate_candidate_embeddings_and_ids(emb, ids)
        if ids is not None:
            ids = _check_ids_values(ids)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.size == 0:
            raise ValueError("`candidate_embeddings` must not be empty, received "
                             f"`candidate_embeddings` with shape {emb.shape}")
        if not np.isfinite(emb).all():
            row = int(np.argwhere(~np.isfinite(emb))[0][0])
            raise ValueError("`candidate_embeddings` must be finite, received NaN or inf "
                             f"in row {row}")
        return emb, ids

    @property
    def candidate_embeddings(self):
        """The candidates: a tensor, or the `keras.Variable` assigned here."""
        return self._candidate_embeddings

    @candidate_embeddings.setter
    def candidate_embeddings(self, value) -> None:
        """Assigning a tensor or array is `update_candidates(value)`. Assigning a
        `keras.Variable` links the layer to it, as the Keras-RS tutorials do with
        `BruteForceRetrieval` (``retrieval.candidate_embeddings =
        candidate_embedding.embeddings`` in the model's `build()`): the index is then
        built on the first call and rebuilt whenever the variable's values have changed
        (after `fit()`, say). Each call compares the values with those indexed (one pass
        over the table): for serving, `update_candidates` with the trained values avoids
        that."""
        if not isinstance(value, keras.Variable):
            self.update_candidates(value)
            return
        ids = self._ids_np
        self._validate_candidate_embeddings_and_ids(value, ids)
        if keras.backend.standardize_dtype(value.dtype) not in ("float16", "bfloat16",
                                                                  "float32", "float64"):
            raise ValueError("`candidate_embeddings` must have a float dtype, received a "
                             f"variable of dtype {value.dtype}")
        self._candidate_embeddings = value
        self._linked = value
        self._linked_snapshot = None
        self.searcher = None
        self._dim = int(value.shape[1])
        self.built = True

    def _build_searcher(self, emb: np.ndarray):
        """Builds a searcher over emb (n, d) float32 from the tuning arguments."""
        n, d = emb.shape
        k = min(self.k, n)
        b = mipscan.builder(emb, k, self.distance_measure).set_seed(self.seed)
        num_leaves = self.num_leaves
        if num_leaves is None and n >= _MIN_CANDIDATES_FOR_TREE:
            num_leaves = round(math.sqrt(n))
        if num_leaves is not None and num_leaves > 1:
            num_leaves = min(num_leaves, n)
            to_search = self.num_leaves_to_search
            if to_search is None:
                to_search = math.ceil(_LEAVES_TO_SEARCH_FRACTION * num_leaves)
            b = b.tree(num_leaves=num_leaves, num_leaves_to_search=min(to_search, num_leaves),
                       training_iterations=self.training_iterations)
        if n < _MIN_CANDIDATES_FOR_AH:
            return b.score_brute_force().build()
        dpb = self.dimensions_per_block
        if dpb is None:
            dpb = 1 if d <= _MAX_DIMS_FOR_ONE_PER_BLOCK else 2
        b = b.score_ah(min(dpb, d),
                       anisotropic_quantization_threshold=self.anisotropic_quantization_threshold)
        reorder = self.reordering_num_neighbors
        if reorder is None:
            reorder = max(20 * self.k, 200)
        return b.reorder(min(max(reorder, k), n)).build()

    def _use_searcher(self, searcher: Any, candidate_embeddings: Any, candidate_ids: Any) -> None:
        """Adopts an already built searcher (and optional candidates and ids)."""
        needed = ("search_batched", "search_batched_parallel", "serialize", "size")
        if not all(callable(getattr(searcher, m, None)) for m in needed) \
                or not isinstance(getattr(searcher, "d", None), numbers.Integral):
            raise TypeError("`searcher` must be a mipscan searcher (mipscan.builder(...).build() "
                            f"or mipscan.load_searcher()), received {type(searcher).__name__}")
        n, d = int(searcher.size()), int(searcher.d)
        self.distance_measure = getattr(searcher, "distance_measure", self.distance_measure)
        emb = ids = None
        if candidate_embeddings is not None:
            emb = np.ascontiguousarray(_embeddings_array(candidate_embeddings), dtype=np.float32)
            self._validate_candidate_embeddings_and_ids(emb)
            if emb.shape != (n, d):
                raise ValueError("`candidate_embeddings` must have the shape of the searcher's "
                                 f"database ({n}, {d}), received `candidate_embeddings` with "
                                 f"shape {emb.shape}")
        if candidate_ids is not None:
            ids = _ids_array(candidate_ids)
            if ids.shape[:1] != (n,):
                raise ValueError(f"`candidate_ids` must have one row per candidate of the "
                                 f"searcher ({n}), received `candidate_ids` with shape "
                                 f"{ids.shape}")
            ids = _check_ids_values(ids)
        if n < self.k:
            raise ValueError(
                f"The number of candidates provided ({n}) is less than the number of "
                f"candidates to retrieve (k={self.k})."
            )
        self._set_state(searcher, emb, ids, d=d)

    def _set_state(self, searcher, emb: np.ndarray | None, ids: np.ndarray | None,
                   d: int | None = None) -> None:
        self.searcher = searcher
        self._dim = emb.shape[1] if d is None else d
        self._candidate_embeddings = None if emb is None else keras.ops.convert_to_tensor(emb)
        self._linked = self._linked_snapshot = None
        self.candidate_ids = None if ids is None else keras.ops.convert_to_tensor(ids)
        self._ids_np = ids
        self.built = True

    # ------------------------------------------------------------------ calling
    def _ids_dtype(self) -> str:
        # BruteForceRetrieval returns the candidate ids, which it stores as int32, or
        # keras.ops.top_k's indices.
        return _top_k_index_dtype() if self._ids_np is None else "int32"

    def _scores_dtype(self) -> str:
        # BruteForceRetrieval multiplies the queries (cast to the compute dtype) with its
        # float32 variable, which a mixed policy casts to the compute dtype as well; the
        # search itself is float32.
        policy = self.dtype_policy
        compute = keras.backend.standardize_dtype(policy.compute_dtype)
        if policy.variable_dtype != policy.compute_dtype:
            return compute
        return keras.backend.result_type(compute, "float32")

    def _search(self, queries: np.ndarray, ids_dtype: str):
        """numpy (..., d) float32 -> (scores (..., k) float32, ids (..., k) ids_dtype)."""
        flat = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self._dim)
        shape = queries.shape[:-1] + (self.k,)
        if len(flat) == 0:
            return np.zeros(shape, np.float32), np.zeros(shape, ids_dtype)
        if not np.isfinite(flat).all():
            raise ValueError("ApproximateRetrieval: the queries (`inputs`) must be finite; "
                             "received NaN or inf")
        search = (self.searcher.search_batched_parallel if len(flat) >= _PARALLEL_MIN_QUERIES
                  else self.searcher.search_batched)
        result = search(flat, final_num_neighbors=self.k)
        rows = result.indices.astype(np.int64)
        ids = rows if self._ids_np is None else self._ids_np[rows]
        return (np.asarray(result.distances, np.float32).reshape(shape),
                ids.astype(ids_dtype).reshape(shape))

    def _sync_linked(self, candidates: np.ndarray) -> None:
        """(Re)builds the index if the linked variable's values (``candidates``) differ
        from those it was built from."""
        snapshot = self._linked_snapshot
        if snapshot is None or snapshot.shape != candidates.shape \
                or not np.array_equal(snapshot, candidates):
            # An owned copy: the searcher keeps a reference to the array it is built from.
            emb, _ = self._checked_candidates(np.array(candidates, np.float32), None)
            self.searcher = self._build_searcher(emb)
            self._linked_snapshot = emb

    def _search_linked(self, queries: np.ndarray, candidates: np.ndarray, ids_dtype: str):
        self._sync_linked(candidates)
        return self._search(queries, ids_dtype)

    def call(self, inputs: Any) -> Any:
        """Returns the top candidates for the queries passed as input.

        Args:
            inputs: (..., d) query embeddings (usually (batch, d)).

        Returns:
            `(top_scores, top_ids)`, each (..., k), if `return_scores` is True (scores
            highest first; float32, or the compute dtype under a mixed dtype policy,
            as `BruteForceRetrieval`), otherwise `top_ids` alone.
        """
        if self.searcher is None and self._linked is None:
            raise ValueError("ApproximateRetrieval has no candidates: pass "
                             "`candidate_embeddings` (or `searcher`) to the constructor or "
                             "call `update_candidates()` first")
        self._check_query_shape(inputs.shape)
        queries = inputs
        if keras.backend.standardize_dtype(inputs.dtype) != "float32":
            queries = keras.ops.cast(inputs, "float32")
        out_shape = tuple(inputs.shape[:-1]) + (self.k,)
        ids_dtype = self._ids_dtype()  # fixed when traced, so passed to the callback
        if self._linked is None:
            fn, operands = functools.partial(self._search, ids_dtype=ids_dtype), (queries,)
        else:
            # The variable's current values (the traced state inside compiled functions).
            candidates = keras.ops.cast(keras.ops.convert_to_tensor(self._linked), "float32")
            fn = functools.partial(self._search_linked, ids_dtype=ids_dtype)
            operands = (queries, candidates)
        top_scores, top_ids = _host_call(fn, operands, ("float32", ids_dtype), out_shape)
        if self._scores_dtype() != "float32":
            top_scores = keras.ops.cast(top_scores, self._scores_dtype())
        if self.return_scores:
            return top_scores, top_ids
        return top_ids

    def _check_query_shape(self, shape) -> None:
        if len(shape) < 1:
            raise ValueError("ApproximateRetrieval: `inputs` must have rank >= 1 "
                             f"(..., embedding_size), received `inputs` with shape {shape}")
        if shape[-1] is not None and self._dim is not None and shape[-1] != self._dim:
            raise ValueError(f"ApproximateRetrieval: `inputs` has {shape[-1]} features, but the "
                             f"candidates have {self._dim} features")

    def compute_output_spec(self, inputs: Any) -> Any:
        """Output spec for symbolic inputs, without running a search (the searcher
        cannot take symbolic or meta tensors)."""
        self._check_query_shape(inputs.shape)
        shape = tuple(inputs.shape[:-1]) + (self.k,)
        ids = keras.KerasTensor(shape, dtype=self._ids_dtype())
        if self.return_scores:
            return keras.KerasTensor(shape, dtype=self._scores_dtype()), ids
        return ids

    # ------------------------------------------------------------------ saving
    def get_config(self) -> dict[str, Any]:
        # keras_rs.layers.Retrieval.get_config stores `self.compute_score` under
        # "return_scores"; skip it and store every argument ourselves.
        config: dict[str, Any] = keras.layers.Layer.get_config(self)
        config.update({
            "k": self.k,
            "return_scores": self.return_scores,
            "distance_measure": self.distance_measure,
            "num_leaves": self.num_leaves,
            "num_leaves_to_search": self.num_leaves_to_search,
            "training_iterations": self.training_iterations,
            "dimensions_per_block": self.dimensions_per_block,
            "anisotropic_quantization_threshold": self.anisotropic_quantization_threshold,
            "reordering_num_neighbors": self.reordering_num_neighbors,
            "seed": self.seed,
        })
        return config

    def save_assets(self, dir_path: str) -> None:
        """Keras saving hook: writes the index folder and the candidates."""
        emb = self._candidate_embeddings
        if self._linked is not None:  # save an index of the variable's current values
            self._sync_linked(keras.ops.convert_to_numpy(self._linked))
            emb = self._linked_snapshot
        if self.searcher is None:
            return
        self.searcher.serialize(os.path.join(dir_path, _SEARCHER_DIR))
        if emb is not None:
            np.save(os.path.join(dir_path, _EMBEDDINGS_FILE), keras.ops.convert_to_numpy(emb))
        if self._ids_np is not None:
            np.save(os.path.join(dir_path, _IDS_FILE), self._ids_np)

    def load_assets(self, dir_path: str) -> None:
        """Keras loading hook: restores what :meth:`save_assets` wrote."""
        folder = os.path.join(dir_path, _SEARCHER_DIR)
        if not os.path.isdir(folder):
            return
        # Keras deletes the extracted assets after loading: read the arrays into memory.
        searcher = mipscan.load_searcher(folder, mmap=False)
        path = os.path.join(dir_path, _EMBEDDINGS_FILE)
        emb = np.load(path) if os.path.isfile(path) else None
        path = os.path.join(dir_path, _IDS_FILE)
        ids = np.load(path) if os.path.isfile(path) else None
        if self._linked is not None:
            # Linked again by the model's build(): keep following the variable, starting
            # from the saved index of the values it was saved with.
            self.searcher, self._linked_snapshot, self._ids_np = searcher, emb, ids
            self.candidate_ids = None if ids is None else keras.ops.convert_to_tensor(ids)
            return
        self._set_state(searcher, emb, ids, d=int(searcher.d))
