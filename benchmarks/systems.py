"""One adapter per benchmarked variant: build, search knobs, single and batched search.

Every adapter imports its library inside ``__init__``; a missing library or API raises
:class:`Unavailable` with the reason, which the harness prints and records. Adapters return
neighbour ids as int64 arrays, ``(nq, k)`` for a batch and ``(k,)`` for one query.

Thread counts: ``search_batched(Q, knobs, threads)`` must use exactly ``threads`` threads.
The worker pins BLAS/OpenMP (threadpoolctl), faiss's OpenMP and mipscan's pool around each
call (:func:`benchmarks.common.pinned_threads`); hnswlib and ScaNN get the count per call.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.common import numpy_topk, package_version

# family -> variants; one worker subprocess per variant. Every partitioned system with
# 4-bit codes runs at two code widths, as ScaNN's own ann-benchmarks configurations do
# (dims_per_block 1 and 2): the run's dims_per_block (2) and, as "<variant>-ah1", one
# dimension per 4-bit code (twice the codes, a finer score: less reordering for the same
# recall). Like hnswlib's M16/M32, each family is then judged by its better variant.
AH1 = "-ah1"
FAMILIES = {
    "mipscan": ["mipscan", "mipscan" + AH1, "mipscan-bf"],
    "scann": ["scann", "scann" + AH1],
    "scann-core": ["scann-core", "scann-core" + AH1],
    "faiss": ["faiss-ivfpq4fs", "faiss-ivfpq4fs" + AH1, "faiss-flat"],
    "hnswlib": ["hnswlib-M16", "hnswlib-M32"],
    "numpy": ["numpy"],
}


class Unavailable(RuntimeError):
    """The variant's library (or the API it needs) is not installed."""


def _dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Variant:
    """Base class; ``knob_grid`` is a list of dicts passed back to the search methods.

    ``simd_level`` says which SIMD kernels the library ran, as far as it can be known
    (a level it reports, or how it chooses one when it reports none); recorded per system.
    """

    name = ""
    family = ""
    exact = False
    version: str | None = None
    simd_level: str | None = None

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.k = cfg["k"]

    def build(self, train: np.ndarray) -> None:
        raise NotImplementedError

    def index_bytes(self) -> int:
        raise NotImplementedError

    def build_params(self) -> dict:
        return {}

    def knob_grid(self) -> list[dict]:
        return [{}]

    def default_knobs(self) -> dict | None:
        return None

    def search_batched(self, queries: np.ndarray, knobs: dict, threads: int) -> np.ndarray:
        raise NotImplementedError

    def search_one(self, q: np.ndarray, knobs: dict) -> np.ndarray:
        return self.search_batched(q[None, :], knobs, 1)[0]


def _tree_grid(cfg: dict) -> list[dict]:
    """leaves_grid x reorder_grid, then the deep points (``deep_grid``: [leaves, reorder]
    pairs, e.g. reorder 500 k over most of the leaves, for recall 0.99) not in it."""
    grid = [{"leaves_to_search": ls, "reorder": ro}
            for ls in cfg["leaves_grid"] for ro in cfg["reorder_grid"]]
    for ls, ro in cfg.get("deep_grid", []):
        g = {"leaves_to_search": ls, "reorder": ro}
        if g not in grid:
            grid.append(g)
    return grid


class Mipscan(Variant):
    name, family = "mipscan", "mipscan"

    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            import mipscan
        except ImportError as exc:
            raise Unavailable(f"mipscan not importable: {exc}") from exc
        if not hasattr(mipscan, "builder"):
            raise Unavailable("mipscan.builder does not exist yet in this checkout")
        self.mipscan = mipscan
        self.version = getattr(mipscan, "__version__", None)
        self.simd_level = common.mipscan_simd(mipscan)

    def build_params(self):
        c = self.cfg
        return {"num_leaves": c["num_leaves"], "num_leaves_to_search": c["leaves_to_search"],
                "training_sample_size": c["training_sample_size"],
                "training_iterations": c["training_iterations"],
                "dimensions_per_block": c["dims_per_block"],
                "anisotropic_quantization_threshold": c["aq_threshold"],
                "reordering_num_neighbors": c["reorder"]}

    def build(self, train):
        c = self.cfg
        self.searcher = (
            self.mipscan.builder(train, num_neighbors=self.k, distance_measure=c["metric"])
            .tree(num_leaves=c["num_leaves"], num_leaves_to_search=c["leaves_to_search"],
                  training_sample_size=c["training_sample_size"],
                  training_iterations=c["training_iterations"])
            .score_ah(c["dims_per_block"],
                      anisotropic_quantization_threshold=c["aq_threshold"])
            .reorder(c["reorder"])
            .set_n_training_threads(common.PINNED or 0)
            .build())

    def index_bytes(self):
        return int(self.searcher.index_bytes)

    def knob_grid(self):
        # The tree may hold fewer leaves than asked for (empty ones are dropped): "all the
        # leaves" is then num_leaves of the built searcher.
        top = int(getattr(self.searcher, "num_leaves", self.cfg["num_leaves"]))
        grid = [dict(g, leaves_to_search=min(g["leaves_to_search"], top))
                for g in _tree_grid(self.cfg)]
        return [g for i, g in enumerate(grid) if g not in grid[:i]]

    def default_knobs(self):
        return {"leaves_to_search": self.cfg["leaves_to_search"], "reorder": self.cfg["reorder"]}

    def search_batched(self, queries, knobs, threads):
        kw = {"final_num_neighbors": self.k, "leaves_to_search": knobs["leaves_to_search"],
              "pre_reorder_num_neighbors": knobs["reorder"]}
        if threads == 1:
            r = self.searcher.search_batched(queries, **kw)
        else:
            self.searcher.set_num_threads(threads)
            r = self.searcher.search_batched_parallel(queries, **kw)
        return np.asarray(r[0], dtype=np.int64)

    def search_one(self, q, knobs):
        r = self.searcher.search(q, final_num_neighbors=self.k,
                                 leaves_to_search=knobs["leaves_to_search"],
                                 pre_reorder_num_neighbors=knobs["reorder"])
        return np.asarray(r[0], dtype=np.int64)


class MipscanBruteForce(Variant):
    name, family, exact = "mipscan-bf", "mipscan", True

    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            import mipscan
        except ImportError as exc:
            raise Unavailable(f"mipscan not importable: {exc}") from exc
        self.mipscan = mipscan
        self.version = getattr(mipscan, "__version__", None)
        self.simd_level = common.mipscan_simd(mipscan)

    def build(self, train):
        self.train = train

    def index_bytes(self):
        return int(self.train.nbytes)

    def search_batched(self, queries, knobs, threads):
        r = self.mipscan.brute_force(self.train, queries, k=self.k,
                                     distance_measure=self.cfg["metric"], num_threads=threads)
        return np.asarray(r[0], dtype=np.int64)


class Scann(Variant):
    """The ``scann`` wheel. ``scann-core`` installs the same module name, so each needs its
    own Python environment; the distribution that owns ``scann`` here decides which runs."""

    name, family = "scann", "scann"
    distribution = "scann"
    simd_level = "not reported (no run-time dispatch)"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.version = package_version(self.distribution)
        if self.version is None:
            other = "scann-core" if self.distribution == "scann" else "scann"
            hint = (" (scann-core runs in its own venv: python -m benchmarks.run "
                    "--scann-core-python /path/to/venv/bin/python, see benchmarks/README.md)"
                    if self.distribution == "scann-core" else "")
            raise Unavailable(f"the {self.distribution} distribution is not installed in "
                              f"{sys.executable}" + (f" ({other} is)" if package_version(other)
                                                     else "") + hint)
        try:
            from scann.scann_ops.py import scann_ops_pybind
        except ImportError as exc:
            raise Unavailable(f"{self.distribution} not importable: {exc}") from exc
        self.scann = scann_ops_pybind

    build_params = Mipscan.build_params
    default_knobs = Mipscan.default_knobs

    def knob_grid(self):
        return _tree_grid(self.cfg)

    def build(self, train):
        c = self.cfg
        self.searcher = (
            self.scann.builder(train, self.k, c["metric"])
            .tree(num_leaves=c["num_leaves"], num_leaves_to_search=c["leaves_to_search"],
                  training_sample_size=c["training_sample_size"],
                  training_iterations=c["training_iterations"])
            .score_ah(c["dims_per_block"],
                      anisotropic_quantization_threshold=c["aq_threshold"])
            .reorder(c["reorder"])
            .set_n_training_threads(c["build_threads"])
            .build())

    def index_bytes(self):
        # ScaNN keeps its arrays in C++; the serialized folder (centroids, AH codes and
        # codebooks, float32 reorder copy, config) is the measurable size.
        with tempfile.TemporaryDirectory() as tmp:
            self.searcher.serialize(tmp)
            return _dir_bytes(tmp)

    def search_batched(self, queries, knobs, threads):
        kw = {"final_num_neighbors": self.k, "leaves_to_search": knobs["leaves_to_search"],
              "pre_reorder_num_neighbors": knobs["reorder"]}
        if threads == 1:
            ids, _ = self.searcher.search_batched(queries, **kw)
        else:
            self.searcher.set_num_threads(threads)
            ids, _ = self.searcher.search_batched_parallel(queries, **kw)
        return np.asarray(ids, dtype=np.int64)

    def search_one(self, q, knobs):
        ids, _ = self.searcher.search(q, final_num_neighbors=self.k,
                                      pre_reorder_num_neighbors=knobs["reorder"],
                                      leaves_to_search=knobs["leaves_to_search"])
        return np.asarray(ids, dtype=np.int64)


class ScannCore(Scann):
    """``scann-core``: ScaNN's core with its run-time SIMD dispatch enabled."""

    name, family = "scann-core", "scann-core"
    distribution = "scann-core"
    # Its binary picks the best of AVX2 / AVX512 / AVX512_VNNI at run time (flags
    # --ignore_avx2, --ignore_avx512, ...), but its API does not say which.
    simd_level = "run-time dispatch (not reported)"


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise Unavailable(f"faiss not importable: {exc}") from exc
    return faiss


class FaissIVF(Variant):
    """``IVF{num_leaves},PQ{d/2}x4fs,RFlat``: 4-bit fast-scan PQ on residuals + exact refine."""

    name, family = "faiss-ivfpq4fs", "faiss"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.faiss = _import_faiss()
        self.version = self.faiss.__version__

    def factory_string(self, d: int) -> str:
        m = d // self.cfg["dims_per_block"] if d % self.cfg["dims_per_block"] == 0 else d
        return f"IVF{self.cfg['num_leaves']},PQ{m}x4fs,RFlat"

    def build_params(self):
        return {"factory": self.factory_string(self.cfg["d"]),
                "metric": self.cfg["metric"]}

    def build(self, train):
        faiss = self.faiss
        metric = (faiss.METRIC_INNER_PRODUCT if self.cfg["metric"] == "dot_product"
                  else faiss.METRIC_L2)
        self.index = faiss.index_factory(train.shape[1], self.factory_string(train.shape[1]),
                                         metric)
        self.index.train(train)
        self.index.add(train)
        self.ivf = faiss.extract_index_ivf(self.index)

    def index_bytes(self):
        return int(self.faiss.serialize_index(self.index).nbytes)

    def knob_grid(self):
        return [{"nprobe": g["leaves_to_search"], "k_factor": max(1, g["reorder"] // self.k)}
                for g in _tree_grid(self.cfg)]

    def default_knobs(self):
        return {"nprobe": self.cfg["leaves_to_search"],
                "k_factor": max(1, self.cfg["reorder"] // self.k)}

    def _set(self, knobs):
        self.ivf.nprobe = knobs["nprobe"]
        self.index.k_factor = knobs["k_factor"]

    def search_batched(self, queries, knobs, threads):
        self._set(knobs)
        _, ids = self.index.search(queries, self.k)
        return ids.astype(np.int64)


class FaissFlat(Variant):
    name, family, exact = "faiss-flat", "faiss", True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.faiss = _import_faiss()
        self.version = self.faiss.__version__

    def build(self, train):
        faiss = self.faiss
        self.index = (faiss.IndexFlatIP if self.cfg["metric"] == "dot_product"
                      else faiss.IndexFlatL2)(train.shape[1])
        self.index.add(train)

    def index_bytes(self):
        return int(self.faiss.serialize_index(self.index).nbytes)

    def search_batched(self, queries, knobs, threads):
        _, ids = self.index.search(queries, self.k)
        return ids.astype(np.int64)


class Hnswlib(Variant):
    family = "hnswlib"

    def __init__(self, cfg, m: int):
        super().__init__(cfg)
        try:
            import hnswlib
        except ImportError as exc:
            raise Unavailable(f"hnswlib not importable: {exc}") from exc
        self.hnswlib = hnswlib
        self.m = m
        self.name = f"hnswlib-M{m}"
        self.version = package_version("hnswlib")

    def build_params(self):
        return {"M": self.m, "ef_construction": self.cfg["ef_construction"],
                "space": "ip" if self.cfg["metric"] == "dot_product" else "l2"}

    def build(self, train):
        n, d = train.shape
        self.index = self.hnswlib.Index(space=self.build_params()["space"], dim=d)
        self.index.init_index(max_elements=n, ef_construction=self.cfg["ef_construction"],
                              M=self.m, random_seed=100)
        self.index.add_items(train, np.arange(n), num_threads=self.cfg["build_threads"])

    def index_bytes(self):
        return int(self.index.index_file_size())

    def knob_grid(self):
        return [{"ef": ef} for ef in self.cfg["ef_grid"] if ef >= self.k]

    def search_batched(self, queries, knobs, threads):
        self.index.set_ef(knobs["ef"])
        ids, _ = self.index.knn_query(queries, k=self.k, num_threads=threads)
        return ids.astype(np.int64)


class NumpyExact(Variant):
    name, family, exact = "numpy", "numpy", True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.version = np.__version__

    def build(self, train):
        self.train = train

    def index_bytes(self):
        return int(self.train.nbytes)

    def search_batched(self, queries, knobs, threads):
        return numpy_topk(self.train, queries, self.k, self.cfg["metric"])


def make(name: str, cfg: dict) -> Variant:
    """The adapter for a variant name from :data:`FAMILIES`."""
    table = {
        "mipscan": Mipscan, "mipscan-bf": MipscanBruteForce, "scann": Scann,
        "scann-core": ScannCore,
        "faiss-ivfpq4fs": FaissIVF, "faiss-flat": FaissFlat, "numpy": NumpyExact,
    }
    if name in table:
        return table[name](cfg)
    if name.endswith(AH1) and any(name in vs for vs in FAMILIES.values()):
        v = table[name[:-len(AH1)]](dict(cfg, dims_per_block=1))
        v.name = name
        return v
    if name.startswith("hnswlib-M"):
        return Hnswlib(cfg, int(name[len("hnswlib-M"):]))
    raise ValueError(f"unknown variant {name!r}")
