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
#: without a tree): a scan of 10,000 rows costs about as much as a tree's centroid pass
#: plus its reorder, and it is exact.
BRUTE_FORCE_BELOW = 10_000
#: Share of the leaves searched, for recall@10 >= 0.95 (see suggest_config).
LEAVES_SEARCHED = 0.15
#: Reorder depth: max(REORDER_MIN, REORDER_PER_NEIGHBOR * k) candidates.
REORDER_MIN = 250
REORDER_PER_NEIGHBOR = 25


def suggest_config(n: int, d: int, k: int = 10, distance_measure: str = "dot_product") -> dict:
    """The configuration mipscan picks for ``n`` points of ``d`` dimensions.

    Returns a dict of builder stages to their arguments, applied in order, e.g.
    ``{"tree": {"num_leaves": 520, "num_leaves_to_search": 78}, "score_ah": {...},
    "reorder": {...}}`` or ``{"score_brute_force": {}}``::

        b = mipscan.builder(db, 10, "dot_product")
        for stage, kwargs in mipscan.suggest_config(*db.shape, k=10).items():
            b = getattr(b, stage)(**kwargs)

    The rules:

    - n < 10,000: exact scoring (``score_brute_force``).
    - otherwise: a tree of round(sqrt(n)) leaves searching 15% of them, AH with 2
      dimensions per block (threshold 0.2) and a reorder of max(250, 25 k)
      candidates. Recall@10 at these rules: 0.94 on the tutorial candidates and 0.93 on
      GloVe-50 (measured when the rule was chosen for ``autopilot()``).

    Args:
        n: datapoints, an int >= 1. d: dimensions, an int >= 1.
        k: neighbours per query, an int in [1, n].
        distance_measure: ``"dot_product"``, ``"squared_l2"`` or ``"cosine"``.

    Raises:
        TypeError, ValueError: an argument out of its range (the message names it).
    """
    call = "suggest_config()"
    n = check_value(call, "n", n, Interval(int, 1, None))
    d = check_value(call, "d", d, Interval(int, 1, None))
    k = check_value(call, "k", k, Interval(int, 1, n))
    check_value(call, "distance_measure", distance_measure, Options(DISTANCE_MEASURES))
    if n < BRUTE_FORCE_BELOW:
        return {"score_brute_force": {}}
    leaves = int(round(math.sqrt(n)))
    config: dict = {"tree": {"num_leaves": leaves,
                             "num_leaves_to_search": max(1, math.ceil(LEAVES_SEARCHED * leaves))}}
    config["score_ah"] = {"dimensions_per_block": min(2, d),
                          "anisotropic_quantization_threshold": 0.2}
    config["reorder"] = {"reordering_num_neighbors":
                         min(n, max(REORDER_MIN, REORDER_PER_NEIGHBOR * k))}
    return config
