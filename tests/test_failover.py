"""Failover: the psycopg `target` key against a real primary and a streaming standby (`pg_basebackup -R`).

The servers here are this module's own, apart from the session's `pg`: the failover
tests stop a primary and promote its standby, so each makes a fresh pair.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import threading
import time
import typing as t
from collections.abc import Iterator

import psycopg
import pytest
from flask import Flask

from flask_proxypool import ConfigError
from flask_proxypool import ConnectFailed
from flask_proxypool import db
from flask_proxypool.config import parse_pool
from flask_proxypool.kinds.psycopg import PsycopgKind
from flask_proxypool.kinds.psycopg import WrongServerRole
from pgserver import PgServer
from pgserver import make_basedir

MakeApp = t.Callable[..., Flask]
PASSWORD = "fo-s3cret-pw"  # trust authentication ignores it; it must never show in a log line


@pytest.fixture(scope="module")
def template() -> Iterator[PgServer]:
    """One initdb for the module; each pair's primary starts from a copy of it (initdb is the slow part)."""
    server = PgServer(make_basedir("pp-tpl-"))
    try:
        server.init()
        yield server
    finally:
        shutil.rmtree(server.basedir, ignore_errors=True)


def _make_pair(template: PgServer) -> tuple[PgServer, PgServer]:
    """A started primary with a `writes` table, and a started hot standby streaming from it, caught up."""
    primary = PgServer.copy_of(template, make_basedir("pp-pri-"))
    standby: PgServer | None = None
    try:
        primary.start()
        primary.psql("CREATE TABLE writes (token text PRIMARY KEY)")
        standby = PgServer.standby_of(primary, make_basedir("pp-sby-"))
        standby.start()
        standby.wait_replayed(primary)
    except BaseException:
        _drop(primary, standby)
        raise
    return primary, standby


def _drop(*servers: PgServer | None) -> None:
    for server in servers:
        if server is not None:
            server.stop("immediate")
            shutil.rmtree(server.basedir, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(template: PgServer) -> Iterator[tuple[PgServer, PgServer]]:
    """(primary, standby), left as they are by the tests that use it."""
    primary, standby = _make_pair(template)
    try:
        yield primary, standby
    finally:
        _drop(standby, primary)


def _hosts(*servers: PgServer, **extra: str) -> str:
    """A multi-host libpq conninfo, the servers in the order given."""
    hosts = ",".join(s.host for s in servers)
    ports = ",".join(str(s.port) for s in servers)
    tail = "".join(f" {k}={v}" for k, v in extra.items())
    return f"host={hosts} port={ports} user=postgres dbname=postgres password={PASSWORD}{tail}"


def _server_of(conn: psycopg.Connection[t.Any]) -> tuple[int, bool]:
    """(port, in recovery) of the server behind `conn`, asked with a round trip."""
    row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
    assert row is not None
    conn.rollback()
    return int(row[0]), bool(row[1])


# -- configuration: which target_session_attrs libpq gets, and what is refused ---------------------


@pytest.mark.parametrize(
    ("target", "conninfo", "expected"),
    [
        ("primary", "host=a,b port=1,2 dbname=x", "primary"),
        ("standby", "host=a,b port=1,2 dbname=x", "standby"),
        ("any", "host=a,b port=1,2 dbname=x", None),
        ("primary", "postgresql://u@a:1,b:2/x", "primary"),
        ("standby", "postgresql://u@a:1,b:2/x", "standby"),
        ("primary", "host=a port=1 dbname=x", None),
        ("primary", "postgresql://u@a:1/x", None),
        ("primary", "host=a,b dbname=x target_session_attrs=read-write", "read-write"),
        ("standby", "postgresql://a,b/x?target_session_attrs=prefer-standby", "prefer-standby"),
        ("any", "host=a,b target_session_attrs=standby", "standby"),
        ("primary", "host=a target_session_attrs=any", "any"),  # one host: nothing to choose, accepted
    ],
)
def test_libpq_gets_the_matching_session_attrs(target: str, conninfo: str, expected: str | None) -> None:
    """Several hosts and no target_session_attrs: libpq is given the target's; otherwise nothing changes."""
    kind = PsycopgKind(conninfo, target=target)
    given = kind.connect_kwargs.get("target_session_attrs")
    written = psycopg.conninfo.conninfo_to_dict(conninfo).get("target_session_attrs")
    assert (given or written) == expected
    assert given is None or written is None  # never both, never changed


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"conninfo": "host=a,b port=1,2 target_session_attrs=standby"}, "conninfo"),
        ({"conninfo": "postgresql://a:1,b:2/x?target_session_attrs=any"}, "conninfo"),
        ({"conninfo": "host=a,b", "target": "standby", "target_session_attrs": "any"}, "target_session_attrs"),
        ({"conninfo": "host=a,b", "target_session_attrs": "read-only"}, "target_session_attrs"),
        ({"conninfo": "host=a", "target": "standby", "target_session_attrs": "primary"}, "target_session_attrs"),
        ({"conninfo": "host=a,b", "target": "standby", "target_session_attrs": "read-write"}, "target_session_attrs"),
    ],
)
def test_contradicting_session_attrs_fail_at_init_app(make_app: MakeApp, settings: dict[str, str], key: str) -> None:
    """An explicit target_session_attrs that the target would refuse is a ConfigError naming the pool and both keys."""
    with pytest.raises(ConfigError) as info:
        make_app({"db": settings})
    message = str(info.value)
    assert f"PROXYPOOL_POOLS['db']['{key}']" in message
    assert "PROXYPOOL_POOLS['db']['target']" in message
    assert "contradicts target" in message


def test_unknown_target_is_refused(make_app: MakeApp) -> None:
    """A typo in target is refused with the three values it may take."""
    with pytest.raises(ConfigError, match=r"\['target'\] must be one of 'primary', 'standby', 'any', got 'replica'"):
        make_app({"db": {"conninfo": "host=a", "target": "replica"}})


# -- against real servers ------------------------------------------------------------------------


def test_standby_pool_gets_only_the_standby(make_app: MakeApp, pair: tuple[PgServer, PgServer]) -> None:
    """target 'standby' with the primary listed first: every connection is the standby's, in recovery."""
    primary, standby = pair
    app = make_app({"ro": {"conninfo": _hosts(primary, standby), "target": "standby", "max_size": 3}})
    pool = app.extensions["proxypool"].pool("ro")
    conns = [pool.getconn() for _ in range(3)]
    try:
        assert [_server_of(c) for c in conns] == [(standby.port, True)] * 3
    finally:
        for c in conns:
            pool.putconn(c)
    conn = pool.getconn()  # back from a reset: still a standby, so kept
    assert _server_of(conn) == (standby.port, True)
    pool.putconn(conn)
    assert pool.stats().closed == 0


@pytest.mark.parametrize("form", ["key=value", "url"])
def test_primary_pool_skips_a_standby_listed_first(
    make_app: MakeApp, pair: tuple[PgServer, PgServer], form: str
) -> None:
    """The default target with the standby listed first (libpq key=value or URL form): the primary, and writes work."""
    primary, standby = pair
    if form == "url":
        conninfo = (
            f"postgresql://postgres:{PASSWORD}@{standby.host}:{standby.port},{primary.host}:{primary.port}/postgres"
        )
    else:
        conninfo = _hosts(standby, primary)
    app = make_app({"db": {"conninfo": conninfo, "max_size": 2}})

    @app.post("/write")
    def write() -> dict[str, t.Any]:
        row = db.execute("INSERT INTO writes VALUES (gen_random_uuid()) RETURNING inet_server_port()").fetchone()
        db.commit()
        return {"port": row[0]}

    client = app.test_client()
    for _ in range(3):
        response = client.post("/write")
        assert response.status_code == 200
        assert response.json == {"port": primary.port}


def test_target_any_takes_the_first_server(make_app: MakeApp, pair: tuple[PgServer, PgServer]) -> None:
    """target 'any': no check and no target_session_attrs, so libpq's first host serves, standby or not."""
    primary, standby = pair
    app = make_app({"db": {"conninfo": _hosts(standby, primary), "target": "any"}})
    pool = app.extensions["proxypool"].pool("db")
    with pool.connection() as conn:
        assert _server_of(conn) == (standby.port, True)


def test_standby_alone_is_refused_for_a_primary_pool(
    pair: tuple[PgServer, PgServer], caplog: pytest.LogCaptureFixture
) -> None:
    """One host, a standby, default target: the connection is closed, logged once with the server, slot freed."""
    _, standby = pair
    pool = parse_pool("db", {"conninfo": _hosts(standby), "max_size": 1, "timeout": 1.0}).make_pool()
    try:
        caplog.set_level(logging.WARNING, logger="flask_proxypool")
        with pytest.raises(ConnectFailed, match="in recovery"):
            pool.getconn()
        with pytest.raises(ConnectFailed):  # backing off: no new attempt, no second log line
            pool.getconn()
        records = [r.getMessage() for r in caplog.records if "WrongServerRole" in r.getMessage()]
        assert len(records) == 1, records
        assert f"host={standby.host} port={standby.port} is in recovery" in records[0]
        assert "target is 'primary'" in records[0]
        assert not any(PASSWORD in r.getMessage() for r in caplog.records)
        stats = pool.stats()
        assert (stats.size, stats.in_use, stats.waiting, stats.connect_failures) == (0, 0, 0, 1)
        with standby.connect() as admin:  # closed, not left open on the server
            others = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
            rows = admin.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {others}").fetchone()
            assert rows == (0,)
    finally:
        pool.close()


# -- failover: promote the standby, lose the old primary, writes come back -------------------------


@dataclasses.dataclass
class Request:
    start: float
    end: float
    status: int
    port: int | None
    token: str


def _writer_app(make_app: MakeApp, primary: PgServer, standby: PgServer) -> Flask:
    app = make_app(
        {
            "db": {"conninfo": _hosts(primary, standby, connect_timeout="2"), "max_size": 4, "timeout": 1.0},
            "ro": {"conninfo": _hosts(standby), "target": "standby", "max_size": 1, "timeout": 1.0},
        }
    )

    @app.post("/write/<token>")
    def write(token: str) -> dict[str, t.Any]:
        row = db.execute("INSERT INTO writes VALUES (%s) RETURNING inet_server_port()", (token,)).fetchone()
        db.commit()
        return {"port": row[0]}

    return app


class Load:
    """Client threads posting writes in a loop, each request timed; 503s paced by 10 ms, not retried at once."""

    def __init__(self, app: Flask, threads: int = 4) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.ok_since: dict[int, threading.Event] = {}
        self._threads = [threading.Thread(target=self._run, args=(app, i), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self._threads:
            th.join(10)
        assert not any(th.is_alive() for th in self._threads), "a client thread is stuck"

    def _run(self, app: Flask, i: int) -> None:
        client = app.test_client()
        for n in itertools.count():
            if self.stop.is_set():
                return
            token = f"{i}-{n}"
            start = time.monotonic()
            response = client.post(f"/write/{token}")
            end = time.monotonic()
            body = response.json if response.status_code == 200 else None
            port = body["port"] if body else None
            with self._lock:
                self.requests.append(Request(start, end, response.status_code, port, token))
                for wanted, event in self.ok_since.items():
                    if port == wanted:
                        event.set()
            if response.status_code != 200:
                self.stop.wait(0.01)

    def wait_for_write_on(self, port: int, timeout: float) -> bool:
        """Block until a write succeeds on the server at `port` (True), or `timeout` passes (False)."""
        with self._lock:
            event = self.ok_since.setdefault(port, threading.Event())
            if any(r.port == port for r in self.requests):
                event.set()
        return event.wait(timeout)


@pytest.mark.parametrize("order", ["switchover", "crash"])
def test_writes_come_back_after_failover(
    make_app: MakeApp,
    template: PgServer,
    order: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Promote the standby and lose the old primary under load: writes succeed again within 2 s, none hangs.

    `switchover`: promote, then stop the old primary (fast): writes it acknowledged in
    between are not on the new primary (fence the old one first). `crash`: the old primary
    dies (immediate stop), then the standby is promoted; replication is asynchronous, so
    its last acknowledged writes may not have reached the standby. Either loss is counted
    and printed, not asserted: it is the replication's, not the pool's.
    """
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    primary, standby = _make_pair(template)
    try:
        app = _writer_app(make_app, primary, standby)
        ro = app.extensions["proxypool"].pool("ro")
        with ro.connection() as conn:  # a read-replica connection, idle across the promotion
            assert _server_of(conn) == (standby.port, True)
        with Load(app) as load:
            assert load.wait_for_write_on(primary.port, 10.0), "no write succeeded before the failover"
            if order == "switchover":
                standby.promote()
                lost_at = time.monotonic()
                primary.stop("fast")
                ready_at = time.monotonic()
            else:
                lost_at = time.monotonic()
                primary.stop("immediate")
                standby.promote()
                ready_at = time.monotonic()
            assert load.wait_for_write_on(standby.port, 10.0), "no write succeeded on the new primary"
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not load.stop.wait(0.05):  # more load after the recovery
                pass
        requests = sorted(load.requests, key=lambda r: r.start)
        first_new = min(r.end for r in requests if r.port == standby.port)
        recovery = first_new - ready_at
        outage = first_new - max((r.end for r in requests if r.port == primary.port), default=lost_at)
        longest = max(r.end - r.start for r in requests)
        statuses = sorted({r.status for r in requests})
        after = [r for r in requests if r.start > first_new]
        with standby.connect() as conn:
            on_new = {row[0] for row in conn.execute("SELECT token FROM writes").fetchall()}
        acked_new = {r.token for r in requests if r.port == standby.port}
        lost = [r for r in requests if r.port == primary.port and r.token not in on_new]
        with capsys.disabled():
            print(
                f"\n[failover {order}] first write on the new primary {first_new - lost_at:.3f} s after the old "
                f"one was lost, {recovery:.3f} s after both steps were done, "
                f"outage (last write on the old to first on the new) {outage:.3f} s, longest request {longest:.3f} s, "
                f"{len(requests)} requests, statuses {statuses}, "
                f"{sum(r.status != 200 for r in requests)} not 200, "
                f"{len(lost)} acknowledged writes missing on the new primary"
            )
        assert recovery <= 2.0, recovery
        assert longest <= 1.5, longest  # the pool timeout is 1 s; nothing waited on a dead server
        assert set(statuses) <= {200, 503}, statuses
        assert after and all(r.status == 200 and r.port == standby.port for r in after)
        assert acked_new <= on_new  # every write acknowledged by the new primary is there
        stats = app.extensions["proxypool"].pool("db").stats()
        assert stats.in_use == 0 and stats.size <= 4

        # The read-replica pool: its idle connection still says "standby" (a promotion sends nothing
        # to an idle session), serves one more checkout, and is dropped on return with one log line.
        with ro.connection() as conn:
            assert _server_of(conn) == (standby.port, False)
        dropped = [
            r.getMessage() for r in caplog.records if "'ro'" in r.getMessage() and "WrongServerRole" in r.getMessage()
        ]
        assert len(dropped) == 1, dropped
        assert "not in recovery" in dropped[0] and f"port={standby.port}" in dropped[0]
        with pytest.raises(ConnectFailed, match="not in recovery"):  # no standby left to connect to
            ro.getconn()
        assert ro.stats().size == 0
        assert not any(PASSWORD in r.getMessage() for r in caplog.records)
    finally:
        _drop(standby, primary)


# -- behind PgBouncer: what the pool cannot see ---------------------------------------------------


def test_pgbouncer_forwards_a_stale_in_hot_standby(template: PgServer) -> None:
    """PgBouncer 1.18 replays the in_hot_standby of its first server login: after a promotion it still says
    "on", so a pool behind it must not trust it (`trust_in_hot_standby=False`) or it refuses a good primary."""
    from pgbouncer import running

    primary, standby = _make_pair(template)
    try:
        with running(make_basedir("pp-pgb-"), standby) as bouncer:
            via = bouncer.conninfo("postgres")
            with psycopg.connect(via) as conn:  # PgBouncer logs in to the standby and keeps its status
                assert conn.info.parameter_status("in_hot_standby") == "on"
            standby.promote()
            with psycopg.connect(via) as conn:
                assert conn.info.parameter_status("in_hot_standby") == "on"  # stale
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            trusting = PsycopgKind(via)
            with pytest.raises(WrongServerRole, match="is in recovery"):
                trusting.create()
            blind = PsycopgKind(via, trust_in_hot_standby=False)
            conn = blind.create()
            try:
                assert _server_of(conn) == (standby.port, False)
            finally:
                blind.close(conn)
    finally:
        _drop(standby, primary)
