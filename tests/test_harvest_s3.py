"""A harvest to S3 (a local moto server) that fails: a missing bucket, refused credentials, an endpoint
down at the start or dying mid-harvest. The round trip and resume on S3 are in test_store_backends.py."""

import json
import time

import pytest

from actcache import HarvestConfig, harvest, verify
from actcache.common.store import ActivationStore
from distributed_fixtures import retry_lines
from harvest_fixtures import HOOKS, RANDOM, message_lines, write_token_jsonl


# ---------------------------------------------------------------------------------------------- failures
def wait_for_commits(client, bucket: str, key: str, n: int, proc, timeout: float = 120.0) -> None:
    """Poll the store's manifest on the server until n chunks are committed (or the process ends)."""
    import json

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            m = json.loads(client.get_object(Bucket=bucket, Key=f"{key}/zarr.json")["Body"].read())
            if m["attributes"]["actcache"]["n_chunks_committed"] >= n:
                return
        except Exception:  # noqa: BLE001  (not created yet)
            pass
        time.sleep(0.02)


def _never_load(*a, **k):
    raise AssertionError("the model was loaded before the output location was checked")


def _one_line_error(tmp_path, monkeypatch, out, match):
    from actcache.common.errors import UserError
    from actcache.harvest import api

    monkeypatch.setattr(api, "load_model", _never_load)
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=10)
    cfg = HarvestConfig(out=out, hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32,
                        tokens=8 * 32, batch_size=4, chunk_sequences=4, device="cpu")
    t0 = time.time()
    with pytest.raises(UserError, match=match) as e:
        harvest(cfg, progress=False)
    assert "\n" not in str(e.value) and time.time() - t0 < 60
    return str(e.value)


def test_missing_bucket_is_one_line_before_the_model_loads(s3, tmp_path, monkeypatch):
    _one_line_error(tmp_path, monkeypatch, "s3://no-such-bucket/acts.zarr", "bucket .*does not exist")


def test_refused_credentials_are_one_line_before_the_model_loads(s3, tmp_path, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys: "test" is unknown
    _one_line_error(tmp_path, monkeypatch, f"{s3.url}/denied.zarr", "denied.*credentials")


def test_endpoint_down_at_the_start_is_one_line_before_the_model_loads(s3, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own random waits (up to 15 s) are not what is tested
    _one_line_error(tmp_path, monkeypatch, f"{s3.url}/down.zarr", "cannot reach")


# --------------------------------------------------------------------- a server that stops mid-harvest
SECRET = "SECRET-a1b2c3-never-written"
SMALL = dict(hooks=HOOKS[:1], tokens=8 * 8 * 32, chunk=8)  # 8 chunks of 8 sequences


@pytest.fixture(scope="module")
def server():
    """A real S3 server on loopback (moto's) that the tests stop and start again on the same port."""
    from conftest import moto_s3

    with moto_s3("dying") as s3:
        s3.client.create_bucket(Bucket="restart")
        yield s3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The dataset and the store that an uninterrupted harvest with SMALL writes (locally, in this process)."""
    from harvest_fixtures import array_files

    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_token_jsonl(tmp / "toks.jsonl", n_docs=300)
    ref = tmp / "ref.zarr"
    harvest(HarvestConfig(out=str(ref), hooks=SMALL["hooks"], model=RANDOM, dataset=str(data), context_size=32,
                          tokens=SMALL["tokens"], batch_size=4, chunk_sequences=SMALL["chunk"], device="cpu"),
            progress=False)
    return data, array_files(ref), json.loads((ref / "zarr.json").read_text())["attributes"]["actcache"]


def harvest_process(server, bucket: str, data, *extra: str, **env_extra: str):
    """`actcache harvest` in a fresh process, writing s3://bucket/acts.zarr on the server. The secret key
    is a recognisable one; AWS_MAX_ATTEMPTS=1: botocore does not retry, so what survives is our retrying."""
    import subprocess
    import sys

    from harvest_fixtures import ROOT, env, harvest_args

    e = env() | {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": SECRET,
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", **env_extra}
    args = harvest_args(f"s3://{bucket}/acts.zarr", data, *extra, **SMALL)
    return subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)


def finish(p, timeout: float = 240) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def assert_uninterrupted_store(server, bucket: str, uninterrupted) -> None:
    """The objects of s3://bucket/acts.zarr are the uninterrupted store's files, byte for byte."""
    _, want, manifest = uninterrupted
    got = server.objects(bucket, "acts.zarr")
    root = json.loads(got.pop("zarr.json"))["attributes"]["actcache"]
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []
    assert root["complete"] and root["fingerprint"] == manifest["fingerprint"]


def test_server_restarting_mid_harvest_is_retried_and_the_store_is_byte_identical(server, uninterrupted):
    """A real harvest process; the server stops after two commits and is back on the same port 3 s later:
    the process retries, finishes by itself (exit 0, no --resume), and the store is the uninterrupted one.
    The secret key is in no object on the server and in no line the process printed."""
    p = harvest_process(server, "restart", uninterrupted[0])
    try:
        wait_for_commits(server.client, "restart", "acts.zarr", 2, p)
        assert p.poll() is None, "the harvest ended before the server stopped: make it longer"
        server.stop()
        time.sleep(3)
    finally:
        server.start_again()
    out, err = finish(p)
    assert p.returncode == 0, err[-3000:]
    assert "actcache: error" not in err and "Traceback" not in err, err[-3000:]
    retried = retry_lines(err)
    assert retried and all(" s3://restart/acts.zarr failed (" in line for line in retried), err[-3000:]
    assert "resumed" not in out
    assert_uninterrupted_store(server, "restart", uninterrupted)
    written = {"stdout": out.encode(), "stderr": err.encode(), **server.objects("restart", "")}
    assert ".acts.zarr.actcache-lock" not in written  # released; while it was held it named no key either
    assert [k for k, v in written.items() if SECRET.encode() in v] == []


def test_endpoint_dying_mid_harvest_is_one_line_and_resume_is_byte_identical(server, uninterrupted):
    """A real harvest process writing to a real server that stops after two commits for longer than the
    retry budget (1 s here): retries, then one line; with the server back, --resume finishes the store."""
    p = harvest_process(server, "dying", uninterrupted[0], ACTCACHE_STORAGE_RETRY_SECONDS="1")
    try:
        wait_for_commits(server.client, "dying", "acts.zarr", 2, p)
        server.stop()  # the endpoint dies mid-harvest
        _, err = finish(p)
    finally:
        server.start_again()
    retried = retry_lines(err)
    lines = [l for l in message_lines(err) if not l.startswith("harvest:") and l not in retried]
    assert p.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("actcache: error: ") and "--resume" in lines[0], lines
    assert retried, err[-3000:]  # it did retry before giving up

    done = harvest_process(server, "dying", uninterrupted[0], "--resume")
    out, err = finish(done)
    assert done.returncode == 0, err[-3000:]
    assert "resumed at chunk" in out
    assert_uninterrupted_store(server, "dying", uninterrupted)


def test_two_harvests_racing_on_one_s3_store_second_fails_at_once(s3, tmp_path):
    """A real harvest process writes to the S3 store; a second writer (--overwrite, another seed) stops at
    once with one line naming the first; the first finishes a store that is wholly its own."""
    import os
    import signal
    import subprocess
    import sys

    from actcache.common.lease import LeaseHeld
    from harvest_fixtures import ROOT, env, harvest_args

    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=200)
    url = f"{s3.url}/race.zarr"
    args = harvest_args(url, data, "--seed", "1", hooks=HOOKS[:1], tokens=12 * 8 * 32, chunk=8)
    first = subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    wait_for_commits(s3.client, s3.bucket, "race.zarr", 1, first)
    assert first.poll() is None, "the first harvest ended before the second could race it"
    cfg = HarvestConfig(out=url, hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32,
                        tokens=12 * 8 * 32, batch_size=4, chunk_sequences=8, seed=2, overwrite=True, device="cpu")
    os.kill(first.pid, signal.SIGSTOP)  # paused mid-harvest, its lease fresh, so it cannot finish first
    try:
        with pytest.raises(LeaseHeld, match=f"is being written by harvest pid {first.pid} ") as e:
            harvest(cfg, progress=False)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert "\n" not in str(e.value)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert verify(url).ok and ActivationStore.open(url).manifest.seed == 1


def test_overwrite_on_s3_deletes_only_the_stores_own_objects(s3, tmp_path):
    """--overwrite of an S3 store refuses when the prefix also holds objects actcache did not write
    (they were deleted with the store), and never touches an object beside the prefix."""
    from actcache.common.errors import UserError

    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=10)
    url = f"{s3.url}/mine/acts.zarr"
    cfg = dict(hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32, tokens=4 * 32, batch_size=4,
               chunk_sequences=4, device="cpu")
    harvest(HarvestConfig(out=url, **cfg), progress=False)
    client = s3.client
    client.put_object(Bucket=s3.bucket, Key="mine/acts.zarr/NOTES.txt", Body=b"keep")
    client.put_object(Bucket=s3.bucket, Key="mine/acts.zarr.bak/zarr.json", Body=b"keep")
    keys = lambda: sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket).get("Contents", []))  # noqa: E731
    before = keys()
    with pytest.raises(UserError, match="NOTES.txt, which actcache did not write.*nothing was deleted") as e:
        harvest(HarvestConfig(out=url, overwrite=True, seed=3, **cfg), progress=False)
    assert "\n" not in str(e.value) and keys() == before
    client.delete_object(Bucket=s3.bucket, Key="mine/acts.zarr/NOTES.txt")
    harvest(HarvestConfig(out=url, overwrite=True, seed=3, **cfg), progress=False)
    assert ActivationStore.open(url).manifest.seed == 3 and verify(url).ok
    assert client.get_object(Bucket=s3.bucket, Key="mine/acts.zarr.bak/zarr.json")["Body"].read() == b"keep"
