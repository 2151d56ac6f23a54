"""gunicorn settings for the example: threaded workers, pools sized to the threads."""

import os

# close the master's pools before forking (--preload), and each worker's pools when it exits
from flask_proxypool.gunicorn import when_ready, worker_exit  # noqa: F401

bind = os.environ.get("SHOP_BIND", "127.0.0.1:8000")
worker_class = os.environ.get("SHOP_WORKER_CLASS", "gthread")
workers = int(os.environ.get("SHOP_WORKERS", "2"))
threads = int(os.environ.get("SHOP_THREADS", "4"))  # pool max_size 4: one connection per thread
timeout = 30
graceful_timeout = 10
accesslog = os.environ.get("SHOP_ACCESSLOG", "-") or None  # empty: no access log
