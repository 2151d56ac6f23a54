"""The README stays true to the code."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_table_is_current() -> None:
    """The configuration table in README.md is exactly what scripts/config_table.py prints."""
    table = runpy.run_path(str(ROOT / "scripts" / "config_table.py"))["table"]()
    assert table in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run calls the one test command the README gives."""
    readme = (ROOT / "README.md").read_text()
    assert "```sh\nmake test\n```" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
