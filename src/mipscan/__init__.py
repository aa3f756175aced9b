"""mipscan: fast top-k retrieval for learned embeddings.

Public names: :func:`builder`, :func:`load_searcher`, :func:`brute_force`,
:func:`simd_level`, :func:`set_num_threads`, :class:`SearchResult`.
"""

from mipscan._mipscan import simd_level
from mipscan.brute import SearchResult, brute_force
from mipscan._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "SearchResult",
    "brute_force",
    "get_num_threads",
    "set_num_threads",
    "simd_level",
]
