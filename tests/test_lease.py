"""Exclusive writers on S3: where the lock lives, a silent holder's lease expiring, one-line failures.
A second writer refused until the holder dies, then taken over, is tested on every backend in
test_store_backends.py."""

from __future__ import annotations

import time

import pytest

from actcache.common.lease import Lease, LeaseHeld, lock_url


def test_lock_lives_beside_what_it_guards(tmp_path):
    assert lock_url(str(tmp_path / "acts.zarr")) == str(tmp_path / ".acts.zarr.actcache-lock")
    assert lock_url("s3://bucket/x/acts.zarr/") == "s3://bucket/x/.acts.zarr.actcache-lock"


def test_s3_lease_of_a_silent_holder_on_another_host_expires_after_its_ttl(s3):
    url = f"{s3.url}/run2.zarr"
    ghost = Lease(url, "train")
    ghost.holder.update(host="elsewhere", pid=1, ttl=3.0)  # long enough that a busy machine asks within it
    ghost._write_remote()
    with pytest.raises(LeaseHeld, match="on elsewhere"):
        Lease.acquire(url, "train", takeover=True)
    time.sleep(3.2)
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
        Lease.acquire(f"{s3.url}/run3.zarr", "harvest")
