"""End to end: the example service under real gunicorn threaded workers, against the test PostgreSQL."""

from __future__ import annotations

import sys
import threading
import time
import typing as t
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import EXAMPLES, Gunicorn, Sampler, drive, mixed_plan, statuses
from pgserver import PgServer

pytestmark = pytest.mark.slow

WORKERS, THREADS, MAX_SIZE = 2, 4, 4
ITEMS = 50
EXPECTED = {"read": 200, "write": 201, "fail": 500, "whoami": 200}


@pytest.fixture
def shopdb(pg: PgServer) -> Iterator[str]:
    """A fresh database with the example's schema and ITEMS items; dropped at the end."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from shop.schema import SCHEMA
    finally:
        sys.path.remove(str(EXAMPLES))
    name = f"shop_{uuid.uuid4().hex[:10]}"
    pg.create_database(name)
    with pg.connect(name) as conn:
        for stmt in SCHEMA:
            conn.execute(stmt)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items (id, name, price) VALUES (%s, %s, %s)",
                [(i, f"item {i}", i) for i in range(1, ITEMS + 1)],
            )
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def server(pg: PgServer, shopdb: str, tmp_path: Path) -> Iterator[t.Callable[..., Gunicorn]]:
    """Start gunicorn on the example; every process is stopped at the end."""
    started: list[Gunicorn] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        workers: int = WORKERS,
        threads: int = THREADS,
        wait_ready: bool = True,
    ) -> Gunicorn:
        g = Gunicorn(
            pg.url(shopdb),
            workers=workers,
            threads=threads,
            args=args,
            env={"SHOP_DB_MAX_SIZE": str(MAX_SIZE), **(env or {})},
            log=tmp_path / f"gunicorn{len(started)}.log",
        )
        started.append(g)
        g.start(wait_ready=wait_ready)
        return g

    yield start
    for g in started:
        g.stop()


def _committed_orders(pg: PgServer, dbname: str) -> set[int]:
    return {row[0] for row in pg.psql("SELECT id FROM orders", dbname=dbname)}


def _check_load_run(pg: PgServer, shopdb: str, g: Gunicorn, preload: bool) -> dict[str, t.Any]:
    with Sampler(pg.conninfo("postgres"), shopdb) as sampler:
        results = drive(g.port, mixed_plan(ITEMS), requests=3000, clients=16)
    assert len(results) == 3000
    wrong = [(r.kind, r.status, r.data) for r in results if r.status != EXPECTED[r.kind]]
    assert wrong == []
    # never more server connections than workers x max_size
    assert sampler.samples and max(sampler.samples) <= WORKERS * MAX_SIZE
    # nothing left idle in transaction
    states = pg.psql(f"SELECT state FROM pg_stat_activity WHERE datname = '{shopdb}'")
    assert all(s != ("idle in transaction",) and s != ("idle in transaction (aborted)",) for s in states)
    # every committed write is there, no failed one is
    committed = _committed_orders(pg, shopdb)
    assert committed == {r.ident for r in results if r.kind == "write"}
    assert not committed & {r.ident for r in results if r.kind == "fail"}
    # no worker has anything still checked out
    for data in g.each_worker("/_debug/stats", WORKERS).values():
        for pool in data["pools"].values():
            assert pool["in_use"] == 0 and pool["waiting"] == 0
    # no backend served two workers; the master's schema connection served none
    probes = [r.data for r in results if r.kind == "whoami"]
    probes += list(g.each_worker("/_debug/whoami", WORKERS).values())  # make sure both workers are in
    backends: dict[int, set[int]] = {}
    for p in probes:
        backends.setdefault(p["worker"], set()).add(p["backend"])
    workers = list(backends.values())
    assert len(workers) == WORKERS
    assert not workers[0] & workers[1]
    master = {p["master_backend"] for p in probes}
    if preload:
        # one master connection, inherited by both workers, re-created in each and never used there
        assert len(master) == 1 and master.isdisjoint(workers[0] | workers[1]), (probes[-3:], g.log_text())
    return {"statuses": statuses(results), "max_connections": max(sampler.samples)}


def test_load_gthread(pg: PgServer, shopdb: str, server: t.Callable[..., Gunicorn]) -> None:
    """3,000 mixed requests on 2 workers x 4 threads: right statuses, <= 8 connections, writes exact."""
    g = server()
    summary = _check_load_run(pg, shopdb, g, preload=False)
    print("load gthread:", summary)


def test_load_gthread_preload(pg: PgServer, shopdb: str, server: t.Callable[..., Gunicorn]) -> None:
    """The same with --preload: the master's connection is never used by a worker."""
    g = server("--preload")
    summary = _check_load_run(pg, shopdb, g, preload=True)
    print("load gthread --preload:", summary)


def test_exhaustion_503_and_pool_whole(server: t.Callable[..., Gunicorn]) -> None:
    """More slow requests than max_size: the surplus gets 503 + Retry-After after `timeout`, the rest succeed."""
    g = server(env={"SHOP_DB_MAX_SIZE": "2", "SHOP_DB_TIMEOUT": "0.5"}, workers=1, threads=6)
    results: list[tuple[int, dict[str, str], float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(5)

    def slow() -> None:
        barrier.wait(10)
        t0 = time.monotonic()
        status, headers, _ = g.request("GET", "/_debug/slow?s=2")
        with lock:
            results.append((status, headers, time.monotonic() - t0))

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    codes = sorted(s for s, _, _ in results)
    assert codes == [200, 200, 503, 503, 503]
    for status, headers, elapsed in results:
        if status == 503:
            assert headers["retry-after"] == "1"
            assert 0.45 <= elapsed < 1.9  # after about `timeout`, well before the slow ones end
        else:
            assert elapsed >= 2.0
    [stats] = g.each_worker("/_debug/stats", 1).values()
    db = stats["pools"]["db"]
    assert (db["in_use"], db["timeouts"]) == (0, 3) and db["size"] <= 2


def test_restart_under_load(pg: PgServer, shopdb: str, server: t.Callable[..., Gunicorn]) -> None:
    """pg_ctl restart -m fast mid-run: 503s in the outage, none hangs, all good 2 s after the server is back."""
    g = server(env={"SHOP_DB_TIMEOUT": "2"})
    stop = threading.Event()
    out: list[t.Any] = []
    load = threading.Thread(
        target=lambda: out.extend(drive(g.port, mixed_plan(ITEMS), requests=10**6, clients=8, stop=stop)),
        daemon=True,
    )
    load.start()
    try:
        time.sleep(1.0)  # load runs before the restart (a duration, not a wait for an event)
        t_down = time.monotonic()
        pg.restart("fast")
        t_back = time.monotonic()
        time.sleep(4.0)  # load keeps running after the server is back
    finally:
        stop.set()
        load.join(60)
    results = sorted(out, key=lambda r: r.start)
    assert results
    assert max(r.end - r.start for r in results) < 2.0 + 2.0  # nothing hangs past the pool timeout (+ margin)
    bad = [r for r in results if r.status != EXPECTED[r.kind]]
    assert {r.status for r in bad} <= {503}, statuses(bad)
    assert all(r.end >= t_down for r in bad)  # failures only once the server went away
    late = [r for r in bad if r.start > t_back + 2.0]
    assert late == []
    recovery = max((r.end for r in bad), default=t_back) - t_back
    assert sum(1 for r in results if r.start > t_back + 2.0) > 50  # and the load really ran after recovery
    committed = _committed_orders(pg, shopdb)
    ok_writes = {r.ident for r in results if r.kind == "write" and r.status == 201}
    assert ok_writes <= committed
    print(f"restart: {len(results)} requests, statuses {statuses(results)}, recovery {recovery:.2f} s")


def test_database_down_at_start(pg: PgServer, shopdb: str, server: t.Callable[..., Gunicorn]) -> None:
    """The app starts while PostgreSQL is down, answers 503 meanwhile, and recovers on its own."""
    pg.stop("fast")
    try:
        g = server()
        for _ in range(5):
            status, headers, _ = g.request("GET", "/items/1", timeout=5)
            assert status == 503 and headers["retry-after"] == "1"
    finally:
        pg.start()
    t_back = time.monotonic()
    deadline = t_back + 5
    status = 0
    while status != 200 and time.monotonic() < deadline:
        status, _, _ = g.request("GET", "/items/1", timeout=5)
    assert status == 200
    assert time.monotonic() - t_back < 2.0
    # The promise is about every worker: from 2 s after the server is back, all requests succeed
    # (a worker that saw no request since its last failed connect may still sit out its backoff before).
    time.sleep(max(0.0, t_back + 2.0 - time.monotonic()))
    results = drive(g.port, mixed_plan(ITEMS), requests=200, clients=8)
    assert [r for r in results if r.status != EXPECTED[r.kind]] == []


def test_sigterm_loses_no_committed_write(pg: PgServer, shopdb: str, server: t.Callable[..., Gunicorn]) -> None:
    """SIGTERM during a write load: every write answered 201 is in the database."""
    g = server()
    stop = threading.Event()
    out: list[t.Any] = []

    def writes(i: int, rng: t.Any) -> tuple[str, str, str, t.Any, int]:
        return "write", "POST", "/orders", {"id": i, "item_id": 1 + i % ITEMS, "qty": 1}, i

    load = threading.Thread(
        target=lambda: out.extend(drive(g.port, writes, requests=10**6, clients=8, stop=stop)), daemon=True
    )
    load.start()
    deadline = time.monotonic() + 10
    while len(_committed_orders(pg, shopdb)) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)  # bounded poll until the load is well under way
    code = g.terminate()
    stop.set()
    load.join(60)
    assert code == 0
    acknowledged = {r.ident for r in out if r.status == 201}
    assert len(acknowledged) >= 200
    assert acknowledged <= _committed_orders(pg, shopdb)
    assert "Traceback" not in g.log_text()


def test_gevent_worker(pg: PgServer, shopdb: str, server: t.Callable[..., Gunicorn]) -> None:
    """Under -k gevent the request context is per greenlet: slow queries overlap, <= max_size backends, all returned."""
    pytest.importorskip("gevent", reason="gevent is not installed (it does not build for free-threaded 3.13t)")
    g = server(env={"SHOP_WORKER_CLASS": "gevent"}, workers=1)
    n, slow = 40, 0.1
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def one() -> None:
        barrier.wait(10)
        status, _, _ = g.request("GET", f"/_debug/slow?s={slow}")
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one) for _ in range(n)]
    with Sampler(pg.conninfo("postgres"), shopdb) as sampler:
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        elapsed = time.monotonic() - t0
    assert results == [200] * n
    # 10 rounds of 0.1 s on 4 connections; one at a time (a blocked hub) would take 4 s
    assert elapsed < n * slow / 2
    assert max(sampler.samples) <= MAX_SIZE
    [stats] = g.each_worker("/_debug/stats", 1).values()
    assert stats["pools"]["db"]["in_use"] == 0 and stats["pools"]["db"]["checkouts"] >= n
    print(f"gevent: {n} x {slow} s queries in {elapsed:.2f} s, max backends {max(sampler.samples)}")
