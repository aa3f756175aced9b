"""A Ray head started by `ray start --head --block` on 127.0.0.1 (free ports), for the tests
that need a cluster other processes join (tests/test_distributed.py, tests/test_serve_ray.py).

The head runs in its own session: ending it (by its pid and process group) stops this head
only; `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mipscan

#: The folder holding the mipscan the tests import (src/ in a checkout, site-packages in
#: CI's venv): Ray's workers get it first on PYTHONPATH.
PACKAGE_ROOT = str(Path(mipscan.__file__).resolve().parents[1])


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


#: The test clusters' authentication, the same for the head and every driver: off (they
#: listen on this machine only). Unset, a head turns token authentication on whenever
#: ~/.ray/auth_token exists (another Ray user of the machine may have made one) and a
#: driver that was not told so cannot connect.
RAY_AUTH = {"RAY_AUTH_MODE": "disabled"}


def ray_env() -> dict:
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT, "RAY_USAGE_STATS_ENABLED": "0", **RAY_AUTH}
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int, object_store_bytes: int = 200_000_000, log_path=None):
    """Starts a head node; yields its address ``127.0.0.1:PORT``; stops it at the end."""
    port, agent, grpc, metrics, runtime_env, client, node, objm = free_ports(8)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    out = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--ray-client-server-port={client}", f"--node-manager-port={node}",
         f"--object-manager-port={objm}", f"--object-store-memory={object_store_bytes}",
         "--disable-usage-stats"],
        env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}", head
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=10)
        try:  # anything of that head still alive in its process group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if out is not subprocess.DEVNULL:
            out.close()
