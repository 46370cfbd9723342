"""Helpers shared by the torchrun and S3 tests: one-thread subprocesses, torchrun command lines, the
pid of a rank's worker, our error and retry lines, and a moto S3 server on loopback."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from harvest_fixtures import ROOT, env


def one_thread_env() -> dict[str, str]:
    """Float rounding may depend on the number of threads: one per process on both sides."""
    return env() | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(n: int, args: list[str]) -> list[str]:
    """`torchrun --nproc-per-node n --no-python actcache ARGS` (on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "--no-python", sys.executable, "-m", "actcache", *args]


def run(cmd: list[str], timeout: float = 300, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=one_thread_env() | (extra_env or {}), cwd=ROOT,
                          timeout=timeout)


def our_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("actcache: error:")]


def retry_lines(stderr: str) -> list[str]:
    """The lines saying that a storage operation failed and will be retried (progress bars split off)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.startswith("actcache: ") and "; attempt " in line and ", retrying in " in line]


def worker_pid(parent: int, rank: int) -> int | None:
    """A descendant process of `parent` whose environment says RANK=rank."""
    todo = [parent]
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            try:
                environ = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return k
            todo.append(k)
    return None


class MotoS3:
    """A moto S3 server on 127.0.0.1 (endpoint, boto3 client) that a test may stop and start again
    on the same port; the objects survive (one in-process backend)."""

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                                   aws_secret_access_key="test", region_name="us-east-1")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def start_again(self) -> None:
        if self.running:
            return
        self.server = self._cls(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        self.running = True

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """Every object under bucket/prefix/ (the whole bucket for prefix ""), by key relative to the prefix."""
        out = {}
        under = f"{prefix}/" if prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=under):
            for o in page.get("Contents", []):
                out[o["Key"][len(under):]] = self.client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[MotoS3]:
    """A MotoS3 with one bucket, stopped on exit (skips the test where moto, boto3 or s3fs is missing)."""
    for module in ("boto3", "moto.server", "s3fs"):
        pytest.importorskip(module)
    s3 = MotoS3()
    try:
        s3.client.create_bucket(Bucket=bucket)
        yield s3
    finally:
        s3.stop()
