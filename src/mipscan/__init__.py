"""mipscan: fast top-k retrieval for learned embeddings.

ScaNN's algorithm (k-means tree, anisotropic 4-bit AH scored with SIMD lookup tables,
exact reorder) behind ScaNN's API::

    searcher = mipscan.builder(db, 10, "dot_product").tree(100, 30).score_ah(2).reorder(500).build()
    ids, distances = searcher.search_batched_parallel(queries)

Code written for ScaNN switches by its import: ``from mipscan import scann_ops``.
"""

from mipscan._filters import Filter
from mipscan._mipscan import simd_level, simd_levels
from mipscan._policy import suggest_config
from mipscan._threads import get_num_threads
from mipscan.brute import SearchResult, brute_force
from mipscan.builder import ReorderType, ScannBuilder, builder
from mipscan.searcher import Searcher, load_searcher
from mipscan import scann_builder, scann_ops, scann_ops_pybind

__version__ = "0.1.0"


def __getattr__(name: str):
    # `mipscan.keras` (the Keras-RS layer) and `mipscan.recsys` load on first use, so that
    # `import mipscan` never imports Keras or a deep-learning backend.
    if name in ("keras", "recsys"):
        import importlib

        return importlib.import_module(f"mipscan.{name}")
    raise AttributeError(f"module 'mipscan' has no attribute {name!r}")

__all__ = [
    "Filter",
    "ReorderType",
    "ScannBuilder",
    "SearchResult",
    "Searcher",
    "brute_force",
    "builder",
    "get_num_threads",
    "load_searcher",
    "scann_builder",
    "scann_ops",
    "scann_ops_pybind",
    "simd_level",
    "simd_levels",
    "suggest_config",
]
