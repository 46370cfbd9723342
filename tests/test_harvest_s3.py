"""A harvest straight to S3 (a local moto server): the same store, read back by info, verify and resume."""

import time

import numpy as np
import pytest

from actcache import HarvestConfig, harvest, info, verify
from actcache.common.store import ActivationStore
from benchmarks.s3_server import moto_s3
from harvest_fixtures import HOOKS, RANDOM, write_token_jsonl


@pytest.fixture()
def s3():
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with moto_s3(("acts",)):
        yield "s3://acts"


def test_harvest_to_s3_then_resume_and_verify(s3, tmp_path):
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=30)
    common = dict(hooks=HOOKS[:2], model=RANDOM, dataset=str(data), context_size=32, batch_size=4,
                  chunk_sequences=4, device="cpu")
    local = harvest(HarvestConfig(out=str(tmp_path / "local.zarr"), tokens=12 * 32, **common), progress=False)
    url = f"{s3}/run1/acts.zarr"
    res = harvest(HarvestConfig(out=url, tokens=12 * 32, **common), progress=False)
    assert res.n_tokens == local.n_tokens and res.activation_bytes == local.activation_bytes
    assert verify(url).ok and info(url)["n_tokens"] == 12 * 32
    again = harvest(HarvestConfig(out=url, tokens=12 * 32, resume=True, **common), progress=False)
    assert again.tokens_this_run == 0  # complete already

    a, b = ActivationStore.open(url), ActivationStore.open(tmp_path / "local.zarr")
    assert a.fingerprint == b.fingerprint is not None  # the fingerprint does not depend on where the store is
    for h in HOOKS[:2]:
        np.testing.assert_array_equal(a.activations(h)[:], b.activations(h)[:])


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
    _one_line_error(tmp_path, monkeypatch, f"{s3}/denied/acts.zarr", "denied.*credentials")


def test_endpoint_down_at_the_start_is_one_line_before_the_model_loads(s3, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    _one_line_error(tmp_path, monkeypatch, f"{s3}/down/acts.zarr", "cannot reach")


def test_endpoint_dying_mid_harvest_is_one_line_and_resume_is_byte_identical(tmp_path):
    """A real harvest process writing to a real server that stops after two commits, then --resume."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import boto3
    from moto.server import ThreadedMotoServer

    from harvest_fixtures import ROOT, array_files, env, harvest_args

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    e = env() | {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket="dying")
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=300)
    args = harvest_args("s3://dying/acts.zarr", data, hooks=HOOKS[:1], tokens=8 * 8 * 32, chunk=8)
    p = subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)
    try:
        wait_for_commits(client, "dying", "acts.zarr", 2, p)
        server.stop()  # the endpoint dies mid-harvest
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("harvest:")]
    assert p.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("actcache: error: ") and "--resume" in lines[0], lines

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # back up, same data (one in-process backend)
    server.start()
    try:
        done = subprocess.run([sys.executable, "-m", "actcache", *args, "--resume"], capture_output=True, text=True,
                              env=e, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed at chunk" in done.stdout
        ref = tmp_path / "ref.zarr"
        harvest(HarvestConfig(out=str(ref), hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32,
                              tokens=8 * 8 * 32, batch_size=4, chunk_sequences=8, device="cpu"), progress=False)
        want = array_files(ref)
        got = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="dying", Prefix="acts.zarr/"):
            for o in page.get("Contents", []):
                rel = o["Key"][len("acts.zarr/"):]
                if rel != "zarr.json":
                    got[rel] = client.get_object(Bucket="dying", Key=o["Key"])["Body"].read()
        assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []
        fp = json.loads(client.get_object(Bucket="dying", Key="acts.zarr/zarr.json")["Body"].read())
        ref_fp = json.loads((ref / "zarr.json").read_text())
        assert fp["attributes"]["actcache"]["fingerprint"] == ref_fp["attributes"]["actcache"]["fingerprint"]
    finally:
        server.stop()


def test_two_harvests_racing_on_one_s3_store_second_fails_at_once(s3, tmp_path):
    """A real harvest process writes to the S3 store; a second writer (--overwrite, another seed) stops at
    once with one line naming the first; the first finishes a store that is wholly its own."""
    import os
    import subprocess
    import sys

    import boto3

    from actcache.common.lease import LeaseHeld
    from harvest_fixtures import ROOT, env, harvest_args

    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=200)
    url = f"{s3}/race/acts.zarr"
    args = harvest_args(url, data, "--seed", "1", hooks=HOOKS[:1], tokens=12 * 8 * 32, chunk=8)
    first = subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    wait_for_commits(client, "acts", "race/acts.zarr", 1, first)
    assert first.poll() is None, "the first harvest ended before the second could race it"
    cfg = HarvestConfig(out=url, hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32,
                        tokens=12 * 8 * 32, batch_size=4, chunk_sequences=8, seed=2, overwrite=True, device="cpu")
    with pytest.raises(LeaseHeld, match=f"is being written by harvest pid {first.pid} ") as e:
        harvest(cfg, progress=False)
    assert "\n" not in str(e.value)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert verify(url).ok and ActivationStore.open(url).manifest.seed == 1
