"""Stress tests for real parallelism: many threads hammer one Pool while recycling, health checks,
random failures and close() run concurrently. They run on the GIL build and on free-threaded 3.13t.

The holders check the invariants themselves, continuously, through a :class:`Books` kept under its own
lock (never more than max_size alive, never one resource with two holders, never a closed one handed
out, pool stats consistent); they record violations, and the main thread asserts on the records.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import threading
import time
import typing as t
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from conftest import backends, wait_until
from flask_proxypool import maintenance
from flask_proxypool.errors import ConnectFailed, PoolClosed
from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.kinds.psycopg import PsycopgKind
from flask_proxypool.pool import Pool
from flask_proxypool.stats import PoolStats
from pgserver import PgServer

MAX_SIZE = 4
THREADS = 16
JOIN = 40.0  # seconds: a thread still running then is reported as stuck (hammer() gives up at 25)


@pytest.fixture(autouse=True)
def _busy_switching(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Switch threads often on the GIL build (more interleavings); keep the pool's expected warnings quiet."""
    caplog.set_level(logging.ERROR, logger="flask_proxypool")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


MakePool = Callable[..., Pool[t.Any]]


@pytest.fixture
def make_pool() -> Iterator[MakePool]:
    """Build pools that poll every idle resource they hand out; any still open at the end (a failed test) is closed."""
    made: list[Pool[t.Any]] = []

    def make(kind: t.Any, **kw: t.Any) -> Pool[t.Any]:
        kw.setdefault("liveness_after", 0.0)
        pool: Pool[t.Any] = Pool(kind, **kw)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close(timeout=1.0)


class Res:
    """A cheap fake resource."""

    __slots__ = ("closed", "dead", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False
        self.dead = ""  # the operation that found it dead; it stays dead, like a broken connection

    def __repr__(self) -> str:
        return f"<Res {self.n}{' closed' if self.closed else ''}>"


class Books:
    """The fake resources' own accounts, under their own lock, independent of the pool's.

    It is the factory and every hook of the kind, and the holders mark and unmark what they hold in
    it. ``fail`` gives each operation's chance of failing at random (from a seeded generator); a
    resource that failed a poll, check or reset is dead from then on, and fails every later one.
    """

    def __init__(self, max_size: int = MAX_SIZE, seed: int = 0, **fail: float) -> None:
        self.lock = threading.Lock()
        self.max_size = max_size
        self.rng = random.Random(seed)
        self.fail = {"create": 0.0, "alive": 0.0, "check": 0.0, "reset": 0.0, **fail}
        self.failed: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.ids = itertools.count(1)
        self.alive: set[int] = set()
        self.peak = 0
        self.created = self.closed = 0
        self.held: dict[int, int] = {}  # resource number -> holder number
        self.taken = 0
        self.violations: list[str] = []
        self.enough = threading.Event()  # set once ``taken`` reaches ``enough_at``
        self.enough_at = 0
        self.checked = threading.Event()  # set once ``checks_wanted`` health checks ran (or failed)
        self.checks_wanted = 5
        self.count_failed_checks = False

    def kind(self) -> FactoryKind:
        return FactoryKind(
            self.create, close=self.close, check=self.check, reset=self.reset, alive=self.poll, label="stress"
        )

    def _roll(self, what: str, r: Res | None = None) -> bool:
        """Under the lock: does this call fail? ``failed`` counts the resources that died in each operation."""
        self.calls[what] += 1
        if r is not None and r.dead:
            return True
        if self.fail[what] and self.rng.random() < self.fail[what]:
            self.failed[what] += 1
            if r is not None:
                r.dead = what
            return True
        return False

    def _bad(self, msg: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(msg)

    def _usable(self, r: Res, what: str) -> None:
        """Under the lock: the pool is working on ``r`` itself, so nobody may hold it and it is open."""
        if r.closed:
            self._bad(f"{what} of closed {r!r}")
        if r.n in self.held:
            self._bad(f"{what} of {r!r} while holder {self.held[r.n]} has it")

    # -- the kind's hooks: called by the pool, from any thread ---------------

    def create(self) -> Res:
        with self.lock:
            if self._roll("create"):
                raise ConnectionError("random create failure")
            r = Res(next(self.ids))
            self.alive.add(r.n)
            self.created += 1
            self.peak = max(self.peak, len(self.alive))
            if len(self.alive) > self.max_size:
                self._bad(f"{len(self.alive)} resources alive, max_size is {self.max_size}")
        return r

    def close(self, r: Res) -> None:
        with self.lock:
            if r.closed:
                self._bad(f"{r!r} closed twice")
            if r.n in self.held:
                self._bad(f"{r!r} closed while holder {self.held[r.n]} has it")
            r.closed = True
            self.alive.discard(r.n)
            self.closed += 1

    def poll(self, r: Res) -> bool:
        with self.lock:
            self._usable(r, "liveness poll")
            if self._roll("alive", r):
                if self.rng.random() < 0.5:
                    raise OSError("random poll failure")
                return False
            return True

    def check(self, r: Res) -> bool:
        with self.lock:
            self._usable(r, "health check")
            bad = self._roll("check", r)
            counted = self.failed["check"] if self.count_failed_checks else self.calls["check"]
            if counted >= self.checks_wanted:
                self.checked.set()
            if bad:
                if self.rng.random() < 0.5:
                    raise OSError("random check failure")
                return False
            return True

    def reset(self, r: Res) -> bool:
        with self.lock:
            self._usable(r, "reset")
            if self._roll("reset", r):
                if self.rng.random() < 0.5:
                    raise OSError("random reset failure")
                return False
            return True

    # -- the holders' side -----------------------------------------------------

    def take(self, r: Res, who: int, stats: PoolStats | None) -> None:
        """A holder got ``r``: it must be open, held by nobody else; the pool's counts must add up."""
        with self.lock:
            if r.closed:
                self._bad(f"holder {who} was handed closed {r!r}")
            if r.n in self.held:
                self._bad(f"{r!r} handed to holder {who} while holder {self.held[r.n]} has it")
            if r.n not in self.alive:
                self._bad(f"holder {who} was handed {r!r}, which the factory does not know as alive")
            self.held[r.n] = who
            if len(self.held) > self.max_size:
                self._bad(f"{len(self.held)} resources held at once, max_size is {self.max_size}")
            self.taken += 1
            if self.enough_at and self.taken >= self.enough_at:
                self.enough.set()
        if stats is not None:
            problem = stats_problem(stats, self.max_size, holding=True)
            if problem:
                with self.lock:
                    self._bad(f"holder {who}: {problem}")

    def give(self, r: Res, who: int) -> None:
        """A holder is about to return ``r``."""
        with self.lock:
            if self.held.pop(r.n, None) != who:
                self._bad(f"holder {who} returns {r!r}, which the books do not show as its own")


def stats_problem(s: PoolStats, max_size: int, *, holding: bool) -> str:
    """What is wrong with one snapshot taken while the pool runs ('' if nothing)."""
    if not s.size <= max_size:
        return f"size {s.size} > max_size {max_size}"
    if not s.idle + s.in_use <= s.size:
        return f"idle {s.idle} + in_use {s.in_use} > size {s.size}"
    if holding and s.in_use < 1:
        return "in_use is 0 while a holder has a resource"
    if s.created - s.closed > s.size:
        return f"created {s.created} - closed {s.closed} > size {s.size}"
    return ""


def run_threads(n: int, target: Callable[[int], None], join: float = JOIN) -> tuple[list[str], list[str]]:
    """Run ``target(i)`` in n threads started together; return (errors raised, names of threads still running)."""
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            target(i)
        except BaseException as e:  # reported by the main thread
            with lock:
                errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,), name=f"stress-{i}", daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + join
    for th in threads:
        th.join(max(deadline - time.monotonic(), 0.0))
    return errors, [th.name for th in threads if th.is_alive()]


def settled(pool: Pool[t.Any], timeout: float = 5.0) -> PoolStats:
    """Bounded poll for a snapshot with nothing out, being created or being checked (size == idle)."""
    deadline = time.monotonic() + timeout
    while True:
        s = pool.stats()
        if ((s.in_use, s.waiting) == (0, 0) and s.size == s.idle) or time.monotonic() > deadline:
            return s
        time.sleep(0.001)


def spin(n: int) -> None:
    """Hold the CPU briefly (work, not a wait)."""
    for _ in range(n):
        pass


class _Boom(Exception):
    """Raised by a holder inside ``with pool.connection()``: its work failed."""


def hammer(
    pool: Pool[Res],
    books: Books,
    who: int,
    target: int,
    outcomes: Counter[str],
    seed: int,
    until: threading.Event | None = None,
    limit: float = 25.0,
    think: int = 200,
) -> None:
    """Take and return resources until ``target`` checkouts succeeded and ``until`` is set, or the pool closes.

    Half of the checkouts go through getconn/putconn, half through ``with pool.connection()``; some fail.
    Bounded: it stops after ``limit`` seconds whatever happened (the caller's asserts then fail).
    """
    rng = random.Random(seed)
    deadline = time.monotonic() + limit

    def hold(r: Res, snapshot: bool) -> None:
        outcomes["ok"] += 1
        books.take(r, who, pool.stats() if snapshot else None)
        spin(rng.randrange(200))
        books.give(r, who)

    for attempt in itertools.count():
        if outcomes["ok"] >= target and (until is None or until.is_set()):
            return
        if attempt % 64 == 0 and time.monotonic() > deadline:
            outcomes["gave_up"] += 1
            return
        failed = rng.random() < 0.2
        try:
            if rng.random() < 0.5:
                r = pool.getconn(timeout=10.0)
                hold(r, attempt % 8 == 0)
                pool.putconn(r, failed=failed)
            else:
                with pool.connection(timeout=10.0) as r:
                    hold(r, attempt % 8 == 0)
                    if failed:
                        raise _Boom
        except _Boom:
            outcomes["boom"] += 1
        except ConnectFailed:
            outcomes["connect_failed"] += 1
        except PoolClosed:
            outcomes["closed"] += 1
            return
        spin(rng.randrange(think))  # holding nothing now: idle resources exist for the health checks


def quiet(pool: Pool[Res], books: Books, timeout: float = 20.0) -> tuple[PoolStats, int]:
    """Bounded poll for a quiet moment of a pool whose worker still refills and expires resources.

    Quiet: nothing out, created, checked or closed (size == idle, and the same counts in two snapshots
    taken either side of reading the books). Returns the snapshot and the books' count of resources alive.
    """
    deadline = time.monotonic() + timeout
    while True:
        s1 = pool.stats()
        with books.lock:
            alive = len(books.alive)
        s2 = pool.stats()
        counts = (s1.size, s1.idle, s1.created, s1.closed, s1.checkouts)
        calm = (s1.in_use, s1.waiting) == (0, 0) and s1.size == s1.idle
        if (calm and counts == (s2.size, s2.idle, s2.created, s2.closed, s2.checkouts)) or time.monotonic() > deadline:
            return s2, alive
        time.sleep(0.001)


def finish(pool: Pool[Res], books: Books, ok: int) -> PoolStats:
    """Check the counters once the holders are done, close the pool, check that nothing was lost."""
    s, alive = quiet(pool, books)
    assert (s.in_use, s.waiting) == (0, 0)
    assert s.size == s.idle <= MAX_SIZE
    assert s.created - s.closed == s.size
    assert s.checkouts == ok
    assert alive == s.size  # every resource the pool counts exists, no other does
    assert books.held == {}
    pool.close(timeout=5.0)
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.waiting) == (0, 0, 0, 0)
    assert s.created == s.closed == books.created == books.closed
    assert sum(s.closed_by_reason.values()) == s.closed
    assert s.checkouts == ok
    assert books.alive == set()
    assert books.peak <= MAX_SIZE
    assert books.violations == []
    return s


RECYCLING: dict[str, dict[str, float]] = {
    "max_use": {"max_use": 3},
    "max_lifetime": {"max_lifetime": 0.002, "max_idle": 0.001},
}
#: (threads, min_size). "contended": 16 threads on max_size 4, so a returned resource goes straight to a
#: waiter and none is ever idle. "spare": 3 threads, min_size 4 refilled in the background, so idle
#: resources are there for the health checks to take while the holders hammer.
LOADS = {"contended": (THREADS, 1), "spare": (3, MAX_SIZE)}


@pytest.mark.parametrize("load", sorted(LOADS))
@pytest.mark.parametrize("recycle", sorted(RECYCLING))
def test_hammer_with_recycling_and_health_checks(make_pool: MakePool, recycle: str, load: str) -> None:
    """Threads x 300 checkouts on max_size 4, recycling, refill and health checks running: the invariants hold."""
    threads, min_size = LOADS[load]
    books = Books()
    pool: Pool[Res] = make_pool(
        books.kind(),
        max_size=MAX_SIZE,
        min_size=min_size,
        timeout=10.0,
        health_check_interval=0.001,
        **RECYCLING[recycle],
    )
    per_thread = 300
    until = books.checked if load == "spare" else None
    outcomes = [Counter[str]() for _ in range(threads)]
    errors, stuck = run_threads(threads, lambda i: hammer(pool, books, i, per_thread, outcomes[i], seed=i, until=until))
    assert errors == [] and stuck == []
    assert all(o["ok"] >= per_thread and o["gave_up"] == 0 for o in outcomes), outcomes
    ok = sum(o["ok"] for o in outcomes)
    assert books.taken == ok
    s = finish(pool, books, ok)
    assert s.closed_by_reason.get(recycle, 0) > 0  # the recycling under test did happen
    assert books.calls["reset"] == ok  # every checkout was reset on return
    if until is not None:
        assert books.calls["check"] >= books.checks_wanted  # health checks ran while the holders worked


#: fifo_after: 0 hands every returned resource to the oldest waiter; 60 never does within a test (waiters are
#: only woken to compete for idle resources, so one lost wake-up leaves a waiter stuck until its timeout and
#: the test fails); the default (0.5 ms) mixes both.
FIFO = {"strict": 0.0, "default": None, "barging": 60.0}


@pytest.mark.parametrize("fifo", sorted(FIFO))
def test_hammer_with_barging_waiters(make_pool: MakePool, fifo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 threads x 300 on max_size 4 with recycling, under each hand-over policy: nothing lost, nobody stuck.

    A sampler reads the pool under its lock meanwhile: a waiter is never left asleep while a resource it
    could take is idle (woken waiters >= min(idle, queued)). A return appends to the idle queue without
    the lock, then wakes a waiter: so the sampler fails the test only on a shortfall that lasts 0.5 s,
    far longer than a return is ever descheduled between the two, and far shorter than the pool's
    timeout. The maintenance worker's backstop, which would wake such a waiter within a second, is off.
    """
    monkeypatch.setattr(maintenance, "TASKS", tuple(t for t in maintenance.TASKS if t.name != "wake_waiters"))
    books = Books()
    kw = {} if FIFO[fifo] is None else {"fifo_after": FIFO[fifo]}
    pool: Pool[Res] = make_pool(books.kind(), max_size=MAX_SIZE, min_size=1, timeout=10.0, max_use=5, **kw)
    outcomes = [Counter[str]() for _ in range(THREADS)]
    done = threading.Event()
    broken: list[str] = []
    samples = [0]

    def sample() -> None:
        short_since = None  # when the current shortfall was first seen
        while not done.is_set():
            with pool._lock:
                woken, idle, queued = pool._wakened, len(pool._idle), len(pool._waiters)
            now = time.monotonic()
            if woken >= min(idle, queued):
                short_since = None
            elif short_since is None:
                short_since = now
            elif now - short_since > 0.5:
                broken.append(f"{woken} woken < min({idle} idle, {queued} queued) for 0.5 s")
                short_since = None
            samples[0] += 1
            spin(100)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        errors, stuck = run_threads(THREADS, lambda i: hammer(pool, books, i, 300, outcomes[i], seed=i, think=20))
    finally:
        done.set()
        sampler.join(10)
    assert errors == [] and stuck == []
    assert broken == [] and samples[0] > 0
    assert all(o["ok"] >= 300 and o["gave_up"] == 0 for o in outcomes), outcomes
    ok = sum(o["ok"] for o in outcomes)
    s = finish(pool, books, ok)
    assert s.timeouts == 0
    assert s.wait_count > 0  # the threads did queue


@pytest.mark.parametrize("load", sorted(LOADS))
def test_random_failures_on_create_check_and_reset(make_pool: MakePool, load: str) -> None:
    """Seeded random failures of create, poll, health check and reset: each one accounted for, nothing leaked."""
    threads, min_size = LOADS[load]
    books = Books(seed=6, create=0.05, alive=0.05, check=0.2, reset=0.05)
    books.count_failed_checks, books.checks_wanted = True, 3
    pool: Pool[Res] = make_pool(
        books.kind(),
        max_size=MAX_SIZE,
        min_size=min_size,
        timeout=10.0,
        max_use=5,
        health_check_interval=0.001,
        reconnect_delay=0.0002,
        reconnect_max_delay=0.001,
    )
    per_thread = 300
    until = books.checked if load == "spare" else None
    outcomes = [Counter[str]() for _ in range(threads)]
    errors, stuck = run_threads(
        threads, lambda i: hammer(pool, books, i, per_thread, outcomes[i], seed=100 + i, until=until)
    )
    assert errors == [] and stuck == []
    assert all(o["ok"] >= per_thread and o["gave_up"] == 0 for o in outcomes), outcomes
    s = finish(pool, books, sum(o["ok"] for o in outcomes))
    assert all(books.failed[w] > 0 for w in ("create", "alive", "reset")), books.failed
    if until is not None:
        assert books.failed["check"] >= 3
    assert s.connect_failures == books.failed["create"]
    # a failed poll or reset discards the resource as broken; a failed health check, as health_check
    assert s.closed_by_reason.get("broken", 0) == books.failed["alive"] + books.failed["reset"]
    assert s.closed_by_reason.get("health_check", 0) == books.failed["check"]
    assert s.created == books.calls["create"] - books.failed["create"]
    assert sum(o["connect_failed"] for o in outcomes) > 0  # callers saw the backoff as fast ConnectFailed


@pytest.mark.parametrize("round_", range(3))
def test_close_races_with_hammering(make_pool: MakePool, round_: int) -> None:
    """close() while 16 threads hammer (with recycling and health checks): each ends on PoolClosed, nothing leaks."""
    books = Books(seed=round_, reset=0.02)
    books.enough_at = 1000
    pool: Pool[Res] = make_pool(
        books.kind(), max_size=MAX_SIZE, min_size=2, timeout=10.0, max_use=4, health_check_interval=0.001
    )
    pool.open()  # the worker is running before the race (closing while it starts: see the test below)
    outcomes = [Counter[str]() for _ in range(THREADS)]
    closer: list[BaseException] = []

    def close_when_busy() -> None:
        if not books.enough.wait(20):
            closer.append(TimeoutError("the holders never reached 1000 checkouts"))
        try:
            pool.close(timeout=5.0)
        except BaseException as e:  # reported by the main thread
            closer.append(e)

    th = threading.Thread(target=close_when_busy, daemon=True)
    th.start()
    errors, stuck = run_threads(THREADS, lambda i: hammer(pool, books, i, 10**9, outcomes[i], seed=10 * round_ + i))
    th.join(JOIN)
    assert not th.is_alive() and closer == []
    assert errors == [] and stuck == []
    assert [o["closed"] for o in outcomes] == [1] * THREADS  # every holder stopped on PoolClosed
    assert sum(o["connect_failed"] for o in outcomes) == 0
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.waiting, s.timeouts) == (0, 0, 0, 0, 0)
    assert s.created == s.closed == books.created == books.closed
    assert s.checkouts == books.taken >= 1000
    assert books.alive == set() and books.held == {}
    assert books.peak <= MAX_SIZE
    assert books.violations == []


def test_close_while_the_worker_is_starting(make_pool: MakePool, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() while open() is still starting the background worker: close returns, the worker ends."""
    entered, go = threading.Event(), threading.Event()

    class GatedStart(threading.Thread):
        """Pool workers pause at start() until told to go, holding open() in the window being tested."""

        def start(self) -> None:
            if self.name.endswith("-worker"):
                entered.set()
                go.wait(10)
            super().start()

    monkeypatch.setattr(threading, "Thread", GatedStart)
    books = Books()
    pool: Pool[Res] = make_pool(books.kind(), max_size=MAX_SIZE)
    opened: list[BaseException | None] = []

    def open_pool() -> None:
        try:
            pool.open()
        except BaseException as e:  # reported by the main thread
            opened.append(e)
        else:
            opened.append(None)

    opener = threading.Thread(target=open_pool, daemon=True)  # GatedStart, but not a "-worker": not held
    opener.start()
    closed: list[BaseException | None] = []

    def close_pool() -> None:
        try:
            pool.close(timeout=1.0)
        except BaseException as e:  # reported by the main thread
            closed.append(e)
        else:
            closed.append(None)

    closer = threading.Thread(target=close_pool, daemon=True)
    try:
        assert entered.wait(10)  # open() is inside worker.start()
        closer.start()  # close() now races with the worker's start
    finally:
        go.set()
        opener.join(10)
        closer.join(10)
    assert not opener.is_alive() and opened == [None]
    assert not closer.is_alive() and closed == [None]
    deadline = time.monotonic() + 5
    while any(th.name == f"{pool.name}-worker" for th in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.001)  # bounded poll: the worker sees the pool closed and ends
    assert not any(th.name == f"{pool.name}-worker" for th in threading.enumerate())
    assert pool.closed and books.alive == set()


def _take_all(pool: Pool[Res], books: Books) -> list[Res]:
    held = [pool.getconn() for _ in range(MAX_SIZE)]
    for r in held:
        books.take(r, -1, None)
    return held


def _queue_waiters(pool: Pool[Res], n: int, results: list[object]) -> list[threading.Thread]:
    lock = threading.Lock()

    def wait_for_one() -> None:
        try:
            got: object = pool.getconn(timeout=20.0)
        except BaseException as e:  # what the waiter got is the result
            got = e
        with lock:
            results.append(got)

    threads = [threading.Thread(target=wait_for_one, daemon=True) for _ in range(n)]
    for th in threads:
        th.start()
    wait_until(lambda: pool.stats().waiting >= n, 10)  # bounded poll: all queued
    return threads


def test_close_fails_every_waiter(make_pool: MakePool) -> None:
    """12 threads wait on an exhausted pool; close() fails each with PoolClosed at once; the late returns are closed."""
    books = Books()
    pool: Pool[Res] = make_pool(books.kind(), max_size=MAX_SIZE, timeout=10.0)
    held = _take_all(pool, books)
    results: list[object] = []
    waiters = _queue_waiters(pool, 12, results)
    assert pool.stats().waiting == 12
    closer = threading.Thread(target=pool.close, kwargs={"timeout": 10.0}, daemon=True)
    closer.start()
    for th in waiters:  # answered while the resources are still out: not served, failed
        th.join(5)
    assert not any(th.is_alive() for th in waiters)
    assert len(results) == 12 and all(isinstance(r, PoolClosed) for r in results), results
    assert closer.is_alive()  # still waiting for the resources out
    for r in held:
        books.give(r, -1)
        pool.putconn(r)
    closer.join(5)
    assert not closer.is_alive()
    s = pool.stats()
    assert (s.size, s.in_use, s.waiting, s.timeouts, s.checkouts) == (0, 0, 0, 0, MAX_SIZE)
    assert s.created == s.closed == MAX_SIZE
    assert s.closed_by_reason == {"pool_closed": MAX_SIZE}
    assert books.alive == set() and books.violations == []


@pytest.mark.parametrize("round_", range(10))
def test_close_races_with_returns_to_waiters(make_pool: MakePool, round_: int) -> None:
    """Returns to 12 queued waiters race with close(): each waiter gets a resource or PoolClosed, nothing is lost."""
    books = Books()
    pool: Pool[Res] = make_pool(books.kind(), max_size=MAX_SIZE, timeout=10.0)
    held = _take_all(pool, books)
    results: list[object] = []
    waiters = _queue_waiters(pool, 12, results)
    assert pool.stats().waiting == 12
    go = threading.Barrier(2)

    def close() -> None:
        go.wait(5)
        pool.close(timeout=10.0)

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    go.wait(5)
    for r in held:
        books.give(r, -1)
        pool.putconn(r)
    for th in waiters:
        th.join(5)
    assert not any(th.is_alive() for th in waiters)
    served = [r for r in results if isinstance(r, Res)]
    assert len(results) == 12
    assert all(isinstance(r, PoolClosed) for r in results if not isinstance(r, Res)), results
    assert len(served) <= MAX_SIZE
    assert all(not r.closed for r in served)  # handed out open, even with close() running
    for r in served:  # given back after close(): closed then
        books.take(r, -2, None)
        books.give(r, -2)
        pool.putconn(r)
    closer.join(10)
    assert not closer.is_alive()
    s = pool.stats()
    assert (s.size, s.in_use, s.waiting, s.timeouts) == (0, 0, 0, 0)
    assert s.checkouts == MAX_SIZE + len(served)
    assert s.created == s.closed == MAX_SIZE
    assert books.alive == set() and books.violations == []


def test_postgresql_hammer(make_pool: MakePool, pg: PgServer, conninfo: str, appname: str) -> None:
    """16 threads x 200 psycopg checkouts on max_size 4: never above 4 backends, never one shared."""
    per_thread = 200
    pool = make_pool(PsycopgKind(conninfo), max_size=MAX_SIZE, timeout=20.0, health_check_interval=0.05)
    lock = threading.Lock()
    held: dict[int, int] = {}  # backend pid -> holder
    violations: list[str] = []
    ok = [0] * THREADS
    samples: list[int] = []
    stop = threading.Event()
    sample_errors: list[BaseException] = []

    def sample() -> None:
        try:
            while not stop.is_set() and len(samples) < 5000:
                samples.append(len(backends(pg, appname)))
        except BaseException as e:  # reported by the main thread
            sample_errors.append(e)

    def work(i: int) -> None:
        for n in range(per_thread):
            conn = pool.getconn()
            try:
                # the transaction stays open: the pool rolls it back on return
                row = conn.execute("SELECT pg_backend_pid(), txid_current()").fetchone()
                pid = row[0] if row else -1
                with lock:
                    if pid in held:
                        violations.append(f"backend {pid} handed to holder {i} while holder {held[pid]} has it")
                    held[pid] = i
                    if len(held) > MAX_SIZE:
                        violations.append(f"{len(held)} backends held at once")
                if n % 50 == 0:
                    problem = stats_problem(pool.stats(), MAX_SIZE, holding=True)
                    if problem:
                        with lock:
                            violations.append(problem)
                with lock:
                    del held[pid]
            finally:
                pool.putconn(conn)
            ok[i] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.monotonic()
        errors, stuck = run_threads(THREADS, work, join=60.0)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        sampler.join(10)
    assert errors == [] and stuck == []
    assert sample_errors == [] and not sampler.is_alive()
    assert violations == []
    assert ok == [per_thread] * THREADS
    assert len(samples) >= 5 and max(samples) > 0  # sampled while the holders were connected
    assert max(samples) <= MAX_SIZE, samples
    s = settled(pool)
    assert (s.in_use, s.waiting) == (0, 0)
    assert s.checkouts == THREADS * per_thread
    assert s.created - s.closed == s.size == s.idle <= MAX_SIZE
    assert len(backends(pg, appname)) == s.size
    assert all(state == "idle" for _, state in backends(pg, appname))  # every transaction rolled back
    pool.close(timeout=5.0)
    wait_until(lambda: not backends(pg, appname), 10, 0.01)  # the server sees them go
    assert backends(pg, appname) == []
    print(
        f"postgresql: {THREADS * per_thread} checkouts in {elapsed:.2f} s, {len(samples)} samples, max {max(samples)}"
    )
