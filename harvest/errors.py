"""Turning library exceptions into the one line a UserError carries."""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception, and of its root cause when a library wrapped one."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    parts = [(str(x).strip().splitlines() or [type(x).__name__])[0] for x in ((e, root) if root is not e else (e,))]
    return ": ".join(parts)[:limit]
