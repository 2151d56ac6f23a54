"""Rewrite the configuration table in README.md from config.py (tests/test_docs.py checks it)."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
readme = ROOT / "README.md"
text = readme.read_text()
start = text.index("| key | kinds |")
end = text.index("\n\n", start)
table = runpy.run_path(str(ROOT / "scripts" / "config_table.py"))["table"]()
readme.write_text(text[:start] + table + text[end:])
