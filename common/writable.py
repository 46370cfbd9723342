"""Whether a command can write where it will write, asked before the work: a folder that cannot be
written (read-only, not ours, on a full or read-only disk) is one line at the start, not an error
after minutes of work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError, first_line


def probe_writable(folder: str | os.PathLike, what: str) -> None:
    """Create and remove a probe file in `folder`; UserError naming `what` when that fails."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=".actcache-probe-", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder} ({e.strerror or first_line(e)}); make the folder "
                        "writable or copy it somewhere that is") from None
    os.close(fd)
    os.unlink(name)
