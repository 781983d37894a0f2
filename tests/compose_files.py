"""Compose files as compose itself reads them: the helpers the deploy and multi-host tests share."""

from __future__ import annotations

import re
from typing import Any

VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(:?[-?])?([^}]*)\}")


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (and `$$`) over a loaded file."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match[str]) -> str:
        name, operator, word = match.groups()
        if operator and "?" in operator:
            assert env.get(name), f"{name} must be set: {word}"
        return env.get(name) or (word if operator and "-" in operator else "")

    return VARIABLE.sub(one, node).replace("$$", "$")
