"""The live index: docids, upsert, delete, compaction and leaf retraining (DESIGN.md,
"The live index"). The Searcher (searcher.py) publishes the snapshots made here.

A snapshot (``State``) is immutable once published. A search reads ``searcher._state``
once (one reference, atomic under the GIL) and searches that snapshot to the end, holding
a reference to it, so the snapshot (and the C++ segments it shares) is freed when its last
search ends. An update (under the searcher's writer lock) builds the next snapshot aside
and publishes it with one assignment; readers never take a lock.

Where things live:

* Leaf segments (packed codes + the row of each entry): C++ ``_mipscan.Live``
  (``_core/live.h``); an update copies only the leaves it appends to.
* Rows: dense internal numbers (uint32). ``row_data`` holds each row's MIPS-space float
  vector (reorder, float scoring and retraining read it), ``row_leaf`` its leaf (and SOAR
  second leaf, -1 if none), ``docids`` its docid. These three are append-only stores with
  spare capacity: an update writes only rows past every published snapshot's
  ``num_rows`` (which no reader reads) or moves to a bigger copy; a row is never rewritten,
  so a replaced docid gets a new row and its old row dies.
* Tombstones: ``dead``, a bitset over rows (uint64 words), copied on every update; and
  ``leaf_live``, the live entries per leaf (the search's leaf widening counts them). A
  leaf whose dead entries reach COMPACT_SHARE of its segment is rewritten without them
  by the update that kills them (codes kept); rebalance() drops the rest, and the rows.
* ``rows_of`` (docid -> row): the writer's dict, in the Searcher, never read by searches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mipscan import _mipscan
from mipscan._schema import ENCODER_ITERATIONS, spread_weight_of
from mipscan._training import assign_nearest, soar_assign
from mipscan._validation import max_abs_value

# From this many leaves up, a static index's batched searches score the leaves by BLAS
# (mipscan.searcher); below it, and always for a live index, the core scores them.
BLAS_LEAF_SCORES_MIN_LEAVES = 4096


#: A drifted leaf (tree(incremental_threshold=...)) is retrained only when its mean moved
#: by more than this share of its mean squared radius (|mean - c|^2 > share * mean |x -
#: c|^2); otherwise it only counts as trained again. GloVe-50, 30,000 rows, half built,
#: half upserted (bench_mutable): share 0.003 / 0.01 / 0.03 gave recall@10 after the
#: churn 0.9080 / 0.9078 / 0.9078 at 58k / 87k / 129k upserts/s (no retraining: 0.9084).
MOVE_SHARE = 0.03
#: A leaf whose tombstoned entries reach this share of its segment (and COMPACT_MIN) is
#: compacted by the update that kills them (_compact_leaves). GloVe-50, 90,000 rows, every
#: 4th deleted (bench_mutable): without it a query scanned 6,256 entries (25% dead)
#: against 5,541 for a fresh build on the final set; with share 0.1 4,972, with 0.05
#: 4,912 (seed: 18,705 with 0.1 against 16,587 fresh). Each entry is copied at most
#: 1 / share times per tombstone of its leaf: deletes stay above 100,000 ids/s.
COMPACT_SHARE = 0.05
COMPACT_MIN = 16


@dataclass(frozen=True)
class State:
    """One published version of a searcher's index."""
    config: dict
    n_live: int
    docids: np.ndarray | None          # row -> docid store (int64 or object), >= num_rows
    docid_kind: str | None             # "int", "str" or None (results are rows)
    # Search defaults of this version (an autopilot phase change or rebalance changes them).
    num_leaves: int = 1
    leaves_to_search: int = 1
    configured_leaves: int = 1
    reorder_k: int | None = None
    overretrieve: float = 2.0            # SOAR: slots kept per distinct row reordered
    upper_to_search: int = 1             # upper_tree(): nodes whose children are scored
    core_leaf_scores: bool = False       # leaves scored in C++ only (quantized / upper tree)
    # Static (flat) layout: the Index and its arrays; live is None.
    index: Any = None
    arrays: dict | None = None
    # Live layout.
    live: Any = None                   # _mipscan.Live
    num_rows: int = 0
    dead: np.ndarray | None = None     # uint64 bitset over rows
    leaf_live: np.ndarray | None = None  # uint32 per leaf
    row_data: np.ndarray | None = None   # float32 (capacity, width) store
    # The leaf order's spreads of the build (leaf_spread), kept as they were: a compacted
    # copy then searches its leaves in the live index's order.
    leaf_spread: np.ndarray | None = None
    leaf_axes: np.ndarray | None = None  # the same, for tree(leaf_axes > 0)
    row_leaf: np.ndarray | None = None   # int32 (capacity, 2) store
    centroids: np.ndarray | None = None  # float32 (L, width)
    codebooks: np.ndarray | None = None
    threshold: float = 0.0               # the encoder's threshold (it is given unit rows)
    trained: np.ndarray | None = None    # int64 per leaf: live entries when last (re)trained
    changes: np.ndarray | None = None    # int64 per leaf: entries added or removed since
    # Searcher.search()'s one-call path for this snapshot: None until the first search
    # asks (one_query()); then a _mipscan.OneQuery, or False where search() must transform
    # the query or its scores. Never passed: replace() starts the new snapshot at None.
    one: Any = field(init=False, default=None, repr=False, compare=False)

    def one_query(self):
        """This snapshot's OneQuery (made once; False: none)."""
        one = self.one
        if one is None:
            one = _one_query(self) or False
            object.__setattr__(self, "one", one)  # racing makers make equal ones
        return one


def _one_query(st: State):
    """The snapshot's OneQuery: an index searched by the core with the core's own leaf
    scores (so a single query's results equal search_batched's). search() maps a cosine
    or squared_l2 query into the inner-product space, and a squared_l2 index's scores
    back into distances, as search_batched does."""
    if st.n_live == 0:
        return None
    if st.live is not None:
        engine, upper = st.live, 1
    elif st.index is not None and (st.num_leaves < BLAS_LEAF_SCORES_MIN_LEAVES
                                   or st.core_leaf_scores):
        engine, upper = st.index, st.upper_to_search
    else:
        return None
    return _mipscan.OneQuery(engine, st.n_live, st.reorder_k or 0, st.leaves_to_search,
                             st.configured_leaves, st.overretrieve, upper,
                             max_abs_value(int(st.config["d"])))


def dead_mask(state: State) -> np.ndarray:
    """bool (num_rows,): True for dead rows."""
    bits = np.unpackbits(state.dead.view(np.uint8), bitorder="little")
    return bits[:state.num_rows].astype(bool)


def live_rows(state: State) -> np.ndarray:
    """The live rows of a live state, ascending."""
    return np.flatnonzero(~dead_mask(state))


def _grow(store: np.ndarray, need: int) -> np.ndarray:
    """store if it holds need rows, else a copy with doubled capacity (old readers keep
    the old one)."""
    if len(store) >= need:
        return store
    cap = max(need, 2 * len(store), 64)
    out = np.empty((cap,) + store.shape[1:], store.dtype)
    out[:len(store)] = store
    if store.dtype == np.int32:
        out[len(store):] = -1
    return out


def _bits(num_rows: int) -> int:
    return max(1, (num_rows + 63) // 64)


def to_live(state: State, threads: int) -> State:
    """The live layout of a static state (same rows, same results up to ties)."""
    cfg, arrays = state.config, state.arrays
    n = state.n_live
    centroids = np.array(arrays["centroids"], np.float32)
    offsets, slot_ids = np.asarray(arrays["leaf_offsets"]), np.asarray(arrays["slot_ids"])
    L, width = centroids.shape
    slot_leaf = np.repeat(np.arange(L), np.diff(offsets))
    if "reorder_rows" in arrays:
        rows = np.array(arrays["reorder_rows"], np.float32)
    elif "slot_rows" in arrays:
        rows = np.empty((n, width), np.float32)
        rows[slot_ids] = arrays["slot_rows"]
    else:  # AH only: the decoded approximation (centroid + codewords) is all there is
        rows = _decode(arrays, slot_ids, slot_leaf, centroids, n, width)
    row_leaf = np.full((n, 2), -1, np.int32)
    first = np.ones(len(slot_ids), bool)
    seen = np.zeros(n, bool)
    for i, r in enumerate(slot_ids):  # the first slot of a row is its own leaf
        if seen[r]:
            first[i] = False
        seen[r] = True
    row_leaf[slot_ids[first], 0] = slot_leaf[first]
    row_leaf[slot_ids[~first], 1] = slot_leaf[~first]
    dead = np.zeros(_bits(n), np.uint64)
    leaf_live = np.diff(offsets).astype(np.uint32)
    books = arrays.get("codebooks")
    books = None if books is None else np.array(books, np.float32)
    live = _mipscan.Live.from_flat(centroids, books, rows, n, dead, leaf_live, n,
                                   "reorder" in cfg, np.asarray(arrays["leaf_offsets"]),
                                   np.asarray(slot_ids),
                                   None if books is None else np.asarray(arrays["packed_codes"]),
                                   None if books is None else np.asarray(arrays["leaf_groups"]),
                                   arrays.get("leaf_spread"),
                                   spread_weight_of(cfg), arrays.get("leaf_axes"))
    threshold = 0.0
    if "score_ah" in cfg:
        t = cfg["score_ah"]["anisotropic_quantization_threshold"]
        if t is not None and not math.isnan(t):
            threshold = float(t)  # with unit rows, as the build encodes (_build._build_ah)
    return replace(state, index=None, arrays=None, live=live, num_rows=n, dead=dead,
                   leaf_live=leaf_live, row_data=rows, row_leaf=row_leaf,
                   leaf_spread=arrays.get("leaf_spread"),
                   leaf_axes=arrays.get("leaf_axes"),
                   centroids=centroids, codebooks=books, threshold=threshold,
                   trained=leaf_live.astype(np.int64), changes=np.zeros(L, np.int64))


def _decode(arrays, slot_ids, slot_leaf, centroids, n, width):
    books = np.asarray(arrays["codebooks"])
    nb, _, dpb = books.shape
    groups = np.asarray(arrays["leaf_groups"])
    offsets = np.asarray(arrays["leaf_offsets"])
    rows = np.empty((n, width), np.float32)
    bytes_ = nb * 32
    for leaf in range(len(centroids)):
        a, b = offsets[leaf], offsets[leaf + 1]
        if a == b:
            continue
        codes = _mipscan.unpack_codes(
            np.ascontiguousarray(arrays["packed_codes"][groups[leaf] * bytes_:groups[leaf + 1] * bytes_]),
            int(b - a), nb)
        dec = books[np.arange(nb)[None, :], codes].reshape(b - a, nb * dpb)[:, :width]
        rows[slot_ids[a:b]] = centroids[leaf] + dec
    return rows


def space_of(rows: np.ndarray, metric: str, d: int) -> np.ndarray:
    """The vectors the tree partitions (build_arrays' ``space``) from MIPS rows."""
    return np.ascontiguousarray(rows[:, :d]) if metric == "squared_l2" else rows


def _encode(state: State, rows: np.ndarray, leaves: np.ndarray, threads: int) -> np.ndarray:
    return _mipscan.encode_anisotropic_rows(
        np.ascontiguousarray(rows, np.float32), np.arange(len(rows), dtype=np.int64),
        np.ascontiguousarray(leaves, np.int64), state.centroids, state.codebooks, state.threshold,
        ENCODER_ITERATIONS, threads)


def _assign(state: State, rows: np.ndarray) -> np.ndarray:
    """(m, 2) int32 leaves of new MIPS rows: own leaf, SOAR second leaf (or -1)."""
    cfg = state.config
    out = np.full((len(rows), 2), -1, np.int32)
    L = len(state.centroids)
    if L == 1:
        out[:, 0] = 0
        return out
    d, metric = cfg["d"], cfg["distance_measure"]
    space = space_of(rows, metric, d)
    cent = space_of(state.centroids, metric, d)
    labels = assign_nearest(space, cent, 1)  # an update's few rows: the calling thread
    out[:, 0] = labels
    lam = cfg.get("tree", {}).get("soar_lambda")
    if lam is not None:
        out[:, 1] = soar_assign(space, cent, labels, lam)
    return out


def _entries(row_leaf_new: np.ndarray, new_rows: np.ndarray):
    """Entries (leaf, row) for new rows: own leaves first, then the spilled ones."""
    leaves = row_leaf_new[:, 0].astype(np.int64)
    rows = new_rows
    spill = row_leaf_new[:, 1] >= 0
    if spill.any():
        leaves = np.concatenate([leaves, row_leaf_new[spill, 1].astype(np.int64)])
        rows = np.concatenate([rows, new_rows[spill]])
    return leaves, rows.astype(np.uint32)


def _kill(dead, leaf_live, row_leaf, rows):
    """Marks rows dead (in copies made by the caller) and counts their entries out."""
    rows = np.asarray(rows, np.int64)
    np.bitwise_or.at(dead, rows >> 6, np.left_shift(np.uint64(1), (rows & 63).astype(np.uint64)))
    ls = row_leaf[rows].ravel()
    ls = ls[ls >= 0]
    np.subtract.at(leaf_live, ls, 1)
    # Deletes are not drift: they leave tombstones (reclaimed when the leaf is retrained,
    # or by rebalance()); only added points move a leaf's centroid (changes).


def apply(state: State, new_mips: np.ndarray, new_docids: list, replaced_rows: np.ndarray,
          deleted_rows: np.ndarray, threads: int, incremental_threshold: float | None
          ) -> State:
    """The next state: rows appended for new_mips (docids new_docids), replaced_rows and
    deleted_rows dead. Nothing in ``state`` is written that a reader may read."""
    m = len(new_mips)
    base = state.num_rows
    num_rows = base + m
    dead = np.zeros(_bits(num_rows), np.uint64)
    dead[:len(state.dead)] = state.dead
    leaf_live = state.leaf_live.copy()
    changes = state.changes.copy()
    row_data, row_leaf, docids = state.row_data, state.row_leaf, state.docids
    kill = np.concatenate([replaced_rows, deleted_rows]).astype(np.int64)
    if len(kill):
        _kill(dead, leaf_live, row_leaf, kill)
    leaves = np.zeros(0, np.int64)
    rows = np.zeros(0, np.uint32)
    codes = None
    if m:
        row_data = _grow(row_data, num_rows)
        row_leaf = _grow(row_leaf, num_rows)
        docids = _grow(docids, num_rows)
        assigned = _assign(state, new_mips)
        # Past every published num_rows: no reader reads these rows.
        row_data[base:num_rows] = new_mips
        row_leaf[base:num_rows] = assigned
        docids[base:num_rows] = new_docids
        leaves, rows = _entries(assigned, np.arange(base, num_rows, dtype=np.int64))
        np.add.at(leaf_live, leaves, 1)
        np.add.at(changes, leaves, 1)
        if state.codebooks is not None:
            entry_rows = row_data[rows.astype(np.int64)]
            codes = _encode(state, entry_rows, leaves, threads)
    if state.codebooks is not None and codes is None:
        codes = np.zeros((0, state.codebooks.shape[0]), np.uint8)
    centroids, trained = state.centroids, state.trained
    reset = np.zeros(0, np.int64)
    nxt = replace(state, num_rows=num_rows, dead=dead, leaf_live=leaf_live, row_data=row_data,
                  row_leaf=row_leaf, docids=docids, changes=changes,
                  n_live=state.n_live + m - len(kill))
    if incremental_threshold is not None and len(state.centroids) > 1:
        drift = changes > incremental_threshold * np.maximum(trained, 1)
        drift &= changes >= 16
        if drift.any():
            reset = np.flatnonzero(drift)
            checked = reset
            reset, centroids, row_leaf, leaf_live, re_leaves, re_rows, re_codes = \
                _retrain_leaves(nxt, checked, leaves, rows, threads)
            trained = trained.copy()
            trained[checked] = leaf_live[checked]
            changes[checked] = 0
            # The reset leaves are rebuilt from their live entries: drop what was
            # appended to them above, then append the re-encoded ones.
            keep = ~np.isin(leaves, reset)
            leaves = np.concatenate([leaves[keep], re_leaves])
            rows = np.concatenate([rows[keep], re_rows])
            if codes is not None:
                codes = np.concatenate([codes[keep], re_codes])
            nxt = replace(nxt, centroids=centroids, trained=trained, row_leaf=row_leaf,
                          leaf_live=leaf_live)
    if len(kill):
        reset, leaves, rows, codes = _compact_leaves(state, dead, nxt.leaf_live, reset, leaves,
                                                     rows, codes)
    live = state.live.derive(nxt.centroids, nxt.codebooks, nxt.row_data, num_rows, dead,
                             nxt.leaf_live, nxt.n_live, "reorder" in state.config, reset,
                             np.ascontiguousarray(leaves, np.int64), np.ascontiguousarray(rows),
                             None if codes is None else np.ascontiguousarray(codes))
    return replace(nxt, live=live)


def _compact_leaves(state: State, dead: np.ndarray, leaf_live: np.ndarray, reset: np.ndarray,
                    leaves: np.ndarray, rows: np.ndarray, codes: np.ndarray | None):
    """Drops the tombstones of leaves where they make up COMPACT_SHARE of the segment (at
    least COMPACT_MIN): such a leaf is emptied and its live entries appended again with
    their codes (no retraining, no re-encoding), before this update's entries. Searches
    then scan no more than 1 / (1 - COMPACT_SHARE) of the live entries, and each entry is
    copied at most 1 / COMPACT_SHARE times per deleted entry of its leaf. ``dead`` and
    ``leaf_live`` are this update's; (reset, leaves, rows, codes) what derive() gets, and
    returned with the compacted leaves added (reset leaves are rebuilt anyway)."""
    seg = state.live.leaf_sizes().astype(np.int64)
    added = np.bincount(leaves[~np.isin(leaves, reset)], minlength=len(seg))
    dead_entries = seg - (leaf_live.astype(np.int64) - added)
    worn = dead_entries >= np.maximum(COMPACT_MIN, COMPACT_SHARE * (seg + added))
    worn[reset] = False
    if not worn.any():
        return reset, leaves, rows, codes
    nb = 0 if state.codebooks is None else state.codebooks.shape[0]
    c_leaves, c_rows, c_codes = [], [], []
    for leaf in np.flatnonzero(worn).tolist():
        old, packed = state.live.leaf(leaf)
        r = old.astype(np.int64)
        alive = ((dead[r >> 6] >> (r & 63).astype(np.uint64)) & np.uint64(1)) == 0
        c_leaves.append(np.full(int(alive.sum()), leaf, np.int64))
        c_rows.append(old[alive])
        if nb:
            c_codes.append(_mipscan.unpack_codes(packed, len(old), nb)[alive])
    reset = np.concatenate([reset, np.flatnonzero(worn)]).astype(np.int64)
    leaves = np.concatenate(c_leaves + [leaves])
    rows = np.concatenate(c_rows + [rows]).astype(np.uint32)
    if nb:
        codes = np.concatenate(c_codes + [codes])
    return reset, leaves, rows, codes


def _retrain_leaves(state: State, reset: np.ndarray, new_leaves: np.ndarray,
                    new_rows: np.ndarray, threads: int):
    """One local Lloyd step on the reset leaves: each one's centroid moves to the mean of
    its own live rows (normalised for spherical trees), those rows are reassigned to
    their nearest centroid (most stay; a row that leaves goes to another leaf), and every
    entry of the reset leaves, and every moved row, is re-encoded. ``state`` has this
    update's tombstones and rows and the previous update's segments; new_leaves /
    new_rows are this update's entries (those of reset leaves are redone here).

    Returns (centroids, row_leaf, leaf_live, leaves, rows, codes): copies where changed,
    and the entries to append (the reset leaves emptied first)."""
    cfg = state.config
    d, metric = cfg["d"], cfg["distance_measure"]
    dead = dead_mask(state)
    centroids = state.centroids.copy()
    spherical = cfg.get("tree", {}).get("spherical", False)
    members = {}
    skipped = []
    for leaf in reset.tolist():
        old, _ = state.live.leaf(leaf)
        old = old.astype(np.int64)
        rows = np.concatenate([old[~dead[old]], new_rows[new_leaves == leaf].astype(np.int64)])
        members[leaf] = rows
        own = rows[state.row_leaf[rows, 0] == leaf]  # k-means means: own rows only
        if len(own) == 0:
            continue
        x = space_of(state.row_data[own], metric, d)
        c = x.mean(axis=0)
        if spherical:
            c = c / max(float(np.linalg.norm(c)), 1e-30)
        old_c = space_of(state.centroids[leaf:leaf + 1], metric, d)[0]
        move = float(np.sum((c - old_c) ** 2))
        spread = float(np.mean(np.sum((x - old_c) ** 2, axis=1)))
        if move <= MOVE_SHARE * spread:
            # The points grew around the trained centroid: nothing to retrain (and the
            # re-encoding would change no code much). The leaf counts as trained now.
            skipped.append(leaf)
            continue
        if metric == "squared_l2":
            c = np.concatenate([c, [-0.5 * float(c @ c)]])
        centroids[leaf] = c
    for leaf in skipped:
        del members[leaf]
    # Reassign the own rows of the reset leaves (spilled entries stay where they are).
    own_rows = np.concatenate([r[state.row_leaf[r, 0] == leaf] for leaf, r in members.items()]) \
        if members else np.zeros(0, np.int64)
    row_leaf, leaf_live = state.row_leaf, state.leaf_live
    moved_rows = np.zeros(0, np.int64)
    moved_to = np.zeros(0, np.int64)
    if len(own_rows):
        nearest = assign_nearest(space_of(state.row_data[own_rows], metric, d),
                                 space_of(centroids, metric, d))
        was = state.row_leaf[own_rows, 0].astype(np.int64)
        move = nearest != was
        if move.any():
            moved_rows, moved_to = own_rows[move], nearest[move]
            row_leaf = state.row_leaf.copy()  # the writer's store; readers never read it
            # A row moving onto its SOAR leaf has its entry there already: the two leaves
            # swap roles (that entry becomes its own, the old own entry its spilled one),
            # and no entry moves. (Moving it would put it twice in one leaf, and a later
            # move dropped both: a live row in no leaf.)
            onto = state.row_leaf[moved_rows, 1] == moved_to
            row_leaf[moved_rows[onto], 1] = was[move][onto]
            moved_rows, moved_to = moved_rows[~onto], moved_to[~onto]
            row_leaf[moved_rows, 0] = moved_to
            row_leaf[own_rows[move][onto], 0] = nearest[move][onto]
            leaf_live = state.leaf_live.copy()
            np.subtract.at(leaf_live, was[move][~onto], 1)
            np.add.at(leaf_live, moved_to, 1)
    gone = len(moved_rows) > 0
    all_leaves, all_rows = [], []
    for leaf, rows in members.items():
        if gone:
            rows = rows[~(np.isin(rows, moved_rows) & (state.row_leaf[rows, 0] == leaf))]
        all_leaves.append(np.full(len(rows), leaf, np.int64))
        all_rows.append(rows)
    # Moved rows join their new leaf (entries of other reset leaves are rebuilt above from
    # their old segment, so a row moving into a reset leaf is appended here as well).
    all_leaves.append(moved_to)
    all_rows.append(moved_rows)
    leaves = np.concatenate(all_leaves)
    rows = np.concatenate(all_rows)
    codes = None
    if state.codebooks is not None:
        codes = (_encode(replace(state, centroids=centroids), state.row_data[rows], leaves, threads)
                 if len(rows) else np.zeros((0, state.codebooks.shape[0]), np.uint8))
    return (np.array(sorted(members), np.int64), centroids, row_leaf, leaf_live, leaves,
            rows.astype(np.uint32), codes)


def config_text(config: dict) -> str:
    """ScaNN's ``config()``: a text naming the active method and its stages (not the
    sizes that change with every update, nor the build time). An autopilot index shows
    its autopilot call and the method autopilot picked for the current size."""
    import json

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    parts = []
    if "tree" in config:
        parts.append("partitioning")
    parts.append("asymmetric hashing" if "score_ah" in config else "brute force")
    if "reorder" in config:
        parts.append("reorder")
    lines = [f"method: {' + '.join(parts)}",
             f"distance_measure: {config['distance_measure']}",
             f"num_neighbors: {config['num_neighbors']}"]
    auto = config.get("autopilot")
    if auto is not None:
        lines.append(f"autopilot: {json.dumps(clean(auto), sort_keys=True)}")
    if auto is None or auto.get("mode") != "ONLINE_INCREMENTAL":
        for stage in ("tree", "score_ah", "score_brute_force", "reorder"):
            if stage in config:
                lines.append(f"{stage}: {json.dumps(clean(config[stage]), sort_keys=True)}")
    return "\n".join(lines) + "\n"


class SearcherConfig(dict):
    """A configuration dict (stages -> arguments, as stored in the index) that is also
    ScaNN's ``config()``: calling it returns :func:`config_text`; it compares equal to
    that text too."""

    def __call__(self) -> str:
        return config_text(self)

    def __eq__(self, other):
        if isinstance(other, str):
            return config_text(self) == other
        return dict.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None
