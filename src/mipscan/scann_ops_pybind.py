"""Drop-in for ScaNN's ``scann.scann_ops_pybind`` / ``scann.scann_ops``: change the import,
keep the code (``builder(...)...build(shared_name=...)``, ``search_batched_parallel(...).indices``)."""

from mipscan.builder import ReorderType, builder
from mipscan.searcher import load_searcher

__all__ = ["ReorderType", "builder", "load_searcher"]
