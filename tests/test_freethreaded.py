"""On free-threaded CPython (3.13t) the GIL stays off once the package and its dependencies are imported.

A C extension module that does not declare free-threading support turns the GIL back on, silently but
for a RuntimeWarning, when it is imported. ``python tests/test_freethreaded.py`` prints the same check
for the CI log (``make test-ft`` runs it before pytest) and exits 1 if the GIL is on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

#: What an application using the package imports.
MODULES = (
    "flask",
    "werkzeug",
    "psycopg",
    "flask_proxypool",
    "flask_proxypool.kinds.psycopg",
    "flask_proxypool.kinds.sqlite3",
    "flask_proxypool.gunicorn",
)

FREE_THREADED = sysconfig.get_config_var("Py_GIL_DISABLED") == 1

pytestmark = pytest.mark.skipif(
    not FREE_THREADED, reason="needs a free-threaded CPython build (Py_GIL_DISABLED); this one has a GIL"
)

# Imports the modules named in argv in a fresh interpreter; prints the GIL state, then the C extension
# modules loaded (those with a shared-library file), then psycopg's libpq wrapper if psycopg was imported.
_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(int(sys._is_gil_enabled()))
print(" ".join(sorted(n for n, m in list(sys.modules.items()) if str(getattr(m, "__file__", "")).endswith(".so"))))
pq = sys.modules.get("psycopg.pq")
print(f"{pq.__impl__} (libpq {pq.version()})" if pq else "-")
"""


def probe(*modules: str) -> tuple[bool, list[str], str]:
    """(GIL enabled?, C extension modules loaded, psycopg's libpq wrapper) after importing ``modules`` afresh."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}  # the build's default, not an override
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, env=env, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing {' '.join(modules)} failed:\n{done.stderr}")
    gil, extensions, pq = done.stdout.splitlines()
    return gil == "1", extensions.split(), pq


def culprits(extensions: list[str]) -> list[str]:
    """Which of these extension modules turns the GIL on, each imported alone in a fresh interpreter."""
    return [name for name in extensions if probe(name)[0]]


def test_gil_stays_off_after_importing_the_stack() -> None:
    """flask, werkzeug, psycopg and flask_proxypool imported in a fresh 3.13t interpreter leave the GIL off."""
    gil, extensions, _ = probe(*MODULES)
    assert not gil, f"the GIL was turned back on by: {culprits(extensions)}"


def test_gil_is_off_in_this_test_run() -> None:
    """The test run itself, with everything the suite imported so far, runs without the GIL."""
    assert sys._is_gil_enabled() is False  # type: ignore[attr-defined,unused-ignore]  # 3.13+ only


def test_psycopg_runs_over_the_system_libpq() -> None:
    """psycopg has no binary wheel for 3.13t: the pure-Python wrapper over libpq5 is the one in use."""
    _, _, pq = probe("psycopg")
    assert pq.startswith("python (libpq "), pq


def main() -> int:
    """Print the GIL check for the CI log; 1 if the GIL is on or this is not a free-threaded build."""
    print(
        f"free-threaded check: {sys.executable}: Python {sys.version.split()[0]}, Py_GIL_DISABLED={int(FREE_THREADED)}"
    )
    if not FREE_THREADED:
        print("free-threaded check: FAILED: this interpreter is not a free-threaded build")
        return 1
    gil, extensions, pq = probe(*MODULES)
    print(f"free-threaded check: imported {', '.join(MODULES)}")
    print(f"free-threaded check: C extension modules loaded: {', '.join(extensions) or 'none'}")
    print(f"free-threaded check: psycopg libpq wrapper: {pq}")
    print(f"free-threaded check: sys._is_gil_enabled() = {gil}")
    if gil:
        print(f"free-threaded check: FAILED: the GIL was turned back on by: {', '.join(culprits(extensions))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
