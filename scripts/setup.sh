#!/usr/bin/env bash
# Set up everything the project needs on a clean Debian/Ubuntu machine:
# PostgreSQL server binaries (apt-get, when missing) and a venv with the package
# and its test dependencies. Idempotent and quick when already done.
# --demo (make run): only a venv with the package and the `demo` extra (psycopg, gunicorn):
# the example app runs on its embedded sqlite3 and needs no server, test or docs tools.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS=dev
if [ "${1:-}" = "--demo" ]; then
    EXTRAS=demo
fi

have_pg() {
    [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ] && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
    command -v initdb >/dev/null 2>&1
}

if [ "$EXTRAS" = dev ] && ! have_pg; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: PostgreSQL server binaries missing; installing them with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup: PostgreSQL server binaries (initdb, pg_ctl) not found." >&2
        echo "       Install them: sudo apt-get install -y postgresql   (or set PG_BINDIR)" >&2
        exit 1
    fi
fi

have_pgbouncer() {
    [ -n "${PGBOUNCER:-}" ] && [ -x "$PGBOUNCER" ] && return 0
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}

# The test suite runs the psycopg tests behind a real PgBouncer too (tests/pgbouncer.py).
if [ "$EXTRAS" = dev ] && ! have_pgbouncer; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: PgBouncer missing; installing it with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq pgbouncer >/dev/null
    else
        echo "setup: PgBouncer not found. Install it: sudo apt-get install -y pgbouncer   (or set PGBOUNCER)" >&2
        exit 1
    fi
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$EXTRAS-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    if [ "$EXTRAS" = dev ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
