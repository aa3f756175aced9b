"""Helpers shared by the benchmark scripts: thread pinning, timing, memory, environment."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags of interest that this CPU reports (Linux only)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = {"avx", "avx2", "fma", "avx512f", "avx512bw"}
                return sorted(flags & wanted)
    except OSError:
        pass
    return []


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict | None:
    """The checkout's commit and whether ``src/`` has uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "CMakeLists.txt"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "src_dirty": bool(dirty.strip())}


def environment() -> dict:
    """Everything about the machine and software that a benchmark number depends on."""
    env = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_start": list(os.getloadavg()),
        "versions": {name: package_version(name) for name in
                     ("mipscan", "numpy", "scann", "faiss-cpu", "hnswlib", "threadpoolctl",
                      "keras", "keras-rs", "jax")},
    }
    env["git"] = git_state()
    try:
        import mipscan

        env["mipscan_simd_level"] = mipscan_simd(mipscan)
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        env["mipscan_simd_level"] = f"unavailable: {exc}"
    return env


def mipscan_simd(mipscan) -> str:
    """mipscan's SIMD level, with "+gfni" when its AVX-512 scans use GFNI."""
    level = mipscan.simd_level()
    gfni = getattr(mipscan._mipscan, "cpu_has_gfni", lambda: False)()
    return level + ("+gfni" if level == "avx512" and gfni else "")


#: The thread count of the innermost pinned_threads() block (None outside any).
PINNED: int | None = None


@contextlib.contextmanager
def pinned_threads(n: int):
    """Limits BLAS, OpenMP (threadpoolctl) and faiss's OpenMP to ``n`` threads, and sets
    ``PINNED`` to ``n`` for the libraries that take a thread count per searcher or call
    (mipscan, hnswlib, ScaNN), which read it from there or get it from the caller.
    """
    from threadpoolctl import threadpool_limits

    global PINNED
    old_pinned, PINNED = PINNED, n
    old_faiss = None
    if "faiss" in sys.modules:
        import faiss

        old_faiss = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        PINNED = old_pinned
        if old_faiss is not None:
            import faiss

            faiss.omp_set_num_threads(old_faiss)


def threadpool_info() -> list[dict]:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries (what pinning reaches)."""
    from threadpoolctl import threadpool_info as info

    return [{k: p.get(k) for k in ("user_api", "internal_api", "prefix", "num_threads", "version")}
            for p in info()]


def time_median(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns (median s, all s)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM, reset by :func:`reset_peak_rss`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def numpy_topk(db: np.ndarray, queries: np.ndarray, k: int, metric: str = "dot_product",
               block: int = 128) -> np.ndarray:
    """Exact top-k ids, best first: blocks of queries, matmul, argpartition, sort of the top k."""
    nq = queries.shape[0]
    out = np.empty((nq, k), np.int64)
    bias = None
    if metric == "squared_l2":
        bias = -np.einsum("ij,ij->i", db, db)
    for b0 in range(0, nq, block):
        q = queries[b0:b0 + block]
        if bias is None:
            scores = q @ db.T
        else:
            scores = 2.0 * (q @ db.T) + bias
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        out[b0:b0 + block] = np.take_along_axis(part, order, axis=1)
    return out


class CpuNoise:
    """Measures how much CPU other processes used while a measurement ran.

    ``foreign_cores`` = (all cores' busy time from /proc/stat - this process's CPU time) /
    wall time, in cores: 0 on an idle machine, up to ``os.cpu_count()`` when other work
    takes every core. None where /proc/stat is missing.
    """

    def __enter__(self):
        self._start = (_busy_seconds(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy0, own0, t0 = self._start
        busy1, own1, t1 = _busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        self.foreign_cores = (None if busy0 is None or busy1 is None
                              else max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9))
        return False


def _busy_seconds() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_thread_scaling(threads: int, runs: int = 9, hashes: int = 40) -> float:
    """This machine's own n-thread scaling for work that shares nothing and needs no
    memory bandwidth: SHA-256 of a 1 MiB buffer (hashlib releases the GIL), ``threads``
    threads each hashing as much as one thread alone does, in turns with that one thread;
    the median of the paired ratios (n x one thread's time / n threads' time). What a
    search's scaling can be judged against on a VM whose cores do not give n x (shared
    physical cores, frequency, other guests)."""
    import hashlib
    import threading

    buf = bytes(1 << 20)

    def work():
        for _ in range(hashes):
            hashlib.sha256(buf).digest()

    def timed(n):
        pool = [threading.Thread(target=work) for _ in range(n)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return time.perf_counter() - t0

    ratios = []
    for _ in range(runs):
        one = timed(1)
        ratios.append(threads * one / timed(threads))
    return statistics.median(ratios)


def wait_for_quiet(max_seconds: float, threshold: float = 0.3, window: float = 2.0) -> float:
    """Waits (up to ``max_seconds``) until other processes use under ``threshold`` cores
    over a ``window``-second sample; returns the last sample's foreign cores."""
    deadline = time.perf_counter() + max_seconds
    while True:
        with CpuNoise() as noise:
            time.sleep(window)
        if noise.foreign_cores is None or noise.foreign_cores < threshold \
                or time.perf_counter() >= deadline:
            return noise.foreign_cores
