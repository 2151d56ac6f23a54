"""Print the README's configuration reference table from the key definitions in config.py."""

from __future__ import annotations

from flask_proxypool.config import COMMON_KEYS
from flask_proxypool.config import KIND_KEYS


def table() -> str:
    lines = ["| key | kinds | type | default | meaning |", "|---|---|---|---|---|"]
    rows = [(k, "all", spec) for k, spec in COMMON_KEYS.items()]
    for kind, keys in KIND_KEYS.items():
        rows += [(k, kind, spec) for k, spec in keys.items()]
    for key, kinds, spec in rows:
        default = "required" if spec.required else ("—" if spec.default is None else f"`{spec.default!r}`")
        lines.append(f"| `{key}` | {kinds} | {spec.type} | {default} | {spec.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
