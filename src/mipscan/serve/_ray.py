"""``mipscan serve --ray``: the HTTP API of ``mipscan serve`` as a Ray Serve deployment.

Every replica runs the same Starlette app (:func:`mipscan.serve._app.create_app`: the same
parsing, checks, JSON and errors) over a :class:`ShardedBackend`. The replicas share one
sharded index: one owner actor (:func:`mipscan.distributed.share`) holds the
:class:`~mipscan.distributed.ShardedIndex` of the folder (a sharded folder, or a plain
index folder as one shard), and each replica searches its shard actors directly through a
:class:`~mipscan.distributed.SharedIndex`. Updates, snapshots and reloads go through the
owner, so a search on any replica sent after an update was answered includes it.

Needs the ``serve`` and ``ray`` extras (Ray Serve: ``ray[serve]``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mipscan.distributed import MANIFEST, SharedIndex, ShardUnavailableError, read_manifest

APP_NAME = "mipscan"


class ShardedBackend:
    """The backend (see :class:`mipscan.serve._app.SearcherBackend`) of one replica: the
    shared sharded index. Its reader is the :class:`SharedIndex` itself (searches fan out
    to the shards and never mix a reload's two indexes)."""

    #: Seconds between two fetches of the owner's view (size, generation) in the
    #: background: what /healthz and /stats show of another replica's updates and reloads.
    REFRESH_S = 2.0

    def __init__(self, owner, name: str):
        self.index = SharedIndex(owner)
        self.name = name
        self._stop = threading.Event()
        threading.Thread(target=self._refresh, daemon=True, name="mipscan-view").start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.REFRESH_S):
            try:
                self.index.refresh()
            except Exception:  # noqa: BLE001 (the owner is gone or busy: next time)
                pass

    def reader(self) -> SharedIndex:
        return self.index

    def size(self) -> int:
        return self.index.size()

    @property
    def generation(self) -> int:
        return self.index.generation

    @property
    def loaded_at(self) -> float:
        return self.index._view["loaded_at"]

    def describe(self) -> dict:
        ix = self.index
        shards = ix.shards
        return {"size": ix.size(), "d": ix.d, "distance_measure": ix.distance_measure,
                "num_leaves": ix.num_leaves, "num_threads": shards[0]["num_threads"],
                "index_bytes": int(sum(s["index_bytes"] for s in shards)),
                "config": {"sharded": not ix._view["plain"], "num_shards": len(shards),
                           "shard_sizes": list(ix.shard_sizes)},
                "replica": os.getpid()}  # which replica answered (a process each)

    def writes(self) -> dict:
        return {"upsert": True, "delete": True}

    def upsert(self, docids: list, vectors: np.ndarray) -> int:
        self.index.upsert(np.asarray(docids), vectors)
        return self.index.size()

    def delete(self, docids: list) -> int:
        self.index.delete(np.asarray(docids))
        return self.index.size()

    def snapshot(self) -> int:
        self.index.snapshot()
        return self.index.size()

    def reload(self) -> int:
        try:
            self.index.reload()
        except ShardUnavailableError as exc:  # a shard of the new folder would not start
            raise ValueError(str(exc)) from None
        return self.index.size()


def _deployment():
    """The Ray Serve deployment class (Ray Serve is imported only here)."""
    from ray import serve

    from mipscan.serve._app import create_app

    @serve.deployment(name="mipscan")
    @serve.ingress()
    class MipscanIngress:
        def __init__(self, owner, name: str, token_sha256: bytes | None, limits,
                     loopback_only: bool, page_dir: str | None):
            self.args = (owner, name, token_sha256, limits, loopback_only, page_dir)

        def __serve_build_asgi_app__(self):
            owner, name, token_sha256, limits, loopback_only, page_dir = self.args
            return create_app(backend=ShardedBackend(owner, name), token_sha256=token_sha256,
                              limits=limits, page_dir=page_dir, loopback_only=loopback_only)

    return MipscanIngress


def owner_name(port: int) -> str:
    """The name (in Ray namespace ``mipscan``) of the index owner actor of the server on
    ``port``: ``ray.get_actor(owner_name(port), namespace="mipscan")``."""
    return f"index-{port}"


def _check_folder(directory: Path) -> None:
    """A sharded folder (manifest checked here) or a plain index folder, else ValueError."""
    if (directory / MANIFEST).exists():
        read_manifest(directory)
    elif not (directory / "mipscan.json").is_file():
        raise ValueError(f"{str(directory)!r} is not a mipscan index folder (no mipscan.json "
                         f"or {MANIFEST})")


def serve_ray(index_dir, *, host: str, port: int, token: str | None, loopback: bool,
              limits, page_dir=None, replicas: int = 2, address: str | None = None,
              threads_per_shard: int = 1, log=print) -> None:
    """Starts the deployment on a Ray cluster (``address``; default: Ray's own rule, a
    new local cluster when none runs) and serves until SIGINT/SIGTERM, then removes it.
    The caller (:func:`mipscan.serve.serve`) applies the token and address rules.

    Raises:
        mipscan.serve.ServeError: a folder that is not a valid index, or a port in use.
    """
    import hashlib

    from mipscan.serve import ServeError

    directory = Path(index_dir).resolve()
    try:
        _check_folder(directory)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # Serve's proxy binds it
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        port = probe.getsockname()[1]  # port 0: a free one

    import ray
    from ray import serve

    from mipscan.distributed import share

    started_ray = not ray.is_initialized()
    if started_ray:
        options = {}
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # A new cluster on this machine alone: Ray's processes talk over loopback.
            address, options = "local", {"_node_ip_address": "127.0.0.1",
                                         "include_dashboard": False}
        ray.init(address=address, logging_level="WARNING", log_to_driver=False, **options)
    owner = None
    try:
        try:  # named, so that an operator (or a test) can find the shards
            owner = share(directory, threads_per_shard=threads_per_shard,
                          name=owner_name(port))
        except (ValueError, OSError) as exc:
            raise ServeError(str(exc)) from None
        index = SharedIndex(owner)
        serve.start(http_options={"host": host.strip("[]"), "port": port},
                    logging_config={"log_level": "WARNING"})
        app = _deployment().options(
            num_replicas=replicas, max_ongoing_requests=64,
            # The replicas parse JSON and merge; the shards search. Reserving no CPU lets
            # both fit on a small cluster (Ray does not cap a process's CPU use).
            ray_actor_options={"num_cpus": 0},
        ).bind(owner, directory.name,
               hashlib.sha256(token.encode()).digest() if token else None, limits, loopback,
               None if page_dir is None else str(page_dir))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False,
                  logging_config={"log_level": "WARNING"})
        shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
        log(f"mipscan serve --ray: {index.size():,} datapoints x {index.d} from {directory} "
            f"({index.num_shards} shard{'s' * (index.num_shards != 1)}, {replicas} "
            f"replica{'s' * (replicas != 1)}) on http://{shown}:{port}/ (writes "
            f"{'enabled' if token else 'disabled'}); Ctrl-C stops")
        sys.stdout.flush()
        _wait_for_a_signal()
    finally:
        _stop(ray, serve, owner, started_ray)


def _wait_for_a_signal() -> None:
    def stop(signum, frame):
        raise KeyboardInterrupt
    # SIGINT too, explicitly: a process started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then installs no handler of its own (the
    # server would not stop on Ctrl-C or SIGINT; seen when CI ran under nohup).
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _stop(ray, serve, owner, started_ray: bool) -> None:
    """Removes the app and the index; ends Serve when no other app uses it, and this
    process's connection to Ray (the cluster with it when ray.init started one)."""
    for step in (lambda: serve.delete(APP_NAME),
                 lambda: owner is not None and SharedIndex(owner).close(),
                 lambda: not serve.status().applications and serve.shutdown()):
        try:
            step()
        except Exception:  # noqa: BLE001 (stopping: each step on its own)
            pass
    if started_ray:
        ray.shutdown()


__all__ = ["APP_NAME", "ShardedBackend", "serve_ray"]
