"""The tutorial's two-tower model: split, training curve, determinism, embeddings + cache."""

from __future__ import annotations

import numpy as np
import pytest

# Imported before keras so that the module picks the backend (JAX unless KERAS_BACKEND).
recsys_model = pytest.importorskip("mipscan.recsys.model")

from mipscan.recsys import (  # noqa: E402
    TUTORIAL_QUERY_USERS,
    build_candidates,
    split_ratings,
    train_two_tower,
    tutorial_embeddings,
)

EPOCHS = 15  # 3 validations; the tutorial's curve already falls (50 epochs cost ~3x more)


@pytest.fixture(scope="module")
def trained(ml100k):
    epochs_seen = []
    model, history = train_two_tower(ml100k, epochs=EPOCHS, seed=42,
                                     progress=lambda e, logs: epochs_seen.append(e))
    return model, history, epochs_seen


def test_backend_defaults_to_jax():
    import os

    import keras

    assert keras.backend.backend() == os.environ.get("KERAS_BACKEND", "jax")


def test_split(ml100k):
    (x_tr, y_tr), (x_te, y_te) = split_ratings(ml100k, seed=42)
    assert x_tr.shape == (80_000,) and x_te.shape == (20_000,)
    assert x_tr.dtype == np.int32 and y_tr["movie_id"].dtype == np.int32
    pairs = lambda x, y: set(zip(x.tolist(), y["movie_id"].tolist()))  # noqa: E731
    assert not pairs(x_tr, y_tr) & pairs(x_te, y_te)  # (user, movie) pairs are unique
    labels = np.concatenate([y_tr["rating"], y_te["rating"]])
    assert set(np.unique(labels).tolist()) == {0.0, 0.25, 0.5, 0.75, 1.0}  # (r - 1) / 4
    # the same seed gives the same split; another seed another one
    (x2, _), _ = split_ratings(ml100k, seed=42)
    (x3, _), _ = split_ratings(ml100k, seed=7)
    assert np.array_equal(x_tr, x2) and not np.array_equal(x_tr, x3)


def test_training_lowers_losses(trained):
    model, history, epochs_seen = trained
    loss, val = history["loss"], history["val_loss"]
    assert len(loss) == EPOCHS and epochs_seen == list(range(1, EPOCHS + 1))
    assert history["val_epochs"] == [5, 10, 15] and len(val) == 3
    # The tutorial's curve: the training loss falls every epoch from about 0.48, and the
    # validation loss falls too, slowly at first (0.4835 -> 0.4834 over its epochs 5-15).
    assert all(b < a for a, b in zip(loss, loss[1:])), loss
    assert val[-1] < val[0], val
    assert 0.4 < loss[-1] < 0.5 and 0.4 < val[-1] < 0.5


def test_model_tables(trained, ml100k):
    model, _, _ = trained
    assert tuple(model.user_embedding.embeddings.shape) == (943 + 1000, 32)
    assert tuple(model.candidate_embedding.embeddings.shape) == (1682 + 1000, 32)


def test_same_seed_same_losses(trained, ml100k):
    _, history, _ = trained
    model2, history2 = train_two_tower(ml100k, epochs=EPOCHS, seed=42)
    assert history2 == history
    model1 = trained[0]
    assert np.array_equal(recsys_model.table_to_numpy(model1.candidate_embedding),
                          recsys_model.table_to_numpy(model2.candidate_embedding))
    _, history3 = train_two_tower(ml100k, epochs=EPOCHS, seed=43)
    assert history3["loss"] != history["loss"]


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_train_rejects_bad_epochs(ml100k, bad, exc):
    with pytest.raises(exc, match="train_two_tower\\(\\): epochs"):
        train_two_tower(ml100k, epochs=bad)


def test_build_candidates(rng):
    table = rng.standard_normal((7, 3)).astype(np.float32)
    cands = build_candidates(table, copies=4, seed=1)
    assert cands.shape == (35, 3) and cands.dtype == np.float32
    assert np.array_equal(cands[:7], table)
    ratio = cands[7:].reshape(4, 7, 3) / table
    assert (ratio >= 0).all() and (ratio < 1).all()  # uniform [0, 1) noise
    assert len(np.unique(ratio)) == ratio.size  # a fresh draw for every element
    assert np.array_equal(cands, build_candidates(table, copies=4, seed=1))
    assert not np.array_equal(cands, build_candidates(table, copies=4, seed=2))


def test_tutorial_embeddings_and_cache(ml100k_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    emb = tutorial_embeddings(ml100k_dir, epochs=5, copies=3, seed=42)
    assert not emb.from_cache and emb.cache_path is not None
    assert emb.movie_table_rows == 2682
    assert emb.candidates.shape == (2682 * 4, 32) and emb.candidates.dtype == np.float32
    assert emb.users.shape == (944, 32) and emb.users.dtype == np.float32  # row = user id
    assert emb.all_users.shape == (943, 32)
    assert np.array_equal(emb.all_user_ids, np.arange(1, 944))
    assert emb.query_user_ids == TUTORIAL_QUERY_USERS == (10, 5, 42, 345)
    assert np.array_equal(emb.tutorial_queries, emb.users[[10, 5, 42, 345]])
    assert len(emb.history["loss"]) == 5 and len(emb.history["val_loss"]) == 1

    again = tutorial_embeddings(ml100k_dir, epochs=5, copies=3, seed=42)
    assert again.from_cache and again.cache_path == emb.cache_path
    assert np.array_equal(again.candidates, emb.candidates)
    assert np.array_equal(again.users, emb.users)
    assert again.history == emb.history

    # another key (copies) is a miss, and the model behind it is the same training run
    other = tutorial_embeddings(ml100k_dir, epochs=5, copies=1, seed=42)
    assert not other.from_cache and other.cache_path != emb.cache_path
    assert np.array_equal(other.candidates, emb.candidates[: 2682 * 2])
    # cache=False neither reads nor writes
    files = sorted(p.name for p in (tmp_path / "mipscan").iterdir())
    fresh = tutorial_embeddings(ml100k_dir, epochs=5, copies=3, seed=42, cache=False)
    assert not fresh.from_cache and fresh.cache_path is None
    assert np.array_equal(fresh.candidates, emb.candidates)
    assert sorted(p.name for p in (tmp_path / "mipscan").iterdir()) == files


def test_damaged_cache_is_retrained(ml100k_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    emb = tutorial_embeddings(ml100k_dir, epochs=1, copies=0, seed=42)
    with open(emb.cache_path, "wb") as f:
        f.write(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = tutorial_embeddings(ml100k_dir, epochs=1, copies=0, seed=42)
    assert not again.from_cache
    assert np.array_equal(again.candidates, emb.candidates)


def test_cache_key():
    base = ("ab" * 32, 50, 100, 42, "jax")
    path = recsys_model.cache_file(*base)
    assert path == recsys_model.cache_file(*base)
    for i, other in enumerate(("cd" * 32, 49, 99, 43, "torch")):
        changed = list(base)
        changed[i] = other
        assert recsys_model.cache_file(*changed) != path, f"key ignores argument {i}"
