"""Keras-RS retrieval layer backed by a mipscan index.

``ApproximateRetrieval`` is a drop-in for ``keras_rs.layers.BruteForceRetrieval``: same
constructor arguments, attributes, ``update_candidates()``, outputs ``(scores, ids)`` (or
``ids`` alone), shapes and dtypes. It answers with a mipscan searcher (k-means tree,
anisotropic AH, exact reorder) instead of scoring every candidate.

It runs on the JAX, TensorFlow and PyTorch backends, eagerly and inside compiled
functions: under ``jax.jit`` the search is a ``jax.pure_callback``, under ``tf.function``
a ``tf.numpy_function``; PyTorch runs eagerly. Every backend branch lives in
:func:`_host_call` and the helpers after it.

State: everything the layer searches with (searcher, ids, embeddings, dimension, the
linked variable) is one immutable :class:`_Snapshot`, replaced by a single assignment and
read once per call, so a call racing ``update_candidates`` uses the old or the new
candidates, never a mix. No index is ever built inside a traced function or a host
callback (``jax.pure_callback`` may skip or repeat its calls): only eagerly.

This module imports Keras and Keras-RS (the ``recsys`` extra); ``import mipscan`` does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import numbers
import os
import warnings
from typing import Any

import numpy as np

import mipscan
from mipscan.recsys._extras import reraise

try:
    import keras
    import keras_rs
except ImportError as _exc:  # one line naming the extra, not the import's traceback
    raise reraise("mipscan.keras", _exc) from None

__all__ = ["ApproximateRetrieval", "pad_ids"]

# A size at which mipscan.suggest_config always proposes a tree, AH and a reorder: asked
# for its share of leaves searched and its reorder depth when the layer's own arguments
# call for a stage the suggestion for the real n lacks (say num_leaves on 5,000 points).
_POLICY_PROBE_N = 1_000_000
# Batches at least this large go to search_batched_parallel (the searcher's threads);
# smaller ones to search_batched, whose single thread avoids the pool's hand-off cost.
_PARALLEL_MIN_QUERIES = 64

# The assets of a saved layer (inside the .keras file).
_SEARCHER_DIR = "searcher"
_MANIFEST_FILE = "retrieval.json"
_EMBEDDINGS_FILE = "candidate_embeddings.npy"
_IDS_FILE = "candidate_ids.npy"
_ASSETS_FORMAT = "mipscan-keras-retrieval"
_ASSETS_VERSION = 1


# ---------------------------------------------------------------- backends
def _is_traced(xs: tuple) -> bool:
    """Whether any of the backend tensors ``xs`` is symbolic (a JAX tracer, or a
    TensorFlow graph tensor): the values are then only known inside a host callback."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return any(isinstance(x, jax.core.Tracer) for x in xs)
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return False


def _host_call(fn, xs: tuple, out_dtypes: tuple[str, ...], out_shape: tuple):
    """Runs ``fn`` (numpy arrays in, tuple of numpy arrays out) on the host for backend
    tensors ``xs`` (float32) and returns backend tensors of ``out_dtypes``, each of
    ``out_shape`` (None for a dimension only known at run time).

    With the helpers around it, the only per-backend code: JAX traces become a
    ``jax.pure_callback``, TensorFlow graphs a ``tf.numpy_function``; eager tensors of
    every backend go through numpy directly. ``fn`` must be a pure function of its
    inputs and the layer's current snapshot: a callback may be skipped or repeated.
    """
    backend = keras.backend.backend()
    if _is_traced(xs):
        if backend == "jax":
            import jax

            specs = tuple(jax.ShapeDtypeStruct(out_shape, dt) for dt in out_dtypes)
            # One call for a vmapped batch of queries; with candidates as a second
            # operand, which vmap must not batch, one call per element.
            method = "broadcast_all" if len(xs) == 1 else "sequential"
            return jax.pure_callback(fn, specs, *xs, vmap_method=method)
        import tensorflow as tf

        # stateful: the results depend on the layer's candidates, not only on x.
        outs = tf.numpy_function(fn, list(xs), list(out_dtypes), stateful=True)
        for out in outs:
            out.set_shape(out_shape)
        return tuple(outs)
    outs = fn(*(_to_numpy("inputs", x) for x in xs))
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
    when it has no candidate ids: torch.topk gives int64, JAX and TensorFlow int32. Both
    are what the backend's gather (``keras.ops.take``, ``tf.gather``, ``torch.index_select``)
    accepts; mipscan's own uint32 rows are not (TensorFlow refuses them)."""
    return "int64" if keras.backend.backend() == "torch" else "int32"


# ---------------------------------------------------------------- arrays
def _to_numpy(name: str, x: Any) -> np.ndarray:
    """Any tensor or array-like as a numpy array; ValueError naming the argument if it
    cannot be converted. Tensors that require grad are detached (the search is not
    differentiable), not refused."""
    if isinstance(x, np.ndarray):
        return x
    try:
        if isinstance(x, (list, tuple)):
            arr = np.asarray(x)
        else:
            detach = getattr(x, "detach", None)  # torch tensors (requires_grad or not)
            if callable(detach) and type(x).__module__.startswith("torch"):
                x = detach().cpu()
            arr = keras.ops.convert_to_numpy(x)
    except Exception as exc:  # backend-specific conversion errors
        raise ValueError(f"`{name}` could not be converted to an array: {exc}") from None
    if arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def _owned(arr: np.ndarray, dtype) -> np.ndarray:
    """A read-only copy that nothing else references (the caller may change ``arr``)."""
    out = np.array(arr, dtype=dtype, order="C", copy=True)
    out.setflags(write=False)
    return out


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
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))]
        raise ValueError("`candidate_ids` must hold whole numbers; received float "
                         f"`candidate_ids` such as {bad[:3].tolist()}")
    return arr


def _check_ids_values(ids: np.ndarray) -> np.ndarray:
    """int32 ids (the dtype BruteForceRetrieval stores them in), checked to fit; an
    owned, read-only copy."""
    if ids.ndim != 1:
        raise ValueError("`candidate_ids` must be a tensor of rank 1 (num_candidates,), "
                         f"received `candidate_ids` with shape {ids.shape}")
    info = np.iinfo(np.int32)
    if ids.size and (ids.min() < info.min or ids.max() > info.max):
        raise ValueError(f"`candidate_ids` must fit in int32 [{info.min}, {info.max}], "
                         f"received values in [{ids.min()}, {ids.max()}]")
    return _owned(ids, np.int32)


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


def _searcher_rows(searcher: Any, n: int, d: int) -> np.ndarray | None:
    """The (n, d) float32 candidates as a searcher keeps them, if it does: its exact
    reorder rows (AH indexes), or its scored rows put back in row order (exact
    indexes); for dot product and squared L2 their first d columns are the candidates
    themselves (cosine keeps normalised rows). A saved layer then need not store the
    candidates a second time. Read through the searcher's pickle state, its public view
    of its arrays; None when no such rows are there."""
    try:
        arrays = searcher.__getstate__()["arrays"]
    except Exception:  # not a mipscan Searcher, or one that keeps no arrays
        return None
    if not isinstance(arrays, dict):
        return None

    def usable(rows, num_rows):
        return isinstance(rows, np.ndarray) and rows.dtype == np.float32 and rows.ndim == 2 \
            and rows.shape[0] == num_rows and rows.shape[1] >= d

    rows = arrays.get("reorder_rows")
    if usable(rows, n):
        return rows[:, :d]
    rows, slots = arrays.get("slot_rows"), arrays.get("slot_ids")
    if isinstance(slots, np.ndarray) and slots.ndim == 1 and slots.dtype.kind in "iu" \
            and usable(rows, len(slots)) and len(slots) >= n and slots.size \
            and int(slots.max()) < n and np.unique(slots).size == n:
        out = np.empty((n, d), np.float32)
        out[slots] = rows[:, :d]
        return out
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class _Snapshot:
    """Everything a search reads, replaced as a whole (never changed in place).

    ``searcher`` is None only in linked mode before the first (eager) build;
    ``embeddings`` are the (n, d) float32 values the searcher was built from (read-only,
    owned) or None when a ``searcher=`` came without them; ``ids`` the (n,) int32 ids
    (read-only, owned) or None; ``linked`` the ``keras.Variable`` the layer follows;
    ``updatable``: the searcher's docids are the ids (the row numbers when ids is None),
    so ``update_candidates`` may apply a difference to it in place."""

    searcher: Any
    dim: int
    embeddings: np.ndarray | None
    ids: np.ndarray | None
    linked: Any = None
    updatable: bool = False


@keras.saving.register_keras_serializable(package="mipscan")
class ApproximateRetrieval(keras_rs.layers.Retrieval):
    """Approximate top-k retrieval with a mipscan index (ScaNN's algorithm).

    Same contract as ``keras_rs.layers.BruteForceRetrieval``: it keeps a set of
    candidates and returns, for each query, the top ``k`` candidates by score, sorted
    highest first, as ``(top_scores, top_ids)`` (or ``top_ids`` when
    ``return_scores=False``). The scores are the exact scores of the returned
    candidates (the index reorders its approximate hits exactly); which candidates are
    returned is approximate above 10,000 candidates (exact below).

    The index is built when candidates are given (in the constructor or by
    ``update_candidates``), from ``mipscan.suggest_config`` (the policy ``autopilot()``
    and the CLI use too) with any tuning argument below that is not ``None`` taking
    precedence. Or pass an already built ``searcher`` (``mipscan.builder(...).build()``
    or ``mipscan.load_searcher(...)``). The layer keeps its own copy of the candidates
    and ids: changing the arrays passed in afterwards does not change its results.

    Unlike ``BruteForceRetrieval``, ``model.save()`` keeps the candidates: the index,
    the ids and (unless the index already holds them) the embeddings are written once
    as assets of the ``.keras`` file, with a manifest of their shapes and sha256;
    ``keras.models.load_model()`` checks them (a damaged or mismatched file raises
    ValueError naming the file and the field) and restores a layer that gives identical
    results, on any backend. ``get_config()`` holds the arguments, not the candidates.

    As with ``BruteForceRetrieval`` in the Keras-RS tutorials, a model's ``build()`` may
    link the layer to its candidate tower's variable (``self.retrieval.candidate_embeddings
    = self.candidate_embedding.embeddings``); see the ``candidate_embeddings`` property
    for when the index follows the variable.

    Other differences: otherwise ``candidate_embeddings`` and ``candidate_ids`` are
    read-only tensors, not ``keras.Variable``s (change them with ``update_candidates``,
    which updates or rebuilds the index), and ``update_candidates`` may add ids to candidates that
    had none. The search runs on the host, outside autodiff: the outputs carry no
    gradient (a retrieval layer serves; training uses the exact scores), and query
    tensors that require grad are detached.

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
        num_leaves: k-means leaves of the tree; `None`: as `suggest_config` (no tree
            below 10,000 candidates, `round(sqrt(n))` above). Clamped to `n`; 1 means
            no tree.
        num_leaves_to_search: leaves searched per query; `None`: as `suggest_config`
            (for its default target, a third of the leaves at d <= 64, a quarter
            above). Clamped to the number
            of leaves.
        training_iterations: k-means iterations of the tree.
        dimensions_per_block: dimensions per 4-bit AH code; `None`: as
            `suggest_config` (exact scoring below 10,000 candidates, else 1 at
            d <= 64 and 2 above). Given, it
            selects AH at any size. Clamped to `d`.
        anisotropic_quantization_threshold: AH's anisotropic threshold T (NaN turns
            the anisotropic weighting off); `None`: as `suggest_config` (0.2).
        reordering_num_neighbors: approximate hits rescored exactly per query (with
            AH); `None`: as `suggest_config` (for its default target and k = 10, 150
            at d <= 64 and 500 above; scaled by k / 10). Clamped to `[k, n]`.
        seed: seed of the index training (k-means and codebooks).
        target_recall: the recall@10 `suggest_config` aims at when choosing the share of
            leaves searched and the reorder depth; `None`: its default (0.95).
        **kwargs: Args to pass to the base class.

    Raises:
        ValueError: the errors of `BruteForceRetrieval`, with the same messages (rank
            of `candidate_embeddings`, fewer candidates than `k`, `candidate_ids` of
            the wrong length or without `candidate_embeddings`); also an unusable
            dtype of `candidate_embeddings` or `candidate_ids`, NaN/inf candidates,
            NaN/inf queries (see `call`), queries whose last dimension differs from the
            candidates', and a call before any candidates were given. Checked in the
            constructor, `update_candidates` and `call`.
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
        anisotropic_quantization_threshold: float | None = None,
        reordering_num_neighbors: int | None = None,
        seed: int = 0,
        target_recall: float | None = None,
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
        if threshold is not None:
            if not (isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
                    and (math.isnan(threshold) or threshold >= 0)):
                raise (ValueError if isinstance(threshold, numbers.Real) else TypeError)(
                    "ApproximateRetrieval(): `anisotropic_quantization_threshold` must be a "
                    f"number >= 0, nan or None; received {threshold!r}")
            threshold = float(threshold)
        self.anisotropic_quantization_threshold = threshold
        self.reordering_num_neighbors = _check_int("reordering_num_neighbors",
                                                   reordering_num_neighbors, 1)
        self.seed = _check_int("seed", seed, 0, allow_none=False)
        if target_recall is not None:
            if not isinstance(target_recall, numbers.Real) or isinstance(target_recall, bool):
                raise TypeError("ApproximateRetrieval(): `target_recall` must be a number in "
                                f"(0, 1] or None; received {target_recall!r}")
            if not 0 < target_recall <= 1:
                raise ValueError("ApproximateRetrieval(): `target_recall` must be a number in "
                                 f"(0, 1] or None; received {target_recall!r}")
            target_recall = float(target_recall)
        self.target_recall = target_recall

        self._state: _Snapshot | None = None

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

    # ------------------------------------------------------------------ state
    def _publish(self, state: _Snapshot) -> None:
        """The single assignment that replaces what searches read."""
        self._state = state
        self.built = True

    @property
    def searcher(self):
        """The mipscan searcher answering the queries (None before any candidates)."""
        state = self._state
        return None if state is None else state.searcher

    @property
    def candidate_ids(self):
        """The (n,) int32 candidate ids as a tensor, or None."""
        state = self._state
        if state is None or state.ids is None:
            return None
        return keras.ops.convert_to_tensor(state.ids)

    @property
    def candidate_embeddings(self):
        """The candidates: a tensor (a copy the layer owns), or the `keras.Variable`
        assigned here."""
        state = self._state
        if state is None:
            return None
        if state.linked is not None:
            return state.linked
        return None if state.embeddings is None else keras.ops.convert_to_tensor(state.embeddings)

    @candidate_embeddings.setter
    def candidate_embeddings(self, value) -> None:
        """Assigning a tensor or array is `update_candidates(value)`. Assigning a
        `keras.Variable` links the layer to it, as the Keras-RS tutorials do with
        `BruteForceRetrieval` (``retrieval.candidate_embeddings =
        candidate_embedding.embeddings`` in the model's `build()`).

        The index is (re)built from the variable's values eagerly only: on an eager call
        of the layer whose variable values differ from those indexed, on
        ``update_candidates(variable)``, and when the model is saved. A compiled call
        (``model.predict`` on JAX and TensorFlow, ``jax.jit``, ``tf.function``) never
        builds: if the values it receives differ from those indexed (after ``fit()``,
        say), it scores them exactly (brute force, correct but slower) and warns; call
        ``retrieval.update_candidates(retrieval.candidate_embeddings)`` after training
        to index the trained values. Each call compares the values with those indexed
        (one pass over the table)."""
        if not isinstance(value, keras.Variable):
            self.update_candidates(value)
            return
        state = self._state
        ids = None if state is None else state.ids
        self._validate_candidate_embeddings_and_ids(value, ids)
        if keras.backend.standardize_dtype(value.dtype) not in ("float16", "bfloat16",
                                                                  "float32", "float64"):
            raise ValueError("`candidate_embeddings` must have a float dtype, received a "
                             f"variable of dtype {value.dtype}")
        self._publish(_Snapshot(None, int(value.shape[1]), None, ids, linked=value))

    # ------------------------------------------------------------------ candidates
    def update_candidates(self, candidate_embeddings: Any, candidate_ids: Any = None) -> None:
        """Replaces the candidates (and optionally their IDs) and updates the index.

        As in `BruteForceRetrieval`, passing no `candidate_ids` keeps the previous IDs
        (which must then match the new number of candidates). The layer copies both:
        later changes to the arrays passed do not reach it. Passing the `keras.Variable`
        the layer is linked to indexes its current values and keeps the link; any other
        value unlinks the layer.

        When the new ids overlap the current ones (row numbers for a layer without ids,
        as a linked layer usually is) and some candidate is unchanged, the difference is
        applied to the same index in one atomic ``Searcher.update`` (new and changed
        candidates upserted, dropped ones deleted), in linked mode too (also when an
        eager call finds the variable's values changed); otherwise the index is rebuilt.
        Changed candidates are encoded against the existing tree: after large drift,
        ``searcher.rebalance()`` retrains it.

        Args:
            candidate_embeddings: (n, d) candidate embeddings.
            candidate_ids: (n,) identifiers for the candidates. If `None`, the previous
                identifiers, or the indices of the candidates if there were none.

        Raises:
            ValueError: as the class docstring describes; the layer is left unchanged.
        """
        if candidate_embeddings is None:
            raise ValueError("`candidate_embeddings` is required.")
        state = self._state
        linked = None
        if state is not None and state.linked is not None \
                and candidate_embeddings is state.linked:
            linked = state.linked
            candidate_embeddings = _to_numpy("candidate_embeddings", linked.value)
        ids = None if candidate_ids is None else _ids_array(candidate_ids)
        emb, ids = self._checked_candidates(_embeddings_array(candidate_embeddings), ids)
        if self._update_in_place(state, emb, ids, linked):
            return
        searcher = self._build_searcher(emb, ids)
        self._publish(_Snapshot(searcher, emb.shape[1], emb, ids, linked=linked,
                                updatable=searcher.has_docids))

    def _update_in_place(self, state: _Snapshot | None, emb: np.ndarray,
                         ids: np.ndarray | None, linked: Any) -> bool:
        """When the new candidate ids overlap the current ones (row numbers for a layer
        without ids, as when it follows a linked variable), applies the difference to the
        current index (one atomic ``Searcher.update``: upsert the new and changed
        candidates, delete the dropped ones) instead of rebuilding, and publishes the new
        snapshot (following ``linked``, or None). False (nothing done) when it does not
        apply: ids given where there were none (or the reverse), ids not unique, no
        overlap, no candidate left unchanged (a rebuild then costs no more and retrains
        the tree), another dimension, a searcher whose docids are not the ids, or a
        candidate count for which the layer would build another kind of index (brute
        force vs tree)."""
        if (state is None or not state.updatable or state.embeddings is None
                or state.embeddings.shape[1] != emb.shape[1] or (ids is None) != (state.ids is None)):
            return False
        old = np.arange(len(state.embeddings)) if state.ids is None else state.ids
        new = np.arange(len(emb)) if ids is None else ids
        if len(np.unique(new)) != len(new):
            return False
        old_pos = {int(v): i for i, v in enumerate(old.tolist())}
        new_ids = new.tolist()
        at = np.array([old_pos.get(v, -1) for v in new_ids], np.int64)
        kept = at >= 0
        if not kept.any():
            return False
        kinds = {"tree", "score_ah", "score_brute_force", "reorder"}
        current = set(state.searcher.config) & kinds
        if set(self.index_config(*emb.shape)) & kinds != current:
            return False
        changed = ~kept
        changed[kept] = np.any(state.embeddings[at[kept]] != emb[kept], axis=1)
        if changed.all():
            return False
        gone = np.ones(len(old), bool)
        gone[at[kept]] = False
        changed = np.flatnonzero(changed)
        state.searcher.update([new_ids[i] for i in changed], emb[changed],
                              delete=old[gone].tolist())
        self._publish(_Snapshot(state.searcher, emb.shape[1], emb, ids, linked=linked,
                                updatable=True))
        return True

    def _checked_candidates(self, emb: np.ndarray, ids: np.ndarray | None):
        """Owned, read-only (n, d) float32 candidates and (n,) int32 ids (None: the
        current ones), after every check."""
        if ids is None:
            state = self._state
            ids = None if state is None else state.ids
        self._validate_candidate_embeddings_and_ids(emb, ids)
        if ids is not None:
            ids = _check_ids_values(ids)
        emb = _owned(emb, np.float32)
        if emb.size == 0:
            raise ValueError("`candidate_embeddings` must not be empty, received "
                             f"`candidate_embeddings` with shape {emb.shape}")
        if not np.isfinite(emb).all():
            row = int(np.argwhere(~np.isfinite(emb))[0][0])
            raise ValueError("`candidate_embeddings` must be finite, received NaN or inf "
                             f"in row {row}")
        return emb, ids

    def index_config(self, n: int, d: int) -> dict:
        """The builder stages (stage -> arguments) this layer builds for ``n``
        candidates of ``d`` dimensions: ``mipscan.suggest_config(n, d, k,
        target_recall=...)`` with the layer's explicit tuning arguments taking
        precedence (and clamped to n and d)."""
        k = min(self.k, n)
        policy = dict(k=k, distance_measure=self.distance_measure)
        if self.target_recall is not None:
            policy["target_recall"] = self.target_recall
        suggested = mipscan.suggest_config(n, d, **policy)
        # The policy's choices where the suggestion for n has no such stage.
        probe = mipscan.suggest_config(max(n, _POLICY_PROBE_N), d, **policy)
        config: dict = {}
        tree = suggested.get("tree")
        if self.num_leaves is not None:
            leaves = min(self.num_leaves, n)
            share = probe["tree"]["num_leaves_to_search"] / probe["tree"]["num_leaves"]
            tree = None if leaves <= 1 else {
                "num_leaves": leaves, "num_leaves_to_search": max(1, math.ceil(share * leaves))}
        if tree is not None:
            to_search = tree["num_leaves_to_search"]
            if self.num_leaves_to_search is not None:
                to_search = self.num_leaves_to_search
            config["tree"] = {"num_leaves": tree["num_leaves"],
                              "num_leaves_to_search": min(to_search, tree["num_leaves"]),
                              "training_iterations": self.training_iterations}
        ah = suggested.get("score_ah")
        if ah is None and self.dimensions_per_block is None:
            config["score_brute_force"] = dict(suggested.get("score_brute_force", {}))
            return config
        ah = dict(ah or probe["score_ah"])
        if self.dimensions_per_block is not None:
            ah["dimensions_per_block"] = self.dimensions_per_block
        ah["dimensions_per_block"] = min(ah["dimensions_per_block"], d)
        if self.anisotropic_quantization_threshold is not None:
            ah["anisotropic_quantization_threshold"] = self.anisotropic_quantization_threshold
        config["score_ah"] = ah
        reorder = self.reordering_num_neighbors
        if reorder is None:
            reorder = suggested.get("reorder", probe["reorder"])["reordering_num_neighbors"]
        config["reorder"] = {"reordering_num_neighbors": min(max(reorder, k), n)}
        return config

    def _build_searcher(self, emb: np.ndarray, ids: np.ndarray | None = None):
        """Builds a searcher over emb (n, d), an owned read-only float32 array (so the
        index may share it: build(copy=False)). Unique ids become the index's docids
        (its results are then the ids, and update_candidates can update it in place)."""
        n, d = emb.shape
        b = mipscan.builder(emb, min(self.k, n), self.distance_measure).set_seed(self.seed)
        for stage, kwargs in self.index_config(n, d).items():
            b = getattr(b, stage)(**kwargs)
        docids = list(range(n)) if ids is None else None  # rows: updatable in place
        if ids is not None and len(np.unique(ids)) == len(ids):
            docids = ids.tolist()
        return b.build(copy=False, docids=docids)

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
            emb = _owned(_embeddings_array(candidate_embeddings), np.float32)
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
        self._publish(_Snapshot(searcher, d, emb, ids, updatable=_docids_are(searcher, ids, emb)))

    # ------------------------------------------------------------------ calling
    def _ids_dtype(self) -> str:
        # BruteForceRetrieval returns the candidate ids, which it stores as int32, or
        # keras.ops.top_k's indices.
        state = self._state
        return _top_k_index_dtype() if state is None or state.ids is None else "int32"

    def _scores_dtype(self) -> str:
        # BruteForceRetrieval multiplies the queries (cast to the compute dtype) with its
        # float32 variable, which a mixed policy casts to the compute dtype as well; the
        # search itself is float32.
        policy = self.dtype_policy
        compute = keras.backend.standardize_dtype(policy.compute_dtype)
        if policy.variable_dtype != policy.compute_dtype:
            return compute
        return keras.backend.result_type(compute, "float32")

    def _flat_queries(self, queries: np.ndarray, dim: int) -> np.ndarray:
        flat = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, dim)
        if not np.isfinite(flat).all():
            row = int(np.argwhere(~np.isfinite(flat))[0][0])
            raise ValueError("ApproximateRetrieval: the queries (`inputs`) must be finite; "
                             f"received NaN or inf in query {row}")
        return flat

    def _search(self, queries: np.ndarray, ids_dtype: str, state: _Snapshot | None = None):
        """numpy (..., d) float32 -> (scores (..., k) float32, ids (..., k) ids_dtype),
        with one snapshot (the current one unless given) for the searcher and the ids."""
        state = self._state if state is None else state
        shape = queries.shape[:-1] + (self.k,)
        flat = self._flat_queries(queries, state.dim)
        if len(flat) == 0:
            return np.zeros(shape, np.float32), np.zeros(shape, ids_dtype)
        searcher = state.searcher
        search = (searcher.search_batched_parallel if len(flat) >= _PARALLEL_MIN_QUERIES
                  else searcher.search_batched)
        result = search(flat, final_num_neighbors=self.k)
        rows = result.indices.astype(np.int64)
        if getattr(searcher, "has_docids", False):
            ids = rows  # a searcher with docids returns the ids themselves
        else:
            ids = rows if state.ids is None else state.ids[rows]
        return (np.asarray(result.distances, np.float32).reshape(shape),
                ids.astype(ids_dtype).reshape(shape))

    def _search_linked(self, queries: np.ndarray, candidates: np.ndarray, ids_dtype: str):
        """The host callback of a compiled call in linked mode: searches the index if it
        was built from exactly ``candidates``, else scores ``candidates`` exactly. Never
        builds and never changes the layer (a pure function of its inputs and the
        current snapshot)."""
        state = self._state
        indexed = state.embeddings
        if state.searcher is not None and indexed is not None \
                and indexed.shape == candidates.shape and np.array_equal(indexed, candidates):
            return self._search(queries, ids_dtype, state)
        warnings.warn(
            "ApproximateRetrieval: the linked candidate embeddings differ from the indexed "
            "ones (trained since?) and a compiled call cannot rebuild the index: scoring "
            "them exactly instead. Call `update_candidates(layer.candidate_embeddings)` "
            "after training to index the new values.", RuntimeWarning, stacklevel=2)
        return self._exact(queries, np.asarray(candidates, np.float32), state.ids, ids_dtype)

    def _exact(self, queries: np.ndarray, candidates: np.ndarray, ids, ids_dtype: str):
        shape = queries.shape[:-1] + (self.k,)
        flat = self._flat_queries(queries, candidates.shape[1])
        if len(flat) == 0:
            return np.zeros(shape, np.float32), np.zeros(shape, ids_dtype)
        if not np.isfinite(candidates).all():
            raise ValueError("ApproximateRetrieval: the linked `candidate_embeddings` must be "
                             "finite; received NaN or inf")
        result = mipscan.brute_force(np.ascontiguousarray(candidates), flat, self.k,
                                     self.distance_measure)
        rows = result.indices.astype(np.int64)
        if ids is not None and len(ids) != len(candidates):
            raise ValueError(f"ApproximateRetrieval: the linked `candidate_embeddings` have "
                             f"{len(candidates)} rows but `candidate_ids` {len(ids)}")
        out = rows if ids is None else ids[rows]
        return (np.asarray(result.distances, np.float32).reshape(shape),
                out.astype(ids_dtype).reshape(shape))

    def _sync_linked(self, state: _Snapshot, values: np.ndarray) -> _Snapshot:
        """Eagerly: (re)builds the index if the linked variable's ``values`` differ from
        those indexed, and publishes the new snapshot. Returns the snapshot to use."""
        if state.searcher is not None and state.embeddings is not None \
                and state.embeddings.shape == values.shape \
                and np.array_equal(state.embeddings, values):
            return state
        emb, ids = self._checked_candidates(values, state.ids)
        if self._update_in_place(state, emb, ids, state.linked):
            return self._state
        searcher = self._build_searcher(emb, ids)
        new = _Snapshot(searcher, emb.shape[1], emb, ids, linked=state.linked,
                        updatable=searcher.has_docids)
        self._publish(new)
        return new

    def call(self, inputs: Any, excluded_ids: Any = None) -> Any:
        """Returns the top candidates for the queries passed as input.

        Args:
            inputs: (..., d) query embeddings (usually (batch, d)). Tensors that require
                grad are detached.
            excluded_ids: optional (..., m) integer ids that each query must not get
                back ("never recommend what the user already rated"): candidate ids
                when the layer has ``candidate_ids``, else candidate row indices; rows
                padded with -1 (any negative value is ignored, and so is an id that is
                not a candidate). :func:`mipscan.keras.pad_ids` makes the tensor from
                ragged lists. The exclusion runs inside the searcher (filtered-out
                candidates never take a slot), so each query still gets k results when
                k candidates remain; a query with fewer gets its remaining ones, then
                id -1 and score -inf. Not supported in linked mode inside a compiled
                function.

        Returns:
            `(top_scores, top_ids)`, each (..., k), if `return_scores` is True (scores
            highest first; float32, or the compute dtype under a mixed dtype policy,
            as `BruteForceRetrieval`), otherwise `top_ids` alone. The ids are int32
            (the candidate ids, as `BruteForceRetrieval` stores them), or the row
            indices in `keras.ops.top_k`'s dtype (int64 on PyTorch, int32 elsewhere):
            what each backend's gather accepts.

        Raises:
            ValueError: NaN or inf in `inputs`, a wrong last dimension, or no candidates.
                Inside a compiled function the NaN check runs in the host callback: JAX
                then raises its own runtime error (``JaxRuntimeError``) and TensorFlow an
                ``InvalidArgumentError``, whose message carries this ValueError's text
                ("the queries (`inputs`) must be finite").
        """
        state = self._state
        if state is None:
            raise ValueError("ApproximateRetrieval has no candidates: pass "
                             "`candidate_embeddings` (or `searcher`) to the constructor or "
                             "call `update_candidates()` first")
        self._check_query_shape(inputs.shape, state.dim)
        if excluded_ids is not None:
            return self._call_excluding(inputs, excluded_ids, state)
        queries = inputs
        if keras.backend.standardize_dtype(inputs.dtype) != "float32":
            queries = keras.ops.cast(inputs, "float32")
        out_shape = tuple(inputs.shape[:-1]) + (self.k,)
        ids_dtype = self._ids_dtype()  # fixed when traced, so passed to the callback
        operands: tuple = (queries,)
        fn = functools.partial(self._search, ids_dtype=ids_dtype)
        if state.linked is not None:
            # The variable's current values (the traced state inside compiled functions).
            candidates = keras.ops.cast(keras.ops.convert_to_tensor(state.linked), "float32")
            if _is_traced((queries, candidates)):
                fn = functools.partial(self._search_linked, ids_dtype=ids_dtype)
                operands = (queries, candidates)
            else:  # eager: rebuild here, outside any callback, if the values changed
                state = self._sync_linked(state, _to_numpy("candidate_embeddings", candidates))
                fn = functools.partial(self._search, ids_dtype=ids_dtype, state=state)
        elif not _is_traced(operands):
            fn = functools.partial(self._search, ids_dtype=ids_dtype, state=state)
        return self._outputs(*_host_call(fn, operands, ("float32", ids_dtype), out_shape))

    def _outputs(self, top_scores: Any, top_ids: Any) -> Any:
        """The layer's outputs from the host call's: scores in the layer's dtype, returned
        beside the ids or not (``return_scores``)."""
        if self._scores_dtype() != "float32":
            top_scores = keras.ops.cast(top_scores, self._scores_dtype())
        if self.return_scores:
            return top_scores, top_ids
        return top_ids

    def _call_excluding(self, inputs: Any, excluded_ids: Any, state: _Snapshot) -> Any:
        """call() with excluded_ids: the ids tensor is a second host-call operand."""
        if isinstance(excluded_ids, (list, tuple)):
            excluded_ids = np.asarray(excluded_ids)
        shape = getattr(excluded_ids, "shape", None)
        if shape is None or len(shape) != len(inputs.shape) \
                or tuple(shape[:-1]) != tuple(inputs.shape[:-1]):
            raise ValueError("ApproximateRetrieval: `excluded_ids` must have shape (..., m) "
                             f"with the leading dimensions of `inputs` {tuple(inputs.shape[:-1])}; "
                             f"received {None if shape is None else tuple(shape)}")
        if keras.backend.standardize_dtype(excluded_ids.dtype) not in (
                "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
            raise ValueError("ApproximateRetrieval: `excluded_ids` must be integer ids; received "
                             f"dtype {excluded_ids.dtype}")
        queries = inputs
        if keras.backend.standardize_dtype(inputs.dtype) != "float32":
            queries = keras.ops.cast(inputs, "float32")
        out_shape = tuple(inputs.shape[:-1]) + (self.k,)
        ids_dtype = self._ids_dtype()
        operands = (queries, excluded_ids)
        if state.linked is not None:
            candidates = keras.ops.cast(keras.ops.convert_to_tensor(state.linked), "float32")
            if _is_traced((queries, candidates, excluded_ids)):
                raise ValueError("ApproximateRetrieval: `excluded_ids` is not supported in "
                                 "linked mode inside a compiled function; call the layer "
                                 "eagerly or build it from an array")
            state = self._sync_linked(state, _to_numpy("candidate_embeddings", candidates))
        fn = functools.partial(self._search_excluding, ids_dtype=ids_dtype,
                               state=None if _is_traced(operands) else state)
        return self._outputs(*_host_call(fn, operands, ("float32", ids_dtype), out_shape))

    def _search_excluding(self, queries: np.ndarray, excluded: np.ndarray, ids_dtype: str,
                          state: _Snapshot | None = None):
        """As _search, with (..., m) excluded ids per query (negative: padding)."""
        state = self._state if state is None else state
        shape = queries.shape[:-1] + (self.k,)
        flat = self._flat_queries(queries, state.dim)
        if len(flat) == 0:
            return np.zeros(shape, np.float32), np.zeros(shape, ids_dtype)
        # One vectorized pass over the (nq, m) padded matrix, in its own dtype: padding
        # and ids not among the candidates are dropped, the rest split into one list per
        # query. (A loop over queries with an int64 copy of the whole matrix cost ten
        # times the search itself for the tutorial's 943 users excluding their rated
        # movies' copies: a (943, 56,560) matrix.)
        ex = np.asarray(excluded).reshape(len(flat), -1)
        has_docids = getattr(state.searcher, "has_docids", False)
        keep = ex >= 0
        if state.ids is None:
            keep &= ex < state.searcher.size()
            kept = ex[keep]
        else:
            vals = ex[keep].astype(np.int64)
            order = np.argsort(state.ids, kind="stable")
            sorted_ids = state.ids[order].astype(np.int64)
            pos = np.minimum(np.searchsorted(sorted_ids, vals), len(sorted_ids) - 1)
            found = sorted_ids[pos] == vals
            keep[keep] = found
            # a searcher with docids takes (and returns) the ids themselves
            kept = vals[found] if has_docids else order[pos[found]]
        lists = np.split(kept.astype(np.int64, copy=False), np.cumsum(keep.sum(axis=1))[:-1])
        searcher = state.searcher
        search = (searcher.search_batched_parallel if len(flat) >= _PARALLEL_MIN_QUERIES
                  else searcher.search_batched)
        result = search(flat, final_num_neighbors=self.k, excluded=lists)
        cols = result.indices.shape[1]
        rows = np.full((len(flat), self.k), -1, np.int64)
        scores = np.full((len(flat), self.k), -np.inf, np.float32)
        rows[:, :cols] = result.indices
        scores[:, :cols] = result.distances
        if self.distance_measure == "squared_l2":
            scores[rows < 0] = np.inf
        if has_docids or state.ids is None:
            ids = rows
        else:
            ids = np.where(rows >= 0, state.ids[np.maximum(rows, 0)], -1)
        return scores.reshape(shape), ids.astype(ids_dtype).reshape(shape)

    def _check_query_shape(self, shape, dim: int | None = None) -> None:
        if len(shape) < 1:
            raise ValueError("ApproximateRetrieval: `inputs` must have rank >= 1 "
                             f"(..., embedding_size), received `inputs` with shape {shape}")
        if dim is None and self._state is not None:
            dim = self._state.dim
        if shape[-1] is not None and dim is not None and shape[-1] != dim:
            raise ValueError(f"ApproximateRetrieval: `inputs` has {shape[-1]} features, but the "
                             f"candidates have {dim} features")

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
            "target_recall": self.target_recall,
        })
        return config

    def save_assets(self, dir_path: str) -> None:
        """Keras saving hook: writes the index folder, the ids, the embeddings (only
        when the index does not hold them already) and a manifest (retrieval.json) of
        their shapes and sha256."""
        state = self._state
        if state is None:
            return
        if state.linked is not None:  # save an index of the variable's current values
            state = self._sync_linked(state, _to_numpy("candidate_embeddings",
                                                       state.linked.value))
        searcher = state.searcher
        n, d = int(searcher.size()), int(searcher.d)
        searcher.serialize(os.path.join(dir_path, _SEARCHER_DIR))
        manifest: dict[str, Any] = {"format": _ASSETS_FORMAT, "version": _ASSETS_VERSION,
                                    "n": n, "d": d, "embeddings": None, "ids": None}
        if state.embeddings is not None:
            rows = _searcher_rows(searcher, n, d)
            if rows is not None and np.array_equal(rows, state.embeddings):
                manifest["embeddings"] = "searcher"
            else:
                manifest["embeddings"] = _save_npy(dir_path, _EMBEDDINGS_FILE, state.embeddings)
        if state.ids is not None:
            manifest["ids"] = _save_npy(dir_path, _IDS_FILE, state.ids)
        with open(os.path.join(dir_path, _MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=1)

    def load_assets(self, dir_path: str) -> None:
        """Keras loading hook: restores what :meth:`save_assets` wrote, after checking
        every file against the manifest and the layer (ValueError naming the file and
        the field otherwise)."""
        if not os.path.isdir(os.path.join(dir_path, _SEARCHER_DIR)) \
                and not os.path.exists(os.path.join(dir_path, _MANIFEST_FILE)):
            return  # saved before it had candidates
        searcher, emb, ids = _read_assets(dir_path)
        state = self._state
        if state is not None and state.linked is not None:
            # Linked again by the model's build(): keep following the variable, starting
            # from the saved index of the values it was saved with.
            shape = tuple(state.linked.shape)
            if shape != (searcher.size(), searcher.d):
                raise ValueError(f"{_SEARCHER_DIR}/: the saved index holds "
                                 f"{(searcher.size(), searcher.d)} candidates, but the linked "
                                 f"variable `candidate_embeddings` has shape {shape}")
            self._publish(_Snapshot(searcher, int(searcher.d), emb, ids, linked=state.linked,
                                    updatable=_docids_are(searcher, ids, emb)))
            return
        self._publish(_Snapshot(searcher, int(searcher.d), emb, ids,
                                updatable=_docids_are(searcher, ids, emb)))


def _docids_are(searcher: Any, ids: np.ndarray | None, emb: np.ndarray | None) -> bool:
    """Whether a searcher the layer did not build itself (passed in, or loaded) has the
    layer's ids as docids (the row numbers when ids is None): then update_candidates may
    update it in place. One pass over the docids."""
    if emb is None or not getattr(searcher, "has_docids", False):
        return False
    want = np.arange(len(emb)) if ids is None else ids
    got = searcher.docids
    if len(got) != len(want) or not all(isinstance(v, (int, np.integer)) for v in got[:1]):
        return False
    return bool(np.array_equal(np.sort(np.asarray(got, np.int64)), np.sort(want.astype(np.int64))))


def _save_npy(dir_path: str, name: str, arr: np.ndarray) -> dict:
    path = os.path.join(dir_path, name)
    np.save(path, arr, allow_pickle=False)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"file": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "sha256": digest}


def _load_npy(dir_path: str, entry: Any, name: str) -> np.ndarray:
    """Reads the array ``name`` described by the manifest ``entry``; ValueError naming
    the file and the field when it is missing, damaged or not what the manifest says."""
    where = f"{_MANIFEST_FILE}: {name.removesuffix('.npy')}"
    if not isinstance(entry, dict) or entry.get("file") != name \
            or not isinstance(entry.get("sha256"), str):
        raise ValueError(f"{where} must be an entry {{'file': {name!r}, 'sha256', ...}}; "
                         f"got {entry!r}")
    path = os.path.join(dir_path, name)
    if not os.path.isfile(path):
        raise ValueError(f"{name} is missing (listed in {_MANIFEST_FILE})")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{name}: sha256 differs from {_MANIFEST_FILE} (damaged or replaced)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{name}: not a readable .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: not a single array")
    return arr


def _read_assets(dir_path: str):
    """(searcher, embeddings or None, ids or None) from a saved layer's assets, every
    file checked; owned, read-only arrays."""
    path = os.path.join(dir_path, _MANIFEST_FILE)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{_MANIFEST_FILE} is missing from the layer's assets (saved by "
                         "another version, or damaged)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{_MANIFEST_FILE}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _ASSETS_FORMAT:
        raise ValueError(f"{_MANIFEST_FILE}: format must be {_ASSETS_FORMAT!r}")
    if manifest.get("version") != _ASSETS_VERSION:
        raise ValueError(f"{_MANIFEST_FILE}: version must be {_ASSETS_VERSION}; "
                         f"got {manifest.get('version')!r}")
    n, d = manifest.get("n"), manifest.get("d")
    for field, value in (("n", n), ("d", d)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{_MANIFEST_FILE}: {field} must be an int >= 1; got {value!r}")
    # Keras deletes the extracted assets after loading: read the arrays into memory.
    searcher = mipscan.load_searcher(os.path.join(dir_path, _SEARCHER_DIR), mmap=False)
    if (searcher.size(), searcher.d) != (n, d):
        raise ValueError(f"{_SEARCHER_DIR}/mipscan.json: the index holds "
                         f"n={searcher.size()}, d={searcher.d}, but {_MANIFEST_FILE} says "
                         f"n={n}, d={d} (an index from another model?)")

    ids = None
    if manifest.get("ids") is not None:
        ids = _load_npy(dir_path, manifest["ids"], _IDS_FILE)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{_IDS_FILE}: dtype must be an integer dtype; got {ids.dtype}")
        if ids.shape != (n,):
            raise ValueError(f"{_IDS_FILE}: shape must be ({n},), one id per candidate of the "
                             f"index; got {ids.shape}")
        ids = _check_ids_values(ids)
    elif os.path.exists(os.path.join(dir_path, _IDS_FILE)):
        raise ValueError(f"{_IDS_FILE} is present but {_MANIFEST_FILE} lists no ids")

    source = manifest.get("embeddings")
    emb = None
    if source is not None and source != "searcher" and not isinstance(source, dict):
        raise ValueError(f"{_MANIFEST_FILE}: embeddings must be null, 'searcher' or a file "
                         f"entry; got {source!r}")
    if source == "searcher":
        rows = _searcher_rows(searcher, n, d)
        if rows is None:
            raise ValueError(f"{_MANIFEST_FILE}: embeddings are 'searcher', but the index in "
                             f"{_SEARCHER_DIR}/ keeps no ({n}, {d}) float32 reorder rows")
        emb = rows
    elif source is not None:
        emb = _load_npy(dir_path, source, _EMBEDDINGS_FILE)
        if emb.dtype.kind != "f":
            raise ValueError(f"{_EMBEDDINGS_FILE}: dtype must be a float dtype; got {emb.dtype}")
        if emb.shape != (n, d):
            raise ValueError(f"{_EMBEDDINGS_FILE}: shape must be ({n}, {d}), the index's; got "
                             f"{emb.shape}")
    if emb is not None:
        if not np.isfinite(emb).all():
            row = int(np.argwhere(~np.isfinite(emb))[0][0])
            where = _SEARCHER_DIR + "/" if source == "searcher" else _EMBEDDINGS_FILE
            raise ValueError(f"{where}: candidate embeddings must be finite; NaN or inf in "
                             f"row {row}")
        if source == "searcher":
            emb = emb.view()  # the index's own rows (in memory), or a new array: no copy
            emb.setflags(write=False)
        else:
            emb = _owned(emb, np.float32)
    if not isinstance(source, dict) \
            and os.path.exists(os.path.join(dir_path, _EMBEDDINGS_FILE)):
        raise ValueError(f"{_EMBEDDINGS_FILE} is present but {_MANIFEST_FILE} does not list it")
    return searcher, emb, ids


def pad_ids(lists, pad: int = -1, width: int | None = None) -> np.ndarray:
    """Ragged lists of ids (one per query) as a dense (num_lists, width) int32 array
    padded with ``pad``, for ``ApproximateRetrieval(...)(queries, excluded_ids=...)``.
    ``width`` defaults to the longest list."""
    lists = [np.asarray(x, np.int64).ravel() for x in lists]
    w = max((len(x) for x in lists), default=0) if width is None else int(width)
    out = np.full((len(lists), w), pad, np.int32)
    for i, x in enumerate(lists):
        if len(x) > w:
            raise ValueError(f"pad_ids: list {i} has {len(x)} ids, more than width={w}")
        out[i, :len(x)] = x
    return out
