"""Process-wide thread count for mipscan's own C++ work (search_batched_parallel,
brute_force's top-k, index encoding). BLAS threads are not touched: set them with
threadpoolctl or OMP_NUM_THREADS as for any numpy program."""

from __future__ import annotations

import os

_num_threads = os.cpu_count() or 1


def set_num_threads(num_threads: int) -> None:
    """Sets how many threads mipscan's parallel calls use (default: all cores).

    Args:
        num_threads: an int in [1, 1024].

    Raises:
        TypeError: num_threads is not an int.
        ValueError: num_threads < 1.
    """
    from mipscan._validation import MAX_THREADS, check_int

    global _num_threads
    _num_threads = check_int("set_num_threads()", "num_threads", num_threads, 1, MAX_THREADS)


def get_num_threads() -> int:
    """Returns the thread count set by :func:`set_num_threads` (default: all cores)."""
    return _num_threads
