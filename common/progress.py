"""Progress bars and logging: bars and logs go to stderr, results to stdout."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("actcache")


class _BarAwareHandler(logging.StreamHandler):
    """Writes each log line through tqdm, which lifts a progress bar drawn on the same stream out of
    the way first: a line logged mid-harvest (a storage retry, say) starts a line of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (as logging.StreamHandler does)
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Send actcache's log lines to stderr, once."""
    if not log.handlers:
        handler = _BarAwareHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("actcache: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def token_bar(total: int | None, desc: str, initial: int = 0, disable: bool | None = None) -> tqdm:
    """A tqdm bar counting tokens, showing tokens/s and an ETA, on stderr."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.05,
        disable=disable,
    )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_count(text: str | int) -> int:
    """'100M' -> 100_000_000; '2k' -> 2000; '1_000' -> 1000."""
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
    if s and s[-1].lower() in mult:
        return int(float(s[:-1]) * mult[s[-1].lower()])
    return int(float(s))
