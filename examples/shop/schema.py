"""Table creation and the one SQL dialect difference the example meets."""

from __future__ import annotations

import typing as t

from flask_proxypool import db

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS items (id integer PRIMARY KEY, name text NOT NULL, price integer NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (id integer PRIMARY KEY, item_id integer NOT NULL, qty integer NOT NULL)",
)


def _is_sqlite(conn: t.Any) -> bool:
    return type(conn).__module__ == "sqlite3"


def sql(query: str) -> str:
    """Queries are written with ``%s``; sqlite3 wants ``?``."""
    return query.replace("%s", "?") if _is_sqlite(db._get_current_object()) else query


def create_schema(conn: t.Any) -> None:
    for stmt in SCHEMA:
        conn.execute(stmt)
    conn.commit()
