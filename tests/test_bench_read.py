"""`actcache bench-read`: the loader's read rates on a local store and on an S3 server on loopback."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actcache.common import location
from actcache.train.bench_read import bench_read, format_result
from actcache.train.loader import ActivationLoader
from benchmarks.synthetic import make_store
from harvest_fixtures import run_cli

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"


def _check_consistent(r: dict, d: int, batch_size: int) -> None:
    assert r["d"] == d and r["batch_size"] == batch_size and r["hook"] == HOOK
    assert r["batches"] >= 2 and r["tokens"] == r["batches"] * batch_size
    assert r["seconds"] > 0 and r["first_batch_seconds"] > 0
    assert math.isclose(r["tokens_per_s"], r["tokens"] / r["seconds"], rel_tol=1e-9)
    assert math.isclose(r["decoded_gb_per_s"], r["tokens_per_s"] * d * 2 / 1e9, rel_tol=1e-9)
    # zstd on planted-dictionary float16 data: smaller than raw, but not absurdly so
    assert 0.05 < r["compression_ratio"] < 1.0
    assert math.isclose(r["stored_gb_per_s"], r["decoded_gb_per_s"] * r["compression_ratio"], rel_tol=1e-9)
    assert 0.0 <= r["wait_seconds"] <= r["seconds"] and 0.0 <= r["wait_fraction"] <= 1.0


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("bench_read") / "acts.zarr")
    make_store(url, d=32, n_sequences=256, context_size=32, chunk_sequences=16)
    return url


def test_bench_read_local_numbers_are_consistent(local_store):
    r = bench_read(local_store, batch_size=512, threads=2, window_chunks=4, seconds=0.3)
    _check_consistent(r, 32, 512)
    assert r["backend"] == "local" and r["threads"] == 2 and r["window_chunks"] == 4
    # the stored ratio is the hook's bytes on disk over its decoded bytes
    on_disk = location.disk_usage(local_store, f"activations/{HOOK}")
    assert math.isclose(r["compression_ratio"], on_disk / (256 * 32 * 32 * 2), rel_tol=1e-9)
    text = format_result(r)
    assert "tokens/s:" in text and "decoded GB/s:" in text and "consumer waited:" in text


def test_bench_read_slow_consumer_waits_less(local_store):
    """A consumer that spends 20 ms per batch gives the loader time to prefetch: it waits a smaller
    fraction of the time than one that takes no time at all, and gets fewer tokens/s."""
    fast = bench_read(local_store, batch_size=512, threads=2, window_chunks=2, seconds=0.4)
    slow = bench_read(local_store, batch_size=512, threads=2, window_chunks=2, seconds=0.4, step_ms=20)
    _check_consistent(slow, 32, 512)
    assert slow["tokens_per_s"] < fast["tokens_per_s"]
    assert slow["tokens_per_s"] <= 512 / 0.020
    assert slow["wait_fraction"] <= fast["wait_fraction"] + 0.05


def test_bench_read_command(local_store, capfd):
    """Through the entry point in this process; the error the user sees through a real process (its exit
    status and stderr as a shell sees them)."""
    code, out, err = run_cli(["bench-read", local_store, "--batch-tokens", "256", "--threads", "2", "--window-chunks",
                              "2", "--seconds", "0.2", "--json"], capfd)
    assert code == 0, err
    _check_consistent(json.loads(out), 32, 256)
    bad = subprocess.run([sys.executable, "-m", "actcache", "bench-read", local_store, "--hook", "nope"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("actcache: error:") and "nope" in bad.stderr and HOOK in bad.stderr
    code, _, err = run_cli(["bench-read", str(Path(local_store).parent / "none.zarr"), "--threads", "0"], capfd)
    assert code != 0 and err.startswith("actcache: error:")


def _backends() -> list[str]:
    import importlib.util

    return ["fsspec"] + (["obstore"] if importlib.util.find_spec("obstore") else [])


@pytest.fixture(scope="module")
def s3_store(s3_server):
    """The local store's twin (the same arguments) on the session's S3 server, written once for both
    zarr backends (writes go through s3fs either way)."""
    s3_server.client.create_bucket(Bucket="bench-read")
    url = "s3://bench-read/acts.zarr"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        make_store(url, d=32, n_sequences=256, context_size=32, chunk_sequences=16)
    return url


@pytest.mark.parametrize("backend", _backends())
def test_bench_read_over_s3(local_store, s3_store, backend, monkeypatch, s3):
    """The same store on an S3 server on loopback (moto): the loader gets exactly the local batches
    through either zarr backend, and bench-read reports the same compression ratio and sane rates."""
    monkeypatch.setenv("ACTCACHE_S3_BACKEND", backend)
    url = s3_store
    store = location.open_store(url, read_only=True)
    assert type(store).__name__ == ("ObjectStore" if backend == "obstore" else "FsspecStore")
    remote = ActivationLoader(url, HOOK, 512, seed=3, window_chunks=4, threads=2)
    here = ActivationLoader(local_store, HOOK, 512, seed=3, window_chunks=4, threads=2)
    try:
        for _ in range(10):  # more than one window, so prefetched windows are compared too
            assert torch.equal(remote.next_batch(), here.next_batch())
    finally:
        remote.close()
        here.close()
    r = bench_read(url, batch_size=512, threads=4, window_chunks=4, seconds=0.3)
    local = bench_read(local_store, batch_size=512, threads=4, window_chunks=4, seconds=0.05)
    _check_consistent(r, 32, 512)
    assert r["backend"] == backend
    assert math.isclose(r["compression_ratio"], local["compression_ratio"], rel_tol=1e-9)


def test_unknown_s3_backend_is_one_line(monkeypatch):
    from actcache.common.errors import UserError

    monkeypatch.setenv("ACTCACHE_S3_BACKEND", "boto")
    with pytest.raises(UserError, match="ACTCACHE_S3_BACKEND"):
        location.open_store("s3://acts/x.zarr", read_only=True)


def test_s3_reader_is_obstore_unless_keys_come_only_from_a_profile(monkeypatch, tmp_path):
    pytest.importorskip("obstore")
    monkeypatch.delenv("ACTCACHE_S3_BACKEND", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    assert location.s3_read_backend() == "obstore"
    monkeypatch.setenv("AWS_PROFILE", "research")
    assert location.s3_read_backend() == "obstore"  # keys in the environment win over the profile
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert location.s3_read_backend() == "fsspec"  # obstore cannot read the profile
    monkeypatch.setenv("ACTCACHE_S3_BACKEND", "obstore")
    assert location.s3_read_backend() == "obstore"
