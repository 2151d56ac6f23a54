"""A libpq conninfo read as libpq reads it, once, at configuration time; connect errors that show nothing of it.

The psycopg kind's input checking: `inspect_conninfo` refuses at
`init_app` what libpq would refuse (now or when connecting), without ever
quoting a value, and finds the secrets to scrub from every text the library
writes; `sanitized` rebuilds a connect error with its message masked.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing as t

from .errors import AuthenticationFailed
from .masking import conninfo_keys, conninfo_secret_spans, is_secret_key, mask_conninfo, mask_password

__all__ = [
    "TARGETS",
    "BadConninfo",
    "Conninfo",
    "inspect_conninfo",
    "is_authentication_failure",
    "libpq_keywords",
    "sanitized",
    "session_attrs_for",
]


# -- the conninfo, read once at configuration time -----------------------------------------------

#: keywords of psycopg.connect() that are not libpq parameters
_PSYCOPG_KWARGS = frozenset({"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"})
#: libpq parameters libpq parses as integers only when connecting (psycopg parses connect_timeout itself)
_INT_PARAMS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")
_INT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*\Z")  # libpq's parse_int_param: strtol, spaces around

# What libpq's parse errors say, minus the piece they quote (it may be part of the password).
_PARSE_ERRORS = (
    ("invalid percent-encoded token", "a '%' is not followed by two hex digits"),
    ("forbidden value %00", "it holds %00"),
    ("unexpected spaces found", "it holds a space"),
    ('missing "=" after', "a word is not followed by '=' (a value holding spaces must be quoted: key='a b')"),
    ("unterminated quoted string", "a quoted value is not closed"),
    ("missing key/value separator", "a URL query parameter is not key=value"),
    ("extra key/value separator", "a URL query parameter has more than one '='"),
    ("end of string reached when looking for matching", "an IPv6 address in '[' is not closed by ']'"),
    ("invalid connection option", "it holds an unknown keyword"),
    ("invalid URI query parameter", "it holds an unknown keyword"),
)
_URL_HINT = "; percent-encode the user name and password in a URL: urllib.parse.quote(password, safe='')"
_QUOTE_HINT = "; in key=value form, quote a password holding spaces: password='a b', with \\' for ' and \\\\ for \\"


class BadConninfo(ValueError):
    """A conninfo, or a libpq parameter beside it, that libpq would refuse; never quotes a value."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        #: the key to fix: "conninfo", or the libpq parameter given beside it
        self.key = key
        #: what is wrong, without the value
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Conninfo:
    """A conninfo as libpq reads it: what to show, and the secrets to scrub from any text."""

    display: str  #: the conninfo as written, each secret value replaced by ``***``
    secrets: tuple[str, ...]  #: every secret value: as libpq decodes it, and as written


@functools.cache
def libpq_keywords() -> frozenset[str]:
    """Every keyword this libpq accepts."""
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _parse_error(conninfo: str, message: str) -> str:
    is_url = conninfo.startswith(("postgresql://", "postgres://"))
    first = " ".join(message.split())
    reason = next((what for prefix, what in _PARSE_ERRORS if first.startswith(prefix)), None)
    if reason is None:  # an unknown (or translated) message: keep what comes before the first quote
        reason = first.split('"', 1)[0].rstrip(" :") or "libpq refused it"
    hint = _URL_HINT if is_url else _QUOTE_HINT if "password" in conninfo.lower() else ""
    return f"cannot be parsed by libpq: {reason}{hint}"


def _unknown_keyword(conninfo: str) -> str | None:
    """Name an unknown keyword libpq would refuse, unless it may be the tail of a password."""
    found = conninfo_keys(conninfo)
    if found is None:
        return None
    keys, stray_at = found
    is_url = conninfo.startswith(("postgresql://", "postgres://"))
    if stray_at:
        return (
            "cannot be parsed unambiguously: an '@' follows the user name and password, so libpq would read part "
            "of them as a host or database name" + _URL_HINT
        )
    known = libpq_keywords() | ({"ssl"} if is_url else set())  # ?ssl=true: libpq's JDBC spelling of sslmode
    for key, after_secret in keys:
        if key in known:
            continue
        if after_secret:
            tail = "percent-encode '&' and '=' in a password given as ?password=..." if is_url else _QUOTE_HINT[2:]
            return f"has an unknown keyword right after the password: it may be part of the password; {tail}"
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"has the unknown libpq keyword {key!r}{hint}"
    return None


def _check_values(params: t.Mapping[str, str], given: t.Collection[str]) -> None:
    """The values libpq checks only when connecting, checked now: integers, ports, hosts against ports."""

    def bad(key: str, what: str) -> BadConninfo:
        if key in given:  # a parameter of its own: its value is no piece of a misread password
            return BadConninfo(key, f"must be {what}, got {params[key]!r}")
        return BadConninfo("conninfo", f"has a {key!r} that is not {what}")

    for key in _INT_PARAMS:
        v = params.get(key)
        if v is not None and (not _INT.match(v) or not -(2**31) <= int(v) < 2**31):
            raise bad(key, "an integer (libpq refuses it when connecting)")
    v = params.get("connect_timeout")
    if v is not None:
        try:
            ok = math.isfinite(float(v))
        except ValueError:
            ok = False
        if not ok:
            raise bad("connect_timeout", "a number of seconds")
    ports = params.get("port") or ""
    for port in ports.split(",") if ports else ():
        if port.strip() and (not _INT.match(port) or not 1 <= int(port) <= 65535):
            raise bad("port", "a port number from 1 to 65535 (or a comma-separated list, one per host)")
    hosts = [len(params[k].split(",")) for k in ("host", "hostaddr") if params.get(k)]
    nhosts = max(hosts, default=1)
    if len(hosts) == 2 and hosts[0] != hosts[1]:
        where = "hostaddr" if "hostaddr" in given else "host" if "host" in given else "conninfo"
        raise BadConninfo(where, f"gives {hosts[1]} hostaddr value(s) for {hosts[0]} host(s): give as many of each")
    nports = len(ports.split(",")) if ports else 0
    if nports > 1 and nports != nhosts:
        where = "port" if "port" in given else "conninfo"
        raise BadConninfo(where, f"gives {nports} ports for {nhosts} host(s): give one port, or one per host")


def inspect_conninfo(conninfo: str, params: t.Mapping[str, t.Any] | None = None) -> Conninfo:
    """Read `conninfo` (and libpq `params` given beside it) with psycopg's own parser.

    Raises:
        BadConninfo: libpq would refuse it, now or when connecting; the
            message never quotes a value, since a misread one may be a piece of
            the password.
    """
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    given = {k: v for k, v in (params or {}).items() if k not in _PSYCOPG_KWARGS and v is not None}
    for key in given:
        if key not in libpq_keywords():
            raise BadConninfo(key, "is not a libpq parameter")
    problem = _unknown_keyword(conninfo)
    if problem is not None:
        raise BadConninfo("conninfo", problem)
    if conninfo.startswith(("postgresql://", "postgres://")) and any(c.isspace() for c in conninfo):
        # libpq 17 and later refuse it; older ones read it: refuse it everywhere, so a
        # configuration valid on one machine is not refused on the next one
        raise BadConninfo("conninfo", "cannot be parsed by libpq: it holds a space" + _URL_HINT)
    failed: str | None = None
    try:
        parsed = conninfo_to_dict(conninfo)
    except Error as e:  # not raised from here: the error would chain libpq's message as its context
        failed = str(e)
    if failed is not None:
        raise BadConninfo("conninfo", _parse_error(conninfo, failed))
    merged = {k: str(v) for k, v in parsed.items()}
    merged.update((k, str(v)) for k, v in given.items())
    _check_values(merged, given)
    spans = conninfo_secret_spans(conninfo)
    secrets = [conninfo[a:b] for a, b in spans]
    secrets += [conninfo[a + 1 : b - 1] for a, b in spans if conninfo[a] == "'"]
    secrets += [v for k, v in merged.items() if is_secret_key(k)]
    # a password equal to the user name (or host, database...) is shown with it anyway: scrubbing
    # it from every message ("postgres") would only garble them
    shown = {v for k, v in merged.items() if not is_secret_key(k)}
    secrets = [s for s in secrets if s and s not in shown]
    return Conninfo(display=mask_conninfo(conninfo), secrets=tuple(dict.fromkeys(secrets)))


# -- the server a pool wants: libpq's target_session_attrs -------------------------------------

#: What a psycopg pool's `target` may be: the role of the server its connections must reach.
TARGETS = ("primary", "standby", "any")
#: For each target: what the pool gives libpq for a multi-host conninfo, and the explicit
#: `target_session_attrs` values that agree with it (libpq picks a server the pool then keeps).
_SESSION_ATTRS: dict[str, tuple[str | None, tuple[str, ...] | None]] = {
    "primary": ("primary", ("primary", "read-write")),
    "standby": ("standby", ("standby", "prefer-standby")),
    "any": (None, None),  # any explicit value agrees
}


def session_attrs_for(target: str, conninfo: str, params: t.Mapping[str, t.Any] | None = None) -> str | None:
    """The `target_session_attrs` to give libpq for a pool's `target`, or None to add nothing.

    Something is added only for several hosts (`host=a,b`, `postgresql://a:1,b:2/db`)
    and no `target_session_attrs` given: libpq then tries the hosts in turn until one
    has the wanted role, where alone it would stop at the first that answers. With one
    host there is nothing to choose; the pool's own check (`in_hot_standby`) refuses a
    server of the wrong role either way.

    Raises:
        BadConninfo: an explicit `target_session_attrs` contradicts `target` (key:
            `target_session_attrs` if given beside the conninfo, else `conninfo`),
            or this libpq is too old for a standby target.
    """
    from psycopg import pq
    from psycopg.conninfo import conninfo_to_dict

    if target not in _SESSION_ATTRS:
        raise BadConninfo("target", f"must be one of {', '.join(repr(x) for x in TARGETS)}")
    want, agree = _SESSION_ATTRS[target]
    given = {k: str(v) for k, v in (params or {}).items() if k not in _PSYCOPG_KWARGS and v is not None}
    merged = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    merged.update(given)
    explicit = merged.get("target_session_attrs")
    hosts = max((len(merged[k].split(",")) for k in ("host", "hostaddr") if merged.get(k)), default=1)
    if explicit is not None:
        # 'any' (libpq's default) with one host changes nothing; with several, libpq would stop at the
        # first that answers, a standby the pool then refuses (say, the old primary back as a standby)
        if agree is not None and explicit not in agree and (explicit != "any" or hosts > 1):
            where = "target_session_attrs" if "target_session_attrs" in given else "conninfo"
            fix = " or ".join(repr(a) for a in agree)
            raise BadConninfo(
                where,
                f"sets target_session_attrs={explicit!r}, which contradicts target {target!r}: the pool would "
                f"refuse the servers libpq picks; drop target_session_attrs (the pool passes {want!r} for several "
                f"hosts), set it to {fix}, or set target to 'any'",
            )
        return None
    if want is None or hosts < 2:
        return None
    if pq.version() < 140000:  # 'primary' and 'standby' came with libpq 14
        if target == "standby":
            raise BadConninfo(
                "target",
                f"'standby' with several hosts needs libpq >= 14 to pick the standby (this one is "
                f"{pq.version()}): list only standbys, or install psycopg[binary]",
            )
        return "read-write"
    return want


# -- errors from connect: nothing of the conninfo comes out --------------------------------------

# libpq reports a refused login in its message only (no SQLSTATE reaches the client): the
# server's wording (lc_messages is English unless the server says otherwise), then libpq's own.
_AUTH_FAILURE = re.compile(
    r"password authentication failed|authentication failed for user|no password supplied"
    r'|role "[^"]*" does not exist|is not permitted to log in|pg_hba\.conf rejects connection'
    r"|no pg_hba\.conf entry for|authentication method requirement|channel binding required",
    re.IGNORECASE,
)


def is_authentication_failure(message: str) -> bool:
    """Whether a connect error says the server refused the credentials (any of several hosts)."""
    return _AUTH_FAILURE.search(message) is not None


def sanitized(exc: Exception) -> Exception:
    """`exc` rebuilt with its message masked and nothing attached: psycopg's errors carry the
    connection (whose repr shows the password) and libpq's message may echo the conninfo."""
    message = mask_password(str(exc))
    if is_authentication_failure(message):
        return AuthenticationFailed(message)
    try:
        return type(exc)(message)
    except Exception:  # a constructor wanting other arguments
        return RuntimeError(f"{type(exc).__name__}: {message}")
