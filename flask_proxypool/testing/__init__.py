"""Test tools for apps that use flask-proxypool: a transaction per test and leak checks.

The pytest plugin (`plugin.py`, loaded through the `pytest11` entry
point) gives the fixtures and markers; this package can also be used
without pytest. One module per concern:

- `plugin`: ini options, markers, fixtures, and the hooks that end each test clean;
- `transaction`: `ProxyPoolTransaction` and the `TransactionPool` it puts in place of an app's pool;
- `psycopg` / `sqlite3`: the connection of a test transaction, for each kind (`base`: what both offer;
  `psycopg_statements`: the psycopg cursors that show it each statement);
- `leaks`: `assert_all_returned` and the reports of what is still out;
- `records`: who took each resource, in which thread and at which line;
- `held`: what the pushed Flask contexts hold (not a leak yet).
"""

from __future__ import annotations

from .leaks import assert_all_returned
from .transaction import ProxyPoolTransaction, TransactionPool

__all__ = ["ProxyPoolTransaction", "TransactionPool", "assert_all_returned"]
