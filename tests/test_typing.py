"""Typed proxies: a type checker sees the resource's type, and the proxy checks it at run time."""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_proxypool import UsageError, proxy
from pgserver import PgServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "typed" / "app.py"

needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is a lint tool, not installed in the free-threaded test environment (make lint runs it)",
)


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", "/dev/null", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_mypy
def test_typed_example_passes_mypy_strict_and_a_typo_fails(tmp_path: Path) -> None:
    """mypy --strict accepts examples/typed/app.py, and the same file with db.exectue is an error."""
    ok = _mypy(EXAMPLE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    typo = tmp_path / "typo_app.py"
    source = EXAMPLE.read_text()
    assert source.count("row = db.execute(") == 1
    typo.write_text(source.replace("row = db.execute(", "row = db.exectue("))
    bad = _mypy(typo)
    assert bad.returncode == 1
    assert '"Connection[Any]" has no attribute "exectue"' in bad.stdout


def test_typed_example_runs(pg: PgServer, appname: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The typed example serves requests; current() is the connection; borrow() works outside a request."""
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    import app as typed  # examples/typed/app.py

    application = typed.create_app(pg.conninfo("app", application_name=appname))
    try:
        client = application.test_client()
        assert client.get("/now").status_code == 200
        assert client.get("/backend").json["pid"] > 0
        assert typed.nightly_report(application) >= 1
    finally:
        application.extensions["proxypool"].close(timeout=1.0)


def test_typed_proxy_refuses_a_resource_of_another_type(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """proxy(name, cls) on a pool that makes something else: the first use says so, and gives the resource back."""
    app = make_app({"other": {"conninfo": conninfo}})
    wrong = proxy("other", sqlite3.Connection)
    with app.app_context():
        with pytest.raises(UsageError, match=r"proxy\('other', Connection\) got a Connection from pool 'other'"):
            wrong.execute("SELECT 1")
        assert app.extensions["proxypool"].pool("other").stats().in_use == 0  # given back at once, not bound
        with pytest.raises(UsageError, match="got a Connection"):  # every use says so, not only the first
            wrong.execute("SELECT 1")
    assert app.extensions["proxypool"].pool("other").stats().in_use == 0


def test_same_arguments_same_proxy() -> None:
    """proxy() hands out one object per (name, type); a non-class second argument is refused."""
    assert proxy("one", sqlite3.Connection) is proxy("one", sqlite3.Connection)
    assert proxy("one") is proxy("one")
    assert proxy("one") is not proxy("one", sqlite3.Connection)
    with pytest.raises(UsageError, match="must be a class"):
        proxy("one", "sqlite3.Connection")  # type: ignore[call-overload]
