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

have_pgbouncer() {
    [ -n "${PGBOUNCER:-}" ] && [ -x "$PGBOUNCER" ] && return 0
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}

# What the test suite starts itself: PostgreSQL, and a PgBouncer in front of it (tests/pgbouncer.py).
# Missing ones are installed in one apt-get run when root; otherwise the install line is printed.
missing=""
if [ "$EXTRAS" = dev ]; then
    have_pg || missing="postgresql"
    have_pgbouncer || missing="$missing pgbouncer"
    missing="${missing# }"
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: missing $missing; installing with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq $missing >/dev/null
    else
        echo "setup: not found: $missing (the PostgreSQL server binaries initdb, pg_ctl; PgBouncer)." >&2
        echo "       Install them: sudo apt-get install -y $missing   (or set PG_BINDIR / PGBOUNCER)" >&2
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
