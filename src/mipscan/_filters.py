"""Filtered search (DESIGN.md "Filters"): ids -> internal rows, the reusable
:class:`Filter` (a bitset over rows), and the plan by selectivity.

What the engine gets per batch (``search_batch_filtered`` of the C++ Index / Live): an
optional bitset shared by all queries (allowed rows; dead rows cleared), optional
per-query row lists (CSR; allowed rows, or excluded ones), the eligible row count of each
query, and per query the plan: 0 = search the index with the filter in the result handling
(search.cpp), 1 = score the eligible rows exactly (gather + dot).

The plan (``filter_strategy="auto"``) compares two cost estimates, in nanoseconds, made
from per-unit costs measured on the development machine (2-core AVX-512 x86, one thread;
``benchmarks/bench_filtered.py --calibrate`` re-measures them and prints the constants):

* index: ``C_CENTROID * L * d + scanned * (C_AH_BLOCK * blocks + C_ELIGIBLE)
  + reordered * C_DOT * d``, where ``scanned`` is the entries of the leaves the filtered
  search will scan (leaves_to_search scaled by ``f ** -LEAF_EXPONENT``, f = eligible / n,
  and at least enough leaves to offer the candidates), and float scoring costs
  ``C_DOT * d`` per entry instead of the AH blocks;
* exact: ``eligible * C_DOT * d`` (+ ``C_ROW_CHECK`` per row walked when a per-query
  excluded list is checked against every allowed row): the engine gathers each eligible
  row and scores it;
* exact by BLAS (a batch of at least GEMM_MIN_QUERIES queries, float32 rows): with one
  shared filter, ``eligible * (C_GEMM * d + C_TOPK)``: the eligible rows are gathered once
  (cached on a Filter) and scored with one product (up to SMALL_ROWS rows, each query's
  best k picked by topk_columns); with per-query lists, ``rows * (C_GEMM * d + C_MASKED)
  + eligible * C_TOPK``: every row is scored by products over blocks of rows and each
  query's eligible ones (a bitset made from its list in C++) are offered to its heap.
  Dense lists (e.g. half the rows, per query) cost this way a fraction of the gathers.

* exact by bitsets (per-query filters, a batch of at least GEMM_MIN_QUERIES, float32
  rows): ``eligible * (C_BITS * d + C_BITS_ROW) + words * C_BITS_WORD``: each query's
  eligible rows, read off its bitset, scored by exact_bitsets (filtered.cpp) a block of
  rows at a time for the whole batch, so rows shared by several queries' filters come
  from L2 after the first (EXACT_BITS). Sparse per-query filters cost this way about
  half the gather; dense ones go to the BLAS products.

Per-query filters come as id lists (resolved in every call, made into bitsets by
filter_bitsets for the batched plans) or as one prebuilt :class:`Filter` per query, whose
bitsets (kept per snapshot) are stacked as they are (Resolved.bitsets); the engine's
plans get each Filter's rows (kept too) as lists only when some query needs them.

The cheaper one wins; ``filter_strategy="index"`` or ``"exact"`` forces either (exact
needs float rows: an index with reorder, or a live index; otherwise the index plan is
used; "exact" picks the cheapest exact plan).
"""

from __future__ import annotations

import math

import numpy as np

from mipscan import _live, _mipscan

#: Per-unit costs (ns), one thread, measured with ``bench_filtered.py --calibrate`` on
#: GloVe-50 (d=50, 25 AH blocks, 300 leaves) on the development machine.
C_CENTROID = 0.12       # per centroid dimension (leaf selection)
C_AH_BLOCK = 0.08       # per AH entry and block (LUT16 scan, candidate handling)
C_ELIGIBLE = 1.5        # per scanned entry: the eligibility bit (a gather)
C_DOT = 0.5             # per float of a gathered exact dot product
C_ROW_CHECK = 0.5       # per row walked by the exact plan of an excluded list
C_GEMM = 0.03           # per float, batched exact plan (BLAS product over gathered rows)
C_TOPK = 0.6            # per row and query, batched exact plan (C++ top-k of the scores)
C_MASKED = 0.02         # per row and query, batched exact plan of lists (eligibility bit)
C_BITS = 0.2            # per float, exact_bitsets (each query's eligible rows, blocked)
C_BITS_ROW = 4.0        # per eligible row, exact_bitsets (its bit, the heap, memory)
C_BITS_WORD = 2.0       # per bitset word and query, exact_bitsets (and the batch's setup)
#: A batch of at least this many queries runs the exact plan with BLAS products: over the
#: gathered eligible rows for one shared filter, over all rows (each query's eligible rows
#: picked by a bitset) for per-query lists.
GEMM_MIN_QUERIES = 8
#: Up to this many shared eligible rows (and k <= SMALL_K), the batched exact plan picks
#: each query's best k with topk_columns (sorted insertion, 16 queries at a time) instead
#: of a heap per query: per level, where it stays faster than the heaps (300 queries,
#: k=10: 2.2x at 2,700 rows with AVX-512; the compiled lanes of the other levels lose
#: from about 1,000 rows).
SMALL_ROWS = {"avx512": 8192}
SMALL_ROWS_DEFAULT = 1024
SMALL_K = 32
#: Queries per topk_columns call (bounds its scores: SMALL_ROWS x this many floats).
SMALL_QUERIES = 1024
#: Queries per block of the batched exact plan of lists, and the most bytes their bitsets
#: (one bit per row and query) may take.
LIST_BLOCK = 256
LIST_BITS_BYTES = 32 << 20
#: Rows per BLAS product of the batched exact plans (a multiple of 64: whole bitset words):
#: small enough that the scores (queries x ROW_BLOCK) stay in L2 for the top-k that reads
#: them (512 against 8192: 30 % less time on GloVe-50, 300 queries).
ROW_BLOCK = 512
#: Leaves searched by a filtered index search: leaves_to_search * f ** -LEAF_EXPONENT.
LEAF_EXPONENT = 0.5

STRATEGIES = ("auto", "index", "exact")


class Filter:
    """A reusable filter: the rows a searcher may return, as a bitset over its internal
    rows, built once from ids and shared by many searches (a region, a catalogue).

    ``Filter(searcher, allowed=ids)`` allows only those ids; ``Filter(searcher,
    excluded=ids)`` allows all but those; both: allowed minus excluded. Ids are docids for
    a searcher built with docids, row numbers otherwise. Pass it as ``allowed=`` to any
    search method, or one Filter per query in a list as ``allowed=`` to search_batched /
    search_batched_parallel (per-query filters built once). After an update of the
    searcher (upsert, delete, rebalance) it is rebuilt from its ids on its next use (new
    docids are then allowed by an excluded-only filter, not by an allowed one); ids
    deleted meanwhile are ignored.

    Raises:
        ValueError: an id that is not in the index (the first is named).
        TypeError: ids that are not ints (or strings, for string docids).
    """

    def __init__(self, searcher, allowed=None, excluded=None):
        call = "Filter()"
        self._searcher = searcher
        st = searcher._state
        self._allowed = None if allowed is None else _as_id_array(call, "allowed", allowed, st)
        self._excluded = None if excluded is None else _as_id_array(call, "excluded", excluded, st)
        self._cache = None
        self._rows = None  # (bits, their rows) for the exact plan
        self._gathered = None  # (rows, their float rows) for the batched exact plan
        self._plan = None  # (state, knobs, plan code) of the last batch (see plan())
        self._bits_for(call, st, strict=True)  # validates the ids now

    def __repr__(self) -> str:
        return f"Filter(eligible={self.count()}, of={self._searcher.size()})"

    def count(self) -> int:
        """Rows the filter allows in the searcher's current snapshot."""
        return self._bits_for("Filter.count()", self._searcher._state)[1]

    def _bits_for(self, call, st, strict=False):
        cache = self._cache
        if cache is not None and cache[0] is st:
            return cache[1], cache[2]
        bits = np.zeros(_words(st), np.uint64)
        if self._allowed is not None:
            rows = _rows_of_ids(call, "allowed", st, self._allowed, strict)
            _set_bits(bits, rows)
        else:
            bits[:] = _live_bits(st)
        if self._excluded is not None:
            rows = _rows_of_ids(call, "excluded", st, self._excluded, strict)
            _clear_bits(bits, rows)
        count = _popcount(bits)
        self._cache = (st, bits, count)
        return bits, count


# ---------------------------------------------------------------- ids -> rows

def _space(st) -> int:
    return st.n_live if st.live is None else st.num_rows


def _words(st) -> int:
    return (_space(st) + 63) // 64


def _live_bits(st) -> np.ndarray:
    """Bitset of the live rows (all rows of a static index)."""
    space = _space(st)
    bits = np.full(_words(st), np.uint64(0xFFFFFFFFFFFFFFFF))
    if space % 64:
        bits[-1] = np.uint64((1 << (space % 64)) - 1)
    if st.live is not None:
        bits &= ~st.dead[:len(bits)]
    return bits


def _bits_of_rows(rows: np.ndarray, words: int) -> np.ndarray:
    """Bitset (uint64 words, bit r of word r // 64) with the given rows set."""
    mask = np.zeros(words * 64, bool)
    mask[rows] = True
    return np.packbits(mask, bitorder="little").view(np.uint64)


def _set_bits(bits: np.ndarray, rows: np.ndarray) -> None:
    bits |= _bits_of_rows(rows, len(bits))


def _clear_bits(bits: np.ndarray, rows: np.ndarray) -> None:
    bits &= ~_bits_of_rows(rows, len(bits))


def _test_bits(bits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return ((bits[rows >> 6] >> (rows & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)


_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(bits: np.ndarray) -> int:
    return int(_POP8[bits.view(np.uint8)].sum(dtype=np.int64))


def _as_id_array(call, name, ids, st) -> np.ndarray:
    """ids as a 1-D array: int64 (rows or int docids) or object (str docids)."""
    if isinstance(ids, Filter):
        raise TypeError(f"{call}: {name} is a Filter, which goes alone in allowed= (one for "
                        "the batch) or in a list of one Filter per query, not among ids")
    if isinstance(ids, (set, frozenset)):
        ids = list(ids)
    a = np.asarray(ids)
    if a.ndim != 1:
        if a.ndim == 0:
            raise TypeError(f"{call}: {name} must be a list or array of ids; got {type(ids).__name__}")
        raise ValueError(f"{call}: {name} must be one list of ids; got shape {a.shape}")
    if st.docid_kind is None and st.docids is not None and a.size:  # started empty, still is
        raise ValueError(f"{call}: {name} holds {a.tolist()[0]!r}, which is not in the index (it is empty)")
    if st.docid_kind == "str":
        if a.size and a.dtype.kind not in "UO":
            raise TypeError(f"{call}: {name} must hold string docids like the index's; got {a.dtype}")
        return a.astype(object)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind not in "iu" or a.dtype == np.bool_:
        kind = "docids" if st.docid_kind == "int" else "row numbers"
        raise TypeError(f"{call}: {name} must hold integer {kind}; got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{call}: {name} holds {int(a.max())}, which is not in the index")
    return a.astype(np.int64, copy=False)


def _docid_map(st):
    """(kind, lookup) for a state with docids, cached on nothing but the state itself:
    int docids -> (sorted docids, their rows); str docids -> dict."""
    cached = _MAP_CACHE.get(id(st))
    if cached is not None and cached[0] is st:
        return cached[1]
    rows = np.arange(st.n_live) if st.live is None else _live.live_rows(st)
    keys = st.docids[rows]
    if st.docid_kind == "int":
        order = np.argsort(keys, kind="stable")
        lookup = (keys[order].astype(np.int64), rows[order].astype(np.int64))
    else:
        lookup = {k: int(r) for k, r in zip(keys.tolist(), rows.tolist())}
    if len(_MAP_CACHE) > 8:
        _MAP_CACHE.clear()
    _MAP_CACHE[id(st)] = (st, lookup)
    return lookup


_MAP_CACHE: dict = {}


def _rows_of_ids(call, name, st, ids: np.ndarray, strict: bool = True,
                 unique: bool = True) -> np.ndarray:
    """Internal rows (int64; unique and sorted when unique) of ids; an id not in the index
    raises ValueError naming the first (strict), or is dropped."""
    uniq = np.unique if unique else (lambda a: a)
    if st.docid_kind is None:
        n = st.n_live
        bad = (ids < 0) | (ids >= n)
        if bad.any():
            if strict:
                raise ValueError(f"{call}: {name} holds {int(ids[np.argmax(bad)])}, which is not a "
                                 f"row of the index (rows are 0..{n - 1}; it has no docids)")
            ids = ids[~bad]
        return uniq(ids)
    lookup = _docid_map(st)
    if st.docid_kind == "int":
        keys, rows = lookup
        pos = np.searchsorted(keys, ids)
        pos_c = np.minimum(pos, max(len(keys) - 1, 0))
        ok = (pos < len(keys)) & (keys[pos_c] == ids) if len(keys) else np.zeros(len(ids), bool)
        if not ok.all():
            if strict:
                raise ValueError(f"{call}: {name} holds docid {int(ids[np.argmin(ok)])}, which is "
                                 "not in the index")
            pos_c = pos_c[ok]
        return uniq(rows[pos_c])
    out = []
    for v in ids.tolist():
        r = lookup.get(v)
        if r is None:
            if strict:
                raise ValueError(f"{call}: {name} holds docid {v!r}, which is not in the index")
            continue
        out.append(r)
    return uniq(np.array(out, np.int64))


def _is_per_query(value) -> bool:
    """A sequence of id lists (one per query), as opposed to one list of ids."""
    if isinstance(value, np.ndarray):
        return value.ndim == 2 or (value.ndim == 1 and value.dtype == object and value.size > 0
                                   and not isinstance(value[0], (str, int, np.integer)))
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        return not isinstance(first, (str, bytes, int, np.integer)) and hasattr(first, "__len__")
    return False


# ---------------------------------------------------------------- a batch's filter

class Resolved:
    """A batch's filter, as the engine takes it."""
    __slots__ = ("allow", "list_offsets", "list_rows", "list_excludes", "eligible", "lists",
                 "filter", "mask", "count", "bitsets", "filters", "filter_bits")

    def __init__(self):
        self.mask = None    # bool per row of the shared bitset, when made from one array
        self.count = None   # its set bits
        self.filter = None  # the Filter whose bits are the shared bitset, if so (caches rows)
        self.allow = None
        self.list_offsets = None
        self.list_rows = None
        self.list_excludes = False
        self.eligible = None
        self.lists = False
        # Per-query filters as bitsets, (nq, words) uint64: the eligible rows of each query
        # (live, shared bitset and excluded lists applied). Set for a list of Filters (then
        # list_offsets / list_rows are made from it only when the engine needs them: lists()).
        self.bitsets = None
        self.filters = None  # those Filters, when their bitsets are the eligible rows as is
        self.filter_bits = None  # and those bitsets, as resolved (a Filter's cache may move on)


def _is_filter_list(value) -> bool:
    """A sequence (list, tuple or 1-D object array) whose first item is a Filter."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype == object and value.size > 0 \
            and isinstance(value[0], Filter)
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], Filter)


def resolve(call, st, nq: int, allowed, excluded, single: bool, searcher=None) -> Resolved:
    """The engine's form of allowed/excluded for nq queries (see Searcher.search).
    searcher: the searcher searched (a list of Filters must be of it)."""
    out = Resolved()
    shared = None  # bitset (live rows only)
    lists = {}     # "allowed"/"excluded" -> list of row arrays, one per query
    filters = None  # allowed as one Filter per query
    for name, value in (("allowed", allowed), ("excluded", excluded)):
        if value is None:
            continue
        if _is_filter_list(value):
            if name == "excluded":
                raise TypeError(f"{call}: Filters go in allowed= (build one with "
                                "Filter(searcher, excluded=ids) to exclude)")
            if single:
                raise TypeError(f"{call}: allowed takes one Filter for one query; got a "
                                f"{type(value).__name__} of {len(value)} Filters")
            filters = _check_filter_list(call, value, nq, searcher)
        elif isinstance(value, Filter):
            if name == "excluded":
                raise TypeError(f"{call}: a Filter goes in allowed= (build it with "
                                "Filter(searcher, excluded=ids) to exclude)")
            bits, _ = value._bits_for(call, st)
            if len(bits) != _words(st):
                raise ValueError(f"{call}: allowed is a Filter of another searcher")
            out.filter = value
            shared = bits if shared is None else shared & bits  # never changed in place
        elif not single and _is_per_query(value):
            if len(value) != nq:
                raise ValueError(f"{call}: {name} must hold one list of ids per query ({nq}); "
                                 f"got {len(value)}")
            lists[name] = _per_query_rows(call, name, st, value)
        else:
            rows = _rows_of_ids(call, name, st, _as_id_array(call, name, value, st),
                                unique=False)
            words = _words(st)
            mask = np.zeros(words * 64, bool)
            if name == "allowed":
                mask[rows] = True
                if st.live is not None:
                    mask[:st.num_rows] &= ~_live.dead_mask(st)
            else:
                mask[:_space(st)] = True if st.live is None else ~_live.dead_mask(st)
                mask[rows] = False
            bits = np.packbits(mask, bitorder="little").view(np.uint64)
            out.mask = mask if shared is None else None
            shared = bits if shared is None else shared & bits
    if filters is not None:
        return _resolve_filters(call, st, out, filters, shared, lists.get("excluded"))
    if "allowed" in lists and "excluded" in lists:
        (ao, ar), (eo, er) = lists["allowed"], lists["excluded"]
        per = [np.setdiff1d(ar[ao[i]:ao[i + 1]], er[eo[i]:eo[i + 1]]) for i in range(nq)]
        counts = np.array([len(p) for p in per], np.int64)
        lists = {"allowed": (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                             np.concatenate(per) if per else np.zeros(0, np.int64))}
    if out.filter is not None and shared is not out.filter._cache[1]:
        out.filter = None
    # The engine counts each query's eligible rows exactly (dead rows, duplicates); the
    # estimate here (list lengths) is for the plan only.
    out.allow = shared
    if out.filter is not None:
        out.mask, out.count = None, out.filter._cache[2]
    elif out.mask is not None:
        out.count = int(np.count_nonzero(out.mask))
    base = st.n_live if shared is None else (out.count if out.count is not None else _popcount(shared))
    if not lists:
        out.eligible = np.full(nq, base, np.int64)
        return out
    (name, (offsets, rows)), = lists.items()
    out.lists = True
    out.list_excludes = name == "excluded"
    out.list_offsets = offsets
    out.list_rows = rows.astype(np.uint32, copy=False)
    counts = np.diff(offsets)
    out.eligible = np.maximum(base - counts, 0) if out.list_excludes else np.minimum(counts, base)
    return out


def _check_filter_list(call, value, nq, searcher) -> list:
    """The Filters of a per-query allowed list, checked: one per query, each a Filter of
    this searcher."""
    if len(value) != nq:
        raise ValueError(f"{call}: allowed must hold one Filter per query ({nq}); got {len(value)}")
    for i, f in enumerate(value):
        if not isinstance(f, Filter):
            raise TypeError(f"{call}: allowed[{i}] is a {type(f).__name__}, but allowed[0] is a "
                            "Filter: give one Filter per query, or id lists for all")
        if searcher is not None and f._searcher is not searcher:
            raise ValueError(f"{call}: allowed[{i}] is a Filter of another searcher (build it "
                             "with this searcher's make_filter())")
    return list(value)


def _resolve_filters(call, st, out: Resolved, filters: list, shared, excluded_lists) -> Resolved:
    """A batch with one Filter per query. Alone, their bitsets (each Filter keeps its own
    per snapshot) are stacked only when a batched exact plan reads them (bitsets_of()), and
    the engine gets their kept rows (lists()): at 0.1 % a stack of 300 bitsets of
    GloVe's 90,000 rows cost a third of the search. With a shared bitset (excluded ids)
    or per-query excluded lists, the stack is made here with those applied."""
    nq = len(filters)
    words = _words(st)
    counts = np.empty(nq, np.int64)
    got = []
    for i, f in enumerate(filters):
        bits, counts[i] = f._bits_for(f"{call}: allowed[{i}]", st)
        if len(bits) != words:
            raise ValueError(f"{call}: allowed[{i}] is a Filter of another searcher")
        got.append(bits)
    out.lists = True
    out.list_excludes = False
    out.filters = filters
    out.filter_bits = got
    out.eligible = counts
    if shared is None and excluded_lists is None:
        return out
    bitsets = bitsets_of(out)
    if shared is not None:
        bitsets &= shared
    if excluded_lists is not None:
        eo, er = excluded_lists
        ex, _ = _mipscan.filter_bitsets(_space(st), None, None, eo,
                                        er.astype(np.uint32, copy=False), False, 1)
        bitsets &= ~ex
    out.bitsets = bitsets
    out.filters = out.filter_bits = None  # their rows are no longer the eligible ones
    out.eligible = _popcounts(bitsets)
    return out


def bitsets_of(r: Resolved) -> np.ndarray | None:
    """The per-query bitsets of a batch of Filters, (nq, words): stacked on first use."""
    if r.bitsets is None and r.filters is not None:
        r.bitsets = np.stack(r.filter_bits) if r.filters else None
    return r.bitsets


def _popcounts(bitsets: np.ndarray) -> np.ndarray:
    """Set bits of each row of a (nq, words) bitset matrix."""
    return _POP8[bitsets.view(np.uint8)].sum(axis=1, dtype=np.int64)


def lists(r: Resolved) -> Resolved:
    """r with list_offsets / list_rows (the engine's form) made from its bitsets when it
    has only those (a list of Filters), in place; returns r."""
    if r.list_rows is None and r.filters is not None:
        rows = [_filter_rows(f, b) for f, b in zip(r.filters, r.filter_bits)]
        r.list_offsets = np.concatenate([[0], np.cumsum([len(x) for x in rows])]).astype(np.int64)
        r.list_rows = np.concatenate(rows) if rows else np.zeros(0, np.uint32)
    elif r.bitsets is not None and r.list_rows is None:
        qi, rows = np.nonzero(np.unpackbits(r.bitsets.view(np.uint8), axis=1, bitorder="little"))
        r.list_offsets = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=len(r.bitsets)))]
                                        ).astype(np.int64)
        r.list_rows = rows.astype(np.uint32)
    return r


def _filter_rows(f: Filter, bits: np.ndarray) -> np.ndarray:
    """The rows of a Filter's bitset ``bits`` (one of its snapshots), ascending (uint32),
    cached on it."""
    cached = f._rows
    if cached is not None and cached[0] is bits:
        return cached[1]
    rows = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")).astype(np.uint32)
    f._rows = (bits, rows)
    return rows


def _per_query_rows(call, name, st, value):
    """(offsets, rows) of nq id lists (CSR, rows not deduplicated: the engine does),
    resolved and checked in one vectorized pass; the first bad id is named with its
    query."""
    arrays = [_as_id_array(call, f"{name}[{i}]", ids, st) for i, ids in enumerate(value)]
    counts = np.array([len(a) for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if not len(arrays) or not offsets[-1]:
        return offsets, np.zeros(0, np.int64)
    if st.docid_kind is None:  # row numbers: checked and copied to uint32
        n = st.n_live
        if offsets[-1] <= FLAT_CHECK_MAX:  # one check of all (two numpy calls a list cost more)
            flat = np.concatenate(arrays)
            if flat.min() >= 0 and flat.max() < n:
                return offsets, flat.astype(np.uint32)
        for i, a in enumerate(arrays):  # huge lists: no int64 copy of them all
            if len(a) and (a.min() < 0 or a.max() >= n):
                _rows_of_ids(call, f"{name}[{i}]", st, a, unique=False)  # raises
        return offsets, np.concatenate(arrays, dtype=np.uint32, casting="unsafe")
    flat = np.concatenate(arrays)
    try:
        rows = _rows_of_ids(call, name, st, flat, unique=False)
    except ValueError:
        for i, a in enumerate(arrays):  # name the query of the first bad id
            _rows_of_ids(call, f"{name}[{i}]", st, a, unique=False)
        raise
    return offsets, rows


#: Up to this many ids in all, per-query lists of row numbers are range-checked as one
#: array (300 lists of 90 ids: 36 us against 460 us for a check per list).
FLAT_CHECK_MAX = 1 << 22

#: Plan codes per query (EXACT_BITS: per-query filters only, see exact_lists).
INDEX, EXACT, EXACT_GEMM, EXACT_BITS = 0, 1, 2, 3


def plan(searcher, st, r: Resolved, leaves: int, pre_k: int, final_k: int, strategy: str,
         has_exact_rows: bool, has_float_rows: bool, batch: int | None = None) -> np.ndarray | None:
    """Per query: INDEX (search the index with the filter), EXACT (the engine scores the
    eligible rows) or EXACT_GEMM (exact_batched / exact_lists: BLAS products; needs float
    rows and a batch of GEMM_MIN_QUERIES). None: all INDEX. batch: the batch's size when
    r holds some of its queries."""
    if strategy == "index" or not has_exact_rows:
        return None
    nq = len(r.eligible)
    if not r.lists and nq > 1:  # one eligible count for the batch: one decision
        f = r.filter  # a Filter keeps its last decision (per snapshot and knobs)
        key = (leaves, pre_k, final_k, strategy, has_float_rows, nq >= GEMM_MIN_QUERIES)
        if f is not None and f._plan is not None and f._plan[0] is st and f._plan[1] == key:
            return np.full(nq, f._plan[2], np.uint8)
        one = Resolved()
        one.allow, one.count, one.eligible = r.allow, r.count, r.eligible[:1]
        code = plan(searcher, st, one, leaves, pre_k, final_k, strategy, has_exact_rows,
                    has_float_rows, batch=nq)[0]
        if f is not None:
            f._plan = (st, key, code)
        return np.full(nq, code, np.uint8)
    n = max(st.n_live, 1)
    d = searcher.d + (1 if searcher.distance_measure == "squared_l2" else 0)
    gemm = has_float_rows and (batch or nq) >= GEMM_MIN_QUERIES and (
        r.lists or r.allow is not None)
    if r.lists:
        # every row scored by BLAS, each query's eligible ones picked by its bitset
        gemm_cost = _space(st) * (C_GEMM * d + C_MASKED) + r.eligible * C_TOPK
        # or each query's eligible rows scored from its bitset, rows in L2-sized blocks
        bits_cost = r.eligible * (C_BITS * d + C_BITS_ROW) + _words(st) * C_BITS_WORD
    else:
        gemm_cost = r.eligible * (C_GEMM * d + C_TOPK)
        bits_cost = np.full(nq, np.inf)
    walked = (st.n_live if r.allow is None else
              r.count if r.count is not None else _popcount(r.allow)) if r.list_excludes else 0
    gather_cost = r.eligible * C_DOT * d + C_ROW_CHECK * walked
    exact_code = np.where(gemm & (bits_cost < np.minimum(gemm_cost, gather_cost)), EXACT_BITS,
                          np.where(gemm & (gemm_cost < gather_cost), EXACT_GEMM, EXACT)
                          ).astype(np.uint8)
    gemm_cost = np.where(exact_code == EXACT_BITS, bits_cost, gemm_cost)
    if strategy == "exact":
        return exact_code
    L = searcher.num_leaves
    arrays_ah = searcher.config.get("score_ah") is not None
    slots = st.index.num_slots if st.live is None else int(st.leaf_live.sum())
    per_leaf = slots / L
    f = np.maximum(r.eligible, 1) / n
    leaves_f = np.minimum(L, np.ceil(leaves * f ** -LEAF_EXPONENT))
    reordered = min(pre_k, n) if searcher.reordering_num_neighbors else final_k
    # at least enough leaves to offer the candidates: reordered / f entries
    scanned = np.minimum(slots, np.maximum(leaves_f * per_leaf, reordered / f))
    if L == 1:
        scanned = np.full(nq, float(slots))
    if arrays_ah:
        blocks = math.ceil(d / max(1, searcher.config["score_ah"].get("dimensions_per_block", 2)))
        per_entry = C_AH_BLOCK * blocks + C_ELIGIBLE
    else:
        per_entry = C_DOT * d + C_ELIGIBLE
    index_cost = C_CENTROID * L * d + scanned * per_entry + reordered * C_DOT * d
    exact_cost = np.where(exact_code >= EXACT_GEMM, gemm_cost, gather_cost)
    return np.where(exact_cost < index_cost, exact_code, INDEX).astype(np.uint8)


def shared_rows(st, r: Resolved) -> np.ndarray | None:
    """The rows of the shared bitset, ascending (uint32), for the exact plan; cached on a
    Filter."""
    if r.allow is None:
        return None
    f = r.filter
    if f is not None and f._rows is not None and f._rows[0] is r.allow:
        return f._rows[1]
    if r.mask is not None:
        return np.flatnonzero(r.mask).astype(np.uint32)
    rows = np.flatnonzero(np.unpackbits(r.allow.view(np.uint8), bitorder="little")).astype(np.uint32)
    if f is not None:
        f._rows = (r.allow, rows)
    return rows


def exact_batched(st, r: Resolved, q: np.ndarray, rows_store: np.ndarray, k: int):
    """The exact plan of a batch sharing one filter: the eligible rows gathered once
    (cached on a Filter), scored by one BLAS product per block, C++ top-k. Returns
    (ids (nq, k) uint32 rows, UINT32_MAX padding; scores; counts)."""
    rows = shared_rows(st, r)
    f = r.filter
    if f is not None and f._gathered is not None and f._gathered[0] is rows:
        sub = f._gathered[1]
    else:
        sub = np.ascontiguousarray(rows_store[rows])
        if f is not None:
            f._gathered = (rows, sub)
    nq, e = len(q), len(rows)
    kk = min(k, e)
    if kk and e <= SMALL_ROWS.get(_mipscan.simd_level(), SMALL_ROWS_DEFAULT) and kk <= SMALL_K:
        # one product per block of queries, each query's scores a column; its best kk by
        # sorted insertion
        heap_s = np.empty((nq, kk), np.float32)
        heap_i = np.empty((nq, kk), np.uint32)
        for b in range(0, nq, SMALL_QUERIES):
            heap_s[b:b + SMALL_QUERIES], heap_i[b:b + SMALL_QUERIES] = _mipscan.topk_columns(
                sub @ q[b:b + SMALL_QUERIES].T, kk)
        ids, scores = rows[heap_i], heap_s
        if kk < k:
            ids = np.hstack([ids, np.full((nq, k - kk), 0xFFFFFFFF, np.uint32)])
            scores = np.hstack([scores, np.full((nq, k - kk), -np.inf, np.float32)])
        return ids, scores, np.full(nq, kk, np.uint32)
    ids = np.full((nq, k), 0xFFFFFFFF, np.uint32)
    scores = np.full((nq, k), -np.inf, np.float32)
    if kk:
        heap_s = np.empty((nq, kk), np.float32)
        heap_i = np.empty((nq, kk), np.uint32)
        sizes = np.zeros(nq, np.int64)
        for b0 in range(0, e, ROW_BLOCK):
            sc = q @ sub[b0:b0 + ROW_BLOCK].T
            _mipscan.topk_update_rows(sc, None, b0, heap_s, heap_i, sizes, 1)
        _mipscan.topk_finish_rows(heap_s, heap_i, sizes, 1)
        ids[:, :kk] = rows[heap_i]
        scores[:, :kk] = heap_s
    return ids, scores, np.full(nq, kk, np.uint32)


def subset(r: Resolved, sel: np.ndarray) -> Resolved:
    """The filter of the queries ``sel`` (ascending) of a batch."""
    out = Resolved()
    out.allow, out.mask, out.count, out.filter = r.allow, r.mask, r.count, r.filter
    out.lists, out.list_excludes = r.lists, r.list_excludes
    out.eligible = r.eligible[sel]
    if r.filters is not None:
        out.filters = [r.filters[i] for i in sel]
        out.filter_bits = [r.filter_bits[i] for i in sel]
    elif r.bitsets is not None:
        out.bitsets = r.bitsets[sel]
    if r.lists and r.list_rows is not None:
        off = r.list_offsets
        if len(sel) and sel[-1] - sel[0] + 1 == len(sel):  # a run of queries: views
            a, b = off[sel[0]], off[sel[-1] + 1]
            out.list_offsets = off[sel[0]:sel[-1] + 2] - a
            out.list_rows = r.list_rows[a:b]
        else:
            starts, lens = off[sel], off[sel + 1] - off[sel]
            out.list_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            out.list_rows = r.list_rows[np.repeat(starts - out.list_offsets[:-1], lens)
                                        + np.arange(out.list_offsets[-1])]
    return out


def exact_lists(st, r: Resolved, sel: np.ndarray, q: np.ndarray, rows_store: np.ndarray, k: int,
                sparse: np.ndarray | None = None, threads: int = 1):
    """The exact plan of the queries ``sel`` of a batch with per-query filters, from each
    query's bitset (r.bitsets, or filter_bitsets of its list): the queries marked in
    ``sparse`` by exact_bitsets (each scores its own eligible rows, a block of rows at a
    time for the whole batch: EXACT_BITS), the others by BLAS products of every row, each
    query's eligible ones offered to its heap (EXACT_GEMM). Returns as exact_batched, for
    those queries. threads: for exact_bitsets (queries split between them)."""
    space = _space(st)
    dead = st.dead if st.live is not None else None
    nq = len(sel)
    if sparse is None:
        sparse = np.zeros(nq, bool)
    ids = np.full((nq, k), 0xFFFFFFFF, np.uint32)
    scores = np.full((nq, k), -np.inf, np.float32)
    counts = np.zeros(nq, np.uint32)
    words = (space + 63) // 64
    # queries per block (bounds the bitsets made from lists; given bitsets: views)
    stacked = r.bitsets is not None or r.filters is not None
    per = nq if stacked else max(1, min(LIST_BLOCK, LIST_BITS_BYTES // (8 * words)))
    for b in range(0, nq, per):
        qs = sel[b:b + per]
        sp = sparse[b:b + per]
        rows_of = None  # Filters alone: each one's kept rows, and bitsets only where needed
        dense_bits = False  # bits holds the rows of the dense queries only
        if r.filters is not None and r.bitsets is None:
            rows_of = [_filter_rows(r.filters[j], r.filter_bits[j]) for j in qs]
            elig = r.eligible[qs]
            bits = (np.stack([r.filter_bits[j] for j in qs[~sp]]) if not sp.all()
                    else np.zeros((0, words), np.uint64))
            dense_bits = True
            if dead is not None:
                bits &= ~dead[:words]
        elif stacked:
            bits, elig = bitsets_of(r)[qs], r.eligible[qs]
            if dead is not None:
                bits &= ~dead[:words]
        elif not r.list_excludes and r.allow is None and dead is None:
            # allowed lists alone: the sparse queries' lists sorted (exact_rows), bitsets
            # for the others only
            elig = r.eligible[qs]  # list lengths, an upper bound; the heaps count exactly
            if sp.any():
                part = subset(r, qs[sp])
                off, flat, m = _mipscan.sorted_lists(part.list_offsets, part.list_rows)
                rows_of = (off, flat[:m])
            part = subset(r, qs[~sp])
            bits, _ = _mipscan.filter_bitsets(space, None, None, part.list_offsets,
                                              part.list_rows, False, 1)
            dense_bits = True
        else:
            part = subset(r, qs)
            bits, elig = _mipscan.filter_bitsets(space, r.allow, dead, part.list_offsets,
                                                 part.list_rows, r.list_excludes, 1)
        kk = int(min(k, elig.max())) if len(elig) else 0
        if kk == 0:
            continue
        qb = q[qs]
        heap_s = np.empty((len(qs), kk), np.float32)
        heap_i = np.empty((len(qs), kk), np.uint32)
        sizes = np.zeros(len(qs), np.int64)
        if sp.any():
            i = np.flatnonzero(sp)
            hs, hi, sz = heap_s[i], heap_i[i], sizes[i]
            qi = np.ascontiguousarray(qb[i])
            if isinstance(rows_of, tuple):  # sorted allowed lists
                _mipscan.exact_rows(qi, rows_store[:space], rows_of[0], rows_of[1], hs, hi, sz,
                                    0, threads)
            elif rows_of is not None:  # sparse Filters: their row lists (a bitset is n / 8 bytes)
                lens = np.array([len(rows_of[j]) for j in i], np.int64)
                offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
                flat = (np.concatenate([rows_of[j] for j in i]) if offsets[-1]
                        else np.zeros(0, np.uint32))
                _mipscan.exact_rows(qi, rows_store[:space], offsets, flat, hs, hi, sz, 0, threads)
            else:
                _mipscan.exact_bitsets(qi, rows_store[:space], np.ascontiguousarray(bits[i]),
                                       hs, hi, sz, 0, threads)
            heap_s[i], heap_i[i], sizes[i] = hs, hi, sz
        if not sp.all():
            i = np.flatnonzero(~sp)
            hs, hi, sz = heap_s[i], heap_i[i], sizes[i]
            qd = np.ascontiguousarray(qb[i])
            bd = np.ascontiguousarray(bits if dense_bits else bits[i])
            for b0 in range(0, space, ROW_BLOCK):
                sc = qd @ rows_store[b0:min(b0 + ROW_BLOCK, space)].T
                _mipscan.topk_update_rows_masked(sc, bd, b0, hs, hi, sz, 1)
            heap_s[i], heap_i[i], sizes[i] = hs, hi, sz
        _mipscan.topk_finish_rows(heap_s, heap_i, sizes, 1)
        got = np.arange(kk)[None, :] < sizes[:, None]
        ids[b:b + len(qs), :kk] = np.where(got, heap_i, np.uint32(0xFFFFFFFF))
        scores[b:b + len(qs), :kk] = np.where(got, heap_s, np.float32(-np.inf))
        counts[b:b + len(qs)] = sizes
    return ids, scores, counts
