"""One line telling the user which extra to install when an optional module is missing.

Used by ``mipscan.keras`` and ``mipscan demo``: a missing Keras, Keras-RS or Keras backend
raises :class:`MissingExtraError` with a message such as
``mipscan demo needs the recsys extra (no module named 'keras'): pip install "mipscan[recsys]"``
instead of the import's traceback. Needs only the standard library.
"""

from __future__ import annotations

import importlib.util
import os

RECSYS_INSTALL = 'pip install "mipscan[recsys]"'
# Keras backends the recsys extra does not bring (it brings JAX), and the pip package of each.
_BACKEND_PACKAGES = {"tensorflow": "tensorflow", "torch": "torch"}


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message says what to install."""


def _top(module: str | None) -> str:
    return (module or "").split(".")[0]


def message(what: str, module: str | None) -> str:
    """The one-line message for ``what`` (``"mipscan demo"``, ``"mipscan.keras"``) when
    importing ``module`` failed."""
    top = _top(module)
    if top in _BACKEND_PACKAGES:
        backend = os.environ.get("KERAS_BACKEND", top)
        return (f"{what} needs {top} for the Keras backend {backend!r} (KERAS_BACKEND): "
                f"{RECSYS_INSTALL} {_BACKEND_PACKAGES[top]}, or unset KERAS_BACKEND to use JAX")
    missing = f" (no module named {top!r})" if top else ""
    return f"{what} needs the recsys extra{missing}: {RECSYS_INSTALL}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


def require(what: str, modules: tuple[str, ...]) -> None:
    """Raises :class:`MissingExtraError` for the first of ``modules`` that cannot be
    found, without importing any of them."""
    for module in modules:
        if not _installed(module):
            raise MissingExtraError(message(what, module), name=module)


def require_recsys(what: str, backend: str | None = None) -> None:
    """Keras, Keras-RS, rich and the Keras ``backend`` (default: ``KERAS_BACKEND``, else
    JAX, which :mod:`mipscan.recsys.model` selects) are installed."""
    backend = backend or os.environ.get("KERAS_BACKEND", "jax")
    modules = ("keras", "keras_rs", "rich")
    if backend in ("jax", "tensorflow", "torch"):
        modules += (backend,)
    require(what, modules)


def reraise(what: str, exc: ImportError) -> MissingExtraError:
    """The :class:`MissingExtraError` for an ImportError raised while importing an
    optional dependency (raise it ``from None``)."""
    return MissingExtraError(message(what, exc.name), name=exc.name)


__all__ = ["MissingExtraError", "RECSYS_INSTALL", "message", "require", "require_recsys",
           "reraise"]
