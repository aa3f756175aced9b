"""Every argument check of the public API and every message, in one place.

Checks run at the Python boundary, before any C++ runs. Each message names the call,
the argument, the value and what is allowed, e.g.
``tree(): num_leaves_to_search must be an int in [1, num_leaves=1000]; got 2000``.
Builder stages declare their arguments as tables of constraints (see ``STAGES``); the
validator and the generic tests both read those tables.
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from mipscan import _mipscan

DISTANCE_MEASURES = ("dot_product", "squared_l2", "cosine")

#: Upper bound of every thread count (the core takes a C int; more threads than this only
#: thrash, and creating them can fail).
MAX_THREADS = 1024


@dataclass(frozen=True)
class Interval:
    """A number in [low, high] (either end may be None = unbounded)."""

    kind: type  # int or float
    low: float | None
    high: float | None
    allow_none: bool = False
    allow_nan: bool = False

    def describe(self) -> str:
        lo = "-inf" if self.low is None else repr(self.low)
        hi = "inf" if self.high is None else repr(self.high)
        what = "an int" if self.kind is int else "a number"
        extra = " or None" if self.allow_none else ""
        extra += " or nan" if self.allow_nan else ""
        return f"{what} in [{lo}, {hi}]{extra}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple
    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


#: Storage types of quantized copies, as ScaNN's ``ReorderType`` names them.
QUANTIZE_TYPES = ("float32", "int8", "bfloat16")


@dataclass(frozen=True)
class Quantize(Options):
    """A storage type for a copy of the data, as ScaNN's ``ReorderType``; checked values are
    normalised to ``"float32"``, ``"int8"`` or ``"bfloat16"``. Accepted spellings are
    ScaNN's: a ``ReorderType`` member (mipscan's or ScaNN's own enum, by name), ``True``
    (INT8: ScaNN's shim for when quantize was a bool), ``False`` (FLOAT32), and the names
    as strings in any case (``"int8"``, ``"INT8"``, ``"bf16"``)."""

    values: tuple = QUANTIZE_TYPES

    def describe(self) -> str:
        return ("a ReorderType (FLOAT32, INT8, BFLOAT16), True (INT8), False (FLOAT32) or "
                "one of 'float32', 'int8', 'bfloat16'")

    def normalize(self, value: Any) -> str | None:
        if isinstance(value, (bool, np.bool_)):
            return "int8" if value else "float32"
        if isinstance(value, enum.Enum):
            value = value.name
        if isinstance(value, str):
            v = value.lower()
            return {"bf16": "bfloat16", "fixed8": "int8"}.get(v, v) if v in (
                *QUANTIZE_TYPES, "bf16", "fixed8") else None
        return None


@dataclass(frozen=True)
class Bool:
    def describe(self) -> str:
        return "a bool"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_value(call: str, name: str, value: Any, rule) -> Any:
    """Checks one value against a rule; returns it normalised (int/float/bool)."""
    bad = f"{call}: {name} must be {rule.describe()}; got {value!r}"
    if isinstance(rule, Bool):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(bad)
        return bool(value)
    if isinstance(rule, Quantize):
        out = rule.normalize(value)
        if out is None:
            raise (ValueError if isinstance(value, (str, enum.Enum)) else TypeError)(bad)
        return out
    if isinstance(rule, Options):
        if isinstance(value, np.bool_):
            value = bool(value)
        # Same type and value: 0 == False and 1.0 == 1 in Python, but 0 is not an option.
        if not any(value is o or (type(value) is type(o) and value == o) for o in rule.values):
            raise (TypeError if not isinstance(value, type(rule.values[0])) else ValueError)(bad)
        return value
    if value is None and rule.allow_none:
        return None
    if rule.kind is int:
        if not _is_int(value):
            raise TypeError(bad)
        value = int(value)
    else:
        if not _is_number(value):
            raise TypeError(bad)
        value = float(value)
        if math.isnan(value):
            if rule.allow_nan:
                return value
            raise ValueError(bad)
    if (rule.low is not None and value < rule.low) or (rule.high is not None and value > rule.high):
        raise ValueError(bad)
    return value


def _range(low, high, high_name) -> str:
    top = f"{high_name}={high}" if high_name else ("inf" if high is None else high)
    return f"[{low}, {top}]"


def check_int(call: str, name: str, value: Any, low: int | None, high: int | None,
              high_name: str | None = None, allow_none: bool = False) -> int | None:
    """An int in [low, high]; high_name (e.g. 'n') names the bound: shown as 'n=1000'."""
    if type(value) is not int:  # fast path for plain ints (per-query calls)
        if value is None and allow_none:
            return None
        if not _is_int(value):
            raise TypeError(f"{call}: {name} must be an int in {_range(low, high, high_name)}; "
                            f"got {value!r}")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{call}: {name} must be an int in {_range(low, high, high_name)}; "
                         f"got {value}")
    return value


def check_distance_measure(call: str, value: Any) -> str:
    return check_value(call, "distance_measure", value, Options(DISTANCE_MEASURES))


def as_float_array(call: str, name: str, x: Any, ndim: int | tuple[int, ...],
                   d: int | None = None, d_owner: str = "the index") -> np.ndarray:
    """Returns x as a C-contiguous float32 array after checking it.

    Accepts numpy arrays and array-likes (lists, JAX/TF/torch CPU tensors) of a float
    dtype; float64/float16 and non-contiguous arrays are converted. Integer, bool,
    complex and object arrays are rejected with TypeError; wrong rank, empty input,
    NaN/inf and a dimension other than ``d`` with ValueError.
    """
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{call}: {name} must be a float array; got {type(x).__name__}")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{call}: {name} must be a float array; could not convert "
                            f"{type(x).__name__}: {exc}") from None
    if x.dtype.kind != "f":
        raise TypeError(f"{call}: {name} must have a float dtype (float16/32/64); got {x.dtype}")
    if x.ndim not in ndims:
        want = " or ".join(f"{k}-D" for k in ndims)
        raise ValueError(f"{call}: {name} must be {want}; got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{call}: {name} must not be empty; got shape {x.shape}")
    if d is not None and x.shape[-1] != d:
        raise ValueError(f"{call}: {name} has {x.shape[-1]} features, but {d_owner} "
                         f"expects {d} features")
    x = np.ascontiguousarray(x, dtype=np.float32)
    big = _mipscan.max_abs(x)  # NaN if any NaN; one pass, no temporary array
    if not math.isfinite(big):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{call}: {name} contains NaN or inf (first at index "
                         f"{tuple(int(i) for i in bad)}); only finite values are allowed")
    limit = max_abs_value(x.shape[-1])
    if big > limit:
        bad = np.argwhere(np.abs(x) > limit)[0]
        raise ValueError(f"{call}: {name} has a value of magnitude {big:.3g} (first too "
                         f"large at index {tuple(int(i) for i in bad)}); with {x.shape[-1]} "
                         f"features values must be at most {limit:.3g}, or float32 scores overflow")
    return x


@functools.lru_cache(maxsize=64)
def max_abs_value(d: int) -> float:
    """The largest |value| accepted in a d-dimensional vector: then every squared norm is
    at most FLT_MAX / 16, so dot products, squared distances, residuals and their sums stay
    finite in float32 (beyond it the core would see inf/NaN scores and return garbage)."""
    return math.sqrt(float(np.finfo(np.float32).max) / 16.0 / max(d, 1))
