"""mipscan on Ray: a sharded index held by Ray actors, and batch retrieval with Ray Data.

Needs the ``ray`` extra (``pip install "mipscan[ray]"``); ``import mipscan.distributed``
works without it and each entry point raises :class:`MissingExtraError` saying so.

Sharded index (:class:`ShardedIndex`)::

    index = ShardedIndex.build(db, num_shards=4, num_neighbors=10,
                               configure=lambda b: b.tree(100, 10).score_ah(2).reorder(200))
    ids, scores = index.search_batched(queries)        # global docids, best first
    index.serialize("sharded/")                        # one index folder per shard + manifest
    index = ShardedIndex.load("sharded/")              # on any cluster that reads the folder

- Every datapoint has a docid (int64; default its row number). Shard ``s`` holds the docids
  with ``shard_of(docid, num_shards) == s`` (splitmix64 of the docid, modulo the count),
  built in its own Ray task and held by one Ray actor, placed by Ray's scheduler (SPREAD).
- A search sends the queries to every shard, each returns its own top k with exact
  (reordered) scores, and the driver keeps the best k of the ``num_shards * k``.
- Fault handling is the driver's: a shard whose actor died is started again from its
  source (its index folder, or the built shard in Ray's object store), updates made
  since that source was written are replayed, and the call is sent again. A call never
  returns a partial result: it returns every shard's answer, or raises
  :class:`ShardUnavailableError` naming the shard.
- ``upsert`` / ``delete`` go to the owning shard when mipscan's Searcher has them (the live
  index); otherwise they raise NotImplementedError.

Batch retrieval (:func:`batch_search`): a Ray Dataset of queries through ``map_batches``
with one memory-mapped index per worker (plain index folder or a sharded one), searched
with the engine's threads; Parquet out, or a Dataset back.

Folder layout written by :meth:`ShardedIndex.serialize`::

    DIR/mipscan-shards.json          the manifest (atomic replace; sha256 of itself, and of
                                     each shard's mipscan.json and docid file)
    DIR/shard-0000.<generation>/     an ordinary mipscan index folder (load_searcher reads it)
    DIR/shard-0000.<generation>.docids.npy   that shard's docids by row (when the Searcher
                                     does not keep docids itself)

A new serialize writes a new generation beside the old one and flips the manifest; the old
generation is removed afterwards, so a reader sees the old index or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import mipscan
from mipscan import SearchResult
from mipscan.recsys._extras import MissingExtraError

__all__ = ["MissingExtraError", "SharedIndex", "ShardUnavailableError", "ShardedIndex",
           "batch_search", "share", "shard_of", "MANIFEST"]

RAY_INSTALL = 'pip install "mipscan[ray]"'
MANIFEST = "mipscan-shards.json"
FORMAT = "mipscan-sharded"
VERSION = 1


class ShardUnavailableError(RuntimeError):
    """A shard could not answer (its actor died and could not be started again within
    the retries). The message names the shard and its source; ``shard`` holds its number,
    or None when the whole index is gone (a :class:`SharedIndex` whose owner died)."""

    def __init__(self, message: str, shard: int | None):
        super().__init__(message)
        self.shard = shard

    def __reduce__(self):  # raised in an actor, re-raised in its caller
        return (type(self), (str(self), self.shard))


def _ray(what: str):
    """Imports ray, or raises the one-line MissingExtraError."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data])
    except ImportError as exc:
        top = (exc.name or "ray").split(".")[0]
        raise MissingExtraError(f"{what} needs the ray extra (no module named {top!r}): "
                                f"{RAY_INSTALL}", name=exc.name) from None
    return ray


def _live() -> bool:
    """True when mipscan's Searcher is the live index (docids, upsert, delete)."""
    return all(hasattr(mipscan.Searcher, name) for name in ("upsert", "delete"))


# ---------------------------------------------------------------- routing
_U = np.uint64


def shard_of(docids, num_shards: int) -> np.ndarray:
    """The shard (int64 in [0, num_shards)) of each docid: splitmix64(docid) % num_shards.

    A fixed, platform-independent function of the docid alone, so a docid's owner never
    depends on the order or the batch it came in.
    """
    x = np.asarray(docids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + _U(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
        x = x ^ (x >> _U(31))
    return (x % _U(num_shards)).astype(np.int64)


def _larger_is_better(distance_measure: str) -> bool:
    return distance_measure != "squared_l2"


def merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int,
          distance_measure: str) -> SearchResult:
    """The best ``k`` of several shards' (ids (nq, k_s), scores (nq, k_s)) by score, ties
    kept in shard order. Returns SearchResult(int64 ids (nq, k), float32 scores)."""
    ids = np.concatenate([np.asarray(p[0], np.int64) for p in parts], axis=1)
    scores = np.concatenate([np.asarray(p[1], np.float32) for p in parts], axis=1)
    key = -scores if _larger_is_better(distance_measure) else scores
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return SearchResult(np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1))


def _check_queries(call: str, queries, d: int, ndim: int) -> np.ndarray:
    q = np.asarray(queries)
    if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
        raise TypeError(f"{call}: queries must be a float array; got dtype {q.dtype}")
    if q.ndim != ndim or q.shape[-1] != d:
        want = "(d,)" if ndim == 1 else "(nq, d)"
        raise ValueError(f"{call}: queries must have shape {want} with d={d}; got shape "
                         f"{q.shape}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise ValueError(f"{call}: queries hold NaN or inf")
    return q


def _check_k(call: str, name: str, value, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{call}: {name} must be an int; got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{call}: {name} must be an int in {allowed}; got {value}")
    return int(value)


def _check_search(call: str, k, pre_k, leaves, default_k: int, n: int) -> tuple:
    """(k, pre_k, leaves) of a search of an index of ``n`` points, checked."""
    k = default_k if k is None else _check_k(call, "final_num_neighbors", k, 1, n)
    if pre_k is not None:
        pre_k = _check_k(call, "pre_reorder_num_neighbors", pre_k, 1, n)
    if leaves is not None:
        leaves = _check_k(call, "leaves_to_search", leaves, 1, None)
    return k, pre_k, leaves


# ---------------------------------------------------------------- files
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _save_docids(path: Path, docids: np.ndarray) -> str:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(docids, dtype=np.int64))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return _sha256_file(path)


def read_manifest(directory) -> dict:
    """The checked manifest of a sharded index folder. Raises ValueError naming the path
    and the bad field (missing, foreign format, version, checksum, a shard's files)."""
    root = Path(os.fspath(directory))
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(f"ShardedIndex.load(): {str(root)!r} is not a sharded mipscan index "
                         f"({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"ShardedIndex.load(): {str(path)!r}: unreadable manifest: {exc}"
                         ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"ShardedIndex.load(): {str(path)!r}: format must be {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"ShardedIndex.load(): {str(path)!r}: version must be {VERSION}; got "
                         f"{manifest.get('version')!r}")
    if manifest.get("sha256") != _manifest_digest(manifest):
        raise ValueError(f"ShardedIndex.load(): {str(path)!r}: sha256 does not match the "
                         f"manifest's contents (damaged or edited)")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or len(shards) != manifest.get("num_shards"):
        raise ValueError(f"ShardedIndex.load(): {str(path)!r}: shards must list num_shards "
                         f"entries")
    for i, entry in enumerate(shards):
        folder = root / entry["folder"]
        index_json = folder / "mipscan.json"
        if not index_json.is_file() or _sha256_file(index_json) != entry["index_sha256"]:
            raise ValueError(f"ShardedIndex.load(): shard {i}: {str(folder)!r}: mipscan.json "
                             f"is missing or its sha256 differs from the manifest's")
        if entry.get("docids"):
            ids_path = root / entry["docids"]
            if not ids_path.is_file() or _sha256_file(ids_path) != entry["docids_sha256"]:
                raise ValueError(f"ShardedIndex.load(): shard {i}: {str(ids_path)!r} is "
                                 f"missing or its sha256 differs from the manifest's")
    return manifest


def _shard_names(shard: int, generation: str) -> tuple[str, str]:
    folder = f"shard-{shard:04d}.{generation}"
    return folder, folder + ".docids.npy"


def _write_shard(searcher, docids, root: Path, shard: int, generation: str) -> dict:
    """Serializes one shard into ``root`` (its folder, and its docids file when the
    searcher does not keep docids); returns its manifest entry."""
    folder, ids_name = _shard_names(shard, generation)
    searcher.serialize(root / folder)
    entry = {"folder": folder, "n": int(searcher.size()),
             "index_sha256": _sha256_file(root / folder / "mipscan.json"),
             "docids": None, "docids_sha256": None}
    if docids is not None:
        entry["docids"] = ids_name
        entry["docids_sha256"] = _save_docids(root / ids_name, docids)
    return entry


def _load_shard(root: Path, entry: dict, mmap: bool = True):
    searcher = mipscan.load_searcher(root / entry["folder"], mmap=mmap)
    docids = None
    if entry.get("docids"):
        docids = np.load(root / entry["docids"], mmap_mode="r" if mmap else None)
        if docids.shape != (searcher.size(),):
            raise ValueError(f"{str(root / entry['docids'])!r}: shape {docids.shape}, but the "
                             f"shard holds {searcher.size()} rows")
    return searcher, docids


def _build_one(vectors: np.ndarray, docids: np.ndarray, num_neighbors: int,
               distance_measure: str, configure: Callable | None):
    """Builds one shard: (searcher, docids by row or None when the searcher keeps them)."""
    b = mipscan.builder(vectors, min(num_neighbors, len(vectors)), distance_measure)
    b = configure(b) if configure is not None else b.score_brute_force()
    if _live():
        return b.build(docids=docids), None
    return b.build(), np.ascontiguousarray(docids, dtype=np.int64)


# ---------------------------------------------------------------- the shard actor
class _Shard:
    """One shard: a Searcher plus its docids, started from a folder or a built shard.
    Methods return their result with the shard's update count (the driver checks it)."""

    def __init__(self, shard: int, source: Any, num_threads: int):
        self.shard = shard
        if isinstance(source[0], str):  # ("folder", root, manifest entry)
            self.searcher, self.docids = _load_shard(Path(source[1]), source[2])
        else:  # (searcher, docids): a build task's result, resolved by Ray
            self.searcher, self.docids = source
        self.searcher.set_num_threads(num_threads)
        self.updates = 0
        self.retired = False
        self.pid = os.getpid()

    def info(self) -> dict:
        s = self.searcher
        return {"shard": self.shard, "n": int(s.size()), "pid": self.pid,
                "updates": self.updates, "d": s.d, "num_leaves": int(s.num_leaves),
                "max_leaves_to_search": int(s.max_leaves_to_search),
                "num_threads": int(s.num_threads), "index_bytes": int(s.index_bytes)}

    def retire(self) -> None:
        """Called when a reload replaced this shard: every later search answers None, so a
        caller still holding this actor searches the new index instead."""
        self.retired = True

    def search(self, queries: np.ndarray, k: int, pre_k: int | None, leaves: int | None):
        if self.retired:
            return None
        n = int(self.searcher.size())
        k = min(k, n)
        pre_k = None if pre_k is None else min(pre_k, n)
        ids, scores = self.searcher.search_batched_parallel(
            queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre_k,
            leaves_to_search=leaves)
        ids = np.asarray(ids)
        ids = self.docids[ids] if self.docids is not None else ids.astype(np.int64)
        return np.asarray(ids, np.int64), np.asarray(scores, np.float32), self.updates, n

    def upsert(self, docids: np.ndarray, vectors: np.ndarray) -> int:
        self.searcher.upsert(docids, vectors)
        self.updates += 1
        return self.updates

    def missing(self, docids: np.ndarray):
        """The first of ``docids`` this shard does not hold, or None."""
        # The searcher's docid -> row map once an update has made it; before that, its
        # live docids (once per actor: the delete that follows makes the map).
        known = getattr(self.searcher, "_rows_of", None)
        if known is None:
            known = set(self.searcher.docids or ())
        return next((int(i) for i in docids if int(i) not in known), None)

    def delete(self, docids: np.ndarray) -> int:
        self.searcher.delete(docids)
        self.updates += 1
        return self.updates

    def serialize(self, root: str, generation: str | None) -> dict:
        if generation is None:  # a plain index folder (ShardedIndex.open of one): in place
            self.searcher.serialize(Path(root))
            return {}
        return _write_shard(self.searcher, self.docids, Path(root), self.shard, generation)


# ---------------------------------------------------------------- the sharded index
class ShardedIndex:
    """A mipscan index split into shards by docid, one Ray actor per shard.

    Make one with :meth:`build` (an array), :meth:`build_from_dataset` (a Ray Dataset of
    docid and vector columns) or :meth:`load` (a folder written by :meth:`serialize`).
    Search with :meth:`search` / :meth:`search_batched`; the results are global docids
    (int64) and exact scores, best first, as one index over all the data would give for
    exact search (each shard returns its top ``k``; the driver keeps the best ``k``).

    Thread-safe: searches may run from several threads; a dead shard is restarted once.
    Call :meth:`shutdown` (or use ``with``) to end the actors.
    """

    def __init__(self, meta: dict, sources: list, *, threads_per_shard: int = 1,
                 actor_options: dict | None = None, retries: int = 3,
                 retry_wait: float = 0.5):
        """Internal: use build, build_from_dataset or load."""
        self._ray = _ray("ShardedIndex")
        self.meta = dict(meta)
        self.num_shards = len(sources)
        self.d = int(meta["d"])
        self.distance_measure = meta["distance_measure"]
        self.num_neighbors = int(meta["num_neighbors"])
        self.threads_per_shard = threads_per_shard
        self.retries = retries
        self.retry_wait = retry_wait
        self._sources = list(sources)
        self._log: list[list] = [[] for _ in sources]  # updates since each source was made
        self._updates = [0] * self.num_shards
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one update at a time: the log is their order
        self.folder: Path | None = None      # set by open(): where snapshot() writes
        self.plain = False                   # open() of a plain index folder: one shard
        options = {"num_cpus": 0, "scheduling_strategy": "SPREAD", "max_restarts": 0}
        options.update(actor_options or {})
        self._actor_options = options
        self._actor_class = self._ray.remote(_Shard)
        self._actors = [self._start(i) for i in range(self.num_shards)]
        infos = self._call_all("info")
        self.shard_sizes = [info["n"] for info in infos]
        self.n = int(sum(self.shard_sizes))

    # -------------------------------------------------------------- construction
    @classmethod
    def build(cls, vectors, num_shards: int, num_neighbors: int = 10,
              distance_measure: str = "dot_product", *, docids=None,
              configure: Callable | None = None, directory=None,
              threads_per_shard: int = 1, actor_options: dict | None = None,
              build_options: dict | None = None) -> "ShardedIndex":
        """Splits ``vectors`` by docid into ``num_shards`` shards and builds each in a Ray task.

        Args:
            vectors: (n, d) float array.
            num_shards: shards (and actors), an int in [1, n]; every shard must get a docid.
            num_neighbors: the default k of searches.
            distance_measure: ``dot_product``, ``cosine`` or ``squared_l2``.
            docids: (n,) distinct int64 docids (default: row numbers).
            configure: ``builder -> builder``, the per-shard stages, e.g.
                ``lambda b: b.tree(100, 10).score_ah(2).reorder(200)`` (default: exact
                ``score_brute_force()``). Sent to the tasks with cloudpickle.
            directory: when given, the shards are written there (as :meth:`serialize`
                does) by the build tasks, and the actors load them from it; it must be
                readable and writable by every node. When None, the built shards stay in
                Ray's object store.
            threads_per_shard: engine threads of each shard's searches.
            actor_options / build_options: extra ``.options()`` of the actors (default
                ``num_cpus=0``, SPREAD) and of the build tasks (default ``num_cpus=1``).

        Raises:
            ValueError / TypeError: bad vectors, docids or counts; a shard with no docid.
        """
        ray = _ray("ShardedIndex.build()")
        call = "ShardedIndex.build()"
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{call}: vectors must be a non-empty (n, d) array; got shape "
                             f"{x.shape}")
        n = len(x)
        num_shards = _check_k(call, "num_shards", num_shards, 1, n)
        num_neighbors = _check_k(call, "num_neighbors", num_neighbors, 1, n)
        ids = np.arange(n, dtype=np.int64) if docids is None else np.asarray(docids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{call}: docids must be an int array of shape ({n},); got "
                             f"{ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != n:
            raise ValueError(f"{call}: docids must be distinct")
        owner = shard_of(ids, num_shards)
        rows = [np.flatnonzero(owner == s) for s in range(num_shards)]
        empty = [s for s, r in enumerate(rows) if len(r) == 0]
        if empty:
            raise ValueError(f"{call}: shard {empty[0]} gets no docid (n={n}, "
                             f"num_shards={num_shards}); use fewer shards")
        task = ray.remote(_build_task).options(**{"num_cpus": 1, **(build_options or {})})
        generation = _new_generation()
        root = None if directory is None else _prepare_root(call, directory)
        refs = [task.remote(np.ascontiguousarray(x[r]), ids[r], num_neighbors,
                            distance_measure, configure,
                            None if root is None else str(root), s, generation)
                for s, r in enumerate(rows)]
        meta = {"d": int(x.shape[1]), "distance_measure": distance_measure,
                "num_neighbors": num_neighbors}
        if root is None:
            sources = [("built", ref) for ref in refs]
        else:
            entries = ray.get(refs)
            _commit(root, meta, entries, generation)
            sources = [("folder", str(root), e) for e in entries]
        return cls(meta, sources, threads_per_shard=threads_per_shard,
                   actor_options=actor_options)

    @classmethod
    def build_from_dataset(cls, dataset, num_shards: int, directory, num_neighbors: int = 10,
                           distance_measure: str = "dot_product", *,
                           docid_column: str = "docid", vector_column: str = "vector",
                           configure: Callable | None = None, threads_per_shard: int = 1,
                           actor_options: dict | None = None) -> "ShardedIndex":
        """As :meth:`build`, from a Ray Dataset with an int docid column and a vector
        column: rows are grouped by owning shard and each group is built and written to
        ``directory`` (required: every node must read and write it) by one Ray Data task."""
        _ray("ShardedIndex.build_from_dataset()")
        call = "ShardedIndex.build_from_dataset()"
        num_shards = _check_k(call, "num_shards", num_shards, 1, None)
        root = _prepare_root(call, directory)
        generation = _new_generation()

        def tag(batch):
            batch["_shard"] = shard_of(batch[docid_column], num_shards)
            return batch

        def build_group(batch):
            s = int(batch["_shard"][0])
            vectors = np.ascontiguousarray(np.stack(batch[vector_column]), dtype=np.float32)
            entry = _build_task(vectors, np.asarray(batch[docid_column], np.int64),
                                num_neighbors, distance_measure, configure, str(root), s,
                                generation)
            return {"shard": np.array([s]), "entry": np.array([json.dumps(entry)])}

        rows = (dataset.map_batches(tag, batch_format="numpy")
                .groupby("_shard").map_groups(build_group, batch_format="numpy").take_all())
        entries: list = [None] * num_shards
        for row in rows:
            entries[int(row["shard"])] = json.loads(row["entry"])
        empty = [s for s, e in enumerate(entries) if e is None]
        if empty:
            raise ValueError(f"{call}: shard {empty[0]} gets no docid (num_shards="
                             f"{num_shards}); use fewer shards")
        d = mipscan.load_searcher(root / entries[0]["folder"]).d
        meta = {"d": d, "distance_measure": distance_measure, "num_neighbors": num_neighbors}
        _commit(root, meta, entries, generation)
        return cls(meta, [("folder", str(root), e) for e in entries],
                   threads_per_shard=threads_per_shard, actor_options=actor_options)

    @classmethod
    def load(cls, directory, *, threads_per_shard: int = 1,
             actor_options: dict | None = None) -> "ShardedIndex":
        """Starts one actor per shard of a folder written by :meth:`serialize`. The folder
        must be readable from every node (a shared file system). The manifest and each
        shard's checksums are checked here; each actor memory-maps its shard."""
        _ray("ShardedIndex.load()")
        root = Path(os.fspath(directory)).resolve()
        manifest = read_manifest(root)
        return cls(manifest["meta"], [("folder", str(root), e) for e in manifest["shards"]],
                   threads_per_shard=threads_per_shard, actor_options=actor_options)

    @classmethod
    def open(cls, directory, *, threads_per_shard: int = 1,
             actor_options: dict | None = None) -> "ShardedIndex":
        """:meth:`load` of a sharded folder, or one shard (one actor) of a plain index
        folder written by :meth:`mipscan.Searcher.serialize`; either way :meth:`snapshot`
        writes the index back into ``directory``. Raises ValueError naming the folder when
        it is neither (or damaged)."""
        _ray("ShardedIndex.open()")
        root = Path(os.fspath(directory)).resolve()
        if (root / MANIFEST).exists():
            index = cls.load(root, threads_per_shard=threads_per_shard,
                             actor_options=actor_options)
        else:
            if not (root / "mipscan.json").is_file():
                raise ValueError(f"ShardedIndex.open(): {str(root)!r} is not a mipscan index "
                                 f"folder (no mipscan.json or {MANIFEST})")
            searcher = mipscan.load_searcher(root, mmap=True, verify=True)
            meta = {"d": int(searcher.d), "distance_measure": searcher.distance_measure,
                    "num_neighbors": int(searcher.num_neighbors)}
            entry = {"folder": root.name, "n": int(searcher.size()), "docids": None}
            del searcher
            index = cls(meta, [("folder", str(root.parent), entry)],
                        threads_per_shard=threads_per_shard, actor_options=actor_options)
            index.plain = True
        index.folder = root
        return index

    def snapshot(self) -> None:
        """Writes the index, with its updates, back into the folder :meth:`open` read
        (atomically, as :meth:`serialize` and :meth:`mipscan.Searcher.serialize` do)."""
        if self.folder is None:
            raise ValueError("ShardedIndex.snapshot(): this index was not made by open(); "
                             "use serialize(directory)")
        if not self.plain:
            self.serialize(self.folder)
            return
        with self._write_lock:
            self._call_all("serialize", str(self.folder), None)
            with self._lock:
                self._log, self._updates = [[]], [0]  # the folder holds every update

    # -------------------------------------------------------------- actors
    def _start(self, i: int):
        """A new actor for shard ``i`` from its source (the caller holds the lock or is
        the constructor)."""
        source = self._sources[i]
        # A built shard is passed as its object reference (Ray resolves it, and keeps it
        # while this index holds it, so a restart can use it again).
        arg = source[1] if source[0] == "built" else source
        return self._actor_class.options(**self._actor_options).remote(
            i, arg, self.threads_per_shard)

    def _restart(self, i: int, dead) -> None:
        """Replaces shard ``i``'s actor ``dead`` (unless another thread already did) and
        replays the updates made since its source was written."""
        with self._lock:
            if self._actors[i] is not dead:
                return
            try:
                self._ray.kill(dead, no_restart=True)
            except Exception:  # already gone
                pass
            actor = self._start(i)
            self._ray.get(actor.info.remote())  # raises here if its source cannot load
            for method, args in self._log[i]:
                self._ray.get(getattr(actor, method).remote(*args))
            self._actors[i] = actor

    def _restart_or_raise(self, i: int, dead) -> None:
        """:meth:`_restart`, or ShardUnavailableError naming the shard and its source."""
        try:
            self._restart(i, dead)
        except Exception as exc:  # noqa: BLE001 (reported with the shard)
            raise ShardUnavailableError(
                f"ShardedIndex: shard {i} of {self.num_shards} died and could not be "
                f"started again from {self._source_name(i)}: "
                f"{type(exc).__name__}: {_first_line(exc)}", i) from exc

    def _source_name(self, i: int) -> str:
        source = self._sources[i]
        return (f"folder {str(Path(source[1]) / source[2]['folder'])!r}"
                if source[0] == "folder" else "the built shard in Ray's object store")

    def _call_all(self, method: str, *args, shards=None) -> list:
        """Calls ``method`` on every shard (or the ``shards`` given as {i: args}) and
        returns the results by shard; restarts dead shards and resends their call."""
        ray = self._ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        calls = {i: args for i in range(self.num_shards)} if shards is None else dict(shards)
        results: dict[int, Any] = {}
        attempt = 0
        while calls:
            actors = {i: self._actors[i] for i in calls}
            refs = {i: getattr(actors[i], method).remote(*a) for i, a in calls.items()}
            failed: dict[int, BaseException] = {}
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref)
                except (RayActorError, ActorUnavailableError) as exc:
                    failed[i] = exc
            if not failed:
                break
            attempt += 1
            for i, exc in failed.items():
                if attempt > self.retries:
                    raise ShardUnavailableError(
                        f"ShardedIndex: shard {i} of {self.num_shards} ({self._source_name(i)}) "
                        f"did not answer {method}() after {self.retries} restarts: "
                        f"{type(exc).__name__}: {_first_line(exc)}", i) from exc
                self._restart_or_raise(i, actors[i])
            time.sleep(self.retry_wait * (attempt - 1))
            calls = {i: calls[i] for i in failed}
        return [results[i] for i in sorted(results)]

    def actors(self) -> list:
        """The shard actors' handles, by shard (for monitoring and fault tests)."""
        return list(self._actors)

    # -------------------------------------------------------------- searching
    def search_batched(self, queries, final_num_neighbors: int | None = None,
                       pre_reorder_num_neighbors: int | None = None,
                       leaves_to_search: int | None = None) -> SearchResult:
        """Top ``final_num_neighbors`` docids (int64) and scores (float32) of each row of
        ``queries`` (nq, d), best first, over all shards. The other arguments go to every
        shard's search (see :meth:`mipscan.Searcher.search`; k and pre-reorder counts are
        clamped to each shard's size). Raises ShardUnavailableError naming a shard that
        cannot answer; never returns a partial result."""
        call = "ShardedIndex.search_batched()"
        q = _check_queries(call, queries, self.d, 2)
        return self._search(call, q)(final_num_neighbors, pre_reorder_num_neighbors,
                                     leaves_to_search)

    def search(self, q, final_num_neighbors: int | None = None,
               pre_reorder_num_neighbors: int | None = None,
               leaves_to_search: int | None = None) -> SearchResult:
        """One query (d,): SearchResult of (k,) arrays; see :meth:`search_batched`."""
        call = "ShardedIndex.search()"
        q = _check_queries(call, q, self.d, 1)
        ids, scores = self._search(call, q[None, :])(final_num_neighbors,
                                                     pre_reorder_num_neighbors,
                                                     leaves_to_search)
        return SearchResult(ids[0], scores[0])

    def _search(self, call: str, q: np.ndarray):
        def run(k, pre_k, leaves):
            k, pre_k, leaves = _check_search(call, k, pre_k, leaves, self.num_neighbors,
                                             self.n)
            q_ref = self._ray.put(q) if q.nbytes > 100_000 else q
            # The updates finished before the search was sent: a shard must have applied
            # at least those (it may have applied one that is finishing concurrently).
            expected = list(self._updates)
            answers = self._call_all("search", q_ref, k, pre_k, leaves)
            for i, answer in enumerate(answers):
                if answer is None or answer[2] < expected[i]:
                    raise ShardUnavailableError(
                        f"{call}: shard {i} answered with "
                        f"{'its index retired' if answer is None else f'{answer[2]} updates'}"
                        f" applied, expected {expected[i]}", i)
            return merge([(a[0], a[1]) for a in answers], k, self.distance_measure)
        return run

    def size(self) -> int:
        """Datapoints over all shards."""
        return self.n

    # -------------------------------------------------------------- updates
    def _route(self, call: str, docids, vectors=None) -> dict:
        if not _live():
            raise NotImplementedError(
                f"{call}: this mipscan's Searcher cannot be updated in place (no upsert/"
                f"delete); rebuild the shards with ShardedIndex.build()")
        ids = np.asarray(docids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{call}: docids must be a 1-D int array; got {ids.dtype} "
                             f"{ids.shape}")
        ids = ids.astype(np.int64)
        if vectors is not None:
            vectors = _check_queries(call, vectors, self.d, 2)
            if len(vectors) != len(ids):
                raise ValueError(f"{call}: {len(ids)} docids but {len(vectors)} vectors")
        owner = shard_of(ids, self.num_shards)
        out = {}
        for s in np.unique(owner):
            rows = np.flatnonzero(owner == s)
            out[int(s)] = (ids[rows],) if vectors is None else (ids[rows], vectors[rows])
        return out

    def _update(self, method: str, calls: dict) -> None:
        # The log replays these, in order, on a shard that restarts from its source.
        with self._write_lock:
            if method == "delete":  # all or nothing: an unknown docid deletes none
                for i, missing in zip(calls, self._call_all("missing", shards=calls)):
                    if missing is not None:
                        raise KeyError(f"ShardedIndex.delete(): docid {missing} is not in "
                                       f"the index (shard {i}); nothing was deleted")
            self._call_all(method, shards=calls)
            for i, args in calls.items():
                self._log[i].append((method, args))
                self._updates[i] += 1
            self.n = int(sum(r["n"] for r in self._call_all("info")))

    def upsert(self, docids, vectors) -> None:
        """Inserts or replaces ``vectors`` (m, d) under ``docids`` (m,), each on its owning
        shard. Raises NotImplementedError where the Searcher has no upsert."""
        self._update("upsert", self._route("ShardedIndex.upsert()", docids, vectors))

    def delete(self, docids) -> None:
        """Deletes ``docids`` from their owning shards; an unknown docid raises KeyError
        (from its shard). Raises NotImplementedError where the Searcher has no delete."""
        self._update("delete", self._route("ShardedIndex.delete()", docids))

    # -------------------------------------------------------------- persistence
    def serialize(self, directory) -> None:
        """Writes every shard into ``directory`` (one index folder per shard, written by
        its actor, so the folder must be reachable from every node) and then the manifest
        (atomically, with checksums). The previous generation in ``directory``, if any,
        is removed after the manifest names the new one. Shards that die later restart
        from these folders."""
        call = "ShardedIndex.serialize()"
        root = _prepare_root(call, directory)
        generation = _new_generation()
        with self._write_lock:  # no update between the shards' files and the log reset
            entries = self._call_all("serialize", str(root), generation)
            _commit(root, self.meta, entries, generation)
            with self._lock:
                self._sources = [("folder", str(root), e) for e in entries]
                # The folders hold every update: a restarted shard replays none, so it
                # must have applied none of its own (the live ones count more: fine).
                self._log = [[] for _ in entries]
                self._updates = [0] * len(entries)

    def shutdown(self) -> None:
        """Ends the shard actors."""
        for actor in self._actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        self._actors = []

    def __getstate__(self) -> dict:
        # Actor handles pickle (Ray keeps the actors alive while any copy holds them);
        # the lock and the ray module do not. A copy (in a task, a Serve replica) searches
        # the same actors; a shard it restarts is its own replacement.
        state = dict(self.__dict__)
        for name in ("_lock", "_write_lock", "_ray", "_actor_class"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ray = _ray("ShardedIndex")
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._actor_class = self._ray.remote(_Shard)

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"ShardedIndex(n={self.n}, d={self.d}, num_shards={self.num_shards}, "
                f"distance_measure={self.distance_measure!r}, shard_sizes={self.shard_sizes})")


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:500] if lines else ""


def _build_task(vectors, docids, num_neighbors, distance_measure, configure, root, shard,
                generation):
    """Ray task: builds one shard; writes it under ``root`` and returns its manifest entry,
    or returns (searcher, docids) when ``root`` is None."""
    searcher, ids = _build_one(np.ascontiguousarray(vectors, dtype=np.float32), docids,
                               num_neighbors, distance_measure, configure)
    if root is None:
        return searcher, ids
    return _write_shard(searcher, ids, Path(root), shard, generation)


def _new_generation() -> str:
    return f"{time.time_ns():x}{secrets.token_hex(3)}"


def _prepare_root(call: str, directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{call}: directory must be a str or os.PathLike; got "
                        f"{type(directory).__name__}")
    root = Path(os.fspath(directory)).resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{call}: {str(root)!r} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise ValueError(f"{call}: {str(root)!r} is a non-empty folder without {MANIFEST}; "
                         f"give an empty folder, a new path or a sharded index to replace")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _commit(root: Path, meta: dict, entries: list[dict], generation: str) -> None:
    """Flips the manifest to ``entries`` atomically, then removes the files of the
    generation it replaced."""
    old = None
    if (root / MANIFEST).exists():
        try:
            old = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError):
            old = None
    manifest = {"format": FORMAT, "version": VERSION, "generation": generation,
                "num_shards": len(entries), "n": int(sum(e["n"] for e in entries)),
                "hash": "splitmix64(docid) % num_shards", "meta": meta, "shards": entries}
    manifest["sha256"] = _manifest_digest(manifest)
    _write_atomic(root / MANIFEST, json.dumps(manifest, indent=1).encode())
    if isinstance(old, dict) and old.get("generation") != generation:
        keep = {e["folder"] for e in entries} | {e["docids"] for e in entries if e["docids"]}
        for e in old.get("shards") or []:
            for name in (e.get("folder"), e.get("docids")):
                if not name or name in keep or "/" in name or name.startswith("."):
                    continue
                path = root / name
                if path.is_dir():
                    for f in path.iterdir():
                        f.unlink()
                    path.rmdir()
                elif path.is_file():
                    path.unlink()


# ---------------------------------------------------------------- one index, many processes
class _Owner:
    """Ray actor: the one owner of a ShardedIndex that several processes share (the Ray
    Serve replicas of ``mipscan serve --ray``). Those search its shard actors directly
    (:class:`SharedIndex`); updates, snapshots, reloads and shard restarts come here and
    run one at a time (an actor runs one call at a time), so the update log that a
    restarted shard replays is complete and in order, and a shard is restarted once."""

    def __init__(self, directory: str, threads_per_shard: int, actor_options: dict | None):
        self.options = {"threads_per_shard": threads_per_shard, "actor_options": actor_options}
        self.index = ShardedIndex.open(directory, **self.options)
        self.epoch = 1  # + 1 per reload: the shard actors that answer
        self.loaded_at = time.time()

    def view(self) -> dict:
        ix = self.index
        return {"epoch": self.epoch, "actors": ix.actors(), "n": ix.n, "d": ix.d,
                "owner_pid": os.getpid(),
                "distance_measure": ix.distance_measure, "num_neighbors": ix.num_neighbors,
                "plain": ix.plain, "folder": str(ix.folder), "loaded_at": self.loaded_at,
                "shards": ix._call_all("info")}

    def restore(self, epoch: int, shard: int, actor_id: str) -> dict:
        """Restarts ``shard`` if ``actor_id`` still serves it (a caller saw it fail);
        returns the current view. Raises ShardUnavailableError naming the shard."""
        actor = self.index.actors()[shard]
        if epoch == self.epoch and actor._actor_id.hex() == actor_id:
            self.index._restart_or_raise(shard, actor)
        return self.view()

    def upsert(self, docids, vectors) -> int:
        self.index.upsert(docids, vectors)
        return self.index.n

    def delete(self, docids) -> int:
        self.index.delete(docids)
        return self.index.n

    def snapshot(self) -> int:
        self.index.snapshot()
        return self.index.n

    def reload(self) -> dict:
        """Starts the shards of the folder aside (a damaged folder raises ValueError and
        the current shards keep serving), switches to them, retires the old ones (a caller
        still holding one is answered None and fetches the new view), then ends them."""
        new = ShardedIndex.open(self.index.folder, **self.options)
        old, self.index = self.index, new
        self.epoch += 1
        self.loaded_at = time.time()
        ray = old._ray
        for ref in [actor.retire.remote() for actor in old.actors()]:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 (a dead old shard needs no retiring)
                pass
        old.shutdown()
        return self.view()

    def shutdown(self) -> None:
        self.index.shutdown()


def share(directory, *, threads_per_shard: int = 1, actor_options: dict | None = None,
          name: str | None = None):
    """Starts the owner actor of the index in ``directory`` (a sharded folder, or a plain
    index folder as one shard; see :meth:`ShardedIndex.open`) and returns its handle, for
    :class:`SharedIndex` in any process of the cluster. Raises ValueError for a folder that
    is not a valid index. With ``name``, the actor is
    ``ray.get_actor(name, namespace="mipscan")``. End it with ``SharedIndex(owner).close()``."""
    ray = _ray("share()")
    options = {"num_cpus": 0, "max_restarts": 0}
    if name is not None:
        options.update(name=name, namespace="mipscan")
    owner = ray.remote(_Owner).options(**options).remote(
        str(Path(os.fspath(directory)).resolve()), threads_per_shard, actor_options)
    try:
        _unwrap(ray, lambda: ray.get(owner.view.remote()))
    except BaseException:
        ray.kill(owner, no_restart=True)
        raise
    return owner


def _owner_error(ray, exc: BaseException) -> BaseException | None:
    """What an owner call's ``exc`` is raised as: the remote call's own exception
    (KeyError, ValueError, ShardUnavailableError, ...) instead of Ray's wrapper of it, and
    ShardUnavailableError (shard None) when the owner itself is gone; None: ``exc`` as is."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, Exception) else None
    if isinstance(exc, ray.exceptions.RayActorError):
        # Its shard actors went with it (an actor's actors share its fate); restarting it
        # from the folder would drop the updates made since: say so instead.
        return ShardUnavailableError(
            "the index's owner actor died, and the shards with it; start the service again "
            f"(updates since the last snapshot are lost): {_first_line(exc)}", None)
    return None


def _unwrap(ray, call: Callable):
    """``call()`` of the owner; its errors as :func:`_owner_error` says."""
    try:
        return call()
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
        err = _owner_error(ray, exc)
        if err is None:
            raise
        raise err from None


async def _unwrap_async(ray, ref):
    """As :func:`_unwrap`, awaiting ``ref``."""
    try:
        return await ref
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
        err = _owner_error(ray, exc)
        if err is None:
            raise
        raise err from None


class SharedIndex:
    """A handle of the ShardedIndex owned by :func:`share`'s actor, for any process of the
    cluster (it pickles as the owner's handle). Searches go straight to the shard actors
    and are merged here; updates, snapshots and reloads go through the owner, so every
    handle sees them at once: a search sent after an update returned includes it.

    A search never mixes two indexes or returns a partial result: when a shard fails, the
    owner restarts it (once, whoever noticed) and the whole search is sent again; when a
    reload retired the shards, the search is sent to the new ones; after ``retries``
    attempts it raises :class:`ShardUnavailableError` naming the shard.
    """

    def __init__(self, owner, retries: int = 3):
        self._ray = _ray("SharedIndex")
        self.owner, self.retries = owner, retries
        self._set(self._call("view"))

    def __reduce__(self):
        return (SharedIndex, (self.owner, self.retries))

    def _call(self, method: str, *args):
        return _unwrap(self._ray, lambda: self._ray.get(getattr(self.owner, method).remote(*args)))

    def _set(self, view: dict) -> None:
        if view["epoch"] < getattr(self, "_view", view)["epoch"]:
            return  # fetched before a reload that another thread has already seen
        self._view = view  # one assignment: a search reads the view once
        self.n = int(view["n"])
        self.shard_sizes = [int(s["n"]) for s in view["shards"]]

    # Read from the current view (a reload may change them).
    d = property(lambda self: int(self._view["d"]))
    distance_measure = property(lambda self: self._view["distance_measure"])
    num_neighbors = property(lambda self: int(self._view["num_neighbors"]))
    num_shards = property(lambda self: len(self._view["actors"]))
    generation = property(lambda self: int(self._view["epoch"]))
    shards = property(lambda self: list(self._view["shards"]))
    num_leaves = property(lambda self: max(s["num_leaves"] for s in self._view["shards"]))
    max_leaves_to_search = property(
        lambda self: min(s["max_leaves_to_search"] for s in self._view["shards"]))

    def size(self) -> int:
        """Datapoints over all shards, as of this handle's last search or update."""
        return self.n

    def _prepare(self, call: str, queries, k, pre_k, leaves) -> tuple:
        q = _check_queries(call, queries, self.d, 2)
        k, pre_k, leaves = _check_search(call, k, pre_k, leaves, self.num_neighbors, self.n)
        return (self._ray.put(q) if q.nbytes > 100_000 else q), k, pre_k, leaves

    def _settle(self, view: dict, answers: list, k: int):
        """The merged result of one round of shard answers (results or exceptions, by
        shard), or the owner call ``(method, args)`` that gets the view to retry on."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        for i, a in enumerate(answers):
            if isinstance(a, (RayActorError, ActorUnavailableError)):
                # The owner restarts it (or raises naming it).
                return "restore", (view["epoch"], i, view["actors"][i]._actor_id.hex())
            if isinstance(a, BaseException):
                raise a
        if any(a is None for a in answers):  # retired by a reload
            return "view", ()
        self.shard_sizes = [int(a[3]) for a in answers]
        self.n = int(sum(self.shard_sizes))
        return merge([(a[0], a[1]) for a in answers], k, view["distance_measure"])

    def _gave_up(self, call: str, step) -> ShardUnavailableError:
        shard = step[1][1] if step[0] == "restore" else 0
        return ShardUnavailableError(f"{call}: shard {shard} did not answer after "
                                     f"{self.retries} restarts", shard)

    def search_batched(self, queries, final_num_neighbors: int | None = None,
                       pre_reorder_num_neighbors: int | None = None,
                       leaves_to_search: int | None = None) -> SearchResult:
        """As :meth:`ShardedIndex.search_batched`."""
        call = "SharedIndex.search_batched()"
        ray = self._ray
        q_ref, k, pre_k, leaves = self._prepare(call, queries, final_num_neighbors,
                                                pre_reorder_num_neighbors, leaves_to_search)
        for _ in range(self.retries + 1):
            view = self._view
            refs = [actor.search.remote(q_ref, k, pre_k, leaves) for actor in view["actors"]]
            answers = []
            for ref in refs:
                try:
                    answers.append(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 (sorted out by _settle)
                    answers.append(exc)
            step = self._settle(view, answers, k)
            if isinstance(step, SearchResult):
                return step
            self._set(self._call(step[0], *step[1]))
        raise self._gave_up(call, step)

    async def search_batched_async(self, queries, final_num_neighbors: int | None = None,
                                   pre_reorder_num_neighbors: int | None = None,
                                   leaves_to_search: int | None = None) -> SearchResult:
        """:meth:`search_batched` on the caller's event loop (it awaits the shards'
        answers instead of blocking a thread): what the Ray Serve replicas use."""
        import asyncio

        call = "SharedIndex.search_batched()"
        q_ref, k, pre_k, leaves = self._prepare(call, queries, final_num_neighbors,
                                                pre_reorder_num_neighbors, leaves_to_search)
        for _ in range(self.retries + 1):
            view = self._view
            answers = await asyncio.gather(
                *[actor.search.remote(q_ref, k, pre_k, leaves) for actor in view["actors"]],
                return_exceptions=True)
            step = self._settle(view, answers, k)
            if isinstance(step, SearchResult):
                return step
            self._set(await _unwrap_async(self._ray,
                                          getattr(self.owner, step[0]).remote(*step[1])))
        raise self._gave_up(call, step)

    search_batched_parallel = search_batched  # the shards search with their own threads

    def search(self, q, final_num_neighbors: int | None = None,
               pre_reorder_num_neighbors: int | None = None,
               leaves_to_search: int | None = None) -> SearchResult:
        """One query (d,): SearchResult of (k,) arrays."""
        q = _check_queries("SharedIndex.search()", q, self.d, 1)
        ids, scores = self.search_batched(q[None, :], final_num_neighbors,
                                          pre_reorder_num_neighbors, leaves_to_search)
        return SearchResult(ids[0], scores[0])

    def upsert(self, docids, vectors) -> None:
        """As :meth:`ShardedIndex.upsert`, through the owner."""
        self.n = self._call("upsert", docids, vectors)

    def delete(self, docids) -> None:
        """As :meth:`ShardedIndex.delete` (all or nothing), through the owner."""
        self.n = self._call("delete", docids)

    def snapshot(self) -> None:
        """As :meth:`ShardedIndex.snapshot`, through the owner."""
        self.n = self._call("snapshot")

    def reload(self) -> None:
        """Restarts the shards from the folder, atomically for every handle (see
        ``_Owner.reload``). Raises ValueError for a damaged folder (the old shards keep
        serving)."""
        self._set(self._call("reload"))

    def refresh(self) -> None:
        """Fetches the owner's current view (size, shards) now."""
        self._set(self._call("view"))

    def close(self) -> None:
        """Ends the shard actors and the owner."""
        try:
            self._call("shutdown")
        finally:
            self._ray.kill(self.owner, no_restart=True)


# ---------------------------------------------------------------- batch retrieval
class _LocalIndex:
    """An index folder (plain or sharded) memory-mapped in this process; searches all of
    it with the engine's threads and merges shards like ShardedIndex."""

    def __init__(self, index_dir: str, num_threads: int | None):
        root = Path(index_dir)
        if (root / MANIFEST).exists():
            manifest = read_manifest(root)
            self.shards = [_load_shard(root, e) for e in manifest["shards"]]
            self.distance_measure = manifest["meta"]["distance_measure"]
        else:
            self.shards = [(mipscan.load_searcher(root, mmap=True), None)]
            self.distance_measure = self.shards[0][0].distance_measure
        for searcher, _ in self.shards:
            if num_threads is not None:
                searcher.set_num_threads(num_threads)
        self.d = self.shards[0][0].d
        self.n = sum(s.size() for s, _ in self.shards)

    def search(self, q: np.ndarray, k: int, pre_k, leaves) -> SearchResult:
        parts = []
        for searcher, docids in self.shards:
            m = searcher.size()
            ids, scores = searcher.search_batched_parallel(
                q, final_num_neighbors=min(k, m),
                pre_reorder_num_neighbors=None if pre_k is None else min(pre_k, m),
                leaves_to_search=leaves)
            ids = np.asarray(ids)
            parts.append((docids[ids] if docids is not None else ids.astype(np.int64), scores))
        return parts[0] if len(parts) == 1 else merge(parts, k, self.distance_measure)


class _BatchSearcher:
    """map_batches callable class: maps the index once per worker, then searches batches."""

    def __init__(self, index_dir: str, k: int, vector_column: str, keep_columns: tuple,
                 num_threads: int | None, pre_k, leaves):
        self.index = _LocalIndex(index_dir, num_threads)
        self.k, self.vector_column, self.keep = k, vector_column, keep_columns
        self.pre_k, self.leaves = pre_k, leaves

    def __call__(self, batch: dict) -> dict:
        q = np.ascontiguousarray(np.stack(batch[self.vector_column]) if
                                 batch[self.vector_column].dtype == object else
                                 batch[self.vector_column], dtype=np.float32)
        ids, scores = self.index.search(q, self.k, self.pre_k, self.leaves)
        out = {c: batch[c] for c in self.keep}
        out["neighbors"] = np.asarray(ids, np.int64)
        out["distances"] = np.asarray(scores, np.float32)
        return out


def batch_search(queries, index_dir, k: int = 10, *, vector_column: str = "vector",
                 keep_columns=None, output_path=None, batch_size: int = 4096,
                 num_threads: int | None = None, concurrency: int = 1, num_cpus: float = 1,
                 pre_reorder_num_neighbors: int | None = None,
                 leaves_to_search: int | None = None):
    """Top-``k`` retrieval for every query of a Ray Dataset, with Ray Data ``map_batches``.

    Each of ``concurrency`` workers memory-maps ``index_dir`` once (a folder written by
    :meth:`mipscan.Searcher.serialize` or :meth:`ShardedIndex.serialize`; every node must
    read it) and searches each batch with ``search_batched_parallel`` on ``num_threads``
    engine threads (default: mipscan's default). Each worker reserves ``num_cpus`` CPUs of
    Ray's (default 1, so that the stages feeding it can run beside it on a small cluster;
    reserving as many as the threads it runs deadlocks a 2-CPU cluster whose other stage
    needs a CPU).

    Args:
        queries: a Ray Dataset with ``vector_column``, or a (nq, d) array (made into a
            Dataset with columns ``query_id`` = row number and ``vector``).
        index_dir: the index folder.
        k: neighbours per query.
        keep_columns: columns copied to the output (default: every column but the vector).
        output_path: when given, the results are written there as Parquet and the
            path is returned; otherwise the (lazy) result Dataset is returned.
        batch_size: queries per map_batches call.

    Returns:
        A Dataset with the kept columns plus ``neighbors`` (k int64: docids, or row
        numbers of a plain index) and ``distances`` (k float32), or ``output_path``.

    Example::

        ds = batch_search(users, "index/", k=10)
        top = ds.to_pandas()
    """
    ray = _ray("batch_search()")
    call = "batch_search()"
    k = _check_k(call, "k", k, 1, None)
    concurrency = _check_k(call, "concurrency", concurrency, 1, None)
    index_dir = str(Path(os.fspath(index_dir)).resolve())
    if not (Path(index_dir) / MANIFEST).exists() and not (Path(index_dir) / "mipscan.json").exists():
        raise ValueError(f"{call}: {index_dir!r} is not a mipscan index folder (no mipscan.json "
                         f"or {MANIFEST})")
    if isinstance(queries, np.ndarray):
        import pyarrow as pa
        from ray.data.extensions import ArrowTensorArray

        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"{call}: queries must be (nq, d); got shape {q.shape}")
        table = pa.table({"query_id": np.arange(len(q), dtype=np.int64),
                          vector_column: ArrowTensorArray.from_numpy(q)})
        queries = ray.data.from_arrow(table)
    if keep_columns is None:
        keep_columns = [c for c in queries.schema().names if c != vector_column]
    out = queries.map_batches(
        _BatchSearcher, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
        fn_constructor_args=(index_dir, k, vector_column, tuple(keep_columns), num_threads,
                             pre_reorder_num_neighbors, leaves_to_search))
    if output_path is None:
        return out
    out.write_parquet(os.fspath(output_path))
    return output_path
