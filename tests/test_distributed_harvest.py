"""A harvest under torchrun (two CPU ranks, gloo) writes the same store as one process, byte for byte;
a rank killed with SIGKILL leaves a store that --resume completes, still byte-identical; bad launches
stop with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import moto_s3
from distributed_fixtures import one_thread_env, our_errors, run, torchrun, worker_pid
from harvest_fixtures import HOOKS, ROOT, harvest_args, write_token_jsonl

pytest.importorskip("torch.distributed")


def all_files(store: Path) -> dict[str, bytes]:
    """Every file of the store, the root manifest included."""
    return {f.relative_to(store).as_posix(): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file()}


def assert_same_store(got: Path, want: Path) -> None:
    a, b = all_files(got), all_files(want)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_token_jsonl(tmp_path_factory.mktemp("data") / "toks.jsonl", n_docs=60)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, list[str]]:
    """The single-process store (subprocess, one thread) that the torchrun harvests must reproduce:
    chunks of 8 sequences, the dataset running out before the 40 chunks asked for, a held-out tail."""
    out = tmp_path_factory.mktemp("ref") / "acts.zarr"
    common = ["--tokens", str(40 * 8 * 32), "--allow-short"]
    args = harvest_args(out, data, *common, hooks=HOOKS[:2], chunk=8)
    done = run([sys.executable, "-m", "actcache", *args])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the dataset ran out" in done.stderr
    return out, common


def test_torchrun_harvest_is_byte_identical_to_one_process(reference, data, tmp_path):
    ref, common = reference
    out = tmp_path / "acts.zarr"
    done = run(torchrun(2, harvest_args(out, data, *common, hooks=HOOKS[:2], chunk=8)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Harvested ") == 1  # rank 0 speaks for the job
    assert_same_store(out, ref)


def test_rank_killed_then_resume_is_byte_identical(reference, data, tmp_path):
    ref, common = reference
    out = tmp_path / "acts.zarr"
    args = harvest_args(out, data, *common, hooks=HOOKS[:2], chunk=8)
    p = subprocess.Popen(torchrun(2, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=one_thread_env(), cwd=ROOT)
    try:
        victim = wait_for_rank_and_commits(p, out, rank=1, n=3)
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    m = json.loads((out / "zarr.json").read_text())["attributes"]["actcache"]
    assert 3 <= m["n_chunks_committed"] < m["n_sequences"] // 8 and not m["complete"], m["n_chunks_committed"]

    again = run(torchrun(2, args + ["--resume"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at chunk" in again.stdout
    assert_same_store(out, ref)


def wait_for_rank_and_commits(p: subprocess.Popen, store: Path, rank: int, n: int, timeout: float = 180) -> int:
    """The pid of the worker of `rank` once the store has n chunks committed."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            m = json.loads((store / "zarr.json").read_text())["attributes"]["actcache"]
            if m["n_chunks_committed"] >= n:
                pid = worker_pid(p.pid, rank)
                if pid is not None:
                    return pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no commit {n} within {timeout} s (torchrun exit {p.poll()})")


def test_ranks_with_different_arguments_stop_with_one_line(data, tmp_path):
    """Two processes joined as ranks 0 and 1 (as torchrun would start them) but given different seeds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "acts.zarr"
    procs = []
    for rank, seed in ((0, "1"), (1, "2")):
        e = one_thread_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = harvest_args(out, data, "--seed", seed, hooks=HOOKS[:1])
        procs.append(subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT))
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    lines = [line for _, err in results for line in our_errors(err)]
    assert len(lines) == 1 and "different arguments" in lines[0], [err[-1500:] for _, err in results]
    assert not out.exists()


def test_store_written_by_another_job_is_refused(data, tmp_path):
    from actcache.common.lease import Lease

    out = tmp_path / "acts.zarr"
    with Lease.acquire(out, "harvest"):
        done = run(torchrun(2, harvest_args(out, data, "--overwrite", hooks=HOOKS[:1])))
    assert done.returncode != 0
    lines = our_errors(done.stderr)
    assert len(lines) == 1 and f"is being written by harvest pid {os.getpid()}" in lines[0], done.stderr[-2000:]
    assert not out.exists()


def test_torchrun_harvest_to_s3_survives_the_server_dying_and_is_byte_identical(reference, data, tmp_path):
    """Two ranks write to a moto server that stops mid-harvest: one line saying to resume; with the
    server back, --resume in a single process completes a store whose objects are the local
    single-process store's files, byte for byte (the root manifest included)."""
    ref, common = reference
    want = all_files(ref)
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1", "ACTCACHE_STORAGE_RETRY_SECONDS": "1"}  # retries, but a short outage budget
    with moto_s3("acts") as s3:
        def args(*extra: str) -> list[str]:
            return harvest_args("s3://acts/acts.zarr", data, *common, "--storage-option",
                                f"endpoint_url={s3.endpoint}", *extra, hooks=HOOKS[:2], chunk=8)

        p = subprocess.Popen(torchrun(2, args()), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=one_thread_env() | aws, cwd=ROOT)
        try:
            deadline = time.time() + 180
            while time.time() < deadline and p.poll() is None:
                try:
                    m = json.loads(s3.client.get_object(Bucket="acts", Key="acts.zarr/zarr.json")["Body"].read())
                    if m["attributes"]["actcache"]["n_chunks_committed"] >= 2:
                        break
                except Exception:  # noqa: BLE001  (not there yet)
                    pass
                time.sleep(0.02)
            s3.stop()  # the endpoint dies mid-harvest
            _, err = p.communicate(timeout=240)
        finally:
            if p.poll() is None:
                p.kill()
        lines = our_errors(err)
        assert p.returncode != 0 and len(lines) == 1 and "--resume" in lines[0], err[-3000:]

        s3.start_again()  # and the resume runs in one process: the number of ranks may change on resume
        again = run([sys.executable, "-m", "actcache", *args("--resume")], extra_env=aws)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed at chunk" in again.stdout
        got = s3.objects("acts", "acts.zarr")
        assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []
