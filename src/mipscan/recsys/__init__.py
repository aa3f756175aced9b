"""The recommender pipeline around mipscan: MovieLens 100K and the Keras-RS two-tower model.

``load_ml100k`` needs only numpy. The model names (``train_two_tower``,
``tutorial_embeddings``, ...) need the ``recsys`` extra (keras, keras-rs, jax) and are
imported on first use, so that reading the data does not start a Keras backend.
Keras uses JAX unless ``KERAS_BACKEND`` says otherwise.
"""

from mipscan.recsys.movielens import (
    GENRES,
    ML100K_SHA256,
    ML100K_URL,
    DataNotFoundError,
    MovieLens100K,
    cache_dir,
    load_ml100k,
)

_MODEL_NAMES = ("TUTORIAL_QUERY_USERS", "TutorialEmbeddings", "build_candidates",
                "rated_candidates", "split_ratings", "train_two_tower", "tutorial_embeddings")


def __getattr__(name):
    if name in _MODEL_NAMES:
        from mipscan.recsys import model

        return getattr(model, name)
    raise AttributeError(f"module 'mipscan.recsys' has no attribute {name!r}")


__all__ = ["GENRES", "ML100K_SHA256", "ML100K_URL", "DataNotFoundError", "MovieLens100K",
           "cache_dir", "load_ml100k", *_MODEL_NAMES]
