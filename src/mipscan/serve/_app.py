"""The ASGI app of ``mipscan serve`` (Starlette): JSON endpoints over one live searcher.

One reference, ``_State.searcher``, names the index that answers. A request reads it
once and keeps that searcher to the end, so ``/reload`` (which loads the folder aside and
then rebinds the reference) never fails or mixes an in-flight search: it finishes on the
index it started on. Write endpoints take one asyncio lock, so updates, snapshots and
reloads never interleave. Searches, the parsing and checks of large bodies, loads and
writes run on worker threads (one pool per app), never on the event loop. POST /search
goes straight from the outer ASGI layer to its endpoint (see :class:`_Observe`).

Every request a client can get wrong is answered with a 4xx JSON body
``{"error": message, "field": name}``; see :func:`create_app` for the rules.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncio
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import orjson
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import mipscan
from mipscan import _mipscan
from mipscan.distributed import ShardUnavailableError

log = logging.getLogger("mipscan.serve")

try:
    _timeout = asyncio.timeout  # Python 3.11+
except AttributeError:  # 3.10: anyio's, which raises TimeoutError too
    from anyio import fail_after as _timeout

__all__ = ["HTTPError", "Limits", "SearcherBackend", "create_app"]

#: Bodies at or above this size are parsed on a worker thread, not on the event loop.
_THREADED_JSON_BYTES = 64 << 10
#: Below this many queries a search runs on one engine thread (search_batched); from
#: here on, on the searcher's num_threads (search_batched_parallel).
_PARALLEL_MIN_QUERIES = 16
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class HTTPError(Exception):
    """A request the server refuses: ``status`` (4xx, or 501), the ``field`` at fault
    (``body``, ``queries[3]``, ``Authorization``, ...) and a message for the client."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Bodies above ``max_body_bytes`` get 413 before they
    are read in full, bodies slower than ``body_seconds`` 408; the others get 422 naming
    the field."""

    max_body_bytes: int = 16 << 20
    max_queries: int = 4096       # query rows per /search
    max_k: int = 1000             # k per query (and never above the index size)
    max_batch: int = 10_000       # docids per /upsert or /delete
    max_docid_chars: int = 256    # length of a string docid
    max_filter_ids: int = 1_000_000  # ids in allowed/excluded, all queries together
    body_seconds: float = 10.0    # to receive a body, from the end of the headers (408)


# ---------------------------------------------------------------- JSON in, JSON out
def _reject_constant(name: str):
    raise HTTPError(400, "body", f"malformed JSON: {name} is not a JSON number "
                    "(NaN and infinities are refused)")


def _no_duplicate_keys(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise HTTPError(400, "body", f"malformed JSON: the key {key[:60]!r} appears twice")
        obj[key] = value
    return obj


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (Python's json accepts them), no repeated key. A
    number that overflows a double parses as an infinity, which every field refuses
    (vectors must be finite float32; the other numbers are integers): checked there, and
    not here, where a Python call per number cost a tenth of a single query's time.

    The common body (one object, no escapes, no integer of 20 digits or more) is parsed
    by orjson, in a quarter of the time; any other, or one orjson refuses, by the
    standard library with the checks above, whose errors name the fault. orjson agrees on
    such a body: it refuses NaN and infinities too, and a repeated key, which orjson
    would let through, shows as a key that is not quoted exactly once."""
    if body.count(b"{") == 1 and b"\\" not in body and _LONG_DIGITS not in body.translate(_DIGIT_D):
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict and all(body.count(b'"%s"' % k.encode()) == 1 for k in obj):
            return obj
    try:
        return json.loads(body, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except HTTPError:
        raise
    except RecursionError:
        raise HTTPError(400, "body", "malformed JSON: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits
        raise HTTPError(400, "body", f"malformed JSON: {str(exc)[:200]}") from None


# A run of 19 digits or more: an integer orjson may turn into a float (-2**63 - 1 has 19
# digits). Found by mapping every digit to "d" and searching for the run: a regex \d{19}
# took 19 us on a single query's body, three quarters of its parse time; this takes 1.
_DIGIT_D = bytes.maketrans(b"0123456789", b"d" * 10)
_LONG_DIGITS = b"d" * 19


def _json(payload: Any, status: int = 200, headers: dict | None = None) -> Response:
    return JSONResponse(payload, status_code=status, headers=headers)


def _error(exc: HTTPError) -> Response:
    # The field and message may quote the client's text, lone surrogates included (a key
    # "\ud800"), which UTF-8 cannot encode: escaped, so the error never becomes a 500.
    return _json({"error": _printable(exc.message), "field": _printable(exc.field)},
                 exc.status, exc.headers)


def _printable(text):
    if isinstance(text, str) and not _utf8(text):
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _results(ids, scores) -> Response:
    """A search's ``{"ids", "scores"}``, encoded by orjson straight from the arrays (a
    tenth of the stdlib's time); string docids go through lists. The -inf (+inf) score
    of a filtered query's padding (id -1 or "") becomes null: JSON has no infinities."""
    try:
        body = orjson.dumps({"ids": ids, "scores": scores}, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # a numpy dtype orjson does not serialize (str docids)
        body = orjson.dumps({"ids": _rows(ids), "scores": _rows(scores)},
                            option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json")


def _rows(x) -> list:
    """(nq, k) results, or one sequence per query, as nested lists of JSON scalars."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    return [np.asarray(r).tolist() for r in x]


# ---------------------------------------------------------------- field checks
def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _check_fields(body: Any, allowed: tuple[str, ...], required: tuple[str, ...], what: str
                  ) -> dict:
    if not isinstance(body, dict):
        raise HTTPError(422, "body", f"{what} takes a JSON object; got {_type_name(body)}")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise HTTPError(422, unknown[0], f"unknown field {unknown[0][:60]!r}; {what} takes "
                        + (", ".join(allowed) if allowed else "no fields"))
    for name in required:
        if name not in body:
            raise HTTPError(422, name, f"missing field {name!r}")
    return body


def _int_field(body: dict, name: str, low: int, high: int, high_name: str, default=None):
    value = body.get(name)
    if value is None:
        if name in body:
            raise HTTPError(422, name, f"{name} must be an integer; got null")
        return default
    if type(value) is not int:
        raise HTTPError(422, name, f"{name} must be an integer; got {_type_name(value)}")
    if not low <= value <= high:
        raise HTTPError(422, name, f"{name} must be in [{low}, {high_name}={high}]; got {value}")
    return value


def _vectors(value: Any, name: str, d: int, max_rows: int) -> np.ndarray:
    """A non-empty list of at most ``max_rows`` lists of ``d`` finite numbers -> float32."""
    if not isinstance(value, list):
        raise HTTPError(422, name, f"{name} must be a list of vectors (lists of {d} numbers); "
                        f"got {_type_name(value)}")
    if not value:
        raise HTTPError(422, name, f"{name} must not be empty")
    if len(value) > max_rows:
        raise HTTPError(422, name, f"{name} holds {len(value)} vectors; at most {max_rows} "
                        "per request")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] must be a list of {d} numbers; "
                            f"got {_type_name(row)}")
        if len(row) != d:
            raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] has {len(row)} features, but "
                            f"the index expects {d} features")
    kinds = {type(x) for row in value for x in row}
    if not kinds <= {float, int}:
        bad = next(t for t in kinds if t not in (float, int))
        i = next(i for i, row in enumerate(value) if any(type(x) is bad for x in row))
        raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] must hold numbers only; found "
                        f"{_type_name(bad())}")
    try:
        arr = np.array(value, dtype=np.float64)
    except (OverflowError, ValueError):  # an integer too large for a double
        raise HTTPError(422, name, f"{name} holds a number out of float32 range") from None
    with np.errstate(over="ignore"):
        arr32 = arr.astype(np.float32)
    if not math.isfinite(_mipscan.max_abs(arr32)):  # one pass, no temporary
        i = int(np.nonzero(~np.isfinite(arr32).all(axis=1))[0][0])
        raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] holds a number out of float32 range")
    return np.ascontiguousarray(arr32)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _docids(value: Any, name: str, limits: Limits) -> list:
    """A non-empty list of distinct docids, all integers >= 0 or all non-empty strings."""
    if not isinstance(value, list):
        raise HTTPError(422, name, f"{name} must be a list of docids; got {_type_name(value)}")
    if not value:
        raise HTTPError(422, name, f"{name} must not be empty")
    if len(value) > limits.max_batch:
        raise HTTPError(422, name, f"{name} holds {len(value)} docids; at most "
                        f"{limits.max_batch} per request")
    kind = type(value[0])
    for i, v in enumerate(value):
        if type(v) is not kind or kind not in (int, str):
            raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] must be "
                            + ("an integer or a string" if i == 0 else
                               f"{_type_name(value[0])} like {name}[0]")
                            + f"; got {_type_name(v)}")
        if kind is int and not 0 <= v < 2**63:
            raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] must be in [0, 2**63); got {v}")
        if kind is str and not 1 <= len(v) <= limits.max_docid_chars:
            raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] must be 1 to "
                            f"{limits.max_docid_chars} characters; got {len(v)}")
        if kind is str and not _utf8(v):  # a lone surrogate (JSON's "\ud800") could
            # be stored, then never be sent back in a search's answer
            raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] is not valid Unicode "
                            "(a lone surrogate)")
    if len(set(value)) != len(value):
        seen = set()
        for i, v in enumerate(value):
            if v in seen:
                raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] = {str(v)[:60]!r} appears "
                                "more than once")
            seen.add(v)
    return value


# ---------------------------------------------------------------- the live index
def _config(searcher) -> Any:
    cfg = searcher.config
    return _jsonable(cfg() if callable(cfg) else cfg)  # issue 13: config() is a method


def _jsonable(x: Any) -> Any:
    """A config as JSON: numpy scalars as Python, non-finite floats as strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _accepts(method, name: str) -> bool:
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class SearcherBackend:
    """The index behind the endpoints: one searcher in this process, loaded from
    ``index_dir``. Another backend (``mipscan.serve._ray``: a sharded index on Ray actors)
    offers the same names; the handlers parse and check requests and call only these:

    - ``reader()``: the searcher-like object a request uses to its end (``d``, ``size()``,
      ``num_neighbors``, ``num_leaves``, ``max_leaves_to_search``, ``search_batched``,
      ``search_batched_parallel``);
    - ``size()``, ``generation`` (1 + reloads), ``loaded_at``, ``name``, ``describe()``
      (the index's part of ``/stats``), ``writes()`` (which updates it has);
    - blocking, run off the event loop under the app's write lock, each returning the new
      size: ``upsert(docids, vectors)``, ``delete(docids)``, ``snapshot()``, ``reload()``
      (ValueError/OSError: the folder was refused and the old index keeps serving).
    """

    def __init__(self, index_dir, searcher=None, threads: int | None = None):
        self.index_dir = Path(index_dir)
        self.name = self.index_dir.name
        self.threads = threads
        if searcher is None:
            searcher = mipscan.load_searcher(self.index_dir, mmap=True, verify=True)
        self.searcher = self._prepare(searcher)
        self.generation = 1
        self.loaded_at = time.time()

    def _prepare(self, searcher):
        if self.threads is not None:
            searcher.set_num_threads(self.threads)
        return searcher

    def reader(self):
        return self.searcher

    def size(self) -> int:
        return self.searcher.size()

    def describe(self) -> dict:
        s = self.searcher
        return {"size": s.size(), "d": s.d, "distance_measure": s.distance_measure,
                "num_leaves": s.num_leaves, "num_threads": s.num_threads,
                "index_bytes": getattr(s, "index_bytes", None), "config": _config(s)}

    def writes(self) -> dict:
        return {"upsert": hasattr(self.searcher, "upsert"),
                "delete": hasattr(self.searcher, "delete")}

    def upsert(self, docids: list, vectors: np.ndarray) -> int:
        self.searcher.upsert(docids, vectors)
        return self.searcher.size()

    def delete(self, docids: list) -> int:
        self.searcher.delete(docids)
        return self.searcher.size()

    def snapshot(self) -> int:
        self.searcher.serialize(self.index_dir)
        return self.searcher.size()

    def reload(self) -> int:
        new = self._prepare(mipscan.load_searcher(self.index_dir, mmap=True, verify=True))
        # One rebinding of one attribute: requests that already read the old reference
        # keep it (and its arrays) alive until they finish.
        self.searcher = new
        self.generation += 1
        self.loaded_at = time.time()
        return new.size()


class _State:
    def __init__(self, backend):
        self.backend = backend
        self.started = time.monotonic()


class _Metrics:
    def __init__(self, state: _State):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mipscan_requests", "HTTP requests answered",
                                ["endpoint", "method", "status"], registry=r)
        self.errors = Counter("mipscan_request_errors", "requests answered with a 4xx or 5xx",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("mipscan_request_duration_seconds",
                                 "time from the request to the end of the response",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queries = Counter("mipscan_queries", "query vectors searched", registry=r)
        self.reloads = Counter("mipscan_reloads", "index reloads", ["result"], registry=r)
        self.gauges(state)
        self._children: dict = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        method = method if method in ("GET", "POST") else "other"
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:  # bounded: known endpoints x methods x statuses
            children = self._children[key] = (
                self.requests.labels(endpoint, method, str(status)),
                self.errors.labels(endpoint, str(status)) if status >= 400 else None,
                self.latency.labels(endpoint))
        children[0].inc()
        if children[1] is not None:
            children[1].inc()
        children[2].observe(seconds)

    def gauges(self, state: "_State") -> None:
        r = self.registry
        Gauge("mipscan_index_size", "datapoints in the serving index",
              registry=r).set_function(lambda: state.backend.size())
        Gauge("mipscan_index_generation", "1 + successful reloads",
              registry=r).set_function(lambda: state.backend.generation)
        Gauge("mipscan_uptime_seconds", "seconds since the server started",
              registry=r).set_function(lambda: time.monotonic() - state.started)


# Endpoint labels: known paths only, so clients cannot grow the metrics without bound.
_ENDPOINTS = ("/search", "/upsert", "/delete", "/snapshot", "/reload", "/healthz", "/stats",
              "/metrics", "/", "/page.js", "/page/users", "/page/recommend")


class _Observe:
    """Outermost ASGI layer: Host check, request counts, latency, errors. ``direct`` maps
    a (method, path) to its endpoint, called here without Starlette's router and
    middleware: for POST /search they cost a tenth of a single query's server time, and
    the endpoint turns every error into its response itself."""

    def __init__(self, app, metrics: _Metrics, hosts: frozenset[str] | None,
                 direct: dict | None = None):
        self.app, self.metrics, self.hosts = app, metrics, hosts
        self.direct = direct or {}
        self.state = app.state  # .live (the _State), .metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.hosts is not None and not self._host_ok(scope):
                # A page of another site that resolved its own name to 127.0.0.1 (DNS
                # rebinding) sends its own name as Host: refuse it.
                await _error(HTTPError(421, "Host", "this server answers only requests "
                                       "addressed to the loopback interface"))(
                    scope, receive, observed_send)
                return
            endpoint_fn = self.direct.get((scope["method"], path))
            if endpoint_fn is not None:
                response = await endpoint_fn(Request(scope, receive))
                await response(scope, receive, observed_send)
            else:
                await self.app(scope, receive, observed_send)
        finally:
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - t0)

    def _host_ok(self, scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"host":
                host = value.decode("latin-1").lower()
                if host.startswith("["):
                    host = host[1:].split("]")[0]
                else:
                    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
                return host in self.hosts
        return True  # HTTP/1.0 without Host: nothing to rebind


# ---------------------------------------------------------------- page data
class _Page:
    """The demo page's data, read once: user embeddings (row = user id) and the titles
    of the items (``titles[id % title_period]``), as :func:`mipscan.serve.save_page_data`
    writes them beside an index folder."""

    def __init__(self, folder: Path):
        from mipscan.serve import read_page_data

        self.users, meta = read_page_data(folder)
        self.user_ids = meta["user_ids"]
        self.titles = meta["titles"]
        self.period = meta["title_period"]
        self.known_users = frozenset(self.user_ids)
        rated = meta.get("rated")
        self.rated = (None if rated is None else
                      {u: np.asarray(r, dtype=np.int64) for u, r in zip(self.user_ids, rated)})

    def excluded(self, user: int, size: int) -> np.ndarray:
        """Every item id below ``size`` whose ``id % period`` the user rated (all the
        copies of each rated movie), ascending."""
        ids = (self.rated[user][None, :]
               + np.arange(0, size, self.period, dtype=np.int64)[:, None]).ravel()
        return np.sort(ids[ids < size])

    def title(self, item) -> str:
        if type(item) is int and self.period:
            t = self.titles[item % self.period]
            if t is not None:
                return t
        return f"item {item}"


def _asset(name: str) -> bytes:
    return resources.files("mipscan.serve").joinpath(name).read_bytes()


class _Coalescer:
    """Single-query searches that arrive while others are running are searched together:
    one ``search_batched`` call and one thread hand-off for all of them. Each query's
    search is independent, so the answers are the ones a lone search gives; the key holds
    the searcher, so a query is searched on the index its request read. At most
    ``max_inflight`` batches per key run at once (a lone request never waits); a batch of
    ``parallel_min`` queries or more is searched on all the engine's threads.

    One batch in flight, not one per core: measured on the seed index at 8 clients (2
    cores), two batches at once split the waiting queries into smaller batches that
    queued behind each other (p99 4.7-5.2 ms); one batch at a time, with the large ones
    on both cores, gave p99 3.5 ms at the same throughput, and 6,200 requests/s instead
    of 5,300 at 64 clients."""

    def __init__(self, off_loop, max_inflight: int = 1, max_batch: int = 64,
                 parallel_min: int = 8):
        self.off_loop, self.max_inflight, self.max_batch = off_loop, max_inflight, max_batch
        self.parallel_min = parallel_min
        self.pending: dict = {}   # key -> [(row, future)]
        self.inflight: dict = {}  # key -> batches running
        self.tasks: set = set()

    async def search(self, searcher, row: np.ndarray, kwargs: dict):
        # id(), not the searcher's own hash/eq: while a key has pending queries, one of
        # its batches is running and holds the searcher, so the id cannot be reused.
        key = (id(searcher), *kwargs.values())
        fut = asyncio.get_running_loop().create_future()
        self.pending.setdefault(key, []).append((row, fut))
        if self.inflight.get(key, 0) < self.max_inflight:
            self.inflight[key] = self.inflight.get(key, 0) + 1
            task = asyncio.ensure_future(self._drain(key, searcher, kwargs))
            self.tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.tasks.discard)
        return await fut

    async def _drain(self, key, searcher, kwargs: dict) -> None:
        try:
            while self.pending.get(key):
                items = self.pending.pop(key)
                batch, rest = items[:self.max_batch], items[self.max_batch:]
                if rest:
                    self.pending[key] = rest
                q = np.stack([row for row, _ in batch])
                try:
                    fn = (searcher.search_batched_parallel if len(q) >= self.parallel_min
                          else searcher.search_batched)
                    ids, scores = await self.off_loop(functools.partial(fn, q, **kwargs))
                except Exception as exc:  # noqa: BLE001 (handed to each waiting request)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for i, (_, fut) in enumerate(batch):
                    if not fut.done():
                        fut.set_result((ids[i:i + 1], scores[i:i + 1]))
        finally:
            self.inflight[key] -= 1
            if not self.inflight[key]:
                del self.inflight[key]


# ---------------------------------------------------------------- the app
def create_app(index_dir=None, *, token: str | None = None, limits: Limits = Limits(),
               threads: int | None = None, page_dir=None, searcher=None,
               loopback_only: bool = True, workers: int | None = None, backend=None,
               token_sha256: bytes | None = None):
    """The service over the index in ``index_dir`` (loaded with ``mmap=True``, verified).

    Args:
        index_dir: the index folder; ``/snapshot`` writes it and ``/reload`` reads it.
            No endpoint takes a path from the client.
        token: the bearer token of the write endpoints (``/upsert``, ``/delete``,
            ``/snapshot``, ``/reload``); ``None`` disables them (403). Compared in
            constant time. ``token_sha256``: its SHA-256 digest instead (what the Ray
            deployment is given, so the token itself is not stored in the cluster).
        limits: body size and batch bounds (:class:`Limits`).
        threads: engine threads of each loaded searcher (default: the searcher's own).
        page_dir: the demo page's data (see :func:`mipscan.serve.save_page_data`), or None.
        searcher: an already loaded searcher of ``index_dir`` (default: load it).
        loopback_only: answer only requests whose Host is a loopback name (127.0.0.1,
            localhost, ::1), against DNS rebinding; pass False when serving other hosts.
        workers: threads that run requests' searches and writes (default: 4 per CPU,
            at most 32).
        backend: the index behind the endpoints instead of ``index_dir`` (see
            :class:`SearcherBackend`; ``mipscan serve --ray`` passes a sharded one).

    Raises:
        ValueError: the folder is not a valid index, or the page data is damaged.
    """
    if backend is None:
        backend = SearcherBackend(index_dir, searcher, threads)
    state = _State(backend)
    metrics = _Metrics(state)
    page = _Page(Path(page_dir)) if page_dir is not None else None
    write_lock = asyncio.Lock()
    # Requests' work runs here: searches (whose engine releases the GIL), large JSON
    # bodies, loads and writes. A few threads per core keep both cores busy with single
    # queries; more would only queue inside the engine.
    pool = ThreadPoolExecutor(max_workers=workers or min(32, 4 * (os.cpu_count() or 1)),
                              thread_name_prefix="mipscan-serve")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    coalescer = _Coalescer(off_loop)
    token_digest = hashlib.sha256(token.encode()).digest() if token else token_sha256

    def endpoint(fn):
        @functools.wraps(fn)
        async def run(request: Request) -> Response:
            try:
                return await fn(request)
            except HTTPError as exc:
                return _error(exc)
            except ShardUnavailableError as exc:  # never a partial answer: this one shard
                field = "index" if exc.shard is None else f"shard {exc.shard}"
                return _error(HTTPError(503, field, str(exc)[:500]))
            except Exception:  # a bug, not the client's fault: logged, no details sent
                log.exception("internal error in %s", request.url.path)
                return _json({"error": "internal server error", "field": None}, 500)
        return run

    async def body_of(request: Request, empty_ok: bool = False, then=lambda x: x) -> Any:
        ctype = request.headers.get("content-type")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPError(400, "Content-Length", "Content-Length must be a number")
            if int(length) > limits.max_body_bytes:
                raise HTTPError(413, "body", f"the body of {int(length)} bytes exceeds the "
                                f"limit of {limits.max_body_bytes} bytes")
        if request.scope["query_string"]:  # nothing is read from a POST's URL: say so
            name = next(iter(request.query_params), "query")
            raise HTTPError(422, name, f"{request.url.path} takes no URL parameters; got "
                            f"{name[:60]!r}")
        chunks, size = [], 0
        try:
            # A client that stops sending mid-body (slowloris) is answered and dropped,
            # instead of holding its connection and request open for ever.
            async with _timeout(limits.body_seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limits.max_body_bytes:
                        raise HTTPError(413, "body", f"the body exceeds the limit of "
                                        f"{limits.max_body_bytes} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPError(408, "body", f"the body did not arrive within "
                            f"{limits.body_seconds:g} s ({size} bytes came)",
                            headers={"Connection": "close"}) from None
        except ClientDisconnect:  # nobody reads the answer; 400, not a 500, in the metrics
            raise HTTPError(400, "body", "the client closed the connection mid-body") from None
        raw = b"".join(chunks)
        if not raw.strip():
            if empty_ok:
                return then({})
            raise HTTPError(400, "body", "the request needs a JSON body")
        # Only JSON: a form or text/plain POST from another site's page (no CORS
        # preflight) must not reach a handler.
        if ctype is None or ctype.split(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, "Content-Type", "send the body as Content-Type: "
                            f"application/json; got {(ctype or 'none')[:60]!r}")
        if size >= _THREADED_JSON_BYTES:  # with ``then``: its checks of a large body too
            return await off_loop(lambda: then(parse_json(raw)))
        return then(parse_json(raw))

    def authorize(request: Request) -> None:
        if token_digest is None:
            raise HTTPError(403, "Authorization", "write endpoints are disabled: start the "
                            "server with MIPSCAN_SERVE_TOKEN or --token-file")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPError(401, "Authorization", "this endpoint needs the header "
                            "'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": 'Bearer realm="mipscan"'})
        # Digests of equal length, compared in constant time: neither the token's
        # length nor its prefix leaks through timing.
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(),
                                   token_digest):
            raise HTTPError(403, "Authorization", "wrong token")

    def _filter(body: dict, name: str, nq: int, searcher):
        value = body[name]
        if not _accepts(searcher.search_batched, name):
            raise HTTPError(501, name, f"this mipscan's index cannot filter searches yet "
                            f"({name!r} is not supported)")
        if not isinstance(value, list):
            raise HTTPError(422, name, f"{name} must be a list of ids, or one list per query")
        if any(isinstance(v, list) for v in value):  # one list per query
            bad = next((i for i, v in enumerate(value) if not isinstance(v, list)), None)
            if bad is not None:
                raise HTTPError(422, f"{name}[{bad}]", f"{name}[{bad}] must be a list of ids "
                                f"like {name}[0] (one list per query); got "
                                f"{_type_name(value[bad])}")
            if len(value) != nq:
                raise HTTPError(422, name, f"{name} has {len(value)} lists for {nq} queries")
            if sum(len(v) for v in value) > limits.max_filter_ids:
                raise HTTPError(422, name, f"{name} holds more than {limits.max_filter_ids} ids")
            per = [_filter_ids(v, f"{name}[{i}]") for i, v in enumerate(value)]
            return per
        if len(value) > limits.max_filter_ids:
            raise HTTPError(422, name, f"{name} holds more than {limits.max_filter_ids} ids")
        return _filter_ids(value, name)

    def _filter_ids(value: list, name: str) -> list:
        for i, v in enumerate(value):
            if type(v) not in (int, str):
                raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] must be an id (an integer "
                                f"or a string); got {_type_name(v)}")
            if type(v) is str and not _utf8(v):
                raise HTTPError(422, f"{name}[{i}]", f"{name}[{i}] is not valid Unicode (a "
                                "lone surrogate)")
        return value

    # ---------------------------------------------------------------- read endpoints
    @endpoint
    async def search(request: Request) -> Response:
        s = state.backend.reader()  # this request's index, whatever /reload does meanwhile
        # A large body is checked on the parsing thread: thousands of queries or a million
        # filter ids took the event loop for tens to hundreds of milliseconds.
        q, kwargs = await body_of(request, then=functools.partial(search_args, s))
        filtered = "allowed" in kwargs or "excluded" in kwargs
        search_async = getattr(s, "search_batched_async", None)  # a sharded index on Ray
        try:
            if search_async is not None and not filtered:
                ids, scores = await search_async(q, **kwargs)
            elif len(q) == 1 and not filtered:
                ids, scores = await coalescer.search(s, q[0], kwargs)
            elif len(q) >= _PARALLEL_MIN_QUERIES:
                ids, scores = await off_loop(
                    functools.partial(s.search_batched_parallel, q, **kwargs))
            else:
                ids, scores = await off_loop(functools.partial(s.search_batched, q, **kwargs))
        except KeyError as exc:  # a filter naming an unknown docid
            raise HTTPError(422, "allowed" if "allowed" in kwargs else "excluded",
                            f"unknown id {_key(exc)}") from None
        except (ValueError, TypeError) as exc:  # checks of the searcher we did not repeat
            # The searcher's message names the argument: an id that is no row or docid
            # of the index is the filter's fault, not the queries'.
            msg = str(exc)
            field = next((n for n in ("allowed", "excluded") if n in kwargs and f" {n} " in
                          f" {msg} "), "queries")
            raise HTTPError(422, field, msg[:300]) from None
        metrics.queries.inc(len(q))
        return _results(ids, scores)

    def search_args(s, body) -> tuple[np.ndarray, dict]:
        """The checked queries and search_batched's arguments of a /search body."""
        body = _check_fields(body, _SEARCH_FIELDS, ("queries",), "/search")
        size = s.size()
        q = _vectors(body["queries"], "queries", s.d, limits.max_queries)
        k_high = min(size, limits.max_k)
        kwargs = {
            "final_num_neighbors": _int_field(body, "k", 1, k_high,
                                              "index size" if size <= limits.max_k else "max_k",
                                              default=min(s.num_neighbors, k_high)),
            "leaves_to_search": _int_field(body, "leaves_to_search", 1, s.max_leaves_to_search,
                                           "num_leaves"),
            "pre_reorder_num_neighbors": _int_field(body, "pre_reorder_num_neighbors", 1,
                                                    size, "index size"),
        }
        for name in ("allowed", "excluded"):
            if body.get(name) is not None:
                kwargs[name] = _filter(body, name, len(q), s)
        return q, kwargs

    @endpoint
    async def healthz(request: Request) -> Response:
        b = state.backend
        return _json({"status": "ok", "size": b.size(), "generation": b.generation})

    @endpoint
    async def stats(request: Request) -> Response:
        b = state.backend
        return _json({
            **b.describe(),
            "simd_level": mipscan.simd_level(), "mipscan_version": mipscan.__version__,
            "uptime_s": time.monotonic() - state.started, "generation": b.generation,
            "loaded_at": b.loaded_at, "rss_bytes": _rss_bytes(),
            "index": b.name, "page": page is not None,
            "writes": {"enabled": token_digest is not None, **b.writes()},
            "filters": _accepts(b.reader().search_batched, "allowed"),
            "limits": limits.__dict__,
        })

    @endpoint
    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- write endpoints
    def _unsupported(name: str) -> HTTPError:
        return HTTPError(501, name.strip("/"), f"{name} needs a live index (upsert/delete), "
                         "which this mipscan version does not have yet")

    @endpoint
    async def upsert(request: Request) -> Response:
        authorize(request)
        body = _check_fields(await body_of(request), ("docids", "vectors"),
                             ("docids", "vectors"), "/upsert")
        async with write_lock:
            b = state.backend
            docids = _docids(body["docids"], "docids", limits)
            vectors = _vectors(body["vectors"], "vectors", b.reader().d, limits.max_batch)
            if len(vectors) != len(docids):
                raise HTTPError(422, "vectors", f"vectors holds {len(vectors)} rows for "
                                f"{len(docids)} docids")
            if not b.writes()["upsert"]:
                raise _unsupported("/upsert")
            try:
                size = await off_loop(b.upsert, docids, vectors)
            except (ValueError, TypeError) as exc:
                raise HTTPError(422, "docids", str(exc)[:300]) from None
            return _json({"upserted": len(docids), "size": size})

    @endpoint
    async def delete(request: Request) -> Response:
        authorize(request)
        body = _check_fields(await body_of(request), ("docids",), ("docids",), "/delete")
        async with write_lock:
            b = state.backend
            docids = _docids(body["docids"], "docids", limits)
            if not b.writes()["delete"]:
                raise _unsupported("/delete")
            try:
                size = await off_loop(b.delete, docids)
            except KeyError as exc:  # nothing was deleted (issue 13's contract)
                said = _key(exc)
                raise HTTPError(404, "docids", said if "nothing was deleted" in said else
                                f"unknown docid {said}; nothing was deleted") from None
            except (ValueError, TypeError) as exc:
                raise HTTPError(422, "docids", str(exc)[:300]) from None
            return _json({"deleted": len(docids), "size": size})

    @endpoint
    async def snapshot(request: Request) -> Response:
        authorize(request)
        _check_fields(await body_of(request, empty_ok=True), (), (), "/snapshot")
        async with write_lock:
            b = state.backend
            try:
                size = await off_loop(b.snapshot)
            except (ValueError, OSError) as exc:
                raise HTTPError(409, "index", f"cannot write the index folder: "
                                f"{str(exc)[:300]}") from None
            return _json({"snapshot": "written", "size": size, "generation": b.generation})

    @endpoint
    async def reload(request: Request) -> Response:
        authorize(request)
        _check_fields(await body_of(request, empty_ok=True), (), (), "/reload")
        async with write_lock:
            b = state.backend
            try:
                size = await off_loop(b.reload)
            except (ValueError, OSError) as exc:
                metrics.reloads.labels("refused").inc()
                raise HTTPError(409, "index", "the index folder was refused; the previous "
                                f"index keeps serving: {str(exc)[:400]}") from None
            metrics.reloads.labels("ok").inc()
            return _json({"reloaded": True, "size": size, "generation": b.generation})

    # ---------------------------------------------------------------- the page
    def _need_page() -> _Page:
        if page is None:
            raise HTTPError(404, "page", "no page data: save an index with `mipscan demo "
                            "--save-index DIR`, then `mipscan serve DIR`")
        return page

    @endpoint
    async def page_html(request: Request) -> Response:
        _need_page()
        return Response(_asset("page.html"), media_type="text/html; charset=utf-8",
                        headers=_PAGE_HEADERS)

    @endpoint
    async def page_js(request: Request) -> Response:
        _need_page()
        return Response(_asset("page.js"), media_type="text/javascript; charset=utf-8",
                        headers=_PAGE_HEADERS)

    @endpoint
    async def page_users(request: Request) -> Response:
        p = _need_page()
        return _json({"users": p.user_ids, "rated": p.rated is not None})

    @endpoint
    async def page_recommend(request: Request) -> Response:
        p = _need_page()
        params = request.query_params
        unknown = [key for key in params if key not in ("user", "k", "exclude_rated")]
        if unknown:
            raise HTTPError(422, unknown[0], f"unknown parameter {unknown[0][:60]!r}; "
                            "takes user, k, exclude_rated")
        values = {}
        for key, default in (("user", None), ("k", "10"), ("exclude_rated", "0")):
            text = params.get(key, default)
            if text is None:
                raise HTTPError(422, key, f"missing parameter {key!r}")
            if not (text.isascii() and text.isdigit() and len(text) <= 9):
                raise HTTPError(422, key, f"{key} must be a non-negative integer; "
                                f"got {text[:40]!r}")
            values[key] = int(text)
        user, k, exclude = values["user"], values["k"], values["exclude_rated"]
        if user not in p.known_users:
            raise HTTPError(404, "user", f"unknown user {user}")
        if exclude not in (0, 1):
            raise HTTPError(422, "exclude_rated", f"exclude_rated must be 0 or 1; got {exclude}")
        if exclude and p.rated is None:
            raise HTTPError(409, "exclude_rated", "the page data has no rated lists (save "
                            "it again with `mipscan demo --save-index DIR`)")
        s = state.backend.reader()
        if p.users.shape[1] != s.d:
            raise HTTPError(409, "page", f"the page's user embeddings have "
                            f"{p.users.shape[1]} features, but the index expects {s.d}")
        if not 1 <= k <= min(100, s.size()):
            raise HTTPError(422, "k", f"k must be in [1, {min(100, s.size())}]; got {k}")
        q = np.ascontiguousarray(p.users[user][None, :], dtype=np.float32)
        filters = {"excluded": p.excluded(user, s.size())} if exclude else {}

        def both():
            approx = s.search_batched(q, final_num_neighbors=k, **filters)
            # Every leaf and every datapoint rescored exactly: the exact top-k wherever the
            # index keeps float32 rows (reorder or brute-force scoring).
            exact = s.search_batched(q, final_num_neighbors=k, leaves_to_search=s.num_leaves,
                                     pre_reorder_num_neighbors=s.size(), **filters)
            return approx, exact

        try:
            approx, exact = await off_loop(both)
        except (KeyError, ValueError) as exc:  # a rated id the live index no longer has
            raise HTTPError(409, "exclude_rated", f"cannot exclude the rated items: "
                            f"{str(exc)[:200]}") from None

        def items(result):
            ids, scores = _rows(result[0])[0], _rows(result[1])[0]
            # Padding (id -1, score -inf) where fewer than k items remain is left out.
            return [{"id": i, "title": p.title(i), "score": sc} for i, sc in zip(ids, scores)
                    if i != -1]

        return _json({"user": user, "k": k, "exclude_rated": bool(exclude),
                      "approximate": items(approx), "exact": items(exact)})

    routes = [
        Route("/search", search, methods=["POST"]),
        Route("/upsert", upsert, methods=["POST"]),
        Route("/delete", delete, methods=["POST"]),
        Route("/snapshot", snapshot, methods=["POST"]),
        Route("/reload", reload, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/", page_html, methods=["GET"]),
        Route("/page.js", page_js, methods=["GET"]),
        Route("/page/users", page_users, methods=["GET"]),
        Route("/page/recommend", page_recommend, methods=["GET"]),
    ]

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        field = "path" if exc.status_code == 404 else "method"
        message = {404: f"no endpoint {request.url.path[:100]!r}",
                   405: f"{request.method} is not allowed on {request.url.path[:100]}"}.get(
            exc.status_code, str(exc.detail))
        return _json({"error": message, "field": field}, exc.status_code,
                     getattr(exc, "headers", None))

    app = Starlette(routes=routes, exception_handlers={StarletteHTTPException: http_error})
    app.state.live = state
    app.state.metrics = metrics
    hosts = frozenset({"127.0.0.1", "localhost", "::1"}) if loopback_only else None
    return _Observe(app, metrics, hosts, direct={("POST", "/search"): search})


_SEARCH_FIELDS = ("queries", "k", "leaves_to_search", "pre_reorder_num_neighbors", "allowed",
                  "excluded")
# Scripts only from this server (page.js); the page's own inline <style> is allowed.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self' "
                 "'unsafe-inline'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _key(exc: KeyError) -> str:
    return str(exc.args[0] if exc.args else exc)[:100]
