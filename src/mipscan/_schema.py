"""The index schema, in one place: the builder stages and their arguments, the
cross-argument rules, and which arrays a configuration needs.

Read by the builder (to check a configuration), by the index loader (to re-check a
stored one and to know which files must be there) and by the searcher. The C++ bindings
mirror the array invariants that protect memory (``_core/bindings.cpp``, ``Index``).
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable

import numpy as np

from mipscan._validation import (DISTANCE_MEASURES, Bool, Interval, Options, Quantize,
                                 check_value)
from mipscan._validation import max_abs_value

_NAN = float("nan")

#: Largest number of AH blocks: a point's sum of per-block LUT entries (each >= 1 unit)
#: must fit the scan's uint16 accumulators (see _core/lut16.h).
MAX_AH_BLOCKS = 65535

#: Passes of the anisotropic encoder's coordinate descent over blocks (it stops earlier
#: once no code changes). Measured on GloVe-50 (90,000 x 50, 300 leaves, AH 2): the
#: share of packed code bytes that change is 2.0% from pass 1 to 2, 0.25% from 2 to 3,
#: 0.03% from 3 to 5, 0.0002% from 5 to 10 and none from 10 to 20; recall@10 (no
#: reorder) 0.601 after 1 pass, 0.603 from 3 on. 10 is converged at no extra cost.
ENCODER_ITERATIONS = 10

#: Upper bound of k-means iteration counts: a C int in the core; more only wastes time.
MAX_TRAINING_ITERATIONS = 1 << 20


#: tree(spread_weight=): its default for dot_product and cosine, and its bound. 2 (the
#: mean plus two standard deviations of q . x in the leaf) measured best of 2 ... 4 on
#: GloVe-50; the seed candidates gain a little with it. squared_l2 leaves are ranked by
#: centroid alone (its MIPS form's extra dimension, -|x|^2 / 2, spreads unlike the
#: others: recall fell).
DEFAULT_SPREAD_WEIGHT = 2.0
#: Its default with leaf axes (tree(leaf_axes=)): 3 measured better than 2 (+0.003
#: recall@10) and about as 4 on the tutorial-shaped candidates.
AXES_SPREAD_WEIGHT = 3.0
MAX_SPREAD_WEIGHT = 100.0


def spread_weight_of(config: dict) -> float:
    """The leaf order's spread weight of an index configuration (0: none)."""
    tree = config.get("tree")
    if not tree:
        return 0.0
    w = tree.get("spread_weight")
    if w is None:
        if config.get("distance_measure") == "squared_l2":
            return 0.0
        return AXES_SPREAD_WEIGHT if tree.get("leaf_axes") else DEFAULT_SPREAD_WEIGHT
    return float(w)


#: tree(leaf_axes=None): the principal axes per leaf the leaf order uses where they are
#: cheap, and the share of the scan's cost they may add: their cost per query, L * r * d
#: multiply-adds, against T * (n / L) * d code lookups (T leaves searched of L), so
#: L * L * r <= share * T * n. The tutorial's 270,882 candidates with 100 leaves, 30
#: searched: on; GloVe-50 at 300 leaves or the seed set at 520: off.
DEFAULT_LEAF_AXES = 8
LEAF_AXES_COST_SHARE = 0.015
MAX_LEAF_AXES = 64


def leaf_axes_of(config: dict) -> int:
    """The principal axes per leaf of an index of this (stored) configuration's leaf
    order (0: the isotropic spread only, or no spread)."""
    tree = config.get("tree")
    if not tree or spread_weight_of(config) <= 0:
        return 0
    return int(tree.get("leaf_axes") or 0)


def resolve_leaf_axes(config: dict) -> None:
    """Fixes tree.leaf_axes at build time: None to DEFAULT_LEAF_AXES where they are cheap
    (see LEAF_AXES_COST_SHARE) and 0 elsewhere; at most the MIPS width. Stored, so the
    choice never changes with n."""
    tree = config.get("tree")
    if not tree:
        return
    width = mips_width(int(config["d"]), config["distance_measure"])
    r = tree.get("leaf_axes")
    if spread_weight_of(config) <= 0:
        r = 0  # no spread term: no axes either
    elif r is None:
        n, leaves = int(config["n"]), int(tree["num_leaves"])
        r = DEFAULT_LEAF_AXES
        cheap = leaves > 1 and (leaves * leaves * min(r, width)
                                <= LEAF_AXES_COST_SHARE * tree["num_leaves_to_search"] * n)
        r = r if cheap else 0
    tree["leaf_axes"] = min(int(r), width)


#: Stage arguments added after folders were first written: (stage, argument) -> the value
#: that reproduces how those folders were searched.
ADDED_LATER = {("tree", "spread_weight"): 0.0, ("tree", "leaf_axes"): 0}


class ReorderType(enum.Enum):
    """Storage type of a copy of the data (reorder rows, brute-force rows, centroids), as
    ScaNN's ``scann_builder.ReorderType``. ScaNN's own enum is accepted too (by name)."""

    FLOAT32 = 1
    INT8 = 2
    BFLOAT16 = 3


# One table per stage: argument -> (rule, default). Read by the builder, the loader and
# the generic validation test (tests/test_validation.py).
STAGES: dict[str, dict[str, tuple[Any, Any]]] = {
    "tree": {
        "num_leaves": (Interval(int, 1, None), None),
        "num_leaves_to_search": (Interval(int, 1, None), None),
        "training_sample_size": (Interval(int, 1, None), 100_000),
        "min_partition_size": (Interval(int, 0, None), 50),
        "training_iterations": (Interval(int, 1, MAX_TRAINING_ITERATIONS), 12),
        "spherical": (Bool(), False),
        # int8 (True, as ScaNN's FIXED_POINT_INT8 query tokenization) or bfloat16 copies
        # of the centroids score the leaves; the float32 centroids stay for the build.
        "quantize_centroids": (Quantize(), "float32"),
        "random_init": (Bool(), True),
        # Online incremental training (live index, mipscan._live): a leaf whose entries
        # changed by more than this share of its size since it was trained is retrained.
        "incremental_threshold": (Interval(float, 0.0, None, allow_none=True), None),
        # ScaNN's AVQ eta for the partitioner (_build.avq_centroids); None / NaN: off.
        "avq": (Interval(float, 1.0, None, allow_none=True, allow_nan=True), None),
        "soar_lambda": (Interval(float, 0.0, None, allow_none=True), None),
        # Slots kept per distinct row to reorder, with SOAR (None: 2, ScaNN's default).
        "overretrieve_factor": (Interval(float, 1.0, 1e6, allow_none=True), None),
        # Leaf order: q . c + spread_weight * |q| * (the leaf's RMS per-dimension residual);
        # 0: by q . c alone, as ScaNN; None: by metric (spread_weight_of; builder.tree).
        "spread_weight": (Interval(float, 0.0, MAX_SPREAD_WEIGHT, allow_none=True), None),
        # Leaf order by each leaf's top principal axes plus an isotropic rest instead of
        # the isotropic spread alone; None: DEFAULT_LEAF_AXES where cheap (resolve_leaf_axes).
        "leaf_axes": (Interval(int, 0, MAX_LEAF_AXES, allow_none=True), None),
    },
    "score_ah": {
        "dimensions_per_block": (Interval(int, 1, None), None),
        "anisotropic_quantization_threshold": (Interval(float, 0.0, None, allow_nan=True), 0.2),
        "training_sample_size": (Interval(int, 16, None), 100_000),
        # Accepted (and checked) for ScaNN code, which may pass it positionally; ScaNN
        # uses it to re-seed small codeword clusters. mipscan re-seeds empty codewords
        # only, so it has no effect here (documented in ScannBuilder.score_ah).
        "min_cluster_size": (Interval(int, 0, None, allow_none=True), 100),
        "hash_type": (Options(("lut16",)), "lut16"),
        "training_iterations": (Interval(int, 1, MAX_TRAINING_ITERATIONS), 10),
        # ScaNN 1.4 sets it itself when not given (True for dot_product with a tree);
        # mipscan always quantizes residuals, so only None / True are honoured.
        "residual_quantization": (Options((None, True)), None),
    },
    "autopilot": {
        "mode": (Options(("NONE", "ONLINE_INCREMENTAL")), "NONE"),
        "quantize": (Quantize(), "float32"),
    },
    "score_brute_force": {
        "quantize": (Quantize(), "float32"),
    },
    "reorder": {
        "reordering_num_neighbors": (Interval(int, 1, None), None),
        "quantize": (Quantize(), "float32"),
        # ScaNN's noise shaping of the int8 reorder copy; only NaN (off) is honoured.
        "anisotropic_quantization_threshold": (Interval(float, None, None, allow_nan=True), _NAN),
    },
    # ScaNN 1.4's projection stages and its second tree level: checked here; what build()
    # cannot honour is refused there (cross_rule_errors), naming the stage.
    "pca": {
        "reduction_dim": (Interval(int, 1, None, allow_none=True), None),
        "pca_significance_threshold": (Interval(float, 0.0, 1.0, allow_none=True), 0.8),
        "pca_truncation_threshold": (Interval(float, 0.0, 1.0, allow_none=True), 0.6),
    },
    "truncate": {
        "reduction_dim": (Interval(int, 1, None), None),
    },
    "upper_tree": {
        "num_leaves": (Interval(int, 1, None), None),
        "num_leaves_to_search": (Interval(int, 1, None), None),
        "avq": (Interval(float, 0.0, None, allow_none=True, allow_nan=True), _NAN),
        "soar_lambda": (Interval(float, 0.0, None, allow_none=True), None),
        "overretrieve_factor": (Interval(float, 1.0, 1e6, allow_none=True), None),
        "scoring_mode": (Quantize(), "int8"),
        "anisotropic_quantization_threshold": (Interval(float, None, None, allow_nan=True), _NAN),
    },
}

#: Arguments checked when passed but not stored in the configuration: accepted for ScaNN
#: code, equivalent to mipscan's only behaviour (residual_quantization: True or None).
CALL_ONLY: dict[str, tuple[str, ...]] = {"score_ah": ("residual_quantization",)}

#: Arguments ScaNN derives itself; a user passing them is told so.
INTERNAL = {"distance_measure", "projection", "upper_tree", "n_dims"}

#: Top-level keys of a stored configuration besides the stages.
CONFIG_KEYS = ("n", "d", "num_neighbors", "distance_measure", "seed", "build_seconds")
#: Optional top-level key of format version 2: the docid kind ("int" or "str").
DOCIDS_KEY = "docids"

#: Every array an index may hold: dtype, rank, and the stage that needs it (None: always).
ARRAYS: dict[str, tuple[Any, int, str | None]] = {
    "centroids": (np.float32, 2, None),
    "leaf_offsets": (np.int64, 1, None),
    "slot_ids": (np.uint32, 1, None),
    "codebooks": (np.float32, 3, "score_ah"),
    "packed_codes": (np.uint8, 1, "score_ah"),
    "leaf_groups": (np.int64, 1, "score_ah"),
    "slot_rows": (np.float32, 2, "score_brute_force"),
    "reorder_rows": (np.float32, 2, "reorder"),
    # Format version 2, an index built with docids (config["docids"] = "int" or "str"):
    # the docid of each row; strings as UTF-8 bytes cut by n + 1 offsets (no pickle).
    "docid_ints": (np.int64, 1, "docids=int"),
    "docid_utf8": (np.uint8, 1, "docids=str"),
    "docid_offsets": (np.int64, 1, "docids=str"),
    # Quantized copies (_core/reorder.h): int8 with per-dimension float32 scales, or
    # bfloat16 as uint16 bit patterns; each instead of its float32 counterpart.
    "reorder_int8": (np.int8, 2, "reorder"),
    "reorder_bf16": (np.uint16, 2, "reorder"),
    "reorder_scales": (np.float32, 1, "reorder"),
    "reorder_row_scales": (np.float32, 1, "reorder"),
    "slot_int8": (np.int8, 2, "score_brute_force"),
    "slot_bf16": (np.uint16, 2, "score_brute_force"),
    "slot_scales": (np.float32, 1, "score_brute_force"),
    "slot_row_scales": (np.float32, 1, "score_brute_force"),
    "centroids_int8": (np.int8, 2, "tree"),
    "centroids_bf16": (np.uint16, 2, "tree"),
    "centroid_scales": (np.float32, 1, "tree"),
    "centroid_row_scales": (np.float32, 1, "tree"),
    # tree(spread_weight > 0): each leaf's RMS per-dimension residual (the leaf order).
    "leaf_spread": (np.float32, 1, "tree"),
    # tree(leaf_axes > 0): each leaf's scaled principal axes (num_leaves, leaf_axes, width);
    # leaf_spread is then the RMS residual outside them.
    "leaf_axes": (np.float32, 3, "tree"),
    # upper_tree(): node centres and, per node, its children's range of leaves.
    "upper_centroids": (np.float32, 2, "upper_tree"),
    "upper_offsets": (np.int64, 1, "upper_tree"),
}

#: The arrays the search core reads (the docid arrays are the Python layer's).
CORE_ARRAYS = tuple(name for name in ARRAYS if not name.startswith("docid_"))

#: Arrays held only for one storage type: array -> (stage, argument, types).
ARRAY_QUANTIZE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "slot_rows": ("score_brute_force", "quantize", ("float32",)),
    "reorder_rows": ("reorder", "quantize", ("float32",)),
    "reorder_int8": ("reorder", "quantize", ("int8",)),
    "reorder_bf16": ("reorder", "quantize", ("bfloat16",)),
    "reorder_scales": ("reorder", "quantize", ("int8",)),
    "reorder_row_scales": ("reorder", "quantize", ("int8",)),
    "slot_int8": ("score_brute_force", "quantize", ("int8",)),
    "slot_bf16": ("score_brute_force", "quantize", ("bfloat16",)),
    "slot_scales": ("score_brute_force", "quantize", ("int8",)),
    "slot_row_scales": ("score_brute_force", "quantize", ("int8",)),
    "centroids_int8": ("tree", "quantize_centroids", ("int8",)),
    "centroids_bf16": ("tree", "quantize_centroids", ("bfloat16",)),
    "centroid_scales": ("tree", "quantize_centroids", ("int8",)),
    "centroid_row_scales": ("tree", "quantize_centroids", ("int8",)),
}

#: Row arrays of each quantized copy: name -> (float32 counterpart, storage type, scales).
QUANTIZED_ROWS = {
    "reorder_int8": ("reorder_rows", "int8", "reorder_scales"),
    "reorder_bf16": ("reorder_rows", "bfloat16", None),
    "slot_int8": ("slot_rows", "int8", "slot_scales"),
    "slot_bf16": ("slot_rows", "bfloat16", None),
    "centroids_int8": ("centroids", "int8", "centroid_scales"),
    "centroids_bf16": ("centroids", "bfloat16", None),
}


def quantize_type(value: Any) -> str:
    """A stored quantize value as "float32" / "int8" / "bfloat16" (folders written before
    quantized copies existed store False)."""
    return Quantize().normalize(value) or "float32"


def required_arrays(config: dict) -> set[str]:
    """The arrays an index built from ``config`` holds."""
    def needed(name, stage):
        if stage is None:
            return True
        if stage.startswith("docids="):
            return config.get(DOCIDS_KEY) == stage.split("=", 1)[1]
        if stage not in config:
            return False
        if name in ARRAY_QUANTIZE:
            st, arg, types = ARRAY_QUANTIZE[name]
            return quantize_type(config[st][arg]) in types
        if name == "leaf_spread":
            return spread_weight_of(config) > 0
        if name == "leaf_axes":
            return leaf_axes_of(config) > 0
        return True
    return {name for name, (_, _, stage) in ARRAYS.items() if needed(name, stage)}


def check_stage_args(call: str, stage: str, args: tuple, kwargs: dict) -> dict:
    """Binds a stage's positional and keyword arguments to its table, checks each, and
    returns the full argument dict (defaults filled in)."""
    table = STAGES[stage]
    names = list(table)
    if len(args) > len(names):
        raise TypeError(f"{call}: takes at most {len(names)} positional arguments; got {len(args)}")
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in given:
            raise TypeError(f"{call}: got multiple values for argument {key!r}")
        if key in INTERNAL:
            raise TypeError(f"{call}: {key} is set automatically by mipscan; do not pass it")
        if key not in table:
            raise TypeError(f"{call}: unexpected argument {key!r}; allowed: {', '.join(names)}")
        given[key] = value
    out = {}
    for name, (rule, default) in table.items():
        if name not in given:
            if default is None and not (isinstance(rule, Options) or getattr(rule, "allow_none", False)):
                raise TypeError(f"{call}: missing required argument {name!r}")
            out[name] = default
            continue
        value = given[name]
        if isinstance(rule, Options) and value not in rule.values and len(rule.values) <= 2 \
                and rule.values[0] in (None, False):
            raise ValueError(f"{call}: {name}={value!r} is not supported by mipscan yet; "
                             f"allowed: {rule.describe()}")
        out[name] = check_value(call, name, value, rule)
    return out


def ah_num_blocks(width: int, dimensions_per_block: int) -> int:
    """AH blocks covering a MIPS-space width (squared_l2 adds one column)."""
    return math.ceil(width / dimensions_per_block)


def mips_width(d: int, distance_measure: str) -> int:
    """Width of the rows the core searches: squared_l2 appends -|x|^2/2."""
    return d + 1 if distance_measure == "squared_l2" else d


def cross_rule_errors(config: dict, bounded_by_n: bool = True) -> list[tuple[str, str]]:
    """The cross-argument rules of a configuration, as (field, message) pairs for the
    rules it breaks: field is ``stage.argument`` (or ``stages``), message says what is
    allowed and what it got. Used by the builder (``build()``) and the loader."""
    n, d = config["n"], config["d"]
    errors = []
    has_ah, has_bf = "score_ah" in config, "score_brute_force" in config
    if has_ah == has_bf:
        errors.append(("stages", "exactly one of score_ah() or score_brute_force() must be "
                                 f"called; got {'both' if has_ah else 'neither'}"))
    tree, ah, reorder = config.get("tree"), config.get("score_ah"), config.get("reorder")
    if tree is not None:
        if bounded_by_n and tree["num_leaves"] > n:
            errors.append(("tree.num_leaves",
                           f"must be an int in [1, n={n}]; got {tree['num_leaves']}"))
        if tree["num_leaves_to_search"] > tree["num_leaves"]:
            errors.append(("tree.num_leaves_to_search",
                           f"must be an int in [1, num_leaves={tree['num_leaves']}]; "
                           f"got {tree['num_leaves_to_search']}"))
    if ah is not None:
        dpb = ah["dimensions_per_block"]
        if dpb > d:
            errors.append(("score_ah.dimensions_per_block",
                           f"must be an int in [1, d={d}]; got {dpb}"))
        blocks = ah_num_blocks(mips_width(d, config["distance_measure"]), dpb)
        if blocks > MAX_AH_BLOCKS:
            errors.append(("score_ah.dimensions_per_block",
                           f"gives {blocks} blocks for d={d} ({config['distance_measure']}); at "
                           f"most {MAX_AH_BLOCKS} blocks are supported (uint16 sums), so use "
                           f"dimensions_per_block >= "
                           f"{math.ceil(mips_width(d, config['distance_measure']) / MAX_AH_BLOCKS)}"))
    if bounded_by_n and reorder is not None and reorder["reordering_num_neighbors"] > n:
        errors.append(("reorder.reordering_num_neighbors",
                       f"must be an int in [1, n={n}]; got {reorder['reordering_num_neighbors']}"))
    errors += _scann_surface_errors(config)
    tree, auto = config.get("tree"), config.get("autopilot")
    incremental = (tree is not None and tree.get("incremental_threshold") is not None) or (
        auto is not None and auto["mode"] == "ONLINE_INCREMENTAL")
    why = static_only(config) if incremental else None
    if auto is not None and auto["mode"] == "ONLINE_INCREMENTAL" \
            and quantize_type(auto["quantize"]) != "float32":
        why = (f"autopilot(quantize={auto['quantize']!r}) keeps a quantized copy, and "
               "ONLINE_INCREMENTAL needs float32 storage")
    if why is not None:
        errors.append(("stages", f"online incremental training needs an index that can take "
                                 f"updates: {why}"))
    return errors


def static_only(config: dict) -> str | None:
    """Why an index of this config cannot take updates (upsert, delete, online training),
    or None. The live layout keeps float32 rows and one flat level of leaves, so
    quantized copies and upper trees stay static for now."""
    for stage, arg in (("reorder", "quantize"), ("score_brute_force", "quantize"),
                       ("tree", "quantize_centroids")):
        if stage in config and quantize_type(config[stage][arg]) != "float32":
            return (f"{stage}({arg}={config[stage][arg]!r}) keeps a quantized copy, and "
                    "updates need float32 storage (build with float32 to update)")
    if "upper_tree" in config:
        return "an upper_tree() index does not take updates yet (rebuild it instead)"
    return None


def _is_set(value) -> bool:
    """A float argument whose 'off' value is None or NaN (JSON stores NaN as null)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _scann_surface_errors(config: dict) -> list[tuple[str, str]]:
    """ScaNN 1.4 arguments that are accepted and checked but cannot be honoured (yet):
    each refused by name rather than ignored."""
    errors = []
    tree, reorder = config.get("tree"), config.get("reorder")
    if tree is not None and _is_set(tree.get("avq")) and config["distance_measure"] == "squared_l2":
        errors.append(("tree.avq", f"is {tree['avq']!r}: AVQ centroids apply to inner-product "
                                   "search (dot_product, cosine), as in ScaNN; pass avq=None"))
    if (reorder is not None and quantize_type(reorder["quantize"]) == "int8"
            and _is_set(reorder["anisotropic_quantization_threshold"])):
        errors.append(("reorder.anisotropic_quantization_threshold",
                       f"is {reorder['anisotropic_quantization_threshold']!r}: noise-shaped int8 "
                       "reorder data is not supported by mipscan yet; pass NaN (plain per-"
                       "dimension int8)"))
    for stage in ("pca", "truncate"):
        if stage in config:
            errors.append(("stages", f"{stage}() projections are not supported by mipscan yet; "
                                  "project the data (and queries) before builder()"))
    upper = config.get("upper_tree")
    if upper is not None:
        if tree is None:
            errors.append(("stages", "upper_tree() needs tree(), as in ScaNN"))
        elif upper["num_leaves"] > tree["num_leaves"]:
            errors.append(("upper_tree.num_leaves", f"must be an int in [1, tree num_leaves="
                                                    f"{tree['num_leaves']}]; got {upper['num_leaves']}"))
        if upper["num_leaves_to_search"] > upper["num_leaves"]:
            errors.append(("upper_tree.num_leaves_to_search",
                           f"must be an int in [1, num_leaves={upper['num_leaves']}]; "
                           f"got {upper['num_leaves_to_search']}"))
        for name in ("soar_lambda", "avq", "anisotropic_quantization_threshold"):
            if _is_set(upper[name]):
                errors.append((f"upper_tree.{name}", f"is {upper[name]!r}: not supported by "
                                                     "mipscan's upper tree yet; leave it unset"))
    return errors


def check_stored_config(config: dict, bad: Callable[[str, str], Exception],
                        version: int = 1) -> dict:
    """Re-validates a stored configuration with the builder's own tables and rules;
    ``bad(field, why)`` makes the exception to raise (the loader names the file).
    Version 2 (a live index, compacted on write) may hold fewer points than its
    num_neighbors, num_leaves or reorder depth (deletes shrink it)."""
    call = "load_searcher()"

    def field(name, rule):
        if name not in config:
            raise bad(f"config.{name}", "missing")
        try:
            return check_value(call, f"config.{name}", config[name], rule)
        except (TypeError, ValueError) as exc:
            raise bad(f"config.{name}", str(exc)) from None

    n = field("n", Interval(int, 1, None))
    field("d", Interval(int, 1, None))
    field("num_neighbors", Interval(int, 1, n if version < 2 else None))
    if DOCIDS_KEY in config:
        if version < 2:
            raise bad(f"config.{DOCIDS_KEY}", "docids need format version 2")
        field(DOCIDS_KEY, Options(("int", "str")))
    elif version >= 2:
        raise bad("format_version", f"{version} is written for an index with docids, but "
                                    f"config.{DOCIDS_KEY} is missing")
    field("distance_measure", Options(DISTANCE_MEASURES))
    field("seed", Interval(int, 0, None))
    seconds = field("build_seconds", Interval(float, 0.0, None))
    if not math.isfinite(seconds):
        raise bad("config.build_seconds", f"must be a finite number >= 0; got {seconds!r}")
    unknown = set(config) - set(STAGES) - set(CONFIG_KEYS) - {DOCIDS_KEY}
    if unknown:
        raise bad("config", f"unknown keys {sorted(unknown)}")
    for stage, table in STAGES.items():
        if stage not in config:
            continue
        params = config[stage]
        stored = {name: entry for name, entry in table.items()
                  if name not in CALL_ONLY.get(stage, ())}
        if isinstance(params, dict):
            for (st, name), value in ADDED_LATER.items():
                if st == stage and name not in params:
                    params[name] = value
        if not isinstance(params, dict) or set(params) != set(stored):
            raise bad(f"config.{stage}", f"expected keys {sorted(stored)}")
        for name, (rule, _default) in stored.items():
            if name == "anisotropic_quantization_threshold" and params[name] is None:
                continue  # JSON has no NaN: NaN is stored as null
            try:
                value = check_value(call, f"config.{stage}.{name}", params[name], rule)
                if isinstance(rule, Quantize):
                    params[name] = value  # normalised (older folders store False)
            except (TypeError, ValueError) as exc:
                raise bad(f"config.{stage}.{name}", str(exc)) from None
    for where, message in cross_rule_errors(config, bounded_by_n=version < 2):
        raise bad(f"config.{where}" if where != "stages" else "config", message)
    return config


# ---------------------------------------------------------------- stored array values
# What the loader checks beyond dtype, shape and checksum (a folder whose checksums were
# recomputed after an edit passes those): that every value is one the builder can write.
# The C++ view re-checks the structural invariants that protect memory
# (``_core/bindings.cpp``, ``Index``); these rules add the ones that protect values (the
# kernels assume finite floats whose products and sums stay finite in float32) and name
# the file and field of the first bad value.

#: Relative slack over the builder's bounds: centroids and codewords are float32 means,
#: which may round one ulp past their inputs. The bounds keep 16x headroom to FLT_MAX.
_VALUE_SLACK = 1.001

#: Points per packed group of the LUT16 layout (``_core/lut16.h``, kGroup).
LUT16_GROUP = 64

#: Arrays whose values are float rows of the MIPS space: (rows, width) or, for
#: codebooks, (num_blocks, 16, dims_per_block) residual codewords.
FLOAT_ARRAYS = ("centroids", "slot_rows", "reorder_rows", "codebooks", "upper_centroids")


def float_value_bounds(name: str, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(low, high)`` bounds (float64, shape ``(width,)``; for ``codebooks``
    ``(num_blocks * dims_per_block,)``, block-major) that every value of the float array
    ``name`` of an index built from ``config`` lies within.

    * Rows (centroids, slot_rows, reorder_rows): the builder accepts database values of
      magnitude at most ``max_abs_value(d)`` (``_validation``); centroids are their means.
      squared_l2 appends ``-|x|^2 / 2``, which lies in ``[-d * max_abs_value(d)^2 / 2, 0]``.
    * Codebooks: codewords are means of residuals (row - centroid), so twice those bounds,
      symmetric; the padding columns past the MIPS width are zero when built.
    """
    d, metric = int(config["d"]), config["distance_measure"]
    width = mips_width(d, metric)
    m = max_abs_value(d) * _VALUE_SLACK
    # -|x|^2/2 of a row within the bound: at most FLT_MAX / 32; allow twice (float32 sums).
    aug = float(np.finfo(np.float32).max) / 16.0
    if name == "codebooks":
        dpb = config["score_ah"]["dimensions_per_block"]
        cols = ah_num_blocks(width, dpb) * dpb
        high = np.full(cols, 2.0 * m)
        if metric == "squared_l2":
            high[d] = aug
        return -high, high
    if name not in FLOAT_ARRAYS:
        raise KeyError(name)
    low, high = np.full(width, -m), np.full(width, m)
    if metric == "squared_l2":
        low[d], high[d] = -aug, 0.0
    return low, high


def array_value_errors(config: dict, arrays: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """The value rules of the integer arrays, given arrays whose dtypes and ranks match
    ``ARRAYS``: ``(field, why)`` pairs for the first rules broken, in check order (empty if
    none). Cross-array sizes come first, so that the value checks may index freely.

    leaf_offsets: ``num_leaves + 1`` entries from 0 to the slot count, non-decreasing.
    slot_ids: each a row in ``[0, n)``, each row in one or two slots (two with SOAR).
    leaf_groups: from 0, each leaf's groups ``ceil(leaf size / 64)``; packed_codes holds
    exactly that many groups of ``num_blocks * 32`` bytes (any byte value is a valid code pair).
    """
    n, d, metric = int(config["n"]), int(config["d"]), config["distance_measure"]
    width = mips_width(d, metric)
    centroids, offsets, slots = arrays["centroids"], arrays["leaf_offsets"], arrays["slot_ids"]
    leaves, num_slots = centroids.shape[0], slots.shape[0]
    if leaves < 1:
        return [("arrays.centroids.shape", f"must hold at least one leaf; got {centroids.shape}")]
    if offsets.shape[0] != leaves + 1:
        return [("arrays.leaf_offsets.shape", f"must have num_leaves + 1 = {leaves + 1} entries "
                                              f"(arrays.centroids holds {leaves} leaves); "
                                              f"got {offsets.shape[0]}")]
    for name in ("slot_rows", "reorder_rows"):
        if name in arrays:
            want = (num_slots if name == "slot_rows" else n, width)
            if arrays[name].shape != want:
                basis = (f"arrays.slot_ids holds {num_slots} slots" if name == "slot_rows"
                         else f"config.n is {n}")
                return [(f"arrays.{name}.shape", f"must be {want} ({basis}; width {width} for "
                                                 f"config.d={d}, {metric}); got {arrays[name].shape}")]
    if offsets[0] != 0 or offsets[-1] != num_slots:
        return [("arrays.leaf_offsets", f"must run from 0 to the slot count {num_slots} "
                                        f"(arrays.slot_ids); got "
                                        f"{int(offsets[0])} .. {int(offsets[-1])}")]
    steps = np.diff(offsets)
    if steps.size and steps.min() < 0:
        at = int(np.argmax(steps < 0))
        return [("arrays.leaf_offsets", f"must not decrease; entry {at + 1} is "
                                        f"{int(offsets[at + 1])} after {int(offsets[at])}")]
    if num_slots:
        top = int(slots.max())
        if top >= n:
            at = int(np.argmax(slots >= n))
            return [("arrays.slot_ids", f"value {int(slots[at])} at ({at},) is out of range "
                                        f"[0, n={n})")]
        times = np.bincount(slots, minlength=n)
        if times.max() > 2:
            row = int(np.argmax(times > 2))
            return [("arrays.slot_ids", f"row {row} is in {int(times[row])} slots; at most 2")]
        if times.min() < 1:
            row = int(np.argmin(times))
            return [("arrays.slot_ids", f"row {row} is in no slot; every row must be in one")]
    else:
        return [("arrays.slot_ids.shape", f"must hold n={n} to 2n slots; got none")]
    if "score_ah" in config:
        groups, packed, books = arrays["leaf_groups"], arrays["packed_codes"], arrays["codebooks"]
        dpb = config["score_ah"]["dimensions_per_block"]
        blocks = ah_num_blocks(width, dpb)
        if books.shape != (blocks, 16, dpb):
            return [("arrays.codebooks.shape", f"must be {(blocks, 16, dpb)} for d={d} "
                                               f"({metric}); got {books.shape}")]
        if groups.shape[0] != leaves + 1:
            return [("arrays.leaf_groups.shape", f"must have num_leaves + 1 = {leaves + 1} "
                                                 f"entries (arrays.centroids holds {leaves} "
                                                 f"leaves); got {groups.shape[0]}")]
        want = np.concatenate([[0], np.cumsum((steps + LUT16_GROUP - 1) // LUT16_GROUP)])
        if not np.array_equal(groups, want):
            at = int(np.argmax(groups != want))
            return [("arrays.leaf_groups", f"entry {at} is {int(groups[at])}; the leaf sizes "
                                           f"in leaf_offsets give {int(want[at])}")]
        if packed.shape[0] != int(want[-1]) * blocks * 32:
            return [("arrays.packed_codes.shape", f"must hold {int(want[-1])} groups of "
                                                  f"{blocks * 32} bytes (arrays.leaf_groups, "
                                                  f"arrays.codebooks); got {packed.shape[0]} bytes")]
    if "leaf_spread" in arrays:
        spread = arrays["leaf_spread"]
        if spread.shape != (leaves,):
            return [("arrays.leaf_spread.shape", f"must be ({leaves},) (arrays.centroids holds "
                                                 f"{leaves} leaves); got {spread.shape}")]
        bad = ~(np.isfinite(spread) & (spread >= 0))
        if bad.any():
            at = int(np.argmax(bad))
            return [("arrays.leaf_spread", f"value {float(spread[at])!r} at ({at},) must be a "
                                           f"finite number >= 0")]
    if "leaf_axes" in arrays:
        axes, r = arrays["leaf_axes"], leaf_axes_of(config)
        if axes.shape != (leaves, r, width):
            return [("arrays.leaf_axes.shape", f"must be ({leaves}, {r}, {width}) (num_leaves, "
                                               f"config.tree.leaf_axes, width); got {axes.shape}")]
        bad = ~np.isfinite(axes)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            return [("arrays.leaf_axes", f"value {float(axes[at])!r} at {at} must be finite")]
    if "upper_tree" in config:
        uo, uc = arrays["upper_offsets"], arrays["upper_centroids"]
        if uo.shape[0] < 2 or uc.shape != (uo.shape[0] - 1, width):
            return [("arrays.upper_centroids.shape", f"must be (num_upper, {width}) with "
                                                     f"num_upper = len(upper_offsets) - 1 >= 1; got "
                                                     f"{uc.shape} and {uo.shape[0]} offsets")]
        if uo[0] != 0 or uo[-1] != leaves or (np.diff(uo) <= 0).any():
            return [("arrays.upper_offsets", f"must increase from 0 to num_leaves={leaves}; got "
                                             f"{uo[:8].tolist()}{'...' if len(uo) > 8 else ''}")]
    return (quantized_array_errors(config, arrays, num_slots, leaves)
            or docid_errors(config, arrays))


#: bfloat16 rounds to 8 significant bits: a value may land 2^-8 (relative) past its input.
_BF16_SLACK = 1.0 + 2.0 ** -8
_VALUE_CHUNK = 1 << 16  # rows per pass when decoding bfloat16 (bounds temporary memory)


def quantized_array_errors(config: dict, arrays: dict[str, np.ndarray], num_slots: int,
                           leaves: int) -> list[tuple[str, str]]:
    """Shapes and values of the quantized copies (``QUANTIZED_ROWS``): each ``(rows,
    width)`` like its float32 counterpart; int8 values in [-127, 127] with ``width``
    finite scales > 0 whose ``127 * scale`` stays within the counterpart's bounds;
    bfloat16 values finite and within those bounds (plus bfloat16's rounding)."""
    n, d, metric = int(config["n"]), int(config["d"]), config["distance_measure"]
    width = mips_width(d, metric)
    for name, (counterpart, kind, scales_name) in QUANTIZED_ROWS.items():
        if name not in arrays:
            continue
        a = arrays[name]
        rows = {"reorder_rows": n, "slot_rows": num_slots, "centroids": leaves}[counterpart]
        if a.shape != (rows, width):
            return [(f"arrays.{name}.shape", f"must be {(rows, width)} (like {counterpart}; width "
                                             f"{width} for config.d={d}, {metric}); got {a.shape}")]
        low, high = float_value_bounds(counterpart, config)
        bound = np.maximum(np.abs(low), np.abs(high))
        if kind == "int8":
            if a.size and int(a.min()) < -127:
                at = tuple(int(i) for i in np.argwhere(a < -127)[0])
                return [(f"arrays.{name}", f"value -128 at {at}; int8 codes are in [-127, 127]")]
            sc = arrays[scales_name]
            if sc.shape != (width,):
                return [(f"arrays.{scales_name}.shape", f"must be ({width},) (one scale per "
                                                        f"column of {name}); got {sc.shape}")]
            ok = np.isfinite(sc) & (sc > 0) & (sc.astype(np.float64) * 127.0 <= bound * _VALUE_SLACK)
            if not ok.all():
                j = int(np.argmin(ok))
                return [(f"arrays.{scales_name}", f"value {float(sc[j])!r} at ({j},) must be finite, "
                                                  f"> 0 and at most {bound[j] * _VALUE_SLACK / 127:.6g} "
                                                  "(127 * scale within the data's bounds)")]
            row_name = scales_name.replace("_scales", "_row_scales")
            rs = arrays[row_name]
            if rs.shape != (rows,):
                return [(f"arrays.{row_name}.shape", f"must be ({rows},) (one scale per row of "
                                                     f"{name}); got {rs.shape}")]
            ok = (rs > 0) & (rs <= 1)  # False for NaN
            if not ok.all():
                i = int(np.argmin(ok))
                return [(f"arrays.{row_name}", f"value {float(rs[i])!r} at ({i},) must be in (0, 1]")]
        else:
            for r0 in range(0, rows, _VALUE_CHUNK):
                x = (a[r0:r0 + _VALUE_CHUNK].astype(np.uint32) << 16).view(np.float32)
                ok = np.isfinite(x) & (np.abs(x) <= bound * _BF16_SLACK)
                if not ok.all():
                    r, c = (int(i) for i in np.argwhere(~ok)[0])
                    return [(f"arrays.{name}", f"value {float(x[r, c])!r} at ({r0 + r}, {c}) must be "
                                               f"finite with magnitude at most "
                                               f"{bound[c] * _BF16_SLACK:.6g}")]
    return []


def docid_errors(config: dict, arrays: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """The docid arrays' rules: one docid per row (n), all distinct; string docids are
    valid UTF-8, cut by offsets from 0 to the byte count, non-decreasing."""
    n = int(config["n"])
    if "docid_ints" in arrays:
        ints = arrays["docid_ints"]
        if ints.shape[0] != n:
            return [("arrays.docid_ints.shape", f"must hold n={n} docids; got {ints.shape[0]}")]
        if len(np.unique(ints)) != n:
            u, c = np.unique(ints, return_counts=True)
            return [("arrays.docid_ints", f"docid {int(u[np.argmax(c > 1)])} is repeated; "
                                          "docids must be unique")]
    if "docid_offsets" in arrays:
        off, data = arrays["docid_offsets"], arrays["docid_utf8"]
        if off.shape[0] != n + 1:
            return [("arrays.docid_offsets.shape", f"must have n + 1 = {n + 1} entries; "
                                                   f"got {off.shape[0]}")]
        if off[0] != 0 or off[-1] != data.shape[0] or (n and np.diff(off).min() < 0):
            return [("arrays.docid_offsets", f"must run from 0 to the byte count "
                                             f"{data.shape[0]} of arrays.docid_utf8 without "
                                             "decreasing")]
        raw = bytes(np.asarray(data))
        try:
            strings = [raw[a:b].decode("utf-8") for a, b in zip(off[:-1].tolist(), off[1:].tolist())]
        except UnicodeDecodeError as exc:
            return [("arrays.docid_utf8", f"not valid UTF-8: {exc}")]
        if len(set(strings)) != n:
            seen = set()
            dup = next(v for v in strings if v in seen or seen.add(v))
            return [("arrays.docid_utf8", f"docid {dup!r} is repeated; docids must be unique")]
    return []


def docids_to_arrays(docids: list) -> tuple[str, dict[str, np.ndarray]]:
    """(kind, arrays) storing a docid list (ints or strings) in the version-2 arrays."""
    if docids and isinstance(docids[0], str):
        enc = [v.encode("utf-8") for v in docids]
        off = np.concatenate([[0], np.cumsum([len(b) for b in enc])]).astype(np.int64)
        return "str", {"docid_utf8": np.frombuffer(b"".join(enc), np.uint8).copy(),
                       "docid_offsets": off}
    return "int", {"docid_ints": np.asarray(docids, np.int64)}


def docids_from_arrays(arrays: dict[str, np.ndarray]) -> list | None:
    """The docid list of arrays read from a folder (removes the docid arrays), or None."""
    if "docid_ints" in arrays:
        return arrays.pop("docid_ints").tolist()
    if "docid_offsets" in arrays:
        off, data = arrays.pop("docid_offsets").tolist(), bytes(np.asarray(arrays.pop("docid_utf8")))
        return [data[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:])]
    return None
