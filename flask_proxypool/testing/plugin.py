"""The pytest plugin: ini options, markers, fixtures and the hooks that end each test clean.

Loaded by pytest through the `pytest11` entry point `flask_proxypool`
(this module); nothing to import. It expects an `app` fixture returning
your Flask app (the pytest-flask convention).

Fixtures: `proxypool_transaction` (the app's psycopg and sqlite3 pools in
a transaction rolled back after the test; gives a `ProxyPoolTransaction`)
and `proxypool_leak_check` (fail the test if it leaves a resource checked
out; gives `assert_all_returned` bound to the app). Markers:
`@pytest.mark.proxypool_transaction` (optionally with pool names) and
`@pytest.mark.proxypool_no_leaks`. ini options:
`proxypool_transaction_pools = db other` and `proxypool_leak_check = true`.

Whatever a test uses, the plugin keeps nothing of it: apps registered during
the test (its body, its function-scoped fixtures) have their pools closed
once its teardown is over; apps made by a broader-scoped fixture, once that
fixture is finalized. A resource still out then is waited for briefly, taken
back, closed and reported (in the terminal summary, or as a failure of the
test under the leak check).
"""

from __future__ import annotations

import dataclasses
import typing as t
import weakref
from collections.abc import Iterator

import pytest
from flask import Flask

from ..state import AppPools, app_state, registrations
from . import held
from .leaks import HINT, assert_all_returned, call_leaks, close_made, count
from .records import Watch, start_watch
from .transaction import KINDS, ProxyPoolTransaction

__all__ = ["proxypool_leak_check", "proxypool_transaction"]

_ITEM_WATCHES = pytest.StashKey[list[Watch]]()
_ITEM_TRANSACTIONS = pytest.StashKey[list[ProxyPoolTransaction]]()
#: the app registrations alive when the test's setup began
_ITEM_BEFORE = pytest.StashKey["weakref.WeakSet[AppPools]"]()


@dataclasses.dataclass
class _SessionState:
    """Per pytest session (`config.stash`): which fixture made which app, and what to report at the end."""

    #: registrations made while a fixture of a broader scope than "function" was set up; they are
    #: that fixture's, closed when it is finalized, not at the end of the test that set it up
    scoped: weakref.WeakSet[AppPools] = dataclasses.field(default_factory=weakref.WeakSet)
    by_fixture: dict[t.Any, weakref.WeakSet[AppPools]] = dataclasses.field(default_factory=dict)
    #: (test id or fixture, lines): pools closed with resources still out, for the terminal summary
    reports: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)


_STATE = pytest.StashKey[_SessionState]()
_STOP_HELD = pytest.StashKey[t.Callable[[], None]]()
_V = t.TypeVar("_V")


def _pop(stash: pytest.Stash, key: pytest.StashKey[_V]) -> _V | None:
    value = stash.get(key, None)
    if key in stash:
        del stash[key]
    return value


def _state(config: pytest.Config) -> _SessionState:
    return config.stash.setdefault(_STATE, _SessionState())


def _made_since(before: weakref.WeakSet[AppPools], state: _SessionState) -> list[AppPools]:
    """Registrations alive now that were not in `before` and that no broader fixture claimed."""
    return [r for r in registrations() if r not in before and r not in state.scoped]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "proxypool_transaction_pools",
        "flask_proxypool: the pools proxypool_transaction runs in a test transaction "
        "(default: every psycopg and sqlite3 pool of the app)",
        type="args",
        default=[],
    )
    parser.addini(
        "proxypool_leak_check",
        "flask_proxypool: fail every test using the 'app' fixture that leaves a pooled resource checked out",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "proxypool_transaction(*pools): run the app's pools (or these) in a transaction rolled back after the test",
    )
    config.addinivalue_line(
        "markers", "proxypool_no_leaks: fail the test if it leaves a flask_proxypool resource checked out"
    )
    config.stash[_STOP_HELD] = held.start()  # which contexts hold what: not a leak until they end


def pytest_unconfigure(config: pytest.Config) -> None:
    stop = config.stash.get(_STOP_HELD, None)
    if stop is not None:
        stop()


def _selected(request: pytest.FixtureRequest, app: Flask) -> list[str]:
    marker = request.node.get_closest_marker("proxypool_transaction")
    names = list(marker.args) if marker is not None and marker.args else []
    if not names:
        names = list(request.config.getini("proxypool_transaction_pools"))
    if not names:
        names = [n for n, c in app_state(app).configs.items() if c.kind in KINDS]
    return names


@pytest.fixture
def proxypool_transaction(request: pytest.FixtureRequest, app: Flask) -> Iterator[ProxyPoolTransaction]:
    """Run `app`'s psycopg and sqlite3 pools in one transaction per pool, rolled back after the test.

    Commits made by the code under test are kept until the end of the test
    (as savepoints) and then rolled back with the rest, so the database is
    unchanged. Pools: the marker's arguments, else the
    `proxypool_transaction_pools` ini option, else every psycopg and
    sqlite3 pool of the app.
    """
    tx = ProxyPoolTransaction(app, _selected(request, app))
    request.node.stash.setdefault(_ITEM_TRANSACTIONS, []).append(tx)
    yield tx
    tx.finish()


@pytest.fixture
def proxypool_leak_check(request: pytest.FixtureRequest, app: Flask) -> t.Callable[[], None]:
    """Fail the test if it leaves a resource of `app`'s pools checked out.

    A resource the test function took and still holds when it returns (and
    that no pushed app context will give back) fails the test itself; one
    still out after every fixture was torn down is an error at teardown.
    Gives `assert_all_returned` bound to `app`, to check mid-test.
    """
    watch = start_watch(app)
    request.node.stash.setdefault(_ITEM_WATCHES, []).append(watch)
    return lambda: assert_all_returned(app)


@pytest.fixture(autouse=True)
def _proxypool_markers(request: pytest.FixtureRequest) -> None:
    """Turn the markers and the ini option into fixture uses."""
    node = request.node
    leaks = node.get_closest_marker("proxypool_no_leaks") is not None
    tx = node.get_closest_marker("proxypool_transaction") is not None
    if not (leaks or tx or request.config.getini("proxypool_leak_check")):
        return
    if "app" not in request.fixturenames:
        if leaks or tx:
            pytest.fail("flask_proxypool markers need an 'app' fixture giving the Flask app", pytrace=False)
        return
    if leaks or request.config.getini("proxypool_leak_check"):
        request.getfixturevalue("proxypool_leak_check")
    if tx:
        request.getfixturevalue("proxypool_transaction")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> t.Iterator[None]:
    watches = item.stash.get(_ITEM_WATCHES, [])
    for w in watches:
        w.phase = "call"
    try:
        result = yield
    except BaseException:
        for w in watches:  # failed or skipped: no leak report on top of that
            w.phase, w.reported = "teardown", True
        raise
    for w in watches:
        w.phase = "teardown"
    for w in watches:
        msg = call_leaks(w)
        if msg is not None:
            w.reported = True
            pytest.fail(msg, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> t.Iterator[None]:
    """Note the apps alive before the test's fixtures run: those made after are the test's."""
    item.stash[_ITEM_BEFORE] = weakref.WeakSet(registrations())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[t.Any], request: pytest.FixtureRequest) -> t.Iterator[t.Any]:
    """Apps made by a fixture of a broader scope belong to it: closed when it is finalized."""
    if fixturedef.scope == "function":
        return (yield)
    before: weakref.WeakSet[AppPools] = weakref.WeakSet(registrations())
    try:
        return (yield)
    finally:
        state = _state(request.config)
        made = _made_since(before, state)  # a nested fixture's were claimed already
        if made:
            state.scoped.update(made)
            state.by_fixture.setdefault(fixturedef, weakref.WeakSet()).update(made)


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[t.Any], request: pytest.FixtureRequest) -> None:
    """After a fixture's own teardown: close the pools of the apps it made (if a broader-scoped one)."""
    state = _state(request.config)
    made = state.by_fixture.pop(fixturedef, None)
    if made:
        lines = close_made(list(made))
        if lines:
            state.reports.append((f"fixture {fixturedef.argname!r} ({fixturedef.scope} scope)", lines))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> t.Iterator[None]:
    try:
        return (yield)
    finally:
        # Everything of the test leaves the item here: pytest keeps items (and their stash)
        # until the session ends.
        watches = _pop(item.stash, _ITEM_WATCHES) or []
        transactions = _pop(item.stash, _ITEM_TRANSACTIONS) or []
        before = _pop(item.stash, _ITEM_BEFORE)
        message = None
        for w in watches:
            if w.reported or message is not None:
                continue
            try:
                assert_all_returned(w.app)
            except AssertionError as e:
                message = f"{e}\n(still out after the test's fixtures were torn down)"
        for w in watches:
            w.reclaim()
        for tx in transactions:
            tx.finish(force=True)
        for w in watches:
            w.stop()
        state = _state(item.config)
        lines = close_made(_made_since(before, state)) if before is not None else []
        if lines:
            if message is None and watches and not any(w.reported for w in watches):
                n = count(lines)
                message = (
                    f"flask_proxypool: {n} resource(s) of apps made in the test still checked out when it ended:\n"
                    + "\n".join(lines)
                    + "\n"
                    + HINT
                )
            else:
                state.reports.append((item.nodeid, lines))
        if message is not None:
            pytest.fail(message, pytrace=False)


def pytest_terminal_summary(terminalreporter: t.Any, config: pytest.Config) -> None:
    """List the pools closed at the end of a test (or fixture) with resources still out."""
    reports = _state(config).reports
    if not reports:
        return
    terminalreporter.write_sep("=", "flask_proxypool: pools closed with resources still checked out")
    for where, lines in reports:
        terminalreporter.write_line(f"{where}:")
        for line in lines:
            terminalreporter.write_line(line)
    terminalreporter.write_line(
        "These pools belong to apps made during the test (or by the fixture) and were closed when it ended; "
        "the resources still out were taken back and closed. " + HINT
    )
