"""Consistent-but-malicious index folders (issue 12, Deliver-2).

A generator takes valid index folders and, for every array x every value class (NaN, inf,
huge, negative, out of range, wrong order, duplicates, zeros, wrong dtype, big-endian,
Fortran order, zero-length, a row short or extra, random bytes) and for every manifest key
x (wrong type, missing, huge, negative, zero, deep nesting), writes the tampered folder
WITH its sha256 recomputed and its manifest entry (dtype, shape) rewritten to match, so
that only the value and consistency checks can catch it. Then it loads it:

* refused: the ValueError must name the folder (and, for an array, the array);
* loaded: the folder is searched in a separate process (a crash there cannot take the
  test run down) with several k / leaves settings, and the results must be well-formed
  (shape, ids in [0, n), distinct, finite, best first) and right for the data the folder
  holds: with every leaf searched, an index that reorders (or scores exactly) returns the
  exact top-k of its stored rows.

The checksum-breaking matrix (flipped, truncated, swapped files) is tests/test_damaged.py.
Short profile by default (CI, well under 60 s); ``HYPOTHESIS_PROFILE=long`` tampers more
positions per value class (seeded random ones included) and adds layouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mipscan
from mipscan._validation import max_abs_value

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
N, D = 300, 8

LAYOUTS = {
    # metric, stages: every array an index can hold is in at least one layout, and
    # every metric; accepted folders of the first three can be checked exactly.
    "tree_ah_reorder": ("dot_product",
                        lambda b: b.tree(8, 3, min_partition_size=1).score_ah(2).reorder(30)),
    "tree_bf": ("cosine", lambda b: b.tree(8, 3, min_partition_size=1).score_brute_force()),
    "soar_ah_l2_reorder": ("squared_l2", lambda b: b.tree(8, 3, min_partition_size=1,
                                                          soar_lambda=1.5).score_ah(2).reorder(30)),
    "ah_l2": ("squared_l2", lambda b: b.score_ah(3)),
    # Format version 2 (issue 13): docids, from an index updated before it was written
    # (compacted on write), with int and with string docids.
    "live_ah_reorder_intids": ("dot_product",
                               lambda b: b.tree(8, 3, min_partition_size=1).score_ah(2).reorder(30),
                               "int"),
    "live_bf_strids": ("cosine", lambda b: b.tree(8, 3, min_partition_size=1).score_brute_force(),
                       "str"),
    # Quantized copies (issue 14): int8 with scales and bfloat16, for reorder rows,
    # brute-force slots and centroids.
    "qc8_ah_reorder8": ("dot_product", lambda b: b.tree(8, 3, min_partition_size=1,
                                                        quantize_centroids=True)
                        .score_ah(2).reorder(30, quantize=mipscan.ReorderType.INT8)),
    "qc16_bf16_reorder16": ("cosine", lambda b: b.tree(8, 3, min_partition_size=1,
                                                       quantize_centroids="bfloat16")
                            .score_brute_force(quantize="bfloat16").reorder(30, quantize="bfloat16")),
    "bf8_l2": ("squared_l2", lambda b: b.score_brute_force(quantize=True)),
    "upper_l2": ("squared_l2", lambda b: b.tree(8, 3, min_partition_size=1).upper_tree(3, 2)
                 .score_ah(2).reorder(30)),
    "tree_ah_axes": ("dot_product", lambda b: b.tree(8, 3, min_partition_size=1, leaf_axes=3)
                     .score_ah(2).reorder(30)),
}
if LONG:
    LAYOUTS.update({
        "tree_bf_reorder_l2": ("squared_l2", lambda b: b.tree(8, 3, min_partition_size=1)
                               .score_brute_force().reorder(30)),
        "soar_bf_cosine": ("cosine", lambda b: b.tree(8, 3, min_partition_size=1, soar_lambda=1.0)
                           .score_brute_force()),
        "tree_ah_dot": ("dot_product", lambda b: b.tree(8, 3, min_partition_size=1).score_ah(1)),
    })


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    rng = np.random.default_rng(5)
    db = rng.normal(size=(N, D)).astype(np.float32)
    root = tmp_path_factory.mktemp("malicious")
    out = {}
    for name, (metric, stages, *kind) in LAYOUTS.items():
        path = root / name
        if not kind:
            stages(mipscan.builder(db, 10, metric)).build().serialize(path)
        else:
            ids = (lambda i: 1000 + 7 * i) if kind[0] == "int" else (lambda i: f"doc-{i}-\u00e9")
            s = stages(mipscan.builder(db, 10, metric)).build(docids=[ids(i) for i in range(N)])
            s.upsert([ids(i) for i in range(N, N + 20)], rng.normal(size=(20, D)).astype(np.float32))
            s.delete([ids(i) for i in range(0, 30, 3)])
            s.serialize(path)
        out[name] = path
    return out


# ---------------------------------------------------------------- value classes
def _positions(size: int, rng) -> list[int]:
    pos = {0, size - 1} if size else set()
    if LONG and size:
        pos |= {size // 2, *(int(i) for i in rng.integers(0, size, 3))}
    return sorted(pos)


def _element(a, flat_pos, value):
    b = np.array(a, copy=True)
    b.reshape(-1)[flat_pos] = value
    return b


def _float_cases(a, rng, d):
    """(label, tampered array) for a float array."""
    big = 4 * max_abs_value(d)
    for p in _positions(a.size, rng):
        yield f"NaN at {p}", _element(a, p, np.nan)
        yield f"inf at {p}", _element(a, p, np.inf)
        yield f"-inf at {p}", _element(a, p, -np.inf)
        yield f"huge 3e38 at {p}", _element(a, p, 3e38)
        yield f"huge -3e38 at {p}", _element(a, p, -3e38)
        yield f"out of range {big:.3g} at {p}", _element(a, p, big)
        yield f"negative at {p}", _element(a, p, -abs(float(a.reshape(-1)[p])) - 1.0)
        yield f"positive 1.0 at {p}", _element(a, p, 1.0)  # out of range in -|x|^2/2
        yield f"subnormal at {p}", _element(a, p, 1e-45)
    yield "all NaN", np.full_like(a, np.nan)
    yield "sign flipped", -a
    yield "zeros", np.zeros_like(a)
    yield from _layout_cases(a)


def _int_cases(a, rng, n):
    """(label, tampered array) for an integer array."""
    info = np.iinfo(a.dtype)
    for p in _positions(a.size, rng):
        if info.min < 0:
            yield f"negative -1 at {p}", _element(a, p, -1)
        yield f"out of range n at {p}", _element(a, p, n)
        yield f"out of range n+1 at {p}", _element(a, p, n + 1)
        yield f"max {info.max} at {p}", _element(a, p, info.max)
        yield f"2**31 at {p}", _element(a, p, 2 ** 31)
        if p + 1 < a.size:
            b = np.array(a, copy=True)
            b[p], b[p + 1] = a[p + 1], a[p]
            yield f"swapped {p}<->{p + 1}", b
            yield f"duplicate of {p + 1} at {p}", _element(a, p, a[p + 1])
        yield f"plus one at {p}", _element(a, p, a[p] + 1)
    yield "reversed (wrong order)", a[::-1].copy()
    yield "zeros", np.zeros_like(a)
    yield from _layout_cases(a)


def _byte_cases(a, rng):
    """packed_codes: any byte is a valid pair of 4-bit codes; sizes and dtypes are not."""
    yield "random bytes", rng.integers(0, 256, a.shape, dtype=np.uint8)
    yield "all 0xFF", np.full_like(a, 0xFF)
    yield from _layout_cases(a)


def _layout_cases(a):
    """Wrong dtype, byte order, memory order and size (the manifest is rewritten to match)."""
    others = {"float32": ["<f8", "<f2", "<i4", ">f4"], "int64": ["<i4", "<u8", "<f8", ">i8"],
              "uint32": ["<i8", "<i4", "<f4", ">u4"], "uint8": ["|i1", "<u2", "|b1"],
              "int8": ["|u1", "<i2", "<f4"], "uint16": ["<i2", "<u4", "<f2", ">u2"]}[a.dtype.name]
    for dt in others:
        yield f"dtype {dt}", a.astype(dt)
    if a.ndim >= 2:
        yield "Fortran order", np.asfortranarray(a)
        yield "transposed", np.ascontiguousarray(np.swapaxes(a, 0, 1))
    yield "zero-length", a[:0].copy()
    if len(a) > 1:
        yield "one row short", a[:-1].copy()
        yield "rows reversed (wrong order)", a[::-1].copy()
    yield "one row extra", np.concatenate([a, a[:1]])
    yield "0-d", np.asarray(a.reshape(-1)[0] if a.size else 0, a.dtype)


def _quantized_cases(a, rng):
    """int8 codes (only -128 is out of range) and bfloat16 bit patterns (NaN, inf, huge)."""
    for p in _positions(a.size, rng):
        if a.dtype == np.int8:
            yield f"-128 at {p}", _element(a, p, -128)
            yield f"127 at {p}", _element(a, p, 127)
        else:
            for bits, what in ((0x7FC0, "NaN"), (0x7F80, "inf"), (0xFF80, "-inf"),
                               (0x7F7F, "huge 3.4e38"), (0x0001, "subnormal")):
                yield f"{what} at {p}", _element(a, p, bits)
    yield "random", rng.integers(np.iinfo(a.dtype).min, np.iinfo(a.dtype).max, a.shape,
                                 dtype=a.dtype, endpoint=True)
    yield "zeros", np.zeros_like(a)
    yield from _layout_cases(a)


def _array_cases(name, a, config, rng):
    if a.dtype in (np.int8, np.uint16):
        return _quantized_cases(a, rng)
    if a.dtype.kind == "f":
        return _float_cases(a, rng, config["d"])
    if a.dtype == np.uint8:
        return _byte_cases(a, rng)
    return _int_cases(a, rng, config["n"])


# ---------------------------------------------------------------- manifest classes
#: Stands for a value nested 200,000 lists deep (json.dumps cannot write one).
DEEP = "__deep_nesting__"

def _leaf_paths(node, prefix=()):
    """Every key path of the manifest, inner ones included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _leaf_paths(v, prefix + (i,))


def _get(m, path):
    for k in path:
        m = m[k]
    return m


def _manifest_edits(value):
    """(label, edit) pairs; edit(parent, key) changes the manifest in place."""
    def put(v):
        def edit(parent, key):
            parent[key] = v
        return edit

    def delete(parent, key):
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)

    wrong = {bool: "true", int: "7", float: "0.5", str: 12, type(None): [], list: {"a": 1},
             dict: [1, 2]}.get(type(value), None)
    yield "wrong type", put(wrong)
    yield "missing", delete
    if isinstance(value, bool):
        yield "int instead of bool", put(int(value))
    elif isinstance(value, int):
        yield "huge 10**30", put(10 ** 30)
        yield "2**63", put(2 ** 63)
        yield "negative", put(-1 - value)
        yield "zero", put(0)
        yield "float", put(float(value) + 0.5)
    elif isinstance(value, float):
        yield "huge 1e308", put(1e308)
        yield "negative", put(-1.0 - value)
        yield "NaN", put(float("nan"))
    elif isinstance(value, str):
        yield "huge string", put("x" * 100_000)
        yield "empty string", put("")
    elif isinstance(value, list):
        yield "huge list", put(value * 1000 or [0] * 1000)
        yield "negative entries", put([-1 for _ in value] or [-1])
    yield "deep nesting", put(DEEP)


# ---------------------------------------------------------------- the search check
# Runs in a child process: loads each accepted folder and searches it; a crash (signal,
# abort) there is reported by the parent with the folder it was on.
CHECKER = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import mipscan
    from mipscan.brute import normalize_rows

    folders = json.loads(sys.stdin.read())
    rng = np.random.default_rng(3)
    problems = []
    for folder in folders:
        print("START", folder, flush=True)
        s = mipscan.load_searcher(folder)
        cfg, arrays = s.config, s._arrays
        n, d, metric = s.n, s.d, s.distance_measure
        # Version 2: results are docids; docids[i] is row i of a loaded folder.
        pos = None if s.docids is None else {v: i for i, v in enumerate(s.docids)}
        q = rng.normal(size=(6, d)).astype(np.float32)
        qm = normalize_rows(q) if metric == "cosine" else q
        if metric == "squared_l2":
            qm = np.hstack([q, np.ones((len(q), 1), np.float32)])
        # The rows a result's score must be exact for: reorder_rows (row r is id r), or a
        # brute-force index's slot_rows (slot i is id slot_ids[i]; with SOAR an id has two
        # slots, and a folder whose two copies differ is answered for one of them).
        def rows_of(kind):  # float32 rows, or the values of the quantized copy
            if f"{kind}_int8" in arrays:
                scales = np.asarray(arrays[f"{kind}_scales"], np.float64)
                rows = np.asarray(arrays[f"{kind}_row_scales"], np.float64)[:, None]
                return np.asarray(arrays[f"{kind}_int8"], np.float64) * scales * rows
            if f"{kind}_bf16" in arrays:
                bits = np.asarray(arrays[f"{kind}_bf16"]).astype(np.uint32) << 16
                return bits.view(np.float32).astype(np.float64)
            return np.asarray(arrays[f"{kind}_rows"])
        if "reorder" in cfg:
            exact_rows, exact_ids = rows_of("reorder"), np.arange(n)
        elif "score_brute_force" in cfg:
            exact_rows = rows_of("slot")
            exact_ids = np.asarray(arrays["slot_ids"]).astype(np.int64)
        else:
            exact_rows = None
        leaves_all = s.num_leaves
        settings = [dict(), dict(final_num_neighbors=1), dict(final_num_neighbors=n),
                    dict(final_num_neighbors=10, leaves_to_search=1),
                    dict(final_num_neighbors=10, leaves_to_search=leaves_all,
                         pre_reorder_num_neighbors=n)]
        for kw in settings:
            for method in ("search_batched", "search_batched_parallel"):
                r = getattr(s, method)(q, **kw)
                k = min(kw.get("final_num_neighbors", s.num_neighbors), n)  # min(k, n) results
                ids, sc = np.asarray(r.indices), np.asarray(r.distances)
                if pos is not None:
                    ids = np.array([[pos.get(v, n) for v in row] for row in ids.tolist()],
                                   np.int64).reshape(ids.shape)
                why = None
                if ids.shape != (len(q), k) or sc.shape != (len(q), k):
                    why = f"shape {ids.shape} {sc.shape}"
                elif (ids >= n).any():
                    why = "id out of range"
                elif any(len(set(row.tolist())) != k for row in ids):
                    why = "duplicate ids"
                elif not np.isfinite(sc).all():
                    why = "non-finite score"
                elif (np.diff(sc, axis=1) < 0 if metric == "squared_l2" else np.diff(sc, axis=1) > 0).any():
                    why = "not best first"
                elif exact_rows is not None:
                    true = qm @ exact_rows.T  # (nq, copies)
                    if metric == "squared_l2":
                        qn = np.einsum("ij,ij->i", q, q)[:, None]
                        true = np.maximum(qn - 2 * true, 0)
                    # every copy's score, per id; and the best copy of each id
                    best_of_id = np.full((len(q), n), np.inf if metric == "squared_l2" else -np.inf)
                    pick = np.minimum if metric == "squared_l2" else np.maximum
                    for c, i in enumerate(exact_ids):
                        best_of_id[:, i] = pick(best_of_id[:, i], true[:, c])
                    tol = 1e-3 * (1 + np.abs(sc))
                    ok = np.zeros(sc.shape, bool)
                    for c, i in enumerate(exact_ids):
                        ok |= (ids == i) & (np.abs(true[:, c][:, None] - sc) <= tol)
                    order = np.sort(best_of_id, axis=1)
                    best = order[:, :k] if metric == "squared_l2" else order[:, ::-1][:, :k]
                    if not ok.all():
                        why = "a score is not its id's exact score"
                    elif kw.get("leaves_to_search") == leaves_all and not (np.abs(best - sc) <= tol).all():
                        why = "not the exact top-k with every leaf searched"
                if why:
                    problems.append(f"{folder} {method} {kw}: {why}")
        print("DONE", folder, flush=True)
    print("PROBLEMS", json.dumps(problems), flush=True)
""")


def _check_accepted(folders, tmp_path):
    """Searches every accepted folder in child processes; returns (crashes, wrong)."""
    crashes, wrong = [], []
    todo = list(folders)
    script = tmp_path / "checker.py"
    script.write_text(CHECKER)
    while todo:
        p = subprocess.run([sys.executable, str(script)], input=json.dumps(todo),
                           capture_output=True, text=True, timeout=600)
        started = [ln.split(" ", 1)[1] for ln in p.stdout.splitlines() if ln.startswith("START ")]
        done = {ln.split(" ", 1)[1] for ln in p.stdout.splitlines() if ln.startswith("DONE ")}
        for ln in p.stdout.splitlines():
            if ln.startswith("PROBLEMS "):
                wrong += json.loads(ln.split(" ", 1)[1])
        if p.returncode == 0:
            break
        bad = next((f for f in started if f not in done), None)
        crashes.append(f"{bad}: exit {p.returncode}: {p.stderr[-600:]}")
        if bad is None:
            break
        todo = todo[todo.index(bad) + 1:]
    return crashes, wrong


class Tally:
    def __init__(self):
        self.cases = self.refused = 0
        self.accepted: list[str] = []
        self.badmsg: list[str] = []


def _load(folder, what, names, tally, keep):
    """Loads a tampered folder: a ValueError naming the folder (and one of names) is a
    refusal; a load keeps a copy for the search check; anything else is a failure."""
    tally.cases += 1
    try:
        mipscan.load_searcher(folder)
    except ValueError as exc:
        tally.refused += 1
        msg = str(exc)
        if str(folder) not in msg or (names and not any(n in msg for n in names)):
            tally.badmsg.append(f"{what}: {msg[:300]}")
        return
    except Exception as exc:  # TypeError from the bindings, RecursionError, ...
        tally.badmsg.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        return
    dst = keep / f"case{len(tally.accepted):05d}"
    shutil.copytree(folder, dst)
    (dst / "what.txt").write_text(what)
    tally.accepted.append(str(dst))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_array_every_value_class_with_recomputed_checksums(pristine, tmp_path, layout):
    src = pristine[layout]
    manifest = json.loads((src / "mipscan.json").read_text())
    config = manifest["config"]
    rng = np.random.default_rng(11)
    work = tmp_path / "work"
    shutil.copytree(src, work)
    keep = tmp_path / "accepted"
    keep.mkdir()
    tally = Tally()
    per_array = {}
    for name in sorted(manifest["arrays"]):
        fname = f"{name}.npy"
        a = np.load(src / fname)
        before = tally.cases
        for label, b in _array_cases(name, a, config, rng):
            np.save(work / fname, b, allow_pickle=False)
            m = json.loads(json.dumps(manifest))
            m["arrays"][name].update(dtype=b.dtype.str, shape=list(b.shape),
                                     sha256=_sha(work / fname))
            (work / "mipscan.json").write_text(json.dumps(m))
            _load(work, f"{layout}: {name} {label}", [name], tally, keep)
        per_array[name] = tally.cases - before
        shutil.copy(src / fname, work / fname)
        shutil.copy(src / "mipscan.json", work / "mipscan.json")
    mipscan.load_searcher(work)  # restored
    crashes, wrong = _check_accepted(tally.accepted, tmp_path)
    print(f"\n{layout}: {tally.cases} tampered arrays (sha256 recomputed; {per_array}): "
          f"{tally.refused} refused, {len(tally.accepted)} loaded and searched; crashes "
          f"{len(crashes)}, silent wrong answers {len(wrong)}")
    assert not tally.badmsg, "\n".join(tally.badmsg[:20])
    assert not crashes, "\n".join(crashes)
    assert not wrong, "\n".join(wrong[:20])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_manifest_key_every_value_class(pristine, tmp_path, layout):
    src = pristine[layout]
    original = json.loads((src / "mipscan.json").read_text())
    work = tmp_path / "work"
    shutil.copytree(src, work)
    keep = tmp_path / "accepted"
    keep.mkdir()
    tally = Tally()
    paths = list(_leaf_paths(original))
    for path in paths:
        value = _get(original, path)
        for label, edit in _manifest_edits(value):
            m = json.loads(json.dumps(original))
            edit(_get(m, path[:-1]), path[-1])
            text = json.dumps(m).replace(f'"{DEEP}"', "[" * 200_000 + "]" * 200_000)
            (work / "mipscan.json").write_text(text)
            _load(work, f"{layout}: {'.'.join(map(str, path))} {label}", [], tally, keep)
    (work / "mipscan.json").write_text(json.dumps(original))
    mipscan.load_searcher(work)
    crashes, wrong = _check_accepted(tally.accepted, tmp_path)
    print(f"\n{layout}: {tally.cases} tampered manifests ({len(paths)} key paths): "
          f"{tally.refused} refused, {len(tally.accepted)} loaded and searched; crashes "
          f"{len(crashes)}, silent wrong answers {len(wrong)}")
    assert not tally.badmsg, "\n".join(tally.badmsg[:20])
    assert not crashes, "\n".join(crashes)
    assert not wrong, "\n".join(wrong[:20])


# ---------------------------------------------------------------- the reproductions
def _tampered(src, dst, name, edit):
    """Copies src to dst, applies edit to array ``name`` and recomputes its sha256."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    a = np.load(dst / f"{name}.npy")
    b = edit(a.copy())
    np.save(dst / f"{name}.npy", b if b is not None else a, allow_pickle=False)
    m = json.loads((dst / "mipscan.json").read_text())
    m["arrays"][name]["sha256"] = _sha(dst / f"{name}.npy")
    (dst / "mipscan.json").write_text(json.dumps(m))
    return dst


def test_nan_centroid_with_recomputed_checksum_is_refused(pristine, tmp_path):
    """Issue 12, defect 1: this folder loaded and search_batched then overflowed the heap."""
    def edit(c):
        c[3, 1] = np.nan
        return c
    work = _tampered(pristine["tree_ah_reorder"], tmp_path / "idx", "centroids", edit)
    with pytest.raises(ValueError) as info:
        mipscan.load_searcher(work)
    assert str(work / "centroids.npy") in str(info.value)
    assert "arrays.centroids: contains NaN at (3, 1)" in str(info.value)


@pytest.mark.parametrize("name,value,expect", [
    ("centroids", np.inf, "inf"), ("centroids", -3e38, "outside"), ("centroids", 3e38, "outside"),
    ("reorder_rows", np.nan, "NaN"), ("codebooks", np.nan, "NaN"), ("slot_rows", np.nan, "NaN"),
    ("leaf_spread", np.nan, "finite"), ("leaf_spread", -1.0, "finite"), ("leaf_spread", np.inf, "finite"),
    ("leaf_axes", np.nan, "finite"), ("leaf_axes", np.inf, "finite")])
@pytest.mark.parametrize("everywhere", [False, True])
def test_non_finite_or_huge_floats_are_refused(pristine, tmp_path, name, value, expect, everywhere):
    """Issue 12, defect 1: inf or +-3e38 centroids gave duplicate ids; all-NaN reorder_rows,
    slot_rows or codebooks gave id 0 with score -inf everywhere."""
    layout = {"slot_rows": "tree_bf", "leaf_axes": "tree_ah_axes"}.get(name, "tree_ah_reorder")

    def edit(a):
        if everywhere:
            a[...] = value
        else:
            a.reshape(-1)[a.size // 2] = value
        return a
    work = _tampered(pristine[layout], tmp_path / "idx", name, edit)
    with pytest.raises(ValueError, match=f"arrays.{name}: .*{expect}") as info:
        mipscan.load_searcher(work)
    assert str(work) in str(info.value)


@pytest.mark.parametrize("mmap", [True, False])
def test_a_damaged_byte_unverified_is_refused_not_searched(pristine, tmp_path, mmap):
    """Issue 12, defect 1: one damaged byte with verify=False made a NaN centroid."""
    work = tmp_path / "idx"
    shutil.copytree(pristine["tree_ah_reorder"], work)
    raw = bytearray((work / "centroids.npy").read_bytes())
    start = raw.index(b"\n") + 1
    raw[start + 4 * 5 + 3] = 0x7F  # exponent bits of element 5 all ones ...
    raw[start + 4 * 5 + 2] = 0xC0  # ... and a mantissa bit: NaN
    (work / "centroids.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"arrays\.centroids: contains NaN at \(0, 5\)"):
        mipscan.load_searcher(work, mmap=mmap, verify=False)


def test_fortran_order_npy_is_refused_naming_the_file(pristine, tmp_path):
    """Issue 12, off-contract: a bindings TypeError naming neither file nor argument."""
    work = _tampered(pristine["tree_ah_reorder"], tmp_path / "idx", "reorder_rows",
                     np.asfortranarray)
    with pytest.raises(ValueError, match="Fortran order") as info:
        mipscan.load_searcher(work)
    assert str(work / "reorder_rows.npy") in str(info.value)
    assert "arrays.reorder_rows" in str(info.value)


@pytest.mark.parametrize("text,expect", [
    ("[" * 200_000 + "]" * 200_000, "nested 200000 levels deep"),
    ('{"format": "mipscan-index", "x": ' + "[" * 100 + "]" * 100 + "}", "nested 101 levels"),
    ('{"format": "mipscan-index", "format_version": ' + "7" * 5000 + "}", "4300 digits"),
    (" " * (2 << 20), "bytes; a manifest is at most"),
])
def test_manifests_too_deep_long_or_large_are_refused_naming_the_path(pristine, tmp_path,
                                                                      text, expect):
    """Issue 12, off-contract: a 200k-deep manifest raised RecursionError; a 5,000-digit
    integer a ValueError without the path."""
    work = tmp_path / "idx"
    shutil.copytree(pristine["tree_ah_reorder"], work)
    (work / "mipscan.json").write_text(text)
    with pytest.raises(ValueError, match=expect) as info:
        mipscan.load_searcher(work)
    assert str(work / "mipscan.json") in str(info.value)


@pytest.mark.parametrize("name", ["centroids.npy", "mipscan.json"])
def test_symlinked_files_inside_a_folder_are_refused(pristine, tmp_path, name):
    """Issue 12, off-contract: a symlinked .npy was followed outside the folder."""
    work = tmp_path / "idx"
    shutil.copytree(pristine["tree_ah_reorder"], work)
    outside = tmp_path / f"outside-{name}"
    os.replace(work / name, outside)
    os.symlink(outside, work / name)
    with pytest.raises(ValueError, match="symbolic link") as info:
        mipscan.load_searcher(work)
    assert str(work / name) in str(info.value)
    # a link to the whole folder is fine: the folder is what the caller named
    os.replace(outside, work / name)
    os.symlink(work, tmp_path / "link")
    mipscan.load_searcher(tmp_path / "link")


@pytest.mark.parametrize("kind", ["fifo", "folder", "socket"])
@pytest.mark.parametrize("name", ["slot_ids.npy", "mipscan.json"])
def test_files_that_are_not_regular_files_are_refused(pristine, tmp_path, kind, name):
    import socket

    work = tmp_path / "idx"
    shutil.copytree(pristine["tree_ah_reorder"], work)
    (work / name).unlink()
    if kind == "fifo":
        os.mkfifo(work / name)  # opening it for reading would block: must not hang
    elif kind == "folder":
        (work / name).mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(work / name))
    with pytest.raises(ValueError, match="not a regular file|no mipscan.json") as info:
        mipscan.load_searcher(work)
    assert str(work) in str(info.value)
