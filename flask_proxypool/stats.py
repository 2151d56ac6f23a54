"""Typed, JSON-ready snapshots of a pool's state and counters."""

from __future__ import annotations

import dataclasses
import math
import typing as t

__all__ = ["WINDOW", "PoolStats", "percentile", "top_holders"]


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """One snapshot of a pool, taken under its lock; immutable, so safe to share.

    Checkouts and returns that take no lock may be in flight meanwhile: `idle` and `in_use`
    are each right to within those, and never add up to more than `size`.

    Times are in seconds. Counters count since the pool was made (or since
    the process forked, for a pool inherited from a `--preload` master).
    """

    name: str
    kind: str
    target: str  #: what the pool connects to, password masked
    min_size: int
    max_size: int
    size: int  #: resources alive or being created
    idle: int
    in_use: int
    waiting: int
    created: int
    closed: int
    closed_by_reason: dict[str, int]
    checkouts: int
    timeouts: int
    refused: int  #: refused at once because ``max_waiting`` waiters were queued
    errors: int  #: failed creates, resets, commits and checks
    connect_failures: int
    wait_count: int  #: checkouts that had to wait
    wait_time_total: float
    wait_time_max: float
    hold_time_total: float
    hold_time_max: float  #: longest hold in the window
    long_held: int  #: resources reported as held longer than ``max_hold``
    #: resources taken back from their holder: the taking thread ended, or held past ``max_hold`` with
    #: ``max_hold_action: reclaim`` (also in ``closed_by_reason``: ``abandoned``, ``max_hold``)
    reclaimed: int = 0
    # Percentiles over the last WINDOW waits (checkouts that had to wait) and returns.
    wait_time_p50: float = 0.0
    wait_time_p95: float = 0.0
    wait_time_p99: float = 0.0
    hold_time_p50: float = 0.0
    hold_time_p95: float = 0.0
    hold_time_p99: float = 0.0
    #: who held resources longest in the window: [{holder, max, count, mean}], longest first
    top_holders: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    #: what is held right now, oldest first: [{pool, holder, age, thread, where}]; holder is the endpoint,
    #: or "thread NAME" outside a request, where then says "file:line" of the call that took it
    held: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    oldest_hold: float = 0.0  #: seconds the oldest resource still out has been held (0: none out)
    #: the pool's configuration, password masked (filled by the Flask extension)
    config: dict[str, t.Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, t.Any]:
        """A plain dict, ready for `json.dumps`."""
        return dataclasses.asdict(self)


#: Samples kept for the wait and hold time percentiles (a power of two).
WINDOW = 1024
WINDOW_MASK = WINDOW - 1


def percentile(ordered: list[float], p: int) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 when empty."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def top_holders(pairs: list[tuple[float, str | None]], n: int = 5) -> list[dict[str, t.Any]]:
    """Who held resources longest in the window: holder, longest hold, count, mean."""
    by: dict[str, list[float]] = {}
    for hold, who in pairs:
        by.setdefault(who or "(outside a request)", []).append(hold)
    longest = sorted(by.items(), key=lambda item: max(item[1]), reverse=True)[:n]
    return [{"holder": who, "max": max(hs), "count": len(hs), "mean": sum(hs) / len(hs)} for who, hs in longest]
