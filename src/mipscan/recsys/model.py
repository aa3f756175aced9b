"""The Keras-RS ScaNN tutorial's two-tower retrieval model, in Keras 3, and its embeddings.

Reproduces keras-io ``examples/keras_rs/scann.py``: one embedding table per tower
(dimension 32), score = dot product, MSE against ``(rating - 1) / 4``, Adagrad(0.1),
batches of 1000, 50 epochs, ratings shuffled once (seed 42) then split 80,000 / 20,000,
validation every 5 epochs. The candidate set is the movie table followed by ``copies``
noisy copies of it, as the tutorial builds it to simulate a large catalogue.

Keras runs on JAX unless ``KERAS_BACKEND`` names another backend before Keras is first
imported.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from mipscan._validation import check_int  # noqa: E402
from mipscan.recsys.movielens import MovieLens100K, cache_dir, load_ml100k  # noqa: E402

#: The users whose recommendations the tutorial retrieves.
TUTORIAL_QUERY_USERS = (10, 5, 42, 345)

EMBEDDING_DIM = 32
TABLE_SLACK = 1000  # the tutorial sizes both tables (count + 1000)
BATCH_SIZE = 1000
NUM_TRAIN = 80_000
NUM_TEST = 20_000
VALIDATION_FREQ = 5
LEARNING_RATE = 0.1
_CACHE_VERSION = 1  # bump when the cached arrays change meaning


@keras.saving.register_keras_serializable(package="mipscan")
class RetrievalModel(keras.Model):
    """Two embedding tables; the loss scores (user, movie) pairs by their dot product."""

    def __init__(self, num_users: int, num_candidates: int,
                 embedding_dimension: int = EMBEDDING_DIM, **kwargs):
        super().__init__(**kwargs)
        self.num_users = num_users
        self.num_candidates = num_candidates
        self.embedding_dimension = embedding_dimension
        self.user_embedding = keras.layers.Embedding(num_users, embedding_dimension)
        self.candidate_embedding = keras.layers.Embedding(num_candidates, embedding_dimension)
        self.loss_fn = keras.losses.MeanSquaredError()

    def build(self, input_shape):
        self.user_embedding.build(input_shape)
        self.candidate_embedding.build(input_shape)
        super().build(input_shape)

    def call(self, inputs, training=False):
        return {"user_embeddings": self.user_embedding(inputs)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        candidate_embeddings = self.candidate_embedding(y["movie_id"])
        labels = keras.ops.expand_dims(y["rating"], -1)
        scores = keras.ops.sum(
            keras.ops.multiply(y_pred["user_embeddings"], candidate_embeddings),
            axis=1, keepdims=True)
        return self.loss_fn(labels, scores, sample_weight)

    def get_config(self):
        return {**super().get_config(), "num_users": self.num_users,
                "num_candidates": self.num_candidates,
                "embedding_dimension": self.embedding_dimension}


def split_ratings(data: MovieLens100K, seed: int = 42):
    """The tutorial's split: one seeded shuffle, then 80,000 train and 20,000 test.

    Returns ``((x_train, y_train), (x_test, y_test))`` where x is the user ids (int32)
    and y is ``{"movie_id": int32, "rating": float32 (rating - 1) / 4}``.
    """
    order = np.random.default_rng(seed).permutation(data.num_ratings)
    x = data.user_id[order].astype(np.int32)
    y = {"movie_id": data.movie_id[order].astype(np.int32),
         "rating": ((data.rating[order] - 1.0) / 4.0).astype(np.float32)}
    train = slice(0, NUM_TRAIN)
    test = slice(NUM_TRAIN, NUM_TRAIN + NUM_TEST)
    return ((x[train], {k: v[train] for k, v in y.items()}),
            (x[test], {k: v[test] for k, v in y.items()}))


def train_two_tower(data: MovieLens100K, epochs: int = 50, seed: int = 42,
                    progress: Callable[[int, dict], None] | None = None):
    """Trains the tutorial's two-tower model on ml-100k, deterministically.

    Args:
        data: from :func:`mipscan.recsys.load_ml100k`.
        epochs: an int >= 1 (the tutorial: 50). Validation runs every 5 epochs.
        seed: seeds the shuffle and Keras (``keras.utils.set_random_seed``).
        progress: called as ``progress(epoch, logs)`` after each epoch (epoch counts
            from 1; logs holds ``loss`` and, every 5 epochs, ``val_loss``).

    Returns:
        ``(model, history)``: the trained :class:`RetrievalModel` and
        ``{"loss": [...], "val_loss": [...], "val_epochs": [...]}`` (floats; val_epochs
        are the 1-based epochs that ran validation).

    Raises:
        TypeError/ValueError: epochs or seed is not an int in range.
    """
    call = "train_two_tower()"
    epochs = check_int(call, "epochs", epochs, 1, None)
    seed = check_int(call, "seed", seed, 0, 2**32 - 1)
    if data.num_ratings < NUM_TRAIN + NUM_TEST:
        raise ValueError(f"{call}: data must hold at least {NUM_TRAIN + NUM_TEST} ratings "
                         f"for the tutorial's split; got {data.num_ratings}")
    (x_train, y_train), (x_test, y_test) = split_ratings(data, seed)

    keras.utils.set_random_seed(seed)
    model = RetrievalModel(data.max_user_id + TABLE_SLACK, data.num_movies + TABLE_SLACK)
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=LEARNING_RATE))
    callbacks = []
    if progress is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: progress(epoch + 1, dict(logs or {}))))
    # shuffle=False: the tutorial shuffles once (reshuffle_each_iteration=False).
    fit = model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=False,
                    validation_data=(x_test, y_test), validation_freq=VALIDATION_FREQ,
                    callbacks=callbacks, verbose=0)
    history = {
        "loss": [float(v) for v in fit.history["loss"]],
        "val_loss": [float(v) for v in fit.history.get("val_loss", [])],
        "val_epochs": list(range(VALIDATION_FREQ, epochs + 1, VALIDATION_FREQ)),
    }
    return model, history


def table_to_numpy(layer) -> np.ndarray:
    """A trained Embedding layer's table as float32 numpy, on any backend."""
    # Via .value: Variable.numpy() trips a numpy 2 DeprecationWarning inside Keras 3.15.
    return keras.ops.convert_to_numpy(layer.embeddings.value).astype(np.float32)


def build_candidates(movie_table: np.ndarray, copies: int = 100, seed: int = 42) -> np.ndarray:
    """The tutorial's candidate set: the table, then ``copies`` copies of it, each
    multiplied elementwise by seeded uniform [0, 1) noise (numpy ``default_rng(seed)``).

    Returns float32 ``(rows * (copies + 1), d)``; candidate ``i`` is a copy of movie id
    ``i % rows``.
    """
    copies = check_int("build_candidates()", "copies", copies, 0, None)
    table = np.ascontiguousarray(movie_table, dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty(((copies + 1) * table.shape[0], table.shape[1]), np.float32)
    out[: table.shape[0]] = table
    for c in range(copies):
        rows = slice((c + 1) * table.shape[0], (c + 2) * table.shape[0])
        out[rows] = table * rng.random(table.shape, dtype=np.float32)
    return out


def rated_candidates(data: MovieLens100K, user_ids, movie_table_rows: int, copies: int = 100,
                     seed: int = 42) -> list[np.ndarray]:
    """Per user id, the candidate rows of the movies that user rated in the tutorial's
    training split (:func:`split_ratings`): every copy of each rated movie (candidate
    ``i`` is a copy of movie id ``i % movie_table_rows``, :func:`build_candidates`).
    What "never recommend what the user already rated" excludes: pass the list as
    ``excluded=`` to ``search_batched`` (int64 arrays, ascending)."""
    (x_train, y_train), _ = split_ratings(data, seed)
    movies = y_train["movie_id"].astype(np.int64)
    order = np.argsort(x_train, kind="stable")
    users_sorted, movies_sorted = x_train[order], movies[order]
    copies_off = np.arange(copies + 1, dtype=np.int64) * int(movie_table_rows)
    out = []
    for u in np.asarray(user_ids).tolist():
        lo, hi = np.searchsorted(users_sorted, [u, u + 1])
        rated = np.unique(movies_sorted[lo:hi])
        out.append(np.sort((rated[None, :] + copies_off[:, None]).ravel()))
    return out


@dataclass(frozen=True, eq=False)
class TutorialEmbeddings:
    """What the tutorial retrieves with.

    ``candidates``: float32 (num_candidates, 32), the movie table followed by its noisy
    copies (270,882 rows for ``copies=100``). ``users``: float32 (max_user_id + 1, 32),
    the user table's rows indexed by user id (row 0 is never trained).
    ``history``: the training losses (see :func:`train_two_tower`).
    """

    candidates: np.ndarray
    users: np.ndarray
    history: dict
    movie_table_rows: int
    from_cache: bool = False
    cache_path: str | None = None
    query_user_ids: tuple[int, ...] = field(default=TUTORIAL_QUERY_USERS)

    @property
    def tutorial_queries(self) -> np.ndarray:
        """The embeddings of the tutorial's users 10, 5, 42, 345, shape (4, 32)."""
        return self.users[list(self.query_user_ids)]

    @property
    def all_user_ids(self) -> np.ndarray:
        """Every real user id (1..943)."""
        return np.arange(1, self.users.shape[0], dtype=np.int32)

    @property
    def all_users(self) -> np.ndarray:
        """The embeddings of every real user (1..943), shape (943, 32)."""
        return self.users[1:]


def tutorial_embeddings(data_dir=None, epochs: int = 50, copies: int = 100, seed: int = 42,
                        cache: bool = True, *,
                        progress: Callable[[int, dict], None] | None = None
                        ) -> TutorialEmbeddings:
    """Trains (or loads from the cache) the tutorial model and builds its candidates.

    Args:
        data_dir: where ml-100k is (see :func:`mipscan.recsys.load_ml100k`), or an
            already loaded :class:`~mipscan.recsys.MovieLens100K`.
        epochs: training epochs (the tutorial: 50).
        copies: noisy copies of the movie table appended to it (the tutorial: 100).
        seed: seeds the split, Keras and the noise.
        cache: read and write ``tutorial-<key>.npz`` in :func:`cache_dir`, keyed by the
            data's sha256, epochs, copies, seed and the Keras backend.
        progress: passed to :func:`train_two_tower` (not called on a cache hit).

    Returns:
        A :class:`TutorialEmbeddings`.
    """
    call = "tutorial_embeddings()"
    epochs = check_int(call, "epochs", epochs, 1, None)
    copies = check_int(call, "copies", copies, 0, None)
    seed = check_int(call, "seed", seed, 0, 2**32 - 1)
    data = data_dir if isinstance(data_dir, MovieLens100K) else load_ml100k(data_dir)
    path = cache_file(data.sha256, epochs, copies, seed, keras.backend.backend())

    if cache and path.is_file():
        try:
            with np.load(path) as z:
                return TutorialEmbeddings(
                    candidates=z["candidates"], users=z["users"],
                    history={"loss": z["loss"].tolist(), "val_loss": z["val_loss"].tolist(),
                             "val_epochs": z["val_epochs"].tolist()},
                    movie_table_rows=int(z["movie_table_rows"]), from_cache=True,
                    cache_path=str(path))
        except (OSError, KeyError, ValueError) as exc:
            warnings.warn(f"{call}: ignoring the unreadable cache file {path} ({exc}); "
                          f"retraining", stacklevel=2)

    model, history = train_two_tower(data, epochs=epochs, seed=seed, progress=progress)
    table = table_to_numpy(model.candidate_embedding)
    users = table_to_numpy(model.user_embedding)
    users = np.ascontiguousarray(users[: data.max_user_id + 1])
    result = TutorialEmbeddings(build_candidates(table, copies, seed), users, history,
                                table.shape[0])
    if cache:
        try:
            _save_npz(path, candidates=result.candidates, users=users,
                      loss=np.asarray(history["loss"]),
                      val_loss=np.asarray(history["val_loss"]),
                      val_epochs=np.asarray(history["val_epochs"], np.int64),
                      movie_table_rows=np.int64(table.shape[0]))
            result = TutorialEmbeddings(result.candidates, users, history, table.shape[0],
                                        cache_path=str(path))
        except OSError as exc:
            warnings.warn(f"{call}: could not write the cache file {path} ({exc})",
                          stacklevel=2)
    return result


def cache_file(data_sha256: str, epochs: int, copies: int, seed: int, backend: str) -> Path:
    """Where :func:`tutorial_embeddings` caches one configuration (in :func:`cache_dir`)."""
    key = hashlib.sha256(
        f"v{_CACHE_VERSION}|{data_sha256}|{epochs}|{copies}|{seed}|{backend}".encode()
    ).hexdigest()[:20]
    return cache_dir() / f"tutorial-{key}.npz"


def _save_npz(path: Path, **arrays) -> None:
    """Writes an .npz atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".npz.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["TUTORIAL_QUERY_USERS", "RetrievalModel", "TutorialEmbeddings", "build_candidates",
           "rated_candidates", "split_ratings", "train_two_tower", "tutorial_embeddings"]
