"""An app for tests/test_warnings.py, served by real gunicorn and the development server, set by WARN_* variables.

``WARN_CONNINFO``: the ``db`` pool's conninfo; ``WARN_MAX_SIZE`` (default 2); ``WARN_HOSTS`` (default 1);
``WARN_SETUP=1``: the factory runs one query, so the process that loads the app (a ``--preload`` master, the
reloader's parent) has a connection open. ``python warn_app.py PORT`` serves it with werkzeug's
development server and its stat reloader, as ``flask run --reload`` does (``PORT waitress``: waitress).
Log lines start with the process id, so a test can count each warning per process.
"""

from __future__ import annotations

import logging
import os

from flask import Flask

from flask_proxypool import ProxyPool, db


def create_app() -> Flask:
    logging.basicConfig(format="[%(process)d] %(name)s %(levelname)s: %(message)s", level=logging.WARNING)
    app = Flask("warn_app")
    app.config["PROXYPOOL_POOLS"] = {
        "db": {
            "kind": "psycopg",
            "conninfo": os.environ["WARN_CONNINFO"],
            "max_size": int(os.environ.get("WARN_MAX_SIZE", "2")),
            "timeout": 5.0,
        },
    }
    app.config["PROXYPOOL_HOSTS"] = int(os.environ.get("WARN_HOSTS", "1"))
    ProxyPool(app)
    if os.environ.get("WARN_SETUP") == "1":
        with db.borrow(app) as conn:
            conn.execute("SELECT 1")

    @app.get("/")
    def index() -> dict[str, int]:
        db.execute("SELECT 1")
        return {"pid": os.getpid()}

    @app.get("/created")
    def created() -> dict[str, int]:
        """How many connections this process's pool made so far (no pool use of its own)."""
        return {"pid": os.getpid(), "created": app.extensions["proxypool"].pool("db").stats().created}

    return app


if __name__ == "__main__":
    # python warn_app.py PORT: the development server with its stat reloader (as `flask run --reload`);
    # python warn_app.py PORT waitress: waitress with 4 threads
    import sys

    if sys.argv[2:] == ["waitress"]:
        import waitress

        app = create_app()
        logging.getLogger("waitress").setLevel(logging.INFO)  # "Serving on": the socket is bound
        waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4)
    else:
        from werkzeug.serving import run_simple

        run_simple("127.0.0.1", int(sys.argv[1]), create_app(), use_reloader=True, reloader_type="stat", threaded=True)
