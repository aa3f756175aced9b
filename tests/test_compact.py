"""Compact storage and ScaNN's remaining knobs (issue 14): int8 / bfloat16 copies for the
reorder, brute-force scoring and centroids, their kernels at every SIMD level, SOAR's
over-retrieval factor, and the ScaNN 1.4 arguments that are refused by name."""

from __future__ import annotations

import enum
import json

import numpy as np
import pytest

import mipscan
from mipscan import _mipscan
from mipscan._build import int8_scales, quantize_int8, to_bfloat16

LEVELS = _mipscan.simd_levels()


# ---------------------------------------------------------------- kernels
def spec_dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    """reorder.h's specification in numpy float32: sixteen running sums (lane j % 16,
    multiply then add), then s[i] = l[i] + l[i + 8] and the fixed tree."""
    f = np.float32
    lanes = [f(0)] * 16
    for j in range(len(a)):
        lanes[j % 16] = f(lanes[j % 16] + f(f(a[j]) * f(b[j])))
    s = [f(lanes[i] + lanes[i + 8]) for i in range(8)]
    return f(f(f(s[0] + s[4]) + f(s[2] + s[6])) + f(f(s[1] + s[5]) + f(s[3] + s[7])))


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("d", [1, 7, 8, 15, 16, 17, 31, 33, 50, 64, 100])
def test_quantized_dot_kernels_equal_the_scalar_spec_exactly(rng, level, d):
    q = rng.normal(size=(4, d)).astype(np.float32)
    i8 = rng.integers(-127, 128, size=(6, d)).astype(np.int8)
    bf = to_bfloat16(rng.normal(size=(6, d)).astype(np.float32) * 3)
    out8, out16 = _mipscan.dot_i8(q, i8, level), _mipscan.dot_bf16(q, bf, level)
    vals = bf16_values(bf)
    for i in range(4):
        for r in range(6):
            assert out8[i, r] == spec_dot(q[i], i8[r].astype(np.float32)), (level, d, i, r)
            assert out16[i, r] == spec_dot(q[i], vals[r]), (level, d, i, r)


def test_every_level_returns_the_same_bits(rng):
    q = rng.normal(size=(8, 50)).astype(np.float32) * 1e3
    i8 = rng.integers(-127, 128, size=(40, 50)).astype(np.int8)
    bf = to_bfloat16(rng.normal(size=(40, 50)).astype(np.float32))
    ref8, ref16 = _mipscan.dot_i8(q, i8, "scalar"), _mipscan.dot_bf16(q, bf, "scalar")
    for level in LEVELS:
        assert np.array_equal(_mipscan.dot_i8(q, i8, level).view(np.uint32), ref8.view(np.uint32))
        assert np.array_equal(_mipscan.dot_bf16(q, bf, level).view(np.uint32), ref16.view(np.uint32))


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -2.5, 0.0, 3e38],
                 np.float32)
    got = bf16_values(to_bfloat16(x))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one (1.0);
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to 1 + 2^-6.
    assert got.tolist()[:6] == [1.0, 1.0, 1.0 + 2 ** -6, 1.0, -2.5, 0.0]
    assert np.isfinite(got[6]) and abs(got[6] / 3e38 - 1) < 2 ** -8


def test_int8_scales_are_per_dimension_max_abs_over_127(rng):
    x = rng.normal(size=(500, 6)).astype(np.float32)
    x[:, 3] = 0
    sc = int8_scales(x)
    assert sc.dtype == np.float32 and sc[3] == 1.0
    keep = [0, 1, 2, 4, 5]
    assert np.allclose(sc[keep], np.abs(x[:, keep]).max(axis=0) / 127, rtol=1e-6)
    x[7] = 0
    x[8] *= 1e-3  # a short row: its own scale keeps its digits
    codes, rows = quantize_int8(x, sc)
    assert codes.min() >= -127 and codes.max() <= 127
    assert rows.dtype == np.float32 and rows[7] == 1.0 and (rows > 0).all() and (rows <= 1).all()
    assert np.abs(codes[np.arange(len(x)) != 7]).max(axis=1).min() == 127  # each row spans int8
    err = np.abs(codes * sc * rows[:, None] - x)
    assert (err <= sc * rows[:, None] / 2 * 1.0001 + 1e-12).all()
    assert err[8].max() <= 1e-3 * sc.max()


# ---------------------------------------------------------------- searchers
@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(40, 24)).astype(np.float32)
    db = (centers[rng.integers(0, 40, 6000)] + 0.5 * rng.normal(size=(6000, 24))).astype(np.float32)
    q = (centers[rng.integers(0, 40, 100)] + 0.5 * rng.normal(size=(100, 24))).astype(np.float32)
    return db, q


def recall(ids, truth) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(np.asarray(ids), truth)]))


def exact(db, q, k=10, metric="dot_product"):
    return np.asarray(mipscan.brute_force(db, q, k, metric).indices)


def build(db, metric="dot_product", quantize="float32", **tree):
    return (mipscan.builder(db, 10, metric).tree(40, 10, **tree).score_ah(2)
            .reorder(200, quantize=quantize).build())


def error_bound(q, s, kind):
    """Per query, a bound on |q . (x - stored x)| over the rows of a quantized copy."""
    if kind == "int8":
        return np.abs(q) @ (s._arrays["reorder_scales"].astype(np.float64) / 2)
    rows = s._arrays["reorder_bf16"]
    return 2.0 ** -8 * (np.abs(q) @ np.abs(bf16_values(rows)).max(axis=0).astype(np.float64))


@pytest.mark.parametrize("metric", ["dot_product", "cosine", "squared_l2"])
def test_quantized_reorder_is_exact_up_to_its_error_bound_and_small(clustered, metric):
    """Every id returned scores (exactly, in float64 on the original rows) at least the
    true 10th score minus twice the quantization error bound: the quantized reorder only
    confuses rows closer than its error. (Recall on real data: bench_compact.py.)"""
    db, q = clustered
    f32 = build(db, metric)
    qm = f32._to_mips(q).astype(np.float64)
    rows = f32._arrays["reorder_rows"].astype(np.float64)
    true = qm @ rows.T
    tenth = np.sort(true, axis=1)[:, -10]
    for quantize, name, ratio in (("int8", "reorder_int8", 0.45), ("bfloat16", "reorder_bf16", 0.7)):
        s = build(db, metric, quantize)
        assert "reorder_rows" not in s._arrays and name in s._arrays
        assert s.index_bytes <= ratio * f32.index_bytes, (quantize, s.index_bytes, f32.index_bytes)
        ids = np.asarray(s.search_batched(q, leaves_to_search=40, pre_reorder_num_neighbors=1000).indices)
        got = np.take_along_axis(true, ids.astype(np.int64), 1).min(axis=1)
        slack = 2 * error_bound(qm, s, quantize) + 1e-4
        assert (got >= tenth - slack).all(), (metric, quantize, np.min(got - tenth + slack))


def test_quantized_scores_are_the_dequantized_rows_exact_scores(clustered):
    db, q = clustered
    s = build(db, quantize="int8")
    rows = (s._arrays["reorder_int8"].astype(np.float64) * s._arrays["reorder_scales"]
            * s._arrays["reorder_row_scales"][:, None])
    ids, sc = s.search_batched(q)
    want = np.take_along_axis(q.astype(np.float64) @ rows.T, np.asarray(ids, np.int64), 1)
    assert np.allclose(sc, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("quantize", ["int8", "bfloat16"])
def test_searches_agree_at_every_simd_level(clustered, quantize):
    db, q = clustered
    s = (mipscan.builder(db, 10, "dot_product")
         .tree(40, 10, quantize_centroids=quantize).score_brute_force(quantize=quantize)
         .reorder(50, quantize=quantize).build())
    ref = s._index.search_batch(q, None, 10, 50, 10, 1, "scalar")
    for level in LEVELS:
        ids, sc = s._index.search_batch(q, None, 10, 50, 10, 1, level)
        assert np.array_equal(ids, ref[0]) and np.array_equal(sc, ref[1]), level


@pytest.mark.parametrize("quantize,floor", [("int8", 0.95), ("bfloat16", 0.98)])
def test_brute_force_over_a_quantized_copy(clustered, quantize, floor):
    db, q = clustered
    truth = exact(db, q)
    s = mipscan.builder(db, 10, "dot_product").score_brute_force(quantize=quantize).build()
    assert "slot_rows" not in s._arrays
    r = recall(s.search_batched(q).indices, truth)
    assert r >= floor, f"score_brute_force(quantize={quantize}): recall@10 {r:.4f} < {floor}"


@pytest.mark.parametrize("quantize", ["int8", "bfloat16"])
def test_quantized_centroids_choose_mostly_the_same_leaves(clustered, quantize):
    db, q = clustered
    plain = build(db)
    qc = build(db, quantize_centroids=quantize)
    assert np.array_equal(plain._arrays["centroids"], qc._arrays["centroids"])
    # Same tree, so the same leaf ids; compare the 10 leaves each query searches.
    c = plain._arrays["centroids"].astype(np.float64)
    if quantize == "int8":
        cq = (qc._arrays["centroids_int8"] * qc._arrays["centroid_scales"].astype(np.float64)
              * qc._arrays["centroid_row_scales"][:, None])
    else:
        cq = bf16_values(qc._arrays["centroids_bf16"]).astype(np.float64)
    top = lambda cc: np.argsort(-(q @ cc.T), axis=1, kind="stable")[:, :10]
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(c), top(cq))])
    assert same >= 0.95, f"quantize_centroids={quantize}: {same:.3f} of the searched leaves agree"
    assert recall(qc.search_batched(q).indices, exact(db, q)) >= \
        recall(plain.search_batched(q).indices, exact(db, q)) - 0.01


class ScannReorderType(enum.Enum):  # stands for scann_builder.ReorderType (same names)
    FLOAT32 = 1
    INT8 = 2
    BFLOAT16 = 3


@pytest.mark.parametrize("spelling,stored", [
    (True, "int8"), (False, "float32"), (mipscan.ReorderType.INT8, "int8"),
    (mipscan.ReorderType.BFLOAT16, "bfloat16"), (mipscan.ReorderType.FLOAT32, "float32"),
    (ScannReorderType.INT8, "int8"), ("INT8", "int8"), ("bf16", "bfloat16"),
    (mipscan.scann_ops_pybind.ReorderType.INT8, "int8")])
def test_scann_spellings_of_quantize(clustered, spelling, stored):
    db, _ = clustered
    b = mipscan.builder(db, 10, "dot_product").score_ah(2).reorder(20, quantize=spelling)
    assert b.params["reorder"]["quantize"] == stored
    b = mipscan.builder(db, 10, "dot_product").score_brute_force(spelling)
    assert b.params["score_brute_force"]["quantize"] == stored


def test_autopilot_passes_quantize_to_the_reorder(clustered):
    db, q = clustered
    s = mipscan.builder(db, 10, "dot_product").autopilot(quantize=mipscan.ReorderType.INT8).build()
    # 6,000 rows: autopilot scores exactly (no tree), over the int8 copy.
    assert s.config["score_brute_force"]["quantize"] == "int8" and "slot_int8" in s._arrays


@pytest.mark.parametrize("metric,stages", [
    ("dot_product", lambda b: b.tree(20, 5, quantize_centroids=True).score_ah(2)
     .reorder(50, quantize=True)),
    ("cosine", lambda b: b.tree(20, 5, quantize_centroids="bfloat16")
     .score_brute_force(quantize="bfloat16").reorder(50, quantize="bfloat16")),
    ("squared_l2", lambda b: b.score_brute_force(quantize=True)),
    ("dot_product", lambda b: b.tree(20, 5, soar_lambda=1.5, overretrieve_factor=1.5)
     .score_ah(2).reorder(50, quantize=True)),
    ("squared_l2", lambda b: b.tree(20, 5).upper_tree(4, 2).score_ah(2).reorder(50)),
])
@pytest.mark.parametrize("mmap", [True, False])
def test_each_option_serializes_and_loads(clustered, tmp_path, metric, stages, mmap):
    db, q = clustered
    s = stages(mipscan.builder(db, 10, metric)).build()
    s.serialize(tmp_path / "ix")
    t = mipscan.load_searcher(tmp_path / "ix", mmap=mmap)
    assert json.dumps(t.config, sort_keys=True) == json.dumps(s.config, sort_keys=True)
    assert set(t._arrays) == set(s._arrays)
    for name in s._arrays:
        assert t._arrays[name].dtype == s._arrays[name].dtype
        assert np.array_equal(t._arrays[name], s._arrays[name]), name
    a, b = s.search_batched(q), t.search_batched(q)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.distances, b.distances)


def test_folders_written_before_quantize_existed_still_load(clustered, tmp_path):
    import json
    db, q = clustered
    s = mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(30).build()
    s.serialize(tmp_path / "ix")
    path = tmp_path / "ix" / "mipscan.json"
    m = json.loads(path.read_text())
    m["config"]["reorder"]["quantize"] = False  # format 1 as first written
    m["config"]["tree"]["quantize_centroids"] = False
    path.write_text(json.dumps(m))
    t = mipscan.load_searcher(tmp_path / "ix")
    assert t.config["reorder"]["quantize"] == "float32"
    assert np.array_equal(t.search_batched(q).indices, s.search_batched(q).indices)


def test_refused_scales_name_the_file(clustered, tmp_path):
    import hashlib
    import json
    db, _ = clustered
    s = mipscan.builder(db, 10, "dot_product").score_ah(2).reorder(30, quantize=True).build()
    s.serialize(tmp_path / "ix")
    for bad in (0.0, -1.0, np.nan, np.inf, 1e30):
        sc = np.array(s._arrays["reorder_scales"])
        sc[3] = bad
        np.save(tmp_path / "ix" / "reorder_scales.npy", sc)
        m = json.loads((tmp_path / "ix" / "mipscan.json").read_text())
        m["arrays"]["reorder_scales"]["sha256"] = hashlib.sha256(
            (tmp_path / "ix" / "reorder_scales.npy").read_bytes()).hexdigest()
        (tmp_path / "ix" / "mipscan.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match=r"reorder_scales\.npy.*arrays\.reorder_scales.*at \(3,\)"):
            mipscan.load_searcher(tmp_path / "ix")


# ---------------------------------------------------------------- SOAR over-retrieval
def test_overretrieve_factor_bounds_the_slots_kept_for_the_distinct_rows(clustered):
    db, q = clustered
    truth = exact(db, q)
    got = {}
    for factor in (None, 1.0, 2.0, 4.0):
        s = (mipscan.builder(db, 10, "dot_product")
             .tree(40, 8, soar_lambda=1.5, overretrieve_factor=factor).score_ah(2).reorder(40).build())
        r = s.search_batched(q, pre_reorder_num_neighbors=40)
        ids = np.asarray(r.indices)
        assert all(len(set(row)) == 10 for row in ids)
        got[factor] = (ids, recall(ids, truth))
    assert np.array_equal(got[None][0], got[2.0][0])  # the default is ScaNN's 2
    # More slots per reordered row can only add distinct candidates: recall does not drop.
    assert got[1.0][1] <= got[2.0][1] + 0.01 and got[2.0][1] <= got[4.0][1] + 0.01, got


# ---------------------------------------------------------------- ScaNN 1.4 surface
def test_scann_arguments_that_cannot_be_honoured_are_refused_by_name(clustered):
    db, _ = clustered
    b = lambda: mipscan.builder(db, 10, "dot_product")
    cases = [
        (lambda: mipscan.builder(db, 10, "squared_l2").tree(10, 3, avq=2.5).score_ah(2).build(),
         r"tree avq is 2.5: AVQ centroids apply to inner-product"),
        (lambda: b().score_ah(2).reorder(20, quantize=True, anisotropic_quantization_threshold=0.2)
         .build(), "reorder anisotropic_quantization_threshold"),
        (lambda: b().pca(8).score_ah(2).build(), r"pca\(\) projections are not supported"),
        (lambda: b().truncate(8).score_ah(2).build(), r"truncate\(\) projections are not supported"),
        (lambda: b().upper_tree(4, 2).score_ah(2).build(), r"upper_tree\(\) needs tree\(\)"),
        (lambda: b().tree(10, 3).upper_tree(4, 2, soar_lambda=1.0).score_ah(2).build(),
         r"upper_tree soar_lambda is 1.0: not supported"),
        (lambda: b().tree(10, 3).upper_tree(4, 5).score_ah(2).build(),
         r"upper_tree num_leaves_to_search must be an int in \[1, num_leaves=4\]"),
        (lambda: b().score_ah(2, residual_quantization=False), "residual_quantization=False"),
        (lambda: b().score_ah(2, hash_type="lut256"), "hash_type"),
    ]
    for run, message in cases:
        with pytest.raises(ValueError, match=message):
            run()


def test_scann_arguments_that_are_honoured_or_equivalent(clustered):
    db, q = clustered
    base = mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(30).build()
    same = (mipscan.builder(db, 10, "dot_product").tree(20, 5, avq=float("nan"))
            .score_ah(2, residual_quantization=True).reorder(30, quantize=False).build())
    assert np.array_equal(base.search_batched(q).indices, same.search_batched(q).indices)
    same.set_num_threads(2)
    assert np.array_equal(base.search_batched(q).indices,
                          same.search_batched_parallel(q).indices)


def test_avq_centroids_minimise_the_anisotropic_loss(clustered):
    from mipscan._build import avq_centroids

    db, q = clustered
    plain = mipscan.builder(db, 10, "dot_product").tree(20, 5).score_ah(2).reorder(50).build()
    avq = mipscan.builder(db, 10, "dot_product").tree(20, 5, avq=4.0).score_ah(2).reorder(50).build()
    assert np.array_equal(plain._arrays["leaf_offsets"], avq._arrays["leaf_offsets"])
    assert not np.array_equal(plain._arrays["centroids"], avq._arrays["centroids"])
    # Leaf 0's centre beats its mean and small perturbations on the anisotropic loss.
    rows = db[plain._arrays["slot_ids"][:plain._arrays["leaf_offsets"][1]]].astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    loss = lambda c: (((rows - c) ** 2).sum() + 3.0 * (((rows - c) * unit).sum(1) ** 2).sum())
    labels = np.zeros(len(rows), np.int64)
    c = avq_centroids(rows, labels, rows.mean(0, keepdims=True), 4.0)[0].astype(np.float64)
    rng = np.random.default_rng(0)
    assert loss(c) <= loss(rows.mean(0))
    assert all(loss(c) <= loss(c + 1e-3 * rng.normal(size=c.shape)) for _ in range(5))
    truth = exact(db, q)
    assert recall(avq.search_batched(q).indices, truth) >= 0.9


def test_upper_tree_scores_only_the_children_of_the_best_upper_nodes(clustered):
    db, q = clustered
    truth = exact(db, q)
    s = (mipscan.builder(db, 10, "dot_product").tree(40, 10).upper_tree(8, 3)
         .score_ah(2).reorder(100).build())
    uo, uc = s._arrays["upper_offsets"], s._arrays["upper_centroids"].astype(np.float64)
    c = s._arrays["centroids"].astype(np.float64)
    assert uo[0] == 0 and uo[-1] == len(c) and (np.diff(uo) > 0).all()
    spread = s._arrays["leaf_spread"].astype(np.float64)  # the leaf order (tree spread_weight 2)
    # With one leaf searched, the result comes from the best child of the 3 best upper
    # nodes (when that leaf holds at least 10 points), which need not be the best leaf.
    for qi in q:
        top3 = np.argsort(-(uc @ qi), kind="stable")[:3]
        kids = np.concatenate([np.arange(uo[u], uo[u + 1]) for u in top3])
        leaf = kids[int(np.argmax(c[kids] @ qi + 2.0 * np.linalg.norm(qi) * spread[kids]))]
        rows = s._arrays["slot_ids"][s._arrays["leaf_offsets"][leaf]:s._arrays["leaf_offsets"][leaf + 1]]
        ids = s.search(qi, leaves_to_search=1, pre_reorder_num_neighbors=10).indices
        if len(rows) >= 10:
            assert set(ids.tolist()) <= set(rows.tolist())
    assert recall(s.search_batched(q).indices, truth) >= 0.9
    # Every upper node searched: the same leaves as without an upper tree.
    full = (mipscan.builder(db, 10, "dot_product").tree(40, 10).upper_tree(8, 8)
            .score_ah(2).reorder(100).build())
    assert recall(full.search_batched(q).indices, truth) >= recall(s.search_batched(q).indices, truth) - 0.01


# ---------------------------------------------------------------- with the live index and filters
STATIC_ONLY = {
    "int8 reorder": lambda b: b.tree(40, 10).score_ah(2).reorder(200, quantize="int8"),
    "bf16 brute force": lambda b: b.score_brute_force(quantize="bfloat16"),
    "int8 centroids": lambda b: b.tree(40, 10, quantize_centroids=True).score_ah(2).reorder(200),
    "upper tree": lambda b: b.tree(40, 10).upper_tree(6, 3).score_ah(2).reorder(200),
}


@pytest.mark.parametrize("layout", sorted(STATIC_ONLY))
def test_quantized_and_upper_tree_indexes_refuse_updates_and_stay_unchanged(clustered, layout):
    """The live layout keeps float32 rows and one level of leaves: updates on these
    indexes raise ValueError naming why, and the index answers as before."""
    db, q = clustered
    s = STATIC_ONLY[layout](mipscan.builder(db, 10, "dot_product")).build(docids=[f"d{i}" for i in range(len(db))])
    before = s.search_batched(q)
    for call in (lambda: s.upsert(["new"], db[:1]), lambda: s.delete(["d3"]),
                 lambda: s.update(["d1"], db[:1], delete=["d2"])):
        with pytest.raises(ValueError, match="quantized copy|upper_tree"):
            call()
    after = s.search_batched(q)
    assert s.size() == len(db)
    assert np.array_equal(np.asarray(after.indices), np.asarray(before.indices))
    assert np.array_equal(after.distances, before.distances)


@pytest.mark.parametrize("stages", [
    lambda b: b.tree(40, 10, incremental_threshold=0.2).score_ah(2).reorder(100, quantize="int8"),
    lambda b: b.tree(40, 10, incremental_threshold=0.2, quantize_centroids=True).score_ah(2),
    lambda b: b.autopilot(mode="ONLINE_INCREMENTAL", quantize=mipscan.ReorderType.BFLOAT16),
])
def test_online_incremental_training_refuses_quantized_storage(clustered, stages):
    db, _ = clustered
    with pytest.raises(ValueError, match="online incremental training needs"):
        stages(mipscan.builder(db, 10, "dot_product")).build(docids=list(range(len(db))))


@pytest.mark.parametrize("layout", sorted(STATIC_ONLY))
def test_filtered_search_over_quantized_and_upper_tree_indexes(clustered, layout):
    """Filters work on every layout: only allowed rows come back, and the exact plan
    scores the quantized copy (so it equals brute force over the stored rows where the
    index keeps them in float32, and is close otherwise)."""
    db, q = clustered
    s = STATIC_ONLY[layout](mipscan.builder(db, 10, "dot_product")).build()
    rng = np.random.default_rng(3)
    allowed = np.sort(rng.choice(len(db), size=len(db) // 20, replace=False))
    truth = exact(db[allowed], q)
    for strategy in ("auto", "exact", "index"):
        ids = np.asarray(s.search_batched(q, allowed=allowed, filter_strategy=strategy).indices)
        assert np.isin(ids, allowed).all(), (layout, strategy)
        r = recall(ids, allowed[truth])
        assert r >= (0.9 if strategy == "index" else 0.97), (layout, strategy, r)
