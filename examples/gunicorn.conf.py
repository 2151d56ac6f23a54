"""gunicorn settings for the example: threaded workers, pools sized to the threads."""

import os

bind = os.environ.get("SHOP_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("SHOP_WORKERS", "2"))
threads = int(os.environ.get("SHOP_THREADS", "4"))  # pool max_size 4: one connection per thread
timeout = 30
graceful_timeout = 10
accesslog = "-"


def worker_exit(server, worker):
    """Close the pools once in-flight requests are done, so connections end cleanly."""
    app = getattr(worker, "wsgi", None)
    ext = getattr(app, "extensions", {}).get("proxypool") if app is not None else None
    if ext is not None:
        ext.close(timeout=5.0)
