"""Table creation and the two SQL dialect differences the example meets (placeholders, ``STRICT``)."""

from __future__ import annotations

import typing as t

from flask_proxypool import db

#: Valid on both engines; sqlite3 gets ``STRICT`` appended (see :func:`create_schema`). The CHECKs repeat
#: ``checks.py`` as a safety net: the app validates first, so a request never trips them.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS items ("
    " id integer PRIMARY KEY CHECK (id > 0),"
    " name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),"
    " price integer NOT NULL CHECK (price >= 0))",
    "CREATE TABLE IF NOT EXISTS orders ("
    " id integer PRIMARY KEY CHECK (id > 0),"
    " item_id integer NOT NULL CHECK (item_id > 0),"
    " qty integer NOT NULL CHECK (qty > 0))",
)


def _is_sqlite(conn: t.Any) -> bool:
    return type(conn).__module__ == "sqlite3"


def sql(query: str) -> str:
    """Queries are written with ``%s``; sqlite3 wants ``?``."""
    return query.replace("%s", "?") if _is_sqlite(db._get_current_object()) else query


def create_schema(conn: t.Any) -> None:
    """Create the tables if missing (an existing table is left as it is).

    sqlite3 stores whatever it is given in a column unless the table is ``STRICT``
    (SQLite 3.37+); PostgreSQL's types are strict already.
    """
    strict = " STRICT" if _is_sqlite(conn) else ""
    for stmt in SCHEMA:
        conn.execute(stmt + strict)
    conn.commit()
