"""What the sizing rules read and give: thresholds, one pool's evidence, a finding, and the verdict on a pool."""

from __future__ import annotations

import dataclasses
import math
import typing as t

from ..stats import PoolStats
from .deployment import Deployment

__all__ = ["DEFAULT_THRESHOLDS", "Evidence", "Finding", "PoolAdvice", "Rule", "Thresholds"]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When waits count as "too many" or "too long", and how much traffic counts as evidence."""

    wait_ratio: float = 0.05  #: share of checkouts that waited
    wait_p95: float = 0.050  #: seconds
    min_checkouts: int = 100  #: fewer: too little traffic to call a pool too large from its size
    tight: float = 0.8  #: share of the server's available connections that leaves too little headroom


DEFAULT_THRESHOLDS = Thresholds()


@dataclasses.dataclass(frozen=True)
class PoolAdvice:
    """The verdict on one pool: `too small`, `too large`, `ok` or `no data`, and why."""

    pool: str
    kind: str
    verdict: str
    max_size: int
    suggested_max_size: int
    reasons: tuple[str, ...]
    server: str | None  #: the database server it connects to (psycopg pools)
    # the evidence
    checkouts: int
    wait_ratio: float  #: wait_count / checkouts
    wait_p95: float
    timeouts: int
    refused: int
    high_water: int  #: ``size``: the pool grows only when all its resources are busy
    in_use: int
    utilisation: float  #: in_use / size right now
    hold_mean: float
    hold_p95: float
    busy_mean: float | None  #: Little's law: mean resources busy per worker (needs the rate)
    rate: float | None = None  #: the pool's checkouts per second over all workers, if given

    def to_dict(self) -> dict[str, t.Any]:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons)}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What the rules read: one pool's stats, the deployment, and the figures derived from them once."""

    stats: PoolStats
    deployment: Deployment
    thresholds: Thresholds
    rate: float | None  #: the pool's checkouts per second over all workers
    wait_ratio: float  #: wait_count / checkouts
    hold_mean: float  #: seconds, over the resources given back so far
    busy: float | None  #: Little's law: mean resources busy per worker (needs the rate)
    needed: int | None  #: ``busy`` with square-root headroom for bursts

    @classmethod
    def of(cls, stats: PoolStats, deployment: Deployment, thresholds: Thresholds, rate: float | None) -> Evidence:
        returns = max(stats.checkouts - stats.in_use, 0)
        hold_mean = stats.hold_time_total / returns if returns else 0.0
        busy: float | None = None
        needed: int | None = None
        if rate is not None and rate > 0 and returns:
            busy = rate / deployment.workers * hold_mean
            needed = max(1, math.ceil(busy + 2 * math.sqrt(busy)))
        wait_ratio = stats.wait_count / stats.checkouts if stats.checkouts else 0.0
        return cls(stats, deployment, thresholds, rate, wait_ratio, hold_mean, busy, needed)

    @property
    def max_size(self) -> int:
        return self.stats.max_size

    @property
    def concurrency(self) -> int:
        return self.deployment.concurrency

    @property
    def per_worker(self) -> str:
        """What bounds a worker's concurrency, as the reasons name it."""
        return "worker_connections" if self.deployment.is_async else "threads"

    @property
    def held_outside_requests(self) -> bool:
        """Top holders show code outside requests (`borrow()`, background threads) holding resources."""
        return any(h.get("holder") == "(outside a request)" for h in self.stats.top_holders)

    @property
    def enough_traffic(self) -> bool:
        return self.stats.checkouts >= self.thresholds.min_checkouts

    @property
    def waits_often(self) -> bool:
        return bool(self.stats.checkouts) and self.wait_ratio >= self.thresholds.wait_ratio

    @property
    def observed_peak(self) -> int:
        """The high-water mark, once there was traffic enough to trust it: fewer would have made callers wait."""
        return self.stats.size if self.enough_traffic else 0

    def littles_law(self) -> str:
        return (
            f"at {self.rate:g} checkouts/s over {self.deployment.workers} worker(s) and a mean hold of "
            f"{_ms(self.hold_mean)}, {self.busy:.1f} resources are busy on average per worker"
        )


@dataclasses.dataclass(frozen=True)
class Finding:
    """What one rule found, in words, and the `max_size` it points to (None: no number of its own)."""

    reason: str
    size: int | None = None


#: a rule: a Finding when what it checks is true of the pool, else None
Rule = t.Callable[[Evidence], "Finding | None"]
