"""Concurrency and memory: 8 threads search one searcher (search, search_batched,
search_batched_parallel) while another thread loads and serializes indexes; every result
is bit-identical to a single-threaded run. Searching allocates nothing per query beyond its
outputs: resident memory stays flat over 1M queries (5M under HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import mipscan

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
SEARCH_THREADS = 8


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(21)
    db = rng.normal(size=(6000, 24)).astype(np.float32)
    db[:50] = db[50:100]  # duplicate rows: ties must break the same way every time
    searchers = {
        # < 256 leaves: leaf scores in C++; >= 256: one BLAS product per batch
        "c_leaves": mipscan.builder(db, 10, "dot_product").tree(60, 8).score_ah(2)
        .reorder(50).build(),
        "blas_leaves": mipscan.builder(db, 10, "squared_l2").tree(300, 30, min_partition_size=1)
        .score_ah(2).reorder(50).build(),
        "bf": mipscan.builder(db, 10, "cosine").tree(40, 10).score_brute_force().build(),
    }
    q = rng.normal(size=(400, 24)).astype(np.float32)
    q[:20] = db[:20]
    ref = {name: s.search_batched(q) for name, s in searchers.items()}
    root = tmp_path_factory.mktemp("conc")
    return searchers, q, ref, root


def test_threads_search_while_another_loads_and_serializes(setup):
    searchers, q, ref, root = setup
    name = "blas_leaves"
    errors: list[str] = []
    compared = [0] * SEARCH_THREADS
    stop = threading.Event()
    rounds = 60 if LONG else 12
    s = searchers[name]
    r = ref[name]

    def check(got, rows, what):
        if not (np.array_equal(got.indices, r.indices[rows])
                and np.array_equal(got.distances, r.distances[rows])):
            errors.append(f"{what}: differs from the single-threaded run")

    def searcher_thread(t):
        rng = np.random.default_rng(t)
        try:
            for i in range(rounds):
                lo = int(rng.integers(0, len(q) - 64))
                rows = slice(lo, lo + int(rng.integers(1, 64)))
                method = (t + i) % 3
                if method == 0:
                    for j in range(rows.start, rows.start + 8):
                        got = s.search(q[j])
                        if not (np.array_equal(got.indices, r.indices[j])
                                and np.array_equal(got.distances, r.distances[j])):
                            errors.append(f"thread {t} search() row {j} differs")
                    compared[t] += 8
                elif method == 1:
                    check(s.search_batched(q[rows]), rows, f"thread {t} search_batched")
                    compared[t] += rows.stop - rows.start
                else:
                    got = s.search_batched_parallel(q[rows], batch_size=int(rng.integers(1, 40)))
                    check(got, rows, f"thread {t} search_batched_parallel")
                    compared[t] += rows.stop - rows.start
                # the whole query set now and then
                if i % 4 == 0:
                    check(s.search_batched_parallel(q), slice(None), f"thread {t} all")
                    compared[t] += len(q)
        except Exception as exc:  # noqa: BLE001 - any exception is a failure
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    io_rounds = [0]

    def io_thread():
        """Serializes the shared searcher (which the others are reading) and another one
        over the same folder, loads whatever is there, and checks it against its reference."""
        path = root / "shared"
        other = searchers["c_leaves"]
        try:
            while not stop.is_set():
                which = io_rounds[0] % 2
                (s if which == 0 else other).serialize(path)
                loaded = mipscan.load_searcher(path, mmap=bool(io_rounds[0] % 3))
                expect = ref[name] if loaded.distance_measure == "squared_l2" else ref["c_leaves"]
                got = loaded.search_batched_parallel(q)
                if not (np.array_equal(got.indices, expect.indices)
                        and np.array_equal(got.distances, expect.distances)):
                    errors.append(f"io round {io_rounds[0]}: loaded index differs")
                # a loaded (mmap) searcher serialized over its own folder
                loaded.serialize(path)
                io_rounds[0] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(f"io thread: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=searcher_thread, args=(t,)) for t in range(SEARCH_THREADS)]
    io = threading.Thread(target=io_thread)
    io.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    io.join()
    print(f"\n{SEARCH_THREADS} threads compared {sum(compared)} query results "
          f"({compared}); io thread did {io_rounds[0]} serialize+load rounds")
    assert not errors, errors[:10]
    assert io_rounds[0] >= 1 and all(c > 0 for c in compared)


def test_loads_racing_a_writer_see_the_old_or_the_new_index(setup):
    """A thread re-serializes two same-shaped indexes in turn over one folder while this
    thread loads it (verify on and off): every load succeeds and is one of the two, never
    a 'damaged' error or a mix of their files."""
    _, q, _, root = setup
    rng = np.random.default_rng(8)
    pair = [mipscan.builder(rng.normal(size=(2000, 24)).astype(np.float32), 10, "dot_product")
            .tree(20, 4).score_ah(2).reorder(30).build() for _ in range(2)]
    refs = [s.search_batched(q) for s in pair]
    path = root / "raced"
    pair[0].serialize(path)
    stop = threading.Event()
    writes = [0]
    errors: list[str] = []

    def writer():
        try:
            while not stop.is_set():
                pair[writes[0] % 2].serialize(path)
                writes[0] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(f"writer: {type(exc).__name__}: {exc}")

    t = threading.Thread(target=writer)
    t.start()
    loads = {0: 0, 1: 0}
    try:
        for i in range(600 if LONG else 150):
            s = mipscan.load_searcher(path, mmap=bool(i % 2), verify=bool(i % 3))
            got = s.search_batched(q)
            match = [j for j, r in enumerate(refs) if np.array_equal(got.indices, r.indices)
                     and np.array_equal(got.distances, r.distances)]
            assert match, f"load {i} is neither index"
            loads[match[0]] += 1
    finally:
        stop.set()
        t.join()
    print(f"\n{sum(loads.values())} loads during {writes[0]} writes: {loads}")
    assert not errors, errors


@pytest.mark.parametrize("name", ["c_leaves", "bf"])
def test_parallel_and_sequential_paths_agree_under_load(setup, name):
    """The same queries through every method, from 8 threads at once, with the thread
    count changed in between: bit-identical to the single-threaded reference."""
    searchers, q, ref, _ = setup
    s, r = searchers[name], ref[name]
    errors: list[str] = []

    def run(t):
        try:
            for _ in range(3):
                for got in (s.search_batched(q), s.search_batched_parallel(q, batch_size=7 + t)):
                    if not (np.array_equal(got.indices, r.indices)
                            and np.array_equal(got.distances, r.distances)):
                        errors.append(f"thread {t} differs")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    s.set_num_threads(3)
    threads = [threading.Thread(target=run, args=(t,)) for t in range(SEARCH_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:10]


@pytest.mark.skipif(os.environ.get("MIPSCAN_SANITIZED") == "1",
                    reason="ASan's quarantine holds freed memory: RSS is not meaningful")
def test_rss_is_flat_over_a_million_queries(setup):
    """Resident memory after warm-up stays within a small bound while 1M queries are
    searched in batches (5M in the long profile), plus 20k single search() calls."""
    searchers, _, _, _ = setup
    rng = np.random.default_rng(3)
    db = rng.normal(size=(4000, 16)).astype(np.float32)
    s = mipscan.builder(db, 10, "dot_product").tree(50, 3).score_ah(2).reorder(20).build()
    batch = rng.normal(size=(20_000, 16)).astype(np.float32)
    total = 5_000_000 if LONG else 1_000_000
    for _ in range(5):  # warm-up: allocator pools, per-thread scratch, BLAS buffers
        s.search_batched_parallel(batch)
        s.search_batched(batch[:2000])
    for i in range(2000):
        s.search(batch[i])
    before = rss_bytes()
    done = 0
    peak = before
    while done < total:
        res = s.search_batched_parallel(batch) if (done // len(batch)) % 2 else \
            s.search_batched(batch)
        assert res.indices.shape == (len(batch), 10)
        done += len(batch)
        peak = max(peak, rss_bytes())
    for i in range(20_000):
        s.search(batch[i])
    after = rss_bytes()
    growth = after - before
    print(f"\nRSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (peak "
          f"{peak / 2**20:.1f}) over {done} batched + 20000 single queries: "
          f"growth {growth / 2**10:.0f} KiB")
    # One leaked byte per query would be ~1 MiB; outputs of one batch are 1.6 MB.
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.2f} MiB"
