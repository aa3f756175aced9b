"""``mipscan serve``: a retrieval service over HTTP on one index folder.

Endpoints (JSON; errors are ``{"error": message, "field": name}`` with a 4xx status):

- ``POST /search`` ``{"queries": [[...], ...], "k": 10, "leaves_to_search"?,
  "pre_reorder_num_neighbors"?, "allowed"?, "excluded"?}`` -> ``{"ids": [[...]],
  "scores": [[...]]}`` (docids where the index has them; a filtered query with fewer
  eligible ids than columns is padded with id -1 and score null);
- ``POST /upsert`` ``{"docids": [...], "vectors": [[...]]}``, ``POST /delete``
  ``{"docids": [...]}`` (501 until the searcher has ``upsert``/``delete``),
  ``POST /snapshot`` (serialize the live index into the folder, atomically),
  ``POST /reload`` (load the folder aside, then swap; a damaged folder gets 409 and the
  old index keeps serving): these four need ``Authorization: Bearer <token>``;
- ``GET /healthz``, ``GET /stats``, ``GET /metrics`` (Prometheus);
- ``GET /`` the demo page, when page data sits beside the folder (``INDEX_DIR.page``,
  written by ``mipscan demo --save-index``), and its ``GET /page/users`` and
  ``GET /page/recommend?user=U&k=10&exclude_rated=0|1``.

``mipscan serve --ray`` serves the same app from Ray Serve replicas that share one
sharded index on Ray actors (:mod:`mipscan.serve._ray`; the ``serve`` and ``ray`` extras).

This module needs only the standard library and numpy; the app (Starlette, uvicorn,
prometheus-client, orjson: the ``serve`` extra) is imported when a server starts.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

SERVE_INSTALL = 'pip install "mipscan[serve]"'
RAY_SERVE_INSTALL = 'pip install "mipscan[serve,ray]"'
TOKEN_ENV = "MIPSCAN_SERVE_TOKEN"
#: Shortest token accepted: a guessable token is no access control.
MIN_TOKEN_CHARS = 16
PAGE_FORMAT = "mipscan-page"
_MODULES = ("starlette", "uvicorn", "prometheus_client", "anyio", "orjson")
_MAX_TITLES_BYTES = 64 << 20


#: Seconds a client has to send a request's headers, from the connection's opening (for
#: its first request) or from the request's first byte (for the next ones).
HEADER_SECONDS = 10.0


def header_deadline_protocol(seconds: float = HEADER_SECONDS):
    """uvicorn's httptools protocol plus a deadline for each request's headers, after
    which the connection is closed: uvicorn has none, so a client that sends its headers
    a byte at a time (slowloris) held a connection for ever. None when httptools is not
    installed (uvicorn then uses h11, without the deadline)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


class ServeError(Exception):
    """The server cannot start: the message says why (exit status 2)."""


def require_serve(what: str = "mipscan serve") -> None:
    """Raises :class:`mipscan.recsys._extras.MissingExtraError` naming the ``serve`` extra
    when one of its modules is missing (without importing any)."""
    _require(_MODULES, f"{what} needs the serve extra", SERVE_INSTALL)


def require_ray_serve(what: str = "mipscan serve --ray") -> None:
    """As :func:`require_serve`, and Ray Serve (the ``ray`` extra's ``ray[serve]``)."""
    require_serve(what)
    # Ray Serve imports fastapi.
    _require(("ray", "ray.serve", "fastapi"), f"{what} needs Ray Serve", RAY_SERVE_INSTALL)


def _require(modules, needs: str, install: str) -> None:
    from mipscan.recsys._extras import MissingExtraError

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError(f"{needs} (no module named {module!r}): {install}",
                                    name=module)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def read_token(token_file: str | os.PathLike | None) -> str | None:
    """The write token: the first line of ``token_file``, else ``$MIPSCAN_SERVE_TOKEN``,
    else None. Raises :class:`ServeError` for an unreadable, empty or short token."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"--token-file: cannot read {token_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        source = f"--token-file {token_file}"
    elif os.environ.get(TOKEN_ENV) is not None:
        text, source = os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    token = text.splitlines()[0].strip() if text else ""
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ServeError(f"{source}: the token must be at least {MIN_TOKEN_CHARS} printable "
                         "characters without spaces (for example: python -c \"import "
                         "secrets; print(secrets.token_urlsafe(32))\")")
    return token


def page_dir_for(index_dir) -> Path:
    """Where the demo page's data sits: ``INDEX_DIR.page`` beside the index folder (not
    inside it: ``serialize`` replaces the index folder whole)."""
    index_dir = Path(index_dir)
    return index_dir.with_name(index_dir.name + ".page")


def save_page_data(folder, users: np.ndarray, user_ids, titles, title_period: int,
                   rated=None) -> None:
    """Writes the demo page's data into ``folder``: ``users.npy`` (float32, row = user
    id) and ``page.json`` (the user ids offered, and ``titles``: the title of item ``i``
    is ``titles[i % title_period]``, or null). ``rated``, when given, holds one list per
    user id of the items that user rated, as ``i % title_period``: the page's "exclude
    what they rated" excludes every item ``i`` whose ``i % title_period`` is in it. Each
    file is replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    users = np.ascontiguousarray(users, dtype=np.float32)
    meta = {"format": PAGE_FORMAT, "version": 1, "user_ids": [int(u) for u in user_ids],
            "title_period": int(title_period),
            "titles": [None if t is None else str(t) for t in titles],
            "rated": None if rated is None else [sorted({int(i) for i in r}) for r in rated]}
    for name, write in (("users.npy", lambda f: np.save(f, users, allow_pickle=False)),
                        ("page.json", lambda f: f.write(json.dumps(meta).encode()))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_page_data(folder) -> tuple[np.ndarray, dict]:
    """``(users, meta)`` as :func:`save_page_data` wrote them; ValueError naming the file
    and the field when they are missing or damaged."""
    folder = Path(folder)
    upath, mpath = folder / "users.npy", folder / "page.json"
    try:
        users = np.load(upath, allow_pickle=False)
        if mpath.stat().st_size > _MAX_TITLES_BYTES:
            raise ValueError(f"larger than {_MAX_TITLES_BYTES} bytes")
        meta = json.loads(mpath.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"page data {folder}: {exc}") from None
    if users.dtype != np.float32 or users.ndim != 2 or not np.isfinite(users).all():
        raise ValueError(f"page data {upath}: must be a finite float32 2-D array; got "
                         f"{users.dtype} {users.shape}")
    ok = (isinstance(meta, dict) and meta.get("format") == PAGE_FORMAT
          and isinstance(meta.get("user_ids"), list) and isinstance(meta.get("titles"), list)
          and type(meta.get("title_period")) is int and meta["title_period"] >= 0)
    if not ok:
        raise ValueError(f"page data {mpath}: not a {PAGE_FORMAT} file (format, user_ids, "
                         "titles, title_period)")
    for u in meta["user_ids"]:
        if type(u) is not int or not 0 <= u < users.shape[0]:
            raise ValueError(f"page data {mpath}: user_ids: {u!r} is not a row of users.npy "
                             f"({users.shape[0]} rows)")
    for t in meta["titles"]:
        if t is not None and not isinstance(t, str):
            raise ValueError(f"page data {mpath}: titles: {t!r} is not a string or null")
    if meta["title_period"] > len(meta["titles"]):
        raise ValueError(f"page data {mpath}: title_period {meta['title_period']} > "
                         f"{len(meta['titles'])} titles")
    rated = meta.get("rated")
    if rated is not None:
        period = meta["title_period"]
        ok = (isinstance(rated, list) and len(rated) == len(meta["user_ids"]) and period > 0
              and all(isinstance(r, list) and all(type(i) is int and 0 <= i < period
                                                  for i in r) for r in rated))
        if not ok:
            raise ValueError(f"page data {mpath}: rated must hold one list per user id of "
                             f"integers in [0, title_period={period})")
    return users, meta


def serve(index_dir, host: str = "127.0.0.1", port: int = 8080, token_file=None,
          threads: int | None = None, read_only: bool = False, page_dir=None,
          max_body_bytes: int | None = None, log=print, ray: bool = False,
          replicas: int = 2, address: str | None = None) -> None:
    """Loads ``index_dir`` and serves it until interrupted (``mipscan serve``). With
    ``ray``, as a Ray Serve deployment of ``replicas`` replicas sharing one sharded index
    (``index_dir`` a sharded folder or a plain index folder; ``threads`` = engine threads
    per shard; see :mod:`mipscan.serve._ray`) on the cluster at ``address``.

    Raises:
        ServeError: no token for write endpoints on a non-loopback address, a bad token
            file, a folder that is not a valid index, or an address in use.
        MissingExtraError: the serve extra (or, with ``ray``, Ray Serve) is not installed.
    """
    if ray:
        require_ray_serve()
    else:
        require_serve()
    token = read_token(token_file)
    loopback = is_loopback(host)
    if read_only:
        token = None
    elif token is None and not loopback:
        raise ServeError(f"refusing to serve write endpoints on {host}, a non-loopback "
                         f"address, without a token: set {TOKEN_ENV} or --token-file, or "
                         "pass --read-only")
    index_dir = Path(index_dir)
    if page_dir is None and page_dir_for(index_dir).is_dir():
        page_dir = page_dir_for(index_dir)

    from mipscan.serve._app import Limits

    limits = Limits() if max_body_bytes is None else Limits(max_body_bytes=max_body_bytes)
    if ray:
        from mipscan.serve._ray import serve_ray

        return serve_ray(index_dir, host=host, port=port, token=token, loopback=loopback,
                         limits=limits, page_dir=page_dir, replicas=replicas, address=address,
                         threads_per_shard=threads or 1, log=log)

    import uvicorn

    import mipscan
    from mipscan.serve._app import create_app

    try:
        searcher = mipscan.load_searcher(index_dir, mmap=True, verify=True)
        app = create_app(index_dir, token=token, limits=limits, threads=threads,
                         page_dir=page_dir, searcher=searcher, loopback_only=loopback)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # Listening before the URL is printed: a client that connects at once waits in the
    # backlog until uvicorn accepts, instead of being refused.
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    s = app.state.live.backend.reader()
    log(f"mipscan serve: {s.size():,} datapoints x {s.d} from {index_dir} on "
        f"http://{shown}:{bound}/ (writes {'enabled' if token else 'disabled'}"
        f"{', page /' if page_dir is not None else ''}); Ctrl-C stops")
    sys.stdout.flush()
    import gc

    gc.collect()
    gc.freeze()  # the loaded modules and index objects: out of every later collection
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            timeout_keep_alive=5, lifespan="off", proxy_headers=False,
                            timeout_graceful_shutdown=5,
                            http=header_deadline_protocol() or "auto")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        # Release the index before the interpreter's teardown (the app's closures form
        # cycles, and frozen objects are never collected): no leaked-object warnings.
        del app, config, searcher, s
        gc.unfreeze()
        gc.collect()


__all__ = ["HEADER_SECONDS", "MIN_TOKEN_CHARS", "SERVE_INSTALL", "ServeError", "TOKEN_ENV",
           "header_deadline_protocol", "is_loopback", "page_dir_for", "read_page_data",
           "read_token", "require_ray_serve", "require_serve", "save_page_data", "serve"]
