"""Keep passwords out of logs, errors and stats."""

from __future__ import annotations

import re

__all__ = ["mask_password"]

_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*(@)")
_QUERY = re.compile(r"([?&]\w*password=)[^&#\s]*", re.IGNORECASE)
_KEYWORD = re.compile(r"""((?<![\w?&])\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)""", re.IGNORECASE)


def mask_password(text: str) -> str:
    """Replace any password in a conninfo (key=value or URL form) with ``***``."""
    text = _URL_USERINFO.sub(r"\1***\2", text)
    text = _QUERY.sub(r"\1***", text)
    return _KEYWORD.sub(r"\1***", text)
