"""Errors a user can cause and fix; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the input or the environment, with a message that says what to do."""

    exit_code = 2


class StoreError(UserError):
    """The store is missing, damaged, of another format version, or does not match the request."""


class OverflowError16(UserError):
    """An activation does not fit in float16."""
