"""Progress bars and logging: bars and logs go to stderr, results to stdout.

Every step that can take more than a few seconds shows progress, in one of two forms:

- token_bar(total, desc): a tqdm bar counting tokens, with tokens/s and an ETA. On a terminal it
  redraws in place; when stderr is a file or a pipe (a job log, CI) it writes one full line at most
  every HEARTBEAT_S seconds instead of carriage-return redraws.
- stage(desc): a step with no count to show (loading a model): a line once it has run five seconds, a
  line every HEARTBEAT_S seconds while it runs, and one with its duration when it ends.

Both also write a line every HEARTBEAT_S seconds when nothing advances (a long batch), so a silent
stretch longer than that means the process is stuck, not busy. set_quiet(True) (the commands'
--quiet) turns all of it off, and info log lines with it; warnings and errors still show."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Iterator

from tqdm import tqdm

log = logging.getLogger("actcache")

HEARTBEAT_S = 10.0  # the longest a long step stays silent on stderr
_state = {"quiet": False, "verbose": False}


class _BarAwareHandler(logging.StreamHandler):
    """Writes each log line through tqdm, which lifts a progress bar drawn on the same stream out of
    the way first: a line logged mid-harvest (a storage retry, say) starts a line of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (as logging.StreamHandler does)
            self.handleError(record)


def setup_logging(verbose: bool = False, quiet: bool | None = None) -> None:
    """Send actcache's log lines to stderr, once. quiet: warnings and errors only, no progress."""
    if not log.handlers:
        handler = _BarAwareHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("actcache: %(message)s"))
        log.addHandler(handler)
    _state["verbose"] = verbose
    if quiet is not None:
        _state["quiet"] = quiet
    log.setLevel(logging.WARNING if _state["quiet"] else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def set_quiet(quiet: bool = True) -> None:
    """No progress bars, stage lines or info log lines (warnings and errors still show)."""
    setup_logging(_state["verbose"], quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def quiet_option(f: Any, *, top: bool = False) -> Any:
    """The --quiet flag of a command (click), one definition for every command that takes it. top:
    the flag of the command group, which also turns quiet off when absent (a fresh invocation)."""
    import click

    def callback(ctx: Any, param: Any, value: bool) -> None:
        if value or top:
            set_quiet(bool(value))

    return click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=callback,
                        help="No progress or log lines on stderr (warnings and errors still show).")(f)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Ticker:
    """Calls fn every `every` seconds on a daemon thread until stopped."""

    def __init__(self, every: float, fn: Any):
        self._stop = threading.Event()
        self._fn = fn
        self._every = every
        self._thread = threading.Thread(target=self._run, name="actcache-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._fn()
            except Exception:  # noqa: BLE001  (progress must never break the work it reports on)
                return

    def stop(self) -> None:
        self._stop.set()


LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class TokenBar(tqdm):
    """tqdm that writes whole lines (at most one per HEARTBEAT_S seconds) where stderr is not a
    terminal, and that shows itself every HEARTBEAT_S seconds even when no update comes."""

    def __init__(self, *args: Any, heartbeat: float = HEARTBEAT_S, **kwargs: Any):
        self._heartbeat = heartbeat
        stream = kwargs.get("file") or sys.stderr
        self._lines = not _is_terminal(stream)
        if self._lines:
            kwargs["mininterval"] = heartbeat
            kwargs["bar_format"] = LINE_FORMAT if kwargs.get("total") else LINE_FORMAT_NO_TOTAL
        self._last_shown: float | None = None
        self._ticker = None
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._ticker = _Ticker(min(1.0, heartbeat), self._beat)

    def _beat(self) -> None:
        """From the ticker: show the bar once its delay is over, then whenever it has been silent for
        a heartbeat (a long batch, or line mode's long mininterval)."""
        now = time.monotonic()
        if self._last_shown is None:
            due = self._time() >= self.start_t + (self.delay or 0)
        else:
            due = now - self._last_shown >= self._heartbeat
        if due:
            self.refresh()
            self.last_print_t, self.last_print_n = self._time(), self.n

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        self._last_shown = time.monotonic()
        if not self._lines:
            return super().display(msg, pos)
        # closing, tqdm ends the line itself
        end = "" if getattr(self, "_closing", False) else "\n"
        self.fp.write((msg if msg is not None else self.__str__()) + end)
        self.fp.flush()
        return True

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """As tqdm's, but in line mode the text shows with the next line rather than a line of its own."""
        super().set_postfix_str(s, refresh=refresh and not self._lines)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh and not self._lines, **kwargs)

    def close(self) -> None:
        if getattr(self, "_ticker", None) is not None:
            self._ticker.stop()
            self._ticker = None
        self._closing = True
        super().close()


BAR_DELAY_S = 1.0  # a bar shows once its work has taken this long: quick steps say nothing


def token_bar(total: int | None, desc: str, initial: int = 0, disable: bool | None = None) -> tqdm:
    """A bar counting tokens, showing tokens/s and an ETA, on stderr (off when quiet), once the work
    has taken BAR_DELAY_S."""
    return TokenBar(
        delay=BAR_DELAY_S,
        total=total,
        initial=initial,
        desc=desc,
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.05,
        disable=bool(disable) or _state["quiet"],
    )


@contextlib.contextmanager
def stage(desc: str, heartbeat: float = HEARTBEAT_S, after: float = 5.0) -> Iterator[None]:
    """A step without a count (loading a model): once it has run `after` seconds a line saying it
    is under way, then one every `heartbeat` seconds, and one with its duration at its end. A step
    done sooner says nothing; silent when quiet."""
    if _state["quiet"]:
        yield
        return
    t0 = time.perf_counter()
    said = threading.Event()
    done = threading.Event()

    def run() -> None:
        if done.wait(after):
            return
        said.set()
        log.info(f"{desc} ...")
        while not done.wait(heartbeat):
            log.info(f"{desc} ... {time.perf_counter() - t0:.0f} s so far")

    thread = threading.Thread(target=run, name="actcache-stage", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if said.is_set():
        log.info(f"{desc}: done in {time.perf_counter() - t0:.1f} s")


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
