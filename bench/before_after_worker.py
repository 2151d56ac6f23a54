"""One measurement for bench/before_after.py: run with PYTHONPATH set to the tree to measure; prints one JSON line."""

from __future__ import annotations

import json
import sys
import timeit

from flask import Flask

from flask_proxypool import Pool, ProxyPool, db
from flask_proxypool.kinds.psycopg import PsycopgKind


def main(dsn: str) -> None:
    pool = Pool(PsycopgKind(dsn, {"autocommit": True}, reset="rollback"), max_size=4)
    pool.putconn(pool.getconn())
    app = Flask("before_after")
    app.config["PROXYPOOL_POOLS"] = {
        "db": {"conninfo": dsn, "autocommit": True, "max_size": 4, "reset": "rollback"}
    }
    ProxyPool(app)
    bare = Flask("bare")
    ctx = app.app_context()
    ctx.push()
    db.pgconn  # noqa: B018 - binds a connection to the context
    attr = min(timeit.repeat("d.execute", globals={"d": db}, number=200_000, repeat=5)) / 200_000 * 1e6
    ctx.pop()
    out = {}
    cases = (
        ("pool getconn/putconn", "p.putconn(p.getconn())", {"p": pool}),
        ("proxy path (app context + db.pgconn)", "with c():\n    d.pgconn", {"c": app.app_context, "d": db}),
        ("idle app context, app with the extension", "with c():\n    pass", {"c": app.app_context}),
        ("idle app context, bare Flask app", "with c():\n    pass", {"c": bare.app_context}),
    )
    for name, stmt, ns in cases:
        out[name] = min(timeit.repeat(stmt, globals=ns, number=20_000, repeat=5)) / 20_000 * 1e6
    out["bound attribute access (db.execute)"] = attr
    pool.close()
    app.extensions["proxypool"].close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
