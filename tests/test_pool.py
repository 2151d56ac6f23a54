"""Tests of the Flask-free :class:`flask_proxypool.pool.Pool`, with cheap fake resources."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import typing as t
from collections.abc import Iterator

import pytest
from conftest import wait_until as _wait_until

from flask_proxypool import maintenance
from flask_proxypool.errors import ConnectFailed, PoolClosed, PoolTimeout, TooManyWaiting, UsageError
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.pool import Pool

_ids = itertools.count(1)


class Res:
    """A fake resource that records what the pool did to it."""

    def __init__(self, maker: Maker) -> None:
        self.n = next(_ids)
        self.maker = maker
        self.closed = self.dead = self.bad = False  # dead: alive() False; bad: check() False
        self.reset_result: bool | None = True  # None: reset() raises
        self.checks = self.resets = self.commits = 0

    def close(self) -> None:
        self.closed = True
        with self.maker.lock:
            self.maker.alive_now -= 1

    def alive(self) -> bool:
        return not self.dead

    def check(self) -> bool:
        self.checks += 1
        return not self.bad

    def reset(self) -> bool:
        self.resets += 1
        if self.reset_result is None:
            raise RuntimeError("reset blew up")
        return self.reset_result

    def commit(self) -> None:
        self.commits += 1


class Maker:
    """The factory: counts calls and resources alive; can be told to fail, or hooked to block."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = self.alive_now = self.alive_peak = 0
        self.fail: Exception | None = None
        self.hook: t.Callable[[int], None] | None = None  # called with the call number

    def __call__(self) -> Res:
        with self.lock:
            self.calls += 1
            n, fail, hook = self.calls, self.fail, self.hook
        if hook is not None:
            hook(n)
        if fail is not None:
            raise fail
        r = Res(self)
        with self.lock:
            self.alive_now += 1
            self.alive_peak = max(self.alive_peak, self.alive_now)
        return r


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakePool = t.Callable[..., "tuple[Pool[Res], Maker]"]


@pytest.fixture
def make_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakePool]:
    """Build pools of fake resources; every one is closed at the end.

    Many tests here let a thread take a resource and end, then give it back from the main thread: the
    worker's take-back of what ended threads hold (tested in test_reclaim.py) is off, or its first round
    could land between the two.
    """
    monkeypatch.setattr(maintenance, "TASKS", tuple(t for t in maintenance.TASKS if t.name != "reclaim_abandoned"))
    made: list[Pool[Res]] = []

    def make(**kw: t.Any) -> tuple[Pool[Res], Maker]:
        maker = Maker()
        kind = FactoryKind(maker, close="close", check="check", reset="reset", commit="commit", alive="alive")
        kw.setdefault("timeout", 2.0)
        pool: Pool[Res] = Pool(kind, **kw)
        made.append(pool)
        return pool, maker

    yield make
    for pool in made:
        pool.close(timeout=1.0)


def wait_until(pred: t.Callable[[], bool]) -> bool:
    """`conftest.wait_until`, bounded at 2 s: these tests wait only for threads of this process."""
    return _wait_until(pred, timeout=2.0)


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


@pytest.mark.parametrize("lifo", [False, True])
def test_round_trip_reuses_resources_in_the_configured_order(make_pool: MakePool, lifo: bool) -> None:
    """A thread gets back first what it gave back last; any other taker, the least recently returned first
    (the most recently with lifo=True)."""
    pool, maker = make_pool(lifo=lifo)
    a = pool.getconn()
    b = pool.getconn()
    assert a is not b
    assert pool.stats().in_use == 2
    pool.putconn(a)
    pool.putconn(b)
    assert pool.getconn() is b  # this thread's last, whatever the order
    assert pool.getconn() is a
    pool.putconn(a)
    pool.putconn(b)
    taken: list[object] = []
    got, checked = threading.Event(), threading.Event()

    def other_thread() -> None:  # gives back before it ends: the pool takes back what an ended thread kept
        taken.extend([pool.getconn(), pool.getconn()])
        got.set()
        checked.wait(10)
        for r in taken:
            pool.putconn(r)

    other = threading.Thread(target=other_thread)
    other.start()
    assert got.wait(10)
    # a thread that gave nothing back: first what no live thread keeps to (a: this thread keeps to b, the last
    # it made), then the pool's order
    assert taken == [a, b]
    assert maker.calls == 2
    assert a.resets == 2 and b.resets == 2
    checked.set()
    other.join(10)
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.created, s.checkouts) == (2, 2, 0, 2, 6)


def test_a_thread_gets_back_the_resource_it_gave_back_last(make_pool: MakePool) -> None:
    """Affinity: 4 threads on 4 resources, 200 rounds each, each keeps to one resource once all are made.

    Why it matters: on free-threaded Python a connection used by the thread that made it costs less CPU
    (its objects' reference counts stay that thread's), and on every build its caches stay warm.
    """
    pool, _ = make_pool(max_size=4)
    start = threading.Barrier(4)
    used: list[set[int]] = [set() for _ in range(4)]
    made = threading.Barrier(4)

    def work(i: int) -> None:
        start.wait(10)
        r = pool.getconn()  # all four out at once: each thread made its own
        made.wait(10)
        pool.putconn(r)
        for _ in range(200):
            r = pool.getconn()
            used[i].add(id(r))
            pool.putconn(r)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert [len(u) for u in used] == [1, 1, 1, 1]
    assert len(set().union(*used)) == 4
    assert pool.stats().checkouts == 4 * 201


def test_a_thread_goes_back_to_the_resource_it_made_after_using_another(make_pool: MakePool) -> None:
    """Thread A made X; while X is away (a health check has it), A uses B's Y; once X is back, A takes X again."""
    import queue

    pool, _ = make_pool(max_size=2)
    steps: queue.Queue[str] = queue.Queue()
    got: queue.Queue[object] = queue.Queue()

    def thread_a() -> None:
        while (step := steps.get(timeout=10)) != "end":
            r = pool.getconn(holder="view")
            got.put(r)
            pool.putconn(r)
            assert step == "take"

    def entry_of(r: object) -> t.Any:
        return next(e for e in pool._idle if e.resource is r)

    a = threading.Thread(target=thread_a)
    a.start()
    steps.put("take")
    x = got.get(timeout=10)
    made_by_b: list[object] = []
    b = threading.Thread(target=lambda: made_by_b.append(pool.putconn(r := pool.getconn(holder="v")) or r))
    b.start()
    b.join(10)
    (y,) = made_by_b
    assert y is not x
    ex = entry_of(x)
    pool._idle.remove(ex)  # as the health check takes it
    steps.put("take")
    assert got.get(timeout=10) is y
    pool._idle.append(ex)  # checked, back
    steps.put("take")
    assert got.get(timeout=10) is x
    steps.put("end")
    a.join(10)


def test_maintenance_rounds_do_not_move_threads_off_their_own_resources(make_pool: MakePool) -> None:
    """The expiry scan runs over and over while 4 request threads churn 300 times each on 4 resources: each keeps
    the one it made (the scan looks at idle resources in place; taking them all out would send a checkout to
    another thread's)."""
    pool, maker = make_pool(max_size=4, max_idle=600.0)
    used: list[set[int]] = [set() for _ in range(4)]
    ready, stop = threading.Barrier(5), threading.Event()
    scanned, scans = threading.Condition(), [0]

    def work(i: int) -> None:
        r = pool.getconn(holder="view")
        ready.wait(10)  # all four made, one each
        pool.putconn(r)
        for _ in range(300):
            with scanned:  # a scan between any two of this thread's checkouts
                first = scans[0]
                scanned.wait_for(lambda: scans[0] != first or stop.is_set(), timeout=10)  # noqa: B023
            r = pool.getconn(holder="view")
            used[i].add(id(r))
            pool.putconn(r)

    def scan() -> None:
        while not stop.is_set():
            maintenance.Expire().run(pool, pool._clock())
            with scanned:
                scans[0] += 1
                scanned.notify_all()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    ready.wait(10)
    scanner = threading.Thread(target=scan)
    scanner.start()
    for th in threads:
        th.join(20)
    stop.set()
    scanner.join(10)
    assert scans[0] >= 300
    assert maker.calls == 4
    assert [len(u) for u in used] == [1, 1, 1, 1]


def test_a_request_threads_first_checkout_makes_its_own_while_there_is_room(make_pool: MakePool) -> None:
    """Inside a request (a holder given), a thread's first checkout makes a resource rather than take one another
    thread made, up to max_size; outside requests, and once the pool is full, an idle one is taken."""
    pool, maker = make_pool(max_size=3)

    def in_thread(fn: t.Callable[[], object]) -> object:
        out: list[object] = []
        th = threading.Thread(target=lambda: out.append(fn()))
        th.start()
        th.join(10)
        return out[0]

    def request_round_trip() -> object:
        r = pool.getconn(holder="view")
        pool.putconn(r)
        again = pool.getconn(holder="view")  # and then keeps to it
        pool.putconn(again)
        assert again is r
        return r

    made = [in_thread(request_round_trip) for _ in range(3)]
    assert len({id(r) for r in made}) == 3 and maker.calls == 3  # each request thread made its own
    fourth = in_thread(request_round_trip)  # the pool is full: an idle one
    assert fourth in made and maker.calls == 3
    outside = in_thread(lambda: pool.putconn(r := pool.getconn()) or r)
    assert outside in made and maker.calls == 3
    small, small_maker = make_pool(max_size=3)
    for _ in range(3):  # outside requests a new thread takes what is idle: the pool does not grow
        in_thread(lambda: small.putconn(small.getconn()))
    assert small_maker.calls == 1


def test_a_request_threads_own_resource_that_cannot_be_made_falls_back_to_an_idle_one() -> None:
    """A server that refuses new connections (max_connections reached) while made ones work: a request thread's
    first checkout tries to make its own, fails, and takes the idle one instead of failing the request."""
    made: list[object] = []

    def factory() -> object:
        if made:
            raise ConnectionRefusedError("too many clients already")
        made.append(object())
        return made[-1]

    pool: Pool[t.Any] = Pool(FactoryKind(factory), max_size=3, liveness="none")
    try:
        first = pool.getconn(holder="view")
        pool.putconn(first)
        got: list[object] = []
        th = threading.Thread(target=lambda: got.append(pool.getconn(holder="view")))
        th.start()
        th.join(10)
        assert got == [first]
        s = pool.stats()
        assert (s.connect_failures, s.size, s.in_use) == (1, 1, 1)
        pool.putconn(first)
    finally:
        pool.close(timeout=1.0)


def test_connection_context_manager_returns_on_exception(make_pool: MakePool) -> None:
    """``connection()`` gives the resource back (rolled back) when the block raises."""
    pool, _ = make_pool()
    with pytest.raises(ValueError, match="boom"), pool.connection() as r:
        assert pool.stats().in_use == 1
        raise ValueError("boom")
    s = pool.stats()
    assert (s.in_use, s.idle) == (0, 1)
    assert r.resets == 1 and r.commits == 0 and not r.closed
    with pool.connection() as c:
        assert c is r
    assert r.resets == 2 and r.commits == 0  # default on_return="rollback": never commits


def test_max_size_never_exceeded_under_contention(make_pool: MakePool) -> None:
    """16 threads x 300 checkouts on max_size=4: never more than 4, never one resource twice."""
    pool, maker = make_pool(max_size=4, timeout=10.0)
    lock = threading.Lock()
    held: set[int] = set()
    peak, done = [0], [0]
    doubles: list[int] = []
    barrier = threading.Barrier(16)

    def work() -> None:
        barrier.wait(5)
        for _ in range(300):
            r = pool.getconn()
            with lock:
                if r.n in held:
                    doubles.append(r.n)
                held.add(r.n)
                peak[0] = max(peak[0], len(held))
            time.sleep(0)  # yield while holding it, so others contend
            with lock:
                held.discard(r.n)
                done[0] += 1
            pool.putconn(r)

    runs = [spawn(work) for _ in range(16)]
    for th, _ in runs:
        th.join(20)
    assert not any(th.is_alive() for th, _ in runs)
    assert [out for _, out in runs] == [[None]] * 16  # no thread raised
    assert doubles == []
    assert done[0] == 16 * 300
    assert 2 <= peak[0] <= 4
    assert maker.alive_peak <= 4
    s = pool.stats()
    assert s.checkouts == 16 * 300
    assert (s.in_use, s.waiting) == (0, 0)
    assert s.size == s.idle <= 4
    assert s.created == maker.calls <= 4


def test_waiters_are_served_in_arrival_order(make_pool: MakePool) -> None:
    """Three queued waiters get the resource in the order they queued (FIFO)."""
    pool, _ = make_pool(max_size=1)
    r = pool.getconn()
    order: list[int] = []

    def waiter(i: int) -> None:
        got = pool.getconn(timeout=5)
        order.append(i)
        pool.putconn(got)

    runs = []
    for i in range(3):
        runs.append(spawn(lambda i=i: waiter(i)))  # type: ignore[misc]
        assert wait_until(lambda i=i: pool.stats().waiting == i + 1)  # type: ignore[misc]
    pool.putconn(r)
    for th, _ in runs:
        th.join(5)
    assert [out for _, out in runs] == [[None]] * 3
    assert order == [0, 1, 2]
    s = pool.stats()
    assert (s.created, s.checkouts, s.wait_count, s.in_use, s.waiting) == (1, 4, 3, 0, 0)


class _Gate:
    """Stands in for a waiter's lock, so the test decides when a woken waiter goes on (GIL or not)."""

    def __init__(self, go: threading.Event) -> None:
        self._lock = threading.Lock()
        self.woken = threading.Event()
        self.go = go

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got and not self.woken.is_set():
            return got  # the pool's own pre-acquire at birth
        if got:
            assert self.go.wait(10), "the test never let the woken waiter go on"
        return got

    def release(self) -> None:
        self.woken.set()
        self._lock.release()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[t.Any]]:
    """Every waiter the pool makes gets a _Gate; clear the event to hold woken waiters back."""
    from flask_proxypool import pool as pool_module

    go = threading.Event()
    go.set()
    made: list[t.Any] = []

    class GatedWaiter(pool_module.Waiter):
        __slots__ = ()

        def __init__(self, since: float) -> None:
            super().__init__(since)
            self.ready = _Gate(go)  # type: ignore[assignment]
            self.ready.acquire()
            made.append(self)

    monkeypatch.setattr(pool_module, "Waiter", GatedWaiter)
    return go, made


def test_a_young_waiter_is_woken_and_the_returning_thread_may_take_again(
    make_pool: MakePool, gated: tuple[threading.Event, list[t.Any]]
) -> None:
    """Bounded barging: before fifo_after, a return wakes the waiter; after it, the return is the waiter's."""
    go, made = gated
    clock = FakeClock()
    pool, _ = make_pool(max_size=1, fifo_after=0.5, clock=clock)
    r = pool.getconn()
    th, out = spawn(lambda: pool.getconn(timeout=60))
    assert wait_until(lambda: pool.stats().waiting == 1)
    go.clear()
    clock.advance(0.1)
    pool.putconn(r)  # the waiter is 0.1 s old: woken to come and take it, not handed it
    assert made[0].ready.woken.wait(5)
    assert pool.getconn(timeout=0) is r  # the thread that gave it back takes it again: no thread switch
    assert pool.stats().waiting == 1  # the woken waiter still counts as waiting
    go.set()  # it looks, finds nothing, and queues again: first in line, with its first wait time
    assert wait_until(lambda: len(pool._waiters) == 1 and pool._wakened == 0)
    assert th.is_alive()
    clock.advance(1.0)  # now it has waited longer than fifo_after: the next return is its own
    pool.putconn(r)
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0)
    th.join(5)
    assert out == [r]
    s = pool.stats()
    assert (s.checkouts, s.wait_count, s.timeouts, s.in_use, s.waiting) == (3, 1, 1, 1, 0)
    assert s.wait_time_max == pytest.approx(1.1)  # from its first try, not from its second queueing
    pool.putconn(r)


def test_a_woken_waiter_takes_the_idle_resource_itself(
    make_pool: MakePool, gated: tuple[threading.Event, list[t.Any]]
) -> None:
    """Nobody barges: the woken waiter finds the resource idle and takes it (no waiter sleeps beside an idle one)."""
    clock = FakeClock()
    pool, _ = make_pool(max_size=1, fifo_after=0.5, clock=clock)
    r = pool.getconn()
    th, out = spawn(lambda: pool.getconn(timeout=60))
    assert wait_until(lambda: pool.stats().waiting == 1)
    pool.putconn(r)
    th.join(5)
    assert out == [r]
    s = pool.stats()
    assert (s.checkouts, s.wait_count, s.in_use, s.idle, s.waiting) == (2, 1, 1, 0, 0)
    pool.putconn(r)


def test_fifo_after_zero_hands_every_return_to_the_oldest_waiter(
    make_pool: MakePool, gated: tuple[threading.Event, list[t.Any]]
) -> None:
    """Strict FIFO: with a waiter queued, the returning thread cannot take the resource back."""
    go, _ = gated
    pool, _ = make_pool(max_size=1, fifo_after=0)
    r = pool.getconn()
    th, out = spawn(lambda: pool.getconn(timeout=5))
    assert wait_until(lambda: pool.stats().waiting == 1)
    go.clear()  # the waiter is handed r but may not run yet
    pool.putconn(r)
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0)
    go.set()
    th.join(5)
    assert out == [r]
    pool.putconn(r)


def test_timeout_raises_pool_timeout(make_pool: MakePool) -> None:
    """A caller waiting past ``timeout`` gets PoolTimeout, after roughly that long."""
    pool, _ = make_pool(max_size=1, timeout=0.1)
    r = pool.getconn()
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn()
    elapsed = time.monotonic() - t0
    assert 0.1 <= elapsed < 0.6
    assert info.value.pool == pool.name
    s = pool.stats()
    assert (s.timeouts, s.waiting, s.in_use) == (1, 0, 1)
    pool.putconn(r)


def test_max_waiting_refuses_at_once(make_pool: MakePool) -> None:
    """With max_waiting callers queued, the next one gets TooManyWaiting immediately."""
    pool, _ = make_pool(max_size=1, max_waiting=1, timeout=5.0)
    r = pool.getconn()
    th, out = spawn(pool.getconn)
    assert wait_until(lambda: pool.stats().waiting == 1)
    t0 = time.monotonic()
    with pytest.raises(TooManyWaiting):
        pool.getconn()
    assert time.monotonic() - t0 < 0.5
    s = pool.stats()
    assert (s.refused, s.waiting, s.timeouts) == (1, 1, 0)
    pool.putconn(r)
    th.join(5)
    assert out == [r]
    pool.putconn(r)


def test_max_use_recycles(make_pool: MakePool) -> None:
    """A resource is closed after ``max_use`` checkouts and a new one is made."""
    pool, maker = make_pool(max_use=2)
    r = pool.getconn()
    pool.putconn(r)
    assert pool.getconn() is r
    pool.putconn(r)
    assert r.closed
    r2 = pool.getconn()
    assert r2 is not r and maker.calls == 2
    pool.putconn(r2)
    s = pool.stats()
    assert s.closed_by_reason == {"max_use": 1}
    assert (s.size, s.idle) == (1, 1)


@pytest.mark.parametrize("option", ["max_lifetime", "max_idle"])
def test_expiry_with_fake_clock(make_pool: MakePool, option: str) -> None:
    """max_lifetime and max_idle close a resource once the (fake) clock passes them."""
    clock = FakeClock()
    opts = {"max_lifetime": 0.0, "max_idle": 0.0, option: 100.0}
    pool, maker = make_pool(clock=clock, health_check_interval=0, **opts)
    r = pool.getconn()
    pool.putconn(r)
    clock.advance(50)
    assert pool.getconn() is r  # not yet
    pool.putconn(r)
    clock.advance(101)
    r2 = pool.getconn()
    assert r2 is not r and maker.calls == 2
    assert r.closed
    # the background worker may be the one that closed it: poll
    assert wait_until(lambda: pool.stats().closed_by_reason == {option: 1})
    pool.putconn(r2)


def test_dead_resource_is_discarded_on_checkout(make_pool: MakePool) -> None:
    """alive() False on checkout: closed as 'broken', a new one handed out, counted once."""
    pool, maker = make_pool(liveness_after=0)
    r = pool.getconn()
    pool.putconn(r)
    r.dead = True
    r2 = pool.getconn()
    assert r2 is not r and r.closed and maker.calls == 2
    s = pool.stats()
    assert s.closed_by_reason == {"broken": 1}
    assert (s.size, s.in_use, s.idle) == (1, 1, 0)
    assert s.checkouts == 2  # the discarded one was never handed out
    pool.putconn(r2)


def test_query_liveness_on_checkout(make_pool: MakePool) -> None:
    """liveness="query" runs the full check on reuse and discards a resource that fails it."""
    pool, _ = make_pool(liveness="query", liveness_after=0)
    r = pool.getconn()
    assert r.checks == 0  # a new resource is not checked
    pool.putconn(r)
    assert pool.getconn() is r
    assert r.checks == 1
    pool.putconn(r)
    r.bad = True
    r2 = pool.getconn()
    assert r2 is not r and r.closed and r.checks == 2
    assert pool.stats().closed_by_reason == {"broken": 1}
    pool.putconn(r2)


@pytest.mark.parametrize("reset_result", [False, None], ids=["returns-false", "raises"])
def test_failed_reset_discards(make_pool: MakePool, reset_result: bool | None) -> None:
    """A reset that returns False or raises closes the resource instead of pooling it."""
    pool, _ = make_pool()
    r = pool.getconn()
    r.reset_result = reset_result
    pool.putconn(r)
    assert r.closed and r.resets == 1
    s = pool.stats()
    assert s.closed_by_reason == {"broken": 1}
    assert (s.size, s.idle, s.in_use) == (0, 0, 0)


def test_double_putconn_is_refused(make_pool: MakePool) -> None:
    """Returning a resource twice raises UsageError and changes nothing."""
    pool, _ = make_pool()
    r = pool.getconn()
    keep = pool.getconn()
    pool.putconn(r)
    before = pool.stats()
    with pytest.raises(UsageError, match="returned twice"):
        pool.putconn(r)
    after = pool.stats()
    assert (after.size, after.idle, after.in_use) == (before.size, before.idle, before.in_use) == (2, 1, 1)
    assert r.resets == 1 and not r.closed
    pool.putconn(keep)


def test_putconn_to_wrong_pool_is_refused(make_pool: MakePool) -> None:
    """A resource given to a pool it did not come from raises UsageError; both pools unchanged."""
    p1, _ = make_pool()
    p2, _ = make_pool()
    mine = p1.getconn()
    theirs = p2.getconn()
    with pytest.raises(UsageError):
        p1.putconn(theirs)
    for p in (p1, p2):
        s = p.stats()
        assert (s.size, s.idle, s.in_use) == (1, 0, 1)
    assert theirs.resets == 0
    p2.putconn(theirs)
    p1.putconn(mine)
    assert p2.stats().idle == 1


def test_connect_failure_then_backoff(make_pool: MakePool) -> None:
    """A failing factory gives ConnectFailed; during the backoff it is not called again."""
    clock = FakeClock()
    pool, maker = make_pool(clock=clock, health_check_interval=0, reconnect_delay=0.5)
    down = OSError("server down")
    maker.fail = down
    with pytest.raises(ConnectFailed, match="server down") as info:
        pool.getconn()
    assert info.value.__cause__ is down
    assert maker.calls == 1
    with pytest.raises(ConnectFailed):
        pool.getconn()
    assert maker.calls == 1  # backing off: the factory was left alone
    maker.fail = None
    clock.advance(0.6)
    r = pool.getconn()
    assert maker.calls == 2
    s = pool.stats()
    assert (s.connect_failures, s.size, s.in_use, s.created) == (1, 1, 1, 1)
    pool.putconn(r)


def _first_create_held(maker: Maker, error: str) -> tuple[threading.Event, threading.Event]:
    """The factory's first call sets `entered`, waits for `gate` (5 s at most), then raises OSError(error)."""
    entered, gate = threading.Event(), threading.Event()

    def hook(n: int) -> None:
        if n == 1:
            entered.set()
            gate.wait(5)
            raise OSError(error)

    maker.hook = hook
    return entered, gate


def _queue_behind_failing_create(pool: Pool[Res], maker: Maker) -> tuple[object, object, float]:
    """Caller 1's create fails while caller 2 is queued: both outcomes, and how long 2 took after."""
    entered, gate = _first_create_held(maker, "first create fails")
    # holders given: takes inside a "request" are not taken back when their thread ends (t2 ends holding one)
    t1, first = spawn(lambda: pool.getconn(holder="t1"))
    assert entered.wait(2)
    t2, second = spawn(lambda: (pool.getconn(timeout=5.0, holder="t2"), time.monotonic()))
    assert wait_until(lambda: pool.stats().waiting == 1)
    released = time.monotonic()
    gate.set()
    t1.join(5)
    t2.join(5)
    assert len(first) == 1 and len(second) == 1
    if isinstance(second[0], tuple):
        return first[0], second[0][0], second[0][1] - released
    return first[0], second[0], time.monotonic() - released


def test_waiter_gets_the_slot_of_a_failed_create(make_pool: MakePool) -> None:
    """A caller queued while another's create fails is handed the freed slot and creates."""
    pool, maker = make_pool(max_size=1, reconnect_delay=0.0)
    first, second, _ = _queue_behind_failing_create(pool, maker)
    assert isinstance(first, ConnectFailed)
    assert isinstance(second, Res)
    assert maker.calls == 2
    pool.putconn(second)
    s = pool.stats()
    assert (s.connect_failures, s.size, s.idle, s.waiting) == (1, 1, 1, 0)


def test_waiter_fails_fast_while_backing_off(make_pool: MakePool) -> None:
    """During a backoff, the waiter handed a failed create's slot gets ConnectFailed at once."""
    pool, maker = make_pool(max_size=1, reconnect_delay=5.0, reconnect_max_delay=5.0)
    first, second, waited = _queue_behind_failing_create(pool, maker)
    assert isinstance(first, ConnectFailed)
    assert isinstance(second, ConnectFailed)
    assert waited < 1.0  # not held until its 5 s timeout
    assert maker.calls == 1
    s = pool.stats()
    assert (s.connect_failures, s.size, s.waiting, s.timeouts) == (1, 0, 0, 0)


def test_min_size_filled_in_background(make_pool: MakePool) -> None:
    """open() returns at once and min_size is filled by the worker; getconn does not wait for it."""
    pool, maker = make_pool(min_size=2, max_size=4)
    gate = threading.Event()

    def hook(n: int) -> None:
        if threading.current_thread().name.endswith("-worker"):
            gate.wait(5)

    maker.hook = hook
    try:
        t0 = time.monotonic()
        pool.open()
        assert time.monotonic() - t0 < 0.5
        assert wait_until(lambda: maker.calls == 1)  # the worker is stuck creating
        t0 = time.monotonic()
        r = pool.getconn()
        assert time.monotonic() - t0 < 0.5
        pool.putconn(r)
    finally:
        gate.set()
    assert wait_until(lambda: pool.stats().idle == 2)
    s = pool.stats()
    assert (s.size, s.created, s.in_use) == (2, 2, 0)


def test_health_check_discards_failing_idle(make_pool: MakePool) -> None:
    """The background health check closes idle resources whose check fails."""
    clock = FakeClock()
    pool, _ = make_pool(clock=clock, health_check_interval=0.02)
    good = pool.getconn()
    bad = pool.getconn()
    pool.putconn(good)
    pool.putconn(bad)
    bad.bad = True
    clock.advance(1.0)
    assert wait_until(lambda: pool.stats().closed_by_reason.get("health_check") == 1)
    assert bad.closed and not good.closed
    assert good.checks >= 1
    assert wait_until(lambda: pool.stats().idle == 1)
    assert pool.getconn() is good
    pool.putconn(good)


def test_close_closes_idle_and_refuses_getconn(make_pool: MakePool) -> None:
    """close() closes idle resources; getconn afterwards raises PoolClosed."""
    pool, _ = make_pool()
    a = pool.getconn()
    b = pool.getconn()
    pool.putconn(a)
    pool.putconn(b)
    pool.close()
    assert pool.closed and a.closed and b.closed
    with pytest.raises(PoolClosed):
        pool.getconn()
    s = pool.stats()
    assert s.closed_by_reason == {"pool_closed": 2}
    assert (s.size, s.idle) == (0, 0)


def test_close_wakes_waiter_and_closes_late_return(make_pool: MakePool) -> None:
    """A waiter gets PoolClosed; a resource still out at close is closed when it comes back."""
    pool, _ = make_pool(max_size=1, timeout=5.0)
    r = pool.getconn()
    th, out = spawn(pool.getconn)
    assert wait_until(lambda: pool.stats().waiting == 1)
    pool.close(timeout=0.05)
    th.join(2)
    assert len(out) == 1 and isinstance(out[0], PoolClosed)
    assert not r.closed
    assert pool.stats().size == 1
    pool.putconn(r)
    assert r.closed
    s = pool.stats()
    assert s.closed_by_reason == {"pool_closed": 1}
    assert (s.size, s.in_use, s.waiting) == (0, 0, 0)


def test_close_waits_for_outstanding_return(make_pool: MakePool) -> None:
    """close() with a grace period returns once another thread gives back its resource."""
    pool, _ = make_pool()
    r = pool.getconn()
    go = threading.Event()

    def give_back() -> None:
        go.wait(5)
        if wait_until(lambda: pool.closed):
            pool.putconn(r)

    th, out = spawn(give_back)
    go.set()
    t0 = time.monotonic()
    pool.close(timeout=5.0)
    assert time.monotonic() - t0 < 2.0
    assert r.closed  # close() waited for the return
    th.join(2)
    assert out == [None]
    assert pool.stats().size == 0


def test_close_grace_does_not_depend_on_injected_clock(make_pool: MakePool) -> None:
    """close(timeout=...) gives up on a resource still out even if the pool's clock is frozen."""
    pool, _ = make_pool(clock=FakeClock(), health_check_interval=0)
    r = pool.getconn()
    closer, _ = spawn(lambda: pool.close(timeout=0.05))
    closer.join(0.5)
    hung = closer.is_alive()
    pool.putconn(r)  # unblocks close() either way
    closer.join(2)
    assert not hung
    assert r.closed


def test_commit_on_return_only_when_not_failed(make_pool: MakePool) -> None:
    """on_return="commit" commits on a clean return, never on a failed one."""
    pool, _ = make_pool(on_return="commit")
    r = pool.getconn()
    pool.putconn(r)
    assert r.commits == 1
    r = pool.getconn()
    pool.putconn(r, failed=True)
    assert r.commits == 1
    with pool.connection() as c:
        pass
    assert c.commits == 2
    with pytest.raises(KeyError), pool.connection() as c:
        raise KeyError("x")
    assert c.commits == 2
    assert c.resets == 4


def test_stats_json_and_consistent(make_pool: MakePool) -> None:
    """to_dict() is JSON-serialisable and counters agree after a mixed workload."""
    pool, _ = make_pool(max_size=2, timeout=0.05)
    a = pool.getconn()
    b = pool.getconn()
    ok = 2
    with pytest.raises(PoolTimeout):
        pool.getconn()
    pool.putconn(a)
    with pool.connection():
        ok += 1
    pool.putconn(b)
    for _ in range(3):
        pool.putconn(pool.getconn())
        ok += 1
    s = pool.stats()
    d = json.loads(json.dumps(s.to_dict()))
    assert d["name"] == pool.name and d["kind"] == "factory"
    assert d["closed_by_reason"] == {}
    assert s.checkouts == ok == 6
    assert (s.timeouts, s.in_use, s.waiting) == (1, 0, 0)
    assert s.size == s.idle == s.created == 2
    assert s.hold_time_max >= 0 and s.hold_time_total >= s.hold_time_max


def test_liveness_after_skips_recent_probes(make_pool: MakePool) -> None:
    """The poll test is skipped for a resource returned less than liveness_after ago, and run after that."""
    clock = [1000.0]
    pool, _ = make_pool(liveness_after=1.0, clock=lambda: clock[0], health_check_interval=0)
    r = pool.getconn()
    pool.putconn(r)
    r.dead = True
    clock[0] += 0.5
    assert pool.getconn() is r  # returned 0.5 s ago: not tested, handed out as is
    pool.putconn(r)
    clock[0] += 1.5
    r2 = pool.getconn()  # idle 1.5 s: tested, found dead, replaced
    assert r2 is not r
    pool.putconn(r2)
    assert pool.stats().closed_by_reason == {"broken": 1}


def test_pool_dropped_without_close_closes_its_idle_resources() -> None:
    """A pool nobody references any more closes what sits idle and its worker stops (no unclosed sockets)."""
    import gc
    import weakref

    maker = Maker()
    kind = FactoryKind(maker, close="close")
    pool: Pool[Res] = Pool(kind, max_size=3)
    taken = [pool.getconn() for _ in range(3)]
    for r in taken:
        pool.putconn(r)
    worker = pool._worker
    assert worker is not None and maker.alive_now == 3
    gone = weakref.ref(pool)
    del pool
    # The worker holds the pool strongly while a maintenance round runs (it may have been woken by the
    # returns above): the pool goes at the first collection after that round, so wait for it (bounded).
    deadline = time.monotonic() + 5
    gc.collect()
    while gone() is not None:
        assert time.monotonic() < deadline, "the pool was still referenced 5 s after its last user let go"
        time.sleep(0.01)
        gc.collect()
    assert maker.alive_now == 0 and all(r.closed for r in taken)
    worker.join(5)
    assert not worker.is_alive()


def test_checked_out_lists_what_is_out(make_pool: MakePool) -> None:
    """checked_out(): each resource out, its holder and how long, oldest first; nothing once returned."""
    clock = FakeClock()
    pool, _ = make_pool(max_size=3, clock=clock)
    first = pool.getconn(holder="first")
    clock.advance(2.0)
    second = pool.getconn(holder="second")
    clock.advance(1.0)
    out = pool.checked_out()
    assert [(c.resource, c.holder, c.held_for) for c in out] == [(first, "first", 3.0), (second, "second", 1.0)]
    pool.putconn(first)
    pool.putconn(second)
    assert pool.checked_out() == []


def test_join_waits_for_the_worker_of_a_closed_pool(make_pool: MakePool) -> None:
    """join(): True once the closed pool's background worker has stopped; True for a pool never opened."""
    pool, _ = make_pool()
    assert pool.join(0.1)
    pool.putconn(pool.getconn())
    pool.close()
    assert pool.join(5.0)


_EXIT_SCRIPT = """
import logging, sys
logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
from flask import Flask
from flask_proxypool import ProxyPool, db
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.pool import Pool

class R:
    def close(self):
        print("bare resource closed", flush=True)

app = Flask("exit")
app.config["PROXYPOOL_POOLS"] = {"db": {"kind": "sqlite3", "database": sys.argv[1]}}
ProxyPool(app)
with app.app_context():
    db.execute("SELECT 1")
bare = Pool(FactoryKind(R, close=lambda r: r.close()), name="bare")
bare.putconn(bare.getconn())
print("end of script", flush=True)
"""


def test_interpreter_exit_closes_idle_pools_at_once(tmp_path: t.Any) -> None:
    """At exit, idle pools close without waiting: no "still out" warning, and a bare pool's resources are closed."""
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "exit.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["end of script", "bare resource closed"]
    # the pool's finalizer used to close idle resources first at exit, behind the pool's back: close() then
    # waited its whole grace for them and said "closed with 0 resource(s) still out"
    assert "still out" not in out.stderr, out.stderr


def test_a_failure_older_than_a_success_does_not_back_off(make_pool: MakePool) -> None:
    """A create that fails after another one succeeded (in a failover: it began on the old primary) says
    nothing about the server now: no backoff, the next caller that needs one creates it."""
    pool, maker = make_pool(max_size=3, reconnect_delay=5.0, reconnect_max_delay=5.0)
    entered, gate = _first_create_held(maker, "old primary gone")
    t1, first = spawn(lambda: pool.getconn(holder="t1"))
    assert entered.wait(2)
    r2 = pool.getconn(holder="main")  # create 2 succeeds while create 1 still tries
    gate.set()
    t1.join(5)
    assert len(first) == 1 and isinstance(first[0], ConnectFailed)
    r3 = pool.getconn(holder="main")  # needs create 3: refused for 5 s if the stale failure backed off
    assert maker.calls == 3
    s = pool.stats()
    assert (s.connect_failures, s.size, s.in_use) == (1, 2, 2)
    pool.putconn(r2)
    pool.putconn(r3)


class Runner:
    """A thread that lives until `stop()` and runs what it is given, one call at a time (its tally cell stays)."""

    def __init__(self) -> None:
        import queue

        self._calls: queue.Queue[t.Callable[[], object] | None] = queue.Queue()
        self._results: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (fn := self._calls.get()) is not None:
            try:
                self._results.put(fn())
            except BaseException as e:  # pragma: no cover - raised again in the caller
                self._results.put(e)

    def __call__(self, fn: t.Callable[[], object]) -> t.Any:
        self._calls.put(fn)
        out = self._results.get(timeout=10)
        if isinstance(out, BaseException):
            raise out
        return out

    def stop(self) -> None:
        self._calls.put(None)
        self._thread.join(10)


def test_a_thread_without_its_own_takes_one_nobody_keeps_and_keeps_to_it(make_pool: MakePool) -> None:
    """The pool is full, and one idle resource was made by a thread that ended (a one-off helper): a request
    thread with none of its own takes that one rather than another live thread's own, and keeps to it; the
    owner keeps its own. (Taking A's and then preferring it had the two threads trade it back and forth.)"""
    pool, maker = make_pool(max_size=3, lifo=True)  # lifo: the pool's own order would hand out A's first
    a_thread, b_thread = Runner(), Runner()
    try:
        a = a_thread(lambda: pool.getconn(holder="a"))  # A makes its own, and holds it
        helper, out = spawn(lambda: pool.putconn(r := pool.getconn()) or r)  # a helper makes one, gives it back
        helper.join(10)
        (orphan,) = out
        entry = next(e for e in pool._idle if e.resource is orphan)
        assert wait_until(lambda: not entry.owner.alive)  # the helper's thread state is gone: it ended
        a_thread(lambda: pool.putconn(a))
        m = pool.getconn(holder="main")  # this thread makes the third: the pool is full
        assert maker.calls == 3 and pool.stats().idle == 2
        assert b_thread(lambda: pool.putconn(r := pool.getconn(holder="b")) or r) is orphan
        for _ in range(20):
            assert a_thread(lambda: pool.putconn(r := pool.getconn(holder="a")) or r) is a
            assert b_thread(lambda: pool.putconn(r := pool.getconn(holder="b")) or r) is orphan
        pool.putconn(m)
        assert maker.calls == 3
    finally:
        a_thread.stop()
        b_thread.stop()


def test_a_thread_that_used_another_threads_own_does_not_keep_to_it(make_pool: MakePool) -> None:
    """B finds the pool full and uses A's resource once; when room appears, B's next checkout in a request makes
    its own instead of going back to A's."""
    pool, maker = make_pool(max_size=2)
    a_thread, b_thread = Runner(), Runner()
    try:
        a = a_thread(lambda: pool.putconn(r := pool.getconn(holder="a")) or r)
        m = pool.getconn(holder="main")  # full
        assert b_thread(lambda: pool.putconn(r := pool.getconn(holder="b")) or r) is a  # the only idle one
        m.reset_result = False  # discarded on return: a slot frees
        pool.putconn(m)
        b = b_thread(lambda: pool.putconn(r := pool.getconn(holder="b")) or r)
        assert b is not a and maker.calls == 3
        assert a_thread(lambda: pool.putconn(r := pool.getconn(holder="a")) or r) is a
        assert b_thread(lambda: pool.putconn(r := pool.getconn(holder="b")) or r) is b
    finally:
        a_thread.stop()
        b_thread.stop()


def test_health_check_leaves_resources_used_since_its_last_round(make_pool: MakePool) -> None:
    """A resource its thread keeps to and used within `health_check_interval` is not checked: that use proved it,
    and taking it out of the idle queue would send the thread's next checkout elsewhere. The others are."""
    clock = FakeClock()
    pool, _ = make_pool(clock=clock, health_check_interval=10.0)
    a, b = pool.getconn(), pool.getconn()
    pool.putconn(a)
    pool.putconn(b)
    clock.advance(11.0)  # both idle a whole interval: both checked
    assert _wait_until(lambda: a.checks == 1 and b.checks == 1, timeout=5.0)
    assert _wait_until(lambda: pool.stats().idle == 2, timeout=5.0)  # both put back after their checks
    clock.advance(9.5)
    used = pool.getconn()  # this thread's own, 0.6 s (less than entries.KEEP) before the next round
    pool.putconn(used)
    other = a if used is b else b
    clock.advance(0.6)
    assert _wait_until(lambda: other.checks == 2, timeout=5.0)
    assert used.checks == 1
    assert _wait_until(lambda: pool.stats().idle == 2, timeout=5.0)  # the checked one is put back after its check


def test_a_thread_that_stopped_using_its_own_lets_go_of_it(make_pool: MakePool) -> None:
    """A thread that warmed the pool (an app factory's query) and serves nothing keeps its resource only for
    `KEEP` seconds after it last gave it back: then a request thread that has none adopts it and keeps to it."""
    from flask_proxypool.entries import KEEP

    clock = FakeClock()
    pool, maker = make_pool(clock=clock, max_size=1, health_check_interval=0)
    w = pool.getconn()  # this thread makes it: its own
    pool.putconn(w)
    entry = next(iter(pool._idle))
    main_cell = pool._cell()
    a_thread = Runner()
    try:
        a_cell = a_thread(pool._cell)
        assert a_thread(lambda: pool.putconn(r := pool.getconn(holder="a")) or r) is w  # the only one
        assert entry.owner is main_cell  # used by this thread just now: still its own
        clock.advance(KEEP + 0.1)
        assert a_thread(lambda: pool.putconn(r := pool.getconn(holder="a")) or r) is w
        assert entry.owner is a_cell  # let go, and adopted
        pool.putconn(pool.getconn())  # this thread uses it once more: it does not take it back
        assert entry.owner is a_cell and not main_cell.pinned
        assert maker.calls == 1
    finally:
        a_thread.stop()
