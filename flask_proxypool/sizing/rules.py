"""The per-pool sizing rules: each one names what it checks in a pool's stats and what it advises.

`T` is the requests one worker serves at once (its threads, or
`worker_connections` for gevent), `M` the pool's `max_size`. The rules
run in tiers; the first tier that finds something decides the verdict:

1. `TOO_SMALL`: checkouts timed out (503), were refused (`max_waiting`),
   waited often (`Thresholds.wait_ratio`) or long (`Thresholds.wait_p95`);
   failing those, `busier_than_max_size` (Little's law, with the rate).
   `grow_to` says how far: what Little's law needs when the rate is known,
   else `T`. If `M >= T` already, growing does not help: something holds
   resources outside requests (see top holders).
2. `TOO_LARGE`: `M > T` (requests can never use more), the pool never
   grew to `M` under real load (it grows only when every resource is busy,
   so `size` is its high-water mark), or the rate says far fewer are busy.
   Suggested: the smallest of those bounds, never below the high-water mark.
3. Otherwise `quiet_verdict`: `ok`, or `no data` without traffic.

`INFO` rules add facts that change no number. With a pool's rate (its
checkouts per second over all workers), Little's law gives the mean number
busy per worker, `L = rate / workers x mean hold`, and square-root staffing
adds headroom for bursts: `ceil(L + 2 sqrt(L))`.
"""

from __future__ import annotations

import typing as t

from ..stats import PoolStats
from .deployment import Deployment
from .evidence import DEFAULT_THRESHOLDS, Evidence, Finding, PoolAdvice, Rule, Thresholds, _ms

__all__ = [
    "INFO",
    "TOO_LARGE",
    "TOO_SMALL",
    "above_concurrency",
    "advise_pool",
    "busier_than_max_size",
    "busy_below_max_size",
    "closed_after_max_idle",
    "grow_to",
    "idle_but_peaked",
    "never_grew",
    "quiet_verdict",
    "refused",
    "timed_out",
    "waits_long",
    "waits_often",
]


# -- too small --------------------------------------------------------------


def timed_out(e: Evidence) -> Finding | None:
    """Checkouts timed out: callers waited `timeout` for nothing and got HTTP 503."""
    n = e.stats.timeouts
    return Finding(f"{n} checkout(s) timed out after waiting `timeout` (HTTP 503)") if n else None


def refused(e: Evidence) -> Finding | None:
    """Checkouts were refused at once: `max_waiting` callers were already queued."""
    n = e.stats.refused
    return Finding(f"{n} checkout(s) were refused at once because max_waiting callers were queued") if n else None


def waits_often(e: Evidence) -> Finding | None:
    """More than `Thresholds.wait_ratio` of the checkouts had to wait for a free resource."""
    if not e.waits_often:
        return None
    return Finding(
        f"{e.wait_ratio:.1%} of checkouts had to wait for a free resource "
        f"(p95 wait {_ms(e.stats.wait_time_p95)}; more than {e.thresholds.wait_ratio:.0%} is too many)"
    )


def waits_long(e: Evidence) -> Finding | None:
    """Waits were few but long: their p95 reached `Thresholds.wait_p95`."""
    s = e.stats
    if e.waits_often or not s.wait_count or s.wait_time_p95 < e.thresholds.wait_p95:
        return None
    return Finding(
        f"waits are long: p95 {_ms(s.wait_time_p95)} (at most {_ms(e.thresholds.wait_p95)} is fine), "
        f"though only {e.wait_ratio:.1%} of checkouts waited"
    )


def busier_than_max_size(e: Evidence) -> Finding | None:
    """With the rate: Little's law needs more than `max_size` to cover bursts, though nothing above fired."""
    if e.needed is None or e.needed <= e.max_size:
        return None
    return Finding(f"{e.littles_law()}: {e.needed} cover the bursts", e.needed)


TOO_SMALL: tuple[Rule, ...] = (timed_out, refused, waits_often, waits_long)


def grow_to(e: Evidence) -> tuple[int, str | None]:
    """How far a too-small pool should grow, with a word when the number is a guess or growing is not the fix."""
    m, conc = e.max_size, e.concurrency
    if m < conc:
        note = None
        if e.needed is not None:
            target = max(e.needed, m + 1)
        elif e.deployment.is_async:
            target = 2 * m
            note = "pass the request rate (--rate) for a better number than doubling"
        else:
            target = conc
        return (target if e.held_outside_requests else min(target, conc)), note
    if e.needed is not None and e.needed > m:
        return e.needed, None
    return m, (
        f"max_size is already >= the {conc} {e.per_worker} per worker, so requests alone cannot exhaust "
        "it: resources are held outside requests (borrow(), background threads) or several at once; "
        "see top holders before growing the pool"
    )


# -- too large --------------------------------------------------------------


def above_concurrency(e: Evidence) -> Finding | None:
    """`max_size` above the worker's concurrency: a request holds one resource per pool, so the rest stay idle.

    Kept (no number) when top holders show code outside requests using them.
    """
    m, conc, per = e.max_size, e.concurrency, e.per_worker
    if m <= conc:
        return None
    if e.held_outside_requests:
        return Finding(
            f"max_size {m} is above the {conc} {per} per worker; requests can hold at most {conc} "
            "at once, so the rest serve only code outside requests (seen in top holders)"
        )
    return Finding(
        f"max_size {m} is above the {conc} {per} per worker: a request holds at most one "
        f"resource per pool, so at most {conc} can ever be in use at once",
        conc,
    )


def never_grew(e: Evidence) -> Finding | None:
    """Under real load and without one wait, the pool stayed below `max_size`: its high-water mark was enough."""
    s = e.stats
    if not e.enough_traffic or s.wait_count or s.size >= s.max_size:
        return None
    peak = max(s.size, s.min_size, 1)
    return Finding(
        f"the pool never grew beyond {s.size} of {s.max_size} in {s.checkouts} checkouts (it grows only when "
        f"every resource is busy): {peak} were enough for this load",
        peak,
    )


def _littles_fewer(e: Evidence) -> int | None:
    """With the rate, what Little's law needs when below `max_size`, floored by the observed peak."""
    if e.needed is None or e.needed >= e.max_size:
        return None
    return max(e.needed, e.observed_peak)


def _utilisation(e: Evidence) -> str:
    return f"{e.littles_law()} (utilisation {(e.busy or 0.0) / e.max_size:.0%} of {e.max_size})"


def busy_below_max_size(e: Evidence) -> Finding | None:
    """With the rate: Little's law, floored by the observed peak, needs fewer than `max_size`."""
    n = _littles_fewer(e)
    if n is None or n >= e.max_size:
        return None
    return Finding(f"{_utilisation(e)}; {n} cover the bursts", n)


TOO_LARGE: tuple[Rule, ...] = (above_concurrency, never_grew, busy_below_max_size)


# -- information, and the quiet verdicts ---------------------------------------------


def idle_but_peaked(e: Evidence) -> Finding | None:
    """With the rate: idle on average, yet the peaks used every resource; said, not acted on."""
    n = _littles_fewer(e)
    if n is None or n < e.max_size:
        return None
    return Finding(f"{_utilisation(e)}: idle most of the time, yet the peaks used all {e.max_size}")


def closed_after_max_idle(e: Evidence) -> Finding | None:
    """Resources were closed after `max_idle`: the pool had idle resources for a while."""
    n = e.stats.closed_by_reason.get("max_idle", 0)
    if not n:
        return None
    return Finding(f"{n} resource(s) were closed after max_idle: the pool had idle resources for a while")


INFO: tuple[Rule, ...] = (idle_but_peaked, closed_after_max_idle)


def quiet_verdict(e: Evidence) -> tuple[str, str]:
    """No rule fired: `no data` without a checkout, else `ok` and why."""
    s = e.stats
    if s.checkouts == 0:
        return "no data", "no checkouts in this process: stats of a process that served traffic are needed"
    if not e.enough_traffic:
        return "ok", f"only {s.checkouts} checkout(s) so far: judge again after real traffic"
    if s.wait_count:
        return "ok", f"{e.wait_ratio:.1%} of checkouts waited, p95 {_ms(s.wait_time_p95)}: rare and short"
    return "ok", f"no checkout waited, and all {s.max_size} resources were needed at some point"


def _run(rules: t.Iterable[Rule], e: Evidence) -> list[Finding]:
    return [f for rule in rules if (f := rule(e)) is not None]


def advise_pool(
    stats: PoolStats,
    deployment: Deployment,
    *,
    rate: float | None = None,
    server: str | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> PoolAdvice:
    """Judge one pool from its stats and the deployment; the module docstring gives the tiers of rules."""
    e = Evidence.of(stats, deployment, thresholds, rate)
    m = stats.max_size
    small = _run(TOO_SMALL, e) or _run([busier_than_max_size], e)
    if small:
        verdict = "too small"
        suggested, note = grow_to(e)
        reasons = [f.reason for f in small] + ([note] if note else [])
    else:
        large = _run(TOO_LARGE, e)
        if large:
            suggested = min([m] + [f.size for f in large if f.size is not None])
            # only findings without a number (resources kept for code outside requests): nothing to change
            verdict = "too large" if suggested != m else "ok"
            reasons = [f.reason for f in large]
        else:
            suggested = m
            verdict, why = quiet_verdict(e)
            reasons = [why]
        reasons += [f.reason for f in _run(INFO, e)]
    return PoolAdvice(
        pool=stats.name,
        kind=stats.kind,
        verdict=verdict,
        max_size=m,
        suggested_max_size=max(suggested, stats.min_size, 1),
        reasons=tuple(reasons),
        server=server,
        checkouts=stats.checkouts,
        wait_ratio=e.wait_ratio,
        wait_p95=stats.wait_time_p95,
        timeouts=stats.timeouts,
        refused=stats.refused,
        high_water=stats.size,
        in_use=stats.in_use,
        utilisation=stats.in_use / stats.size if stats.size else 0.0,
        hold_mean=e.hold_mean,
        hold_p95=stats.hold_time_p95,
        busy_mean=e.busy,
        rate=rate,
    )
