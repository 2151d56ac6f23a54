"""psycopg in a test transaction (flask_proxypool.testing.psycopg): what the code under test sees of it."""

from __future__ import annotations

import typing as t
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from flask import Flask
from psycopg import sql
from psycopg.pq import TransactionStatus

from flask_proxypool import ProxyPool, UsageError
from flask_proxypool.testing import ProxyPoolTransaction
from pgserver import PgServer

IDLE, INTRANS, INERROR = TransactionStatus.IDLE, TransactionStatus.INTRANS, TransactionStatus.INERROR


@pytest.fixture
def conninfo(pg: PgServer, tmp_path: Path) -> str:
    """A fresh database with an empty table ``items``."""
    name = f"tp_{tmp_path.name.replace('-', '_').lower()}"[:60]
    pg.create_database(name)
    info = pg.conninfo(name)
    with psycopg.connect(info, autocommit=True) as c:
        c.execute("CREATE TABLE items (x integer primary key)")
    return info


@pytest.fixture
def tx(conninfo: str, tmp_path: Path) -> Iterator[ProxyPoolTransaction]:
    """An app with a psycopg pool ``db`` (and an autocommit one, ``ac``) in a test transaction."""
    app = Flask("tp", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"conninfo": conninfo}, "ac": {"conninfo": conninfo, "autocommit": True}}
    ProxyPool(app)
    tx = ProxyPoolTransaction(app, ["db", "ac"])
    yield tx
    tx.finish()
    app.extensions["proxypool"].close(timeout=1.0)


def _count(conn: t.Any) -> int:
    return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def _outside(conninfo: str) -> int:
    with psycopg.connect(conninfo) as c:
        return _count(c)


def test_transaction_control_sent_as_sql(tx: ProxyPoolTransaction, conninfo: str) -> None:
    """BEGIN, COMMIT and ROLLBACK statements act as commit()/rollback(); info.transaction_status is the app's view."""
    pool = tx.app.extensions["proxypool"].pool("db")
    c = pool.getconn()
    assert c.info.transaction_status == IDLE
    c.execute("INSERT INTO items VALUES (1)")
    assert c.info.transaction_status == INTRANS
    c.execute("COMMIT")
    assert c.info.transaction_status == IDLE
    c.execute("INSERT INTO items VALUES (2)")
    c.execute(sql.SQL("ROLLBACK"))
    assert _count(c) == 1
    c.execute("ROLLBACK")
    with pytest.raises(psycopg.errors.DivisionByZero):
        c.execute("SELECT 1/0")
    assert c.info.transaction_status == INERROR
    c.execute("END")  # COMMIT of a failed transaction rolls back
    assert c.info.transaction_status == IDLE
    pool.putconn(c)
    ac = tx.app.extensions["proxypool"].pool("ac")
    c = ac.getconn()
    c.execute("INSERT INTO items VALUES (3)")  # autocommit: kept, nothing open
    assert c.info.transaction_status == IDLE
    c.execute("BEGIN")
    c.execute("INSERT INTO items VALUES (4)")
    assert c.info.transaction_status == INTRANS
    c.execute("ROLLBACK")
    c.execute("START TRANSACTION")
    c.execute("INSERT INTO items VALUES (5)")
    c.execute(b"COMMIT")
    assert [r[0] for r in c.execute("SELECT x FROM items ORDER BY x")] == [3, 5]  # each pool: its own transaction
    ac.putconn(c)
    assert _outside(conninfo) == 0


def test_a_commit_inside_a_longer_string_is_refused(tx: ProxyPoolTransaction, conninfo: str) -> None:
    """A COMMIT that reaches the server ends the test's transaction: the statement fails saying so, the test goes on."""
    pool = tx.app.extensions["proxypool"].pool("db")
    c = pool.getconn()
    with pytest.raises(UsageError, match="a statement ended the test's transaction"):
        c.execute("INSERT INTO items VALUES (1); COMMIT")
    assert _outside(conninfo) == 1  # committed for real: what the error says
    c.execute("INSERT INTO items VALUES (2)")
    c.commit()
    pool.putconn(c)
    tx.finish()
    assert _outside(conninfo) == 1


def test_characteristics_and_cursor_classes(tx: ProxyPoolTransaction) -> None:
    """Characteristics change only while idle, as psycopg says; every kind of cursor's statements open work."""
    pool = tx.app.extensions["proxypool"].pool("db")
    c = pool.getconn()
    c.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
    c.set_read_only(False)
    assert (c.isolation_level, c.read_only, c.deferrable) == (psycopg.IsolationLevel.SERIALIZABLE, False, None)
    with c.cursor("named") as cur:  # a server-side cursor
        cur.execute("SELECT x FROM items")
        assert cur.fetchall() == []
    with pytest.raises(psycopg.ProgrammingError, match="can't change 'read_only' now: .* status INTRANS"):
        c.read_only = True
    c.rollback()
    c.cursor_factory = psycopg.ClientCursor
    c.execute("INSERT INTO items VALUES (%s)", (1,))
    assert pool.kind.in_transaction(c)
    c.commit()
    with c.cursor() as cur, cur.copy("COPY items FROM STDIN") as copy:
        copy.write_row((2,))
    assert c.info.transaction_status == INTRANS
    with c.transaction():
        assert c.info.transaction_status == INTRANS
        with pytest.raises(psycopg.ProgrammingError, match="context in progress"):
            c.autocommit = True
    c.rollback()
    assert [r[0] for r in c.execute("SELECT x FROM items")] == [1]
    c.rollback()
    c.cursor_factory = psycopg.Cursor
    pool.putconn(c)
