"""Input checks: every field is checked in Python before any query, so bad input is a 400 that says what to fix.

The schema checks again (``schema.py``), but only as a safety net: a database error
tells the client nothing useful, and sqlite3 without ``STRICT`` would not even refuse.
"""

from __future__ import annotations

import json
import typing as t

from flask import abort, request

MAX_INT = 2**31 - 1  # PostgreSQL's ``integer``; the same bound on sqlite3 keeps both engines alike
MAX_NAME = 100


class Field(t.NamedTuple):
    what: str  #: the message says "<field> must be <what>"
    ok: t.Callable[[t.Any], bool]


# ``type(v) is int``, not ``isinstance``: JSON ``true`` is a Python bool, and bool is an int.
POSITIVE_INT = Field(f"an integer from 1 to {MAX_INT}", lambda v: type(v) is int and 1 <= v <= MAX_INT)
NON_NEGATIVE_INT = Field(f"an integer from 0 to {MAX_INT}", lambda v: type(v) is int and 0 <= v <= MAX_INT)
NAME = Field(
    f"a non-blank printable string of at most {MAX_NAME} characters",
    # isprintable() refuses control characters (PostgreSQL text cannot hold NUL) and lone surrogates (not UTF-8)
    lambda v: type(v) is str and v.strip() != "" and len(v) <= MAX_NAME and v.isprintable(),
)
BOOLEAN = Field("true or false", lambda v: type(v) is bool)

ITEM = {"id": POSITIVE_INT, "name": NAME, "price": NON_NEGATIVE_INT}
ORDER = {"id": POSITIVE_INT, "item_id": POSITIVE_INT, "qty": POSITIVE_INT}
ORDER_OPTIONAL = {"fail": BOOLEAN}


def _show(value: t.Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def json_body(fields: dict[str, Field], optional: dict[str, Field] | None = None) -> dict[str, t.Any]:
    """The request's JSON object with exactly these fields, each valid; else abort with 400 and every problem."""
    optional = optional or {}
    # force: `curl -d` sends a form content type; silent: a body that is not JSON gives None
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        abort(400, f"the body must be a JSON object with the fields {', '.join(fields)}")
    problems = [f"unknown field {key!r}" for key in data if key not in fields and key not in optional]
    for key, field in {**fields, **optional}.items():
        if key not in data:
            if key in fields:
                problems.append(f"missing field {key!r}")
        elif not field.ok(data[key]):
            problems.append(f"{key} must be {field.what}, got {_show(data[key])}")
    if problems:
        abort(400, "; ".join(problems))
    return data


def path_id(value: int, what: str) -> int:
    """An id from the URL; one outside 1..MAX_INT cannot exist, so it is a 404 without a query."""
    if not POSITIVE_INT.ok(value):
        abort(404, f"{what} {value} not found")
    return value
