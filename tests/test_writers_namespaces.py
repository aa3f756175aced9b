"""Writers in different PID namespaces (issue 12, defect 5): containers sharing a volume
see each other's files but not each other's processes, so a pid in a temporary folder's
name says nothing about its writer. Writers hold an flock on their temporary folder
instead; these tests run real writers on the host and under ``unshare --pid --fork``
(util-linux) against one target while a reader loads it in a loop.

The concurrent run lasts ``MIPSCAN_NAMESPACE_SECONDS`` (default 5; 30 under
HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import mipscan
import mipscan._io as io

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
SECONDS = float(os.environ.get("MIPSCAN_NAMESPACE_SECONDS", "30" if LONG else "5"))
SRC = str(Path(mipscan.__file__).resolve().parents[1])


def _unshare_problem() -> str | None:
    """Why `unshare --pid --fork --mount-proc` cannot run here (None if it can)."""
    if not sys.platform.startswith("linux"):
        return "PID namespaces are Linux-only"
    exe = shutil.which("unshare")
    if exe is None:
        return "util-linux `unshare` is not installed"
    try:
        p = subprocess.run([exe, "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                            "import os; print(os.getpid())"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if p.returncode != 0 or p.stdout.strip() != "1":
        return f"unshare --pid is not permitted here (exit {p.returncode}: {p.stderr.strip()[:200]})"
    return None


UNSHARE_PROBLEM = _unshare_problem()
needs_unshare = pytest.mark.skipif(UNSHARE_PROBLEM is not None, reason=str(UNSHARE_PROBLEM))

# A writer: serializes the two source indexes over the target in turn until the deadline;
# prints its namespace pid and how many writes it made.
WRITER = textwrap.dedent("""
    import os, sys, time
    import mipscan
    a, b, target, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    searchers = [mipscan.load_searcher(a, mmap=False), mipscan.load_searcher(b, mmap=False)]
    print("pid", os.getpid(), flush=True)
    writes = 0
    while time.time() < deadline:
        searchers[writes % 2].serialize(target)
        writes += 1
        time.sleep(0.002)
    print("writes", writes, flush=True)
""")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    rng = np.random.default_rng(17)
    root = tmp_path_factory.mktemp("ns")
    db_a = rng.normal(size=(6000, 16)).astype(np.float32)
    db_b = rng.normal(size=(4000, 16)).astype(np.float32)
    a = mipscan.builder(db_a, 10, "dot_product").tree(20, 4).score_ah(2).reorder(40).build()
    b = mipscan.builder(db_b, 10, "squared_l2").tree(16, 4).score_brute_force().reorder(30).build()
    q = rng.normal(size=(8, 16)).astype(np.float32)
    a.serialize(root / "a")
    b.serialize(root / "b")
    script = root / "writer.py"
    script.write_text(WRITER)
    return root, script, q, {"a": a.search_batched(q), "b": b.search_batched(q)}


@needs_unshare
def test_concurrent_writers_in_two_pid_namespaces_and_a_reader(sources, tmp_path):
    root, script, q, expected = sources
    target = tmp_path / "shared" / "idx"
    mipscan.load_searcher(root / "a").serialize(target)
    deadline = time.time() + SECONDS
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [str(script), str(root / "a"), str(root / "b"), str(target), str(deadline)]
    writers = [
        subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env),
    ]
    loads, seen, failures = 0, {"a": 0, "b": 0}, []
    try:
        while time.time() < deadline:
            try:
                s = mipscan.load_searcher(target)
                r = s.search_batched(q)
            except Exception as exc:  # any failed load is a failure of atomicity
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                loads += 1
            for name, e in expected.items():
                if np.array_equal(r.indices, e.indices) and np.array_equal(r.distances, e.distances):
                    seen[name] += 1
                    break
            else:
                failures.append("loaded an index that is neither of the written ones")
    finally:
        outs = [w.communicate(timeout=120) for w in writers]
    for w, (out, err) in zip(writers, outs):
        assert w.returncode == 0, err
    pids = [int(o.split()[1]) for o, _ in outs]
    writes = [int(o.split()[3]) for o, _ in outs]
    print(f"\n{SECONDS:.0f} s: writer pids {pids} (namespace, host), writes {writes}, "
          f"{loads} loads: {seen}, failures {len(failures)}")
    assert pids[0] <= 3, "the first writer did not run in its own PID namespace"
    assert not failures, failures[:5]
    assert min(writes) > 0 and seen["a"] + seen["b"] == loads
    assert sorted(os.listdir(target.parent)) == ["idx"]  # nothing left behind


@needs_unshare
def test_a_live_writer_in_another_namespace_keeps_its_temporary_folder(sources, tmp_path):
    """The namespace writer's pid (1, 2, ...) means nothing on the host, where that pid is
    alive or dead at random: its flock is what keeps its folder."""
    root, _, _, _ = sources
    target = tmp_path / "idx"
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, tempfile
            tmp = tempfile.mkdtemp(prefix=".idx.tmp-{{}}-".format(os.getpid()), dir={str(tmp_path)!r})
            fd = os.open(tmp, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            open(os.path.join(tmp, "centroids.npy"), "wb").write(b"half written")
            print(tmp, flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.name.startswith(".idx.tmp-1-") or live.name.startswith(".idx.tmp-2-")
        mipscan.load_searcher(root / "a").serialize(target)
        assert (live / "centroids.npy").read_bytes() == b"half written"
    finally:
        holder.communicate("")
    mipscan.load_searcher(root / "b").serialize(target)  # its writer died: an orphan now
    assert not live.exists()


# ---------------------------------------------------------------- the exchange's failures
def test_exchange_reports_real_failures_and_only_unsupported_falls_back(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    with pytest.raises(FileNotFoundError):  # a real failure is raised, not "unsupported"
        io._exchange(a, b)
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert io._exchange(a, b) is True
    assert (a / "x").read_text() == "b"


@pytest.mark.parametrize("err", [errno.EACCES, errno.EXDEV, errno.EIO, errno.EBUSY])
def test_a_failed_exchange_raises_and_leaves_the_old_index(sources, tmp_path, monkeypatch, err):
    """Any exchange failure but 'unsupported' used to fall back to the two non-atomic
    renames; now it raises, and the old index stays in place, whole."""
    root, _, q, expected = sources
    target = tmp_path / "idx"
    mipscan.load_searcher(root / "a").serialize(target)

    def failing(x, y):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(io, "_exchange", failing)
    with pytest.raises(OSError) as info:
        mipscan.load_searcher(root / "b").serialize(target)
    assert info.value.errno == err
    r = mipscan.load_searcher(target).search_batched(q)
    np.testing.assert_array_equal(r.indices, expected["a"].indices)
    assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_unsupported_exchange_falls_back_to_renames(sources, tmp_path, monkeypatch):
    root, _, q, expected = sources
    target = tmp_path / "idx"
    mipscan.load_searcher(root / "a").serialize(target)
    monkeypatch.setattr(io, "_exchange", lambda x, y: False)
    mipscan.load_searcher(root / "b").serialize(target)
    r = mipscan.load_searcher(target).search_batched(q)
    np.testing.assert_array_equal(r.indices, expected["b"].indices)
    assert sorted(os.listdir(tmp_path)) == ["idx"]
