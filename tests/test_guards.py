"""Server-side guards (statement_timeout, lock_timeout, idle_in_transaction_session_timeout) on real servers."""

from __future__ import annotations

import logging
import re
import threading
import time
import typing as t
import uuid

import psycopg
import pytest
from flask import Flask
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from conftest import wait_until
from flask_proxypool import ConfigError
from flask_proxypool import ConnectFailed
from flask_proxypool import db
from flask_proxypool.config import parse_pools
from flask_proxypool.guards import GUARD_KEYS
from flask_proxypool.guards import split_options
from pgbouncer import PgBouncer
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]

#: the guards' configured values in these tests, seconds
STATEMENT, LOCK, IDLE = 0.3, 0.25, 0.3
#: how late past its timeout the server may cancel or terminate on a loaded 2-core machine
SLACK = 1.5


def _pool(app: Flask, name: str = "db") -> t.Any:
    return app.extensions["proxypool"].pool(name)


def _show(conn: psycopg.Connection[t.Any], *names: str) -> list[str]:
    return [str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names]  # type: ignore[index]


def _poll(what: t.Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `what()` is true, polling; fail after `timeout` seconds."""
    assert wait_until(what, timeout, interval=0.02), "condition not met in time"


# -- direct to PostgreSQL: the startup packet ---------------------------------------------------------


def test_runaway_query_cancelled_direct(make_app: MakeApp, conninfo: str) -> None:
    """A runaway statement is cancelled by the server at statement_timeout, and the connection is reused."""
    app = make_app({"db": {"conninfo": conninfo, "statement_timeout": STATEMENT, "max_size": 1}})
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            db.execute("SELECT pg_sleep(10)")
        elapsed = time.monotonic() - start
    assert STATEMENT <= elapsed < STATEMENT + SLACK
    with app.app_context():
        assert db.execute("SELECT 1").fetchone() == (1,)
    st_ = _pool(app).stats()
    assert (st_.created, st_.closed) == (1, 0)  # a cancelled statement is no reason to discard the connection


def test_guards_survive_set_and_session_reset(make_app: MakeApp, conninfo: str) -> None:
    """A holder's SET of each guard, committed or left in an open transaction, is undone for the next holder."""
    app = make_app(
        {
            "db": {
                "conninfo": conninfo,
                "max_size": 1,
                "statement_timeout": STATEMENT,
                "lock_timeout": LOCK,
                "idle_in_transaction_session_timeout": 2.5,
            }
        }
    )
    want = ["300ms", "250ms", "2500ms"]
    pool = _pool(app)
    conn = pool.getconn()
    pid = conn.info.backend_pid
    assert _show(conn, *GUARD_KEYS) == want
    conn.execute("SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0")
    conn.commit()
    assert _show(conn, *GUARD_KEYS) == ["0", "0", "0"]
    pool.putconn(conn)
    conn = pool.getconn()
    assert conn.info.backend_pid == pid  # the same session, reset: not a new connection
    assert _show(conn, *GUARD_KEYS) == want
    conn.execute("SET statement_timeout = '1h'")  # a transaction left open: the other reset path
    pool.putconn(conn)
    conn = pool.getconn()
    assert conn.info.backend_pid == pid
    assert _show(conn, *GUARD_KEYS) == want
    conn.execute("SET SESSION statement_timeout = 0")
    conn.commit()
    pool.putconn(conn)
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            db.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - start < STATEMENT + SLACK


@pytest.fixture
def locked_row(pg: PgServer, appname: str) -> t.Iterator[str]:
    """A table whose one row another connection holds locked (FOR UPDATE) for the test's duration."""
    table = f"t_{appname}"
    pg.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int); INSERT INTO {table} VALUES (1, 0)", dbname="app")
    with psycopg.connect(pg.conninfo("app", connect_timeout="10")) as other:
        other.execute(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
        yield table
        other.rollback()


def test_lock_timeout_fires_on_a_row_lock(make_app: MakeApp, conninfo: str, locked_row: str) -> None:
    """Waiting on a row another connection holds ends at lock_timeout, with LockNotAvailable."""
    app = make_app({"db": {"conninfo": conninfo, "lock_timeout": LOCK, "statement_timeout": 0}})
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable, match="lock timeout"):
            db.execute(f"UPDATE {locked_row} SET v = 1 WHERE id = 1")
        elapsed = time.monotonic() - start
    assert LOCK <= elapsed < LOCK + SLACK


@pytest.mark.parametrize("how", ["borrow", "getconn", "pgbouncer"])
def test_idle_transaction_terminated_and_pool_recovers(
    make_app: MakeApp, conninfo: str, pg: PgServer, appname: str, how: str, request: pytest.FixtureRequest
) -> None:
    """A thread leaving a transaction idle loses it to the server; its slot comes back and the next checkout works."""
    if how == "pgbouncer":  # the setting is the role's, verified by the pool
        role = request.getfixturevalue("role")
        pg.psql(f"ALTER ROLE {role} IN DATABASE app SET idle_in_transaction_session_timeout = '300ms'")
        app = _bouncer_app(
            make_app, request.getfixturevalue("pgb"), role, appname, idle_in_transaction_session_timeout=IDLE
        )
    else:
        app = make_app({"db": {"conninfo": conninfo, "idle_in_transaction_session_timeout": IDLE}})
    pool = _pool(app)
    began, go = threading.Event(), threading.Event()
    seen: dict[str, t.Any] = {}

    def misbehave() -> None:
        def work(conn: psycopg.Connection[t.Any]) -> None:
            seen["began"] = time.monotonic()  # before the transaction starts: a lower bound for its end
            seen["pid"] = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            began.set()
            go.wait(30)  # ... and forgets the transaction it opened
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as e:
                seen["error"] = e
            seen["broken"] = conn.broken

        if how == "getconn":
            conn = pool.getconn()
            try:
                work(conn)
            finally:
                pool.putconn(conn)
        else:
            with db.borrow(app) as conn:
                work(conn)

    thread = threading.Thread(target=misbehave)
    thread.start()
    try:
        assert began.wait(10)
        _poll(lambda: not pg.psql(f"SELECT 1 FROM pg_stat_activity WHERE pid = {int(seen['pid'])}"))
        ended = time.monotonic() - seen["began"]
    finally:
        go.set()
        thread.join(10)
    assert not thread.is_alive()
    assert IDLE <= ended < IDLE + SLACK + 0.1  # + one poll interval
    # the server's FATAL (SQLSTATE 25P03); PgBouncer forwards it, then closes the client's connection
    assert isinstance(seen.get("error"), psycopg.errors.IdleInTransactionSessionTimeout), seen.get("error")
    assert seen["broken"] is True
    st_ = pool.stats()
    assert (st_.size, st_.in_use, st_.closed) == (0, 0, 1)  # discarded, slot free
    assert sum(st_.closed_by_reason.values()) == 1, st_.closed_by_reason
    with app.app_context():
        assert db.execute("SELECT pg_backend_pid()").fetchone()[0] != seen["pid"]
    assert pool.stats().created == 2


# -- the user's own libpq options -----------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    ["key=value", "url", "beside"],
)
def test_user_options_merged(make_app: MakeApp, pg: PgServer, form: str) -> None:
    """The user's own `options` (in a key=value conninfo, a URL, or beside it) stay in force beside the guards."""
    if form == "key=value":
        pool = {"conninfo": pg.conninfo("app") + " options='-c search_path=pp_x,public -c work_mem=8MB'"}
    elif form == "url":
        pool = {"conninfo": pg.url("app") + "?options=-c%20search_path%3Dpp_x,public%20-c%20work_mem%3D8MB"}
    else:
        pool = {"conninfo": pg.conninfo("app"), "options": "-c search_path=pp_x,public -c work_mem=8MB"}
    app = make_app({"db": {**pool, "statement_timeout": STATEMENT, "lock_timeout": 0}})
    with app.app_context():
        assert _show(db._get_current_object(), "search_path", "work_mem", "statement_timeout", "lock_timeout") == [
            "pp_x,public",
            "8MB",
            "300ms",
            "0",
        ]


_IN_CONNINFO = "the 'options' of PROXYPOOL_POOLS['db']['conninfo']"
_BESIDE = "PROXYPOOL_POOLS['db']['options']"


@pytest.mark.parametrize(
    ("extra", "key", "where"),
    [
        ({"conninfo": "dbname=app options='-c statement_timeout=5s'"}, "statement_timeout", _IN_CONNINFO),
        ({"conninfo": "postgresql://h/app?options=-c%20lock_timeout%3D1s"}, "lock_timeout", _IN_CONNINFO),
        ({"conninfo": "dbname=app", "options": "-cstatement_timeout=5s"}, "statement_timeout", _BESIDE),
        ({"conninfo": "dbname=app", "options": "-c a=b --Lock-Timeout=1s"}, "lock_timeout", _BESIDE),
    ],
)
def test_same_setting_in_user_options_refused(extra: dict[str, str], key: str, where: str) -> None:
    """A guard the user's own options already set is refused at init_app, naming the pool and the key."""
    with pytest.raises(ConfigError) as info:
        parse_pools({"db": {**extra, "statement_timeout": 1, "lock_timeout": 1}})
    assert str(info.value).startswith(f"PROXYPOOL_POOLS['db'][{key!r}] is set, and {where} already sets {key}")


def test_same_setting_in_pgoptions_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """PGOPTIONS is what libpq sends when nothing else sets options: the same conflict is refused."""
    monkeypatch.setenv("PGOPTIONS", "-c idle_in_transaction_session_timeout=1min")
    with pytest.raises(ConfigError, match="PGOPTIONS environment variable already sets idle_in"):
        parse_pools({"db": {"conninfo": "dbname=app", "idle_in_transaction_session_timeout": 1}})
    parse_pools({"db": {"conninfo": "dbname=app", "statement_timeout": 1}})  # another setting: merged


def test_lone_backslash_refused() -> None:
    """Options ending in a lone backslash would swallow the space before the guards: refused."""
    with pytest.raises(ConfigError, match=r"PROXYPOOL_POOLS\['db'\]\['options'\] ends in a lone backslash"):
        parse_pools({"db": {"conninfo": "dbname=app", "options": "-c search_path=a\\", "lock_timeout": 1}})


def test_pgbouncer_mode_sends_no_options() -> None:
    """Behind PgBouncer the guards are not put in the startup options (PgBouncer 1.18 refuses them)."""
    cfg = parse_pools({"db": {"conninfo": "dbname=app", "pgbouncer": "transaction", "statement_timeout": 1}})["db"]
    kind = cfg.make_kind()
    assert "options" not in kind.connect_kwargs  # type: ignore[attr-defined]
    direct = parse_pools({"db": {"conninfo": "dbname=app", "statement_timeout": 1.5}})["db"].make_kind()
    assert direct.connect_kwargs["options"] == "-c statement_timeout=1500"  # type: ignore[attr-defined]


_NAMES = st.sampled_from(["search_path", "work_mem", "application_name", *GUARD_KEYS])
_VALUES = st.text(alphabet=st.sampled_from("ab1 \\'=,\t"), max_size=6)


def _escape(arg: str) -> str:
    return "".join("\\" + c if c in " \t\n\r\f\v\\" else c for c in arg)


@settings(max_examples=200, deadline=None)
@given(
    settings_=st.lists(st.tuples(_NAMES, _VALUES, st.sampled_from(["-c ", "-c", "--"]), st.booleans()), max_size=4),
    set_=st.sets(st.sampled_from(GUARD_KEYS), min_size=1),
)
def test_options_read_as_the_server_reads_them(settings_: list[tuple[str, str, str, bool]], set_: set[str]) -> None:
    """Any options string: split back into its arguments, and refused exactly when it sets a configured guard."""
    args: list[str] = []
    for name, value, switch, upper in settings_:
        shown = name.upper() if upper else name
        if switch == "--":
            shown = shown.replace("_", "-")
        args += ["-c", f"{shown}={value}"] if switch == "-c " else [f"{switch}{shown}={value}"]
    text = "  ".join(_escape(a) for a in args)
    assert split_options(text) == args
    clash = set_ & {name for name, *_ in settings_}
    pool = {"conninfo": "dbname=app", "options": text, **{k: 1 for k in set_}}
    if clash:
        with pytest.raises(ConfigError, match="already sets"):
            parse_pools({"db": pool})
    else:
        kind = parse_pools({"db": pool})["db"].make_kind()
        merged = split_options(kind.connect_kwargs["options"])  # type: ignore[attr-defined]
        assert merged is not None
        assert merged[: len(args)] == args
        assert merged[len(args) :] == [x for k in GUARD_KEYS if k in set_ for x in ("-c", f"{k}=1000")]


# -- behind PgBouncer: role settings, verified ---------------------------------------------------------


@pytest.fixture
def role(pg: PgServer, pgb: PgBouncer) -> str:
    """A login role made for this test, known to PgBouncer, with no settings of its own."""
    name = f"pp_guard_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE ROLE {name} LOGIN")
    pgb.add_user(name)
    return name


def _bouncer_app(make_app: MakeApp, pgb: PgBouncer, role: str, appname: str, **guards: float) -> Flask:
    conninfo = pgb.conninfo("app", user=role, application_name=appname)
    pool = {
        "conninfo": conninfo,
        "pgbouncer": "transaction",
        "prepare_threshold": None,
        "reset": "rollback",
        "max_size": 2,
        "reconnect_delay": 0.01,
        "reconnect_max_delay": 0.01,
        **guards,
    }
    app = make_app({"db": pool})

    @app.get("/one")
    def one() -> dict[str, t.Any]:
        return {"one": db.execute("SELECT 1").fetchone()[0]}

    return app


def test_runaway_query_cancelled_behind_pgbouncer(
    make_app: MakeApp, pg: PgServer, pgb: PgBouncer, role: str, appname: str
) -> None:
    """With the role's settings matching, a runaway statement through PgBouncer is cancelled at statement_timeout."""
    pg.psql(f"ALTER ROLE {role} IN DATABASE app SET statement_timeout = '300ms'")
    app = _bouncer_app(make_app, pgb, role, appname, statement_timeout=STATEMENT, lock_timeout=0)
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            db.execute("SELECT pg_sleep(10)")
        elapsed = time.monotonic() - start
        db.rollback()
        assert db.execute("SELECT 1").fetchone() == (1,)
    assert STATEMENT <= elapsed < STATEMENT + SLACK
    assert _pool(app).stats().connect_failures == 0


def test_mismatch_behind_pgbouncer_gives_alter_role(
    make_app: MakeApp,
    pg: PgServer,
    pgb: PgBouncer,
    role: str,
    appname: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Role settings that differ refuse each new connection with the ALTER ROLE to run, explained in the log once."""
    caplog.set_level(logging.WARNING, logger="flask_proxypool")
    pg.psql(f"ALTER ROLE {role} IN DATABASE app SET lock_timeout = '1s'")
    app = _bouncer_app(
        make_app,
        pgb,
        role,
        appname,
        statement_timeout=STATEMENT,
        lock_timeout=LOCK,
        idle_in_transaction_session_timeout=0,
    )
    pool = _pool(app)
    refused = app.test_client().get("/one")
    assert refused.status_code == 503  # the server's settings are wrong, not the request
    assert refused.json is not None and refused.json["pool"] == "db"
    failures = pool.stats().connect_failures
    while failures < 2:  # two real attempts; a call during the 10 ms backoff fails without one
        with app.app_context(), pytest.raises(ConnectFailed) as info:
            db.execute("SELECT 1")
        failures = pool.stats().connect_failures
    message = str(info.value)
    assert pool.stats().connect_failures == 2
    statements = re.findall(r"ALTER ROLE [^;]*? = '\d+ms'", message)
    assert statements == [
        f'ALTER ROLE "{role}" IN DATABASE "app" SET statement_timeout = \'300ms\'',
        f'ALTER ROLE "{role}" IN DATABASE "app" SET lock_timeout = \'250ms\'',
    ]
    assert "statement_timeout is 0 (disabled) instead of 300ms, lock_timeout is 1000ms instead of 250ms" in message
    explained = [r for r in caplog.records if r.levelno == logging.ERROR and "RECONNECT" in r.getMessage()]
    assert len(explained) == 1
    assert "opened before the ALTER ROLE keep the old values" in explained[0].getMessage()
    for statement in statements:
        pg.psql(statement)
    pgb.admin("RECONNECT app")  # server connections opened before the ALTER ROLE are not handed out again
    # PgBouncer closes its idle server connections at its next maintenance pass, not at once: wait for it (bounded).
    assert wait_until(lambda: not [row for row in pgb.admin("SHOW SERVERS") if row["user"] == role], 10, 0.02), (
        "PgBouncer kept the old server connections after RECONNECT"
    )
    with app.app_context():
        assert _show(db._get_current_object(), "statement_timeout", "lock_timeout") == ["300ms", "250ms"]
    assert pool.stats().connect_failures == 2


def test_direct_mode_through_pgbouncer_says_what_to_set(make_app: MakeApp, pgb: PgBouncer, appname: str) -> None:
    """Guards sent in libpq options to a PgBouncer (which refuses them): the 503's cause says to set `pgbouncer`."""
    app = make_app({"db": {"conninfo": pgb.conninfo("app", application_name=appname), "statement_timeout": 1}})
    with app.app_context(), pytest.raises(ConnectFailed) as info:
        db.execute("SELECT 1")
    message = str(info.value)
    assert "unsupported startup parameter: options" in message
    assert "sends its statement_timeout in libpq 'options'" in message
    assert "set pgbouncer: 'transaction'" in message
