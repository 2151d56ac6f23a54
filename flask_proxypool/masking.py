"""Keep passwords out of logs, errors and stats.

Two layers, because patterns alone cannot win: libpq echoes whatever piece of
a conninfo it choked on (`invalid percent-encoded token: "p%ss_w0rd"`), and
a password may hold any character a pattern would stop at.

* **Known secrets.** A conninfo is read here the way libpq reads it
  (`conninfo_secret_spans`), so its display form masks the password by
  position (`mask_conninfo`), whatever its characters. The password
  strings themselves are registered (`register_secrets`, for as long as
  the pool or configuration that holds them lives), and `mask_password`
  replaces each of them, and the forms they take once percent-encoded, quoted,
  `repr()`-ed or JSON-encoded, wherever they appear in a text.
* **Patterns**, for text about a conninfo never seen here (a factory's own
  error, say): URL userinfo, `?password=` and `password=` keywords.

Every record of the `flask_proxypool` logger goes through
`mask_password` as well (a filter on that logger), traceback included,
so a line that forgot to mask cannot leak a registered password.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import typing as t
import urllib.parse
import weakref

__all__ = [
    "MIN_SECRET",
    "conninfo_keys",
    "conninfo_secret_spans",
    "describe_exception",
    "is_secret_key",
    "mask_conninfo",
    "mask_password",
    "register_secrets",
]

MASK = "***"

#: Registered secrets shorter than this are masked inside a conninfo (by
#: position) but not searched for in free text: scrubbing every "ab" from every
#: message would garble them, and a secret that short protects nothing.
MIN_SECRET = 4

_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*(@)")
_QUERY = re.compile(r"([?&]\w*password=)[^&#\s]*", re.IGNORECASE)
_KEYWORD = re.compile(r"""((?<![\w?&])\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)""", re.IGNORECASE)

_URI_PREFIXES = ("postgresql://", "postgres://")
_SPACE = " \t\n\r\f\v"  # C isspace() in the C locale, as libpq tests it: not str.isspace()


def is_secret_key(key: str) -> bool:
    """A libpq keyword whose value is a secret: password, sslpassword, oauth_client_secret, scram_*_key."""
    key = key.lower()
    return "password" in key or "secret" in key or (key.startswith("scram_") and key.endswith("_key"))


# -- reading a conninfo the way libpq does ------------------------------------------------------


class _Field(t.NamedTuple):
    key: str  #: as written (a URL query key still percent-encoded)
    start: int  #: the value's span in the text, quotes included
    end: int
    raw: bool  #: an unquoted key=value value, or a URL value: a space or '&' ends it early


def _keyword_fields(text: str) -> list[_Field] | None:
    """`key = value` pairs as libpq's `conninfo_parse` splits them; None where libpq fails."""
    fields: list[_Field] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in _SPACE:
            i += 1
            continue
        k0 = i
        while i < n and text[i] != "=" and text[i] not in _SPACE:
            i += 1
        key = text[k0:i]
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n or text[i] != "=":
            return None  # libpq: missing "=" after ...
        i += 1
        while i < n and text[i] in _SPACE:
            i += 1
        v0 = i
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    return None  # libpq: unterminated quoted string
                if text[i] == "\\":
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    i += 1
            fields.append(_Field(key, v0, i, raw=False))
        else:
            while i < n and text[i] not in _SPACE:
                i += 2 if text[i] == "\\" else 1
            i = min(i, n)
            fields.append(_Field(key, v0, i, raw=True))
    return fields


def _url_fields(text: str) -> tuple[list[_Field], list[_Field], bool] | None:
    """(userinfo fields, query fields, whether an '@' is left after the userinfo) as libpq's
    `conninfo_uri_parse_options` splits a URL; None if the text is not a URL."""
    prefix = next((p for p in _URI_PREFIXES if text.startswith(p)), None)
    if prefix is None:
        return None
    userinfo: list[_Field] = []
    start = p = len(prefix)
    n = len(text)
    while p < n and text[p] not in "@/":
        p += 1
    if p < n and text[p] == "@":  # userinfo: up to the first '@', unless a '/' comes first
        colon = text.find(":", start, p)
        if colon == -1:
            userinfo.append(_Field("user", start, p, raw=True))
        else:
            userinfo.append(_Field("user", start, colon, raw=True))
            userinfo.append(_Field("password", colon + 1, p, raw=True))
        p += 1
    else:
        p = start
    query = text.find("?", p)
    # libpq takes the first '@' as the end of the userinfo: any other before the query
    # lands in a host or database name, where a password holding '@' or '/' would leak
    stray_at = "@" in text[p : n if query == -1 else query]
    params: list[_Field] = []
    if query != -1:
        q = query + 1
        while q < n:
            amp = text.find("&", q)
            end = n if amp == -1 else amp
            eq = text.find("=", q, end)
            if eq != -1:
                params.append(_Field(text[q:eq], eq + 1, end, raw=True))
            q = end + 1
    return userinfo, params, stray_at


def _fields(text: str) -> list[_Field] | None:
    url = _url_fields(text)
    return url[0] + url[1] if url is not None else _keyword_fields(text)


def conninfo_secret_spans(text: str) -> list[tuple[int, int]]:
    """Where the secret values of a conninfo are, as libpq would read it (quotes included)."""
    fields = _fields(text) or []
    return [(f.start, f.end) for f in fields if is_secret_key(urllib.parse.unquote(f.key)) and f.end > f.start]


def conninfo_keys(text: str) -> tuple[list[tuple[str, bool]], bool] | None:
    """For the libpq keyword check: ([(key, follows a raw secret value)], a stray '@' in a URL); None: unreadable.

    "Follows a raw secret value" flags a key that may really be the tail of a
    password with an unquoted space (`password=a b=c`) or an unencoded '&'
    (`?password=a&b=c`): an error must not echo it.
    """
    url = _url_fields(text)
    if url is not None:
        fields: list[_Field] | None = url[1]
        stray = url[2]
    else:
        fields, stray = _keyword_fields(text), False
    if fields is None:
        return None
    out: list[tuple[str, bool]] = []
    after_secret = False
    for f in fields:
        key = urllib.parse.unquote(f.key) if url is not None else f.key
        out.append((key, after_secret))
        after_secret = is_secret_key(key) and f.raw
    return out, stray


def mask_conninfo(text: str) -> str:
    """A conninfo for display: each secret value replaced by `***` where libpq would find it.

    Text libpq could not read gets the patterns of `mask_password` instead.
    """
    if _fields(text) is None:
        return mask_password(text)
    out = []
    last = 0
    for a, b in conninfo_secret_spans(text):
        out.append(text[last:a])
        out.append(MASK)
        last = b
    out.append(text[last:])
    return mask_password("".join(out))


# -- known secrets, scrubbed from any text ---------------------------------------------------------

_lock = threading.Lock()  # guards _registered and _scrubber's rebuild
_registered: dict[int, frozenset[str]] = {}
_dead: list[int] = []  # tokens of owners gone, not yet taken out of _registered
_tokens = itertools.count()
_scrubber: re.Pattern[str] | None = None


def _forms(secret: str) -> set[str]:
    """The ways a secret may be spelled in a message: as is, encoded, quoted, escaped, trimmed."""
    out: set[str] = set()
    for s in {secret, secret.strip(), " ".join(secret.split())}:
        out.update(
            (
                s,
                repr(s)[1:-1],
                repr(s + "'\"")[1:-4],  # the repr that escapes ' (a string holding both quotes)
                repr(s.encode())[2:-1],
                s.encode("unicode_escape").decode("ascii"),
                json.dumps(s)[1:-1],
                json.dumps(s, ensure_ascii=False)[1:-1],
                urllib.parse.quote(s, safe=""),
                urllib.parse.quote(s),
                urllib.parse.quote_plus(s),
                s.replace("\\", "\\\\").replace("'", "\\'"),  # libpq's key='value' escaping
            )
        )
    return {f for f in out if len(f) >= MIN_SECRET}


def _rebuild() -> None:
    """Under `_lock`: drop the secrets of owners gone, compile one pattern for the rest."""
    global _scrubber
    while _dead:
        _registered.pop(_dead.pop(), None)
    forms: set[str] = set()
    for f in _registered.values():
        forms |= f
    # longest first: an encoded form goes whole before a shorter form inside it
    alternatives = sorted(forms, key=lambda f: (-len(f), f))
    _scrubber = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None


def _forget(token: int) -> None:
    """Called by the garbage collector, in whatever thread allocates, maybe while that thread holds
    `_lock` (compiling the pattern allocates): so it takes no lock, and the next
    `register_secrets` or `mask_password` does the work."""
    _dead.append(token)


def register_secrets(owner: object, secrets: t.Iterable[str]) -> None:
    """Scrub these strings (and their encoded forms) from all masked text while `owner` lives."""
    forms: set[str] = set()
    for s in secrets:
        if s:
            forms |= _forms(s)
    if not forms:
        return
    token = next(_tokens)
    with _lock:
        _registered[token] = frozenset(forms)
        _rebuild()
    weakref.finalize(owner, _forget, token).atexit = False


def mask_password(text: str) -> str:
    """Replace every known password, and any password a pattern finds (key=value or URL), with `***`."""
    if _dead and _lock.acquire(blocking=False):  # an owner went: stop scrubbing its secrets (never wait)
        try:
            _rebuild()
        finally:
            _lock.release()
    scrubber = _scrubber  # one read: a registration may swap it meanwhile
    if scrubber is not None:
        text = scrubber.sub(MASK, text)
    text = _URL_USERINFO.sub(r"\1***\2", text)
    text = _QUERY.sub(r"\1***", text)
    return _KEYWORD.sub(r"\1***", text)


class _MaskRecords(logging.Filter):
    """Masks a record of the library's logger that still holds a password (message or traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: let the handler report it as usual
            return True
        masked = mask_password(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            masked = mask_password(text)
            if masked != text:  # handlers use exc_text when set; drop exc_info so none formats it again
                record.exc_text, record.exc_info = masked, None
        if record.stack_info:
            record.stack_info = mask_password(record.stack_info)
        return True


logging.getLogger("flask_proxypool").addFilter(_MaskRecords())


def describe_exception(exc: BaseException) -> str:
    """An exception for a log line: its type and message on one line, any password masked.

    Masked before the line is joined: a known password is matched as it was written.
    """
    return " ".join(mask_password(f"{type(exc).__name__}: {exc}").split())
