"""Errors a user can cause and fix; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the input or the environment, with a message that says what to do."""

    exit_code = 2


class StoreError(UserError):
    """The store is missing, damaged, of another format version, or does not match the request."""


class OverflowError16(UserError):
    """An activation does not fit in float16."""

def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception, and of its root cause when a library wrapped one."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    parts = [(str(x).strip().splitlines() or [type(x).__name__])[0] for x in ((e, root) if root is not e else (e,))]
    return ": ".join(parts)[:limit]
