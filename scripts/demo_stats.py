"""Load the example shop app in-process, then show ``flask proxypool stats``, ``check`` and ``size``.

A CLI process has pools of its own, so to show real numbers this script
runs the load and the CLI commands in one process: it starts a throwaway
PostgreSQL (tests/pgserver.py), builds ``shop.create_app()`` on it, sends
2,000 requests from 8 threads through ``app.test_client()``, then invokes
the commands through ``app.test_cli_runner()``.

    .venv/bin/python scripts/demo_stats.py
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

from pgserver import PgServer, make_basedir  # noqa: E402

REQUESTS = 2000
THREADS = 8
ITEMS = 50


def main() -> None:
    basedir = make_basedir()
    server = PgServer(basedir)
    server.start()
    try:
        server.create_database("shop")
        os.environ["SHOP_DATABASE_URL"] = server.url("shop")
        os.environ.pop("SHOP_DEBUG", None)
        run()
    finally:
        server.stop("immediate")
        shutil.rmtree(basedir, ignore_errors=True)


def run() -> None:
    import shop

    app = shop.create_app()
    client = app.test_client()
    for i in range(1, ITEMS + 1):
        assert client.post("/items", json={"id": i, "name": f"item {i}", "price": i}).status_code == 201

    order_ids = iter(range(1, REQUESTS + 1))
    ids_lock = threading.Lock()
    statuses: dict[int, int] = {}
    per_thread = REQUESTS // THREADS

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        c = app.test_client()
        for _ in range(per_thread):
            r = rng.random()
            if r < 0.6:
                resp = c.get(f"/items/{rng.randint(1, ITEMS + 5)}")  # a few 404s
            elif r < 0.7:
                resp = c.get("/items")
            else:
                with ids_lock:
                    oid = next(order_ids)
                resp = c.post("/orders", json={"id": oid, "item_id": rng.randint(1, ITEMS), "qty": rng.randint(1, 12)})
            with ids_lock:
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

    before = {name: s.checkouts for name, s in app.extensions["proxypool"].stats().items()}
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    rate = REQUESTS / elapsed
    print(f"$ # {REQUESTS} requests from {THREADS} threads in {elapsed:.2f} s ({rate:.0f}/s); statuses {statuses}")
    # each pool's checkout rate during the load (not every request uses every pool)
    after = app.extensions["proxypool"].stats()
    rates = [f"{name}={(s.checkouts - before[name]) / elapsed:.0f}" for name, s in after.items()]

    # what reading the stats costs: two sorts of the 1,024-sample windows, under the pool's lock for that long
    pool = app.extensions["proxypool"].pool("db")
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        pool.stats()
    per_call = (time.perf_counter() - t0) / n
    print(f"$ # pool.stats() with full windows: {per_call * 1e6:.0f} us per call (mean of {n})")

    runner = app.test_cli_runner()
    commands = [
        ["proxypool", "stats"],
        ["proxypool", "check"],
        # the load ran 8 threads in one process: size for that, with the rates it reached
        ["proxypool", "size", "--workers", "1", "--threads", str(THREADS), *(f"--rate={r}" for r in rates)],
    ]
    for args in commands:
        print()
        print("$ flask --app 'shop:create_app()' " + " ".join(args))
        result = runner.invoke(args=args)
        print(result.output, end="")
        if result.exit_code != 0:
            raise SystemExit(f"{' '.join(args)} exited with {result.exit_code}")
    app.extensions["proxypool"].close(timeout=2.0)


if __name__ == "__main__":
    main()
