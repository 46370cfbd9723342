"""How a benchmark hands back its result: the JSON on stdout and, with --out, the same JSON in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_result(result: dict[str, Any], out: str | Path | None, indent: int = 2) -> None:
    """Print `result` as JSON; with `out`, also write it there (creating its folder), ending in a newline."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
