"""Proxies: lazy per-context binding, forwarding, borrow, teardown, 503s (sqlite3 and factory kinds)."""

from __future__ import annotations

import re
import threading
import typing as t
from pathlib import Path

import pytest
from flask import Flask, abort

from flask_proxypool import PoolTimeout, ProxyPool, UsageError, db, proxy
from flask_proxypool.pool import Pool
from flask_proxypool.stats import PoolStats

MakeApp = t.Callable[..., Flask]

res = proxy("res")


class Thing:
    """A resource implementing the protocols a proxy forwards."""

    def __init__(self, label: str = "thing") -> None:
        self.label = label
        self.items = [1, 2, 3]
        self.entered = 0
        self.exited = 0

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> tuple[str, tuple[t.Any, ...], dict[str, t.Any]]:
        return (self.label, args, kwargs)

    def __enter__(self) -> Thing:
        self.entered += 1
        return self

    def __exit__(self, *exc: object) -> bool:
        self.exited += 1
        return False

    def __iter__(self) -> t.Iterator[int]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: object) -> bool:
        return item in self.items

    def __getitem__(self, index: int) -> int:
        return self.items[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.items[index] = value

    def __delitem__(self, index: int) -> None:
        del self.items[index]

    def __repr__(self) -> str:
        return f"<Thing {self.label}>"


def pool_of(app: Flask, name: str = "db") -> Pool[t.Any]:
    """The app's pool ``name``."""
    return app.extensions["proxypool"].pool(name)


def stats(app: Flask, name: str = "db") -> PoolStats:
    """A stats snapshot of the app's pool ``name``."""
    return pool_of(app, name).stats()


def sqlite_app(make_app: MakeApp, **config: t.Any) -> Flask:
    """An app with one sqlite3 pool 'db' in its instance folder."""
    return make_app({"db": {"database": "db.sqlite3"}}, **config)


def thing_app(make_app: MakeApp, **settings: t.Any) -> Flask:
    """An app with one factory pool 'res' making Things."""
    return make_app({"res": {"factory": Thing, **settings}})


# -- outside a context ------------------------------------------------------------


def test_attribute_outside_context_raises_usage_error() -> None:
    """Using the proxy with no app context says to use an app context or borrow()."""
    for use in (lambda: db.execute, lambda: db._get_current_object(), lambda: db(), lambda: len(db)):
        with pytest.raises(UsageError) as info:
            use()
        message = str(info.value)
        assert "app_context" in message
        assert "borrow" in message
        assert "'db'" in message


def test_setattr_outside_context_raises_usage_error() -> None:
    """Setting an attribute with no app context is a UsageError too."""
    with pytest.raises(UsageError, match="app_context"):
        db.row_factory = None


def test_repr_str_bool_dir_outside_context_take_nothing(make_app: MakeApp) -> None:
    """repr/str/bool/dir/== outside a context describe the proxy and take nothing."""
    app = sqlite_app(make_app)
    assert repr(db) == "<flask_proxypool proxy 'db' (unbound)>"
    assert str(db) == "<flask_proxypool proxy 'db' (unbound)>"
    assert bool(db) is False
    assert dir(db) == []
    assert (db == object()) is False
    assert db == db
    assert stats(app).checkouts == 0
    assert stats(app).size == 0


def test_repr_str_bool_dir_in_context_before_use_take_nothing(make_app: MakeApp) -> None:
    """repr/str/bool/dir inside a context but before first use take nothing."""
    app = sqlite_app(make_app)
    seen: list[t.Any] = []
    with app.app_context():
        seen += [repr(db), str(db), bool(db), dir(db), db == object()]
    with app.test_request_context("/"):
        seen += [repr(db), str(db), bool(db), dir(db), db == object()]
    not_taken = "<flask_proxypool proxy 'db' (not taken yet)>"
    assert seen == [not_taken, not_taken, True, [], False] * 2
    assert stats(app).checkouts == 0
    assert stats(app).size == 0


def test_request_not_touching_proxy_takes_nothing(make_app: MakeApp) -> None:
    """A request whose view never uses the proxy takes no resource."""
    app = sqlite_app(make_app)

    @app.get("/")
    def index() -> str:
        return "ok"

    assert app.test_client().get("/").status_code == 200
    st = stats(app)
    assert (st.checkouts, st.created, st.size) == (0, 0, 0)


# -- binding ----------------------------------------------------------------------


def test_first_access_takes_one_and_later_reuse_it(make_app: MakeApp) -> None:
    """The first use in a request takes one resource; later uses get the same one; teardown returns it."""
    app = sqlite_app(make_app)
    seen: dict[str, t.Any] = {}

    @app.get("/")
    def index() -> str:
        first = db._get_current_object()
        seen["row"] = db.execute("SELECT 1").fetchone()
        seen["second"] = db._get_current_object()
        seen["first"] = first
        seen["repr"] = repr(db)
        seen["str"] = str(db)
        seen["dir"] = "execute" in dir(db)
        seen["stats"] = stats(app)
        return "ok"

    assert app.test_client().get("/").status_code == 200
    assert seen["row"] == (1,)
    assert seen["first"] is seen["second"]
    assert seen["repr"] == repr(seen["first"])
    assert seen["str"] == str(seen["first"])
    assert seen["dir"] is True
    assert seen["stats"].in_use == 1
    assert seen["stats"].checkouts == 1
    after = stats(app)
    assert (after.in_use, after.idle, after.checkouts, after.created) == (0, 1, 1, 1)


def test_app_context_returns_at_teardown(make_app: MakeApp) -> None:
    """A resource taken in a plain app context goes back when the context ends."""
    app = sqlite_app(make_app)
    with app.app_context():
        conn = db._get_current_object()
        assert db._get_current_object() is conn
        assert stats(app).in_use == 1
    after = stats(app)
    assert (after.in_use, after.idle, after.checkouts) == (0, 1, 1)


def test_concurrent_requests_get_different_resources(make_app: MakeApp) -> None:
    """Two requests in flight at once hold two different resources."""
    app = sqlite_app(make_app)
    barrier = threading.Barrier(2, timeout=10)
    held: list[t.Any] = []
    statuses: list[int] = []

    @app.get("/")
    def index() -> str:
        held.append(db._get_current_object())
        barrier.wait()  # both requests hold their resource here
        return "ok"

    def client() -> None:
        statuses.append(app.test_client().get("/").status_code)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads)
    assert statuses == [200, 200]
    assert len(held) == 2
    assert held[0] is not held[1]
    after = stats(app)
    assert (after.in_use, after.idle, after.checkouts) == (0, 2, 2)


def test_nested_app_context_inside_request(make_app: MakeApp) -> None:
    """A nested app context inside a request works, leaves the request's resource bound, and nothing leaks."""
    app = sqlite_app(make_app)
    seen: dict[str, t.Any] = {}

    @app.get("/")
    def index() -> str:
        outer = db._get_current_object()
        with app.app_context():
            seen["inner"] = db._get_current_object()
            seen["inner_again"] = db._get_current_object()
            seen["inner_row"] = db.execute("SELECT 2").fetchone()
        seen["after_nested"] = stats(app)
        seen["after"] = db._get_current_object()
        seen["after_row"] = db.execute("SELECT 3").fetchone()
        seen["outer"] = outer
        return "ok"

    assert app.test_client().get("/").status_code == 200
    assert seen["inner_again"] is seen["inner"]
    assert seen["after"] is seen["outer"]
    assert (seen["inner_row"], seen["after_row"]) == ((2,), (3,))
    assert seen["after_nested"].in_use == 1
    after = stats(app)
    assert (after.in_use, after.closed) == (0, 0)
    assert after.idle == after.created


def test_request_inside_outer_app_context(make_app: MakeApp) -> None:
    """A request run inside an outer app context returns what it took; the outer context keeps its own."""
    app = sqlite_app(make_app)

    @app.get("/")
    def index() -> str:
        return str(db.execute("SELECT 5").fetchone()[0])

    app_ctx_stats: list[PoolStats] = []
    with app.app_context():
        outer = db._get_current_object()
        text = app.test_client().get("/").text
        app_ctx_stats.append(stats(app))
        still = db._get_current_object()
    assert text == "5"
    assert still is outer
    assert app_ctx_stats[0].in_use == 1
    after = stats(app)
    assert (after.in_use, after.closed) == (0, 0)


# -- forwarding -------------------------------------------------------------------


def test_forwards_call_with_iter_len_contains_index(make_app: MakeApp) -> None:
    """Calls, with, iteration, len, in and indexing reach the real object."""
    app = thing_app(make_app)
    with app.app_context():
        real = res._get_current_object()
        called = res(1, k=2)
        with res as entered:
            inside = (real.entered, real.exited)
        listed = list(res)
        length = len(res)
        contains = (2 in res, 9 in res)
        item = res[1]
        res[0] = 10
        del res[2]
        items = list(real.items)
    assert called == ("thing", (1,), {"k": 2})
    assert entered is real
    assert inside == (1, 0)
    assert (real.entered, real.exited) == (1, 1)
    assert listed == [1, 2, 3]
    assert length == 3
    assert contains == (True, False)
    assert item == 2
    assert items == [10, 2]
    assert stats(app, "res").checkouts == 1


def test_equality_and_attributes_forwarded(make_app: MakeApp) -> None:
    """A bound proxy equals its real object; setattr/getattr/delattr reach it."""
    app = thing_app(make_app)
    with app.app_context():
        real = res._get_current_object()
        eq = (res == real, real == res, res != real, res == Thing("other"), res != Thing("other"))
        res.color = "blue"
        color = (real.color, res.color)
        del res.color
        has_color = hasattr(real, "color")
        label = res.label
        text = (repr(res), str(res))
    assert eq == (True, True, False, False, True)
    assert color == ("blue", "blue")
    assert has_color is False
    assert label == "thing"
    assert text == ("<Thing thing>", "<Thing thing>")


def test_missing_attribute_is_attribute_error(make_app: MakeApp) -> None:
    """A missing attribute of the real object is an AttributeError, as without the proxy."""
    app = thing_app(make_app)
    with app.app_context(), pytest.raises(AttributeError, match="no_such"):
        res.no_such  # noqa: B018


# -- misuse -------------------------------------------------------------------------


def test_unknown_pool_name_lists_configured_pools(make_app: MakeApp) -> None:
    """A proxy for a pool the app does not have says which pools it has."""
    app = make_app({"db": {}, "cache": {"factory": Thing}})
    message = (
        f"flask_proxypool: no pool named 'nope' on app {app.name!r}; configured pools: cache, db. "
        "Add it to PROXYPOOL_POOLS or use one of those names."
    )
    with app.app_context(), pytest.raises(UsageError, match=re.escape(message)):
        proxy("nope").anything  # noqa: B018


def test_app_without_extension(tmp_path: Path) -> None:
    """An app without ProxyPool says to call ProxyPool(app)."""
    app = Flask("plain", instance_path=str(tmp_path))
    with app.app_context(), pytest.raises(UsageError, match=re.escape("call ProxyPool(app)")):
        db.execute  # noqa: B018


def test_proxy_is_one_object_per_name() -> None:
    """proxy(name) always returns the same object; db is proxy('db')."""
    assert proxy("x") is proxy("x")
    assert proxy("db") is db
    assert proxy("x") is not proxy("y")


def test_proxy_name_must_be_identifier() -> None:
    """A pool name that is not an identifier is refused."""
    with pytest.raises(UsageError, match="must be an identifier"):
        proxy("not-a-name")


# -- borrow -------------------------------------------------------------------------


def test_borrow_with_app_outside_context(make_app: MakeApp) -> None:
    """borrow(app) gives a resource for the block, returned at its end."""
    app = sqlite_app(make_app)
    with db.borrow(app) as conn:
        row = conn.execute("SELECT 1").fetchone()
        during = stats(app)
    assert row == (1,)
    assert during.in_use == 1
    after = stats(app)
    assert (after.in_use, after.idle) == (0, 1)


def test_borrow_returns_when_block_raises(make_app: MakeApp) -> None:
    """borrow() returns the resource when the block raises, and the exception propagates."""
    app = sqlite_app(make_app)
    with pytest.raises(ZeroDivisionError), db.borrow(app) as conn:
        conn.execute("SELECT 1")
        1 / 0  # noqa: B018
    after = stats(app)
    assert (after.in_use, after.idle, after.checkouts) == (0, 1, 1)


def test_borrow_without_app_outside_context(make_app: MakeApp) -> None:
    """borrow() with no app and no app context is a UsageError saying to pass one."""
    app = sqlite_app(make_app)
    with pytest.raises(UsageError, match=re.escape("with db.borrow(app) as conn:")), db.borrow():
        pass
    assert stats(app).checkouts == 0


def test_borrow_in_context_is_separate_from_bound(make_app: MakeApp) -> None:
    """borrow() inside a context uses the current app and is independent of the bound resource."""
    app = sqlite_app(make_app)
    with app.app_context():
        bound = db._get_current_object()
        with db.borrow() as borrowed:
            during = stats(app).in_use
        after_block = stats(app).in_use
        still = db._get_current_object()
    assert borrowed is not bound
    assert still is bound
    assert (during, after_block) == (2, 1)
    assert stats(app).in_use == 0


# -- several apps ----------------------------------------------------------------------


def test_two_apps_each_use_their_own_pool(make_app: MakeApp) -> None:
    """db inside app A's context is A's resource, inside B's is B's; stats are separate."""
    app_a = make_app({"db": {"factory": lambda: Thing("A")}})
    app_b = make_app({"db": {"factory": lambda: Thing("B")}})
    with app_a.app_context():
        label_a = db.label
    with app_b.app_context():
        label_b = db.label
    with app_a.app_context():
        label_a2 = db.label
    assert (label_a, label_b, label_a2) == ("A", "B", "A")
    assert (stats(app_a).checkouts, stats(app_b).checkouts) == (2, 1)
    assert (stats(app_a).created, stats(app_b).created) == (1, 1)
    assert pool_of(app_a) is not pool_of(app_b)


def test_two_apps_in_requests(make_app: MakeApp) -> None:
    """Requests to two apps get each app's own resource."""
    app_a = make_app({"db": {"factory": lambda: Thing("A")}})
    app_b = make_app({"db": {"factory": lambda: Thing("B")}})
    for app in (app_a, app_b):
        app.add_url_rule("/", "index", lambda: db.label)
    assert app_a.test_client().get("/").text == "A"
    assert app_b.test_client().get("/").text == "B"
    assert (stats(app_a).in_use, stats(app_b).in_use) == (0, 0)


def test_other_app_context_nested_in_request_uses_other_app(make_app: MakeApp) -> None:
    """Inside app A's request, 'with app_b.app_context():' gives B's resource."""
    app_a = make_app({"db": {"factory": lambda: Thing("A")}})
    app_b = make_app({"db": {"factory": lambda: Thing("B")}})

    @app_a.get("/")
    def index() -> str:
        with app_b.app_context():
            return str(db.label)

    assert app_a.test_client().get("/").text == "B"


# -- teardown on errors ------------------------------------------------------------------


def test_exception_in_view_returns_resource(make_app: MakeApp) -> None:
    """A view that raises after using the proxy gives a 500, and the resource goes back."""
    app = sqlite_app(make_app)

    @app.get("/")
    def index() -> str:
        db.execute("SELECT 1")
        raise RuntimeError("boom")

    assert app.test_client().get("/").status_code == 500
    after = stats(app)
    assert (after.in_use, after.idle, after.checkouts) == (0, 1, 1)


def test_abort_returns_resource(make_app: MakeApp) -> None:
    """abort(404) after using the proxy gives a 404, and the resource goes back."""
    app = sqlite_app(make_app)

    @app.get("/")
    def index() -> str:
        db.execute("SELECT 1")
        abort(404)

    assert app.test_client().get("/").status_code == 404
    after = stats(app)
    assert (after.in_use, after.idle, after.checkouts) == (0, 1, 1)


# -- exhaustion ----------------------------------------------------------------------------


def test_exhausted_pool_gives_503_with_retry_after(make_app: MakeApp) -> None:
    """A request that times out waiting gets a 503 naming the pool, with Retry-After."""
    app = make_app({"db": {"factory": Thing, "max_size": 1, "timeout": 0.05}}, PROXYPOOL_RETRY_AFTER=7)

    @app.get("/")
    def index() -> str:
        return str(db.label)

    pool = pool_of(app)
    held = pool.getconn()
    try:
        response = app.test_client().get("/")
    finally:
        pool.putconn(held)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.json == {
        "error": "service unavailable",
        "pool": "db",
        "detail": "timed out waiting for a resource",
        "retry_after": 7,
    }
    after = stats(app)
    assert (after.timeouts, after.in_use, after.idle) == (1, 0, 1)
    assert app.test_client().get("/").text == "thing"


def test_own_pool_timeout_handler_is_kept(tmp_path: Path) -> None:
    """A PoolTimeout handler registered before init_app is used instead of the built-in 503."""
    app = Flask("own_handler", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"factory": Thing, "max_size": 1, "timeout": 0.05}}
    caught: list[PoolTimeout] = []

    @app.errorhandler(PoolTimeout)
    def busy(e: PoolTimeout) -> tuple[str, int]:
        caught.append(e)
        return "busy, try later", 429

    @app.get("/")
    def index() -> str:
        return str(db.label)

    ProxyPool(app)
    pool = pool_of(app)
    try:
        held = pool.getconn()
        try:
            response = app.test_client().get("/")
        finally:
            pool.putconn(held)
    finally:
        app.extensions["proxypool"].close(timeout=1.0)
    assert response.status_code == 429
    assert response.text == "busy, try later"
    assert "Retry-After" not in response.headers
    assert len(caught) == 1
    assert caught[0].pool == "db"


# -- teardown handlers of the app's own -------------------------------------------------------


@pytest.fixture
def unregistered_app(tmp_path: Path) -> t.Iterator[Flask]:
    """An app with a factory pool 'db' configured but ProxyPool not yet registered; pools closed at the end."""
    app = Flask("unregistered", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"factory": Thing}}
    app.add_url_rule("/", "index", lambda: "ok")
    yield app
    state = app.extensions.get("proxypool")
    if state is not None:
        state.close(timeout=0)


def test_teardown_request_registered_after_init_app_returns(unregistered_app: Flask) -> None:
    """A teardown_request function registered after ProxyPool(app) may use the proxy; it is still returned."""
    app = unregistered_app
    used: list[str] = []
    ProxyPool(app)
    app.teardown_request(lambda exc: used.append(db.label))
    assert app.test_client().get("/").status_code == 200
    assert used == ["thing"]
    after = stats(app)
    assert (after.in_use, after.checkouts) == (0, 1)


def test_teardown_request_registered_before_init_app_returns(unregistered_app: Flask) -> None:
    """A teardown_request function registered before ProxyPool(app) that uses the proxy does not leak."""
    app = unregistered_app
    used: list[str] = []
    app.teardown_request(lambda exc: used.append(db.label))
    ProxyPool(app)
    assert app.test_client().get("/").status_code == 200
    assert used == ["thing"]
    assert stats(app).in_use == 0


def test_teardown_appcontext_registered_before_init_app_returns(unregistered_app: Flask) -> None:
    """A teardown_appcontext function registered before ProxyPool(app) that uses the proxy does not leak."""
    app = unregistered_app
    used: list[str] = []
    app.teardown_appcontext(lambda exc: used.append(db.label))
    ProxyPool(app)
    with app.app_context():
        pass
    assert used == ["thing"]
    assert stats(app).in_use == 0


def test_swap_puts_another_pool_in_place(tmp_path: t.Any) -> None:
    """AppPools.swap(): later takes use the new pool; the old one is returned untouched; unknown names refused."""
    from flask import Flask

    from flask_proxypool import Pool, ProxyPool, UsageError, db
    from flask_proxypool.kinds.sqlite3 import Sqlite3Kind

    app = Flask("swap", instance_path=str(tmp_path))
    app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3"}}
    ProxyPool(app)
    state = app.extensions["proxypool"]
    assert state.made("db") is None
    other: Pool[t.Any] = Pool(Sqlite3Kind(str(tmp_path / "other.sqlite3")), name="other")
    try:
        assert state.swap("db", other) is None
        with app.app_context():
            db.execute("SELECT 1")
        assert other.stats().checkouts == 1
        assert state.swap("db", None) is other and state.made("db") is None
        with pytest.raises(UsageError, match="no pool named 'nope'"):
            state.swap("nope", other)
    finally:
        other.close()
        state.close()
