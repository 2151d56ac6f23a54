"""The documentation site builds with ``mkdocs build --strict`` (so CI builds it through ``make test``)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_strictly(tmp_path: Path) -> None:
    """Every page renders, every link resolves, the API reference is generated: no warning at all."""
    if sysconfig.get_config_var("Py_GIL_DISABLED"):  # the ft venv has the test-ft extra only; `make test` builds it
        pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra is not in test-ft)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    config = (site / "configuration" / "index.html").read_text()
    assert "<code>liveness_after</code>" in config and "<code>busy_timeout</code>" in config
    reference = (site / "reference" / "index.html").read_text()
    assert 'id="flask_proxypool.testing.assert_all_returned"' in reference
    assert 'class="mermaid"' in (site / "how-it-works" / "index.html").read_text()
    raw = re.findall(r":(?:class|meth|func|data|attr|mod|exc|param|raises|returns?|rtype):", reference)
    assert raw == [], f"reST roles left raw on the API reference: {len(raw)}"
    assert "<code>``" not in reference and "``" not in re.sub(r"<[^>]+>", "", reference)


def test_every_module_is_in_the_api_reference() -> None:
    """The hook lists every public module of the package, the package first."""
    hooks = runpy.run_path(str(ROOT / "scripts" / "mkdocs_hooks.py"))
    modules = hooks["api_modules"]()
    assert modules[0] == "flask_proxypool"
    files = [p for p in (ROOT / "flask_proxypool").rglob("*.py") if not p.name.startswith("_")]
    packages = list((ROOT / "flask_proxypool").rglob("__init__.py"))
    assert len(modules) == len(files) + len(packages)
    assert "flask_proxypool.kinds.psycopg" in modules and "flask_proxypool.testing.plugin" in modules


def test_every_page_is_in_the_nav() -> None:
    """Each Markdown page under docs/ is reachable from mkdocs.yml's nav."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"
