"""The app-wide advice: every pool judged, every server checked, read from stats JSON and written as text or JSON."""

from __future__ import annotations

import dataclasses
import typing as t

from ..stats import PoolStats
from .deployment import Deployment
from .evidence import DEFAULT_THRESHOLDS, PoolAdvice, Thresholds, _ms
from .limits import ServerAdvice, ServerLimits, advise_server, database_user, server_key
from .pgbouncer import BouncerAdvice, BouncerOptions, BouncerSettings, advise_bouncer
from .rules import advise_pool

__all__ = ["Advice", "advise", "render_text", "stats_from_dict"]


@dataclasses.dataclass(frozen=True)
class Advice:
    """Sizing advice for every pool of an app, and for every database server they use."""

    deployment: Deployment
    rates: dict[str, float]  #: checkouts per second over all workers, per pool, where known
    pools: tuple[PoolAdvice, ...]
    servers: tuple[ServerAdvice, ...]
    notes: tuple[str, ...] = ()
    #: the PgBouncers that pools with `pgbouncer: "transaction"` connect to
    bouncers: tuple[BouncerAdvice, ...] = ()

    def to_dict(self) -> dict[str, t.Any]:
        """Plain data, ready for `json.dumps`."""
        return {
            "deployment": self.deployment.to_dict(),
            "rates": dict(self.rates),
            "pools": {p.pool: p.to_dict() for p in self.pools},
            "servers": [s.to_dict() for s in self.servers],
            "pgbouncers": [b.to_dict() for b in self.bouncers],
            "notes": list(self.notes),
        }


def advise(
    stats: t.Mapping[str, PoolStats],
    deployment: Deployment,
    *,
    rate: float | t.Mapping[str, float] | None = None,
    servers: t.Mapping[str, str | None] | None = None,
    limits: t.Mapping[str, ServerLimits] | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    hosts: int | None = None,
    bouncers: t.Mapping[str, BouncerSettings] | None = None,
    bouncer_options: BouncerOptions | None = None,
) -> Advice:
    """Advice for every pool, and for every server or PgBouncer they connect to.

    A psycopg pool with `pgbouncer: "transaction"` in its config counts
    against its PgBouncer's two budgets (`advise_bouncer`), not against a
    server's `max_connections`.

    Args:
        stats: pool name -> stats (of a process that served traffic).
        rate: checkouts per second across all workers, if known: one number for
            every pool, or per pool name (pools differ: not every request uses every pool).
        servers: pool name -> server key (`server_key`); default: computed from the stats.
        limits: server key -> its limits (`query_server_limits`); for a PgBouncer's key,
            the limits of the PostgreSQL server behind it.
        hosts: hosts running the app, each with `deployment`'s workers (None: one, said to be assumed).
        bouncers: PgBouncer's key -> what its admin console said (`query_bouncer`).
        bouncer_options: PgBouncer's numbers stated by the user, over what the console said.
    """
    keys = {name: server_key(s) for name, s in stats.items()} if servers is None else dict(servers)
    if rate is None:
        rates: dict[str, float] = {}
    elif isinstance(rate, (int, float)):
        rates = dict.fromkeys(stats, float(rate))
    else:
        rates = {name: float(r) for name, r in rate.items() if name in stats}
    pools = tuple(
        advise_pool(s, deployment, rate=rates.get(name), server=keys.get(name), thresholds=thresholds)
        for name, s in stats.items()
    )
    by_server: dict[str, list[PoolAdvice]] = {}
    by_bouncer: dict[str, list[PoolAdvice]] = {}
    for p in pools:
        if p.server is not None:
            behind = stats[p.pool].config.get("pgbouncer") == "transaction"
            (by_bouncer if behind else by_server).setdefault(p.server, []).append(p)
    server_advice = tuple(
        advise_server(key, ps, deployment, (limits or {}).get(key), thresholds, hosts) for key, ps in by_server.items()
    )
    bouncer_advice = []
    for key, ps in by_bouncer.items():
        per_pair: dict[tuple[str, str], int] = {}
        for p in ps:
            pair = database_user(stats[p.pool])
            if pair is not None:
                per_pair[pair] = per_pair.get(pair, 0) + p.max_size
        bouncer_advice.append(
            advise_bouncer(
                key,
                ps,
                deployment,
                own=list(per_pair),
                per_pair=per_pair,
                settings=(bouncers or {}).get(key),
                options=bouncer_options or BouncerOptions(),
                limits=(limits or {}).get(key),
                hosts=hosts,
                thresholds=thresholds,
            )
        )
    notes = list(deployment.notes)
    if hosts is None and (server_advice or (deployment.workers > 1 and not bouncer_advice)):
        notes.append("other hosts or processes running this app open their own pools: add theirs (--hosts N)")
    return Advice(
        deployment=deployment,
        rates=rates,
        pools=pools,
        servers=server_advice,
        notes=tuple(notes),
        bouncers=tuple(bouncer_advice),
    )


def render_text(advice: Advice) -> str:
    """The advice for a terminal."""
    d = advice.deployment
    if d.is_async:
        shape = f"{d.workers} worker(s) x {d.worker_connections} worker_connections ({d.worker_class})"
    else:
        shape = f"{d.workers} worker(s) x {d.threads} thread(s)"
    lines = [f"deployment: {shape}, from {d.source}"]
    if advice.rates:
        shown = ", ".join(f"{name} {r:g}/s" for name, r in advice.rates.items())
        lines.append(f"checkout rates across all workers: {shown}")
    for p in advice.pools:
        if p.suggested_max_size != p.max_size:
            change = f"max_size {p.max_size} -> {p.suggested_max_size}"
        else:
            change = f"keep max_size {p.max_size}"
        lines.append("")
        lines.append(f"pool {p.pool!r} ({p.kind}): {p.verdict.upper()}: {change}")
        for r in p.reasons:
            lines.append(f"  - {r}")
        evidence = (
            f"  checkouts {p.checkouts}, waited {p.wait_ratio:.1%}, timeouts {p.timeouts}, refused {p.refused}, "
            f"high water {p.high_water}, in use now {p.in_use}, hold mean {_ms(p.hold_mean)} p95 {_ms(p.hold_p95)}"
        )
        if p.busy_mean is not None:
            evidence += f", at {p.rate:g}/s busy on average {p.busy_mean:.2f} per worker"
        lines.append(evidence)
    for s in advice.servers:
        lines.append("")
        lines.append(f"server {s.server} (pools: {', '.join(s.pools)}): {s.verdict.upper()}")
        for r in s.reasons:
            lines.append(f"  - {r}")
    for b in advice.bouncers:
        lines.append("")
        version = f"{b.version}, " if b.version else ""
        lines.append(
            f"pgbouncer {b.bouncer} (pools: {', '.join(b.pools)}): clients {b.client_verdict.upper()}, "
            f"servers {b.server_verdict.upper()} ({version}settings from {b.settings_from})"
        )
        lines.append("  client side (app -> PgBouncer):")
        lines.extend(f"  - {r}" for r in b.client_reasons)
        lines.append("  server side (PgBouncer -> PostgreSQL):")
        lines.extend(f"  - {r}" for r in b.server_reasons)
        if b.assumed:
            lines.append(f"  assumed: {'; '.join(b.assumed)}")
    if advice.notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in advice.notes)
    return "\n".join(lines)


_FIELDS = {f.name for f in dataclasses.fields(PoolStats)}


def stats_from_dict(data: t.Mapping[str, t.Any]) -> dict[str, PoolStats]:
    """Pool stats from JSON: `flask proxypool stats --json`, or the stats endpoint's body."""
    if not isinstance(data, t.Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    pools = data.get("pools", data)
    if not isinstance(pools, t.Mapping):
        raise ValueError("expected {pool name: stats} or {'pools': {pool name: stats}}")
    out = {}
    for name, d in pools.items():
        if not isinstance(d, t.Mapping) or "max_size" not in d:
            raise ValueError(f"pool {name!r}: not a stats mapping")
        out[name] = PoolStats(**{k: v for k, v in d.items() if k in _FIELDS})
    return out
