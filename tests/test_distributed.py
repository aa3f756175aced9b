"""mipscan.distributed on a real local Ray cluster started here (2 CPUs, no dashboard,
500 MB object store; one per module), plus one separately started head (`ray start --head
--block`) that a separate driver process joins.

Ray workers import the mipscan this test imports: the folder holding the package goes on
their PYTHONPATH (src/ in a checkout, site-packages in CI's venv).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mipscan
from mipscan import distributed
from mipscan.distributed import ShardedIndex, ShardUnavailableError, batch_search, shard_of

from _ray_util import PACKAGE_ROOT, ray_env, ray_head

ray = pytest.importorskip("ray")  # the test extra brings it; CI never skips

RUNTIME_ENV = {"env_vars": {"PYTHONPATH": PACKAGE_ROOT}}


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=500 * 1024 * 1024, runtime_env=RUNTIME_ENV,
             logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    gc.collect()  # release this module's actor handles while their cluster is up
    ray.shutdown()


def _data(n=20_000, d=32, nq=100, seed=7):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d))
    db = (centers[rng.integers(0, 20, n)] + rng.normal(scale=0.6, size=(n, d))).astype(np.float32)
    q = (centers[rng.integers(0, 20, nq)] + rng.normal(scale=0.6, size=(nq, d))).astype(np.float32)
    return db, q


def _recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


# ---------------------------------------------------------------- routing (no cluster)
def test_shard_of_is_a_fixed_function_of_the_docid():
    ids = np.array([0, 1, 2, -5, 2**62, 123456789], np.int64)
    s = shard_of(ids, 4)
    assert s.dtype == np.int64 and ((s >= 0) & (s < 4)).all()
    assert np.array_equal(s, [shard_of([i], 4)[0] for i in ids])  # batch-independent
    counts = np.bincount(shard_of(np.arange(100_000), 8), minlength=8)
    assert counts.min() > 12_000  # balanced (12,500 each)


def test_merge_keeps_the_best_k_by_score_and_direction():
    parts = [(np.array([[1, 2]]), np.array([[5.0, 1.0]], np.float32)),
             (np.array([[3, 4]]), np.array([[3.0, 2.0]], np.float32))]
    assert distributed.merge(parts, 3, "dot_product").indices.tolist() == [[1, 3, 4]]
    assert distributed.merge(parts, 3, "squared_l2").indices.tolist() == [[2, 4, 3]]


# ---------------------------------------------------------------- exact search
@pytest.mark.parametrize("metric", ["dot_product", "squared_l2"])
def test_sharded_brute_force_equals_single_node_brute_force(cluster, metric):
    db, q = _data()
    rng = np.random.default_rng(1)
    docids = rng.choice(2**40, size=len(db), replace=False).astype(np.int64) - 2**39
    with ShardedIndex.build(db, 4, 10, metric, docids=docids) as index:
        assert index.n == len(db) and len(index.shard_sizes) == 4
        ids, scores = index.search_batched(q, final_num_neighbors=10)
        want_rows, want_scores = mipscan.brute_force(db, q, 10, metric)
        assert np.array_equal(ids, docids[want_rows.astype(np.int64)])
        # The shards score with the engine's exact kernel; brute_force with BLAS: the same
        # ranking, scores equal to float32 rounding. Against one index of the same kind
        # the scores are bit-identical.
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
        single = mipscan.builder(db, 10, metric).score_brute_force().build()
        s_rows, s_scores = single.search_batched(q)
        assert np.array_equal(ids, docids[s_rows.astype(np.int64)])
        assert np.array_equal(scores, s_scores)
        # A copy in a Ray task (as a Serve replica would hold it) searches the same actors.
        remote = ray.remote(lambda ix, qq: ix.search_batched(qq).indices)
        assert np.array_equal(ray.get(remote.remote(index, q[:5])), ids[:5])
        one_ids, one_scores = index.search(q[3], final_num_neighbors=25)
        assert np.array_equal(one_ids, docids[mipscan.brute_force(db, q[3], 25, metric)
                                               .indices.astype(np.int64)])


def test_k_larger_than_a_shard_and_bad_arguments(cluster):
    db, q = _data(n=60, nq=5)
    with ShardedIndex.build(db, 3, 5) as index:
        ids, _ = index.search_batched(q, final_num_neighbors=60)  # every shard holds < 60
        assert np.array_equal(ids, mipscan.brute_force(db, q, 60).indices.astype(np.int64))
        with pytest.raises(ValueError, match=r"final_num_neighbors must be an int in \[1, 60\]"):
            index.search_batched(q, final_num_neighbors=61)
        with pytest.raises(ValueError, match="d=32"):
            index.search_batched(q[:, :8])
        with pytest.raises(ValueError, match="NaN"):
            index.search(np.full(32, np.nan, np.float32))
    with pytest.raises(ValueError, match="shard .* gets no docid"):
        same = [i for i in range(100) if shard_of([i], 2)[0] == 0][:2]
        ShardedIndex.build(db[:2], 2, 1, docids=np.array(same))
    with pytest.raises(ValueError, match="docids must be distinct"):
        ShardedIndex.build(db[:4], 2, 1, docids=np.array([1, 1, 2, 3]))


# ---------------------------------------------------------------- approximate search
def test_sharded_tree_ah_recall_matches_a_single_index(cluster, shared_data_dir):
    import h5py

    with h5py.File(shared_data_dir("glove-50-dev") / "glove-50-dev-90k.hdf5", "r") as f:
        db = np.ascontiguousarray(f["train"][:], np.float32)
        q = np.ascontiguousarray(f["test"][:1000], np.float32)
        truth = np.asarray(f["neighbors_ip"][:1000, :10])

    def configure(b):
        return (b.tree(num_leaves=150, num_leaves_to_search=15, training_sample_size=30_000)
                .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).set_seed(3))

    single = configure(mipscan.builder(db, 10, "dot_product")).build()
    single_recall = _recall(single.search_batched_parallel(q).indices, truth)
    with ShardedIndex.build(db, 2, 10, "dot_product", configure=configure) as index:
        sharded_recall = _recall(index.search_batched(q).indices, truth)
    assert sharded_recall >= single_recall - 0.005, (sharded_recall, single_recall)


# ---------------------------------------------------------------- faults
def _kill(actor, timeout: float = 60) -> None:
    """Kills a shard actor and waits until it is dead: ray.kill only sends the request,
    and a call that gets there first is still answered by the old actor."""
    from ray.exceptions import RayActorError

    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.info.remote(), timeout=timeout)
        except RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{actor} still answers {timeout} s after ray.kill")


def test_a_killed_shard_is_restored_and_the_next_query_is_correct(cluster, tmp_path):
    db, q = _data(n=8000)
    want = mipscan.brute_force(db, q, 10).indices.astype(np.int64)
    # From the object store (built in memory), then from folders (after serialize).
    with ShardedIndex.build(db, 2, 10) as index:
        before = index.actors()[1]
        _kill(before)
        assert np.array_equal(index.search_batched(q).indices, want)
        assert index.actors()[1] is not before
        index.serialize(tmp_path / "sharded")
        _kill(index.actors()[0])
        assert np.array_equal(index.search_batched(q).indices, want)
    with ShardedIndex.load(tmp_path / "sharded") as index:
        for actor in index.actors():  # every shard at once
            _kill(actor)
        assert np.array_equal(index.search_batched(q).indices, want)


def test_a_shard_that_cannot_come_back_raises_naming_it(cluster, tmp_path):
    db, q = _data(n=4000)
    root = tmp_path / "sharded"
    ShardedIndex.build(db, 2, 10, directory=root).shutdown()
    with ShardedIndex.load(root) as index:
        index.retries, index.retry_wait = 1, 0.05
        manifest = json.loads((root / distributed.MANIFEST).read_text())
        folder = root / manifest["shards"][1]["folder"]
        (folder / "mipscan.json").write_text("{}")  # the restart's source is damaged
        _kill(index.actors()[1])
        with pytest.raises(ShardUnavailableError, match="shard 1 of 2 .*could not be started again") as info:
            index.search_batched(q)
        assert info.value.shard == 1


# ---------------------------------------------------------------- folders
def test_serialize_load_round_trip_and_manifest_checks(cluster, tmp_path):
    db, q = _data(n=6000)
    root = tmp_path / "sharded"
    with ShardedIndex.build(db, 3, 10, configure=lambda b: b.tree(20, 5).score_ah(2).reorder(50),
                            directory=root) as built:
        want = built.search_batched(q)
        first = json.loads((root / distributed.MANIFEST).read_text())
        built.serialize(root)  # a second generation replaces the first
    manifest = json.loads((root / distributed.MANIFEST).read_text())
    assert manifest["generation"] != first["generation"]
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([distributed.MANIFEST] + [e["folder"] for e in manifest["shards"]]
                           + [e["docids"] for e in manifest["shards"] if e["docids"]])
    for e in manifest["shards"]:  # each shard is an ordinary index folder
        assert mipscan.load_searcher(root / e["folder"]).size() == e["n"]
    with ShardedIndex.load(root) as loaded:
        got = loaded.search_batched(q)
        assert np.array_equal(got.indices, want.indices)
        assert np.array_equal(got.distances, want.distances)
    manifest["n"] += 1
    (root / distributed.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="sha256 does not match"):
        ShardedIndex.load(root)
    with pytest.raises(ValueError, match="not a sharded mipscan index"):
        ShardedIndex.load(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder"):
        ShardedIndex.build(db, 2, 10, directory=tmp_path / "other")


def test_build_from_a_ray_dataset(cluster, tmp_path):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    db, q = _data(n=3000)
    docids = np.arange(len(db), dtype=np.int64) * 7 + 3
    ds = ray.data.from_arrow(pa.table({"docid": docids,
                                       "vector": ArrowTensorArray.from_numpy(db)}))
    with ShardedIndex.build_from_dataset(ds, 3, tmp_path / "sharded", 10) as index:
        assert sorted(index.shard_sizes) == sorted(np.bincount(shard_of(docids, 3)).tolist())
        want = docids[mipscan.brute_force(db, q, 10).indices.astype(np.int64)]
        assert np.array_equal(index.search_batched(q).indices, want)


def test_upsert_and_delete_are_routed_or_refused(cluster, tmp_path):
    db, q = _data(n=3000)
    with ShardedIndex.build(db, 2, 10) as index:
        new = np.ones((2, 32), np.float32) * 50
        if not distributed._live():
            with pytest.raises(NotImplementedError, match="cannot be updated in place"):
                index.upsert(np.array([10_000, 10_001]), new)
            with pytest.raises(NotImplementedError, match="cannot be updated in place"):
                index.delete(np.array([0]))
            return
        index.upsert(np.array([10_000, 10_001]), new)
        top = index.search(np.ones(32, np.float32), final_num_neighbors=2).indices
        assert sorted(top.tolist()) == [10_000, 10_001]
        index.delete(np.array([10_000]))
        with pytest.raises(KeyError):
            index.delete(np.array([10_000]))
        owner = shard_of([10_001], 2)[0]
        _kill(index.actors()[owner])  # replayed on restart
        assert index.search(np.ones(32, np.float32), final_num_neighbors=1).indices[0] == 10_001
        # Written with its updates, then killed: restarted from the folder, nothing replayed.
        index.serialize(tmp_path / "sharded")
        _kill(index.actors()[owner])
        assert index.search(np.ones(32, np.float32), final_num_neighbors=1).indices[0] == 10_001
        # A delete naming one known and one unknown docid deletes neither.
        with pytest.raises(KeyError, match="nothing was deleted"):
            index.delete(np.array([10_001, 10_000]))
        assert index.search(np.ones(32, np.float32), final_num_neighbors=1).indices[0] == 10_001


# ---------------------------------------------------------------- batch retrieval
def test_batch_search_of_all_943_movielens_users_equals_in_process(cluster, ml100k_dir, tmp_path):
    import pyarrow.parquet as pq
    from mipscan.recsys import tutorial_embeddings

    # The two-tower model of the demo, short (5 epochs, 2 noisy copies: 5,046 x 32).
    emb = tutorial_embeddings(ml100k_dir, epochs=5, copies=2, seed=42)
    users = np.ascontiguousarray(emb.all_users)
    assert users.shape == (943, 32)
    searcher = (mipscan.builder(emb.candidates, 10, "dot_product")
                .tree(num_leaves=60, num_leaves_to_search=10).score_ah(2).reorder(100).build())
    searcher.serialize(tmp_path / "index")
    want = searcher.search_batched_parallel(users)

    ds = batch_search(users, tmp_path / "index", 10, batch_size=300)
    got = ds.to_pandas().sort_values("query_id")
    assert got["query_id"].tolist() == list(range(943))
    assert np.array_equal(np.stack(got["neighbors"].to_numpy()), want.indices.astype(np.int64))
    assert np.array_equal(np.stack(got["distances"].to_numpy()), want.distances)

    # A Dataset of user ids and vectors, written as Parquet.
    table = ray.data.from_numpy(users).map_batches(
        lambda b: {"user_id": np.arange(1, 944)[: len(b["data"])], "vector": b["data"]},
        batch_format="numpy", batch_size=None)
    out = batch_search(table, tmp_path / "index", 10, output_path=tmp_path / "top10")
    rows = pq.read_table(out).to_pandas().sort_values("user_id")
    assert rows["user_id"].tolist() == list(range(1, 944))
    assert np.array_equal(np.stack(rows["neighbors"].to_numpy()), want.indices.astype(np.int64))


def test_batch_search_over_a_sharded_folder_equals_the_actors(cluster, tmp_path):
    db, q = _data(n=6000, nq=300)
    with ShardedIndex.build(db, 3, 10, directory=tmp_path / "sharded") as index:
        want = index.search_batched(q)
    got = batch_search(q, tmp_path / "sharded", 10).to_pandas().sort_values("query_id")
    assert np.array_equal(np.stack(got["neighbors"].to_numpy()), want.indices)
    assert np.array_equal(np.stack(got["distances"].to_numpy()), want.distances)
    with pytest.raises(ValueError, match="not a mipscan index folder"):
        batch_search(q, tmp_path, 10)


# ---------------------------------------------------------------- a separate cluster
def test_a_separate_driver_joins_a_ray_start_head_cluster(cluster, tmp_path):
    db, q = _data(n=5000, nq=20)
    root = tmp_path / "sharded"
    with ShardedIndex.build(db, 2, 10, directory=root) as index:  # written by this cluster
        want = index.search_batched(q)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "want.npy", want.indices)

    with ray_head(num_cpus=1) as (address, head):
        driver = textwrap.dedent(f"""
            import numpy as np, ray
            from mipscan.distributed import ShardedIndex
            ray.init(address={address!r}, logging_level="WARNING", log_to_driver=False)
            assert ray.cluster_resources().get("CPU") == 1.0, ray.cluster_resources()
            q = np.load({str(tmp_path / 'q.npy')!r})
            with ShardedIndex.load({str(root)!r}) as index:
                ids = index.search_batched(q).indices
            assert np.array_equal(ids, np.load({str(tmp_path / 'want.npy')!r}))
            print("DRIVER OK", ray.get_runtime_context().get_node_id() is not None)
            ray.shutdown()
        """)
        deadline = time.monotonic() + 60
        out = None
        while time.monotonic() < deadline:  # the head takes a few seconds to come up
            out = subprocess.run([sys.executable, "-c", driver], env=ray_env(),
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0 or "DRIVER OK" in out.stdout:
                break
            if head.poll() is not None:
                break
            if "ConnectionError" not in out.stderr and "Failed to connect" not in out.stderr:
                break
            time.sleep(2)
        assert out is not None and "DRIVER OK" in out.stdout, (out.stdout[-2000:],
                                                               out.stderr[-4000:])
