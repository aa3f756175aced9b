"""`mipscan serve` against a real uvicorn server on 127.0.0.1: search answers equal the
in-process searcher's, every bad request gets a 4xx JSON error naming its field, write
endpoints need the token, /reload under load fails no request and a damaged folder is
refused while the old index keeps answering; the CLI's start-up rules."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import mipscan
from mipscan.serve import ServeError, is_loopback, read_token, serve
from mipscan.serve._app import Limits, create_app

from _serve_util import request_kwargs, running

# The folder holding the mipscan this test imports (the checkout's src/ in a developer's
# tree, site-packages where the package is installed, as in CI): subprocesses get it first.
SRC = Path(mipscan.__file__).resolve().parents[1]
TOKEN = "t0k3n-for-the-serve-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
D = 16
#: Whether the searcher has the live index's update methods (issue 13): the write tests
#: check their behaviour when it has, and the 501 answer until then. None skips.
LIVE = hasattr(mipscan.Searcher, "upsert") and hasattr(mipscan.Searcher, "delete")


def build(n: int, seed: int, d: int = D):
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(n, d)).astype(np.float32)
    return (mipscan.builder(db, 10, "dot_product").tree(num_leaves=30, num_leaves_to_search=8)
            .score_ah(2).reorder(100).build())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "index"
    build(3000, 1).serialize(folder)
    return folder


@pytest.fixture(scope="module")
def server(index_dir):
    """One server for the read-only and bad-request tests (its index is never changed)."""
    app = create_app(index_dir, token=TOKEN, limits=Limits(max_body_bytes=1 << 20,
                                                           max_queries=64, max_batch=100,
                                                           body_seconds=1.0))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


def queries(nq: int, seed: int = 7, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(nq, d)).astype(np.float32)


# ---------------------------------------------------------------- answers
def test_search_matches_the_searcher(server, index_dir):
    client, _ = server
    local = mipscan.load_searcher(index_dir)
    for nq, extra in ((1, {}), (5, {"k": 3}), (40, {"k": 20, "leaves_to_search": 30}),
                      (2, {"k": 10, "pre_reorder_num_neighbors": 10})):
        q = queries(nq)
        r = client.post("/search", json={"queries": q.tolist(), **extra})
        assert r.status_code == 200, r.text
        body = r.json()
        kwargs = {"final_num_neighbors": extra.get("k", 10),
                  "leaves_to_search": extra.get("leaves_to_search"),
                  "pre_reorder_num_neighbors": extra.get("pre_reorder_num_neighbors")}
        ids, scores = local.search_batched(q, **kwargs)
        assert body["ids"] == ids.tolist()
        np.testing.assert_allclose(body["scores"], scores, rtol=1e-6)


def test_health_stats_metrics(server):
    client, _ = server
    assert client.get("/healthz").json()["status"] == "ok"
    stats = client.get("/stats").json()
    assert stats["size"] == 3000 and stats["d"] == D
    assert stats["simd_level"] == mipscan.simd_level()
    assert stats["uptime_s"] > 0 and stats["num_leaves"] == 30
    # The config: today a dict; with the live index, config() is a text naming the method.
    assert (stats["config"]["tree"]["num_leaves"] == 30 if isinstance(stats["config"], dict)
            else "partition" in stats["config"].lower())
    assert stats["writes"] == {"enabled": True, "upsert": LIVE, "delete": LIVE}
    client.post("/search", json={"queries": [[0.5] * D]})
    client.post("/search", json={"queries": [[0.5] * 3]})
    text = client.get("/metrics").text
    assert 'mipscan_requests_total{endpoint="/search",method="POST",status="200"}' in text
    assert 'mipscan_request_errors_total{endpoint="/search",status="422"}' in text
    assert 'mipscan_request_duration_seconds_bucket{endpoint="/search",le="0.005"}' in text
    assert "mipscan_index_size 3000.0" in text
    assert "mipscan_queries_total" in text


# ---------------------------------------------------------------- bad requests
J = {"Content-Type": "application/json"}
GOOD = [[0.1] * D]
# (kind, method, path, body (JSON-able, or bytes sent as is), headers, status, field)
BAD = [
    ("malformed JSON", "POST", "/search", b'{"queries": [[0.1, ', J, 400, "body"),
    ("not UTF-8", "POST", "/search", b'{"queries": "\xff\xfe"}', J, 400, "body"),
    ("NaN literal", "POST", "/search", b'{"queries": [[NaN' + b', 0' * (D - 1) + b']]}', J,
     400, "body"),
    ("Infinity literal", "POST", "/search", b'{"queries": [[Infinity]]}', J, 400, "body"),
    ("number overflowing a double", "POST", "/search",
     b'{"queries": [[1e999' + b', 0' * (D - 1) + b']]}', J, 422, "queries[0]"),
    ("repeated key", "POST", "/search", b'{"k": 1, "k": 2, "queries": [[1]]}', J, 400, "body"),
    ("nested too deeply", "POST", "/search", b"[" * 100_000 + b"]" * 100_000, J, 400, "body"),
    ("empty body", "POST", "/search", b"", J, 400, "body"),
    ("wrong Content-Type", "POST", "/search", json.dumps({"queries": GOOD}).encode(),
     {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("body is not an object", "POST", "/search", [GOOD], None, 422, "body"),
    ("unknown field", "POST", "/search", {"queries": GOOD, "path": "/etc/passwd"}, None, 422,
     "path"),
    ("missing queries", "POST", "/search", {"k": 3}, None, 422, "queries"),
    ("queries not a list", "POST", "/search", {"queries": "0.1, 0.2"}, None, 422, "queries"),
    ("empty queries", "POST", "/search", {"queries": []}, None, 422, "queries"),
    ("a query not a list", "POST", "/search", {"queries": [0.1] * D}, None, 422, "queries[0]"),
    ("wrong dimension", "POST", "/search", {"queries": [[0.1] * D, [0.1] * (D + 1)]}, None,
     422, "queries[1]"),
    ("string in a vector", "POST", "/search", {"queries": [[0.1] * (D - 1) + ["1"]]}, None,
     422, "queries[0]"),
    ("boolean in a vector", "POST", "/search", {"queries": [[True] * D]}, None, 422,
     "queries[0]"),
    ("null in a vector", "POST", "/search", {"queries": [[None] * D]}, None, 422, "queries[0]"),
    ("out of float32 range", "POST", "/search", {"queries": [[1e39] * D]}, None, 422,
     "queries[0]"),
    ("huge integer", "POST", "/search", {"queries": [[10**400] + [0] * (D - 1)]}, None, 422,
     "queries"),
    ("too many queries", "POST", "/search", {"queries": GOOD * 65}, None, 422, "queries"),
    ("k zero", "POST", "/search", {"queries": GOOD, "k": 0}, None, 422, "k"),
    ("k above the index size", "POST", "/search", {"queries": GOOD, "k": 3001}, None, 422, "k"),
    ("k not an integer", "POST", "/search", {"queries": GOOD, "k": 2.5}, None, 422, "k"),
    ("k a string", "POST", "/search", {"queries": GOOD, "k": "10"}, None, 422, "k"),
    ("k null", "POST", "/search", {"queries": GOOD, "k": None}, None, 422, "k"),
    ("negative leaves_to_search", "POST", "/search", {"queries": GOOD, "leaves_to_search": -1},
     None, 422, "leaves_to_search"),
    ("too many leaves", "POST", "/search", {"queries": GOOD, "leaves_to_search": 31}, None, 422,
     "leaves_to_search"),
    ("pre_reorder above n", "POST", "/search",
     {"queries": GOOD, "pre_reorder_num_neighbors": 3001}, None, 422,
     "pre_reorder_num_neighbors"),
    ("body too large", "POST", "/search", b"[" + b"0," * (1 << 20) + b"0]", J, 413, "body"),
    ("bad Content-Length", "POST", "/search", None, {"Content-Length": "x"}, 400, None),
    ("unknown path", "GET", "/../../etc/passwd", None, None, 404, "path"),
    ("wrong method", "GET", "/search", None, None, 405, "method"),
    ("foreign Host (DNS rebinding)", "GET", "/stats", None, {"Host": "evil.example:8080"}, 421,
     "Host"),
    ("missing token", "POST", "/reload", None, None, 401, "Authorization"),
    ("wrong token", "POST", "/snapshot", None, {"Authorization": "Bearer nope"}, 403,
     "Authorization"),
    ("token of another scheme", "POST", "/reload", None,
     {"Authorization": f"Basic {TOKEN}"}, 401, "Authorization"),
    ("a path given to /reload", "POST", "/reload", {"path": "/etc"}, AUTH, 422, "path"),
    ("a folder given to /snapshot", "POST", "/snapshot", {"directory": "/tmp/x"}, AUTH, 422,
     "directory"),
    ("upsert without vectors", "POST", "/upsert", {"docids": [1]}, AUTH, 422, "vectors"),
    ("delete with docids not a list", "POST", "/delete", {"docids": 5}, AUTH, 422, "docids"),
    ("upsert with a float docid", "POST", "/upsert", {"docids": [1.5], "vectors": GOOD}, AUTH,
     422, "docids[0]"),
    ("upsert rows and docids differ", "POST", "/upsert", {"docids": [1, 2], "vectors": GOOD},
     AUTH, 422, "vectors"),
    ("delete too many docids", "POST", "/delete", {"docids": list(range(101))}, AUTH, 422,
     "docids"),
    ("page without page data", "GET", "/page/users", None, None, 404, "page"),
    ("excluded id not in the index", "POST", "/search", {"queries": GOOD, "excluded": [3000]},
     None, 422, "excluded"),
    ("allowed id negative", "POST", "/search", {"queries": GOOD, "allowed": [-1]}, None, 422,
     "allowed"),
    ("allowed a string id on an index without docids", "POST", "/search",
     {"queries": GOOD, "allowed": ["a"]}, None, 422, "allowed"),
    ("allowed id beyond int64", "POST", "/search", {"queries": GOOD, "allowed": [2**70]}, None,
     422, "allowed"),
    ("per-query filter lists mixed with ids", "POST", "/search",
     {"queries": GOOD * 2, "allowed": [[1], 2]}, None, 422, "allowed[1]"),
    ("a filter list per query, wrong count", "POST", "/search",
     {"queries": GOOD, "excluded": [[1], [2]]}, None, 422, "excluded"),
    ("filter an object", "POST", "/search", {"queries": GOOD, "allowed": {"1": 1}}, None, 422,
     "allowed"),
    ("k beyond int64", "POST", "/search", {"queries": GOOD, "k": 10**30}, None, 422, "k"),
    ("integer of 5,000 digits", "POST", "/search",
     b'{"queries": [[' + b"1" * 5000 + b"]]}", J, 400, "body"),
    ("queries nested 500 deep", "POST", "/search",
     b'{"queries": ' + b"[" * 500 + b"]" * 500 + b"}", J, 422, "queries[0]"),
    ("a URL parameter on /reload", "POST", "/reload?path=/etc", None, AUTH, 422, "path"),
    ("a URL parameter on /search", "POST", "/search?k=5", {"queries": GOOD}, None, 422, "k"),
    ("form Content-Type (cross-site POST)", "POST", "/search",
     json.dumps({"queries": GOOD}).encode(),
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("Content-Type application/jsonx", "POST", "/search", json.dumps({"queries": GOOD}).encode(),
     {"Content-Type": "application/jsonx"}, 415, "Content-Type"),
    ("encoded dot-dot path", "GET", "/%2e%2e/%2e%2e/etc/passwd", None, None, 404, "path"),
    ("lone surrogate as a key", "POST", "/search",
     b'{"\\ud800": 1, "queries": [[0' + b', 0' * (D - 1) + b']]}', J, 422, "\\ud800"),
    ("lone surrogate in a filter id", "POST", "/search",
     json.dumps({"queries": GOOD, "allowed": ["\ud800"]}).encode(), J, 422, "allowed[0]"),
    ("lone surrogate as a docid", "POST", "/upsert",
     json.dumps({"docids": ["\ud800"], "vectors": GOOD}).encode(), {**J, **AUTH}, 422,
     "docids[0]"),
    ("PUT on a write endpoint", "PUT", "/upsert", {"docids": [1], "vectors": GOOD}, AUTH, 405,
     "method"),
    ("body stalls midway (slowloris)", "POST", "/search", None, None, 408, "body"),
]


def test_bad_request_table_is_long_enough():
    assert len(BAD) >= 20 and len({kind for kind, *_ in BAD}) == len(BAD)


@pytest.mark.parametrize("kind,method,path,body,headers,status,field", BAD,
                         ids=[b[0] for b in BAD])
def test_bad_request(server, kind, method, path, body, headers, status, field):
    client, _ = server
    kwargs = request_kwargs(body, headers)
    if kind == "body stalls midway (slowloris)":
        # 40 of the 200 bytes announced, then nothing: answered within body_seconds (1 s
        # here), connection closed, instead of a request left open for ever.
        r = _raw(client, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 200"
                 b"\r\nContent-Type: application/json\r\n\r\n" + b'{"queries": [[0.1' * 2)
        head, _, body = r.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), r[:300]
        assert b"connection: close" in head.lower()
        assert json.loads(body)["field"] == "body"
        return
    if kind == "bad Content-Length":
        r = _raw(client, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n"
                 b"Content-Type: application/json\r\n\r\n{}")
        # h11/httptools refuse it before the app: a 400 either way, never a 5xx.
        assert r.startswith(b"HTTP/1.1 400"), r[:200]
        return
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, (kind, r.status_code, r.text[:300])
    err = r.json()
    assert set(err) == {"error", "field"} and err["error"]
    assert err["field"] == field, (kind, err)
    # The server still answers normally afterwards.
    assert client.post("/search", json={"queries": GOOD}).status_code == 200


def _raw(client: httpx.Client, request: bytes) -> bytes:
    import socket

    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def test_abandoned_and_oversized_streams_are_no_server_error(server):
    """A client that closes mid-body, and a chunked body (no Content-Length) that grows past
    the limit: a 400 and a 413 in the metrics, never a 500."""
    import socket
    import time

    client, _ = server
    host, port = client.base_url.host, client.base_url.port
    key = 'mipscan_request_errors_total{endpoint="/search",status="400"} '

    def count_400() -> float:
        text = client.get("/metrics").text
        return float(text.split(key)[1].split()[0]) if key in text else 0.0

    before = count_400()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n"
                  b"Content-Type: application/json\r\n\r\n{\"queries\": [[0.1")
    r = client.post("/search", headers=J, content=(b"[0.0," * 4096 for _ in range(100)))
    assert r.status_code == 413 and r.json()["field"] == "body", r.text
    for _ in range(50):  # the abandoned request ends when the server sees the close
        if count_400() == before + 1:
            break
        time.sleep(0.1)
    assert count_400() == before + 1
    assert 'status="500"' not in client.get("/metrics").text


PARSE_SAME = [b'{"queries": [[0.5, -1e-7, 3]], "k": 10}', b'{"docids": ["docids", "k"], "k": 1}',
              b'{"a": 18446744073709551616}', b'{"a": 123456789012345678901234567890}',
              b'{"a": "\\u00e9t\xc3\xa9", "b": [1.5e308]}', b'[{"a": 1}, {"a": 2}]',
              b'{"a": {"b": 1}, "c": 2}', b'{"\\u0061": 1, "b": 2}', b'  {"a": []}  ',
              b'\xef\xbb\xbf{"a": 1}']
PARSE_REFUSED = [b'{"a": 1, "a": 2}', b'{"a": 1,"a" :2}', b'{"a": 1, "\\u0061": 2}',
                 b'{"a": {"b": 1, "b": 2}}', b'{"a": NaN}', b'{"a": -Infinity}',
                 b'{"a": 1} x', b'{"a": "\xff"}']


@pytest.mark.parametrize("body", PARSE_SAME + PARSE_REFUSED)
def test_parse_json_equals_the_strict_standard_library(body):
    """parse_json's orjson path gives what the strict stdlib parse gives: the same value
    (integers beyond 64 bits stay integers), or a 400 naming the body."""
    from mipscan.serve._app import HTTPError, parse_json

    if body in PARSE_SAME:
        assert parse_json(body) == json.loads(body)
        assert type(parse_json(body)) is type(json.loads(body))
    else:
        with pytest.raises(HTTPError) as err:
            parse_json(body)
        assert err.value.status == 400 and err.value.field == "body"


def test_slow_headers_are_cut_off(index_dir):
    """The server's protocol (``mipscan serve`` uses it) closes a connection whose request
    headers did not all arrive within the deadline, silent or trickling (slowloris), while
    a normal client on the same server is answered."""
    import socket
    import time

    from mipscan.serve import header_deadline_protocol

    protocol = header_deadline_protocol(0.5)
    assert protocol is not None  # httptools is in the serve extra
    with running(create_app(index_dir), http=protocol) as url:
        host, port = httpx.URL(url).host, httpx.URL(url).port
        for first in (b"", b"POST /search HTTP/1.1\r\nHost: 127"):
            with socket.create_connection((host, port), timeout=10) as s:
                t0 = time.monotonic()
                s.sendall(first)
                if first:
                    time.sleep(0.3)
                    s.sendall(b".0.0.1\r\nContent-")  # still trickling
                assert s.recv(100) == b""  # closed by the server, no answer
                assert time.monotonic() - t0 < 5
        with httpx.Client(base_url=url) as c:  # keep-alive: each request gets its deadline
            for _ in range(3):
                assert c.post("/search", json={"queries": GOOD}).status_code == 200
                time.sleep(0.3)


def test_json_error_bodies_never_5xx_on_fuzzed_input(server):
    """Random mutations of a valid body: always a 200 or a 4xx with a JSON error."""
    client, _ = server
    rng = np.random.default_rng(3)
    valid = json.dumps({"queries": [[0.25] * D], "k": 5}).encode()
    for _ in range(150):
        b = bytearray(valid)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] = int(rng.integers(32, 127))
        r = client.post("/search", content=bytes(b), headers=J)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (bytes(b), r.text)
        if r.status_code != 200:
            assert r.json()["field"] is not None


# ---------------------------------------------------------------- writes and tokens
WRITES = [("/upsert", {"docids": [1], "vectors": [[0.0] * D]}), ("/delete", {"docids": [1]}),
          ("/snapshot", None), ("/reload", None)]


@pytest.mark.parametrize("path,body", WRITES, ids=[w[0] for w in WRITES])
def test_write_endpoints_need_the_token(server, path, body):
    client, _ = server
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token"}, 403),
                            ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403),
                            ({"Authorization": "Bearer"}, 401)):
        r = client.post(path, json=body, headers=headers)
        assert r.status_code == status, (path, headers, r.text)
        assert r.json()["field"] == "Authorization"


def test_write_endpoints_disabled_without_a_token(index_dir):
    with running(create_app(index_dir, token=None)) as url:
        for path, body in WRITES:
            r = httpx.post(url + path, json=body, headers=AUTH)
            assert r.status_code == 403 and "disabled" in r.json()["error"], r.text
        assert httpx.post(url + "/search", json={"queries": GOOD}).status_code == 200


def test_upsert_and_delete(tmp_path):
    """The live index's updates when the searcher has them (issue 13); until then, 501
    with a JSON error naming the endpoint. Never skipped."""
    folder = tmp_path / "index"
    if LIVE:  # results are docids once the index has them
        rng = np.random.default_rng(2)
        (mipscan.builder(rng.normal(size=(2000, D)).astype(np.float32), 10, "dot_product")
         .tree(num_leaves=30, num_leaves_to_search=8).score_ah(2).reorder(100)
         .build(docids=list(range(2000))).serialize(folder))
    else:
        build(2000, 2).serialize(folder)
    app = create_app(folder, token=TOKEN)
    with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        v = queries(3, seed=11) * 10
        r_up = c.post("/upsert", json={"docids": [5001, 5002, 5003], "vectors": v.tolist()})
        r_del = c.post("/delete", json={"docids": [5001]})
        if not LIVE:
            for r, name in ((r_up, "upsert"), (r_del, "delete")):
                assert r.status_code == 501, r.text
                assert r.json()["field"] == name and "live index" in r.json()["error"]
            return
        assert r_up.status_code == 200 and r_up.json()["upserted"] == 3, r_up.text
        assert r_del.status_code == 200 and r_del.json()["deleted"] == 1, r_del.text
        every = {"leaves_to_search": 30}  # wherever the updates went
        hits = c.post("/search", json={"queries": v.tolist(), "k": 1, **every}).json()["ids"]
        assert hits[1] == [5002] and hits[2] == [5003] and hits[0] != [5001]
        r = c.post("/delete", json={"docids": [5001]})  # already gone: unknown
        assert r.status_code == 404 and r.json()["field"] == "docids" and "5001" in r.text
        r = c.post("/upsert", json={"docids": [1, 1], "vectors": v[:2].tolist()})
        assert r.status_code == 422 and r.json()["field"] == "docids[1]"
        r = c.post("/upsert", json={"docids": [7], "vectors": [[float("1e39")] * D]})
        assert r.status_code == 422
        size = c.get("/stats").json()["size"]
        assert c.post("/snapshot").status_code == 200
        assert c.post("/reload").status_code == 200
        assert c.get("/stats").json()["size"] == size
        assert c.post("/search", json={"queries": v[1:2].tolist(), "k": 1, **every}
                      ).json()["ids"] == [[5002]]


def test_filters_wait_for_filtered_search(server):
    """allowed/excluded (issue 15): passed to the searcher once it takes them; until then
    a 501 naming the field. Malformed filters are a 422 either way. Never skipped."""
    client, _ = server
    takes = "allowed" in __import__("inspect").signature(
        mipscan.Searcher.search_batched).parameters
    r = client.post("/search", json={"queries": GOOD, "allowed": [1, 2, 3], "k": 3})
    if takes:
        assert r.status_code == 200 and set(r.json()["ids"][0]) <= {1, 2, 3}, r.text
    else:
        assert r.status_code == 501 and r.json()["field"] == "allowed", r.text
    r = client.post("/search", json={"queries": GOOD, "excluded": [[1.5]]})
    assert r.status_code == (422 if takes else 501), r.text
    if not takes:
        return
    # Per-query allow lists of different lengths: the short one is padded with id -1 and a
    # null score (JSON has no -inf); this was a 500 while the encoder refused infinities.
    r = client.post("/search", json={"queries": GOOD * 2, "allowed": [[1, 2, 3], [4]],
                                     "k": 5})
    assert r.status_code == 200, r.text
    ids, scores = r.json()["ids"], r.json()["scores"]
    assert sorted(ids[0]) == [1, 2, 3] and ids[1] == [4, -1, -1], ids
    assert scores[1][1:] == [None, None] and all(isinstance(x, float) for x in scores[0])


class LiveDouble:
    """A stand-in with the live index's surface (issue 13: docids, upsert, delete, size(),
    config()) over exact search, so that the server's write path runs today; the test
    above runs the real one once it lands."""

    distance_measure, num_leaves, num_neighbors, num_threads = "dot_product", 1, 10, 1
    max_leaves_to_search = 1

    def __init__(self, d: int):
        self.d, self.rows = d, {}

    def size(self) -> int:
        return len(self.rows)

    def config(self) -> str:
        return "brute force (test double)"

    def set_num_threads(self, n: int) -> None:
        self.num_threads = n

    def upsert(self, docids, vectors) -> None:
        self.rows.update(zip(docids, np.asarray(vectors, np.float32)))

    def delete(self, docids) -> None:
        missing = [x for x in docids if x not in self.rows]
        if missing:
            raise KeyError(missing[0])
        for x in docids:
            del self.rows[x]

    def search_batched(self, q, final_num_neighbors=10, leaves_to_search=None,
                       pre_reorder_num_neighbors=None):
        ids = np.array(list(self.rows))
        scores = q @ np.stack(list(self.rows.values())).T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :final_num_neighbors]
        return ids[order], np.take_along_axis(scores, order, axis=1)

    search_batched_parallel = search_batched


def test_write_path_with_a_live_searcher_double(index_dir):
    live = LiveDouble(D)
    live.upsert(["a", "b"], queries(2, seed=20))
    app = create_app(index_dir, token=TOKEN, searcher=live)
    v = queries(3, seed=21) * 10
    with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        r = c.post("/upsert", json={"docids": ["x", "y", "z"], "vectors": v.tolist()})
        assert r.status_code == 200 and r.json() == {"upserted": 3, "size": 5}, r.text
        r = c.post("/search", json={"queries": v.tolist(), "k": 1})
        assert r.json()["ids"] == [["x"], ["y"], ["z"]]
        r = c.post("/search", json={"queries": v[:1].tolist()})  # default k: min(10, size)
        assert len(r.json()["ids"][0]) == 5
        r = c.post("/delete", json={"docids": ["x", "nope"]})
        assert r.status_code == 404 and r.json()["field"] == "docids" and "nope" in r.text
        assert c.get("/stats").json()["size"] == 5  # nothing deleted
        assert c.post("/delete", json={"docids": ["x"]}).json() == {"deleted": 1, "size": 4}
        r = c.post("/upsert", json={"docids": ["q", 3], "vectors": v[:2].tolist()})
        assert r.status_code == 422 and r.json()["field"] == "docids[1]"
        stats = c.get("/stats").json()
        assert stats["config"] == "brute force (test double)"
        assert stats["writes"] == {"enabled": True, "upsert": True, "delete": True}


class ThreadRecordingDouble(LiveDouble):
    """Records the thread that checks each /search body (search_args calls size())."""

    def __init__(self, d: int):
        super().__init__(d)
        self.threads: list[str] = []

    def size(self) -> int:
        self.threads.append(threading.current_thread().name)
        return super().size()


def test_large_search_bodies_are_checked_off_the_event_loop(index_dir):
    """A body of 64 KiB or more is parsed and checked on a worker thread (a million filter
    ids took the event loop for hundreds of milliseconds, stalling every client); a small
    one on the loop, where a thread hop would cost more than the check."""
    live = ThreadRecordingDouble(D)
    live.upsert(list(range(50)), queries(50, seed=22))
    app = create_app(index_dir, token=TOKEN, searcher=live)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/search", json={"queries": GOOD, "k": 3})
        assert r.status_code == 200 and len(r.json()["ids"][0]) == 3
        r = c.post("/search", json={"queries": GOOD * 1000, "k": 3})  # 80 KB
        assert r.status_code == 200 and len(r.json()["ids"]) == 1000
        r = c.post("/search", json={"queries": GOOD * 1000 + [["x"] * D]})
        assert r.status_code == 422 and r.json()["field"] == "queries[1000]", r.text
    assert live.threads[0] == "test-uvicorn"  # the loop's thread (tests/_serve_util.py)
    assert all(t.startswith("mipscan-serve") for t in live.threads[1:3]), live.threads


# ---------------------------------------------------------------- snapshot and reload
def test_snapshot_rewrites_the_folder(tmp_path):
    folder = tmp_path / "index"
    build(1500, 3).serialize(folder)
    before = (folder / "mipscan.json").read_bytes()
    with running(create_app(folder, token=TOKEN)) as url:
        r = httpx.post(url + "/snapshot", headers=AUTH)
        assert r.status_code == 200 and r.json()["size"] == 1500, r.text
    assert mipscan.load_searcher(folder).size() == 1500
    assert json.loads((folder / "mipscan.json").read_bytes())["format"] == \
        json.loads(before)["format"]
    # A folder that also holds a foreign file is not replaced: 409, nothing deleted.
    (folder / "notes.txt").write_text("mine")
    with running(create_app(folder, token=TOKEN)) as url:
        r = httpx.post(url + "/snapshot", headers=AUTH)
        assert r.status_code == 409 and r.json()["field"] == "index", r.text
        assert "notes.txt" in r.json()["error"]
    assert (folder / "notes.txt").read_text() == "mine"


def _replace_index(searcher, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # the damaged folder left by _damage
    searcher.serialize(folder)


def _damage(folder: Path, turn: int) -> None:
    """Damages the index in ``folder`` as a half-finished copy would, replacing files (a
    new inode, never rewriting the one the server may have mapped)."""
    def replace(name: str, data: bytes) -> None:
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)

    kind = turn % 3
    if kind == 0:
        replace("mipscan.json", b"{not json")
    elif kind == 1:
        replace("packed_codes.npy", (folder / "packed_codes.npy").read_bytes()[:-100])
    else:
        (folder / "centroids.npy").unlink()


def test_reload_under_load_fails_nothing_and_mixes_nothing(tmp_path):
    """8 clients search while the folder is replaced (serialize) and reloaded 6 times,
    alternating two indexes of different sizes, and after each good reload the folder is
    damaged and reloaded again (refused): every answer is 200 and equals, in full, the
    answer of one of the two indexes, and each refusal leaves the index just loaded."""
    folder = tmp_path / "index"
    a, b = build(3000, 4), build(2500, 5)
    a.serialize(folder)
    q = queries(32, seed=9)
    expect = {name: s.search_batched(q, final_num_neighbors=10).indices.tolist()
              for name, s in (("a", a), ("b", b))}
    app = create_app(folder, token=TOKEN)
    seen = {"a": 0, "b": 0}
    failures: list[str] = []

    async def searcher_task(client, i, stop):
        n = 0
        while not stop.is_set() and n < 2000:
            j = (i * 7 + n) % len(q)
            r = await client.post("/search", json={"queries": [q[j].tolist()]})
            n += 1
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            ids = r.json()["ids"][0]
            which = [k for k in ("a", "b") if expect[k][j] == ids]
            if not which:
                failures.append(f"query {j}: {ids} is neither index's answer")
            else:
                seen[which[0]] += 1

    async def main(url):
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            tasks = [asyncio.create_task(searcher_task(client, i, stop)) for i in range(8)]
            for turn in range(6):
                await asyncio.sleep(0.15)
                new = b if turn % 2 == 0 else a
                await asyncio.to_thread(_replace_index, new, folder)
                r = await client.post("/reload", headers=AUTH)
                assert r.status_code == 200 and r.json()["size"] == new.size(), r.text
                await asyncio.sleep(0.05)
                await asyncio.to_thread(_damage, folder, turn)
                r = await client.post("/reload", headers=AUTH)
                assert r.status_code == 409 and r.json()["field"] == "index", r.text
                health = (await client.get("/healthz")).json()
                assert health["size"] == new.size() and health["generation"] == turn + 2
            await asyncio.sleep(0.15)
            stop.set()
            await asyncio.gather(*tasks)
            return (await client.get("/stats")).json()

    with running(app) as url:
        stats = asyncio.run(main(url))
        metrics = httpx.get(url + "/metrics").text
    assert failures == []
    assert seen["a"] > 0 and seen["b"] > 0, seen
    assert stats["generation"] == 7 and stats["size"] == 3000
    assert 'mipscan_reloads_total{result="refused"} 6.0' in metrics
    assert 'mipscan_reloads_total{result="ok"} 6.0' in metrics


def test_upserts_snapshots_and_reloads_race_under_load(tmp_path):
    """Searches, a writer posting /upsert and /delete, and /snapshot + /reload, all at
    once on a live index: every request is answered 200 (the write lock orders the writes).
    Then what a reload keeps: the folder's index, so an update snapshotted before it
    stays, and one made after the last snapshot is dropped."""
    folder = tmp_path / "index"
    rng = np.random.default_rng(14)
    (mipscan.builder(rng.normal(size=(2000, D)).astype(np.float32), 10, "dot_product")
     .tree(num_leaves=30, num_leaves_to_search=8).score_ah(2).reorder(100)
     .build(docids=list(range(2000))).serialize(folder))
    app = create_app(folder, token=TOKEN)
    statuses: dict = {}
    q = queries(16, seed=15)

    def vector() -> list:
        v = rng.normal(size=D)
        return (v * 20 / np.linalg.norm(v)).tolist()  # norm 20, the others' ~4

    def count(what, r):
        key = (what, r.status_code)
        statuses[key] = statuses.get(key, 0) + 1
        if r.status_code != 200:
            statuses.setdefault("samples", []).append((what, r.text[:200]))

    async def searches(client, i, stop):
        n = 0
        while not stop.is_set():
            count("search", await client.post("/search", json={"queries": [q[(i + n) % 16]
                                                                          .tolist()]}))
            n += 1

    async def writer(client, stop):
        n = 0
        while not stop.is_set():
            count("upsert", await client.post("/upsert", headers=AUTH, json={
                "docids": [10_000 + n], "vectors": [vector()]}))
            if n % 5 == 4:  # and delete an original row now and then
                count("delete", await client.post("/delete", headers=AUTH,
                                                  json={"docids": [n]}))
            n += 1

    async def main(url):
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            tasks = [asyncio.create_task(searches(client, i, stop)) for i in range(4)]
            tasks.append(asyncio.create_task(writer(client, stop)))
            for _ in range(5):
                await asyncio.sleep(0.1)
                count("snapshot", await client.post("/snapshot", headers=AUTH))
                count("reload", await client.post("/reload", headers=AUTH))
            stop.set()
            await asyncio.gather(*tasks)
            kept, dropped = vector(), vector()
            count("upsert", await client.post("/upsert", headers=AUTH, json={
                "docids": [90_001], "vectors": [kept]}))
            count("snapshot", await client.post("/snapshot", headers=AUTH))
            size = (await client.get("/stats")).json()["size"]
            count("upsert", await client.post("/upsert", headers=AUTH, json={
                "docids": [90_002], "vectors": [dropped]}))
            count("reload", await client.post("/reload", headers=AUTH))
            after = (await client.get("/stats")).json()
            found = (await client.post("/search", json={
                "queries": [kept, dropped], "k": 1, "leaves_to_search": 30})).json()["ids"]
            return size, after, found

    with running(app) as url:
        size, after, found = asyncio.run(main(url))
    assert set(statuses) - {"samples"} <= {(w, 200) for w in
                                           ("search", "upsert", "delete", "snapshot",
                                            "reload")}, statuses
    assert statuses[("search", 200)] > 20 and statuses[("upsert", 200)] >= 5, statuses
    assert statuses[("reload", 200)] == 6 and statuses[("snapshot", 200)] == 6
    assert after["size"] == size and after["generation"] == 7
    assert found[0] == [90_001] and found[1] != [90_002], found


@pytest.mark.parametrize("damage", ["truncated array", "bad manifest", "missing file",
                                    "not an index"])
def test_damaged_folder_is_refused_and_the_old_index_keeps_serving(tmp_path, damage):
    folder = tmp_path / "index"
    old = build(2000, 6)
    old.serialize(folder)
    q = queries(4, seed=12)
    want = old.search_batched(q).indices.tolist()
    with running(create_app(folder, token=TOKEN)) as url:
        if damage == "truncated array":
            path = folder / "packed_codes.npy"
            path.write_bytes(path.read_bytes()[:-100])
        elif damage == "bad manifest":
            (folder / "mipscan.json").write_text("{not json")
        elif damage == "missing file":
            (folder / "centroids.npy").unlink()
        else:
            shutil.rmtree(folder)
            folder.mkdir()
            (folder / "hello.txt").write_text("hi")
        r = httpx.post(url + "/reload", headers=AUTH)
        assert r.status_code == 409, r.text
        err = r.json()
        assert err["field"] == "index" and "previous index keeps serving" in err["error"]
        assert str(folder) in err["error"] or "mipscan.json" in err["error"]
        r = httpx.post(url + "/search", json={"queries": q.tolist()})
        assert r.status_code == 200 and r.json()["ids"] == want
        stats = httpx.get(url + "/stats").json()
        assert stats["generation"] == 1
        assert 'mipscan_reloads_total{result="refused"} 1.0' in httpx.get(url + "/metrics").text


# ---------------------------------------------------------------- start-up rules
def test_loopback_and_tokens(tmp_path, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1")
    assert is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
    assert not is_loopback("myhost")
    monkeypatch.delenv("MIPSCAN_SERVE_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("MIPSCAN_SERVE_TOKEN", TOKEN)
    assert read_token(None) == TOKEN
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert read_token(f) == TOKEN  # the file wins over the environment
    f.write_text("short\n")
    with pytest.raises(ServeError, match="at least 16"):
        read_token(f)
    with pytest.raises(ServeError, match="cannot read"):
        read_token(tmp_path / "absent")


def test_refuses_writes_on_a_public_address_without_a_token(index_dir, monkeypatch):
    """Checked before any socket is opened."""
    monkeypatch.delenv("MIPSCAN_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "example.org"):
        with pytest.raises(ServeError, match="non-loopback address, without a token"):
            serve(index_dir, host=host, port=1)


def run_cli(*args: str, env: dict | None = None, block: str = "", timeout: float = 60):
    code = ("import sys\n"
            f"for m in {block!r}.split(','):\n"
            "    if m: sys.modules[m] = None\n"
            "from mipscan.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    full = dict(os.environ, PYTHONPATH=str(SRC), **(env or {}))
    full.pop("MIPSCAN_SERVE_TOKEN", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full, timeout=timeout)


def test_cli_refusals(index_dir, tmp_path):
    p = run_cli("serve", str(index_dir), "--host", "0.0.0.0")
    assert p.returncode == 2 and "without a token" in p.stderr and "--read-only" in p.stderr
    p = run_cli("serve", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "mipscan serve:" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("serve", str(index_dir), "--token-file", str(tmp_path / "absent"))
    assert p.returncode == 2 and "--token-file" in p.stderr
    p = run_cli("serve", str(index_dir), block="uvicorn")
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == ("mipscan serve needs the serve extra (no module named "
                                "'uvicorn'): pip install \"mipscan[serve]\"")
    p = run_cli("serve", "--help", block="uvicorn,starlette,prometheus_client")
    assert p.returncode == 0 and "--token-file" in p.stdout


def test_cli_serves_until_stopped(index_dir, tmp_path):
    """`mipscan serve DIR --port 0 --token-file F` in a subprocess: it prints its URL,
    answers, takes writes with the token, and exits 0 on SIGINT."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("MIPSCAN_SERVE_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "mipscan.cli", "serve", str(index_dir),
                             "--port", "0", "--token-file", str(token_file), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = _read_line(proc, 60)
        assert "mipscan serve: 3,000 datapoints x 16" in line and "writes enabled" in line, line
        url = line.split(" on ")[1].split()[0].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/healthz").json()["size"] == 3000
        assert httpx.get(url + "/stats").json()["num_threads"] == 1
        assert httpx.post(url + "/reload", headers=AUTH).status_code == 200
    finally:
        proc.send_signal(2)
        try:
            out, err = proc.communicate(timeout=90)  # the machine may be busy
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the server did not stop on SIGINT: {err[-2000:]}")
    assert proc.returncode == 0, err
    assert "leaked" not in err, err[-2000:]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        proc.kill()
        raise AssertionError(f"no start-up line; stderr: {proc.stderr.read()}")
    return box[0]


def test_coalesced_single_queries_get_their_lone_answers():
    """Single queries arriving together are searched as batches, one batch at a time per
    index, and a batch of 8 or more on all the engine's threads: every query still gets
    exactly the answer a lone search gives, and the batches did form."""
    from concurrent.futures import ThreadPoolExecutor

    from mipscan.serve._app import _Coalescer

    rng = np.random.default_rng(21)
    s = (mipscan.builder(rng.normal(size=(3000, D)).astype(np.float32), 10, "dot_product")
         .tree(num_leaves=40, num_leaves_to_search=10).score_ah(2).reorder(100).build())
    s.set_num_threads(2)
    q = queries(60, seed=22)
    sizes: list[int] = []
    pool = ThreadPoolExecutor(4)

    async def off_loop(fn, *args):
        sizes.append(len(fn.args[0]))
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main():
        c = _Coalescer(off_loop)
        kwargs = {"final_num_neighbors": 10}
        return await asyncio.gather(*(c.search(s, row, kwargs) for row in q))

    got = asyncio.run(main())
    pool.shutdown()
    want_ids, want_scores = s.search_batched(q, final_num_neighbors=10)
    for i, (ids, scores) in enumerate(got):
        np.testing.assert_array_equal(ids[0], want_ids[i])
        np.testing.assert_array_equal(scores[0], want_scores[i])
    assert sum(sizes) == len(q) and max(sizes) >= 8, sizes
