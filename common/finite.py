"""Non-finite numbers in results: JSON never holds a bare NaN or infinity (JSON has none; Python writes
them anyway, and a browser's JSON.parse refuses the file). A non-finite value becomes null, and the
result says where (its `non_finite` list of key paths), so a reader can tell "undefined" from "broken".
Commands that produce such a result warn, name the values, and exit non-zero (NonFiniteResult)."""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import UserError


class NonFiniteResult(UserError):
    """A result came out with NaN or infinite values (written as null and flagged)."""

    exit_code = 1


def _walk(v: Any, path: str, bad: list[str]) -> Any:
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        bad.append(path or "value")
        return None
    if isinstance(v, dict):
        return {k: _walk(x, f"{path}.{k}" if path else str(k), bad) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_walk(x, f"{path}[{i}]", bad) for i, x in enumerate(v)]
    return v


def finite_json(obj: Any) -> tuple[Any, list[str]]:
    """(a copy of obj with every non-finite float replaced by None, the key paths of those values)."""
    bad: list[str] = []
    return _walk(obj, "", bad), bad


def dumps(obj: Any, **kw: Any) -> tuple[str, list[str]]:
    """(JSON text of obj with null for every non-finite float, the key paths of those values). The
    common case (all finite) costs one json.dumps."""
    try:
        return json.dumps(obj, allow_nan=False, **kw), []
    except ValueError:
        clean, bad = finite_json(obj)
        return json.dumps(clean, allow_nan=False, **kw), bad


def describe(paths: list[str], limit: int = 4) -> str:
    """A few key paths, for one line."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
