"""Every code block of README.md and docs/getting-started.md runs as written.

A page's blocks run in order, in one empty folder (the current directory, and first
on ``sys.path``), sharing one namespace; Flask's instance folder is put there too.
The line before a block may hold a marker:

- none: a ``python`` block runs. One that starts with a ``# path.py`` line is a
  set of files (each ``# path.py`` line at column 0 starts the next) written to
  the folder; a top-level file (``gunicorn.conf.py``) is run, a package file is
  imported by the blocks that follow. If every ``print(...)`` line of a block
  ends with ``# output``, the block must print exactly those lines.
- ``<!-- test: pg -->``: a python block run against the suite's PostgreSQL (a new
  database per page): the conninfo strings of the docs (``DOC_CONNINFOS``) are
  replaced by the test server's.
- ``<!-- test: curl MODULE:create_app() -->``: every line of the ``sh`` block is a
  ``curl`` command, sent through Flask's test client to a freshly imported app;
  each must answer 2xx, and a ``# {...}`` comment is the JSON it must answer.
- ``<!-- test: skip (REASON) -->``: not run (installs packages, serves until stopped).
  Any other block without a marker fails the test: say how it is checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import re
import runpy
import shlex
import sys
import typing as t
import urllib.parse
import uuid
from pathlib import Path

import pytest
from flask import Flask

from flask_proxypool import ProxyPool

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/getting-started.md"]
#: The connection strings the docs show for PostgreSQL; a `pg` block must use one of them.
DOC_CONNINFOS = ('"postgresql://app@localhost/app"', '"dbname=app"')

_MARKER = re.compile(r"<!-- test: (?P<what>\w+)(?: (?P<arg>.*?))? -->")
_FILE_HEADER = re.compile(r"^# (?P<path>[\w./-]+\.py)\b.*$")
_PRINT_EXPECTED = re.compile(r"^\s*print\(.*\)\s+# (?P<out>.+)$")


@dataclasses.dataclass
class Block:
    """One fenced code block: where it starts, its language, its marker and its text."""

    page: str
    line: int
    lang: str
    marker: str
    arg: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced blocks of a page, each with the marker on the last non-blank line before it."""
    lines = (ROOT / page).read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang = lines[i][3:].strip()
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        m = _MARKER.fullmatch(before.strip())
        end = lines.index("```", i + 1)
        found.append(
            Block(
                page,
                i + 1,
                lang,
                m["what"] if m else "",
                (m["arg"] or "") if m else "",
                "\n".join(lines[i + 1 : end]) + "\n",
            )
        )
        i = end + 1
    return found


def files_of(block: Block) -> dict[str, str] | None:
    """The files a `# path.py` block holds, or None if it is code to run."""
    lines = block.text.splitlines()
    if not lines or not _FILE_HEADER.match(lines[0]):
        return None
    files: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        m = _FILE_HEADER.match(line)
        if m:
            current = files.setdefault(m["path"], [])
        current.append(line)
    return {path: "\n".join(body).rstrip() + "\n" for path, body in files.items()}


def expected_output(block: Block) -> list[str] | None:
    """The lines a block must print, if every print line says what it prints."""
    prints = [line for line in block.text.splitlines() if re.match(r"^\s*print\(", line)]
    outputs = [m["out"] for line in prints if (m := _PRINT_EXPECTED.match(line))]
    if not prints or not outputs:
        return None
    assert len(outputs) == len(prints), f"{block.where}: give every print() line its '# output', or none"
    return outputs


class PageRun:
    """Runs one page's blocks in order in `folder`, and closes every app they made."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
        self.folder = folder
        self.request = request
        self.namespace: dict[str, t.Any] = {"__name__": "__main__"}
        self.packages: set[str] = set()
        self.apps: list[Flask] = []
        self.conninfo: str | None = None
        monkeypatch.chdir(folder)
        monkeypatch.delenv("SHOP_DATABASE_URL", raising=False)  # the example app on its embedded sqlite3
        monkeypatch.syspath_prepend(str(ROOT / "examples"))
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.setattr(Flask, "auto_find_instance_path", lambda app: str(folder / "instance"))
        init_app = ProxyPool.init_app

        def recording_init_app(ext: ProxyPool, app: Flask) -> None:
            init_app(ext, app)
            self.apps.append(app)

        monkeypatch.setattr(ProxyPool, "init_app", recording_init_app)

    def close(self) -> None:
        for app in self.apps:
            app.extensions["proxypool"].close(timeout=1.0)
        for name in list(sys.modules):
            if name.partition(".")[0] in self.packages:
                del sys.modules[name]

    def pg_conninfo(self) -> str:
        """A new database on the suite's PostgreSQL, for this page."""
        if self.conninfo is None:
            pg = self.request.getfixturevalue("pg")
            name = f"docs_{uuid.uuid4().hex[:12]}"
            pg.create_database(name)
            self.conninfo = pg.conninfo(name)
        return self.conninfo

    def run(self, block: Block) -> None:
        if block.marker == "skip":
            assert block.arg.strip("() "), f"{block.where}: say why the block is not run: <!-- test: skip (why) -->"
        elif block.marker == "curl":
            self.curl(block)
        elif block.lang == "python" and block.marker in ("", "pg"):
            self.python(block)
        else:
            kind = block.lang or "plain"
            pytest.fail(f"{block.where}: a {kind} block with no way to check it; mark it (see {__name__})")

    def python(self, block: Block) -> None:
        text = block.text
        if block.marker == "pg":
            shown = [c for c in DOC_CONNINFOS if c in text]
            assert shown, f"{block.where}: a pg block must use one of {DOC_CONNINFOS}"
            for c in shown:
                text = text.replace(c, repr(self.pg_conninfo()))
        files = files_of(dataclasses.replace(block, text=text))
        if files is not None:
            for path, body in files.items():
                target = self.folder / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(body)
                if "/" in path:
                    self.packages.add(path.partition("/")[0])
                else:
                    runpy.run_path(str(target))
            return
        expected = expected_output(block)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(text, block.where, "exec"), self.namespace)
        if expected is not None:
            assert out.getvalue().splitlines() == expected, f"{block.where}: printed something else"

    def curl(self, block: Block) -> None:
        module, _, call = block.arg.partition(":")
        assert call.endswith("()"), f"{block.where}: the marker names the app as MODULE:FACTORY()"
        self.packages.add(module.partition(".")[0])
        for name in list(sys.modules):  # the files may have changed since the last import
            if name.partition(".")[0] == module.partition(".")[0]:
                del sys.modules[name]
        importlib.invalidate_caches()
        app = getattr(importlib.import_module(module), call[:-2])()
        client = app.test_client()
        for line in block.text.splitlines():
            command, _, comment = line.partition("#")
            if not command.strip():
                continue
            method, url, data, headers = parse_curl(command, block)
            parts = urllib.parse.urlsplit(url if "//" in url else "http://" + url)
            r = client.open(
                parts.path or "/",
                method=method,
                query_string=parts.query,
                data=data,
                headers=headers,
                base_url=f"{parts.scheme}://{parts.netloc}",
            )
            assert 200 <= r.status_code < 300, f"{block.where}: {command.strip()} answered {r.status_code}: {r.text}"
            comment = comment.strip()
            if comment.startswith(("{", "[")):
                assert r.get_json() == json.loads(comment), f"{block.where}: {command.strip()} answered {r.text}"


def parse_curl(command: str, block: Block) -> tuple[str, str, str | None, dict[str, str]]:
    """(method, url, body, headers) of the curl options the docs use: -X, -d, -H."""
    args = shlex.split(command)
    assert args[0] == "curl", f"{block.where}: only curl lines in a curl block, got {command!r}"
    method, url, data = "", "", None
    headers: dict[str, str] = {}
    it = iter(args[1:])
    for arg in it:
        if arg.startswith("-X"):
            method = arg[2:] or next(it)
        elif arg == "-d":
            data = next(it)
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")  # as curl sends it
        elif arg == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif arg.startswith("-"):
            pytest.fail(f"{block.where}: curl option {arg} is not understood by this test; teach parse_curl")
        else:
            url = arg
    return method or ("POST" if data is not None else "GET"), url, data, headers


@pytest.mark.parametrize("page", PAGES)
def test_every_block_runs(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Each code block of the page runs as written, in order (or is marked with how else it is checked)."""
    found = blocks(page)
    assert any(b.lang == "python" and b.marker == "" for b in found), f"{page}: no block runs without a server"
    run = PageRun(tmp_path, monkeypatch, request)
    try:
        for block in found:
            run.run(block)
    finally:
        run.close()


def test_quickstart_needs_no_server_and_shows_postgresql_next() -> None:
    """The README's first Python block is the sqlite3 Quickstart; a PostgreSQL one follows it."""
    python = [b for b in blocks("README.md") if b.lang == "python"]
    assert python[0].marker == "" and '"kind": "sqlite3"' in python[0].text and "?" in python[0].text
    assert "%s" not in python[0].text
    assert python[1].marker == "pg" and "%s" in python[1].text and "?" not in python[1].text.replace("?,", "")


def test_placeholders_match_the_kind() -> None:
    """A sqlite3 block never uses psycopg's %s, nor a psycopg block sqlite3's ? (a placeholder that fails)."""
    for page in PAGES:
        for b in blocks(page):
            if b.lang != "python":
                continue
            sql = re.findall(r'"((?:SELECT|INSERT|UPDATE|DELETE)\b[^"]*)"', b.text)
            if b.marker == "pg":
                assert not any("?" in s for s in sql), f"{b.where}: psycopg takes %s, not ?"
            else:
                assert not any("%s" in s for s in sql), f"{b.where}: sqlite3 takes ?, not %s"
