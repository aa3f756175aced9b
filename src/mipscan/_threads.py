"""The default thread count of mipscan's own C++ work: the CPUs this process may use.

Read once, when mipscan is imported: ``MIPSCAN_NUM_THREADS`` when set (an int in
[1, 1024]; anything else is an error at import), else the CPUs of the process's affinity
mask, further limited by a cgroup CPU quota (containers), as faiss and PyTorch do. Each
searcher then owns its count (``Searcher.set_num_threads``); there is no process-wide
setter. BLAS threads are not touched: set them with threadpoolctl or OMP_NUM_THREADS as
for any numpy program.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mipscan._validation import MAX_THREADS

ENV = "MIPSCAN_NUM_THREADS"


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, or v1 ``cfs_quota/period``),
    rounded up; None when there is no quota or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def _from_env() -> int:
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return min(usable_cpus(), MAX_THREADS)
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"{ENV} must be an int in [1, {MAX_THREADS}]; got {raw!r}")
    return value


_default_threads = _from_env()


def get_num_threads() -> int:
    """The default thread count of new searchers and builds: ``MIPSCAN_NUM_THREADS``, or
    the CPUs this process may use (affinity and cgroup quota), read at import."""
    return _default_threads
