"""Fault injection: allocations and thread starts in the core fail at random points.

The module is built with -DMIPSCAN_FAULT_INJECTION=ON (src/mipscan/_core/fault.h); each
case runs a fixed list of builds and searches in its own subprocess under
MIPSCAN_FAULTS=seed:probability. Every operation must either complete with exactly the
answer of a fault-free run, or raise MemoryError/RuntimeError; the process must never
abort or crash (exit code 0), whatever thread the fault hit.

Which module: $MIPSCAN_FAULTS_PKG (a folder holding a `mipscan` package with the
fault-injected extension, as tools/faults.sh makes), or else this test builds one with
CMake into build/faults (incremental: ~15 s the first time) and skips if it cannot.
Cases: 24 (MIPSCAN_FAULT_CASES=n for more; tools/faults.sh runs 200).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = int(os.environ.get("MIPSCAN_FAULT_CASES", "24"))
PROBABILITIES = (0.0005, 0.003, 0.02, 0.1)

pytestmark = pytest.mark.skipif(os.environ.get("MIPSCAN_SANITIZED") == "1",
                                reason="builds its own (uninstrumented) module")


def build_package(out: Path) -> Path:
    """Builds the fault-injected extension and a package folder around it."""
    import nanobind

    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: run tools/faults.sh")
    build = out / "cmake"
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                          "-DCMAKE_BUILD_TYPE=Release", "-DMIPSCAN_FAULT_INJECTION=ON",
                          f"-DPython_EXECUTABLE={sys.executable}",
                          f"-Dnanobind_ROOT={nanobind.cmake_dir()}"],
                         capture_output=True, text=True)
    if cfg.returncode != 0:
        pytest.skip(f"cannot configure the fault-injection build: {cfg.stderr[-500:]}")
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    pkg = out / "pkg"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(ROOT / "src" / "mipscan", pkg / "mipscan",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "_core"))
    for so in build.glob("_mipscan*.so"):
        shutil.copy(so, pkg / "mipscan")
    return pkg


@pytest.fixture(scope="module")
def package():
    given = os.environ.get("MIPSCAN_FAULTS_PKG")
    return Path(given) if given else build_package(ROOT / "build" / "faults")


CHILD = r"""
import hashlib, sys, threading
import numpy as np
import mipscan
from mipscan import _mipscan

assert _mipscan.fault_injection(), _mipscan.__file__
rng = np.random.default_rng(0)
db = rng.normal(size=(3000, 16)).astype(np.float32)
q = rng.normal(size=(64, 16)).astype(np.float32)


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def report(name, fn):
    try:
        out = fn()
    except (MemoryError, RuntimeError) as exc:
        print(name, "err", type(exc).__name__, flush=True)
        return None
    print(name, "ok", out, flush=True)
    return out


def build_digest(b):
    s = b.build()
    return digest(*(s._arrays[k] for k in sorted(s._arrays)))


report("build_ah", lambda: build_digest(
    mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(40)))
report("build_soar", lambda: build_digest(
    mipscan.builder(db, 10, "cosine").tree(20, 5, soar_lambda=1.0).score_ah(2).reorder(40)))
report("brute", lambda: digest(*mipscan.brute_force(db, q, 10, "squared_l2", num_threads=4)))

# The searcher to search with: loaded from the parent's folder (retried: loading makes the
# Index, whose construction may fail too).
s = None
for attempt in range(100):
    try:
        s = mipscan.load_searcher(sys.argv[1])
        break
    except (MemoryError, RuntimeError):
        pass
assert s is not None, "could not load in 100 attempts"

report("search_batched", lambda: digest(*s.search_batched(q)))
report("search_parallel", lambda: digest(*s.search_batched_parallel(q, batch_size=16)))
report("search_single", lambda: digest(*[a for i in range(8) for a in s.search(q[i])]))
report("search_wide", lambda: digest(*s.search_batched_parallel(
    q, final_num_neighbors=200, pre_reorder_num_neighbors=1000, leaves_to_search=20)))

# Concurrent callers, each with 4 threads: every one completes identically or fails cleanly.
mq = s._to_mips(q)
results, errors = [], []
def caller():
    try:
        results.append(digest(*s._index.search_batch(mq, None, 5, 40, 10, 4)))
    except (MemoryError, RuntimeError) as exc:
        errors.append(type(exc).__name__)
threads = [threading.Thread(target=caller) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if len(set(results)) > 1:
    print("concurrent MISMATCH", flush=True)
elif results:
    print("concurrent", "ok" if not errors else "partial", results[0], flush=True)
else:
    print("concurrent err", errors[0], flush=True)
"""


def run_child(package: Path, folder: Path, faults: str | None):
    env = {k: v for k, v in os.environ.items() if k not in ("MIPSCAN_FAULTS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(package)
    if faults is not None:
        env["MIPSCAN_FAULTS"] = faults
    return subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)


def parse(stdout: str) -> list[tuple[str, str, str]]:
    return [tuple(line.split(" ", 2)) for line in stdout.splitlines() if line.strip()]


def test_faults_give_right_answers_or_clean_errors(package, tmp_path):
    import mipscan  # the normal module: writes the index every child loads

    rng = np.random.default_rng(0)
    db = rng.normal(size=(3000, 16)).astype(np.float32)
    (mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(40).build()
     .serialize(tmp_path / "ix"))

    ref_run = run_child(package, tmp_path / "ix", None)
    assert ref_run.returncode == 0, ref_run.stderr[-3000:]
    ref = {name: value for name, status, value in parse(ref_run.stdout)}
    assert all(status == "ok" for _, status, _ in parse(ref_run.stdout)), ref_run.stdout
    assert len(ref) == 8, ref_run.stdout

    outcomes: Counter = Counter()
    failures: list[str] = []
    for case in range(CASES):
        p = PROBABILITIES[case % len(PROBABILITIES)]
        faults = f"{case + 1}:{p}"
        r = run_child(package, tmp_path / "ix", faults)
        if r.returncode != 0:
            kind = "crash" if r.returncode < 0 or r.returncode > 1 else "uncaught exception"
            outcomes[kind] += 1
            failures.append(f"MIPSCAN_FAULTS={faults}: {kind}, exit {r.returncode}: "
                            f"{r.stderr.strip()[-1500:]}")
            continue
        for name, status, value in parse(r.stdout):
            if status in ("ok", "partial") and value != ref[name]:
                outcomes["wrong answer"] += 1
                failures.append(f"MIPSCAN_FAULTS={faults}: {name} gave a wrong answer")
            elif status == "err" and value not in ("MemoryError", "RuntimeError"):
                outcomes["wrong error"] += 1
                failures.append(f"MIPSCAN_FAULTS={faults}: {name} raised {value}")
            elif status == "MISMATCH":
                outcomes["wrong answer"] += 1
                failures.append(f"MIPSCAN_FAULTS={faults}: concurrent results differ")
            else:
                outcomes[f"{status}"] += 1
    print(f"\nfault injection: {CASES} cases (processes), operations: {dict(outcomes)}; "
          f"crashes {outcomes['crash']}")
    assert not failures, "\n".join(failures[:10])
    assert outcomes["err"] + outcomes["partial"] > 0, "no fault was ever injected"
    assert outcomes["ok"] > 0


NO_THREADS = r"""
import numpy as np, mipscan
from mipscan import _mipscan
rng = np.random.default_rng(1)
db = rng.normal(size=(2000, 8)).astype(np.float32)
s = mipscan.builder(db, 10, "dot_product").tree(10, 3).score_ah(2).reorder(30).build()
q = s._to_mips(rng.normal(size=(100, 8)).astype(np.float32))
ref = s._index.search_batch(q, None, 3, 30, 10, 1)
for threads in (2, 8):
    got = s._index.search_batch(q, None, 3, 30, 10, threads)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
with open("/proc/self/status") as f:
    print(next(int(l.split()[1]) for l in f if l.startswith("Threads:")))
"""


def test_no_thread_can_start_so_the_caller_does_all_the_work(package):
    """Every thread start fails (std::system_error, as when the OS refuses a thread): the
    parallel calls still complete, correctly, on the calling thread alone."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(package), MIPSCAN_FAULTS="1:0:1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", NO_THREADS], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) == 1, "a pool thread started"
