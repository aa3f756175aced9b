"""ScaNN's ``scann_builder`` module: its enums, so ``from mipscan import scann_builder``
works as ScaNN's ``from scann.scann_ops.py import scann_builder`` does.

``scann_builder.IncrementalMode.ONLINE_INCREMENTAL`` goes to ``autopilot(mode=...)``;
``ReorderType`` to ``autopilot(quantize=...)`` (only FLOAT32 is accepted there for now).
"""

import enum

from mipscan.builder import ScannBuilder, builder


class ReorderType(enum.Enum):
    FLOAT32 = 1
    INT8 = 2
    BFLOAT16 = 3


class IncrementalMode(enum.Enum):
    NONE = 1
    ONLINE = 2
    ONLINE_INCREMENTAL = 3


__all__ = ["IncrementalMode", "ReorderType", "ScannBuilder", "builder"]
