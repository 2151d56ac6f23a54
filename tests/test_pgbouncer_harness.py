"""The PgBouncer harness itself: it really pools in transaction mode in front of the test server."""

from __future__ import annotations

import psycopg
from pgbouncer import PgBouncer


def test_transaction_mode_shares_server_connections(pgb: PgBouncer) -> None:
    """Two clients in turn may land on one server backend; the admin console reports the pool."""
    with psycopg.connect(pgb.conninfo("app"), autocommit=True) as a:
        assert a.execute("SELECT current_database()").fetchone() == ("app",)
    assert pgb.admin("SHOW VERSION")[0]["version"].startswith("PgBouncer 1.")
    rows = pgb.pools("app")
    assert rows and rows[0]["pool_mode"] == "transaction"
    config = {row["key"]: row["value"] for row in pgb.admin("SHOW CONFIG")}
    assert config["default_pool_size"] == "4"
