"""No exception path loses a slot: durations are refused unless finite and sane, and an exception raised at
any point of a checkout (KeyboardInterrupt, a gevent Timeout, an OverflowError) leaves the pool's accounts whole.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
import typing as t

import pytest
from flask import Flask

from conftest import backends, wait_until
from flask_proxypool import ConfigError
from flask_proxypool import PoolTimeout
from flask_proxypool import db
from flask_proxypool import pool as pool_module
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.kinds.psycopg import PsycopgKind
from flask_proxypool.pool import DURATIONS
from flask_proxypool.pool import MAX_SECONDS
from flask_proxypool.pool import Pool
from pgserver import PgServer

try:
    from gevent import Timeout as GeventTimeout  # a BaseException: what a request deadline raises under gevent
except ImportError:  # pragma: no cover - gevent is a test dependency

    class GeventTimeout(BaseException):  # type: ignore[no-redef]
        """Stands in for gevent.Timeout."""


MakeApp = t.Callable[..., Flask]

BAD_SECONDS = [pytest.param(math.inf, id="inf"), pytest.param(math.nan, id="nan"), pytest.param(1e10, id="1e10")]


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# -- durations refused where they are given ------------------------------------------------------------------


def test_the_duration_keys_are_the_documented_ones() -> None:
    """Every duration the issue names is checked, and the ceiling is one day, far below threading.TIMEOUT_MAX."""
    assert set(DURATIONS) == {
        "timeout",
        "fifo_after",
        "max_lifetime",
        "max_idle",
        "liveness_after",
        "health_check_interval",
        "reconnect_delay",
        "reconnect_max_delay",
        "close_timeout",
        "check_timeout",
        "max_hold",
    }
    assert MAX_SECONDS == 86400 < threading.TIMEOUT_MAX


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("key", [*DURATIONS, "busy_timeout"])
def test_init_app_refuses_unbounded_durations(make_app: MakeApp, key: str, value: float) -> None:
    """inf, NaN and 1e10 are refused at init_app, naming the pool, the key and the ceiling."""
    message = (
        f"PROXYPOOL_POOLS['db']['{key}'] must be a finite number of seconds, at most 86400 (one day), got {value!r}"
    )
    with pytest.raises(ConfigError, match=exact(message)):
        make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", key: value}})


def test_init_app_accepts_the_ceiling(make_app: MakeApp) -> None:
    """Exactly one day is accepted."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "timeout": 86400, "max_lifetime": 86400.0}})
    assert app.extensions["proxypool"].pool("db").timeout == 86400.0


@pytest.mark.parametrize("value", [*BAD_SECONDS, pytest.param(-1.0, id="negative")])
@pytest.mark.parametrize("key", DURATIONS)
def test_pool_refuses_unbounded_durations(key: str, value: float) -> None:
    """Pool() itself refuses the same values with a ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"^{key} must be "):
        Pool(FactoryKind(object), **{key: value})


@pytest.mark.parametrize("value", BAD_SECONDS)
def test_per_call_timeouts_refused_and_nothing_taken(make_app: MakeApp, value: float) -> None:
    """getconn, connection, borrow and close refuse a bad timeout before taking or waiting for anything."""
    app = make_app({"db": {"kind": "sqlite3", "database": "x.sqlite3", "max_size": 1}})
    pool = app.extensions["proxypool"].pool("db")
    held = pool.getconn()
    message = f"pool 'db': getconn timeout must be a number of seconds from 0 to 86400 (one day), got {value!r}"
    with pytest.raises(ValueError, match=exact(message)):
        pool.getconn(timeout=value)
    with pytest.raises(ValueError, match=exact(message)), pool.connection(timeout=value):
        pass
    with pytest.raises(ValueError, match=exact(message)), db.borrow(app, timeout=value):
        pass
    with pytest.raises(ValueError, match="^pool 'db': close timeout must be "):
        pool.close(timeout=value)
    st = pool.stats()
    assert (st.size, st.in_use, st.idle, st.waiting, st.timeouts) == (1, 1, 0, 0, 0)
    assert not pool.closed
    pool.putconn(held)
    assert pool.stats().idle == 1


# -- fault injection -------------------------------------------------------------------------------------------

#: What may hit a checkout at any point: a Ctrl-C, a gevent request deadline (a BaseException), an overflow.
FAULTS = [
    pytest.param(KeyboardInterrupt, id="KeyboardInterrupt"),
    pytest.param(GeventTimeout, id="gevent.Timeout"),
    pytest.param(OverflowError, id="OverflowError"),
]


class Res:
    """A fake resource."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False
        self.reset_ok = True  # False: putconn discards it
        self.dead = False  # True: its liveness probe says no

    def __repr__(self) -> str:
        return f"<Res {self.n}{' closed' if self.closed else ''}>"


class Maker:
    """The factory and every hook of the kind; ``faults[hook]`` is raised by that hook's next call (once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: list[Res] = []
        self.faults: dict[str, BaseException] = {}
        self.check_gate: threading.Event | None = None  # a check waits for it (a check that hangs)
        self.in_check = threading.Event()

    def _fault(self, hook: str) -> None:
        with self.lock:
            exc = self.faults.pop(hook, None)
        if exc is not None:
            raise exc

    def create(self) -> Res:
        self._fault("create")
        with self.lock:
            r = Res(len(self.made) + 1)
            self.made.append(r)
        return r

    def close(self, r: Res) -> None:
        r.closed = True
        self._fault("close")

    def alive(self, r: Res) -> bool:
        self._fault("alive")
        return not r.dead

    def check(self, r: Res) -> None:
        self.in_check.set()
        if self.check_gate is not None:
            assert self.check_gate.wait(10)
        self._fault("check")

    def reset(self, r: Res) -> bool:
        self._fault("reset")
        return r.reset_ok

    def open_count(self) -> int:
        with self.lock:
            return sum(not r.closed for r in self.made)

    def kind(self) -> FactoryKind:
        return FactoryKind(
            self.create, close=self.close, check=self.check, alive=self.alive, reset=self.reset, label="faults"
        )


class Clock:
    """time.monotonic, which can be told to raise on a later call made by one thread."""

    def __init__(self) -> None:
        self.armed: tuple[int, BaseException, int] | None = None

    def arm(self, exc: BaseException, skip: int = 0) -> None:
        """The calling thread's clock read after ``skip`` more reads raises ``exc``."""
        self.armed = (threading.get_ident(), exc, skip)

    def __call__(self) -> float:
        armed = self.armed
        if armed is not None and armed[0] == threading.get_ident():
            ident, exc, skip = armed
            self.armed = None if skip == 0 else (ident, exc, skip - 1)
            if skip == 0:
                raise exc
        return time.monotonic()


@dataclasses.dataclass
class Plan:
    """What the next queued waiter's ``ready.acquire(timeout)`` does instead of waiting.

    ``serve()`` runs first (hands the waiter something, as a thread returning a resource would); then
    ``exc`` is raised, by that acquire or, with ``late``, by the re-acquire that follows an acquire
    that reported a timeout. ``exc`` None: the acquire then succeeds.
    """

    serve: t.Callable[[], None] | None = None
    exc: BaseException | None = None
    late: bool = False


class _Ready:
    """Stands in for a waiter's pre-acquired lock and plays a :class:`Plan` once."""

    def __init__(self, lock: t.Any, plan: Plan) -> None:
        self.lock = lock
        self.plan: Plan | None = plan
        self.timed_out = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        plan = self.plan
        if plan is None:
            return bool(self.lock.acquire(blocking, timeout))
        if not self.timed_out:
            if plan.serve is not None:
                plan.serve()
            if plan.exc is None:
                self.plan = None
                return bool(self.lock.acquire(blocking, timeout))
            if plan.late:
                self.timed_out = True
                return False
        self.plan = None
        assert plan.exc is not None
        raise plan.exc

    def release(self) -> None:
        self.lock.release()


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[Plan]:
    """Plans for the next waiters the pool queues, first come first served; waiters beyond them are real."""
    queue: list[Plan] = []

    class FaultyWaiter(pool_module.Waiter):
        def __init__(self, since: float) -> None:
            super().__init__(since)
            if queue:
                self.ready = _Ready(self.ready, queue.pop(0))  # type: ignore[assignment]

    monkeypatch.setattr(pool_module, "Waiter", FaultyWaiter)
    return queue


@pytest.fixture
def make_pool() -> t.Iterator[t.Callable[..., tuple[Pool[Res], Maker, Clock]]]:
    """Pools of fake resources with a clock that can be told to raise; all closed at the end."""
    made: list[Pool[Res]] = []

    def make(**kw: t.Any) -> tuple[Pool[Res], Maker, Clock]:
        maker, clock = Maker(), Clock()
        # liveness_after 0: every checkout runs the probe, where faults are injected
        kw = {
            "max_size": 1,
            "timeout": 5.0,
            "health_check_interval": 0,
            "reconnect_delay": 0,
            "liveness_after": 0,
            **kw,
        }
        pool: Pool[Res] = Pool(maker.kind(), clock=clock, **kw)
        made.append(pool)
        return pool, maker, clock

    yield make
    for pool in made:
        pool.close(timeout=1.0)


def spawn(fn: t.Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; its result, or the exception it raised, lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def raises(exc_type: type[BaseException], fn: t.Callable[[], object]) -> BaseException:
    """Call ``fn``, which must raise ``exc_type``; Exception subclasses may come wrapped (ConnectFailed from)."""
    with pytest.raises(BaseException) as info:
        fn()
    e = info.value
    assert isinstance(e, exc_type) or isinstance(e.__cause__, exc_type), repr(e)
    return e


def assert_whole(pool: Pool[Res], maker: Maker) -> None:
    """The pool's accounts add up, nothing leaked, and every slot can be taken again, up to max_size and no more."""
    st = pool.stats()
    assert (st.in_use, st.waiting) == (0, 0), st
    assert st.size == st.idle and st.created - st.closed == st.size, st
    # closes after an interrupted check run in the background: bounded poll
    assert wait_until(lambda: maker.open_count() == pool.stats().size), (maker.made, pool.stats())
    taken = [pool.getconn(timeout=2) for _ in range(pool.max_size)]
    assert len({r.n for r in taken}) == pool.max_size and not any(r.closed for r in taken)
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0)
    for r in taken:
        pool.putconn(r)
    st = pool.stats()
    assert (st.size, st.idle, st.in_use, st.waiting) == (pool.max_size, pool.max_size, 0, 0)
    assert maker.open_count() == pool.max_size


# -- the waiter: its acquire raises, before or after it was served ------------------------------------------


@pytest.mark.parametrize("exc_type", FAULTS)
def test_waiter_interrupted_while_queued_leaves_the_queue(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], plans: list[Plan], exc_type: type[BaseException]
) -> None:
    """The acquire raises while the waiter is queued: it leaves the queue; a resource given back goes idle."""
    pool, maker, _ = make_pool()
    held = pool.getconn()
    plans.append(Plan(exc=exc_type()))
    raises(exc_type, pool.getconn)
    st = pool.stats()
    assert (st.waiting, st.timeouts, st.in_use) == (0, 0, 1)
    pool.putconn(held)
    assert pool.stats().idle == 1  # not handed to the waiter that left
    assert_whole(pool, maker)


#: How a waiter is served before its acquire raises: with the resource itself (fifo_after 0: handed over),
#: with a wake to come and take it (_LOOK, fifo_after 60), with a slot to create one (_PERMIT: the held
#: resource was discarded). Or served, and then what follows the wait raises: the create in the slot it was
#: given (permit-create), the liveness probe of the resource it was handed (entry-probe, the slow path's test).
SERVED = ["entry", "look", "permit", "permit-create", "entry-probe"]


def _serve(pool: Pool[Res], maker: Maker, held: Res, how: str, exc: BaseException, nxt: bool) -> t.Callable[[], None]:
    """A ``serve`` for a :class:`Plan`: optionally queue a second waiter first, then hand the first one something."""
    started: list[tuple[threading.Thread, list[object]]] = []

    def second() -> Res:
        r = pool.getconn(timeout=5)
        pool.putconn(r)  # at once: the first caller may be queued again behind this one
        return r

    def serve() -> None:
        if nxt:
            started.append(spawn(second))
            assert wait_until(lambda: pool.stats().waiting == 2)  # the second waiter is queued behind us
        if how.startswith("permit"):
            held.reset_ok = False  # its return discards it: its slot goes to the oldest waiter
        pool.putconn(held)
        if how == "permit-create":
            maker.faults["create"] = exc
        if how == "entry-probe":
            maker.faults["alive"] = exc

    serve.started = started  # type: ignore[attr-defined]
    return serve


@pytest.mark.parametrize("nxt", [False, True], ids=["alone", "next-waiter"])
@pytest.mark.parametrize(
    ("how", "late"),
    [(how, late) for how in SERVED for late in (False, True) if not late or how in ("entry", "look", "permit")],
    ids=lambda v: v if isinstance(v, str) else "re-acquire" if v else "acquire",
)
@pytest.mark.parametrize("exc_type", FAULTS)
def test_waiter_interrupted_after_being_served_gives_it_back(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]],
    plans: list[Plan],
    exc_type: type[BaseException],
    how: str,
    late: bool,
    nxt: bool,
) -> None:
    """Served meanwhile, then the acquire raises: what it was handed goes back, to the next waiter if there is one."""
    pool, maker, _ = make_pool(fifo_after=60 if how == "look" else 0)
    held = pool.getconn()
    exc = exc_type()
    serve = _serve(pool, maker, held, how, exc, nxt)
    plans.append(Plan(serve=serve, exc=None if how in ("permit-create", "entry-probe") else exc, late=late))
    if how == "entry-probe" and exc_type is OverflowError:
        got = pool.getconn()  # a probe that fails with an Exception says "dead": replaced, and the checkout goes on
        assert got is not held and held.closed
        pool.putconn(got)
    else:
        raises(exc_type, pool.getconn)
    for th, out in serve.started:  # type: ignore[attr-defined]
        th.join(10)
        assert len(out) == 1 and isinstance(out[0], Res), out  # served with what the first one gave back
    if how == "entry-probe":
        assert held.closed  # its test was cut short (or said dead): it is not handed out again
    assert_whole(pool, maker)


@pytest.mark.parametrize("exc_type", FAULTS)
def test_waiter_interrupted_after_the_pool_closed(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], plans: list[Plan], exc_type: type[BaseException]
) -> None:
    """Handed PoolClosed, then the acquire raises: nothing is owed; the held resource is closed when returned."""
    pool, maker, _ = make_pool()
    held = pool.getconn()
    plans.append(Plan(serve=lambda: pool.close(timeout=0), exc=exc_type()))
    raises(exc_type, pool.getconn)
    pool.putconn(held)
    st = pool.stats()
    assert (st.size, st.idle, st.in_use, st.waiting) == (0, 0, 0, 0)
    assert held.closed and maker.open_count() == 0


# -- the clock: it raises after the waiter was served, or on the fast path ----------------------------------


@pytest.mark.parametrize("nxt", [False, True], ids=["alone", "next-waiter"])
@pytest.mark.parametrize(
    ("how", "skip"),
    [("entry", 0), ("entry", 1), ("look", 0), ("permit", 0), ("permit", 1)],
    ids=["entry-record", "entry-test", "look-requeue", "permit-record", "permit-new-entry"],
)
@pytest.mark.parametrize("exc_type", FAULTS)
def test_clock_raises_after_being_served(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]],
    plans: list[Plan],
    exc_type: type[BaseException],
    how: str,
    skip: int,
    nxt: bool,
) -> None:
    """The waiter was served; the clock raises before the caller got a resource: it goes back whole."""
    pool, maker, clock = make_pool(fifo_after=60 if how == "look" else 0)
    held = pool.getconn()
    exc = exc_type()
    serve = _serve(pool, maker, held, how, exc, nxt)

    def serve_then_arm() -> None:
        serve()
        clock.arm(exc, skip)  # this thread's next clock reads: after the wait, before the checkout is done

    plans.append(Plan(serve=serve_then_arm))
    raises(exc_type, pool.getconn)
    for th, out in serve.started:  # type: ignore[attr-defined]
        th.join(10)
        assert len(out) == 1 and isinstance(out[0], Res), out
    assert_whole(pool, maker)


@pytest.mark.parametrize("exc_type", FAULTS)
def test_clock_raises_on_the_fast_path(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], exc_type: type[BaseException]
) -> None:
    """The clock raises once the idle resource moved to the checked-out map: it goes back idle, not counted out."""
    pool, maker, clock = make_pool(max_size=2)
    r = pool.getconn()
    pool.putconn(r)
    checkouts = pool.stats().checkouts
    clock.arm(exc_type())
    raises(exc_type, pool.getconn)
    st = pool.stats()
    assert (st.size, st.idle, st.in_use, st.checkouts) == (1, 1, 0, checkouts)
    assert pool.getconn() is r  # untouched, so still good
    pool.putconn(r)
    assert_whole(pool, maker)


# -- the kind: probe, check, create ----------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", FAULTS)
def test_probe_raises_on_the_fast_path(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], exc_type: type[BaseException]
) -> None:
    """The liveness probe raises: interrupted, the resource is closed and its slot freed; an error means dead."""
    pool, maker, _ = make_pool(max_size=2)
    r = pool.getconn()
    pool.putconn(r)
    maker.faults["alive"] = exc_type()
    if issubclass(exc_type, Exception):
        got = pool.getconn()  # a failed poll: discarded as broken, a new one made
        assert got is not r
        pool.putconn(got)
        assert pool.stats().closed_by_reason == {"broken": 1}
    else:
        raises(exc_type, pool.getconn)
        assert pool.stats().closed_by_reason == {"interrupted": 1}
    assert r.closed
    assert_whole(pool, maker)


@pytest.mark.parametrize("where", ["check", "join"])
@pytest.mark.parametrize("exc_type", FAULTS)
def test_query_check_interrupted(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]],
    monkeypatch: pytest.MonkeyPatch,
    exc_type: type[BaseException],
    where: str,
) -> None:
    """liveness 'query': the check raises, or the wait for its thread does: the slot is freed, the resource closed."""
    pool, maker, _ = make_pool(max_size=2, liveness="query", check_timeout=5)
    r = pool.getconn()
    pool.putconn(r)
    if where == "check":
        maker.faults["check"] = exc_type()
    else:
        maker.check_gate = threading.Event()  # the check runs until released: the caller stops waiting first
        join = threading.Thread.join
        fired: list[bool] = []

        def faulty_join(self: threading.Thread, timeout: float | None = None) -> None:
            if self.name.endswith("-check") and not fired:
                fired.append(True)
                assert maker.in_check.wait(5)
                raise exc_type()
            join(self, timeout)

        monkeypatch.setattr(threading.Thread, "join", faulty_join)
    if issubclass(exc_type, Exception):
        got = pool.getconn()  # a failed check: discarded as broken, a new one made
        assert got is not r
        pool.putconn(got)
        assert pool.stats().closed_by_reason == {"broken": 1}
    else:
        raises(exc_type, pool.getconn)
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.closed_by_reason) == (0, 0, 0, {"interrupted": 1})
    if maker.check_gate is not None:
        maker.check_gate.set()
    assert wait_until(lambda: r.closed)  # closed in the background: the check may still have been running
    maker.check_gate = None
    assert_whole(pool, maker)


@pytest.mark.parametrize("exc_type", FAULTS)
def test_create_raises(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], exc_type: type[BaseException]
) -> None:
    """create raises: the reserved slot is freed; only a failure (an Exception) counts and backs off."""
    pool, maker, _ = make_pool(max_size=2)
    maker.faults["create"] = exc_type()
    raises(exc_type, pool.getconn)
    st = pool.stats()
    assert (st.size, st.created, st.connect_failures) == (0, 0, int(issubclass(exc_type, Exception)))
    assert_whole(pool, maker)


@pytest.mark.parametrize("exc_type", FAULTS)
def test_probe_cannot_be_built(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], exc_type: type[BaseException]
) -> None:
    """Made, but building its probe raises: the new resource is closed and the slot freed."""
    pool, maker, _ = make_pool(max_size=2)
    fault = [exc_type()]

    def prober(resource: Res) -> t.Callable[[], bool]:
        if fault:
            raise fault.pop()
        return lambda: maker.alive(resource)

    pool.kind.prober = prober  # type: ignore[attr-defined]
    raises(exc_type, pool.getconn)
    assert maker.made[0].closed
    assert pool.stats().size == 0
    assert_whole(pool, maker)


@pytest.mark.parametrize("exc_type", FAULTS)
def test_close_raises_while_discarding(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], exc_type: type[BaseException]
) -> None:
    """A dead resource found at checkout whose close raises: its slot is freed all the same."""
    pool, maker, _ = make_pool(max_size=2)
    r = pool.getconn()
    pool.putconn(r)
    r.dead = True
    maker.faults["close"] = exc_type()
    if issubclass(exc_type, Exception):
        pool.putconn(pool.getconn())  # a failed close is logged; the checkout goes on with a new one
    else:
        raises(exc_type, pool.getconn)
    assert r.closed and pool.stats().closed_by_reason == {"broken": 1}
    assert_whole(pool, maker)


# -- the background worker's health check ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["check", "join"])
@pytest.mark.parametrize("exc_type", FAULTS)
def test_health_check_interrupted(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]],
    monkeypatch: pytest.MonkeyPatch,
    exc_type: type[BaseException],
    where: str,
) -> None:
    """The worker's bounded check raises: the resource it held is abandoned, the others go back idle."""
    pool, maker, _ = make_pool(max_size=3, health_check_interval=0.005)
    died: list[BaseException] = []
    dead = threading.Event()

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name.endswith("-worker"):
            assert args.exc_value is not None
            died.append(args.exc_value)
            dead.set()

    monkeypatch.setattr(threading, "excepthook", hook)
    held = [pool.getconn() for _ in range(3)]
    for r in held:
        pool.putconn(r)
    exc = exc_type()
    if where == "check":
        maker.faults["check"] = exc
    else:
        join = threading.Thread.join
        fired: list[bool] = []

        def faulty_join(self: threading.Thread, timeout: float | None = None) -> None:
            if self.name.endswith("-check") and not fired:
                fired.append(True)
                raise exc
            join(self, timeout)

        monkeypatch.setattr(threading.Thread, "join", faulty_join)
    if issubclass(exc_type, Exception):
        assert wait_until(lambda: sum(pool.stats().closed_by_reason.values()) == 1)  # a failed check: discarded
        assert pool.stats().closed_by_reason == {"health_check": 1}
        pool.health_check_interval = 0  # no check in flight while the accounts are read
    else:
        assert dead.wait(5)  # the worker ends with it, having given back what it held
        assert died == [exc]
        assert pool.stats().closed_by_reason == {"interrupted": 1}
    assert wait_until(lambda: pool.stats().idle == 2)
    assert sum(r.closed for r in held) == 1
    assert_whole(pool, maker)


# -- a real PostgreSQL -----------------------------------------------------------------------------------------


def test_psycopg_probe_interrupted(conninfo: str, pg: PgServer, appname: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg: a KeyboardInterrupt in the liveness poll closes that connection; the pool stays whole and works."""
    fault: list[BaseException] = []
    prober = PsycopgKind.prober

    def faulty_prober(self: PsycopgKind, resource: t.Any) -> t.Callable[[], bool]:
        probe = prober(self, resource)

        def alive() -> bool:
            if fault:
                raise fault.pop()
            return probe()

        return alive

    monkeypatch.setattr(PsycopgKind, "prober", faulty_prober)
    with Pool(PsycopgKind(conninfo), max_size=2, health_check_interval=0, liveness_after=0) as pool:
        a, b = pool.getconn(), pool.getconn()
        pids = [a.pgconn.backend_pid, b.pgconn.backend_pid]
        pool.putconn(a)
        pool.putconn(b)
        fault.append(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        assert wait_until(lambda: len(backends(pg, appname)) == 1)  # the interrupted one is closed on the server too
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.waiting, st.closed_by_reason) == (1, 1, 0, 0, {"interrupted": 1})
        a, b = pool.getconn(), pool.getconn()
        assert [c.execute("SELECT 1").fetchone() for c in (a, b)] == [(1,), (1,)]
        assert len(set(pids) & {a.pgconn.backend_pid, b.pgconn.backend_pid}) == 1  # the untouched one is reused
        pool.putconn(a)
        pool.putconn(b)
        assert pool.stats().idle == 2


def test_psycopg_waiter_interrupted_after_being_served(conninfo: str, plans: list[Plan]) -> None:
    """psycopg: a waiter handed the connection, then interrupted, gives it back; the next caller gets it, working."""
    with Pool(PsycopgKind(conninfo), max_size=1, fifo_after=0, health_check_interval=0) as pool:
        held = pool.getconn()
        pid = held.pgconn.backend_pid
        plans.append(Plan(serve=lambda: pool.putconn(held), exc=GeventTimeout()))
        with pytest.raises(GeventTimeout):
            pool.getconn()
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.waiting) == (1, 1, 0, 0)
        with pool.connection(timeout=1) as conn:
            assert conn.pgconn.backend_pid == pid
            assert conn.execute("SELECT 1").fetchone() == (1,)


# -- the return path (the lead's rewrite of putconn) -------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, GeventTimeout])
def test_reset_interrupted_on_return(
    make_pool: t.Callable[..., tuple[Pool[Res], Maker, Clock]], exc_type: type[BaseException]
) -> None:
    """The kind's reset raises a BaseException on return: the resource is discarded and its slot freed."""
    pool, maker, _ = make_pool(max_size=2)
    r = pool.getconn()
    maker.faults["reset"] = exc_type()
    with pytest.raises(exc_type):
        pool.putconn(r)
    assert_whole(pool, maker)
