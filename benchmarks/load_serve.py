"""A bounded load test of ``mipscan serve`` on loopback.

Builds the tutorial's index (100 leaves, 30 searched, AH 2, reorder 500) on a dataset,
starts ``mipscan serve`` on it in a subprocess on 127.0.0.1 (a free port, a random write
token), and drives it with asyncio clients (keep-alive connections over asyncio streams by
default, ``--client httpx`` for httpx.AsyncClient; the updater always uses httpx):

- single-query ``/search`` at each concurrency (default 1, 8, 64) for ``--seconds`` each,
  without and with an updater posting ``/upsert`` batches meanwhile (64 vectors every
  50 ms: replacements of existing docids and new ones; the index is built with docids,
  which updates need): QPS, p50/p95/p99 latency, errors (must be 0), the server's RSS
  before and after each run;
- batched ``/search`` (``--batch`` queries per request, concurrency 1 and 2) against the
  in-process ``search_batched_parallel`` throughput on the same queries and threads;
- the server's RSS before and after (from /proc of the server's pid);
- a Markdown table of all runs (dated, with the load average), printed and written to
  ``--out`` as ``load_serve.md`` beside ``load_serve.json``.

With ``--ray``, the server is ``mipscan serve --ray`` on the same folder (one shard; a new
local Ray cluster that the server starts, ``--replicas`` Serve replicas): the same runs
through Ray Serve's proxy, replicas and shard actor. RSS and CPU are then those of the
server's whole process tree (the Ray processes are its descendants).

Every loop stops at its deadline and after at most ``--max-requests`` requests; the server
is stopped at the end. Traffic goes to 127.0.0.1 only.

    python -m benchmarks.load_serve --dataset seed --seconds 10 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TUTORIAL = dict(num_leaves=100, num_leaves_to_search=30, training_iterations=12,
                dimensions_per_block=2, reordering_num_neighbors=500)
ROOT = Path(__file__).resolve().parents[1]


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--ray`` server's Ray processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mb(pid: int) -> float | None:
    """RSS of ``pid`` and its descendants, MB."""
    total = None
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0) + int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def measured(run, server_pid: int) -> dict:
    """``run()``'s result plus ``others_cores``: the cores that processes other than this
    client and the server kept busy meanwhile (from /proc/stat; the machine is shared)."""
    from benchmarks.common import _busy_seconds, _own_cpu_seconds

    rss0 = rss_mb(server_pid)
    b0, o0, s0, t0 = _busy_seconds(), _own_cpu_seconds(), proc_cpu_seconds(server_pid), \
        time.perf_counter()
    out = run()
    b1, o1, s1, t1 = _busy_seconds(), _own_cpu_seconds(), proc_cpu_seconds(server_pid), \
        time.perf_counter()
    if b0 is not None and b1 is not None:
        out["others_cores"] = max(0.0, (b1 - b0) - (o1 - o0) - (s1 - s0)) / (t1 - t0)
    out["server_cpu_cores"] = (s1 - s0) / (t1 - t0)
    out["client_cpu_cores"] = (o1 - o0) / (t1 - t0)
    out.update(rss_mb_before=rss0, rss_mb_after=rss_mb(server_pid), load_avg=os.getloadavg())
    return out


def best_round(rounds: list[dict]) -> dict:
    """The round with the lowest p99 (the VM's speed drifts; as benchmarks/run.py keeps
    each point's best round); all rounds stay in ``rounds``."""
    best = dict(min(rounds, key=lambda r: r.get("p99_ms", float("inf"))))
    best["rounds"] = [{k: r.get(k) for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "errors",
                                             "others_cores", "load_avg")} for r in rounds]
    best["rss_mb_before"] = rounds[0].get("rss_mb_before")
    best["rss_mb_after"] = rounds[-1].get("rss_mb_after")
    best["errors"] = sum(r["errors"] for r in rounds)  # every round's errors count
    return best


def build_index(train: np.ndarray, folder: Path):
    """The tutorial's index, with docids 0..n-1 (the row numbers: the same answers) so that
    the live index takes ``/upsert``."""
    import mipscan

    p = TUTORIAL
    s = (mipscan.builder(train, 10, "dot_product")
         .tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
               training_iterations=p["training_iterations"])
         .score_ah(p["dimensions_per_block"]).reorder(p["reordering_num_neighbors"])
         .build(docids=np.arange(len(train), dtype=np.int64)))
    s.serialize(folder)
    return s


def start_server(folder: Path, token_file: Path, threads: int | None,
                 ray_replicas: int | None = None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "mipscan.cli", "serve", str(folder), "--port", "0",
           "--token-file", str(token_file)]
    if threads:
        cmd += ["--threads", str(threads)]
    if ray_replicas:
        cmd += ["--ray", "--replicas", str(ray_replicas)]
    # stderr to a file: Ray logs there, and an unread pipe would fill and stall the server.
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not box or " on http://" not in box[0]:
        proc.kill()
        err.seek(0)
        raise SystemExit(f"the server did not start: {err.read()[-2000:]}")
    url = box[0].split(" on ")[1].split()[0].rstrip("/")
    return proc, url


class RawHTTP:
    """One keep-alive HTTP/1.1 connection over asyncio streams: POST a body, read the
    status and the Content-Length body. Used instead of httpx by default: on this 2-core
    machine httpx's client spends more CPU per request than the server (measured: 60
    req/s at 64 connections against 1,800 with this client, same server), so it would
    measure itself."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:] if line)}
        content = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float,
                max_requests: int, updater: dict | None, client_kind: str = "raw") -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    updates = {"requests": 0, "vectors": 0, "errors": 0}
    headers = {"Content-Type": "application/json"}
    host, port = httpx.URL(url).host, httpx.URL(url).port
    limits = httpx.Limits(max_connections=concurrency + 2,
                          max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + seconds
        sent = 0

        async def post(conn, path, body, hdrs):
            if conn is None:
                r = await client.post(path, content=body, headers=hdrs)
                return r.status_code, r.content
            return await conn.post(path, body, hdrs)

        async def worker(i: int):
            nonlocal sent
            conn = RawHTTP(host, port) if client_kind == "raw" else None
            j = i
            try:
                while time.perf_counter() < deadline and sent < max_requests:
                    sent += 1
                    body = bodies[j % len(bodies)]
                    j += concurrency
                    t0 = time.perf_counter()
                    try:
                        status, content = await post(conn, "/search", body, headers)
                    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError,
                            ValueError) as exc:
                        errors.append(repr(exc))
                        if conn is not None:
                            await conn.close()
                        continue
                    latencies.append(time.perf_counter() - t0)
                    if status != 200 or not content.startswith(b'{"ids"'):
                        errors.append(f"{status} {content[:200]!r}")
            finally:
                if conn is not None:
                    await conn.close()

        async def update_loop():
            rng = np.random.default_rng(1)
            auth = {**headers, "Authorization": f"Bearer {updater['token']}"}
            while time.perf_counter() < deadline:
                n = updater["batch"]
                vecs = updater["rows"][rng.integers(len(updater["rows"]), size=n)]
                vecs = vecs * rng.random(vecs.shape, dtype=np.float32)
                # Half replace existing docids, half are new ones (ids above the index's).
                docids = rng.choice(updater["docid_range"], size=n, replace=False)
                body = json.dumps({"docids": docids.tolist(),
                                   "vectors": vecs.tolist()}).encode()
                r = await client.post("/upsert", content=body, headers=auth)
                updates["requests"] += 1
                if r.status_code == 200:
                    updates["vectors"] += n
                else:
                    updates["errors"] += 1
                    errors.append(f"upsert {r.status_code} {r.text[:200]}")
                await asyncio.sleep(updater["interval"])

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        if updater:
            tasks.append(asyncio.create_task(update_loop()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    out = {"concurrency": concurrency, "client": client_kind, "seconds": elapsed,
           "requests": len(latencies), "rps": len(latencies) / elapsed, "errors": len(errors),
           "error_samples": errors[:5]}
    if len(lat):
        out.update({f"p{p}_ms": float(np.percentile(lat, p)) for p in (50, 95, 99)})
        out["max_ms"] = float(lat.max())
    if updater:
        out["updates"] = updates
    return out


def in_process_qps(searcher, queries: np.ndarray, batch: int, seconds: float) -> float:
    chunks = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    searcher.search_batched_parallel(chunks[0], final_num_neighbors=10)  # warm-up
    done, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        searcher.search_batched_parallel(chunks[i % len(chunks)], final_num_neighbors=10)
        done += batch
        i += 1
    return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="seed", help="a benchmarks.datasets spec (default: seed)")
    ap.add_argument("--seconds", type=float, default=30.0, help="per scenario (default: 30)")
    ap.add_argument("--concurrency", default="1,8,64", help="single-query clients (default: 1,8,64)")
    ap.add_argument("--batch", type=int, default=256, help="queries per batched request")
    ap.add_argument("--batched-concurrency", default="1,2",
                    help="clients of the batched runs (default: 1,2; empty: none)")
    ap.add_argument("--threads", type=int, default=None, help="server engine threads")
    ap.add_argument("--max-requests", type=int, default=2_000_000, help="per scenario, a bound")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each scenario; the one with the lowest p99 is reported")
    ap.add_argument("--quiet-wait", type=float, default=15.0,
                    help="seconds to wait at most for other processes to go quiet before each "
                    "scenario (default: 15)")
    ap.add_argument("--no-updater", action="store_true", help="skip the runs with an updater")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="raw asyncio keep-alive connections (default) or httpx.AsyncClient")
    ap.add_argument("--ray", action="store_true",
                    help="serve with `mipscan serve --ray` (Ray Serve) instead")
    ap.add_argument("--replicas", type=int, default=2, help="Serve replicas of --ray")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for load_serve.json (load_serve_ray.json with --ray)")
    args = ap.parse_args(argv)

    from benchmarks import datasets
    from benchmarks.common import wait_for_quiet
    import mipscan

    ds = datasets.load(args.dataset)
    print(f"{ds.name}: {ds.train.shape[0]:,} x {ds.train.shape[1]}, {len(ds.test)} queries",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="mipscan-load-"))
    folder = work / "index"
    searcher = build_index(ds.train, folder)
    if args.threads:
        searcher.set_num_threads(args.threads)
    token = secrets.token_urlsafe(32)
    token_file = work / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)

    q = ds.test
    reps = max(1, -(-args.batch * 4 // len(q)))
    qb = np.ascontiguousarray(np.tile(q, (reps, 1)))
    single = [json.dumps({"queries": [row.tolist()], "k": 10}).encode() for row in q]
    batched = [json.dumps({"queries": qb[i:i + args.batch].tolist(), "k": 10}).encode()
               for i in range(0, len(qb) - args.batch + 1, args.batch)]

    wait_for_quiet(args.quiet_wait)
    base_qps = in_process_qps(searcher, qb, args.batch, min(args.seconds, 10))
    print(f"in-process search_batched_parallel ({args.batch} a call, {searcher.num_threads} "
          f"threads): {base_qps:,.0f} queries/s", flush=True)

    proc, url = start_server(folder, token_file, args.threads,
                             args.replicas if args.ray else None)
    results: dict = {"server": f"mipscan serve --ray --replicas {args.replicas}" if args.ray
                     else "mipscan serve", "dataset": ds.name, "n": int(ds.train.shape[0]), "d": int(ds.train.shape[1]),
                     "index": TUTORIAL, "seconds_per_run": args.seconds, "url": url,
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "simd": mipscan.simd_level(), "load_avg": os.getloadavg()},
                     "in_process_batched_qps": base_qps, "runs": []}
    try:
        import httpx

        stats = httpx.get(url + "/stats").json()
        live = stats["writes"]["upsert"]
        results["rss_mb_start"] = rss_mb(proc.pid)
        asyncio.run(_load(url, single, 8, 2.0, 100_000, None, args.client))  # warm-up
        results["rss_mb_before"] = rss_mb(proc.pid)
        for c in [int(x) for x in args.concurrency.split(",")]:
            for upd in ([False] if args.no_updater else [False, True]):
                if upd and not live:
                    print(f"c={c} with updater: skipped, the server's index has no upsert "
                          "(answers 501)", flush=True)
                    results["runs"].append({"kind": "single", "concurrency": c, "updater": True,
                                            "skipped": "no upsert in this mipscan (501)"})
                    continue
                n = ds.train.shape[0]
                updater = ({"token": token, "batch": 64, "interval": 0.05,
                            "docid_range": 2 * n, "rows": ds.train[:10_000]} if upd else None)
                rounds = []
                for _ in range(args.rounds):
                    wait_for_quiet(args.quiet_wait)
                    rounds.append(measured(lambda: asyncio.run(_load(
                        url, single, c, args.seconds, args.max_requests, updater, args.client)),
                        proc.pid))
                r = best_round(rounds)
                r.update(kind="single", updater=upd, qps=r["rps"])
                results["runs"].append(r)
                _print(r)
        # Batched: each round measures in-process search_batched_parallel right before the
        # served run (same queries, same threads), so both see the same machine.
        for c in [int(x) for x in args.batched_concurrency.split(",") if x.strip()]:
            rounds = []
            for _ in range(args.rounds):
                wait_for_quiet(args.quiet_wait)
                base = in_process_qps(searcher, qb, args.batch, min(args.seconds, 5))
                r = measured(lambda: asyncio.run(_load(
                    url, batched, c, args.seconds, args.max_requests, None, args.client)),
                    proc.pid)
                r.update(in_process_qps=base, qps=r["rps"] * args.batch)
                r["vs_in_process"] = r["qps"] / base
                rounds.append(r)
            # The median round (max would keep a round whose in-process run hit a slow spell).
            r = dict(sorted(rounds, key=lambda x: x["vs_in_process"])[(len(rounds) - 1) // 2])
            r["errors"] = sum(x["errors"] for x in rounds)
            r["rounds"] = [{k: x.get(k) for k in ("qps", "in_process_qps", "vs_in_process",
                                                  "others_cores")} for x in rounds]
            r.update(kind=f"batched {args.batch}", updater=False)
            results["runs"].append(r)
            _print(r)
        results["rss_mb_after"] = rss_mb(proc.pid)
        results["server_stats"] = httpx.get(url + "/stats").json()
    finally:
        proc.send_signal(2)
        try:
            proc.wait(90 if args.ray else 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)  # the index (39 MB for seed) and token
    print(f"server RSS: {results.get('rss_mb_start'):.0f} MB at start, "
          f"{results.get('rss_mb_before'):.0f} MB after warm-up, "
          f"{results.get('rss_mb_after'):.0f} MB at the end")
    errors = sum(r.get("errors", 0) for r in results["runs"])
    print(f"errors: {errors}")
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table = markdown(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "load_serve_ray" if args.ray else "load_serve"
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(table)
        print(f"wrote {args.out / stem}.json and {stem}.md")
    return 1 if errors else 0


def markdown(results: dict) -> str:
    """All runs as one Markdown table, headed by the date, the dataset and the load."""
    la = results["machine"]["load_avg"]
    lines = [f"{results['finished']}, {results['dataset']} ({results['n']:,} x {results['d']}), "
             f"{results['seconds_per_run']:.0f} s a run, load average {la[0]:.1f} at the start; "
             "'others': cores that other processes kept busy meanwhile.", "",
             "| /search | clients | updater | queries/s | p50 ms | p95 ms | p99 ms | errors | "
             "server RSS MB before → after | load avg (1 min) | others' cores |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results["runs"]:
        if r.get("skipped"):
            continue
        kind = "1 query a request" if r["kind"] == "single" else r["kind"].replace(
            "batched ", "") + " queries a request"
        upd = r.get("updates")
        upd_text = (f"{upd['requests']} upserts, {upd['vectors']:,} vectors" if upd else "no")
        if "vs_in_process" in r:
            upd_text = f"no ({r['vs_in_process']:.0%} of in-process)"
        lines.append(
            f"| {kind} | {r['concurrency']} | {upd_text} | {r['qps']:,.0f} | "
            f"{r.get('p50_ms', float('nan')):.2f} | {r.get('p95_ms', float('nan')):.2f} | "
            f"{r.get('p99_ms', float('nan')):.2f} | {r['errors']} | "
            f"{r.get('rss_mb_before') or 0:.0f} → {r.get('rss_mb_after') or 0:.0f} | "
            f"{(r.get('load_avg') or [float('nan')])[0]:.1f} | {r.get('others_cores', 0):.2f} |")
    lines.append("")
    lines.append(f"Server RSS: {results.get('rss_mb_start') or 0:.0f} MB at start, "
                 f"{results.get('rss_mb_before') or 0:.0f} MB after the warm-up, "
                 f"{results.get('rss_mb_after') or 0:.0f} MB at the end.")
    return "\n".join(lines) + "\n"


def _print(r: dict) -> None:
    extra = (f", {r['vs_in_process']:.0%} of in-process ({r['in_process_qps']:,.0f}/s)"
             if "vs_in_process" in r else "")
    upd = f", updater {r['updates']}" if r.get("updates") else ""
    print(f"{r['kind']:>12} c={r['concurrency']:<3} {r['qps']:>9,.0f} queries/s "
          f"({r['rps']:,.0f} req/s)  p50 {r.get('p50_ms', float('nan')):.2f} ms  "
          f"p95 {r.get('p95_ms', float('nan')):.2f} ms  p99 {r.get('p99_ms', float('nan')):.2f} ms"
          f"  errors {r['errors']}{extra}{upd}, others' CPU {r.get('others_cores', 0):.2f}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
