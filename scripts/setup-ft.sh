#!/usr/bin/env bash
# Set up the free-threaded test environment: a free-threaded CPython 3.13 (3.13t, built once by
# ../shared/tools/freethreaded-python.sh into $FTPY_PREFIX, default /opt/python3.13t, and reused after),
# and a venv from it ($VENV, default .venv-ft) with the package and the `test-ft` extra.
#
# What differs from .venv (scripts/setup.sh): psycopg's binary package has no wheel for 3.13t, so psycopg
# is the pure-Python one, over the system libpq (libpq5, installed here when missing); gevent does not
# build for 3.13t, so it is left out (the gevent test skips itself there); mypy and ruff are lint tools,
# not needed to run the tests. Idempotent and quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

FTPY_PREFIX=${FTPY_PREFIX:-/opt/python3.13t}
FTPY_TOOL=${FTPY_TOOL:-../shared/tools/freethreaded-python.sh}
VENV=${VENV:-.venv-ft}

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup-ft: installing $* with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup-ft: missing $*; install it: sudo apt-get install -y $*" >&2
        exit 1
    fi
}

# The test suite's PostgreSQL server binaries, as scripts/setup.sh checks them.
have_pg() {
    [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ] && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
    command -v initdb >/dev/null 2>&1
}
have_pg || apt_install postgresql

# Pure-Python psycopg loads libpq.so.5 with ctypes.
ldconfig -p 2>/dev/null | grep -q 'libpq\.so\.5 ' || apt_install libpq5

if [ ! -f "$FTPY_TOOL" ]; then
    echo "setup-ft: $FTPY_TOOL not found (it comes with shared/, beside the repository)" >&2
    exit 1
fi
FTPY=$(bash "$FTPY_TOOL" "$FTPY_PREFIX" | tail -n 1)

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys._is_gil_enabled())' 2>/dev/null; then
    rm -rf "$VENV"
    "$FTPY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test-ft]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
