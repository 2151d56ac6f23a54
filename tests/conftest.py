"""Shared fixtures: a real PostgreSQL for the session, and Flask apps with pools."""

from __future__ import annotations

import shutil
import time
import typing as t
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_proxypool import ProxyPool
from pgbouncer import PgBouncer
from pgserver import PgServer
from pgserver import make_basedir


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """One throwaway PostgreSQL cluster for the whole run (fails loudly if the binaries are missing)."""
    basedir = make_basedir()
    server = PgServer(basedir)
    try:
        server.start()
        server.create_database("app")
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(basedir, ignore_errors=True)


@pytest.fixture(scope="session")
def pgb(pg: PgServer) -> Iterator[PgBouncer]:
    """A PgBouncer 1.18+ in transaction mode (default_pool_size 4) in front of ``pg``, for the whole run."""
    basedir = make_basedir("pp-pgb-")
    bouncer = PgBouncer(basedir, pg)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(basedir, ignore_errors=True)


@pytest.fixture
def appname() -> str:
    """A unique application_name, so pg_stat_activity can be filtered to this test's backends."""
    return f"pp_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def conninfo(pg: PgServer, appname: str) -> str:
    return pg.conninfo("app", application_name=appname)


def wait_until(pred: t.Callable[[], bool], timeout: float = 5.0, interval: float = 0.001) -> bool:
    """Bounded poll: True as soon as ``pred()`` holds, False at the deadline.

    `interval`: the pause between tries; longer where ``pred`` asks the server.
    """
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def backends(pg: PgServer, appname: str) -> list[tuple[int, str]]:
    """(pid, state) of this test's server connections."""
    return [
        (pid, state)
        for pid, state in pg.psql(
            f"SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE application_name = '{appname}'"
        )
    ]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[t.Callable[..., Flask]]:
    """Build Flask apps with ProxyPool registered; their pools are closed at the end."""
    apps: list[Flask] = []

    def make(pools: dict[str, t.Any], **config: t.Any) -> Flask:
        app = Flask(f"app{len(apps)}", instance_path=str(tmp_path / f"instance{len(apps)}"))
        app.config["PROXYPOOL_POOLS"] = pools
        app.config.update(config)
        ProxyPool(app)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["proxypool"].close(timeout=1.0)
