"""One auto-configuration policy: what ``autopilot()``, the Keras layer and the CLI build
when the user does not choose the knobs themselves.

Measured on the Keras-RS tutorial's candidates (270,882 x 32, dot product, 943 users)
and on GloVe-50 (90,000 x 50, inner product, 1,000 queries), recall@10 against exact
search; see ``suggest_config`` for the figures behind each rule.
"""

from __future__ import annotations

import math

from mipscan._validation import DISTANCE_MEASURES, Interval, Options, check_value

#: Below this many datapoints the index scores every point exactly (score_brute_force
#: without a tree): at most 10,000 dot products per query, and no recall lost.
BRUTE_FORCE_BELOW = 10_000
#: (target recall@10, share of the leaves searched, reorder depth at k = 10), from a sweep
#: of round(sqrt(n)) leaves, AH with 2 dimensions per block (threshold 0.2), measured on
#: GloVe-50 (90,000 x 50, inner product, 1,000 queries) and on the Keras-RS tutorial's
#: candidates (270,882 x 32, dot product, 943 users), 2026-11-30. Recall@10 there:
#:   0.10 of the leaves, reorder  250: GloVe 0.906, tutorial 0.919
#:   0.15 of the leaves, reorder  250: GloVe 0.925, tutorial 0.943
#:   0.25 of the leaves, reorder  500: GloVe 0.956, tutorial 0.978
#:   0.33 of the leaves, reorder 1000: GloVe 0.971, tutorial 0.990
#:   0.50 of the leaves, reorder 1000: GloVe 0.982, tutorial 0.996
#:   0.75 of the leaves, reorder 2000: GloVe 0.993, tutorial 0.999
#:   all the leaves,     reorder 3000: GloVe 0.9921 (the benchmark's queries, below)
#:   all the leaves,     reorder 5000: GloVe 0.9995, tutorial 0.9999
#: (0.50 / 3000 gave GloVe 0.988; 0.75 / 1000 0.987.) Each row is the cheapest of the
#: sweep that reaches its target on both sets. GloVe above: its first 1,000 test queries;
#: the benchmark's 1,000 (a seeded random subset of all 10,000, benchmarks/run.py) are
#: harder, recall@10 there: 0.25 / 500 0.899, 0.75 / 2000 0.982, 0.75 / 4000 0.990,
#: 0.75 / 5000 0.991, all / 3000 0.9921, all / 5000 0.9953. So the 0.99 row is all the
#: leaves and 3000 (0.75 / 2000 missed 0.99 there; issue 18).
RECALL_TABLE = ((0.90, 0.10, 250), (0.92, 0.15, 250), (0.95, 0.25, 500), (0.97, 0.33, 1000),
                (0.98, 0.50, 1000), (0.99, 1.0, 3000), (0.999, 1.0, 5000))
#: The same for AH with one dimension per 4-bit code, the choice for d <= AH1_MAX_D: twice
#: the codes (d / 2 bytes a point) score finely enough that a shallow reorder does, which
#: costs less than the deep one two dimensions per code need. Measured 2026-12-01, one
#: thread, single queries: GloVe 99 leaves / reorder 150 at 19.8k queries/s (recall 0.953)
#: against 150 / 500 at 15.5k (0.953) with two, 60 / 100 at 29.3k (0.913) against 75 / 500
#: at 21.5k (0.922); tutorial candidates 104 / 100 at 17.0k (0.977) against 130 / 500 at
#: 14.1k (0.979). Sweep of round(sqrt(n)) leaves on the
#: benchmark's 1,000 GloVe queries (the harder subset above) and the tutorial's
#: candidates (520 leaves); recall@10 there:
#:   0.20 of the leaves, reorder  100: GloVe 0.914, tutorial 0.977
#:   0.25 of the leaves, reorder  100: GloVe 0.933, tutorial 0.984
#:   0.33 of the leaves, reorder  150: GloVe 0.955, tutorial 0.993
#:   0.40 of the leaves, reorder  250: GloVe 0.971, tutorial 0.997
#:   0.50 of the leaves, reorder  500: GloVe 0.983, tutorial 0.999
#:   0.75 of the leaves, reorder  500: GloVe 0.994, tutorial 0.9999
#:   all the leaves,     reorder 2000: GloVe 0.9996, tutorial 1.0
#: (0.33 / 100 gave GloVe 0.951, 0.50 / 250 0.980, all / 500 0.997.)
RECALL_TABLE_AH1 = ((0.90, 0.20, 100), (0.92, 0.25, 100), (0.95, 0.33, 150), (0.97, 0.40, 250),
                    (0.98, 0.50, 500), (0.99, 0.75, 500), (0.999, 1.0, 2000))
#: Widest data given one dimension per code (measured at d = 32 and 50); wider data keeps
#: two, and RECALL_TABLE, as codes and scans grow with d.
AH1_MAX_D = 64
#: What suggest_config aims at when not told: the Keras layer's earlier default target.
DEFAULT_TARGET_RECALL = 0.95


def suggest_config(n: int, d: int, k: int = 10, distance_measure: str = "dot_product",
                   target_recall: float = DEFAULT_TARGET_RECALL) -> dict:
    """The configuration mipscan picks for ``n`` points of ``d`` dimensions.

    Returns a dict of builder stages to their arguments, applied in order, e.g.
    ``{"tree": {"num_leaves": 520, "num_leaves_to_search": 172}, "score_ah": {...},
    "reorder": {...}}`` or ``{"score_brute_force": {}}``::

        b = mipscan.builder(db, 10, "dot_product")
        for stage, kwargs in mipscan.suggest_config(*db.shape, k=10).items():
            b = getattr(b, stage)(**kwargs)

    The rules:

    - n < 10,000: exact scoring (``score_brute_force``).
    - otherwise: a tree of round(sqrt(n)) leaves, AH (threshold 0.2) and a reorder; the
      share of leaves searched and the reorder depth (scaled by k / 10) are the cheapest
      that reached ``target_recall`` on both GloVe-50 and the Keras-RS tutorial's
      candidates.
    - d <= 64: one dimension per 4-bit code (``RECALL_TABLE_AH1``): for the default
      0.95, a third of the leaves and 150 candidates (recall@10 0.955 on the benchmark's
      GloVe queries, 0.993 on the tutorial's); for 0.99, three quarters and 500 (0.994
      and 0.9999).
    - d > 64: two dimensions per code (``RECALL_TABLE``): for 0.95, a quarter of the
      leaves and 500 candidates; for 0.99, every leaf and 3,000.
    - Targets above 0.999 get the 0.999 row; data unlike those two sets may need more
      (measure with ``mipscan.brute_force``).

    Args:
        n: datapoints, an int >= 1. d: dimensions, an int >= 1.
        k: neighbours per query, an int in [1, n].
        distance_measure: ``"dot_product"``, ``"squared_l2"`` or ``"cosine"``.
        target_recall: recall@10 aimed at, a number in (0, 1].

    Raises:
        TypeError, ValueError: an argument out of its range (the message names it).
    """
    call = "suggest_config()"
    n = check_value(call, "n", n, Interval(int, 1, None))
    d = check_value(call, "d", d, Interval(int, 1, None))
    k = check_value(call, "k", k, Interval(int, 1, n))
    check_value(call, "distance_measure", distance_measure, Options(DISTANCE_MEASURES))
    target = check_value(call, "target_recall", target_recall, Interval(float, 0.0, 1.0))
    if target <= 0.0:
        raise ValueError(f"{call}: target_recall must be a number in (0.0, 1.0]; got {target_recall!r}")
    if n < BRUTE_FORCE_BELOW:
        return {"score_brute_force": {}}
    dims = 1 if d <= AH1_MAX_D else 2
    table = RECALL_TABLE_AH1 if dims == 1 else RECALL_TABLE
    share, depth = next(((s, r) for t, s, r in table if target <= t), table[-1][1:])
    leaves = int(round(math.sqrt(n)))
    return {"tree": {"num_leaves": leaves,
                     "num_leaves_to_search": max(1, math.ceil(share * leaves))},
            "score_ah": {"dimensions_per_block": dims,
                         "anisotropic_quantization_threshold": 0.2},
            "reorder": {"reordering_num_neighbors": min(n, max(depth, depth * k // 10))}}
