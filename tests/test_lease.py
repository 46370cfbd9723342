"""Exclusive writers: real processes racing for a lease, locally and on a real S3 server on loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from actcache.common.lease import Lease, LeaseHeld, LeaseLost, lock_url
from benchmarks.s3_server import moto_s3
from harvest_fixtures import env

HOLD = textwrap.dedent("""
    import sys, time
    from actcache.common.lease import Lease
    lease = Lease.acquire(sys.argv[1], "harvest", takeover=True, ttl=float(sys.argv[2]))
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(url: str, extra_env: dict | None = None, ttl: float = 60.0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, url, str(ttl)], stdout=subprocess.PIPE, text=True,
                         env={**env(), **(extra_env or {})})
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_lives_beside_what_it_guards(tmp_path):
    assert lock_url(str(tmp_path / "acts.zarr")) == str(tmp_path / ".acts.zarr.actcache-lock")
    assert lock_url("s3://bucket/x/acts.zarr/") == "s3://bucket/x/.acts.zarr.actcache-lock"


def test_second_local_writer_is_refused_naming_the_holder_until_it_dies(tmp_path):
    target = str(tmp_path / "acts.zarr")
    p = _holder(target)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {p.pid} on "):
            Lease.acquire(target, "harvest", takeover=True)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the kernel dropped the dead holder's lock: a plain rerun is told how to continue, --resume takes it over
    with pytest.raises(LeaseHeld, match="stopped without finishing.*--resume"):
        Lease.acquire(target, "harvest", takeover=False)
    with Lease.acquire(target, "harvest", takeover=True) as lease:
        lease.check()
    # released cleanly: the next writer needs no takeover
    Lease.acquire(target, "harvest").release()


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with moto_s3(("leases",)) as creds:
        yield creds


def test_s3_lease_refuses_a_live_holder_and_takes_over_a_dead_one(s3):
    url = "s3://leases/run1/acts.zarr"
    p = _holder(url, s3)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {p.pid} on "):
            Lease.acquire(url, "harvest", takeover=True)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with pytest.raises(LeaseHeld, match="--resume"):  # dead holder on this host: stale, but only --resume takes it
        Lease.acquire(url, "harvest")
    lease = Lease.acquire(url, "harvest", takeover=True)
    lease.check()
    # a writer that lost its lease to another is stopped before its next commit
    other = Lease(url, "harvest")
    other._write_remote()
    with pytest.raises(LeaseLost, match="taken over"):
        lease.check()
    other.release()


def test_s3_lease_of_a_silent_holder_on_another_host_expires_after_its_ttl(s3):
    url = "s3://leases/run2/acts.zarr"
    ghost = Lease(url, "train")
    ghost.holder.update(host="elsewhere", pid=1, ttl=1.0)
    ghost._write_remote()
    with pytest.raises(LeaseHeld, match="on elsewhere"):
        Lease.acquire(url, "train", takeover=True)
    time.sleep(1.2)
    Lease.acquire(url, "train", takeover=True).release()


def test_s3_failures_are_one_line(s3, monkeypatch):
    from actcache.common.errors import UserError

    with pytest.raises(UserError, match="bucket of s3://no-such-bucket/acts.zarr does not exist"):
        Lease.acquire("s3://no-such-bucket/acts.zarr", "harvest")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    import socket

    with socket.socket() as s:  # a port with no server behind it
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    with pytest.raises(UserError, match="cannot reach the storage server"):
        Lease.acquire("s3://leases/run3/acts.zarr", "harvest")
