"""The live index (issue 13): docids, upsert, delete, rebalance, config(), online
incremental training and autopilot phase changes, serialization of an updated index,
atomic bad updates, and searches running while one thread updates (each result is exact
search over one snapshot the search could have seen).

Run under ThreadSanitizer too: ``SANITIZE=thread tools/sanitize.sh tests/test_live.py``.
"""

import os
import threading
import time

import numpy as np
import pytest

import mipscan
from mipscan import scann_builder

SANITIZED = os.environ.get("MIPSCAN_SANITIZED") == "1"


def _exact(vectors: dict, q: np.ndarray, k: int):
    """(docids, scores) of the exact top-k of q over {docid: vector} by inner product."""
    keys = list(vectors)
    m = np.stack([vectors[d] for d in keys])
    s = m @ q
    order = np.argsort(-s, kind="stable")[:k]
    return [keys[i] for i in order], s[order]


def _matches(ids, scores, vectors, q, k, rtol=1e-4):
    """The result is an exact top-k over vectors: its scores are the true top-k scores and
    each id's own score is its reported one (ties may pick either id)."""
    want_ids, want = _exact(vectors, q, k)
    if len(ids) != min(k, len(vectors)):
        return False
    if not np.allclose(np.sort(scores)[::-1], want, rtol=rtol, atol=1e-4):
        return False
    return all(d in vectors and abs(float(vectors[d] @ q) - float(s)) <= 1e-4 + rtol * abs(float(s))
               for d, s in zip(list(ids), scores))


@pytest.fixture
def data():
    rng = np.random.default_rng(13)
    return rng, rng.normal(size=(3000, 12)).astype(np.float32)


def _exact_searcher(db, docids, leaves=20):
    # Exact over the live set: float scoring of every leaf (the check is exact).
    return (mipscan.builder(db, 10, "dot_product").tree(leaves, leaves)
            .score_brute_force().build(docids=docids))


def test_docids_and_results(data):
    rng, db = data
    ids = [f"doc{i}" for i in range(len(db))]
    s = mipscan.builder(db, 10, "dot_product").tree(30, 30).score_brute_force().build(docids=ids)
    assert s.docids == ids and s.size() == len(db)
    r = s.search(db[5])
    assert r.indices.dtype.kind == "U" and r.indices[0] == f"doc{np.argmax(db @ db[5])}"
    ints = mipscan.builder(db, 10, "dot_product").score_brute_force().build(docids=list(range(100, 3100)))
    r = ints.search_batched(db[:3])
    assert r.indices.dtype == np.int64
    assert list(r.indices[:, 0]) == list(np.argmax(db[:3] @ db.T, axis=1) + 100)
    plain = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    assert plain.docids is None and plain.search(db[1]).indices.dtype == np.uint32
    with pytest.raises(ValueError, match="docids must be unique; 'a' is repeated"):
        mipscan.builder(db[:2], 1, "dot_product").score_brute_force().build(docids=["a", "a"])
    with pytest.raises(TypeError, match="all ints or all strings"):
        mipscan.builder(db[:2], 1, "dot_product").score_brute_force().build(docids=["a", 1])
    with pytest.raises(ValueError, match="built without docids"):
        plain.upsert([1], db[:1])


@pytest.mark.parametrize("stages", ["ah_reorder", "ah", "bf_tree", "bf", "soar"])
def test_upsert_delete_rebalance_exact_when_all_leaves(data, stages):
    rng, db = data
    b = mipscan.builder(db[:2000], 10, "dot_product")
    b = {"ah_reorder": lambda: b.tree(20, 20).score_ah(2).reorder(2000),
         "ah": lambda: b.tree(20, 20).score_ah(1),
         "bf_tree": lambda: b.tree(20, 20).score_brute_force(),
         "bf": lambda: b.score_brute_force(),
         "soar": lambda: b.tree(20, 20, soar_lambda=1.0).score_ah(2).reorder(2000)}[stages]()
    s = b.build(docids=list(range(2000)))
    vec = {i: db[i] for i in range(2000)}
    s.upsert(list(range(2000, 3000)), db[2000:], batch_size=256)
    vec.update({i: db[i] for i in range(2000, 3000)})
    new = rng.normal(size=(100, 12)).astype(np.float32)
    s.upsert(list(range(0, 100)), new)  # replace
    vec.update({i: new[i] for i in range(100)})
    s.delete(list(range(0, 3000, 4)))
    for i in range(0, 3000, 4):
        del vec[i]
    assert s.size() == len(vec) and sorted(s.docids) == sorted(vec)
    q = rng.normal(size=(20, 12)).astype(np.float32)
    exact_check = stages in ("ah_reorder", "bf_tree", "bf", "soar")
    for when in ("churn", "rebalanced"):
        r = s.search_batched(q, pre_reorder_num_neighbors=3000)
        for i in range(len(q)):
            assert set(r.indices[i]) <= set(vec), when
            if exact_check:
                assert _matches(r.indices[i], r.distances[i], vec, q[i], 10), (when, i)
        if when == "churn":
            text = s.rebalance()
            assert text == s.config() and "method:" in text
    assert s.size() == len(vec)


def test_shrink_below_k_and_empty(data):
    rng, db = data
    s = _exact_searcher(db[:30], list(range(30)), leaves=3)
    s.delete(list(range(25)))
    r = s.search(db[0])
    assert r.indices.shape == (5,) and set(r.indices) == set(range(25, 30))
    r = s.search_batched(db[:4], final_num_neighbors=8)
    assert r.indices.shape == (4, 5)
    e = s.search_batched(np.zeros((0, 12), np.float32))
    assert e.indices.shape == (0, 5) and e.distances.shape == (0, 5)
    s.delete(list(range(25, 30)))
    assert s.size() == 0 and s.search(db[0]).indices.shape == (0,)
    s.upsert([7], db[7])
    assert list(s.search(db[7]).indices) == [7] and s.size() == 1
    small = mipscan.builder(db[:3], 3, "dot_product").score_brute_force().build()
    assert small.search(db[0], final_num_neighbors=10).indices.shape == (3,)
    assert small.search_batched(np.zeros((0, 12), np.float32)).indices.shape == (0, 3)


def test_bad_updates_change_nothing(data):
    rng, db = data
    s = mipscan.builder(db[:500], 10, "dot_product").tree(10, 3).score_ah(2).reorder(50).build(
        docids=[f"d{i}" for i in range(500)])
    q = db[:5]
    before = s.search_batched(q)
    ids = list(s.docids)
    bad_nan = db[500:503].copy()
    bad_nan[1, 3] = np.nan
    cases = [
        (lambda: s.upsert(["x", "y", "z"], bad_nan), ValueError, "NaN"),
        (lambda: s.upsert(["x"], db[:1, :5]), ValueError, "has 5 features"),
        (lambda: s.upsert(["x", "x"], db[:2]), ValueError, "docid 'x' is repeated"),
        (lambda: s.upsert(["x", "y"], db[:3]), ValueError, "2 docids but 3 vectors"),
        (lambda: s.upsert([1], db[:1]), TypeError, "docids must be str"),
        (lambda: s.delete(["d1", "nope", "d2"]), KeyError, "'nope'"),
        (lambda: s.delete(["d1", "d1"]), ValueError, "docid 'd1' is repeated"),
        (lambda: s.upsert(["x"], db[:1], batch_size=0), ValueError, "batch_size"),
        (lambda: s.rebalance("some config"), ValueError, "config"),
    ]
    for call, exc, needle in cases:
        with pytest.raises(exc) as info:
            call()
        assert needle in str(info.value)
        assert s.docids == ids and s.size() == 500
        after = s.search_batched(q)
        np.testing.assert_array_equal(after.indices, before.indices)
        np.testing.assert_array_equal(after.distances, before.distances)


def test_serialize_updated_index(tmp_path, data):
    rng, db = data
    s = mipscan.builder(db[:2000], 10, "dot_product").tree(20, 5).score_ah(2).reorder(100).build(
        docids=[f"d{i}" for i in range(2000)])
    s.upsert([f"n{i}" for i in range(500)], db[2000:2500])
    s.delete([f"d{i}" for i in range(0, 2000, 3)])
    q = db[2500:2520]
    r = s.search_batched(q)
    s.serialize(tmp_path / "ix")
    t = mipscan.load_searcher(tmp_path / "ix")
    assert t.config() == s.config() and sorted(t.docids) == sorted(s.docids)
    assert t.size() == s.size()
    r2 = t.search_batched(q)
    np.testing.assert_array_equal(r2.indices, r.indices)  # compaction keeps codes and order
    np.testing.assert_allclose(r2.distances, r.distances, rtol=1e-6)
    # and it stays updatable
    t.upsert(["late"], db[2999])
    assert t.search(db[2999]).indices[0] == "late"
    # int docids, a shrunk index (fewer points than num_leaves / reorder depth)
    u = mipscan.builder(db[:300], 10, "dot_product").tree(20, 5).score_ah(2).reorder(200).build(
        docids=list(range(300)))
    u.delete(list(range(295)))
    u.serialize(tmp_path / "small")
    v = mipscan.load_searcher(tmp_path / "small")
    assert sorted(v.docids) == [295, 296, 297, 298, 299] and v.search(db[0]).indices.shape == (5,)
    # version 1 folders (no docids) are still written and read as before
    plain = mipscan.builder(db[:300], 10, "dot_product").score_brute_force().build()
    plain.serialize(tmp_path / "v1")
    import json
    assert json.loads((tmp_path / "v1" / "mipscan.json").read_text())["format_version"] == 1
    assert mipscan.load_searcher(tmp_path / "v1").docids is None


def test_pickle_updated(data):
    import pickle
    rng, db = data
    s = _exact_searcher(db[:500], list(range(500)), leaves=5)
    s.delete([1, 2, 3])
    s.upsert([1000], db[600])
    t = pickle.loads(pickle.dumps(s))
    assert sorted(t.docids) == sorted(s.docids)
    np.testing.assert_array_equal(t.search_batched(db[:5]).indices, s.search_batched(db[:5]).indices)


def test_incremental_threshold_retrains_drifted_leaves(data):
    rng, db = data
    base = db[:2000]
    s = mipscan.builder(base, 10, "dot_product").tree(20, 4, incremental_threshold=0.2).score_ah(2) \
        .reorder(100).build(docids=list(range(2000)))
    shifted = (rng.normal(size=(1500, 12)) + 3.0).astype(np.float32)  # data drifts away
    for b in range(0, 1500, 256):
        s.upsert(list(range(2000 + b, 2000 + b + len(shifted[b:b + 256]))), shifted[b:b + 256])
    st = s._state
    moved = np.abs(st.centroids - s._arrays["centroids"]).max()  # compacted view == current
    assert moved == 0
    vec = {i: base[i] for i in range(2000)}
    vec.update({2000 + i: shifted[i] for i in range(1500)})
    q = (rng.normal(size=(30, 12)) + 3.0).astype(np.float32)
    r = s.search_batched(q)
    exact = [set(_exact(vec, q[i], 10)[0]) for i in range(len(q))]
    rec = np.mean([len(set(r.indices[i]) & exact[i]) / 10 for i in range(len(q))])
    fresh = mipscan.builder(np.stack(list(vec.values())), 10, "dot_product").tree(20, 4) \
        .score_ah(2).reorder(100).build(docids=list(vec))
    rf = fresh.search_batched(q)
    rec_f = np.mean([len(set(rf.indices[i]) & exact[i]) / 10 for i in range(len(q))])
    assert rec >= rec_f - 0.05, f"recall after drift {rec:.3f} vs fresh {rec_f:.3f}"
    # Some leaves were retrained: their centroids differ from the trained ones.
    trained = mipscan.builder(base, 10, "dot_product").tree(20, 4).score_ah(2).reorder(100).build()
    assert not np.allclose(st.centroids, trained._arrays["centroids"])


def test_autopilot_online_incremental_phases(data):
    from mipscan._policy import BRUTE_FORCE_BELOW
    rng = np.random.default_rng(5)
    big = rng.normal(size=(BRUTE_FORCE_BELOW + 2000, 8)).astype(np.float32)
    mode = scann_builder.IncrementalMode.ONLINE_INCREMENTAL
    s = mipscan.builder(big[:1000], 10, "dot_product").autopilot(mode=mode).build(
        docids=list(range(1000)))
    assert s.config().startswith("method: brute force")
    for b in range(1000, len(big), 4096):
        e = min(b + 4096, len(big))
        s.upsert(list(range(b, e)), big[b:e])
    assert s.config().startswith("method: partitioning + asymmetric hashing + reorder")
    final = mipscan.builder(big, 10, "dot_product").autopilot(mode=mode, quantize=scann_builder.ReorderType.FLOAT32)
    assert mipscan.builder(big, 10, "dot_product").autopilot(mode=mode).create_config() == s.config()
    assert final.params["autopilot"]["quantize"] == "float32"
    s.delete(list(range(0, 5000)))
    assert s.config().startswith("method: brute force")
    rest = big[5000:]
    assert mipscan.builder(rest, 10, "dot_product").autopilot(mode=mode).create_config() == s.config()
    r = s.search(big[6000])
    assert r.indices[0] == 5000 + np.argmax(rest @ big[6000])


def test_memory_returns_after_rebalance(data):
    rng, db = data
    s = mipscan.builder(db[:1000], 10, "dot_product").tree(10, 3).score_ah(2).reorder(50).build(
        docids=list(range(1000)))
    s.upsert(list(range(1000, 3000)), db[1000:])
    s.delete(list(range(0, 3000, 2)))
    assert s._state.num_rows == 3000
    s.rebalance()
    assert s._state.live is None and s.index_bytes < 1500 * 12 * 4 * 2 + 200_000


#: The stress test's memory bound: per live row added, its float32 vector plus this much
#: (the index's row store at up to twice the rows, row leaves, docid, the docid -> row
#: dict, and the test's own {docid: vector} versions) ...
ROW_ALLOWANCE = 1024
#: ... plus this much in all (allocator arenas of the 9 threads, the last snapshots and
#: versions still referenced, interpreter caches).
RSS_ALLOWANCE = 24 << 20


def test_concurrent_searches_see_one_snapshot(data):
    """N threads search while one thread upserts, replaces and deletes; every result is
    exact top-k over one snapshot published between the search's start and end; and the
    process grows by no more than the data added (ROW_ALLOWANCE, RSS_ALLOWANCE)."""
    rng, db = data
    n0 = 800
    s = _exact_searcher(db[:n0], list(range(n0)), leaves=8)
    # Versions no reader can still need (below every reader's oldest candidate) are
    # dropped, so a long run holds a few versions, not one per update.
    versions = {0: {i: db[i] for i in range(n0)}}
    published = [0]  # index of the newest version whose update call returned
    stop = threading.Event()
    errors = []
    # MIPSCAN_LIVE_STRESS_SECONDS=60: the 8 readers and 1 updater for a minute.
    stress = float(os.environ.get("MIPSCAN_LIVE_STRESS_SECONDS", "0"))
    num_readers = 8 if stress else 4
    oldest_read = [0] * num_readers  # per reader: the oldest version it may check against
    steps, warm = (12, 4) if SANITIZED else (40, 8)
    deadline = time.monotonic() + stress
    q = rng.normal(size=(16, 12)).astype(np.float32)
    memory = {}

    def writer():
        try:
            cur = dict(versions[0])
            nxt_id = n0
            step = 0
            oldest = 0
            while step < steps or time.monotonic() < deadline:
                if step == warm:  # threads, arenas and caches are up: the baseline
                    memory["before"], memory["rows_before"] = _rss(), s.size()
                op = step % 4
                step += 1
                if op in (0, 1):
                    m = 40
                    vecs = rng.normal(size=(m, 12)).astype(np.float32)
                    ids = list(range(nxt_id, nxt_id + m))
                    if op == 1:  # half replacements of live docids
                        ids[: m // 2] = list(cur)[: m // 2]
                    nxt_id += m
                    cur = dict(cur)
                    cur.update(zip(ids, vecs))
                    # Recorded before the call: a search may see it once the call
                    # publishes it, before the call returns.
                    versions[step] = cur
                    s.upsert(ids, vecs)
                elif op == 2:
                    dels = list(cur)[5:45]
                    cur = {k: v for k, v in cur.items() if k not in set(dels)}
                    versions[step] = cur
                    s.delete(dels)
                else:
                    versions[step] = cur
                    s.rebalance()
                published[0] = step
                # A reader's entry only grows, and is at most the published index it
                # read, so every version a running search may check is kept.
                for v in range(oldest, min(oldest_read)):
                    versions.pop(v, None)
                oldest = max(oldest, min(oldest_read))
            memory["versions"] = len(versions)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)
        finally:
            stop.set()

    def reader(t):
        try:
            i = t
            while not stop.is_set() or i < t + 4:
                lo = published[0]
                oldest_read[t] = lo
                qi = q[i % len(q)]
                r = s.search(qi, final_num_neighbors=10) if i % 2 else \
                    s.search_batched_parallel(qi[None, :], final_num_neighbors=10)
                ids, sc = (r.indices, r.distances) if i % 2 else (r.indices[0], r.distances[0])
                hi = min(published[0] + 1, max(versions))
                if not any(_matches(ids, sc, versions[v], qi, 10) for v in range(lo, hi + 1)
                           if v in versions):
                    errors.append(AssertionError(f"result of query {i} matches no snapshot "
                                                 f"in [{lo}, {hi}]: {list(ids)}"))
                    return
                i += 1
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(t,)) for t in range(num_readers)]
    w = threading.Thread(target=writer)
    for th in readers:
        th.start()
    w.start()
    w.join()
    for th in readers:
        th.join()
    assert not errors, errors[0]
    assert published[0] >= steps
    if SANITIZED or not os.path.exists("/proc/self/statm"):
        return  # sanitizers hold freed memory
    after, rows = _rss(), s.size()
    added = max(0, rows - memory["rows_before"])
    bound = added * (12 * 4 + ROW_ALLOWANCE) + RSS_ALLOWANCE
    growth = after - memory["before"]
    print(f"stress: {published[0]} updates, {num_readers} readers, RSS {memory['before'] / 2**20:.1f}"
          f" -> {after / 2**20:.1f} MiB, {added} rows added ({added * 48 / 2**20:.2f} MiB of"
          f" vectors), {memory['versions']} versions held at the end")
    assert growth <= bound, (f"RSS grew by {growth / 2**20:.1f} MiB, more than the "
                             f"{bound / 2**20:.1f} MiB allowed for {added} rows added")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(SANITIZED or not os.path.exists("/proc/self/statm"),
                    reason="sanitizers hold freed memory; needs /proc")
def test_memory_does_not_grow_under_churn_with_searches():
    """Replacing every point again and again (with searches running and a rebalance per
    round) keeps the memory of one index: old snapshots are freed when unused."""
    rng = np.random.default_rng(2)
    n, d = 20_000, 32
    s = mipscan.builder(rng.normal(size=(n, d)).astype(np.float32), 10, "dot_product") \
        .tree(100, 10, incremental_threshold=0.2).score_ah(2).reorder(100).build(docids=list(range(n)))
    q = rng.normal(size=(64, d)).astype(np.float32)
    stop = threading.Event()

    def searching():
        while not stop.is_set():
            s.search_batched(q)

    th = threading.Thread(target=searching)
    th.start()
    try:
        rss = []
        for _ in range(6):
            for b in range(0, n, 2048):
                s.upsert(list(range(b, min(b + 2048, n))),
                         rng.normal(size=(min(2048, n - b), d)).astype(np.float32))
            s.delete(list(range(0, n, 10)))
            s.upsert(list(range(0, n, 10)), rng.normal(size=(len(range(0, n, 10)), d)).astype(np.float32))
            s.rebalance()
            rss.append(_rss())
    finally:
        stop.set()
        th.join()
    growth = rss[-1] - rss[1]
    assert growth < 32 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 4 rounds: {rss}"
    assert s.size() == n


def test_deletes_compact_worn_leaves_keeping_codes(data):
    """A leaf whose tombstones reach COMPACT_SHARE of its segment is rewritten without
    them by the delete itself: the segments then hold few dead entries, and the AH scores
    of the live entries are unchanged (codes are moved, not re-encoded): the results equal
    those of the index before the delete with the deleted ids excluded."""
    from mipscan import _live
    rng, db = data
    s = mipscan.builder(db, 10, "dot_product").tree(20, 20).score_ah(2).build(
        docids=list(range(len(db))))
    q = rng.normal(size=(20, 12)).astype(np.float32)
    dels = list(range(0, len(db), 4))
    want = s.search_batched(q, leaves_to_search=20, excluded=dels)
    for b in range(0, len(dels), 100):
        s.delete(dels[b:b + 100])
    st = s._state
    seg = st.live.leaf_sizes().astype(np.int64)
    dead = seg - st.leaf_live
    assert np.all(dead < np.maximum(_live.COMPACT_MIN, _live.COMPACT_SHARE * seg)), dead
    assert seg.sum() < 1.12 * s.size()
    got = s.search_batched(q, leaves_to_search=20)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.distances, want.distances)


def test_start_empty_online_incremental_grows_and_shrinks():
    """As ScaNN's autopilot(ONLINE_INCREMENTAL): an index built on no data with
    docids=[] has size 0 and answers (nq, 0); upserts make it brute force, then tree + AH
    + reorder past the brute-force size; deleting everything and upserting again works."""
    from mipscan._policy import BRUTE_FORCE_BELOW
    rng = np.random.default_rng(21)
    big = rng.normal(size=(BRUTE_FORCE_BELOW + 1000, 8)).astype(np.float32)
    mode = scann_builder.IncrementalMode.ONLINE_INCREMENTAL
    s = mipscan.builder(np.zeros((0, 8), np.float32), 10, "dot_product").autopilot(
        mode=mode).build(docids=[])
    assert s.size() == 0 and s.docids == [] and s.config().startswith("method: brute force")
    r = s.search_batched(big[:3])
    assert r.indices.shape == (3, 0) and r.distances.shape == (3, 0)
    assert s.search(big[0]).indices.shape == (0,)
    assert s.search_batched(np.zeros((0, 8), np.float32)).indices.shape == (0, 0)
    assert "n=0" in repr(s) and s.index_bytes == 0
    s.upsert([0, 1], big[:2])
    assert s.size() == 2 and s.search(big[1]).indices.shape == (2,)
    for b in range(2, len(big), 4096):
        e = min(b + 4096, len(big))
        s.upsert(list(range(b, e)), big[b:e])
    assert s.config().startswith("method: partitioning + asymmetric hashing + reorder")
    assert s.config() == mipscan.builder(big, 10, "dot_product").autopilot(mode=mode).create_config()
    q = big[:50] + 0.01
    truth = np.argsort(-(q @ big.T), axis=1)[:, :10]
    found = s.search_batched(q).indices
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) > 0.9
    s.delete(list(range(len(big))))
    assert s.size() == 0 and s.search_batched(q).indices.shape == (50, 0)
    s.upsert([7, 8], big[7:9])
    assert s.config().startswith("method: brute force")
    assert sorted(s.search(big[7]).indices) == [7, 8]


@pytest.mark.parametrize("metric", ["dot_product", "cosine", "squared_l2"])
def test_start_empty_brute_force_takes_the_kind_of_the_first_docids(metric, tmp_path):
    s = mipscan.builder(np.zeros((0, 4), np.float64), 3, metric).score_brute_force().build(
        docids=[])
    assert s.size() == 0
    with pytest.raises(ValueError, match="no live datapoints"):
        s.serialize(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="no live datapoints"):
        import pickle
        pickle.dumps(s)
    eye = np.eye(4, dtype=np.float32)
    s.upsert(["a", "b"], eye[:2])
    r = s.search(eye[1])
    assert list(r.indices) == ["b", "a"]
    with pytest.raises(TypeError, match="docids must be str"):
        s.upsert([3], eye[:1])
    s.serialize(tmp_path / "two")
    loaded = mipscan.load_searcher(tmp_path / "two")
    assert loaded.size() == 2 and list(loaded.search(eye[1]).indices) == ["b", "a"]


@pytest.mark.parametrize("stages, docids, needle", [
    (lambda b: b.tree(4, 2).score_brute_force(), [], "tree() cannot be built without data"),
    (lambda b: b.score_ah(2), [], "score_ah() cannot be built without data"),
    (lambda b: b.score_brute_force().reorder(5), [], "reorder() cannot be built without data"),
    (lambda b: b.score_brute_force(quantize=True), [], "quantized copy"),
    (lambda b: b.autopilot(), [], "needs mode=IncrementalMode.ONLINE_INCREMENTAL"),
    (lambda b: b.score_brute_force(), None, "got docids=None"),
    (lambda b: b.score_brute_force(), ["x"], "got docids=1 entries"),
])
def test_every_other_empty_build_names_db(stages, docids, needle):
    b = stages(mipscan.builder(np.zeros((0, 4), np.float32), 3, "dot_product"))
    with pytest.raises(ValueError) as info:
        b.build(docids=docids)
    assert "build(): db is empty (shape (0, 4))" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("db, exc, needle", [
    (np.zeros((0, 0), np.float32), ValueError, "db must not be empty"),
    (np.zeros((3, 0), np.float32), ValueError, "db must not be empty"),
    (np.zeros((0,), np.float32), ValueError, "db must be 2-D"),
    (np.zeros((0, 4), np.int32), TypeError, "db must have a float dtype"),
])
def test_empty_db_of_no_dimensions_or_no_float_is_refused(db, exc, needle):
    with pytest.raises(exc, match=needle):
        mipscan.builder(db, 1, "dot_product")


def test_empty_batches_and_edge_updates(data):
    """Empty batches change nothing; upsert without vectors, a bad batch into an empty
    index, and ids or strategies checked on an empty index raise by name."""
    rng, db = data
    s = _exact_searcher(db[:100], [f"d{i}" for i in range(100)], leaves=4)
    q = db[:5]
    before = s.search_batched(q)
    st = s._state
    s.upsert([], np.zeros((0, 12), np.float32))
    s.upsert([], [])
    s.delete([])
    s.update([], np.zeros((0, 12), np.float32), delete=[])
    assert s._state is st  # nothing published
    with pytest.raises(TypeError, match="upsert\\(\\): vectors must be a float array"):
        s.upsert(["x"], None)
    with pytest.raises(ValueError, match="got 0 docids but 1 vectors"):
        s.upsert([], db[:1])
    with pytest.raises(ValueError, match="both upserted and deleted"):
        s.update(["d1"], db[:1], delete=["d1"])
    assert s._state is st
    np.testing.assert_array_equal(s.search_batched(q).indices, before.indices)

    e = mipscan.builder(np.zeros((0, 12), np.float32), 5, "dot_product").score_brute_force() \
        .build(docids=[])
    bad = db[:2].copy()
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        e.upsert(["a", "b"], bad)
    assert e.size() == 0 and e._state.docid_kind is None  # the kind is still open
    with pytest.raises(ValueError, match="allowed holds 'x', which is not in the index"):
        e.search(db[0], allowed=["x"])
    with pytest.raises(ValueError, match="filter_strategy"):
        e.search(db[0], filter_strategy="fast")
    assert e.search(db[0], allowed=[]).indices.shape == (0,)
    e.upsert([5, 6], db[5:7])
    assert sorted(e.search(db[5]).indices) == [5, 6]


def test_racing_updaters_and_readers_keep_every_update(data):
    """Two threads upsert disjoint docids and one deletes, while searches run: the
    updates serialize (none is lost) and the final index answers exactly."""
    rng, db = data
    s = _exact_searcher(db[:1000], list(range(1000)), leaves=10)
    errors = []
    stop = threading.Event()

    def upserter(lo):
        try:
            for b in range(lo, lo + 1000, 50):
                s.upsert(list(range(b, b + 50)), db[b % 3000: b % 3000 + 50] * 0.5)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    def deleter():
        try:
            for b in range(0, 500, 25):
                s.delete(list(range(b, b + 25)))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    def reader():
        while not stop.is_set():
            r = s.search_batched(db[:8], final_num_neighbors=10)
            if r.indices.shape != (8, 10):
                errors.append(AssertionError(r.indices.shape))

    threads = [threading.Thread(target=upserter, args=(lo,)) for lo in (1000, 2000)]
    threads += [threading.Thread(target=deleter)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for th in readers + threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    for th in readers:
        th.join()
    assert not errors, errors[0]
    want = {i: db[i] for i in range(500, 1000)}
    want.update({i: db[i % 3000] * 0.5 for i in range(1000, 3000)})
    assert s.size() == len(want) and sorted(s.docids) == sorted(want)
    for qi in db[:5]:
        r = s.search(qi)
        assert _matches(r.indices, r.distances, want, qi, 10)


def _concentrated(seed=21, n=3000, d=12):
    """A first half spread out, and a second half that lands in a few leaves of a tree
    trained on the first (the seed candidates' churn in small)."""
    rng = np.random.default_rng(seed)
    first = rng.normal(size=(n // 2, d)).astype(np.float32)
    centers = first[:3] * 1.5
    second = (centers[rng.integers(0, 3, n - n // 2)]
              + 0.35 * rng.normal(size=(n - n // 2, d))).astype(np.float32)
    return rng, np.concatenate([first, second])


def _check_segments(s):
    """Every live row sits in its own leaf (and its SOAR leaf) exactly once, dead rows
    aside; leaf_live counts them; the stores agree on the leaf count."""
    from mipscan import _live
    st = s._state
    L = st.live.num_leaves
    assert L == len(st.centroids) == len(st.leaf_live) == len(st.trained) == st.num_leaves
    dead = _live.dead_mask(st)
    seen = {}
    for leaf in range(L):
        rows, _ = st.live.leaf(leaf)
        alive = rows[~dead[rows]]
        assert len(alive) == st.leaf_live[leaf], leaf
        for r in alive.tolist():
            seen.setdefault(r, []).append(leaf)
    live = _live.live_rows(st)
    assert sorted(seen) == live.tolist()
    for r in live.tolist():
        want = sorted(x for x in st.row_leaf[r].tolist() if x >= 0)
        assert sorted(seen[r]) == want, (r, seen[r], want)


def test_soar_rows_moved_onto_their_spill_leaf_swap_leaves(tmp_path):
    """Online incremental training with SOAR: a row whose own leaf is retrained may move
    onto its spill leaf; the two leaves then swap roles, each holding one entry of it
    (before the fix that leaf held it twice, a later move dropped both: a live row in no
    leaf, and deletes failed with 'leaf_live exceeds a leaf's size'). Every row keeps two
    entries, so the index serializes and loads (the loader checks 2n slots)."""
    from mipscan import _live
    rng, db = _concentrated(seed=4, n=6000)
    half = len(db) // 2
    s = mipscan.builder(db[:half], 10, "dot_product").tree(
        30, 6, incremental_threshold=0.2, soar_lambda=1.0).score_ah(2).reorder(100) \
        .build(docids=list(range(half)))
    for b in range(half, len(db), 256):
        ids = list(range(b, min(b + 256, len(db))))
        s.upsert(ids, db[ids])
        _check_segments(s)
    s.delete(list(range(0, len(db), 4)))
    _check_segments(s)
    st = s._state
    assert not np.any(st.row_leaf[_live.live_rows(st), 0] == st.row_leaf[_live.live_rows(st), 1])
    s.serialize(tmp_path / "ix")
    t = mipscan.load_searcher(tmp_path / "ix")
    q = db[:20]
    np.testing.assert_array_equal(t.search_batched(q).indices, s.search_batched(q).indices)
