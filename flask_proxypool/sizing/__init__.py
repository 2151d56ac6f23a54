"""Pool sizing advice from stats: how many connections each pool needs, and what the server sees.

Small pools used at full capacity beat many idle connections. A request
holds at most one resource per pool, so a pool serving requests never needs
more than the worker's threads; and every worker has its own pools, so the
database sees workers x max_size connections per pool. `flask proxypool
size` turns a pool's stats (waits, timeouts, refusals, hold times) and the
deployment (workers x threads) into a suggested `max_size` and says why,
plainly. One module per part, each importing only those before it:

* `deployment`: workers, threads and worker class, read through gunicorn's
  own settings classes (`detect_deployment`);
* `rules`: the per-pool rules, each a named function, and `advise_pool`;
* `limits`: a server's `max_connections`, asked through a pool with a
  deadline, and the check of all workers' connections against it;
* `pgbouncer`: pools behind PgBouncer (`pgbouncer: "transaction"`): its
  settings from the admin console or the command line, and the client-side
  and server-side budgets, each checked on its own;
* `advice`: every pool and server together, stats JSON in, text or JSON out.

Everything is a pure function of its inputs except `detect_deployment`
(reads gunicorn's settings), `query_server_limits` (asks PostgreSQL) and
`query_bouncer` (asks PgBouncer's admin console).
"""

from __future__ import annotations

from .advice import Advice, advise, render_text, stats_from_dict
from .deployment import Deployment, detect_deployment
from .evidence import PoolAdvice, Thresholds
from .limits import ServerAdvice, ServerLimits, advise_server, database_user, query_server_limits, server_key
from .pgbouncer import BouncerAdvice, BouncerOptions, BouncerPool, BouncerSettings, advise_bouncer, query_bouncer
from .rules import advise_pool

__all__ = [
    "Advice",
    "BouncerAdvice",
    "BouncerOptions",
    "BouncerPool",
    "BouncerSettings",
    "Deployment",
    "PoolAdvice",
    "ServerAdvice",
    "ServerLimits",
    "Thresholds",
    "advise",
    "advise_bouncer",
    "advise_pool",
    "advise_server",
    "database_user",
    "detect_deployment",
    "query_bouncer",
    "query_server_limits",
    "render_text",
    "server_key",
    "stats_from_dict",
]
