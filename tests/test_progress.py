"""Progress on stderr where it is not a terminal (a job log): whole lines, one at least every heartbeat
even while nothing advances, nothing for work done within the delay, nothing at all when quiet."""

from __future__ import annotations

import io
import logging
import time

import pytest

from actcache.common import progress
from actcache.common.progress import TokenBar, stage


@pytest.fixture
def quiet_reset():
    yield
    progress.set_quiet(False)


def _bar(stream, **kw):
    return TokenBar(total=1000, desc="eval", unit="tok", unit_scale=True, file=stream, **kw)


def test_a_bar_off_a_terminal_writes_whole_lines_and_a_heartbeat_while_stuck():
    s = io.StringIO()
    bar = _bar(s, heartbeat=0.3, delay=0)
    bar.update(100)
    time.sleep(1.2)  # nothing advances: the heartbeat still writes
    bar.set_postfix_str("SAE 2/3 relu")
    bar.update(900)
    bar.close()
    text = s.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 4 and all(line.startswith("eval: ") for line in lines)
    assert "tok/s" in lines[1] and " 10% 100/1.00k" in lines[1]
    assert lines[-1].startswith("eval: 100% 1.00k/1.00k") and "SAE 2/3 relu" in lines[-1]


def test_quick_work_says_nothing_and_quiet_says_nothing(quiet_reset, caplog):
    s = io.StringIO()
    bar = _bar(s, delay=5)
    bar.update(1000)
    bar.close()
    assert s.getvalue() == ""
    progress.set_quiet(True)
    assert progress.token_bar(10, "x").disable
    with caplog.at_level(logging.INFO, logger="actcache"):
        with stage("loading", heartbeat=0.1, after=0):
            time.sleep(0.3)
    assert not [r for r in caplog.records if "loading" in r.getMessage()]


def test_a_stage_says_it_is_under_way_every_heartbeat_and_how_long_it_took():
    lines = []

    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h = Grab()
    progress.log.addHandler(h)
    old = progress.log.level
    progress.log.setLevel(logging.INFO)
    try:
        with stage("loading the model m", heartbeat=0.25, after=0.1):
            time.sleep(0.8)
        with stage("quick", after=0.5):
            pass
    finally:
        progress.log.removeHandler(h)
        progress.log.setLevel(old)
    assert lines[0] == "loading the model m ..."
    assert any("s so far" in line for line in lines[1:-1])
    assert lines[-1].startswith("loading the model m: done in ")
    assert not any(line.startswith("quick") for line in lines)
