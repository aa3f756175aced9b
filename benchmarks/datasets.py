"""Datasets for the recall-QPS harness.

Every loader returns a :class:`Dataset` whose ``metric`` is what each system is asked to do
(``dot_product`` or ``squared_l2``); angular sets are L2-normalised on both sides and run as
inner product, which is how ScaNN runs glove-100-angular.

Specs accepted by :func:`load`:

- ``seed``: the Keras-RS ScaNN tutorial's 270,882 x 32 candidates and the 943 user
  embeddings (users 1..943) of the trained MovieLens two-tower model
  (``mipscan.recsys.tutorial_embeddings``; cached by that function).
- ``glove-50-dev`` (inner product, ``neighbors_ip``) and ``glove-50-dev:angular``
  (``neighbors``): ``../shared/data/glove-50-dev/glove-50-dev-90k.hdf5``.
- ``PATH.hdf5`` (optionally ``PATH.hdf5:angular|dot|euclidean``): any ann-benchmarks file
  (``train``/``test``/``neighbors``; metric from its ``distance`` attribute).
- ``synthetic:n=100000,d=32,nq=1000,seed=0,copies=100``: clustered base vectors times uniform
  noise copies, shaped like the tutorial's candidates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import SHARED_DATA

GLOVE = SHARED_DATA / "glove-50-dev" / "glove-50-dev-90k.hdf5"
ML100K = SHARED_DATA / "ml-100k"


class DatasetUnavailable(RuntimeError):
    """A dataset whose source (data file, or code that makes it) is not there."""


@dataclass
class Dataset:
    name: str
    metric: str  # "dot_product" or "squared_l2", what the systems are asked for
    train: np.ndarray  # (n, d) float32, C-contiguous
    test: np.ndarray  # (nq, d) float32, C-contiguous
    neighbors: np.ndarray | None  # (nq, >=k) exact ids, or None to compute
    info: dict = field(default_factory=dict)


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return _f32(x / np.where(norms > 0, norms, 1))


def load(spec: str) -> Dataset:
    """Loads a dataset from its spec (see the module docstring)."""
    if spec == "seed":
        return load_seed()
    if spec.startswith("synthetic"):
        return synthetic(**_parse_kv(spec.partition(":")[2]))
    if spec.startswith("glove-50-dev"):
        variant = spec.partition(":")[2] or "ip"
        if variant not in ("ip", "angular"):
            raise ValueError(f"glove-50-dev variant must be 'ip' or 'angular'; got {variant!r}")
        if not GLOVE.exists():
            raise DatasetUnavailable(f"glove-50-dev: {GLOVE} is missing")
        return load_hdf5(GLOVE, "angular" if variant == "angular" else "dot",
                         name="glove-50-dev" + (":angular" if variant == "angular" else ""))
    path, _, distance = spec.partition(".hdf5")
    if distance and not distance.startswith(":"):
        raise ValueError(f"cannot parse dataset spec {spec!r}")
    path = Path(path + ".hdf5")
    if not path.exists():
        raise ValueError(f"unknown dataset {spec!r}: expected seed, glove-50-dev[:angular], "
                         "synthetic:n=..,d=..,nq=.. or an existing .hdf5 path")
    return load_hdf5(path, distance[1:] or None)


def _parse_kv(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"synthetic spec items must be key=value; got {item!r}")
        out[key.strip()] = int(value)
    return out


def synthetic(n: int = 100_000, d: int = 32, nq: int = 1000, seed: int = 0,
              copies: int = 100, clusters: int = 20) -> Dataset:
    """Seeded clustered data shaped like the tutorial's candidates.

    ``ceil(n / (copies + 1))`` base vectors are drawn from a mixture of ``clusters`` Gaussians;
    the database is the base vectors followed by ``copies`` copies of them, each multiplied
    elementwise by U(0, 1) noise (the tutorial's ``candidates * uniform``), truncated to ``n``.
    Queries come from the same mixture, like user embeddings trained against those items.
    """
    if min(n, d, nq, copies + 1, clusters) < 1:
        raise ValueError("synthetic: n, d, nq, clusters must be >= 1 and copies >= 0")
    rng = np.random.default_rng(seed)
    num_base = math.ceil(n / (copies + 1))
    centers = rng.normal(0.0, 1.0, (clusters, d))

    def mixture(m):
        which = rng.integers(0, clusters, m)
        return centers[which] + rng.normal(0.0, 0.5, (m, d))

    base = mixture(num_base)
    parts = [base] + [base * rng.uniform(0.0, 1.0, base.shape) for _ in range(copies)]
    train = _f32(np.concatenate(parts)[:n] * 0.1)
    test = _f32(mixture(nq) * 0.1)
    return Dataset(f"synthetic:n={n},d={d},nq={nq},seed={seed},copies={copies}", "dot_product",
                   train, test, None,
                   {"source": "benchmarks.datasets.synthetic", "seed": seed, "copies": copies,
                    "clusters": clusters})


def load_hdf5(path: Path, distance: str | None = None, name: str | None = None) -> Dataset:
    """An ann-benchmarks HDF5 file; ``distance`` overrides the file's ``distance`` attribute."""
    import h5py

    with h5py.File(path, "r") as f:
        distance = distance or f.attrs.get("distance", "angular")
        if isinstance(distance, bytes):
            distance = distance.decode()
        train = _f32(f["train"][:])
        test = _f32(f["test"][:])
        if distance in ("dot", "ip", "inner_product", "dot_product"):
            key = "neighbors_ip" if "neighbors_ip" in f else "neighbors"
            metric = "dot_product"
        elif distance == "angular":
            key, metric = "neighbors", "dot_product"
            train, test = _normalize(train), _normalize(test)
        elif distance in ("euclidean", "l2"):
            key = "neighbors_l2" if "neighbors_l2" in f else "neighbors"
            metric = "squared_l2"
        else:
            raise ValueError(f"{path}: unsupported distance {distance!r}")
        neighbors = np.asarray(f[key][:], dtype=np.int64)
    return Dataset(name or f"{Path(path).stem}:{distance}", metric, train, test, neighbors,
                   {"source": str(path), "distance": distance, "ground_truth": key})


def load_seed(data_dir: Path = ML100K) -> Dataset:
    """The tutorial's candidates and user embeddings, from ``mipscan.recsys`` (JAX backend,
    as the tutorial, unless ``KERAS_BACKEND`` says otherwise; trained once, then cached)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        from mipscan.recsys import tutorial_embeddings
    except ImportError as exc:
        raise DatasetUnavailable(
            "seed: mipscan.recsys.tutorial_embeddings is not available yet "
            f"({exc}); use glove-50-dev, an .hdf5 path or synthetic:n=270882,d=32,nq=943") from exc
    emb = tutorial_embeddings(data_dir=data_dir, epochs=50, copies=100, seed=42)
    if hasattr(emb, "candidates"):
        candidates, users, history = emb.candidates, emb.users, emb.history
    else:
        candidates, users, history = emb
    queries = np.asarray(users)[1:944]
    info = {"source": "mipscan.recsys.tutorial_embeddings(epochs=50, copies=100, seed=42)",
            "data_dir": str(data_dir), "queries": "user embeddings of users 1..943",
            "keras_backend": os.environ["KERAS_BACKEND"],
            "from_cache": getattr(emb, "from_cache", None)}
    if isinstance(history, dict):
        info["final_losses"] = {k: float(np.ravel(v)[-1]) for k, v in history.items()
                                if np.size(v)}
    return Dataset("seed", "dot_product", _f32(candidates), _f32(queries), None, info)
