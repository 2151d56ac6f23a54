"""No password in any output, whatever its characters and the conninfo form; bad conninfo fails at init_app.

Property-based: passwords of any printable characters (``% ' \\ @ : / ? & = #``, spaces, unicode) x the
ways to write them in a conninfo x what the server does with them (a role with that password, a wrong
one, no such role, a pg_hba.conf reject, nothing listening), on the real test PostgreSQL; every output
the library has is collected and searched for the password.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import socket
import time
import traceback
import typing as t
import urllib.parse
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from flask import Flask
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from psycopg import sql

from flask_proxypool import (
    AuthenticationFailed,
    ConfigError,
    ConnectFailed,
    PoolUnavailable,
    ProxyPool,
    db,
    metrics,
)
from flask_proxypool.config import parse_pools
from flask_proxypool.kinds.psycopg import PsycopgKind
from flask_proxypool.masking import MIN_SECRET, mask_password, register_secrets
from pgserver import PgServer

GROUP = "pp_secrets"  # members log in with a password (scram-sha-256)
ROLE = "pp_secret_user"
REJECTED = "pp_secret_rejected"  # pg_hba.conf: reject
NOBODY = "pp_secret_nobody"  # no such role

SPECIALS = "%' \\@:/?&=#\"+;,"
PASSWORDS = st.text(
    alphabet=st.one_of(
        st.sampled_from(SPECIALS),
        st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Zs")),
    ),
    min_size=8,
    max_size=20,
)
WELL_FORMED = ("url", "url_query", "url_minimal", "kv_quoted", "kv_escaped", "key")
MALFORMED = ("url_raw", "kv_raw")  # written without the encoding or quoting the characters need
CASES = ("right", "wrong", "no_role", "rejected", "unreachable")
REGISTRY = CollectorRegistry()


# -- the ways to write a password into a conninfo ------------------------------------------------


def kv_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def kv_escaped(value: str) -> str:
    """Unquoted, every character libpq would stop at escaped with a backslash."""
    return re.sub(r"([\\' \t\n\r\f\v])", r"\\\1", value)


def url_minimal(value: str) -> str:
    """Percent-encode only what libpq needs, in lower-case hex (the form urllib does not produce)."""
    return "".join(
        "".join(f"%{b:02x}" for b in ch.encode()) if ch in "%@/?&=#" or ch.isspace() or ord(ch) < 33 else ch
        for ch in value
    )


def conninfo_for(form: str, password: str, user: str, port: int) -> tuple[str, dict[str, str]]:
    """(conninfo, libpq parameters given beside it) with ``password`` written in ``form``."""
    host = "127.0.0.1"
    q = urllib.parse.quote(password, safe="")
    return {
        "url": (f"postgresql://{user}:{q}@{host}:{port}/app?connect_timeout=5", {}),
        "url_query": (f"postgresql://{user}@{host}:{port}/app?password={q}&connect_timeout=5", {}),
        "url_minimal": (f"postgresql://{user}:{url_minimal(password)}@{host}:{port}/app", {}),
        "kv_quoted": (f"host={host} port={port} user={user} password={kv_quoted(password)} dbname=app", {}),
        "kv_escaped": (f"host={host} password={kv_escaped(password)} port={port} user={user} dbname=app", {}),
        "key": (f"host={host} port={port} user={user} dbname=app connect_timeout=5", {"password": password}),
        "url_raw": (f"postgresql://{user}:{password}@{host}:{port}/app", {}),
        "kv_raw": (f"host={host} port={port} user={user} password={password} dbname=app", {}),
    }[form]


def spellings(password: str) -> set[str]:
    """The password as any output might spell it."""
    forms = {
        password,
        repr(password)[1:-1],
        json.dumps(password)[1:-1],
        json.dumps(password, ensure_ascii=False)[1:-1],
        urllib.parse.quote(password, safe=""),
        urllib.parse.quote(password),
        url_minimal(password),
        kv_quoted(password)[1:-1],
        kv_escaped(password),
    }
    return {f for f in forms if len(f) >= MIN_SECRET}


def leaks(password: str, texts: t.Iterable[str]) -> list[str]:
    forms = spellings(password)
    return [f"{f!r} in {text[:300]!r}" for text in texts for f in forms if f in text]


def natural(password: str, corpus: str) -> bool:
    """The password is a piece of what the library says anyway ('max_life', say): no test of secrecy."""
    return any(f in corpus for f in spellings(password))


def exception_texts(exc: BaseException | None) -> list[str]:
    """str, repr, args and traceback of an exception and of every exception chained to it."""
    if exc is None:
        return []
    out = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e), *map(repr, e.args), repr(getattr(e, "pgconn", None))]
        e = e.__cause__ or e.__context__
    return out


class Lines(logging.Handler):
    """Every record of the library's logger, formatted the usual way (traceback included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@contextlib.contextmanager
def captured_logs() -> Iterator[Lines]:
    logger = logging.getLogger("flask_proxypool")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server: a role that logs in with a password, and one pg_hba.conf rejects ----------------


def set_password(pg: PgServer, password: str) -> None:
    with pg.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(password)))


@pytest.fixture(scope="module")
def auth_pg(pg: PgServer) -> Iterator[PgServer]:
    """The test cluster, with scram-sha-256 logins for GROUP's members and a pg_hba reject for REJECTED.

    The cluster trusts every loopback login (``initdb -A trust``): two lines go first in pg_hba.conf, for
    these roles only, and come out again at the end.
    """
    for role in (ROLE, REJECTED, GROUP):
        pg.psql(f"DROP ROLE IF EXISTS {role}")
    pg.psql(f"CREATE ROLE {GROUP} NOLOGIN; CREATE ROLE {ROLE} LOGIN IN ROLE {GROUP}; CREATE ROLE {REJECTED} LOGIN")
    set_password(pg, "first-password")
    hba = pg.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(
        f"host all +{GROUP} {pg.host}/32 scram-sha-256\nhost all {REJECTED} {pg.host}/32 reject\n" + original
    )
    try:
        pg.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: poll until a login without the password is refused
            try:
                psycopg.connect(pg.conninfo("app", user=ROLE, connect_timeout="5")).close()
            except psycopg.OperationalError as e:
                assert "no password supplied" in str(e)
                break
            assert time.monotonic() < deadline, "pg_hba.conf reload not seen within 10 s"
            time.sleep(0.05)
        yield pg
    finally:
        hba.write_text(original)
        pg.psql("SELECT pg_reload_conf()")


def make(pools: dict[str, t.Any], **config: t.Any) -> Flask:
    app = Flask(f"secrets_{uuid.uuid4().hex[:8]}")
    app.config.update(PROXYPOOL_POOLS=pools, PROXYPOOL_STATS_URL="/_stats", PROXYPOOL_STATS_GUARD=lambda: True)
    app.config.update(config)
    ProxyPool(app)
    metrics.register(app, REGISTRY, path="/metrics")

    @app.get("/q")
    def q() -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    return app


def every_output(app: Flask) -> tuple[dict[str, t.Any], list[str]]:
    """Drive every output the library has for pool 'db'; return (what happened, all the text)."""
    state = app.extensions["proxypool"]
    texts: list[str] = []
    seen: dict[str, t.Any] = {}
    client = app.test_client()
    resp = client.get("/q")
    seen["status"], seen["body"] = resp.status_code, resp.get_json()
    texts += [resp.get_data(as_text=True), str(resp.headers)]
    with app.app_context():
        try:
            db.execute("SELECT 1")
        except Exception as e:
            seen["error"] = e
            texts += exception_texts(e)
    runner = app.test_cli_runner()
    for args in (
        ["stats"],
        ["stats", "--json"],
        ["check", "--timeout", "3"],
        ["size", "--workers", "1", "--threads", "1", "--timeout", "3"],
    ):
        result = runner.invoke(args=["proxypool", *args])
        seen[args[0]] = result.output
        texts += [result.output, result.stderr, *exception_texts(result.exception)]
    stats = state.stats()
    pool = state.pool("db")
    config = state.configs["db"]
    texts += [
        repr(stats),
        json.dumps({n: s.to_dict() for n, s in stats.items()}, ensure_ascii=False),
        repr(config.public()),
        repr(config),
        repr(pool),
        repr(pool.kind),
        pool.kind.describe(),
        repr(pool.stats()),
    ]
    body = client.get("/_stats")
    texts += [body.get_data(as_text=True), json.dumps(body.get_json(), ensure_ascii=False)]
    texts.append(client.get("/metrics").get_data(as_text=True))
    return seen, texts


# -- property: passwords x conninfo forms x server outcomes x outputs ----------------------------


@pytest.fixture(scope="module")
def corpus(auth_pg: PgServer) -> str:
    """Everything the outputs say with a password no example draws: what they say whatever the password."""
    texts: list[str] = []
    with captured_logs() as logs:
        for case in CASES:
            set_password(auth_pg, "Baseline-Pw-1")
            user = {"no_role": NOBODY, "rejected": REJECTED}.get(case, ROLE)
            port = dead_port() if case == "unreachable" else auth_pg.port
            for form in ("url", "kv_quoted"):
                conninfo, extra = conninfo_for(form, "Baseline-Pw-1" if case == "right" else "Wrong-Pw-1", user, port)
                app = make({"db": {"conninfo": conninfo, **extra, "timeout": 3, "max_size": 1}})
                try:
                    texts += every_output(app)[1]
                finally:
                    app.extensions["proxypool"].close(timeout=1.0)
        for form in MALFORMED:
            for bad in ("a%zz b@c/d'e", "a&b=c d=e"):
                try:
                    make({"db": {"conninfo": conninfo_for(form, bad, ROLE, auth_pg.port)[0]}})
                except ConfigError as e:
                    texts.append(str(e))
    return "\n".join(texts + logs.lines)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(password=PASSWORDS, form=st.sampled_from(WELL_FORMED + MALFORMED), case=st.sampled_from(CASES))
def test_no_password_in_any_output(auth_pg: PgServer, corpus: str, password: str, form: str, case: str) -> None:
    """Logs, exceptions and their chains, 503 bodies, CLI, stats, endpoint, metrics and reprs never show it."""
    assume(not natural(password, corpus))
    user = {"no_role": NOBODY, "rejected": REJECTED}.get(case, ROLE)
    port = dead_port() if case == "unreachable" else auth_pg.port
    set_password(auth_pg, password if case == "right" else "not-the-password")
    conninfo, extra = conninfo_for(form, password, user, port)
    pools = {"db": {"conninfo": conninfo, **extra, "timeout": 3, "max_size": 1}}
    with captured_logs() as logs:
        try:
            app = make(pools)
        except ConfigError as e:
            assert form in MALFORMED, f"a well-formed conninfo was refused: {e}"
            assert str(e).startswith("PROXYPOOL_POOLS['db']['conninfo'] ")
            assert e.__cause__ is None and e.__context__ is None
            assert not leaks(password, exception_texts(e) + logs.lines)
            return
        try:
            seen, texts = every_output(app)
        finally:
            app.extensions["proxypool"].close(timeout=1.0)
    assert not leaks(password, texts + logs.lines)
    if form in MALFORMED:
        return  # libpq may read another password, or another host, out of it: only the secrecy is promised
    error = seen.get("error")
    if case == "right":
        assert seen["status"] == 200 and error is None, (seen, logs.lines)
        assert seen["check"].startswith("OK      db  psycopg")
    elif case == "unreachable":
        assert seen["status"] == 503 and seen["body"]["detail"] == "the backing service is unavailable"
        assert isinstance(error, ConnectFailed) and not isinstance(error, AuthenticationFailed)
    else:
        assert seen["status"] == 503 and seen["body"]["detail"].startswith("authentication failed"), seen
        assert isinstance(error, AuthenticationFailed) and error.pool == "db"
        assert any("pool 'db': authentication failed for" in line for line in logs.lines), logs.lines
        assert "AuthenticationFailed: pool 'db' cannot log in to" in seen["check"]


def offline_texts(password: str, form: str) -> list[str]:
    """The configuration's outputs, and (for a well-formed conninfo, where libpq reads the password as
    meant) libpq-like messages that echo it as written, masked."""
    conninfo, extra = conninfo_for(form, password, "u", 5432)
    cfg = parse_pools({"db": {"conninfo": conninfo, **extra}})["db"]
    written = conninfo.split("password=", 1)[1].split("&")[0].split(" ")[0] if "password=" in conninfo else password
    echoes = [
        f'invalid percent-encoded token: "{password}"',
        f'missing "=" after "{written}" in connection info string',
        f"failed to resolve host {password!r}",
        f"password authentication failed for user {json.dumps(password)}",
    ]
    texts = [repr(cfg), repr(cfg.public()), cfg.make_kind().describe()]
    return texts + [mask_password(m) for m in echoes] if form in WELL_FORMED else texts


OFFLINE_CORPUS = "\n".join(text for form in WELL_FORMED for text in offline_texts("Dummy-Pw-1", form))


@settings(max_examples=300, deadline=None)
@given(password=PASSWORDS, form=st.sampled_from(WELL_FORMED + MALFORMED))
def test_configuration_never_shows_the_password(password: str, form: str) -> None:
    """Offline, many more passwords: the config, its repr and errors, the kind's target, and a libpq
    message that echoes the password as written are all masked."""
    assume(not natural(password, OFFLINE_CORPUS))
    conninfo, extra = conninfo_for(form, password, "u", 5432)
    bad: ConfigError | None = None
    try:
        configs = parse_pools({"db": {"conninfo": conninfo, **extra}})
    except ConfigError as e:
        bad = e
    if bad is not None:
        assert form in MALFORMED, f"a well-formed conninfo was refused: {bad}"
        assert not leaks(password, exception_texts(bad))
        return
    texts = offline_texts(password, form)
    assert not leaks(password, texts)
    if form in WELL_FORMED:
        assert "***" in configs["db"].make_kind().describe() or form == "key"


# -- init_app refuses a conninfo libpq would refuse --------------------------------------------


def config_error(pools: dict[str, t.Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        make(pools)
    err = info.value
    assert err.__cause__ is None and err.__context__ is None  # libpq's own message is not chained
    return err


def test_issue_percent_in_url_password() -> None:
    """The issue's case: an unencoded '%' in a URL password fails at init_app, naming pool and key, not the password."""
    err = config_error({"db": {"conninfo": "postgresql://app:p%ss_w0rd@127.0.0.1/app"}})
    assert str(err) == (
        "PROXYPOOL_POOLS['db']['conninfo'] cannot be parsed by libpq: a '%' is not followed by two hex digits; "
        "percent-encode the user name and password in a URL: urllib.parse.quote(password, safe='')"
    )
    assert not leaks("p%ss_w0rd", exception_texts(err)) and "ss_w0rd" not in str(err)


@pytest.mark.parametrize(
    ("conninfo", "reason"),
    [
        ("postgresql://app:p ss_w0rd@127.0.0.1/app", "cannot be parsed by libpq: it holds a space"),
        ("postgresql://app:p@ss_w0rd@127.0.0.1/app", "cannot be parsed unambiguously: an '@' follows the user name"),
        ("postgresql://app:p/ss_w0rd@127.0.0.1/app", "cannot be parsed unambiguously: an '@' follows the user name"),
        ("host=127.0.0.1 password=p ss_w0rd", "cannot be parsed by libpq: a word is not followed by '='"),
        ("host=127.0.0.1 password='p ss_w0rd", "cannot be parsed by libpq: a quoted value is not closed"),
        ("host=127.0.0.1 password=p ss_w0rd=1", "has an unknown keyword right after the password"),
        ("postgresql://127.0.0.1/app?password=p&ss_w0rd=1", "has an unknown keyword right after the password"),
    ],
)
def test_malformed_password_refused_without_echo(conninfo: str, reason: str) -> None:
    """A password libpq would misread fails at init_app; the message says how to write it and quotes none of it."""
    err = config_error({"db": {"conninfo": conninfo}})
    assert str(err).startswith(f"PROXYPOOL_POOLS['db']['conninfo'] {reason}")
    assert "ss_w0rd" not in " ".join(exception_texts(err))


@pytest.mark.parametrize(
    ("conninfo", "message"),
    [
        ("host=127.0.0.1 bogus_key=1", "has the unknown libpq keyword 'bogus_key'"),
        ("postgresql://127.0.0.1/app?bogus_key=1", "has the unknown libpq keyword 'bogus_key'"),
        ("host=127.0.0.1 conect_timeout=3", "has the unknown libpq keyword 'conect_timeout' (did you mean"),
        ("host=127.0.0.1 connect_timeout=abc", "has a 'connect_timeout' that is not a number of seconds"),
        ("postgresql://127.0.0.1/app?connect_timeout=abc", "has a 'connect_timeout' that is not a number"),
        ("host=127.0.0.1 keepalives_idle=1m", "has a 'keepalives_idle' that is not an integer"),
        ("host=127.0.0.1 port=abc", "has a 'port' that is not a port number from 1 to 65535"),
        ("postgresql://127.0.0.1:70000/app", "has a 'port' that is not a port number from 1 to 65535"),
        ("host=127.0.0.1 port=5432,5433", "gives 2 ports for 1 host(s)"),
    ],
)
def test_bad_conninfo_refused_at_init_app(conninfo: str, message: str) -> None:
    """Unknown keywords and values libpq refuses only when connecting fail at init_app, naming pool and key."""
    err = config_error({"db": {"conninfo": conninfo}})
    assert str(err).startswith(f"PROXYPOOL_POOLS['db']['conninfo'] {message}")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("connect_timeout", "abc", "must be a number of seconds, got 'abc'"),
        ("port", "x", "must be a port number from 1 to 65535 (or a comma-separated list, one per host), got 'x'"),
        ("keepalives", "yes", "must be an integer (libpq refuses it when connecting), got 'yes'"),
    ],
)
def test_bad_libpq_parameter_refused(key: str, value: str, message: str) -> None:
    """A libpq parameter given beside the conninfo is checked too; the message names it and its value."""
    err = config_error({"db": {"conninfo": "host=127.0.0.1 dbname=app", key: value}})
    assert str(err) == f"PROXYPOOL_POOLS['db'][{key!r}] {message}"


@pytest.mark.parametrize(
    "conninfo",
    [
        "",
        "dbname=app",
        "host=127.0.0.1 port=' 5432 ' connect_timeout=2.5 keepalives=+1 password='a b\\'c'",
        "postgresql://u:p%3Fss%40x@127.0.0.1:5432/app?sslmode=disable&ssl=true",
        "postgresql://u:p?ss@127.0.0.1/app",
        "postgresql://h1,h2:5433/app?target_session_attrs=read-write",
        "postgresql://h1:5433/app?target_session_attrs=any",
        "host=h1,h2 port=5432,5433",
        "host=h1,h2 port=5432",
    ],
)
def test_valid_conninfo_accepted(conninfo: str) -> None:
    """What libpq accepts passes init_app."""
    app = make({"db": {"conninfo": conninfo}})
    assert app.extensions["proxypool"].configs["db"].kind == "psycopg"


def test_psycopg_kind_checks_its_conninfo() -> None:
    """PsycopgKind used without Flask refuses a conninfo libpq would, and masks its target."""
    with pytest.raises(ConfigError, match=re.escape("psycopg conninfo: has the unknown libpq keyword 'bogus_key'")):
        PsycopgKind("host=127.0.0.1 bogus_key=1")
    with pytest.raises(ConfigError, match=re.escape("psycopg nonsense: is not a libpq parameter")):
        PsycopgKind("host=127.0.0.1", {"nonsense": 1})
    kind = PsycopgKind("host=127.0.0.1 password='s3cr3t pw' dbname=app", {"autocommit": True})
    assert kind.describe() == "host=127.0.0.1 password=*** dbname=app"


# -- authentication failures are told apart from outages ----------------------------------------


@pytest.mark.parametrize("case", ["wrong", "no_role", "rejected"])
def test_authentication_failure_is_reported_as_one(auth_pg: PgServer, case: str) -> None:
    """Wrong password, no such role, pg_hba reject: AuthenticationFailed (503), logged with pool and masked target."""
    set_password(auth_pg, "the-right-password")
    user = {"no_role": NOBODY, "rejected": REJECTED}.get(case, ROLE)
    url = f"postgresql://{user}:Wr0ng-pw@127.0.0.1:{auth_pg.port}/app"
    with captured_logs() as logs:
        app = make({"db": {"conninfo": url}})
        try:
            resp = app.test_client().get("/q")
            check = app.test_cli_runner().invoke(args=["proxypool", "check"])
            stats = app.extensions["proxypool"].stats()["db"]
        finally:
            app.extensions["proxypool"].close(timeout=1.0)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.get_json() == {
        "error": "service unavailable",
        "pool": "db",
        "detail": "authentication failed: the backing service refused the pool's credentials",
        "retry_after": 1,
    }
    target = f"postgresql://{user}:***@127.0.0.1:{auth_pg.port}/app"
    failed = [r.getMessage() for r in logs.records if "authentication failed for" in r.getMessage()]
    assert failed and failed[0].startswith(f"pool 'db': authentication failed for {target}: the server refused")
    assert check.exit_code == 1
    assert f"FAILED  db  psycopg  {target}  AuthenticationFailed: pool 'db' cannot log in to {target}" in check.output
    assert stats.connect_failures >= 1
    assert not leaks("Wr0ng-pw", logs.lines + [check.output, resp.get_data(as_text=True), repr(stats)])


def test_authentication_failed_is_a_connect_failed(auth_pg: PgServer) -> None:
    """AuthenticationFailed is exported, a ConnectFailed (so a PoolUnavailable), with the pool's name; its
    cause is masked and carries no connection (psycopg's would show the password in its repr)."""
    set_password(auth_pg, "the-right-password")
    app = make({"db": {"conninfo": f"host=127.0.0.1 port={auth_pg.port} user={ROLE} password=Wr0ng-pw dbname=app"}})
    try:
        with app.app_context(), pytest.raises(AuthenticationFailed) as info:
            db.execute("SELECT 1")
    finally:
        app.extensions["proxypool"].close(timeout=1.0)
    err = info.value
    assert isinstance(err, ConnectFailed) and isinstance(err, PoolUnavailable) and err.pool == "db"
    assert "password authentication failed for user" in str(err)
    cause = err.__cause__
    assert isinstance(cause, AuthenticationFailed) and cause.__context__ is None
    assert getattr(cause, "pgconn", None) is None
    assert not leaks("Wr0ng-pw", exception_texts(err))


def test_right_password_connects(auth_pg: PgServer) -> None:
    """The role logs in with its password written in any of the forms (sanity of the fixture and the parsing)."""
    password = "it's a %40 p@ss/w:rd?&=#"
    set_password(auth_pg, password)
    for form in WELL_FORMED:
        conninfo, extra = conninfo_for(form, password, ROLE, auth_pg.port)
        app = make({"db": {"conninfo": conninfo, **extra}})
        try:
            assert app.test_client().get("/q").status_code == 200, form
        finally:
            app.extensions["proxypool"].close(timeout=1.0)


def test_unreachable_server_is_an_outage_not_an_authentication_failure() -> None:
    """Nothing listening: ConnectFailed and 'unavailable', as before."""
    app = make({"db": {"conninfo": f"postgresql://app:pw-1234@127.0.0.1:{dead_port()}/app"}})
    try:
        resp = app.test_client().get("/q")
        with app.app_context(), pytest.raises(ConnectFailed) as info:
            db.execute("SELECT 1")
    finally:
        app.extensions["proxypool"].close(timeout=1.0)
    assert resp.status_code == 503 and resp.get_json()["detail"] == "the backing service is unavailable"
    assert not isinstance(info.value, AuthenticationFailed)


# -- the scrubbing itself --------------------------------------------------------------------------


class Owner:
    """Something to hold registered secrets (a pool's kind or configuration does, in real use)."""


def test_logger_masks_a_line_that_forgot_to() -> None:
    """A record of the library's logger holding a registered password, in its message or traceback, is masked."""
    owner = Owner()
    register_secrets(owner, ["pa ss%w0rd"])
    logger = logging.getLogger("flask_proxypool")
    with captured_logs() as logs:
        logger.warning("pool %r: raw %s", "db", "pa ss%w0rd")
        try:
            raise RuntimeError("server said 'pa ss%w0rd'")
        except RuntimeError:
            logger.exception("pool 'db': failed")
    assert logs.lines[0] == "WARNING flask_proxypool pool 'db': raw ***"
    assert "RuntimeError: server said '***'" in logs.lines[1]
    assert not leaks("pa ss%w0rd", logs.lines)


def test_secrets_are_forgotten_with_their_owner() -> None:
    """A password is scrubbed while the pool or configuration holding it lives, not forever (no test leaks
    its secrets into another's output)."""
    owner = Owner()
    register_secrets(owner, ["forget-me-pw"])
    assert mask_password("x forget-me-pw x") == "x *** x"
    del owner
    gc.collect()
    assert mask_password("x forget-me-pw x") == "x forget-me-pw x"


def test_short_password_masked_in_conninfo_only() -> None:
    """A password shorter than MIN_SECRET is masked where libpq would read it, not searched for in free text."""
    cfg = parse_pools({"db": {"conninfo": "postgresql://u:ab@h/db?sslpassword=cd"}})["db"]
    assert cfg.public()["conninfo"] == "postgresql://u:***@h/db?sslpassword=***"
    assert mask_password("about cabs") == "about cabs"
    assert "ab@" not in repr(cfg)


def test_password_equal_to_the_user_name_is_not_scrubbed_everywhere() -> None:
    """postgres:postgres: the target masks the password, but 'postgres' stays readable in other text."""
    cfg = parse_pools({"db": {"conninfo": "postgresql://postgres:postgres@127.0.0.1/app"}})["db"]
    assert cfg.make_kind().describe() == "postgresql://postgres:***@127.0.0.1/app"
    assert mask_password('role "postgres" does not exist') == 'role "postgres" does not exist'


def test_pool_config_repr_is_masked() -> None:
    """PoolConfig's repr shows the configuration the way public() does."""
    cfg = parse_pools({"db": {"conninfo": "host=h password='pw 1234'", "password": "pw-5678"}})["db"]
    text = repr(cfg)
    assert "password=***" in text and "'password': '***'" in text
    assert "pw 1234" not in text and "pw-5678" not in text
