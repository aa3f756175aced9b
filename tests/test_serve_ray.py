"""`mipscan serve --ray` for real: a Ray head started here (`ray start --head`, 2 CPUs, on
127.0.0.1), the CLI as a subprocess serving a 2-shard folder with 2 replicas on a free
port, and this process joining the cluster as a driver (to build the index, and to find
and kill shard processes). One head and one server for the module.

Checked: /search equals the in-process search of the same sharded folder; a plain folder
behind the same backend answers as the single-node service does; the bad-request table
of tests/test_serve.py gets the same 4xx and field; the write endpoints refuse a missing
or wrong token; an upsert is seen by searches through every replica; deletes are all or
nothing across shards; a killed shard process is restored, and one that cannot come back
gets a 503 naming the shard (never a partial answer); concurrent upserts and searches,
snapshot and reload under load fail no request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import mipscan
from mipscan.serve._app import Limits, create_app

from _ray_util import PACKAGE_ROOT, RAY_AUTH, free_ports, ray_env, ray_head
from _serve_util import request_kwargs, running
from test_serve import AUTH, BAD, D, GOOD, TOKEN, WRITES, run_cli

ray = pytest.importorskip("ray")  # the test extra brings it; CI never skips
pytest.importorskip("ray.serve")

from mipscan import distributed  # noqa: E402
from mipscan.distributed import ShardedIndex, share  # noqa: E402
from mipscan.serve._ray import ShardedBackend, owner_name  # noqa: E402

N = 3000  # as tests/test_serve.py: its table has rows about the index size
#: Table rows that depend on limits the CLI does not set (max_queries, max_batch) or that
#: send raw bytes: tests/test_serve.py checks those on the single-node service.
# Rows that depend on limits the CLI cannot set, or (the stalled body) on the HTTP server
# in front: under --ray that is Ray Serve's proxy, whose own timeouts apply.
_CLI_LIMITS = {"too many queries", "delete too many docids", "bad Content-Length",
               "body stalls midway (slowloris)"}


def _filter_refused(r, body) -> bool:
    """A filtered search refused by the sharded index (501 naming the filter, which the
    body holds): the rows of the bad-request table about filter ids end there."""
    if r.status_code != 501 or r.json()["field"] not in ("allowed", "excluded"):
        return False
    name = r.json()["field"]
    assert (name in body) if isinstance(body, dict) else (f'"{name}"'.encode() in body), r.text
    return True


def _queries(nq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(nq, D)).astype(np.float32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head on 127.0.0.1 that this process joins as a driver."""
    logs = tmp_path_factory.mktemp("ray-head")
    saved = {k: os.environ.get(k) for k in RAY_AUTH}
    os.environ.update(RAY_AUTH)  # this driver joins as the head expects
    with ray_head(num_cpus=2, log_path=logs / "head.log") as (address, head):
        deadline = time.monotonic() + 60
        while True:  # the head takes a few seconds to come up
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}})
                break
            except ConnectionError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        try:
            yield address
        finally:
            ray.shutdown()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def folders(cluster, tmp_path_factory):
    """A 2-shard folder (docids 10 * row + 7) and a plain index folder of other data."""
    root = tmp_path_factory.mktemp("indexes")

    def _configure(b):  # nested: sent to the build tasks by value
        return b.tree(num_leaves=20, num_leaves_to_search=6).score_ah(2).reorder(60).set_seed(3)

    db = np.random.default_rng(1).normal(size=(N, D)).astype(np.float32)
    ShardedIndex.build(db, 2, 10, docids=np.arange(N) * 10 + 7, configure=_configure,
                       directory=root / "sharded").shutdown()
    plain = np.random.default_rng(2).normal(size=(2000, D)).astype(np.float32)
    _configure(mipscan.builder(plain, 10, "dot_product")).build(
        docids=np.arange(2000)).serialize(root / "plain")
    return root


@pytest.fixture(scope="module")
def server(cluster, folders, tmp_path_factory):
    """`mipscan serve --ray SHARDED --replicas 2` on a free port; yields (client, port)."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("serve-ray") / "server.log"
    env = {**ray_env(), "MIPSCAN_SERVE_TOKEN": TOKEN}
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mipscan.cli", "serve", "--ray", str(folders / "sharded"),
             "--address", cluster, "--port", str(port), "--replicas", "2",
             "--max-body-bytes", str(1 << 20)],
            stdout=subprocess.PIPE, stderr=err, env=env, text=True, start_new_session=True)
    try:
        line = _read_line(proc, 180, log)
        assert f"{N:,} datapoints x {D}" in line and "2 shards, 2 replicas" in line, line
        assert f"http://127.0.0.1:{port}/" in line and "writes enabled" in line, line
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            # Serve's graceful shutdown (replicas, proxy, controller) takes seconds, but
            # over a minute on a 2-core machine under full load (seen in CI).
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _read_line(proc: subprocess.Popen, timeout: float, log: Path) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"no start-up line; stderr: {log.read_text()[-4000:]}")
    return box[0]


def _owner(port: int):
    return ray.get_actor(owner_name(port), namespace="mipscan")


def _search(client, q, **extra) -> dict:
    r = client.post("/search", json={"queries": np.asarray(q).tolist(), **extra})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- answers
def test_search_equals_the_in_process_sharded_search(server, folders):
    client, _ = server
    local = distributed._LocalIndex(str(folders / "sharded"), 1)  # the same two shards
    for nq, extra in ((1, {}), (7, {"k": 3}), (40, {"k": 25, "leaves_to_search": 20}),
                      (2, {"k": 10, "pre_reorder_num_neighbors": 10})):
        q = _queries(nq, seed=nq)
        body = _search(client, q, **extra)
        ids, scores = local.search(q, extra.get("k", 10), extra.get("pre_reorder_num_neighbors"),
                                   extra.get("leaves_to_search"))
        assert body["ids"] == np.asarray(ids).tolist()
        np.testing.assert_array_equal(np.float32(body["scores"]), scores)
        assert all(i % 10 == 7 for row in body["ids"] for i in row)  # docids, not rows


def test_a_plain_folder_answers_as_the_single_node_service(cluster, folders):
    """The Ray backend over a plain folder (one shard) behind create_app, against the
    single-node service on the same folder: equal answers, equal errors."""
    owner = share(folders / "plain")
    limits = Limits(max_body_bytes=1 << 20, max_queries=64, max_batch=100)
    ray_app = create_app(backend=ShardedBackend(owner, "plain"), token=TOKEN, limits=limits)
    single_app = create_app(folders / "plain", token=TOKEN, limits=limits)
    try:
        with running(ray_app) as a, running(single_app) as b, \
                httpx.Client(base_url=a, timeout=60) as ra, \
                httpx.Client(base_url=b, timeout=60) as sb:
            for nq, extra in ((1, {}), (5, {"k": 4}), (30, {"k": 50, "leaves_to_search": 20})):
                q = _queries(nq, seed=40 + nq).tolist()
                assert (ra.post("/search", json={"queries": q, **extra}).json()
                        == sb.post("/search", json={"queries": q, **extra}).json())
            for kind, method, path, body, headers, status, field in BAD:
                if kind == "bad Content-Length":
                    continue
                kwargs = request_kwargs(body, headers)
                got, want = ra.request(method, path, **kwargs), sb.request(method, path, **kwargs)
                if _filter_refused(got, body):  # the sharded index does not filter
                    continue
                assert (got.status_code, got.json()) == (want.status_code, want.json()), kind
            stats = ra.get("/stats").json()
            assert stats["size"] == 2000 and stats["config"]["sharded"] is False
    finally:
        ray_app.app.state.live.backend._stop.set()
        distributed.SharedIndex(owner).close()


# ---------------------------------------------------------------- errors and tokens
@pytest.mark.parametrize("kind,method,path,body,headers,status,field",
                         [b for b in BAD if b[0] not in _CLI_LIMITS],
                         ids=[b[0] for b in BAD if b[0] not in _CLI_LIMITS])
def test_bad_requests_get_their_4xx_through_ray_serve(server, kind, method, path, body,
                                                      headers, status, field):
    client, _ = server
    r = client.request(method, path, **request_kwargs(body, headers))
    if _filter_refused(r, body):
        return
    assert r.status_code == status, (kind, r.status_code, r.text[:300])
    assert r.json()["field"] == field, (kind, r.text[:300])


@pytest.mark.parametrize("path,body", WRITES, ids=[w[0] for w in WRITES])
def test_write_endpoints_refuse_a_missing_or_wrong_token(server, path, body):
    client, _ = server
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token"}, 403)):
        r = client.post(path, json=body, headers=headers)
        assert r.status_code == status and r.json()["field"] == "Authorization", r.text
    assert client.get("/healthz").json()["size"] >= N  # nothing was written


def test_hostile_requests(server):
    client, _ = server
    r = client.post("/search", content=b"[" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    r = client.get("/healthz", headers={"Host": "attacker.example"})
    assert r.status_code == 421 and r.json()["field"] == "Host"
    assert client.get("/../../etc/passwd").status_code == 404
    assert client.get("/search").status_code == 405
    r = client.post("/search", json={"queries": GOOD, "k": N + 1})
    assert r.status_code == 422 and r.json()["field"] == "k"


# ---------------------------------------------------------------- writes
def test_an_upsert_is_seen_through_every_replica(server):
    client, port = server
    v = np.full((1, D), 5.0, np.float32)
    r = client.post("/upsert", json={"docids": [900_001], "vectors": v.tolist()}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"upserted": 1, "size": N + 1}, r.text
    replicas = set()
    for _ in range(30):  # new connections: the proxy picks a replica for each request
        with httpx.Client(base_url=str(client.base_url), timeout=60) as fresh:
            assert _search(fresh, v, k=1)["ids"] == [[900_001]]
            replicas.add(fresh.get("/stats").json()["replica"])
    assert len(replicas) == 2, replicas
    # Deletes are all or nothing across shards: an unknown docid deletes none.
    r = client.post("/delete", json={"docids": [900_001, 123_456_789]}, headers=AUTH)
    assert r.status_code == 404 and "123456789" in r.json()["error"], r.text
    assert _search(client, v, k=1)["ids"] == [[900_001]]
    r = client.post("/delete", json={"docids": [900_001]}, headers=AUTH)
    assert r.json() == {"deleted": 1, "size": N}
    assert _search(client, v, k=1)["ids"] != [[900_001]]
    r = client.post("/upsert", json={"docids": ["a"], "vectors": v.tolist()}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "docids"


def test_concurrent_upserts_and_searches_then_snapshot_and_reload(server, folders):
    client, port = server
    base = str(client.base_url)
    rng = np.random.default_rng(5)
    new = rng.normal(size=(40, D)).astype(np.float32) * 4
    new_ids = list(range(800_000, 800_040))
    statuses: list[int] = []

    def searcher(seed: int):
        with httpx.Client(base_url=base, timeout=60) as c:
            for i in range(25):
                r = c.post("/search", json={"queries": _queries(1 + i % 3, seed + i).tolist()})
                statuses.append(r.status_code)

    def updater():
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as c:
            for j in range(0, 40, 4):
                r = c.post("/upsert", json={"docids": new_ids[j:j + 4],
                                            "vectors": new[j:j + 4].tolist()})
                statuses.append(r.status_code)
            statuses.append(c.post("/snapshot").status_code)
            statuses.append(c.post("/reload").status_code)  # restarts every shard

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(searcher, 100 * s) for s in range(3)] + [pool.submit(updater)]:
            f.result()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    # Every upsert survived the snapshot and the reload, on every replica.
    for _ in range(6):
        with httpx.Client(base_url=base, timeout=60) as fresh:
            ids = _search(fresh, new, k=1)["ids"]
            assert [row[0] for row in ids] == new_ids
    manifest = json.loads((folders / "sharded" / distributed.MANIFEST).read_text())
    assert manifest["n"] == N + 40
    assert ray.get(_owner(port).view.remote())["epoch"] == 2


# ---------------------------------------------------------------- faults
def test_a_killed_shard_is_restored_or_named(server, folders):
    client, port = server
    q = _queries(6, seed=77)
    want = _search(client, q)
    shards = ray.get(_owner(port).view.remote())["shards"]
    os.kill(shards[1]["pid"], signal.SIGKILL)  # the process of shard 1's actor
    assert _search(client, q) == want  # restarted (updates replayed), searched again
    restarted = ray.get(_owner(port).view.remote())["shards"][1]["pid"]
    assert restarted != shards[1]["pid"]

    # Shard 0's folder made unloadable, then its process killed: a 503 naming shard 0.
    manifest = json.loads((folders / "sharded" / distributed.MANIFEST).read_text())
    index_json = folders / "sharded" / manifest["shards"][0]["folder"] / "mipscan.json"
    saved = index_json.read_bytes()
    index_json.write_text("{}")
    try:
        os.kill(ray.get(_owner(port).view.remote())["shards"][0]["pid"], signal.SIGKILL)
        time.sleep(0.5)
        r = client.post("/search", json={"queries": q.tolist()})
        assert r.status_code == 503 and r.json()["field"] == "shard 0", r.text
        assert "shard 0 of 2" in r.json()["error"] and "could not be started" in r.json()["error"]
    finally:
        index_json.write_bytes(saved)
    assert _search(client, q) == want  # the folder is back: restarted on the next search


def test_a_dead_owner_is_a_503_naming_the_index(server):
    """Last of the server's tests: the owner's process killed (its shards go with it)."""
    client, port = server
    os.kill(ray.get(_owner(port).view.remote())["owner_pid"], signal.SIGKILL)
    time.sleep(0.5)
    for path, body, headers in (("/search", {"queries": GOOD}, {}),
                                ("/upsert", {"docids": [5], "vectors": GOOD}, AUTH)):
        r = client.post(path, json=body, headers=headers)
        assert r.status_code == 503 and r.json()["field"] == "index", r.text
        assert "owner actor died" in r.json()["error"]


# ---------------------------------------------------------------- the command line
def test_cli_refusals_before_any_cluster(folders, tmp_path):
    p = run_cli("serve", "--ray", str(folders / "sharded"), "--host", "0.0.0.0",
                env=RAY_AUTH)
    assert p.returncode == 2 and "without a token" in p.stderr, p.stderr
    p = run_cli("serve", "--ray", str(tmp_path), env=RAY_AUTH)
    assert p.returncode == 2 and "not a mipscan index folder" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = run_cli("serve", "--ray", str(folders / "sharded"), block="ray.serve")
    assert p.returncode == 1 and p.stderr.strip() == (
        "mipscan serve --ray needs Ray Serve (no module named 'ray.serve'): "
        'pip install "mipscan[serve,ray]"'), p.stderr
