"""Killed writes: a process serializing over an existing index is killed with SIGKILL;
afterwards the folder loads as the old index or the complete new one (search results
compared with both), never as a mix, and whatever the dead writer left beside it does not
disturb a later load or serialize.

Two kinds of kill points:
* deterministic: the writer kills itself just before its j-th file-system step
  (np.save, fsync, rename/exchange, removing the old folder), for every j: every window of save_index;
* random: the parent kills the writer after a random delay inside the measured duration
  of a serialize (mid-file writes included).

MIPSCAN_KILL_TRIALS sets the number of random trials (default 20; 100 under
HYPOTHESIS_PROFILE=long). Trials are seeded (MIPSCAN_KILL_SEED, default 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mipscan

TRIALS = int(os.environ.get("MIPSCAN_KILL_TRIALS",
                            "100" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "20"))
SEED = int(os.environ.get("MIPSCAN_KILL_SEED", "0"))

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# The writer: loads the index to write (fully in memory), waits for "go", serializes it
# over the target. With KILL_AT=j it SIGKILLs itself before its j-th file-system step.
WRITER = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    import mipscan, mipscan._io as io

    source, target, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    steps = [0]
    def step(name, fn):
        def wrapped(*a, **k):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped
    s = mipscan.load_searcher(source, mmap=False)
    np.save = step("np.save", np.save)  # (this process only)
    os.fsync = step("fsync", os.fsync)
    os.rename = step("rename", os.rename)
    io._exchange = step("exchange", io._exchange)
    io._remove_index_files = step("remove", io._remove_index_files)
    io._sha256 = step("sha256", io._sha256)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    s.serialize(target)
    print("done", steps[0], time.perf_counter() - t0, flush=True)
""")


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """Two different indexes (sources), and each one's search results on fixed queries."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("killed")
    db_a = rng.normal(size=(12000, 32)).astype(np.float32)
    db_b = rng.normal(size=(9000, 32)).astype(np.float32)
    a = mipscan.builder(db_a, 10, "dot_product").tree(40, 8).score_ah(2).reorder(60).build()
    b = mipscan.builder(db_b, 10, "squared_l2").tree(30, 6).score_brute_force().reorder(40).build()
    q = rng.normal(size=(25, 32)).astype(np.float32)
    paths = {"old": root / "src-old", "new": root / "src-new"}
    a.serialize(paths["old"])
    b.serialize(paths["new"])
    expected = {name: s.search_batched(q) for name, s in (("old", a), ("new", b))}
    script = root / "writer.py"
    script.write_text(WRITER)
    return paths, expected, q, script


def _start_writer(script, source, target, kill_at=0):
    p = subprocess.Popen([sys.executable, str(script), str(source), str(target), str(kill_at)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise AssertionError(f"writer did not start: {line!r} {p.stderr.read()}")
    return p


def _which(target, expected, q):
    """'old'/'new' when the folder loads as that index (identical results); 'absent' when
    there is no folder; fails on anything else."""
    if not target.exists():
        return "absent"
    s = mipscan.load_searcher(target)  # raises if damaged: the test fails
    r = s.search_batched(q)
    for name, e in expected.items():
        if np.array_equal(r.indices, e.indices) and np.array_equal(r.distances, e.distances):
            return name
    raise AssertionError(f"{target} loads as neither the old nor the new index")


def _siblings(target):
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def _reset(paths, target, state):
    """Puts the old index (or nothing) at target, and removes the writers' leftovers."""
    import shutil

    for p in target.parent.iterdir():
        shutil.rmtree(p)
    if state == "old":
        shutil.copytree(paths["old"], target)


def _run_trial(indexes, target, start, kill_at=0, delay=None):
    paths, expected, q, script = indexes
    _reset(paths, target, start)
    p = _start_writer(script, paths["new"], target, kill_at)
    p.stdin.write("go\n")
    p.stdin.flush()
    if delay is not None:
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    killed = p.returncode == -signal.SIGKILL
    assert killed or p.returncode == 0, (p.returncode, err)
    state = _which(target, expected, q)
    allowed = {start, "new"}
    assert state in allowed, (start, state)
    if not killed:
        assert state == "new"
    leftovers = _siblings(target)
    assert all(n.startswith(f".{target.name}.tmp-") or n.startswith(f".{target.name}.old-")
               for n in leftovers), leftovers
    # leftovers do not confuse a later serialize + load
    if leftovers:
        mipscan.load_searcher(paths["old"]).serialize(target)
        assert _which(target, expected, q) == "old"
    return state, killed, leftovers, out


def test_kill_before_each_file_system_step(indexes, tmp_path):
    """Deterministic: one trial per step of save_index, over an existing index and into
    a fresh folder."""
    paths, expected, q, script = indexes
    target = tmp_path / "box" / "idx"
    target.parent.mkdir()
    seen = {"old": 0, "new": 0, "absent": 0}
    leftover_trials = trials = 0
    for start in ("old", "absent"):
        # count the steps of a complete write (an exchange + removal of the old folder over an existing index,
        # one rename into a fresh folder)
        state, killed, _, out = _run_trial(indexes, target, start)
        assert state == "new" and not killed
        total = int(out.split()[1])
        assert total >= 10, out  # np.save + fsync + sha256 per array, rename/exchange, ...
        for j in range(1, total + 1):
            trials += 1
            state, killed, leftovers, _ = _run_trial(indexes, target, start, kill_at=j)
            assert killed, f"step {j} of {total} was not reached"
            seen[state] += 1
            leftover_trials += bool(leftovers)
    print(f"\n{trials} deterministic kills: outcomes {seen}, "
          f"{leftover_trials} left a .idx.tmp-* / .idx.old-* sibling (load ignores them)")
    # killed before the exchange: the old index (or nothing); after it: the new one
    assert seen["old"] >= 1 and seen["new"] >= 1 and seen["absent"] >= 1


def test_kill_at_random_times(indexes, tmp_path):
    paths, expected, q, script = indexes
    target = tmp_path / "box" / "idx"
    target.parent.mkdir()
    durations = []
    for _ in range(3):  # how long a serialize takes here (the window to hit)
        _, _, _, out = _run_trial(indexes, target, "old")
        durations.append(float(out.split()[2]))
    window = float(np.median(durations))
    rng = np.random.default_rng(SEED)
    outcomes = {"old": 0, "new": 0, "absent": 0}
    killed_n = leftovers_n = 0
    for t in range(TRIALS):
        start = "old" if t % 10 else "absent"
        state, killed, leftovers, _ = _run_trial(indexes, target, start,
                                                 delay=float(rng.uniform(0, 1.2 * window)))
        outcomes[state] += 1
        killed_n += killed
        leftovers_n += bool(leftovers)
    print(f"\n{TRIALS} random kills (serialize takes ~{window * 1e3:.0f} ms): {killed_n} "
          f"killed mid-run, outcomes {outcomes}, {leftovers_n} left a sibling")
    assert sum(outcomes.values()) == TRIALS


@pytest.mark.xfail(strict=True, reason="known gap: without RENAME_EXCHANGE (non-Linux, some "
                   "file systems) save_index renames the old folder away before renaming the "
                   "new one in; a crash between the two leaves no index at the path")
def test_kill_between_the_fallback_renames(indexes, tmp_path):
    """The fallback path of save_index (no renameat2): killed between its two renames."""
    paths, expected, q, script = indexes
    target = tmp_path / "box" / "idx"
    target.parent.mkdir()
    no_exchange = script.with_name("writer_no_exchange.py")
    no_exchange.write_text(WRITER.replace("io._exchange = step(\"exchange\", io._exchange)",
                                          "io._exchange = lambda a, b: False"))
    _reset(paths, target, "old")
    # count the steps, then kill before the second rename (the first moves the old away)
    p = _start_writer(no_exchange, paths["new"], target)
    p.stdin.write("go\n")
    p.stdin.flush()
    total = int(p.communicate(timeout=120)[0].split()[1])
    _reset(paths, target, "old")
    # the last steps are: rename(old away), rename(new in), fsync(parent), removal of the old
    p = _start_writer(no_exchange, paths["new"], target, kill_at=total - 2)
    p.stdin.write("go\n")
    p.stdin.flush()
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert _which(target, expected, q) in ("old", "new")
