"""Shared fixtures: a seeded rng, the ../shared/data sets, and hypothesis's `ci` profile."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# Keras reads this once, on first import, whichever test imports it first; mipscan.recsys
# defaults to JAX the same way.
os.environ.setdefault("KERAS_BACKEND", "jax")

# ---------------------------------------------------------------- hypothesis
# `ci`: reproducible (derandomize) and timing-free (deadline=None); the default here.
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=50,
                          print_blob=True)
# `long`: the hardening fuzz (tests/test_fuzz.py) at >= 10,000 cases in total;
# HYPOTHESIS_PROFILE=long also makes tests/test_killed_writes.py and
# tests/test_concurrency.py do their long runs.
settings.register_profile("long", deadline=None, derandomize=False, max_examples=1200,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ---------------------------------------------------------------- data
#: ../shared/data beside the checkout (never copied into the repo: licences and size).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    """The path of ``../shared/data/<name>``. When it is absent the calling test is
    skipped, or failed when ``MIPSCAN_REQUIRE_DATA=1`` (CI sets it, so data-backed tests
    cannot pass by skipping)."""
    path = SHARED_DATA / name
    if not path.exists():
        msg = f"shared data set {name!r} not found at {path}"
        if os.environ.get("MIPSCAN_REQUIRE_DATA") == "1":
            pytest.fail(msg + " (MIPSCAN_REQUIRE_DATA=1)", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared_data_dir():
    """``shared_data_dir("ml-100k")`` -> Path; see :func:`shared_data`."""
    return shared_data


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return shared_data("ml-100k")


@pytest.fixture(scope="session")
def ml100k(ml100k_dir):
    """MovieLens 100K, read once per session."""
    from mipscan.recsys import load_ml100k

    return load_ml100k(ml100k_dir)


# ---------------------------------------------------------------- randomness
@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded generator per test."""
    return np.random.default_rng(20260426)


def pytest_collection_modifyitems(session, config, items):
    """tests/test_serve_ray.py runs before tests/test_distributed.py. The latter starts an
    in-process local cluster (``ray.init(address="local")``); a driver of the same process
    that joins another cluster afterwards sees the actors it creates there destroyed at
    once ("all references to the actor were removed"), while the other order works.
    Ray's driver state across ``ray.shutdown()`` is the suspect; until that is pinned
    down, the order keeps both modules on a fresh-enough driver."""
    moved = [it for it in items if it.path.name == "test_serve_ray.py"]
    rest = [it for it in items if it.path.name != "test_serve_ray.py"]
    first = next((i for i, it in enumerate(rest) if it.path.name == "test_distributed.py"), None)
    if moved and first is not None:
        items[:] = rest[:first] + moved + rest[first:]
