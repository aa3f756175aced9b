"""Index folders: round trips, damaged or foreign folders, atomic replacement."""

import json
import os

import numpy as np
import pytest

import mipscan


@pytest.fixture(scope="module")
def built():
    rng = np.random.default_rng(3)
    db = rng.normal(size=(3000, 16)).astype(np.float32)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    return db, q


def verify_serialization(searcher, q, path, mmap=True):
    searcher.serialize(path)
    loaded = mipscan.load_searcher(path, mmap=mmap)
    a, b = searcher.search_batched(q), loaded.search_batched(q)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)
    return loaded


@pytest.mark.parametrize("metric", ["dot_product", "cosine", "squared_l2"])
@pytest.mark.parametrize("stages", ["tree_ah_reorder", "ah", "tree_bf", "tree_soar_ah", "tree_soar_bf_reorder"])
def test_round_trip_is_identical(built, tmp_path, metric, stages):
    db, q = built
    b = mipscan.builder(db, 10, metric)
    if "tree" in stages:
        b = b.tree(30, 5, soar_lambda=1.0 if "soar" in stages else None)
    b = b.score_ah(2) if "ah" in stages else b.score_brute_force()
    if "reorder" in stages:
        b = b.reorder(50)
    s = b.build()
    for mmap in (True, False):
        loaded = verify_serialization(s, q, tmp_path / f"index-{mmap}", mmap=mmap)
        assert loaded.index_bytes == s.index_bytes
        assert loaded.config == json.loads(json.dumps(s.config))


def test_serialize_replaces_an_existing_index_atomically(built, tmp_path):
    db, q = built
    s1 = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    s2 = mipscan.builder(db, 5, "dot_product").tree(30, 5).score_ah(2).build()
    path = tmp_path / "idx"
    s1.serialize(path)
    s2.serialize(path)
    loaded = mipscan.load_searcher(path)
    assert loaded.num_neighbors == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left


def test_refuses_to_overwrite_a_foreign_folder(built, tmp_path):
    db, _ = built
    (tmp_path / "mine.txt").write_text("precious")
    s = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    with pytest.raises(ValueError, match="not a mipscan index"):
        s.serialize(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.fixture
def saved(built, tmp_path):
    db, _ = built
    s = mipscan.builder(db, 10, "dot_product").tree(30, 5).score_ah(2).reorder(50).build()
    path = tmp_path / "idx"
    s.serialize(path)
    return path


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_damaged_files_are_rejected_naming_path_and_field(saved):
    for name in [f for f in _files(saved) if f.endswith(".npy")]:
        p = saved / name
        raw = p.read_bytes()
        # flip one byte in the data
        damaged = bytearray(raw)
        damaged[-1] ^= 0xFF
        p.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=name):
            mipscan.load_searcher(saved)
        # truncate
        p.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(ValueError, match=name):
            mipscan.load_searcher(saved)
        # delete
        p.unlink()
        with pytest.raises(ValueError, match=name):
            mipscan.load_searcher(saved)
        p.write_bytes(raw)
    mipscan.load_searcher(saved)  # restored: loads again


def test_edited_manifest_fields_are_rejected(saved):
    mpath = saved / "mipscan.json"
    original = json.loads(mpath.read_text())
    edits = {
        "format": lambda m: m.update(format="faiss"),
        "format_version": lambda m: m.update(format_version=99),
        "config.n": lambda m: m["config"].update(n=-1),
        "config.distance_measure": lambda m: m["config"].update(distance_measure="hamming"),
        "config.tree.num_leaves": lambda m: m["config"]["tree"].update(num_leaves="many"),
        "arrays.slot_ids.shape": lambda m: m["arrays"]["slot_ids"].update(shape=[5]),
        "arrays.codebooks.dtype": lambda m: m["arrays"]["codebooks"].update(dtype="<f8"),
        "arrays.centroids.sha256": lambda m: m["arrays"]["centroids"].update(sha256="0" * 64),
        "arrays": lambda m: m["arrays"].pop("reorder_rows"),
    }
    for field, edit in edits.items():
        m = json.loads(json.dumps(original))
        edit(m)
        mpath.write_text(json.dumps(m))
        with pytest.raises(ValueError) as info:
            mipscan.load_searcher(saved)
        msg = str(info.value)
        assert str(saved) in msg and field.split(".")[-1] in msg, msg
    mpath.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        mipscan.load_searcher(saved)
    mpath.unlink()
    with pytest.raises(ValueError, match="not a mipscan index"):
        mipscan.load_searcher(saved)


def test_swapped_file_from_another_index_is_rejected(built, saved, tmp_path):
    db, _ = built
    other = tmp_path / "other"
    mipscan.builder(db[:2000], 10, "dot_product").tree(30, 5).score_ah(2).reorder(50).build().serialize(other)
    os.replace(other / "slot_ids.npy", saved / "slot_ids.npy")
    with pytest.raises(ValueError, match="slot_ids"):
        mipscan.load_searcher(saved)


def test_structurally_inconsistent_arrays_are_rejected_even_unverified(saved):
    # A consistent manifest (checksums recomputed) over inconsistent arrays: the loader's
    # structural checks still refuse it instead of reading out of bounds.
    ids = np.load(saved / "slot_ids.npy")
    ids[0] = 10**9
    np.save(saved / "slot_ids.npy", ids)
    with pytest.raises(ValueError, match="slot_ids"):
        mipscan.load_searcher(saved, verify=False)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        mipscan.load_searcher(tmp_path / "missing")


def test_serialize_removes_temporaries_of_dead_writers(built, tmp_path):
    """Liveness is the writer's flock on its temporary folder, not its pid (a pid means
    nothing across PID namespaces): an unlocked folder is an orphan whatever its name
    says; a locked one is a live writer's, even when its pid is one we cannot see."""
    import subprocess
    import sys

    db, _ = built
    s = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    target = tmp_path / "idx"
    orphan = tmp_path / ".idx.tmp-1-abc123"  # a writer killed mid-write (pid 1 is alive)
    orphan.mkdir()
    (orphan / "centroids.npy").write_bytes(b"partial")
    alive = tmp_path / ".idx.tmp-999999-xyz789"  # no such pid here: another namespace's
    alive.mkdir()
    (alive / "centroids.npy").write_bytes(b"being written")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(alive)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        s.serialize(target)
        assert not orphan.exists() and (alive / "centroids.npy").read_bytes() == b"being written"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.tmp-999999-xyz789", "idx"]
    finally:
        holder.communicate("")
    s.serialize(target)  # the holder is gone: now it is an orphan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# ---------------------------------------------------------------- serialize never deletes user files
def _snapshot(root):
    """Every regular file under root (links not followed): path -> bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    out[p] = fh.read()
    return out


def test_serialize_replaces_only_folders_it_can_verify(built, tmp_path):
    """Issue 12, defect 4: serialize deleted a folder holding a user's own mipscan.json,
    and files a user added inside an index. Every target below is refused or replaced,
    and no user file is ever lost (the count is printed)."""
    db, q = built
    s = mipscan.builder(db, 10, "dot_product").tree(20, 4).score_ah(2).build()
    s2 = mipscan.builder(db[:2000], 7, "cosine").score_brute_force().build()
    user = tmp_path / "user"
    user.mkdir()
    cases = {}

    def case(name, make):
        path = tmp_path / name
        make(path)
        cases[name] = path

    case("own_json", lambda p: (p.mkdir(), (p / "mipscan.json").write_text('{"lr": 0.1}'),
                                (p / "weights.bin").write_bytes(b"\1\2\3")))
    case("own_json_only", lambda p: (p.mkdir(), (p / "mipscan.json").write_text("{}")))
    case("lookalike_json", lambda p: (p.mkdir(), (p / "mipscan.json").write_text(
        json.dumps({"format": "mipscan-index", "arrays": {}})), (p / "notes.txt").write_text("x")))
    case("not_json", lambda p: (p.mkdir(), (p / "mipscan.json").write_text("[" * 100000)))
    case("index_plus_file", lambda p: (s2.serialize(p), (p / "README.md").write_text("mine")))
    case("index_plus_folder", lambda p: (s2.serialize(p), (p / "extra").mkdir(),
                                         (p / "extra" / "a.txt").write_text("mine")))
    case("index_with_linked_file", lambda p: (s2.serialize(p), (user / "c.npy").write_bytes(
        (p / "centroids.npy").read_bytes()), (p / "centroids.npy").unlink(),
        os.symlink(user / "c.npy", p / "centroids.npy")))
    case("a_file", lambda p: p.write_text("not a folder"))
    case("link_to_user_folder", lambda p: ((user / "docs").mkdir(), (user / "docs" / "d.txt")
                                           .write_text("mine"), os.symlink(user / "docs", p)))
    before = _snapshot(tmp_path)
    assert len(before) >= 9
    refused = 0
    for name, path in cases.items():
        with pytest.raises(ValueError, match="refusing|not a folder|not a mipscan index") as info:
            s.serialize(path)
        assert str(path) in str(info.value), info.value
        refused += 1
    after = _snapshot(tmp_path)
    lost = [p for p, data in before.items() if after.get(p) != data]
    print(f"\n{refused} targets refused; user files before {len(before)}, lost {len(lost)}")
    assert not lost
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]
    # the refused index is intact
    mipscan.load_searcher(cases["index_plus_file"])


def test_serialize_into_an_empty_folder_and_over_its_own_index(built, tmp_path):
    db, q = built
    s = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    target = tmp_path / "empty"
    target.mkdir()
    s.serialize(target)
    s.serialize(target)  # an index whose files are exactly the listed ones
    assert mipscan.load_searcher(target).search_batched(q).indices.shape == (len(q), 10)
    assert sorted(os.listdir(tmp_path)) == ["empty"]


@pytest.mark.parametrize("dangling", [False, True])
def test_serialize_through_a_symlink_replaces_the_folder_it_names(built, tmp_path, dangling):
    """Issue 12, defect 4: a link to an index was replaced by a folder, leaving a
    .link.tmp-* link behind. The link is followed (as open() follows it): the folder it
    names is replaced atomically and the link stays a link."""
    db, q = built
    s1 = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    s2 = mipscan.builder(db, 5, "dot_product").tree(20, 4).score_ah(2).build()
    real = tmp_path / "real" / "idx"
    if not dangling:
        s1.serialize(real)
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(real, links / "link")
    os.symlink(links / "link", links / "link2")  # a chain
    s2.serialize(links / "link2")
    assert os.path.islink(links / "link") and os.path.islink(links / "link2")
    assert mipscan.load_searcher(links / "link").num_neighbors == 5
    assert mipscan.load_searcher(real).num_neighbors == 5
    assert sorted(os.listdir(links)) == ["link", "link2"]
    assert sorted(os.listdir(real.parent)) == ["idx"]


def test_serialize_over_a_live_mmapped_searcher_keeps_it_answering(built, tmp_path):
    """mmap policy: serialize swaps whole folders and never writes into an existing file,
    so a searcher memory-mapping the old files keeps valid pages (the unlinked files live
    on while mapped) and keeps answering exactly as before."""
    db, q = built
    path = tmp_path / "idx"
    old = mipscan.builder(db, 10, "dot_product").tree(30, 5).score_ah(2).reorder(50).build()
    old.serialize(path)
    live = mipscan.load_searcher(path, mmap=True)
    expected = live.search_batched(q)
    inode = os.stat(path / "reorder_rows.npy").st_ino
    for i in range(3):
        new = mipscan.builder(db[i * 100:], 10, "squared_l2").score_brute_force().reorder(40).build()
        new.serialize(path)
        assert os.stat(path / "reorder_rows.npy").st_ino != inode
        for method in ("search_batched", "search_batched_parallel"):
            r = getattr(live, method)(q)
            np.testing.assert_array_equal(r.indices, expected.indices)
            np.testing.assert_array_equal(r.distances, expected.distances)
    assert mipscan.load_searcher(path).distance_measure == "squared_l2"


def test_orphan_clean_up_deletes_only_index_files(built, tmp_path):
    """A folder named like a writer's temporary but holding a user's file keeps it."""
    db, _ = built
    s = mipscan.builder(db, 10, "dot_product").score_brute_force().build()
    odd = tmp_path / ".idx.tmp-7-mine"
    odd.mkdir()
    (odd / "centroids.npy").write_bytes(b"partial")
    (odd / "diary.txt").write_text("mine")
    os.symlink(tmp_path / "elsewhere", tmp_path / ".idx.tmp-8-link")
    s.serialize(tmp_path / "idx")
    assert sorted(os.listdir(odd)) == ["diary.txt"]
    assert os.path.islink(tmp_path / ".idx.tmp-8-link")


def test_mmap_false_is_immune_to_files_rewritten_in_place(built, tmp_path):
    """mmap policy, the other half: a program other than mipscan truncating or rewriting
    index files in place would SIGBUS a searcher mapping them (the kernel's rule for
    mmap); mmap=False reads each file once, so such a searcher is unaffected."""
    db, q = built
    path = tmp_path / "idx"
    mipscan.builder(db, 10, "dot_product").tree(30, 5).score_ah(2).reorder(50).build().serialize(path)
    s = mipscan.load_searcher(path, mmap=False)
    expected = s.search_batched(q)
    for f in path.iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(0)
    r = s.search_batched(q)
    np.testing.assert_array_equal(r.indices, expected.indices)
    np.testing.assert_array_equal(r.distances, expected.distances)
