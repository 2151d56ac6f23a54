"""The sqlite3 and factory kinds, driven through Flask requests."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import typing as t

import pytest
from flask import Flask, abort

from flask_proxypool import db, proxy
from flask_proxypool.pool import Pool
from flask_proxypool.stats import PoolStats

MakeApp = t.Callable[..., Flask]

res = proxy("res")


# -- helpers for the factory kind (importable as 'test_kinds:...') ----------------------


class Res:
    """A factory-made resource that logs which hook ran, and through which form."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.alive_result = True
        self.check_result = True
        self.reset_result = True
        self.commit_error: Exception | None = None

    def shutdown(self) -> None:
        self.log.append("close:method")

    def verify(self) -> bool:
        self.log.append("check:method")
        return self.check_result

    def cleanup(self) -> bool:
        self.log.append("reset:method")
        return self.reset_result

    def save(self) -> None:
        self.log.append("commit:method")
        if self.commit_error is not None:
            raise self.commit_error

    def ping(self) -> bool:
        self.log.append("alive:method")
        return self.alive_result


def hook_close(r: Res) -> None:
    """close hook as a function."""
    r.log.append("close:func")


def hook_check(r: Res) -> bool:
    """check hook as a function."""
    r.log.append("check:func")
    return r.check_result


def hook_reset(r: Res) -> bool:
    """reset hook as a function."""
    r.log.append("reset:func")
    return r.reset_result


def hook_commit(r: Res) -> None:
    """commit hook as a function."""
    r.log.append("commit:func")
    if r.commit_error is not None:
        raise r.commit_error


def hook_alive(r: Res) -> bool:
    """alive hook as a function."""
    r.log.append("alive:func")
    return r.alive_result


HOOK_FUNCS: dict[str, t.Callable[[Res], t.Any]] = {
    "close": hook_close,
    "check": hook_check,
    "reset": hook_reset,
    "commit": hook_commit,
    "alive": hook_alive,
}
METHODS = {"close": "shutdown", "check": "verify", "reset": "cleanup", "commit": "save", "alive": "ping"}
FORMS = ("callable", "method", "string")
VIA = {"callable": "func", "method": "method", "string": "func"}


def hook(event: str, form: str) -> t.Any:
    """The hook for ``event`` in the given form: a callable, a method name or a 'module:attr' string."""
    if form == "callable":
        return HOOK_FUNCS[event]
    if form == "method":
        return METHODS[event]
    return f"test_kinds:hook_{event}"


class Made:
    """A factory that remembers every resource it made."""

    def __init__(self) -> None:
        self.items: list[Res] = []

    def __call__(self) -> Res:
        r = Res()
        self.items.append(r)
        return r


def pool_of(app: Flask, name: str = "res") -> Pool[t.Any]:
    """The app's pool ``name``."""
    return app.extensions["proxypool"].pool(name)


def stats(app: Flask, name: str = "res") -> PoolStats:
    """A stats snapshot of the app's pool ``name``."""
    return pool_of(app, name).stats()


def factory_app(make_app: MakeApp, made: Made, **settings: t.Any) -> Flask:
    """An app whose pool 'res' is a factory pool of Res, with '/' using it and '/fail' raising after using it."""
    app = make_app({"res": {"factory": made, **settings}})

    @app.get("/")
    def index() -> str:
        return type(res._get_current_object()).__name__

    @app.get("/fail")
    def fail() -> str:
        res._get_current_object()
        raise RuntimeError("view failed")

    return app


# -- sqlite3 -------------------------------------------------------------------------------


def sqlite_app(make_app: MakeApp, **settings: t.Any) -> Flask:
    """An app with a sqlite3 pool 'db' holding table t(x), and views that insert without committing."""
    app = make_app({"db": {"database": "kinds.sqlite3", **settings}})
    with db.borrow(app) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.commit()

    @app.get("/insert")
    def insert() -> str:
        db.execute("INSERT INTO t VALUES (1)")
        return "inserted"

    @app.get("/insert-then-raise")
    def insert_then_raise() -> str:
        db.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("after the insert")

    @app.get("/insert-then-status/<int:code>")
    def insert_then_status(code: int) -> tuple[str, int]:
        db.execute("INSERT INTO t VALUES (1)")
        return "status", code

    @app.get("/insert-then-abort")
    def insert_then_abort() -> str:
        db.execute("INSERT INTO t VALUES (1)")
        abort(409)

    return app


def rows_seen_elsewhere(app: Flask) -> int:
    """Rows of t seen by a connection outside the pool."""
    path = app.extensions["proxypool"].configs["db"].kind_options["database"]
    with contextlib.closing(sqlite3.connect(path)) as other:
        return int(other.execute("SELECT count(*) FROM t").fetchone()[0])


def test_sqlite_rollback_by_default(make_app: MakeApp) -> None:
    """An insert not committed by the view is rolled back at teardown; another connection sees nothing."""
    app = sqlite_app(make_app)
    assert app.test_client().get("/insert").status_code == 200
    assert rows_seen_elsewhere(app) == 0
    with db.borrow(app) as conn:
        in_transaction = conn.in_transaction
        count = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    assert (in_transaction, count) == (False, 0)
    assert stats(app, "db").in_use == 0


def test_sqlite_commit_when_view_succeeds(make_app: MakeApp) -> None:
    """With on_return 'commit', a successful request's work is committed."""
    app = sqlite_app(make_app, on_return="commit")
    client = app.test_client()
    assert client.get("/insert").status_code == 200
    assert client.get("/insert-then-status/201").status_code == 201
    assert rows_seen_elsewhere(app) == 2


def test_sqlite_commit_rolled_back_when_view_raises(make_app: MakeApp) -> None:
    """With on_return 'commit', a view that raises has its work rolled back."""
    app = sqlite_app(make_app, on_return="commit")
    assert app.test_client().get("/insert-then-raise").status_code == 500
    assert rows_seen_elsewhere(app) == 0
    assert stats(app, "db").in_use == 0


@pytest.mark.parametrize("code", [400, 404, 409, 500, 503])
def test_sqlite_commit_rolled_back_on_error_status(make_app: MakeApp, code: int) -> None:
    """With on_return 'commit', a 4xx/5xx response has its work rolled back."""
    app = sqlite_app(make_app, on_return="commit")
    assert app.test_client().get(f"/insert-then-status/{code}").status_code == code
    assert rows_seen_elsewhere(app) == 0


def test_sqlite_commit_rolled_back_on_abort(make_app: MakeApp) -> None:
    """With on_return 'commit', abort(409) has its work rolled back."""
    app = sqlite_app(make_app, on_return="commit")
    assert app.test_client().get("/insert-then-abort").status_code == 409
    assert rows_seen_elsewhere(app) == 0
    assert stats(app, "db").in_use == 0


def test_sqlite_borrow_commit_policy(make_app: MakeApp) -> None:
    """borrow() under on_return 'commit' commits a block that exits normally, not one that raises."""
    app = sqlite_app(make_app, on_return="commit")
    with db.borrow(app) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(KeyError), db.borrow(app) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        raise KeyError("x")
    assert rows_seen_elsewhere(app) == 1


def test_sqlite_connection_usable_from_another_thread(make_app: MakeApp) -> None:
    """check_same_thread is off: a pooled connection taken here works from another thread."""
    app = sqlite_app(make_app)
    results: list[t.Any] = []
    errors: list[BaseException] = []
    with app.app_context():
        conn = db._get_current_object()

        def use() -> None:
            try:
                results.append(conn.execute("SELECT 41 + 1").fetchone())
            except BaseException as e:  # reported to the main thread
                errors.append(e)

        th = threading.Thread(target=use)
        th.start()
        th.join(10)
    assert not th.is_alive()
    assert errors == []
    assert results == [(42,)]
    assert stats(app, "db").in_use == 0


def test_sqlite_returned_connection_used_by_next_request_in_other_thread(make_app: MakeApp) -> None:
    """A connection made in one thread serves a later request in another thread."""
    app = sqlite_app(make_app, max_size=1)
    statuses: list[int] = []

    def request() -> None:
        statuses.append(app.test_client().get("/insert").status_code)

    for _ in range(2):
        th = threading.Thread(target=request)
        th.start()
        th.join(10)
    assert statuses == [200, 200]
    after = stats(app, "db")
    assert (after.created, after.checkouts, after.closed) == (1, 3, 0)


# -- factory hooks -------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_factory_close_hook(make_app: MakeApp, form: str) -> None:
    """The close hook runs when a resource is closed (here: max_use reached)."""
    made = Made()
    app = factory_app(make_app, made, close=hook("close", form), max_use=1)
    assert app.test_client().get("/").text == "Res"
    assert made.items[0].log == [f"close:{VIA[form]}"]
    assert stats(app).closed_by_reason == {"max_use": 1}


@pytest.mark.parametrize("form", FORMS)
def test_factory_close_hook_at_pool_close(make_app: MakeApp, form: str) -> None:
    """The close hook runs on idle resources when the pool closes."""
    made = Made()
    app = factory_app(make_app, made, close=hook("close", form))
    app.test_client().get("/")
    app.extensions["proxypool"].close(timeout=1.0)
    assert made.items[0].log == [f"close:{VIA[form]}"]


@pytest.mark.parametrize("form", FORMS)
def test_factory_check_hook(make_app: MakeApp, form: str) -> None:
    """The check hook runs on checkout of an idle resource under liveness 'query'."""
    made = Made()
    app = factory_app(make_app, made, check=hook("check", form), liveness="query", liveness_after=0)
    client = app.test_client()
    client.get("/")
    client.get("/")
    assert len(made.items) == 1
    assert made.items[0].log == [f"check:{VIA[form]}"]


@pytest.mark.parametrize("form", FORMS)
def test_factory_check_hook_false_discards(make_app: MakeApp, form: str) -> None:
    """A check returning False discards the resource as broken, and a new one is made."""
    made = Made()
    app = factory_app(
        make_app, made, check=hook("check", form), close=hook("close", form), liveness="query", liveness_after=0
    )
    client = app.test_client()
    client.get("/")
    made.items[0].check_result = False
    assert client.get("/").status_code == 200
    via = VIA[form]
    assert made.items[0].log == [f"check:{via}", f"close:{via}"]
    assert len(made.items) == 2
    assert stats(app).closed_by_reason == {"broken": 1}


@pytest.mark.parametrize("form", FORMS)
def test_factory_reset_hook(make_app: MakeApp, form: str) -> None:
    """The reset hook runs on every return."""
    made = Made()
    app = factory_app(make_app, made, reset=hook("reset", form))
    client = app.test_client()
    client.get("/")
    client.get("/fail")
    via = VIA[form]
    assert made.items[0].log == [f"reset:{via}", f"reset:{via}"]
    assert stats(app).in_use == 0


@pytest.mark.parametrize("form", FORMS)
def test_factory_reset_false_discards(make_app: MakeApp, form: str) -> None:
    """reset returning False discards the resource as broken (closed, not kept idle)."""
    made = Made()
    app = factory_app(make_app, made, reset=hook("reset", form), close=hook("close", form))
    client = app.test_client()
    client.get("/")
    made.items[0].reset_result = False
    client.get("/")
    via = VIA[form]
    assert made.items[0].log == [f"reset:{via}", f"reset:{via}", f"close:{via}"]
    after = stats(app)
    assert after.closed_by_reason == {"broken": 1}
    assert (after.size, after.idle, after.in_use) == (0, 0, 0)
    client.get("/")
    assert len(made.items) == 2


@pytest.mark.parametrize("form", FORMS)
def test_factory_commit_hook(make_app: MakeApp, form: str) -> None:
    """Under on_return 'commit', the commit hook runs before reset when the request succeeds, never when it fails."""
    made = Made()
    app = factory_app(make_app, made, commit=hook("commit", form), reset=hook("reset", form), on_return="commit")
    client = app.test_client()
    assert client.get("/").status_code == 200
    assert client.get("/fail").status_code == 500
    via = VIA[form]
    assert made.items[0].log == [f"commit:{via}", f"reset:{via}", f"reset:{via}"]


@pytest.mark.parametrize("form", FORMS)
def test_factory_commit_hook_not_run_under_rollback(make_app: MakeApp, form: str) -> None:
    """Under the default on_return 'rollback', the commit hook never runs."""
    made = Made()
    app = factory_app(make_app, made, commit=hook("commit", form))
    assert app.test_client().get("/").status_code == 200
    assert made.items[0].log == []


def test_factory_commit_failure_is_500(make_app: MakeApp) -> None:
    """A commit hook that raises makes the request a 500, and the resource is still reset and returned."""
    made = Made()
    app = factory_app(make_app, made, commit="save", reset="cleanup", on_return="commit")
    client = app.test_client()
    client.get("/")
    made.items[0].commit_error = OSError("disk full")
    made.items[0].log.clear()
    assert client.get("/").status_code == 500
    assert made.items[0].log == ["commit:method", "reset:method"]
    assert stats(app).in_use == 0


@pytest.mark.parametrize("form", FORMS)
def test_factory_alive_hook(make_app: MakeApp, form: str) -> None:
    """The alive hook runs on checkout of an idle resource (liveness 'poll', the default)."""
    made = Made()
    app = factory_app(make_app, made, alive=hook("alive", form), liveness_after=0)
    client = app.test_client()
    client.get("/")
    assert made.items[0].log == []
    client.get("/")
    assert made.items[0].log == [f"alive:{VIA[form]}"]
    assert len(made.items) == 1


@pytest.mark.parametrize("form", FORMS)
def test_factory_alive_false_discards(make_app: MakeApp, form: str) -> None:
    """alive returning False discards the idle resource as broken, and a new one is made."""
    made = Made()
    app = factory_app(make_app, made, alive=hook("alive", form), liveness_after=0)
    client = app.test_client()
    client.get("/")
    made.items[0].alive_result = False
    assert client.get("/").status_code == 200
    assert len(made.items) == 2
    assert stats(app).closed_by_reason == {"broken": 1}


def test_factory_alive_not_run_under_liveness_none(make_app: MakeApp) -> None:
    """liveness 'none' skips the alive hook."""
    made = Made()
    app = factory_app(make_app, made, alive="ping", liveness="none")
    client = app.test_client()
    client.get("/")
    client.get("/")
    assert made.items[0].log == []


def test_factory_given_as_module_attr_string(make_app: MakeApp) -> None:
    """The factory itself may be a 'module:attr' string."""
    app = make_app({"res": {"factory": "test_kinds:Res"}})

    @app.get("/")
    def index() -> str:
        return type(res._get_current_object()).__name__

    assert app.test_client().get("/").text == "Res"
    assert stats(app).created == 1


# -- a factory that fails ----------------------------------------------------------------------


def failing_factory() -> Res:
    """A factory whose backing service is down."""
    raise ConnectionRefusedError("service down")


def test_factory_raising_gives_503_with_retry_after(make_app: MakeApp) -> None:
    """A factory that raises makes the request a 503 (ConnectFailed) with Retry-After."""
    app = make_app({"res": {"factory": failing_factory}}, PROXYPOOL_RETRY_AFTER=3)

    @app.get("/")
    def index() -> str:
        return str(res.log)

    response = app.test_client().get("/")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert response.json == {
        "error": "service unavailable",
        "pool": "res",
        "detail": "the backing service is unavailable",
        "retry_after": 3,
    }
    after = stats(app)
    assert (after.connect_failures, after.size, after.in_use) == (1, 0, 0)


def test_sqlite_release_at_commit(make_app: MakeApp) -> None:
    """release='commit' with sqlite3: the connection goes back at commit and a later read takes one again."""
    app = make_app({"db": {"kind": "sqlite3", "database": "r.sqlite3", "max_size": 1, "release": "commit"}})
    seen: list[int] = []

    @app.post("/")
    def index() -> str:
        db.execute("CREATE TABLE IF NOT EXISTS t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.commit()
        seen.append(app.extensions["proxypool"].pool("db").stats().in_use)
        return str(db.execute("SELECT count(*) FROM t").fetchone()[0])

    assert app.test_client().post("/").text == "1"
    st = app.extensions["proxypool"].pool("db").stats()
    assert seen == [0] and (st.checkouts, st.in_use) == (2, 0)
