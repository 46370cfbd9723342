"""The retry budget is a deadline: against an S3 endpoint that accepts connections and never answers (a
server hung mid-outage), a retried operation gives up about one request timeout after its budget, with
both readers (s3fs and obstore); a command says what to do in one line that names a fix it has."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from harvest_fixtures import cli_subprocess, message_lines

BUDGET, REQUEST = 3, 2


@pytest.fixture
def hung_endpoint():
    """http://127.0.0.1:PORT that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    server.close()


def _aws(monkeypatch, backend: str) -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("obstore")
    monkeypatch.setenv("ACTCACHE_S3_BACKEND", backend)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_a_command_that_meets_a_hung_server_says_so_within_a_request_timeout(hung_endpoint, backend, monkeypatch):
    """A store that cannot be opened is reported at once (not retried), after one request timeout."""
    _aws(monkeypatch, backend)
    t = time.perf_counter()
    r = cli_subprocess(["info", "s3://bucket/acts.zarr", "--storage-option", f"endpoint_url={hung_endpoint}",
                        "--storage-option", f"retry_seconds={BUDGET}", "--storage-option", f"request_timeout={REQUEST}"])
    seconds = time.perf_counter() - t
    lines = message_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "cannot reach the storage server" in lines[0] and lines[0].endswith("then rerun the same command")
    assert "--resume" not in lines[0]  # info has none
    # one request timeout and the start of a Python process on a busy machine; before the timeouts the
    # same command hung for more than five minutes
    assert seconds < REQUEST + 15, seconds


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_each_reader_times_out_its_requests_within_the_budget(hung_endpoint, backend, monkeypatch):
    """The zarr store each backend reads through (obstore's ObjectStore, s3fs's FsspecStore), retried
    by the one policy (location.retrying): the whole operation ends within budget + one request."""
    import zarr

    from actcache.common import location

    _aws(monkeypatch, backend)
    url = "s3://bucket/acts.zarr"
    with location.storage_options([f"endpoint_url={hung_endpoint}", f"retry_seconds={BUDGET}",
                                   f"request_timeout={REQUEST}"]):
        store = location.open_store(url, read_only=True)
        assert type(store).__name__ == {"fsspec": "FsspecStore", "obstore": "ObjectStore"}[backend]
        t = time.perf_counter()
        with pytest.raises(Exception) as e:
            location.retrying(lambda: zarr.open_group(store=store, mode="r", zarr_format=3), url, "opening")
        seconds = time.perf_counter() - t
    assert location.transient_failure(e.value)  # it was retried until the budget ran out, not refused at once
    assert BUDGET <= seconds < BUDGET + REQUEST + 3, seconds


@pytest.mark.parametrize("command", ["info", "verify", "eval", "features", "bench-read"])
def test_every_command_that_reads_a_store_takes_storage_options_and_names_its_own_fix(
        hung_endpoint, command, monkeypatch, tmp_path, capfd):
    """--storage-option reaches the store of each reading command (the endpoint given there is the one
    that hangs), and the line tells the user to rerun, not to pass a --resume the command lacks."""
    from eval_fixtures import make_sae
    from harvest_fixtures import run_cli

    _aws(monkeypatch, "obstore")
    url = "s3://bucket/acts.zarr"
    make_sae("random").save_model(tmp_path / "run" / "s")
    args = {"info": ["info", url], "verify": ["verify", url], "bench-read": ["bench-read", url],
            "eval": ["eval", "--sae", str(tmp_path / "run" / "s"), "--store", url],
            "features": ["features", str(tmp_path / "run"), "--store", url, "--out", str(tmp_path / "f"),
                         "--no-logits"]}[command]
    code, out, err = run_cli(args + ["--storage-option", f"endpoint_url={hung_endpoint}",
                                     "--storage-option", "request_timeout=1"], capfd)
    lines = [line for line in err.splitlines() if line.startswith("actcache: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot reach the storage server while looking at {url}" in lines[0]
    assert lines[0].endswith("then rerun the same command") and "--resume" not in lines[0]
