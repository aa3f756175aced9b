"""Damaged-folder matrix: every file of a saved index flipped, truncated, deleted and
swapped with another index's file of the same name; every key of mipscan.json (recursively)
deleted, given a wrong type and given an out-of-range or inconsistent value. Every case
must raise ValueError naming the folder/file and the field; none may load silently.

Extends tests/test_serialize.py (which checks one representative edit per kind)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import mipscan
from mipscan.builder import STAGES
from mipscan._validation import Bool, Interval, Options

N, D = 700, 8

LAYOUTS = {
    # every array an index can hold appears in at least one layout
    "tree_ah_reorder": lambda b: b.tree(12, 4, min_partition_size=1).score_ah(2).reorder(40),
    "tree_bf_reorder": lambda b: b.tree(12, 4, min_partition_size=1).score_brute_force().reorder(40),
    "ah_l2": lambda b: b.score_ah(3),
    "soar_ah_l2": lambda b: b.tree(12, 4, min_partition_size=1, soar_lambda=1.5).score_ah(2),
}
METRIC = {"tree_ah_reorder": "dot_product", "tree_bf_reorder": "cosine", "ah_l2": "squared_l2",
          "soar_ah_l2": "squared_l2"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """layout -> (pristine folder, other index folder with the same layout, queries)."""
    rng = np.random.default_rng(7)
    db = rng.normal(size=(N, D)).astype(np.float32)
    other_db = rng.normal(size=(N, D)).astype(np.float32)
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for name, stages in LAYOUTS.items():
        a, b = root / f"{name}-a", root / f"{name}-b"
        stages(mipscan.builder(db, 10, METRIC[name])).build().serialize(a)
        stages(mipscan.builder(other_db, 10, METRIC[name])).build().serialize(b)
        out[name] = (a, b)
    return out


class Tally:
    def __init__(self):
        self.cases = 0
        self.rejected = 0
        self.silent: list[str] = []
        self.badmsg: list[str] = []


def _expect_rejected(folder, what, tally, names):
    """Loads folder; records whether it raised ValueError naming folder and one of names."""
    tally.cases += 1
    try:
        mipscan.load_searcher(folder)
    except ValueError as exc:
        msg = str(exc)
        tally.rejected += 1
        if str(folder) not in msg or not any(n in msg for n in names):
            tally.badmsg.append(f"{what}: {msg}")
        return
    except Exception as exc:  # anything but ValueError is a failure too
        tally.badmsg.append(f"{what}: {type(exc).__name__}: {exc}")
        return
    tally.silent.append(what)


def _fresh(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_file_damaged_every_way_is_rejected(saved, tmp_path, layout):
    src, other = saved[layout]
    tally = Tally()
    work = tmp_path / "idx"
    files = sorted(p.name for p in src.iterdir())
    assert "mipscan.json" in files and len(files) >= 4
    for fname in files:
        raw = (src / fname).read_bytes()
        field = fname[:-4] if fname.endswith(".npy") else "mipscan.json"
        names = [field, fname]
        # flip one byte: first (magic / '{'), in the header, in the middle, last
        for pos in sorted({0, 8, min(len(raw) - 1, 100), len(raw) // 2, len(raw) - 1}):
            _fresh(src, work)
            bad = bytearray(raw)
            bad[pos] ^= 0xFF
            (work / fname).write_bytes(bytes(bad))
            _expect_rejected(work, f"{fname} byte {pos} flipped", tally, names)
        # truncate: empty, one byte, inside the header, half, one byte short
        for size in sorted({0, 1, 50, len(raw) // 2, len(raw) - 1}):
            _fresh(src, work)
            (work / fname).write_bytes(raw[:size])
            _expect_rejected(work, f"{fname} truncated to {size}", tally, names)
        # grown by one byte
        _fresh(src, work)
        (work / fname).write_bytes(raw + b"\0")
        _expect_rejected(work, f"{fname} grown", tally, names)
        # deleted
        _fresh(src, work)
        (work / fname).unlink()
        _expect_rejected(work, f"{fname} deleted", tally,
                         names + (["not a mipscan index"] if fname == "mipscan.json" else []))
        # replaced by a folder
        _fresh(src, work)
        (work / fname).unlink()
        (work / fname).mkdir()
        _expect_rejected(work, f"{fname} is a folder", tally,
                         names + (["not a mipscan index"] if fname == "mipscan.json" else []))
        # swapped with the other index's file of the same name (when it differs: without
        # a tree, centroids/leaf_offsets/slot_ids are the same in every index of size N)
        if (other / fname).read_bytes() == raw:
            continue
        _fresh(src, work)
        shutil.copyfile(other / fname, work / fname)
        _expect_rejected(work, f"{fname} swapped", tally, names)
    print(f"\n{layout}: {tally.rejected}/{tally.cases} damaged folders rejected")
    assert not tally.silent, f"loaded silently: {tally.silent}"
    assert not tally.badmsg, "\n".join(tally.badmsg)
    assert tally.rejected == tally.cases
    mipscan.load_searcher(_fresh(src, work))  # the pristine copy still loads


# ---------------------------------------------------------------- manifest edits
def _paths(obj, prefix=()):
    """Every key path of a JSON object, recursively (list items by index)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _dotted(path):
    return ".".join(str(k) for k in path if not isinstance(k, int))


def _wrong_types(value):
    """JSON values of another type than value."""
    candidates = [None, "x", [], {}, True, 1.5, 7]
    def kind(v):
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, (int, float)):
            return "int" if isinstance(v, int) else "float"
        return type(v).__name__
    out = [c for c in candidates if kind(c) != kind(value)]
    if isinstance(value, float):  # an int where a float is expected is a valid number
        out = [c for c in out if kind(c) != "int"]
    return out


def _stage_rule(path):
    if len(path) == 3 and path[0] == "config" and path[1] in STAGES:
        return STAGES[path[1]].get(path[2], (None,))[0]
    return None


def _out_of_range(path, value, manifest):
    """Values of the right type that are out of range or inconsistent with the arrays."""
    cfg = manifest["config"]
    n, d = cfg["n"], cfg["d"]
    key = path[-1]
    rule = _stage_rule(path)
    if path == ("format",):
        return ["faiss", "", "mipscan-index-v2"]
    if path == ("format_version",):
        return [0, 2, -1]
    if path == ("config", "n"):
        return [0, -1, n - 1, n + 1, 2**40]
    if path == ("config", "d"):
        return [0, -1, d - 1, d + 1]
    if path == ("config", "num_neighbors"):
        return [0, -1, n + 1]
    if path == ("config", "seed"):
        return [-1]
    if path == ("config", "distance_measure"):
        return ["hamming", "DOT_PRODUCT", ""]
    if path == ("config", "build_seconds"):
        return [-1.0, float("nan"), float("inf")]
    if rule is not None:
        out = []
        if isinstance(rule, Interval):
            if rule.low is not None:
                out.append(rule.low - 1 if rule.kind is int else rule.low - 0.5)
            if rule.high is not None:
                out.append(rule.high + 1)
            if rule.kind is float and not rule.allow_nan:
                out.append(float("nan"))
        elif isinstance(rule, Options):
            out.append("no-such-option")
        elif isinstance(rule, Bool):
            out.append("yes")
        # cross-stage rules the builder enforces
        tree = cfg.get("tree")
        if key == "num_leaves_to_search":
            out.append(tree["num_leaves"] + 1)
        if path[1:] == ("tree", "num_leaves"):
            out += [n + 1, tree["num_leaves_to_search"] - 1]
        if key == "reordering_num_neighbors":
            out.append(n + 1)
        if key == "dimensions_per_block":
            out.append(d + 2)  # squared_l2 adds one dimension to the space the core searches
        return out
    if len(path) == 3 and path[0] == "arrays":
        name = path[1]
        if key == "file":
            others = [k for k in manifest["arrays"] if k != name]
            return [f"{others[0]}.npy", f"{name}.npz", f"../{name}.npy", ""]
        if key == "dtype":
            return ["<f8", "|u1", "<i4", ">f4", "|O"]
        if key == "sha256":
            other = next(v["sha256"] for k, v in manifest["arrays"].items() if k != name)
            return ["0" * 64, value.upper() if value.upper() != value else "f" * 64, other, ""]
        if key == "shape":
            return [[], value + [1], value[:-1]]
    if len(path) == 4 and path[0] == "arrays" and path[2] == "shape":
        return [value + 1, value - 1 if value > 0 else 2**40, -1, 2**62]
    return []


def _delete(m, path):
    parent = _get(m, path[:-1])
    del parent[path[-1]]


def _set(m, path, value):
    _get(m, path[:-1])[path[-1]] = value


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_manifest_field_edited_is_rejected(saved, tmp_path, layout):
    src, _ = saved[layout]
    original = json.loads((src / "mipscan.json").read_text())
    work = _fresh(src, tmp_path / "idx")
    mpath = work / "mipscan.json"
    tally = Tally()
    paths = list(_paths(original))
    assert len(paths) > 50
    for path in paths:
        value = _get(original, path)
        names = [_dotted(path)]
        parent = _dotted(path[:-1])
        edits = []
        if not isinstance(path[-1], int) and not (
                path[1:] == ("tree", "spread_weight") and "leaf_spread" not in original["arrays"]) \
                and not (path[1:] == ("tree", "leaf_axes") and "leaf_axes" not in original["arrays"]):
            # (A folder written before spread_weight or leaf_axes existed lacks it and has
            # no spreads or axes: it loads, ranking as it was searched then.)
            edits.append(("missing", None))
        candidates = _wrong_types(value) + _out_of_range(path, value, original)
        rule = _stage_rule(path)
        for v in candidates:
            if v == value and type(v) is type(value):
                continue  # not an edit
            if isinstance(rule, Interval) and v is None and (
                    rule.allow_none or path[-1] == "anisotropic_quantization_threshold"):
                continue  # None is a valid value there (threshold: older indexes wrote None)
            if (isinstance(rule, Interval) and value is None and rule.kind is float
                    and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and (rule.low is None or v >= rule.low) and (rule.high is None or v <= rule.high)
                    and path[-1] == "incremental_threshold"):
                continue  # a valid value with no consequence for the arrays (issue 13)
            if path[1:] in (("tree", "avq"), ("tree", "overretrieve_factor")) and \
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1:
                # A valid value of a field the arrays cannot contradict (how the centroids
                # were trained; a search-time setting of SOAR), so not damage.
                continue
            if path[1:] == ("tree", "spread_weight") and isinstance(v, (int, float)) and \
                    not isinstance(v, bool) and 0 < v <= 100:
                # Another valid weight of the spreads the index holds: a search-time
                # setting of the leaf order, not damage (0 is: leaf_spread is then extra).
                continue
            edits.append((f"value {v!r}", v))
        for label, v in edits:
            m = json.loads(json.dumps(original))
            if label == "missing":
                _delete(m, path)
                # a missing key may be reported by its parent ("config.tree: expected keys")
                ok_names = names + ([parent] if parent and str(path[-1]) in json.dumps(
                    sorted(_get(original, path[:-1]))) else [])
            else:
                _set(m, path, v)
                ok_names = names
            mpath.write_text(json.dumps(m))
            _expect_rejected(work, f"{'.'.join(map(str, path))} {label}", tally, ok_names)
    print(f"\n{layout}: {tally.rejected}/{tally.cases} edited manifests rejected "
          f"({len(paths)} key paths)")
    assert not tally.silent, f"{len(tally.silent)} edits loaded silently: {tally.silent}"
    assert not tally.badmsg, "\n".join(tally.badmsg)
    mpath.write_text(json.dumps(original))
    mipscan.load_searcher(work)


def test_manifest_that_is_not_an_object_or_not_utf8_is_rejected(saved, tmp_path):
    src, _ = saved["tree_ah_reorder"]
    work = _fresh(src, tmp_path / "idx")
    tally = Tally()
    for text in [b"[]", b"null", b"42", b'"mipscan-index"', b"\xff\xfe{}", b"", b"{}",
                 b'{"format": "mipscan-index"}', b"NaN"]:
        (work / "mipscan.json").write_bytes(text)
        _expect_rejected(work, f"manifest {text!r}", tally,
                         ["(whole file)", "format", "config", "arrays"])
    assert not tally.silent and not tally.badmsg, (tally.silent, tally.badmsg)
    assert tally.rejected == tally.cases == 9


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # garbage values overflow, as asked
def test_unverified_loads_of_damaged_data_never_crash(saved, tmp_path, layout):
    """verify=False skips the checksums, so a flipped data byte may load. The structural
    checks must still keep every search inside the arrays: no crash, right shapes, ids in
    range (the values themselves may be garbage, as asked for)."""
    src, _ = saved[layout]
    q = np.random.default_rng(1).normal(size=(12, D)).astype(np.float32)
    work = tmp_path / "idx"
    loaded = rejected = 0
    for fname in sorted(p.name for p in src.iterdir() if p.suffix == ".npy"):
        raw = (src / fname).read_bytes()
        start = raw.index(b"\n") + 1  # past the .npy header: only data bytes
        for pos in np.linspace(start, len(raw) - 1, 12).astype(int):
            for flip in (0xFF, 0x7F, 0x80):
                _fresh(src, work)
                bad = bytearray(raw)
                bad[pos] ^= flip
                (work / fname).write_bytes(bytes(bad))
                try:
                    s = mipscan.load_searcher(work, verify=False)
                except ValueError as exc:
                    assert str(work) in str(exc)
                    rejected += 1
                    continue
                loaded += 1
                for method in ("search_batched", "search_batched_parallel"):
                    r = getattr(s, method)(q, final_num_neighbors=10,
                                           pre_reorder_num_neighbors=40)
                    assert r.indices.shape == r.distances.shape == (len(q), 10)
                    assert (r.indices < N).all()
    print(f"\n{layout}: {loaded} damaged folders loaded unverified and searched safely, "
          f"{rejected} rejected by the structural checks")
    assert loaded + rejected > 0
