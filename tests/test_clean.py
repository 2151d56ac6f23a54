"""Returned clean, always: what one request leaves on a pooled connection, the next never sees.

Every test uses a pool of one connection (so the next request gets the very same backend,
checked by its pid) with the default configuration unless the test is about an option.
"""

from __future__ import annotations

import typing as t
import uuid

import psycopg
import pytest
from flask import Flask
from flask import request
from psycopg import sql
from psycopg.rows import dict_row

from flask_proxypool import db
from pgserver import PgServer

MakeApp = t.Callable[..., Flask]

#: What a request can leave on a session, as (name, SQL run by request A).
STATE_CHANGES = {
    "role": "SET ROLE {low}",
    "session_authorization": "SET SESSION AUTHORIZATION {low}",
    "search_path": "SET search_path TO {schema}",
    "statement_timeout": "SET statement_timeout = '50ms'",
    "set_config": "SELECT set_config('application_name', 'changed-by-a', false)",
    "temp_table": "CREATE TEMP TABLE leaked_tmp (secret text); INSERT INTO leaked_tmp VALUES ('from A')",
    "advisory_lock": "SELECT pg_advisory_lock(4242)",
    "listen": "LISTEN leaked_channel",
    "prepare": "PREPARE leaked_stmt AS SELECT 'from A'",
    "with_hold_cursor": "DECLARE leaked_cur CURSOR WITH HOLD FOR SELECT 'from A'",
    "sequence_currval": "SELECT nextval('{schema}.seq')",
}

#: What request B looks at: one row that differs from a fresh connection's whenever anything leaked
#: (lastval() is read apart: it raises on a session that never used a sequence).
OBSERVE = """
SELECT current_user, session_user, current_setting('search_path'), current_setting('statement_timeout'),
       current_setting('application_name'),
       to_regclass('pg_temp.leaked_tmp') IS NOT NULL,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),
       (SELECT count(*) FROM pg_cursors)
"""


def _observe(conn: psycopg.Connection[t.Any]) -> list[t.Any]:
    row = list(conn.execute(OBSERVE).fetchone())
    try:
        with conn.transaction():
            row.append(conn.execute("SELECT lastval()").fetchone()[0])
    except psycopg.errors.ObjectNotInPrerequisiteState:
        row.append(None)
    return row


@pytest.fixture(scope="module")
def objects(pg: PgServer) -> dict[str, str]:
    """A low-privileged role and a schema with a sequence, made once for this module."""
    suffix = uuid.uuid4().hex[:8]
    low, schema = f"low_{suffix}", f"other_{suffix}"
    pg.psql(f"CREATE ROLE {low}", dbname="app")
    pg.psql(f"CREATE SCHEMA {schema}; CREATE SEQUENCE {schema}.seq", dbname="app")
    return {"low": low, "schema": schema}


def _app(make_app: MakeApp, conninfo: str, **options: t.Any) -> Flask:
    app = make_app({"db": {"conninfo": conninfo, "max_size": 1, "timeout": 5.0, **options}})

    @app.post("/run")
    def run() -> dict[str, t.Any]:
        """Run the posted SQL, then end as told: commit, autocommit from the start, or leave it open."""
        body = request.get_json()
        if body["end"] == "autocommit":
            db.autocommit = True
        for stmt in body["sql"]:
            db.execute(stmt)
        if body["end"] == "commit":
            db.commit()
        if body["end"] == "raise":
            raise RuntimeError("request A fails after changing the session")
        return {"pid": db.info.backend_pid}

    @app.post("/observe")
    def observe() -> dict[str, t.Any]:
        query = request.get_json()["sql"]
        row = _observe(db._get_current_object()) if query is None else list(db.execute(query).fetchone())
        return {"pid": db.info.backend_pid, "row": row}

    return app


def _fresh(conninfo: str) -> list[t.Any]:
    with psycopg.connect(conninfo) as conn:
        return _observe(conn)


@pytest.mark.parametrize("end", ["commit", "autocommit", "rollback", "raise"])
@pytest.mark.parametrize("change", sorted(STATE_CHANGES))
def test_session_state_does_not_pass_to_the_next_request(
    make_app: MakeApp, conninfo: str, objects: dict[str, str], change: str, end: str
) -> None:
    """Settings, identity, temp tables, locks, LISTEN, PREPARE, held cursors, lastval: none reach request B."""
    app = _app(make_app, conninfo)
    client = app.test_client()
    expected = _fresh(conninfo)
    statement = STATE_CHANGES[change].format(**objects)
    a = client.post("/run", json={"sql": [statement], "end": end})
    assert a.status_code == (500 if end == "raise" else 200)
    b = client.post("/observe", json={"sql": None})
    assert b.status_code == 200
    assert b.json["row"] == expected
    st = app.extensions["proxypool"].pool("db").stats()
    assert (st.created, st.closed) == (1, 0), "the connection was reset and kept, not replaced"
    if end != "raise":
        assert b.json["pid"] == a.json["pid"]


@pytest.mark.parametrize("change", sorted(STATE_CHANGES))
def test_the_observation_sees_each_change(conninfo: str, objects: dict[str, str], change: str) -> None:
    """The check above can fail: on a session nobody reset, each change shows in the observed row."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(STATE_CHANGES[change].format(**objects))
        assert _observe(conn) != _fresh(conninfo)


def test_connection_attributes_go_back(make_app: MakeApp, conninfo: str) -> None:
    """autocommit, read_only, isolation_level, deferrable, row_factory set by A are the pool's again for B."""
    app = _app(make_app, conninfo)

    @app.get("/attrs")
    def attrs() -> dict[str, t.Any]:
        conn = db._get_current_object()
        out = {
            "autocommit": conn.autocommit,
            "read_only": conn.read_only,
            "isolation_level": None if conn.isolation_level is None else conn.isolation_level.name,
            "deferrable": conn.deferrable,
            "row_factory": conn.row_factory.__name__,
            "prepare_threshold": conn.prepare_threshold,
        }
        if request.args.get("change"):
            conn.autocommit = True
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            conn.deferrable = True
            conn.row_factory = dict_row
            conn.prepare_threshold = None
        return out

    client = app.test_client()
    before = client.get("/attrs?change=1").json
    after = client.get("/attrs").json
    assert (
        before
        == after
        == {
            "autocommit": False,
            "read_only": None,
            "isolation_level": None,
            "deferrable": None,
            "row_factory": "tuple_row",
            "prepare_threshold": 5,
        }
    )


def test_leaked_autocommit_does_not_defeat_the_rollback(make_app: MakeApp, conninfo: str, pg: PgServer) -> None:
    """A sets autocommit and returns; B inserts and fails: B's row is rolled back, not committed."""
    table = f"t_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE TABLE {table} (id int)", dbname="app")
    app = _app(make_app, conninfo)

    @app.post("/insert-and-fail")
    def insert_and_fail() -> str:
        db.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
        raise RuntimeError("B fails after its insert")

    client = app.test_client()
    assert client.post("/run", json={"sql": ["SELECT 1"], "end": "autocommit"}).status_code == 200
    assert client.post("/insert-and-fail").status_code == 500
    assert pg.psql(f"SELECT count(*) FROM {table}", dbname="app") == [(0,)]


def test_settings_made_by_configure_survive_the_reset(
    make_app: MakeApp, conninfo: str, objects: dict[str, str]
) -> None:
    """configure's SET and SET ROLE are the pool's own: put back after each reset, not wiped by it."""
    schema, low = objects["schema"], objects["low"]

    def configure(conn: psycopg.Connection[t.Any]) -> None:
        conn.execute(f"SET search_path TO {schema}, public")
        conn.execute("SET work_mem = '7MB'")
        conn.execute(f"SET ROLE {low}")

    app = _app(make_app, conninfo, configure=configure)
    client = app.test_client()
    observe = "SELECT current_setting('search_path'), current_setting('work_mem'), current_user::text"
    want = [f"{schema}, public", "7MB", low]
    assert client.post("/observe", json={"sql": observe}).json["row"] == want
    changed = ["RESET ROLE", "SET search_path TO public", "SET work_mem = '1MB'"]
    assert client.post("/run", json={"sql": changed, "end": "commit"}).status_code == 200
    assert client.post("/observe", json={"sql": observe}).json["row"] == want


def test_documented_reset_hook_works(make_app: MakeApp, conninfo: str) -> None:
    """reset=lambda c: c.execute("DISCARD ALL"), as documented, runs on every return and keeps the connection.

    With psycopg preparing every query at once (prepare_threshold 0), its prepared statements are
    dropped by DISCARD ALL each time: psycopg must still know, or the next use fails.
    """
    calls: list[int] = []

    def reset(conn: psycopg.Connection[t.Any]) -> None:
        calls.append(1)
        conn.execute("DISCARD ALL")

    app = _app(make_app, conninfo, reset=reset, prepare_threshold=0)
    client = app.test_client()
    for i in range(8):
        for end in ("commit", "autocommit", "rollback"):
            r = client.post("/run", json={"sql": ["SELECT 1", "SELECT 2", "SELECT 1"], "end": end})
            assert r.status_code == 200, (i, end, r.get_data(as_text=True))
    st = app.extensions["proxypool"].pool("db").stats()
    assert len(calls) == 24
    assert (st.created, st.closed, st.errors) == (1, 0, 0)


@pytest.mark.parametrize("threshold", [0, 5, None])
@pytest.mark.parametrize("end", ["commit", "autocommit", "rollback"])
def test_psycopg_prepared_statements_stay_true(
    make_app: MakeApp, conninfo: str, threshold: int | None, end: str
) -> None:
    """The reset drops SQL-level prepared statements; psycopg's own bookkeeping follows, so queries keep working."""
    app = _app(make_app, conninfo, prepare_threshold=threshold)
    client = app.test_client()
    query = ["SELECT 2", "SELECT 1", "SELECT 1", "SELECT 1", "SELECT 1", "SELECT 1", "SELECT 1"]
    for i in range(6):
        r = client.post("/run", json={"sql": query, "end": end})
        assert r.status_code == 200, (i, r.get_data(as_text=True))
    st = app.extensions["proxypool"].pool("db").stats()
    assert (st.created, st.closed, st.errors) == (1, 0, 0)


def test_rollback_opt_out_keeps_session_state(make_app: MakeApp, conninfo: str) -> None:
    """reset: "rollback" (measured opt-out) only rolls back: committed settings stay, attributes still go back."""
    app = _app(make_app, conninfo, reset="rollback")

    @app.get("/autocommit")
    def autocommit() -> dict[str, bool]:
        return {"autocommit": db.autocommit}

    client = app.test_client()
    observe = "SELECT current_setting('statement_timeout')"
    assert client.post("/run", json={"sql": ["SET statement_timeout = '5s'"], "end": "autocommit"}).status_code == 200
    assert client.post("/observe", json={"sql": observe}).json["row"] == ["5s"]
    assert client.get("/autocommit").json == {"autocommit": False}


def test_pending_notification_does_not_reach_the_next_holder(make_app: MakeApp, conninfo: str, pg: PgServer) -> None:
    """A notification for A's LISTEN, received while A held the connection, is not handed to B."""
    app = _app(make_app, conninfo)

    @app.post("/listen-and-notify")
    def listen_and_notify() -> str:
        db.execute("LISTEN leak_test")
        db.commit()
        with psycopg.connect(conninfo, autocommit=True) as other:
            other.execute("NOTIFY leak_test, 'secret for A'")
        db.execute("SELECT 1")  # the notification arrives with this result
        return "ok"

    @app.get("/notifies")
    def notifies() -> dict[str, list[str]]:
        return {"payloads": [n.payload for n in db.notifies(timeout=0.2)]}

    client = app.test_client()
    assert client.post("/listen-and-notify").status_code == 200
    assert client.get("/notifies").json == {"payloads": []}


def test_handlers_added_by_a_view_go_back(make_app: MakeApp, conninfo: str) -> None:
    """Notice and notify handlers a request adds to the connection are gone for the next one."""
    app = _app(make_app, conninfo)
    seen: list[str] = []

    @app.post("/add-handlers")
    def add_handlers() -> str:
        db.add_notice_handler(lambda d: seen.append(f"notice: {d.message_primary}"))
        db.add_notify_handler(lambda n: seen.append(f"notify: {n.payload}"))
        db.execute("LISTEN handler_test")
        db.commit()
        return "ok"

    @app.post("/notice")
    def notice() -> str:
        db.execute("DO $$BEGIN RAISE NOTICE 'for B only'; END$$")
        db.execute("LISTEN handler_test")
        db.commit()
        with psycopg.connect(conninfo, autocommit=True) as other:
            other.execute("NOTIFY handler_test, 'for B'")
        db.execute("SELECT 1")
        return "ok"

    client = app.test_client()
    assert client.post("/add-handlers").status_code == 200
    assert client.post("/notice").status_code == 200
    assert seen == []


def _sqlite_app(make_app: MakeApp) -> Flask:
    app = make_app({"db": {"kind": "sqlite3", "max_size": 1}})

    @app.post("/sqlite")
    def run_sqlite() -> dict[str, t.Any]:
        conn = db._get_current_object()
        for stmt in request.get_json()["sql"]:
            conn.execute(stmt)
        if request.args.get("attrs"):
            conn.isolation_level = None
            conn.row_factory = lambda cur, row: {"changed": True}
            conn.text_factory = bytes
        state = conn.execute(
            "SELECT (SELECT count(*) FROM temp.sqlite_master), (SELECT count(*) FROM pragma_database_list)"
        ).fetchone()
        return {
            "id": id(conn),
            "state": list(state) if isinstance(state, tuple) else state,
            "isolation_level": conn.isolation_level,
            "text_factory": conn.text_factory.__name__,
        }

    return app


@pytest.mark.parametrize(
    "statement", ["CREATE TEMP TABLE leaked (x)", "ATTACH DATABASE ':memory:' AS leaked", "SELECT 1"]
)
def test_sqlite3_session_state_is_not_inherited(make_app: MakeApp, statement: str) -> None:
    """sqlite3: a connection left with temp objects or an attached database is replaced; attributes go back."""
    app = _sqlite_app(make_app)
    client = app.test_client()
    a = client.post("/sqlite?attrs=1", json={"sql": [statement]})
    assert a.status_code == 200
    b = client.post("/sqlite", json={"sql": []})
    assert b.json["state"] == [0, 2]
    assert (b.json["isolation_level"], b.json["text_factory"]) == ("", "str")
    st = app.extensions["proxypool"].pool("db").stats()
    replaced = statement != "SELECT 1"
    assert (st.created, st.closed) == ((2, 1) if replaced else (1, 0))


def test_raw_libpq_statuses_answer_as_psycopg_does(conninfo: str) -> None:
    """Pure-Python psycopg: the reset's direct libpq calls read what pgconn's properties read, in every state."""
    from flask_proxypool.kinds import psycopg as kind

    raw = kind._raw_status_functions()
    if psycopg.pq.__impl__ != "python":
        assert raw is None  # the C implementation's properties are cheap: used as they are
        return
    assert raw is not None, "psycopg moved PQtransactionStatus/PQpipelineStatus: update _raw_status_functions"
    conn = psycopg.connect(conninfo)
    seen = []

    def same() -> None:
        pg = conn.pgconn
        got = (raw[0](pg._pgconn_ptr), raw[1](pg._pgconn_ptr))
        assert got == (pg.transaction_status, pg.pipeline_status)
        seen.append(got)

    same()  # idle
    conn.execute("SELECT 1")
    same()  # in a transaction
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")
    same()  # in error
    conn.rollback()
    conn.pgconn.enter_pipeline_mode()
    same()  # a pipeline left open
    conn.pgconn.exit_pipeline_mode()
    conn.close()
    same()  # closed: no PGconn left (NULL)
    assert [s[0] for s in seen] == [0, 2, 3, 0, 4] and [s[1] for s in seen] == [0, 0, 0, 1, 0]


def test_raw_libpq_calls_are_given_a_pointer(conninfo: str) -> None:
    """The argument-less prototypes would pass anything but a ctypes pointer to libpq as an int: the kind
    checks on its first connection what psycopg keeps, and uses psycopg's properties if that changed."""
    from flask_proxypool.kinds import _libpq
    from flask_proxypool.kinds.psycopg import PsycopgKind

    k = PsycopgKind(conninfo, reset="rollback")
    conn = k.create()
    try:
        if psycopg.pq.__impl__ != "python":
            assert k._raw_status is None
            return
        assert _libpq.raw_status_usable(conn.pgconn) and k._raw_status is not None
        assert not _libpq.raw_status_usable(object()) and not _libpq.raw_status_usable(None)
    finally:
        conn.close()


_ATTR_CHANGES = [
    ("autocommit", True),
    ("isolation_level", psycopg.IsolationLevel.SERIALIZABLE),
    ("read_only", True),
    ("deferrable", True),
    ("row_factory", dict_row),
    ("cursor_factory", psycopg.ClientCursor),
    ("server_cursor_factory", type("MyServerCursor", (psycopg.ServerCursor,), {})),
    ("prepare_threshold", None),
    ("prepared_max", 7),
]


def test_the_attribute_check_covers_every_attribute() -> None:
    from flask_proxypool.kinds import _connstate as kind

    assert [a for a, _ in _ATTR_CHANGES] == list(kind._ATTRS)
    assert [a.rsplit(".", 1)[-1].lstrip("_") for a in kind._RAW_ATTRS] == list(kind._ATTRS)


@pytest.mark.parametrize(("attr", "value"), _ATTR_CHANGES, ids=[a for a, _ in _ATTR_CHANGES])
def test_the_reset_sees_and_puts_back_each_attribute(conninfo: str, attr: str, value: object) -> None:
    """The reset reads the attributes where psycopg keeps them (not through its properties): each change
    is seen and put back, and the reader is the fast one (a psycopg that moved one fails here)."""
    from flask_proxypool.kinds import _connstate
    from flask_proxypool.kinds import psycopg as kind

    k = kind.PsycopgKind(conninfo, reset="rollback")
    conn = k.create()
    try:
        read, expected, whole = k._reader
        assert read is _connstate._read_state and whole, (
            "psycopg moved an attribute the reset reads: update _RAW_ATTRS or _NOTIFY_ATTRS"
        )
        before = getattr(conn, attr)
        setattr(conn, attr, value)
        assert read(conn) != expected
        assert k.reset(conn) is True
        assert getattr(conn, attr) == before and read(conn) == expected
    finally:
        conn.close()


@pytest.mark.parametrize("reset", ["rollback", "session"])
@pytest.mark.parametrize("autocommit", [True, False])
def test_the_one_read_test_sees_notifications_and_handlers(conninfo: str, reset: str, autocommit: bool) -> None:
    """The reset's one-read test covers the notification state: a backlog and a handler a holder left are
    seen and dropped, also when the connection comes back idle and nothing else changed."""
    from flask_proxypool.kinds import psycopg as kind

    k = kind.PsycopgKind(conninfo, {"autocommit": autocommit}, reset=reset)
    conn = k.create()
    try:
        read, expected, whole = k._reader
        assert whole
        conn.execute("LISTEN pp_one_read")
        conn.execute("NOTIFY pp_one_read, 'left'")  # comes with this result; no handler: to the backlog
        conn.commit()
        assert [n.payload for n in conn._notifies_backlog] == ["left"], "psycopg no longer keeps a backlog here"
        assert k.reset(conn) is True
        assert read(conn) == expected and not conn._notifies_backlog
        seen: list[str] = []
        conn.add_notify_handler(lambda n: seen.append(n.payload))
        conn.execute("LISTEN pp_one_read")
        conn.execute("NOTIFY pp_one_read, 'handled'")
        conn.commit()
        assert seen == ["handled"]
        assert read(conn) != expected
        assert k.reset(conn) is True
        assert read(conn) == expected
        assert not conn._notifies_backlog and conn._notify_handlers == []
    finally:
        conn.close()


def test_a_pipeline_left_open_is_discarded(conninfo: str) -> None:
    """A connection returned in libpq pipeline mode is never reused (both psycopg implementations)."""
    from flask_proxypool.kinds.psycopg import PsycopgKind

    k = PsycopgKind(conninfo, reset="rollback")
    conn = k.create()
    try:
        assert k.reset(conn) is True
        conn.pgconn.enter_pipeline_mode()
        assert k.reset(conn) is False
    finally:
        conn.close()
