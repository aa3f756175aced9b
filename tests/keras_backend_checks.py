"""Checks of mipscan.keras.ApproximateRetrieval on one Keras backend.

Run by tests/test_keras.py, once per backend, in a subprocess (Keras picks its backend
from KERAS_BACKEND on first import, so each backend needs its own interpreter):

    KERAS_BACKEND=torch python tests/keras_backend_checks.py [--embeddings tutorial.npz]
        [--save-model DIR | --load-model DIR]

Every check runs even if another fails; the last line of stdout is
``KERAS_CHECKS_JSON: {check: {"ok": bool, "detail": str}}``. The exit status is 0 when
every check that ran passed.

    python tests/keras_backend_checks.py --make-embeddings out.npz --data-dir DIR

writes the tutorial embeddings (``mipscan.recsys.tutorial_embeddings``) to out.npz, so
that every backend checks recall on the same candidates and users.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import numpy as np

MARKER = "KERAS_CHECKS_JSON: "
#: recall@10 of the default index (mipscan.suggest_config at its default target 0.95:
#: round(sqrt(n)) leaves, a quarter searched, AH 2 dims per block, reorder 500) against
#: exact search on the tutorial model after 10 epochs, 40 copies (109,962 candidates,
#: 943 users): measured 0.943. The barely trained, nearly isotropic embeddings are the
#: hard case (suggest_config measured 0.978 on the 50-epoch, 270,882 candidates).
RECALL_THRESHOLD = 0.92
#: Below this many candidates suggest_config scores exactly (no tree, no AH).
EXACT_BELOW = 10_000
#: How long check_racing_updates races (seconds): short in CI, long with
#: HYPOTHESIS_PROFILE=long (the profile the hardening suites use for their long runs).
RACE_SECONDS = 30.0 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 2.0
CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _np(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def _dtype(x) -> str:
    import keras

    return keras.backend.standardize_dtype(x.dtype)


def _data(n: int, d: int, nq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(16, d))
    db = centers[rng.integers(0, 16, n)] + 0.3 * rng.normal(size=(n, d))
    queries = centers[rng.integers(0, 16, nq)] + 0.3 * rng.normal(size=(nq, d))
    return db.astype(np.float32), queries.astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))


def _assert_exact_scores(scores, rows, db, queries, what):
    """Each returned score is the exact inner product of its query and candidate, and
    scores are sorted highest first."""
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), db[rows].astype(np.float64))
    assert np.allclose(scores, exact, rtol=1e-5, atol=1e-6), \
        f"{what}: scores differ from the exact inner products by {np.abs(scores - exact).max()}"
    assert np.all(np.diff(scores, axis=-1) <= 0), f"{what}: scores are not sorted highest first"


# ---------------------------------------------------------------- checks
@check
def check_recall(args):
    """recall@10 vs BruteForceRetrieval on the trained tutorial model's embeddings, with
    the default index (mipscan.suggest_config) on all candidates (a tree, AH and a
    reorder) and on the first 9,000 (exact scoring: recall 1)."""
    if args.embeddings is None:
        return None
    import keras_rs

    from mipscan.keras import ApproximateRetrieval

    with np.load(args.embeddings) as z:
        db, users = z["candidates"], z["users"]
    results = []
    for cand, tree in ((db, True), (db[: EXACT_BELOW - 1000], False)):
        layer = ApproximateRetrieval(cand, k=10)
        brute = keras_rs.layers.BruteForceRetrieval(cand, k=10)
        assert (layer.searcher.num_leaves > 1) == tree, f"unexpected index {layer.searcher}"
        assert ("score_ah" in layer.searcher.config) == tree, f"unexpected {layer.searcher}"
        found, truth = [], []
        for b in range(0, len(users), 128):  # bounds brute force's score matrix
            found.append([_np(t) for t in layer(users[b:b + 128])])
            truth.append(_np(brute(users[b:b + 128])[1]))
        scores = np.concatenate([f[0] for f in found])
        ids = np.concatenate([f[1] for f in found])
        recall = _recall(ids, np.concatenate(truth))
        what = f"{len(users)} users x {len(cand)} candidates ({layer.searcher})"
        threshold = RECALL_THRESHOLD if tree else 0.999  # exact, up to float ties
        assert recall >= threshold, f"recall@10 {recall:.4f} < {threshold} on {what}"
        _assert_exact_scores(scores, ids, cand, users, "tutorial embeddings")
        results.append(f"{recall:.4f} on {len(cand)} candidates "
                       f"({'tree' if tree else 'no tree'})")
    return f"recall@10 >= {RECALL_THRESHOLD}: " + ", ".join(results) + f"; {len(users)} users"


def _gather(table, ids):
    """The backend's own gather of ``ids`` (as returned by the layer) from ``table``."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather(tf.constant(table), ids)
    if keras.backend.backend() == "torch":
        import torch

        return torch.index_select(torch.as_tensor(table), 0, ids.reshape(-1))
    return keras.ops.take(keras.ops.convert_to_tensor(table), ids, axis=0)


@check
def check_contract(args):
    """Outputs match BruteForceRetrieval's: types, dtypes, shapes, order, ids mapping."""
    import keras
    import keras_rs

    from mipscan.keras import ApproximateRetrieval

    # n < 1000: the index scores exactly, so the results equal brute force's.
    db, queries = _data(300, 8, 5)
    ids = np.arange(1000, 1300)[::-1].copy()
    for cand_ids in (None, ids):
        for rs in (True, False):
            ours = ApproximateRetrieval(db, cand_ids, k=7, return_scores=rs)
            ref = keras_rs.layers.BruteForceRetrieval(db, cand_ids, k=7, return_scores=rs)
            for q in (queries, queries[0], queries[None]):
                a, b = ours(q), ref(q)
                a, b = (a, b) if rs else ((a,), (b,))
                assert len(a) == len(b), f"{len(a)} outputs, BruteForceRetrieval gives {len(b)}"
                for x, y in zip(a, b):
                    assert type(x) is type(y), f"output type {type(x)} != {type(y)}"
                    assert _dtype(x) == _dtype(y), \
                        f"ids={cand_ids is not None}: dtype {_dtype(x)} != {_dtype(y)}"
                    assert tuple(x.shape) == tuple(y.shape), f"shape {x.shape} != {y.shape}"
                assert np.array_equal(_np(a[-1]), _np(b[-1])), "ids differ from brute force"
                if rs:
                    assert np.allclose(_np(a[0]), _np(b[0]), rtol=1e-5, atol=1e-6)
    # Output dtypes under other dtype policies.
    for policy in ("mixed_float16", "float16", "bfloat16"):
        a = ApproximateRetrieval(db, k=5, dtype=policy)(queries)
        b = keras_rs.layers.BruteForceRetrieval(db, k=5, dtype=policy)(queries)
        assert [_dtype(t) for t in a] == [_dtype(t) for t in b], \
            f"{policy}: dtypes {[_dtype(t) for t in a]} != {[_dtype(t) for t in b]}"
    # keras.ops.top_k as the reference of scores and ids.
    layer = ApproximateRetrieval(db, k=5)
    scores, top = layer(queries)
    ref_scores, ref_ids = keras.ops.top_k(keras.ops.matmul(queries, db.T), k=5)
    assert np.array_equal(_np(top), _np(ref_ids)), "ids differ from keras.ops.top_k"
    assert np.allclose(_np(scores), _np(ref_scores), rtol=1e-5, atol=1e-6)
    # The other distance measures: cosine similarities highest first, squared L2
    # distances smallest first.
    unit = db / np.linalg.norm(db, axis=1, keepdims=True)
    scores, top = ApproximateRetrieval(db, k=5, distance_measure="cosine")(queries)
    ref_scores, ref_ids = keras.ops.top_k(
        keras.ops.matmul(queries / np.linalg.norm(queries, axis=1, keepdims=True), unit.T), k=5)
    assert np.array_equal(_np(top), _np(ref_ids)), "cosine ids differ from keras.ops.top_k"
    assert np.allclose(_np(scores), _np(ref_scores), rtol=1e-5, atol=1e-6)
    scores, top = ApproximateRetrieval(db, k=5, distance_measure="squared_l2")(queries)
    dist = ((queries[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    assert np.array_equal(_np(top), np.argsort(dist, axis=1)[:, :5]), "squared_l2 ids differ"
    assert np.allclose(_np(scores), np.sort(dist, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    # The approximate path (tree + AH + reorder): ids map through candidate_ids.
    db, queries = _data(3000, 16, 20, seed=1)
    layer = ApproximateRetrieval(db, ids[np.arange(3000) % 300], k=10, num_leaves=8,
                                 num_leaves_to_search=4, dimensions_per_block=2)
    rows_layer = ApproximateRetrieval(db, k=10, num_leaves=8, num_leaves_to_search=4,
                                      dimensions_per_block=2)
    got, rows = _np(layer(queries)[1]), _np(rows_layer(queries)[1])  # rows: used below
    assert np.array_equal(got, ids[rows % 300]), "candidate_ids were not applied"
    assert layer.searcher.num_leaves > 1 and "score_ah" in layer.searcher.config
    assert isinstance(layer, keras_rs.layers.Retrieval)
    # The ids are what the backend's gather takes (mipscan's uint32 rows are not: tf.gather
    # refuses them), with and without candidate_ids, eagerly and compiled.
    for layer in (rows_layer, ApproximateRetrieval(db, np.arange(3000, dtype=np.int64), k=10)):
        top = layer(queries)[1]  # rows (top_k's dtype), or the candidate ids (int32)
        assert _dtype(top) in ("int32", "int64"), f"ids dtype {_dtype(top)}"
        got = _np(_gather(db, top)).reshape(tuple(top.shape) + (16,))
        assert np.array_equal(got, db[_np(top)]), "the backend's gather of the ids differs"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda q: tf.gather(tf.constant(db), rows_layer(q)[1]))
        assert fn(tf.constant(queries)).shape == (20, 10, 16)
    # Tensors that require grad (torch) are detached, not refused; the outputs carry none.
    if keras.backend.backend() == "torch":
        import torch

        q = torch.tensor(queries, requires_grad=True)
        cand = torch.tensor(db, requires_grad=True)
        layer = ApproximateRetrieval(cand, torch.arange(3000), k=10, num_leaves=8,
                                     num_leaves_to_search=4, dimensions_per_block=2)
        scores, top = layer(q)
        assert np.array_equal(_np(top), rows) and not scores.requires_grad, "torch ids"
        layer.update_candidates(cand * 1)  # a non-leaf tensor that requires grad
    return "types, dtypes, shapes and ids match BruteForceRetrieval and keras.ops.top_k"


@check
def check_compiled(args):
    """Identical ids (and scores) eagerly, compiled, and in model.predict()."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(4000, 16, 70, seed=2)
    layer = ApproximateRetrieval(db, k=10, num_leaves=16, num_leaves_to_search=5)
    scores, ids = (_np(t) for t in layer(queries))
    _assert_exact_scores(scores, ids, db, queries, "eager")
    runs = {}
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        runs["jax.jit"] = jax.jit(lambda q: layer(q))(queries)
        runs["jax.jit+vmap"] = jax.jit(jax.vmap(lambda q: layer(q)))(queries)
    elif backend == "tensorflow":
        import tensorflow as tf

        runs["tf.function"] = tf.function(lambda q: layer(q))(tf.constant(queries))
        runs["tf.function(jit_compile=False), unknown batch"] = tf.function(
            lambda q: layer(q),
            input_signature=[tf.TensorSpec([None, 16], tf.float32)])(tf.constant(queries))
    inputs = keras.Input(shape=(16,))
    model = keras.Model(inputs, layer(inputs))
    runs["model.predict"] = model.predict(queries, batch_size=32, verbose=0)
    seq = keras.Sequential([keras.layers.Identity(), layer])
    runs["Sequential.predict"] = seq.predict(queries, batch_size=16, verbose=0)
    # XLA only on JAX; TensorFlow and PyTorch fall back to tf.function and eager.
    model.compile(jit_compile=True)
    assert model.jit_compile == (backend == "jax"), f"jit_compile={model.jit_compile}"
    runs[f"model.predict(jit_compile={model.jit_compile})"] = model.predict(queries, verbose=0)
    for name, (s, i) in runs.items():
        assert np.array_equal(_np(i), ids), f"{name}: ids differ from the eager call"
        assert np.array_equal(_np(s), scores), f"{name}: scores differ from the eager call"
    return "identical eager and " + ", ".join(runs)


@check
def check_config(args):
    """get_config/from_config round-trips every argument (return_scores included)."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    args = dict(k=7, return_scores=False, distance_measure="cosine", num_leaves=9,
                num_leaves_to_search=3, training_iterations=5, dimensions_per_block=3,
                anisotropic_quantization_threshold=0.3, reordering_num_neighbors=77, seed=4,
                target_recall=0.9, name="retrieval_x")
    layer = ApproximateRetrieval(**args)
    config = layer.get_config()
    json.dumps(config)
    for key, value in args.items():
        assert config[key] == value, f"get_config()[{key!r}] = {config[key]!r}, expected {value!r}"
    clone = ApproximateRetrieval.from_config(config)
    assert clone.get_config() == config, "from_config(get_config()) changed the config"
    for key, value in args.items():
        assert getattr(clone, key) == value, f"from_config lost {key}"
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is ApproximateRetrieval and again.get_config() == config
    defaults = ApproximateRetrieval().get_config()
    assert defaults["return_scores"] is True
    assert ApproximateRetrieval.from_config(defaults).get_config() == defaults
    # The index: mipscan.suggest_config (one policy with autopilot() and the CLI), with
    # the layer's explicit arguments taking precedence.
    import mipscan

    for n, d, k in ((50_000, 32, 10), (270_882, 32, 100), (5_000, 16, 10)):
        got = ApproximateRetrieval(k=k).index_config(n, d)
        want = mipscan.suggest_config(n, d, k=k)
        if "tree" in want:
            want["tree"] = dict(want["tree"], training_iterations=12)
        assert got == want, f"n={n}: {got} != suggest_config's {want}"
    got = ApproximateRetrieval(k=10, num_leaves=50, num_leaves_to_search=7,
                               dimensions_per_block=4, anisotropic_quantization_threshold=0.5,
                               reordering_num_neighbors=300, training_iterations=3
                               ).index_config(5_000, 16)
    assert got == {"tree": {"num_leaves": 50, "num_leaves_to_search": 7,
                            "training_iterations": 3},
                   "score_ah": {"dimensions_per_block": 4,
                                "anisotropic_quantization_threshold": 0.5},
                   "reorder": {"reordering_num_neighbors": 300}}, got
    assert "tree" not in ApproximateRetrieval(num_leaves=1).index_config(50_000, 32)
    for target in (0.9, 0.97):
        got = ApproximateRetrieval(target_recall=target).index_config(270_882, 32)
        want = mipscan.suggest_config(270_882, 32, target_recall=target)
        assert got["tree"]["num_leaves_to_search"] == want["tree"]["num_leaves_to_search"]
        assert got["reorder"] == want["reorder"], f"target_recall={target}"
    return f"{len(args)} arguments round-trip; index_config = suggest_config + overrides"


@check
def check_save_load(args):
    """model.save() + keras.models.load_model() restore the index: identical results."""
    import keras

    import mipscan
    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(3000, 16, 40, seed=3)
    cand_ids = np.arange(3000, dtype=np.int64) * 3 + 1
    layer = ApproximateRetrieval(db, cand_ids, k=10, num_leaves=8, num_leaves_to_search=3)
    inputs = keras.Input(shape=(16,))
    model = keras.Model(inputs, layer(inputs))
    before = [_np(t) for t in model(queries)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    restored = next(l for l in loaded.layers if isinstance(l, ApproximateRetrieval))
    after = [_np(t) for t in loaded(queries)]
    predicted = loaded.predict(queries, verbose=0)
    for a, b, c in zip(before, after, predicted):
        assert np.array_equal(a, b), "results differ after load_model"
        assert np.array_equal(a, _np(c)), "predict() after load_model differs"
    assert np.array_equal(_np(restored.candidate_embeddings), db)
    assert np.array_equal(_np(restored.candidate_ids), cand_ids)
    assert restored.get_config() == layer.get_config()
    # The candidates are stored once: the index's rows (AH's reorder rows, or an exact
    # index's scored rows) are the candidates, so no candidate_embeddings.npy beside them.
    import zipfile

    for n, kwargs in ((3000, dict(num_leaves=8, num_leaves_to_search=3)),
                      (12_000, {}), (3000, dict(dimensions_per_block=2))):
        big, _ = _data(n, 16, 1, seed=4)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            keras.Sequential([keras.Input((16,)), ApproximateRetrieval(big, k=10, **kwargs)]
                             ).save(path)
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                assert not any(p.endswith("candidate_embeddings.npy") for p in names), \
                    f"n={n} {kwargs}: the candidates are stored twice: {names}"
                stored = sum(i.file_size for i in z.infolist())
            assert stored < big.nbytes * 1.6, f"{stored} bytes stored for {big.nbytes}"
            again = keras.models.load_model(path)
            restored = next(l for l in again.layers if isinstance(l, ApproximateRetrieval))
            assert np.array_equal(_np(restored.candidate_embeddings), big), f"n={n} {kwargs}"
    if args.save_model:  # for check_load_other_backend, run on the other backends
        model.save(os.path.join(args.save_model, "model.keras"))
        np.savez(os.path.join(args.save_model, "expected.npz"), queries=queries, scores=before[0],
                 ids=before[1])

    # A layer built around a searcher (no candidate_embeddings) saves its index too.
    searcher = mipscan.builder(db, 10, "dot_product").score_ah(2).reorder(50).build()
    model = keras.Sequential([keras.Input((16,)), ApproximateRetrieval(searcher=searcher, k=5)])
    before = [_np(t) for t in model(queries)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    after = [_np(t) for t in loaded(queries)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "searcher= layer differs"
    direct = searcher.search_batched(queries, final_num_neighbors=5)
    assert np.array_equal(before[1], direct.indices.astype(np.int64)), "searcher= ids"
    return "Functional and Sequential models round-trip with identical scores and ids"


@check
def check_load_other_backend(args):
    """A model saved on another backend loads here and gives identical results."""
    if args.load_model is None:
        return None
    import keras

    loaded = keras.models.load_model(os.path.join(args.load_model, "model.keras"))
    with np.load(os.path.join(args.load_model, "expected.npz")) as z:
        queries, scores, ids = z["queries"], z["scores"], z["ids"]
    got_scores, got_ids = (_np(t) for t in loaded(queries))
    assert np.array_equal(got_ids, ids), "ids differ from the saving backend's"
    assert np.array_equal(got_scores, scores), "scores differ from the saving backend's"
    return f"identical results from the model saved in {args.load_model}"


@check
def check_errors(args):
    """Bad input raises BruteForceRetrieval's errors, with messages naming the argument."""
    import keras
    import keras_rs

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(50, 8, 3)
    same_as_brute = {
        "rank 1 candidate_embeddings": dict(candidate_embeddings=db[0]),
        "rank 3 candidate_embeddings": dict(candidate_embeddings=db[None]),
        "k > number of candidates": dict(candidate_embeddings=db, k=51),
        "candidate_ids of the wrong length": dict(candidate_embeddings=db,
                                                  candidate_ids=np.arange(49)),
        "candidate_ids without candidate_embeddings": dict(candidate_ids=np.arange(50)),
    }
    for what, kwargs in same_as_brute.items():
        errors = []
        for cls in (keras_rs.layers.BruteForceRetrieval, ApproximateRetrieval):
            try:
                cls(**kwargs)
            except Exception as exc:
                errors.append(exc)
            else:
                raise AssertionError(f"{what}: {cls.__name__} raised nothing")
        theirs, ours = errors
        assert type(ours) is type(theirs) and str(ours) == str(theirs), \
            f"{what}: {ours!r} instead of BruteForceRetrieval's {theirs!r}"
        assert "`candidate_" in str(ours) or "k=" in str(ours), f"{what}: {ours}"

    def raises(fn, exc_type, *words):
        try:
            fn()
        except exc_type as exc:
            assert all(w in str(exc) for w in words), f"message {exc} lacks {words}"
            return
        raise AssertionError(f"expected {exc_type.__name__} mentioning {words}")

    # Dtypes the engine cannot take (BruteForceRetrieval fails too, differently per backend).
    raises(lambda: ApproximateRetrieval(np.array([["a"] * 8] * 50), k=5), ValueError,
           "`candidate_embeddings`", "dtype")
    raises(lambda: ApproximateRetrieval(db.astype(np.complex64), k=5), ValueError,
           "`candidate_embeddings`", "dtype")
    # Float ids must be whole numbers (0.5 would otherwise be truncated to 0).
    raises(lambda: ApproximateRetrieval(db, candidate_ids=np.arange(50) + 0.5, k=5), ValueError,
           "`candidate_ids`", "whole numbers")
    raises(lambda: ApproximateRetrieval(db, np.array(["x"] * 50), k=5), ValueError,
           "`candidate_ids`", "dtype")
    bad = db.copy()
    bad[3, 1] = np.nan
    raises(lambda: ApproximateRetrieval(bad, k=5), ValueError, "`candidate_embeddings`", "row 3")
    # int and bool candidates are converted, as BruteForceRetrieval does.
    assert _dtype(ApproximateRetrieval((db > 0).astype(np.int32), k=5)(queries)[0]) == "float32"

    layer = ApproximateRetrieval(db, k=5)
    raises(lambda: layer(queries[:, :4]), ValueError, "`inputs`", "4 features", "8 features")
    raises(lambda: layer.update_candidates(db[:4]), ValueError, "(4)", "k=5")
    raises(lambda: layer.update_candidates(None), ValueError, "`candidate_embeddings`")
    assert layer.candidate_embeddings.shape == (50, 8), "a failed update changed the layer"
    raises(lambda: ApproximateRetrieval(k=5)(queries), ValueError, "update_candidates")
    raises(lambda: ApproximateRetrieval(db, k=0), ValueError, "`k`")
    raises(lambda: ApproximateRetrieval(db, k="5"), TypeError, "`k`")
    raises(lambda: ApproximateRetrieval(db, num_leaves=0), ValueError, "`num_leaves`")
    raises(lambda: ApproximateRetrieval(db, target_recall=0), ValueError, "`target_recall`")
    raises(lambda: ApproximateRetrieval(db, target_recall="high"), TypeError, "`target_recall`")
    raises(lambda: ApproximateRetrieval(db, return_scores="yes"), TypeError, "`return_scores`")
    raises(lambda: ApproximateRetrieval(db, distance_measure="l1"), ValueError,
           "`distance_measure`")
    raises(lambda: ApproximateRetrieval(searcher=object()), TypeError, "`searcher`")
    import mipscan

    searcher = mipscan.builder(db, 5, "dot_product").score_brute_force().build()
    raises(lambda: ApproximateRetrieval(searcher=searcher, candidate_ids=np.arange(49)),
           ValueError, "`candidate_ids`", "(50)")
    raises(lambda: ApproximateRetrieval(searcher=searcher, k=51), ValueError, "(50)", "k=51")
    raises(lambda: ApproximateRetrieval(db[:, :4], searcher=searcher), ValueError,
           "`candidate_embeddings`", "(50, 8)")
    # Queries of an integer dtype are converted (as BruteForceRetrieval does).
    scores, _ = layer(keras.ops.convert_to_tensor(np.ones((2, 8), np.int32)))
    assert _dtype(scores) == "float32"
    return "BruteForceRetrieval's messages for rank, k and ids; named arguments elsewhere"


@check
def check_update_candidates(args):
    """update_candidates rebuilds the index; ids are kept as BruteForceRetrieval does."""
    import keras_rs

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(200, 8, 4, seed=5)
    db2, _ = _data(120, 8, 1, seed=6)
    ids = np.arange(200, 400)
    layer = ApproximateRetrieval(k=5)
    ref = keras_rs.layers.BruteForceRetrieval(k=5)
    layer.update_candidates(db, ids)
    ref.update_candidates(db, ids)
    assert np.array_equal(_np(layer(queries)[1]), _np(ref(queries)[1]))
    layer.update_candidates(db[::-1].copy())  # keeps the ids, as BruteForceRetrieval does
    ref.update_candidates(db[::-1].copy())
    assert np.array_equal(_np(layer(queries)[1]), _np(ref(queries)[1]))
    layer.update_candidates(db2, np.arange(120) + 7)  # a different number of candidates
    fresh = keras_rs.layers.BruteForceRetrieval(db2, np.arange(120) + 7, k=5)
    assert np.array_equal(_np(layer(queries)[1]), _np(fresh(queries)[1]))
    return "rebuilds on new candidates, keeps previous ids when none are given"


@check
def check_incremental_update(args):
    """update_candidates with ids overlapping the current ones applies the difference to
    the same index (Searcher.update: upsert new and changed, delete dropped; issue 13)."""
    import keras_rs

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(300, 8, 4, seed=7)
    extra, _ = _data(100, 8, 1, seed=8)
    layer = ApproximateRetrieval(k=5)
    layer.update_candidates(db, np.arange(1000, 1300))
    searcher = layer.searcher
    new_db = np.concatenate([db[100:], extra]).astype(np.float32)
    new_db[:10] += 0.5  # ten kept candidates change their embedding
    new_ids = np.arange(1100, 1400)
    layer.update_candidates(new_db, new_ids)
    assert layer.searcher is searcher, "the index was rebuilt, not updated"
    assert searcher.size() == 300 and sorted(searcher.docids) == new_ids.tolist()
    fresh = keras_rs.layers.BruteForceRetrieval(new_db, new_ids, k=5)
    got, want = layer(queries), fresh(queries)
    assert np.array_equal(_np(got[1]), _np(want[1])), (_np(got[1]), _np(want[1]))
    assert np.allclose(_np(got[0]), _np(want[0]), rtol=1e-5, atol=1e-5)
    layer.update_candidates(extra, np.arange(5000, 5100))  # no overlap: rebuilt
    assert layer.searcher is not searcher
    return "overlapping ids update the index in place; disjoint ids rebuild it"


@check
def check_linked_incremental(args):
    """In linked mode (the layer follows a keras.Variable, without candidate ids) the
    index is updated in place too: update_candidates(the variable) and an eager call
    after the values changed apply the difference (no build: same searcher, build count
    unchanged), the link is kept, and recall against exact search stays that of a fresh
    build; a change of every row rebuilds."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    n, d = 3000, 8
    db, queries = _data(n, d, 200, seed=11)
    var = keras.Variable(db, dtype="float32")
    # A tree + AH index at this size (the default would score 3,000 candidates exactly).
    knobs = dict(k=10, num_leaves=30, num_leaves_to_search=10, dimensions_per_block=2)
    layer = ApproximateRetrieval(**knobs)
    layer.candidate_embeddings = var
    builds = []
    build = layer._build_searcher
    layer._build_searcher = lambda *a, **kw: builds.append(1) or build(*a, **kw)
    layer(queries)  # the first eager call builds
    searcher = layer.searcher
    assert len(builds) == 1 and "tree" in searcher.config and searcher.has_docids

    def exact_recall(values):
        truth = np.argsort(-(queries @ values.T), axis=1)[:, :10]
        return _recall(_np(layer(queries)[1]), truth)

    rng = np.random.default_rng(12)
    new = db.copy()
    moved = rng.choice(n, 300, replace=False)
    new[moved] = db[rng.choice(n, 300, replace=False)] + 0.1 * rng.normal(size=(300, d))
    var.assign(new)
    layer.update_candidates(layer.candidate_embeddings)
    assert layer.searcher is searcher and len(builds) == 1, "update_candidates rebuilt"
    assert layer.candidate_embeddings is var, "the link was dropped"
    assert searcher.size() == n and sorted(searcher.docids) == list(range(n))
    got = exact_recall(new)
    fresh = ApproximateRetrieval(new, **knobs)
    truth = np.argsort(-(queries @ new.T), axis=1)[:, :10]
    want = _recall(_np(fresh(queries)[1]), truth)
    assert got >= want - 0.03 and got > 0.85, (got, want)
    # An eager call after the values changed again updates in place as well.
    newer = new.copy()
    newer[:100] = -new[:100]
    var.assign(newer)
    got = exact_recall(newer)
    assert layer.searcher is searcher and len(builds) == 1, "an eager call rebuilt"
    assert got > 0.85, got
    var.assign(newer[::-1].copy() + 1.0)  # every row changes: rebuilt (retrained)
    layer(queries)
    assert layer.searcher is not searcher and len(builds) == 2
    return (f"linked updates in place: recall@10 {got:.3f} (fresh build {want:.3f}); "
            "a change of every row rebuilds")


@check
def check_tutorial_model(args):
    """The Keras-RS tutorials' pattern: the model's build() assigns the candidate tower's
    variable (`retrieval.candidate_embeddings = ...embeddings`), fit() trains it, and
    predict() retrieves with the trained values, after every fit."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    keras.utils.set_random_seed(7)
    num_users, num_candidates, dim = 40, 300, 8  # < 1000 candidates: exact scoring

    @keras.saving.register_keras_serializable(package="mipscan_tests")
    class RetrievalModel(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.user_embedding = keras.layers.Embedding(num_users, dim)
            self.candidate_embedding = keras.layers.Embedding(num_candidates, dim)
            self.retrieval = ApproximateRetrieval(k=10, return_scores=False)
            self.loss_fn = keras.losses.MeanSquaredError()

        def build(self, input_shape):
            self.user_embedding.build(input_shape)
            self.candidate_embedding.build(input_shape)
            self.retrieval.candidate_embeddings = self.candidate_embedding.embeddings
            self.retrieval.build(input_shape)
            super().build(input_shape)

        def call(self, inputs, training=False):
            result = {"user_embeddings": self.user_embedding(inputs)}
            if not training:
                result["predictions"] = self.retrieval(result["user_embeddings"])
            return result

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            cand = self.candidate_embedding(y["movie_id"])
            scores = keras.ops.sum(y_pred["user_embeddings"] * cand, axis=1, keepdims=True)
            return self.loss_fn(keras.ops.expand_dims(y["rating"], -1), scores, sample_weight)

    rng = np.random.default_rng(8)
    users = rng.integers(0, num_users, 2000).astype(np.int32)
    labels = {"movie_id": rng.integers(0, num_candidates, 2000).astype(np.int32),
              "rating": rng.random(2000).astype(np.float32)}
    model = RetrievalModel()
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=0.5))
    query_users = np.arange(num_users, dtype=np.int32)

    def expected():
        u = _np(model.user_embedding.embeddings)[query_users]
        c = _np(model.candidate_embedding.embeddings)
        return _np(keras.ops.top_k(keras.ops.convert_to_tensor(u @ c.T), k=10)[1])

    # No index is ever built inside a host callback (jax.pure_callback may skip or repeat
    # its calls): builds are recorded with whether a callback was running.
    import threading
    import warnings

    layer, in_callback, builds = model.retrieval, threading.local(), []
    build, search, search_linked = (layer._build_searcher, layer._search,
                                    layer._search_linked)

    def traced(fn):
        def wrapper(*a, **kw):
            in_callback.on = True
            try:
                return fn(*a, **kw)
            finally:
                in_callback.on = False
        return wrapper

    def recording_build(*args, **kwargs):
        builds.append(getattr(in_callback, "on", False))
        return build(*args, **kwargs)

    layer._build_searcher = recording_build
    layer._search, layer._search_linked = traced(search), traced(search_linked)
    for epochs in (1, 2):
        model.fit(users, labels, batch_size=200, epochs=epochs, verbose=0)
        got = model.predict(query_users, batch_size=16, verbose=0)["predictions"]
        assert np.array_equal(_np(got), expected()), f"predict() after fit #{epochs} is stale"
        eager = model(query_users)["predictions"]
        assert np.array_equal(_np(eager), expected()), f"call after fit #{epochs} is stale"
    assert builds and not any(builds), f"an index was built inside a callback: {builds}"
    # After training, update_candidates(the variable) indexes its values, keeps the link,
    # and compiled calls then use the index (no exact fallback, so no warning).
    model.fit(users, labels, batch_size=200, epochs=1, verbose=0)
    layer.update_candidates(layer.candidate_embeddings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = model.predict(query_users, batch_size=16, verbose=0)["predictions"]
    assert np.array_equal(_np(got), expected()), "predict() after update_candidates"
    assert not any(builds), f"an index was built inside a callback: {builds}"
    layer._build_searcher, layer._search, layer._search_linked = build, search, search_linked
    assert model.retrieval.candidate_embeddings is model.candidate_embedding.embeddings
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    got = loaded.predict(query_users, verbose=0)["predictions"]
    assert np.array_equal(_np(got), expected()), "predict() after load_model differs"
    assert loaded.retrieval.candidate_embeddings is loaded.candidate_embedding.embeddings
    return ("predict() after each fit() retrieves with the trained candidate embeddings; "
            "save/load keeps the link")


@check
def check_owns_data(args):
    """The layer copies the candidates and ids it keeps: changing the caller's arrays
    (numpy, or a backend tensor in place) after building changes nothing."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(12_000, 16, 30, seed=11)  # >= 10,000: tree + AH + reorder
    ids = np.arange(12_000, dtype=np.int32) * 2 + 1  # int32: no conversion copies them
    variants = {"AH": dict(), "exact": dict(dimensions_per_block=None)}
    for name, kwargs in variants.items():
        emb, cand_ids = db.copy(), ids.copy()
        if name == "exact":
            emb, cand_ids = emb[:5000].copy(), cand_ids[:5000].copy()
        layer = ApproximateRetrieval(emb, cand_ids, k=10, **kwargs)
        before = [_np(t) for t in layer(queries)]
        emb[:] = 0
        cand_ids[:] = -7
        after = [_np(t) for t in layer(queries)]
        for a, b in zip(before, after):
            assert np.array_equal(a, b), f"{name}: results changed with the caller's arrays"
        assert _np(layer.candidate_embeddings).any(), f"{name}: candidate_embeddings shared"
        assert (_np(layer.candidate_ids) != -7).all(), f"{name}: candidate_ids shared"
    # A backend tensor changed in place (torch shares memory with numpy when it can).
    if keras.backend.backend() == "torch":
        import torch

        t = torch.from_numpy(db[:2000].copy())
        layer = ApproximateRetrieval(t, k=10)
        before = _np(layer(queries)[1])
        t.zero_()
        assert np.array_equal(_np(layer(queries)[1]), before), "a torch tensor is shared"
    return "results identical after the caller zeroes its embeddings and ids"


@check
def check_nan_queries(args):
    """A NaN query: ValueError eagerly; inside compiled functions the backend's own error
    type, whose message names `inputs` and the problem."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(300, 8, 3)
    queries[1, 2] = np.nan
    layer = ApproximateRetrieval(db, k=5)
    words = ("the queries (`inputs`) must be finite", "NaN or inf in query 1")
    try:
        layer(queries)
    except ValueError as exc:
        assert all(w in str(exc) for w in words), f"eager: {exc}"
    else:
        raise AssertionError("eager: a NaN query raised nothing")
    seen = ["eager ValueError"]
    backend = keras.backend.backend()
    compiled = {}
    if backend == "jax":
        import jax

        compiled["jax.jit"] = (lambda: jax.block_until_ready(jax.jit(layer)(queries)),
                               jax.errors.JaxRuntimeError)
    elif backend == "tensorflow":
        import tensorflow as tf

        compiled["tf.function"] = (lambda: tf.function(layer)(tf.constant(queries)),
                                   tf.errors.InvalidArgumentError)
    inputs = keras.Input((8,))
    model = keras.Model(inputs, layer(inputs))
    expected = {"jax": compiled.get("jax.jit", (None, ValueError))[1],
                "tensorflow": compiled.get("tf.function", (None, ValueError))[1]}
    compiled["model.predict"] = (lambda: model.predict(queries, verbose=0),
                                 expected.get(backend, ValueError))
    for name, (fn, exc_type) in compiled.items():
        try:
            fn()
        except exc_type as exc:
            assert all(w in str(exc) for w in words), f"{name}: {type(exc).__name__}: {exc}"
            seen.append(f"{name} {type(exc).__name__}")
        else:
            raise AssertionError(f"{name}: a NaN query raised nothing")
    return "; ".join(seen) + ", each naming `inputs` and NaN"


@check
def check_racing_updates(args):
    """3 threads call the layer while a 4th alternates two candidate sets (different
    sizes and ids) with update_candidates: no exception, and every returned (id, score)
    is the exact score of that id in one set, each row from one set (defect 6 of issue
    12: IndexErrors and scores that belonged to other ids)."""
    import threading
    import time

    from mipscan.keras import ApproximateRetrieval

    sets = []
    for i, (n, first_id) in enumerate(((1500, 10_000), (900, 50_000))):
        db, _ = _data(n, 8, 1, seed=20 + i)
        sets.append((db, np.arange(n, dtype=np.int64) * 3 + first_id))
    _, queries = _data(10, 8, 64, seed=22)
    by_id = {}
    for which, (db, ids) in enumerate(sets):
        for row, cid in enumerate(ids):
            by_id[int(cid)] = (which, row)
    layer = ApproximateRetrieval(*sets[0], k=5)
    stop = threading.Event()
    errors, bad, counts = [], [], {"calls": 0, "updates": 0}
    lock = threading.Lock()

    def caller(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            q = queries[rng.integers(0, len(queries), int(rng.integers(1, 80)))]
            try:
                scores, top = (_np(t) for t in layer(q))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            for qi in range(len(q)):
                hits = [by_id.get(int(c)) for c in top[qi]]
                if None in hits or len({w for w, _ in hits}) != 1:
                    bad.append(f"ids {top[qi].tolist()} are not all from one set")
                    continue
                db = sets[hits[0][0]][0]
                exact = db[[r for _, r in hits]].astype(np.float64) @ q[qi].astype(np.float64)
                if not np.allclose(scores[qi], exact, rtol=1e-5, atol=1e-5):
                    bad.append(f"scores {scores[qi].tolist()} are not those of ids "
                               f"{top[qi].tolist()} ({exact.tolist()})")
            with lock:
                counts["calls"] += 1

    def updater():
        i = 0
        while not stop.is_set():
            i ^= 1
            db, ids = sets[i]
            layer.update_candidates(db, ids)
            counts["updates"] += 1
            time.sleep(0.002)  # let the callers in: a race needs both sides running

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=updater))
    for t in threads:
        t.start()
    time.sleep(RACE_SECONDS)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, f"{len(errors)} exceptions, e.g. {errors[:3]}"
    assert not bad, f"{len(bad)} wrong results, e.g. {bad[:3]}"
    assert counts["calls"] >= 10 and counts["updates"] >= 4, f"too little racing: {counts}"
    return (f"{counts['calls']} calls racing {counts['updates']} updates in "
            f"{RACE_SECONDS:g} s: 0 exceptions, 0 wrong results")


def _tamper(src: str, dst: str, edit) -> None:
    """Copies the .keras zip ``src`` to ``dst``, with ``edit(files)`` applied to its
    {path: bytes} (paths relative to the layer's assets folder)."""
    import zipfile

    with zipfile.ZipFile(src) as z:
        files = {i.filename: z.read(i) for i in z.infolist()}
    prefix = next(p.rsplit("retrieval.json", 1)[0] for p in files if p.endswith("retrieval.json"))
    assets = {p[len(prefix):]: b for p, b in files.items() if p.startswith(prefix)}
    edit(assets)
    with zipfile.ZipFile(dst, "w") as z:
        for p, b in files.items():
            if not p.startswith(prefix):
                z.writestr(p, b)
        for p, b in assets.items():
            z.writestr(prefix + p, b)


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _rehash(assets: dict, name: str, data: bytes) -> None:
    """Writes ``name`` and updates its sha256 in retrieval.json (a consistent forgery)."""
    import hashlib

    assets[name] = data
    manifest = json.loads(assets["retrieval.json"])
    key = "ids" if name == "candidate_ids.npy" else "embeddings"
    manifest[key]["sha256"] = hashlib.sha256(data).hexdigest()
    assets["retrieval.json"] = json.dumps(manifest).encode()


@check
def check_tampered_assets(args):
    """A tampered .keras file never loads silently: each edit of the layer's assets
    raises ValueError naming the file and the field (defect 7 of issue 12)."""
    import keras

    from mipscan.keras import ApproximateRetrieval

    db, queries = _data(3000, 8, 5, seed=30)
    other, _ = _data(2000, 8, 1, seed=31)
    ids = np.arange(3000, dtype=np.int64) * 5
    cases = {
        "ids missing": (lambda a: a.pop("candidate_ids.npy"),
                        ("candidate_ids.npy", "missing")),
        "ids changed, hash kept": (lambda a: a.__setitem__("candidate_ids.npy",
                                                            _npy(ids[::-1].copy())),
                                   ("candidate_ids.npy", "sha256")),
        "ids NaN": (lambda a: _rehash(a, "candidate_ids.npy",
                                      _npy(np.full(3000, np.nan))),
                    ("candidate_ids.npy", "dtype", "integer")),
        "ids + 0.5": (lambda a: _rehash(a, "candidate_ids.npy", _npy(ids + 0.5)),
                      ("candidate_ids.npy", "dtype", "integer")),
        "ids 2-D": (lambda a: _rehash(a, "candidate_ids.npy", _npy(ids.reshape(1500, 2))),
                    ("candidate_ids.npy", "shape", "(3000,)")),
        "ids too short": (lambda a: _rehash(a, "candidate_ids.npy", _npy(ids[:10])),
                          ("candidate_ids.npy", "shape", "(3000,)")),
        "ids beyond int32": (lambda a: _rehash(a, "candidate_ids.npy", _npy(ids + 2**40)),
                             ("candidate_ids", "int32")),
        "ids as objects": (lambda a: _rehash(a, "candidate_ids.npy",
                                             _npy(np.array([None] * 3000, dtype=object))),
                           ("candidate_ids.npy", "not a readable .npy")),
        "ids not listed": (lambda a: a.__setitem__("retrieval.json", json.dumps(
            dict(json.loads(a["retrieval.json"]), ids=None)).encode()),
                           ("candidate_ids.npy", "lists no ids")),
        "embeddings NaN": (lambda a: _rehash(a, "candidate_embeddings.npy",
                                             _npy(np.where(db > 1, np.nan, db))),
                           ("candidate_embeddings.npy", "finite")),
        "embeddings wrong shape": (lambda a: _rehash(a, "candidate_embeddings.npy",
                                                     _npy(db[:, :4].copy())),
                                   ("candidate_embeddings.npy", "shape", "(3000, 8)")),
        "embeddings int": (lambda a: _rehash(a, "candidate_embeddings.npy",
                                             _npy(db.astype(np.int32))),
                           ("candidate_embeddings.npy", "dtype", "float")),
        "embeddings missing": (lambda a: a.pop("candidate_embeddings.npy"),
                               ("candidate_embeddings.npy", "missing")),
        "manifest missing": (lambda a: a.pop("retrieval.json"),
                             ("retrieval.json", "missing")),
        "manifest n changed": (lambda a: a.__setitem__("retrieval.json", json.dumps(
            dict(json.loads(a["retrieval.json"]), n=2000)).encode()),
                               ("searcher/mipscan.json", "n=3000", "n=2000")),
        "manifest not JSON": (lambda a: a.__setitem__("retrieval.json", b"{"),
                              ("retrieval.json", "JSON")),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # cosine: the index keeps normalised rows, so the embeddings are a file of their own.
        model = keras.Sequential([keras.Input((8,)), ApproximateRetrieval(
            db, ids, k=5, distance_measure="cosine")])
        good = os.path.join(tmp, "good.keras")
        model.save(good)
        # A searcher folder from another model (2,000 rows) in place of this one's.
        foreign = keras.Sequential([keras.Input((8,)), ApproximateRetrieval(
            other, k=5, distance_measure="cosine")])
        foreign_path = os.path.join(tmp, "foreign.keras")
        foreign.save(foreign_path)
        import zipfile

        with zipfile.ZipFile(foreign_path) as z:
            foreign_searcher = {i.filename.split("/searcher/", 1)[1]: z.read(i)
                                for i in z.infolist() if "/searcher/" in i.filename}

        def swap_searcher(a):
            for p in [p for p in a if p.startswith("searcher/")]:
                del a[p]
            a.update({"searcher/" + p: b for p, b in foreign_searcher.items()})

        cases["searcher from another model"] = (swap_searcher, ("searcher/mipscan.json",
                                                                "n=2000", "n=3000"))
        loaded = keras.models.load_model(good)
        assert np.array_equal(_np(loaded(queries)[1]), _np(model(queries)[1])), "good file"
        for what, (edit, words) in cases.items():
            path = os.path.join(tmp, "bad.keras")
            _tamper(good, path, edit)
            try:
                keras.models.load_model(path)
            except ValueError as exc:
                assert all(w in str(exc) for w in words), \
                    f"{what}: message lacks {words}: {exc}"
            else:
                raise AssertionError(f"{what}: the tampered file loaded")
    return f"{len(cases)} tamperings each raise ValueError naming the file and field"


# ---------------------------------------------------------------- driver
def make_embeddings(out: str, data_dir: str, epochs: int, copies: int) -> None:
    from mipscan.recsys import tutorial_embeddings

    emb = tutorial_embeddings(data_dir=data_dir, epochs=epochs, copies=copies, seed=42)
    np.savez(out, candidates=emb.candidates, users=emb.all_users)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", help=".npz with candidates and users (recall check)")
    parser.add_argument("--only", nargs="*", help="run only these checks")
    parser.add_argument("--save-model", metavar="DIR", help="save_load also saves its model here")
    parser.add_argument("--load-model", metavar="DIR", help="a --save-model folder to load")
    parser.add_argument("--make-embeddings", metavar="OUT")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args(argv)
    if args.make_embeddings:
        make_embeddings(args.make_embeddings, args.data_dir, args.epochs, args.copies)
        return 0

    import keras

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}", flush=True)
    report = {}
    for name, fn in CHECKS.items():
        if args.only and name not in args.only:
            continue
        try:
            detail = fn(args)
            report[name] = {"ok": True, "skipped": detail is None, "detail": detail or ""}
        except Exception as exc:
            report[name] = {"ok": False, "skipped": False,
                            "detail": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        status = "ok" if report[name]["ok"] else "FAILED"
        print(f"{name}: {status}: {report[name]['detail']}", flush=True)
    print(MARKER + json.dumps(report), flush=True)
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
