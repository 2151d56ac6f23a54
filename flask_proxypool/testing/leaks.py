"""Leak checks: which resources of an app's pools are still out, said in words, and taken back when a test ends.

`assert_all_returned` is the public check. The plugin uses the rest:
`call_leaks` (what the test function left out), `close_made` (close the
pools of apps a test made, reporting and taking back what is still out).
Everything here reads the pools through their public API
(`Pool.checked_out()`, `Pool.stats()`, `AppPools.opened()`).
"""

from __future__ import annotations

import logging
import time
import typing as t
from collections.abc import Iterable

from flask import Flask

from ..state import AppPools, app_state
from ..pool import Pool
from .held import held_by_pushed_contexts
from .records import Taken, Watch, stand_ins, watch_of

__all__ = ["assert_all_returned"]

logger = logging.getLogger("flask_proxypool")

#: How long the end of a test waits for a resource still out of a pool it closes.
CLOSE_TIMEOUT = 0.25
#: How long it waits for a closed pool's worker thread to exit (at once, unless it is stuck in a check).
JOIN_TIMEOUT = 2.0

HINT = (
    "Give every resource back: let the request or app context that took it end, use "
    "'with db.borrow(app) as conn:' rather than pool.getconn() without pool.putconn(), "
    "and join threads that hold one."
)


def _describe(taken: Taken | None, holder: str | None, held: float | None) -> str:
    if taken is not None:
        holder = taken.holder
        held = time.monotonic() - taken.at
    who = f"request {holder!r}" if holder else "code outside a request"
    out = f"taken by {who}"
    if taken is not None:
        out += f" in thread {taken.thread!r} during test {taken.phase}, at {taken.where}"
    if held is not None:
        out += f" (out for {held:.2f} s)"
    return out


def count(lines: list[str]) -> int:
    """How many resources the lines of a report name (one line each, under their pool's)."""
    return sum(1 for line in lines if line.startswith("    - "))


def leak_lines(app_name: str, pool: Pool[t.Any], watch: Watch | None, only: set[int] | None = None) -> list[str]:
    """Lines naming each resource out of `pool` (or only those whose id is in `only`)."""
    records = watch.records(pool) if watch is not None else {}
    lines = []
    seen: set[int] = set()
    for out in pool.checked_out():
        key = id(out.resource)
        seen.add(key)
        if only is not None and key not in only:
            continue
        # A TransactionPool's connection may have nested holders: one line each.
        stack: list[Taken] | list[None] = records.get(key) or [None]
        for taken in stack:
            lines.append("    - " + _describe(taken, out.holder, out.held_for))
    # Taken and never given back, but no longer out: the pool took it back (its thread ended, or
    # max_hold_action "reclaim"). Still a leak of the test's: the reclaim is a safety net, and
    # whether it ran before this check is a matter of timing.
    for key, stack_ in records.items():
        if key in seen or (only is not None and key not in only):
            continue
        for taken in stack_:
            lines.append("    - " + _describe(taken, None, None) + " (taken back by the pool since)")
    if not lines:
        return []
    head = f"  pool {pool.name!r} of app {app_name!r} ({pool.kind.name}: {pool.kind.describe()}):"
    return [head, *lines]


def _app_pools(app: Flask, watch: Watch | None) -> list[Pool[t.Any]]:
    """The pools `app` has made, with the test pools put in their place (even once they left it)."""
    pools: list[Pool[t.Any]] = list(app_state(app).opened().values())
    for p in [*stand_ins(app), *(watch.pools if watch is not None else [])]:
        if not any(p is q for q in pools):
            pools.append(p)
    return pools


def assert_all_returned(app: Flask, pools: Iterable[str] | None = None) -> None:
    """Fail (`AssertionError`) if a pool of `app` has a resource checked out.

    The message names each pool, who holds each resource (the request's
    endpoint, or code outside a request) and, under `proxypool_leak_check`,
    the thread and the line that took it. `pools` limits the check to
    these pool names (default: every pool the process has made for `app`).
    """
    watch = watch_of(app)
    names = None if pools is None else set(pools)
    lines: list[str] = []
    for pool in _app_pools(app, watch):
        if names is not None and pool.name not in names:
            continue
        if pool.stats().in_use == 0 and not (watch is not None and watch.records(pool)):
            continue
        lines += leak_lines(app.name, pool, watch)
    if lines:
        raise AssertionError(
            f"flask_proxypool: {count(lines)} resource(s) still checked out:\n" + "\n".join(lines) + "\n" + HINT
        )


def call_leaks(watch: Watch) -> str | None:
    """Resources taken while the test function ran, still out, and not bound to a pushed context."""
    bound = held_by_pushed_contexts()
    lines: list[str] = []
    for pool in watch.pools:
        leaked = {key for key, stack in watch.records(pool).items() if key not in bound and stack[-1].phase == "call"}
        if leaked:
            lines += leak_lines(watch.app.name, pool, watch, only=leaked)
    if not lines:
        return None
    return f"flask_proxypool: the test left {count(lines)} resource(s) checked out:\n" + "\n".join(lines) + "\n" + HINT


def close_made(made: Iterable[AppPools]) -> list[str]:
    """Close the pools of app registrations a test (or fixture) made; lines naming what was still out.

    Waits `CLOSE_TIMEOUT` at most per pool for a resource still out, then
    reports it and gives it back itself (closed, as the pool is): left out,
    it would live on in the pool's books, and a psycopg connection collected
    open warns in whichever later test the garbage collector runs.
    """
    lines: list[str] = []
    for reg in made:
        pools = reg.opened()
        try:
            reg.close(CLOSE_TIMEOUT)
        except Exception:
            logger.exception("app %r: closing its pools at the end of the test failed", reg.app_name)
        for pool in pools.values():
            found = leak_lines(reg.app_name, pool, None)
            if found:
                lines += found
                _reclaim_all(pool)
            pool.join(JOIN_TIMEOUT)
    return lines


def _reclaim_all(pool: Pool[t.Any]) -> None:
    """Give back, as failed, every resource still out of a closed pool: each is closed."""
    for out in pool.checked_out():
        try:
            pool.putconn(out.resource, failed=True)
        except Exception:
            logger.exception("pool %r: giving back a leaked resource failed", pool.name)
