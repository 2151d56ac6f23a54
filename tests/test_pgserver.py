"""Tests for the throwaway PostgreSQL helper in tests/pgserver.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import psycopg
import pytest
from pgserver import PgServer, make_basedir


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    basedir = make_basedir()
    server = PgServer(basedir)
    try:
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(basedir, ignore_errors=True)


def test_start_and_query(pg: PgServer) -> None:
    assert pg.is_running()
    assert pg.host == "127.0.0.1"
    assert pg.conninfo() == f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"
    assert pg.url("x") == f"postgresql://postgres@127.0.0.1:{pg.port}/x"

    [(version,)] = pg.psql("select version()")
    assert version.startswith("PostgreSQL ")
    assert pg.psql("set application_name = 'pgserver-test'") == []
    settings = dict(pg.psql("select name, setting from pg_settings where name in ('fsync', 'max_connections')"))
    assert settings == {"fsync": "off", "max_connections": "200"}

    # Real TCP connection via the URL as well as via the conninfo string.
    with psycopg.connect(pg.url()) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)


def test_restart_keeps_data(pg: PgServer) -> None:
    pg.create_database("pp_restart")
    pg.psql("create table t (v text); insert into t values ('kept')", dbname="pp_restart")
    [(started_before,)] = pg.psql("select pg_postmaster_start_time()")

    pg.restart()

    assert pg.is_running()
    assert pg.psql("select pg_postmaster_start_time()")[0][0] > started_before
    assert pg.psql("select v from t", dbname="pp_restart") == [("kept",)]


def test_stop_then_start(pg: PgServer) -> None:
    pg.stop()
    assert not pg.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.conninfo(connect_timeout="2")).close()

    pg.start()
    assert pg.is_running()
    assert pg.psql("select 1") == [(1,)]
