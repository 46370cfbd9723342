"""The retry policy of storage operations (common/location.py): what is retried, for how long, what
each retry says, and the knob that sets the budget. In-process and fast: the waits are recorded, not slept."""

from __future__ import annotations

import errno
import logging

import pytest

from actcache.common import location
from actcache.common.errors import StoreError, UserError
from actcache.common.lease import LeaseLost


@pytest.fixture
def waits(monkeypatch):
    """The waits retrying() asks for (nothing sleeps); the clock moves by each wait."""
    now = [1000.0]
    asked: list[float] = []

    def sleep(s: float) -> None:
        asked.append(s)
        now[0] += s

    monkeypatch.setattr(location.time, "sleep", sleep)
    monkeypatch.setattr(location.time, "monotonic", lambda: now[0])
    monkeypatch.delenv(location.RETRY_ENV, raising=False)
    return asked


def failing(times: int, error: BaseException):
    calls = []

    def op():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return op, calls


def connection_refused() -> Exception:
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 9)")
        except OSError as e:
            raise RuntimeError('Could not connect to the endpoint URL: "http://127.0.0.1:9/b/k"') from e
    except RuntimeError as e:
        return e


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_transient_failure_is_retried_with_growing_jittered_waits_and_one_line_each(waits):
    from actcache.common.progress import log

    op, calls = failing(4, connection_refused())
    handler = Lines()
    log.addHandler(handler)
    try:
        assert location.retrying(op, "s3://b/acts.zarr", "writing chunk 3 of") == "done"
    finally:
        log.removeHandler(handler)
    assert len(calls) == 5 and len(waits) == 4
    for n, w in enumerate(waits):  # doubling from FIRST_WAIT, each cut by up to a half
        full = min(location.MAX_WAIT, location.FIRST_WAIT * 2 ** n)
        assert full / 2 <= w <= full
    lines = handler.lines
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    assert lines[0].startswith("writing chunk 3 of s3://b/acts.zarr failed (") and "attempt 1, retrying in" in lines[0]
    assert "attempt 4," in lines[3] and "up to 60 s" in lines[3]


def test_the_budget_bounds_the_retries_and_the_last_error_comes_out_unchanged(waits, monkeypatch):
    monkeypatch.setenv(location.RETRY_ENV, "5")
    error = connection_refused()
    op, calls = failing(1000, error)
    with pytest.raises(RuntimeError) as e:
        location.retrying(op, "s3://b/acts.zarr", "committing")
    assert e.value is error
    assert sum(waits) == pytest.approx(5.0) and len(calls) == len(waits) + 1  # the last wait ends at the budget

    monkeypatch.setenv(location.RETRY_ENV, "0")  # no retries at all
    op, calls = failing(1, connection_refused())
    with pytest.raises(RuntimeError):
        location.retrying(op, "s3://b/acts.zarr", "committing")
    assert len(calls) == 1


@pytest.mark.parametrize("error", [
    FileNotFoundError(errno.ENOENT, "no such key"), PermissionError(errno.EACCES, "AccessDenied"),
    OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system"),
    ValueError("crc32c checksum mismatch"), StoreError("chunk 3 is damaged"), UserError("a user error"),
    LeaseLost("taken over"), KeyboardInterrupt(),
], ids=lambda e: type(e).__name__ + (f"-{e.errno}" if isinstance(e, OSError) else ""))
def test_what_waiting_cannot_fix_is_never_retried(waits, error):
    op, calls = failing(1, error)
    with pytest.raises(type(error)):
        location.retrying(op, "s3://b/acts.zarr", "reading")
    assert len(calls) == 1 and waits == []


def test_a_transient_storage_error_already_in_one_line_is_retried(waits):
    """A lease read that failed during a commit reaches retrying() as the one-line error."""
    try:
        raise connection_refused()
    except RuntimeError as e:
        line = location.storage_error(e, "s3://b/acts.zarr", "reading the lease of")
    assert isinstance(line, UserError) and location.transient_failure(line)
    try:
        raise PermissionError(errno.EACCES, "AccessDenied")
    except PermissionError as e:
        assert not location.transient_failure(location.storage_error(e, "s3://b/acts.zarr"))
    op, calls = failing(2, line)
    assert location.retrying(op, "s3://b/acts.zarr", "committing") == "done" and len(calls) == 3


def test_the_budget_knob_option_over_environment_and_bad_values_refused_at_once(monkeypatch):
    monkeypatch.delenv(location.RETRY_ENV, raising=False)
    assert location.retry_seconds() == location.RETRY_SECONDS == 60
    monkeypatch.setenv(location.RETRY_ENV, "7.5")
    assert location.retry_seconds() == 7.5
    with location.storage_options(["retry_seconds=2", "request_timeout=3", "endpoint_url=http://h:9000"]):
        assert location.retry_seconds() == 2
        # ours are not passed to s3fs; the request timeouts are, with one botocore attempt
        assert location._fs_options("s3://b/x") == {"endpoint_url": "http://h:9000", "config_kwargs": {
            "connect_timeout": 3.0, "read_timeout": 3.0, "retries": {"total_max_attempts": 1}}}
    for bad in ("-1", "soon", "inf"):
        monkeypatch.setenv(location.RETRY_ENV, bad)
        with pytest.raises(UserError, match=f"{location.RETRY_ENV}=.*seconds") as e:
            with location.storage_options(None):
                pass
        assert "\n" not in str(e.value)
    monkeypatch.delenv(location.RETRY_ENV)
    with pytest.raises(UserError, match="--storage-option retry_seconds='x'"):
        with location.storage_options(["retry_seconds=x"]):
            pass
    for bad in ("0", "-2", "nan", "x"):
        with pytest.raises(UserError, match=f"--storage-option request_timeout='{bad}'"):
            with location.storage_options([f"request_timeout={bad}"]):
                pass


def tiny_manifest():
    from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo

    return Manifest(model=ModelInfo("random:test", d_model=8, n_layers=1, n_ctx=16), tokenizer=TokenizerInfo(),
                    dataset=DatasetInfo(path="synthetic"), hooks=[HookInfo("h", 8)], context_size=4,
                    prepend_bos=False, seed=0, n_sequences=8, chunk_sequences=4, codec="zstd-3", batch_size=2)


def test_a_retried_commit_asks_the_lease_again_and_stops_when_it_was_lost(waits, tmp_path):
    """The commit's first attempt fails on the way to the server; the retry checks the lease again
    first: still ours, the commit goes through; taken over meanwhile, nothing is committed."""
    import numpy as np

    from actcache.common.store import ActivationStore, chunk_stats

    store = ActivationStore.create(tmp_path / "s.zarr", tiny_manifest())
    x = np.ones((16, 8), np.float16)
    for j in range(2):
        store.write_chunk(j, np.full((4, 4), 7, np.int32), {"h": x}, {"h": chunk_stats(x)})

    checks = []

    def lease_check(outcomes):
        def check():
            checks.append(1)
            outcome = outcomes[len(checks) - 1]
            if outcome is not None:
                raise outcome

        return check

    store.before_commit = lease_check([connection_refused(), None])
    store.commit(1)
    assert len(checks) == 2 and len(waits) == 1
    assert ActivationStore.open(tmp_path / "s.zarr").n_committed == 1

    checks.clear()
    store.before_commit = lease_check([connection_refused(), LeaseLost("taken over by another harvest")])
    with pytest.raises(LeaseLost):
        store.commit(2)
    assert len(checks) == 2 and ActivationStore.open(tmp_path / "s.zarr").n_committed == 1


def test_an_all_zero_chunk_is_written_and_reads_back(tmp_path):
    """zarr skips a chunk equal to the fill value unless told otherwise, and that setting is not stored
    with the array: a store's writes must still write it, or opening would find it missing."""
    import numpy as np

    from actcache.common.store import ActivationStore, chunk_stats

    store = ActivationStore.create(tmp_path / "s.zarr", tiny_manifest())
    zeros = np.zeros((16, 8), np.float16)
    store.write_chunk(0, np.zeros((4, 4), np.int32), {"h": zeros}, {"h": chunk_stats(zeros)})
    store.commit(1)
    again = ActivationStore.open(tmp_path / "s.zarr")  # checks that the last committed chunk is there
    assert (tmp_path / "s.zarr" / "tokens" / "c" / "0" / "0").is_file()
    np.testing.assert_array_equal(again.read_chunk("h", 0), zeros)
