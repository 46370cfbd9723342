"""Exclusive writers: a lease on a store or a run folder, so that two writers never mix their work.

The lease lives beside what it guards, as a hidden file (or S3 object) named `.<name>.actcache-lock`
in the same folder or prefix: `acts.zarr` is guarded by `.acts.zarr.actcache-lock`. It is never
inside the store, so plain zarr readers do not see it and `--overwrite` does not delete it.

Local paths: an exclusive `flock` on that file, held for the life of the writing process. The kernel
drops the lock when the holder exits or dies (SIGKILL included), so a lease left by a crashed
process is recognised as stale simply because nobody holds the lock any more: the next `--resume`
or `--overwrite` takes it at once. The file's text names the holder for the error message; a
holder that finishes deletes the file (still holding the lock; a process that opened the file just
before sees that the path no longer names it once it gets the lock, and opens it anew). The lease
is taken on the real path, so a symbolic link, `./x` and `x` name one lease.
(flock is not reliable on every network file system; there, run one writer per store.)

S3 has no locks and no atomic rename. The lease is an object holding a random writer id, the
holder and the time it was last renewed; the holder renews it every `ttl / 4` seconds on a
background thread. A lease not renewed for `ttl` seconds (default 60) is stale, and so is one held
by a process of this host that no longer exists. Acquiring writes the object and reads it back after
a short settling delay: of two writers racing, only the one whose id is read back goes on. The
holder re-reads the object before every commit (`check()`), so a writer that lost its lease stops
without committing anything."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from . import location
from .errors import UserError, first_line

SUFFIX = ".actcache-lock"
DEFAULT_TTL = 60.0
SETTLE_SECONDS = 0.5


class LeaseHeld(UserError):
    """Another live process writes there."""


class LeaseLost(UserError):
    """Another writer took the lease over while this one was working."""


def lock_url(url: str | os.PathLike) -> str:
    """Where the lease of `url` lives: a hidden sibling named after it."""
    s = str(url).rstrip("/")
    parent, _, name = s.rpartition("/")
    if not name:
        raise UserError(f"cannot take a lease on {url!r}: give a folder or store path")
    return f"{parent}/.{name}{SUFFIX}" if parent else f".{name}{SUFFIX}"


def _holder(what: str, writer_id: str) -> dict[str, Any]:
    return {"id": writer_id, "what": what, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.time(), "renewed": time.time()}


def _describe(h: dict[str, Any]) -> str:
    started = datetime.fromtimestamp(float(h.get("started", 0)), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{h.get('what', 'a writer')} pid {h.get('pid', '?')} on {h.get('host', '?')}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive lease; use Lease.acquire(...) (also as a context manager)."""

    def __init__(self, url: str, what: str):
        self.url = str(url)
        self.what = what
        self.id = uuid.uuid4().hex
        self.holder = _holder(what, self.id)
        self._fd: int | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ttl = DEFAULT_TTL

    # ------------------------------------------------------------------ public
    @classmethod
    def acquire(cls, url: str | os.PathLike, what: str, takeover: bool = False, ttl: float = DEFAULT_TTL) -> "Lease":
        """Take the lease of `url` or raise LeaseHeld naming the holder. `takeover`: a lease that a crashed
        process left behind may be taken (the --resume and --overwrite cases); without it that is refused."""
        if not location.is_remote(url):  # one lease per folder, however it is named (a symlink, ./x, x)
            url = os.path.realpath(location.local_path(url))
        lease = cls(str(url), what)
        lease.ttl = float(ttl)
        if location.is_remote(lease.url):
            lease._acquire_remote(takeover)
        else:
            lease._acquire_local(takeover)
        return lease

    def check(self) -> None:
        """Raise LeaseLost if another writer has taken the lease over (call before every commit)."""
        if self._fd is not None or self._closed:
            return
        if self._lost is None:
            current = self._read_remote()
            if current is None or current.get("id") != self.id:
                self._lost = _describe(current) if current else "nobody (the lease was deleted)"
        if self._lost is not None:
            raise LeaseLost(f"{self.url} was taken over by {self._lost} while this {self.what} ran; this process "
                            "stopped without committing more: let one writer finish, then rerun with --resume")

    def release(self) -> None:
        """Give the lease up (idempotent)."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:
            import fcntl

            try:  # delete it while still holding it: a process that opened it meanwhile sees, once it gets
                # the lock, that the path no longer names its file and starts again (_acquire_local)
                os.unlink(location.local_path(lock_url(self.url)))
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._lost is None:
            try:
                fs, path = location.remote_fs(lock_url(self.url))
                current = self._read_remote()
                if current is not None and current.get("id") == self.id:
                    fs.rm_file(path)
            except Exception:  # noqa: BLE001  (an unreachable server: the lease expires by itself)
                pass
        self._closed_flag = True

    @property
    def _closed(self) -> bool:
        return getattr(self, "_closed_flag", False)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ local: flock
    def _acquire_local(self, takeover: bool) -> None:
        path = location.local_path(lock_url(self.url))
        if not path.parent.is_dir():
            raise UserError(f"cannot write {self.url}: the folder {path.parent} does not exist")
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {path} ({e.strerror}); check the folder's "
                                "permissions") from None
            if self._lock_local(fd, path, takeover):
                return
        raise LeaseHeld(f"{self.url} is being taken and given up by other processes in a loop; rerun")

    def _lock_local(self, fd: int, path: Any, takeover: bool) -> bool:
        """Lock the open lock file `fd`; False (fd closed) when the path no longer names it (its holder
        deleted it on release): the caller opens it again."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            previous = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            who = _describe(previous) if previous else "another process"
            raise LeaseHeld(f"{self.url} is being written by {who}; wait for it to finish or stop it, "
                            "then rerun") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return False
        previous = _parse(os.pread(fd, 4096, 0))
        if previous and not takeover:  # text left behind, nobody holding the lock: its writer crashed
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise LeaseHeld(f"{self.url} was left by a {previous.get('what', 'writer')} that stopped without "
                            f"finishing ({_describe(previous)}); rerun with --resume to continue it or "
                            "--overwrite to start again")
        data = json.dumps(self.holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return True

    # ------------------------------------------------------------------ S3: lease object
    def _read_remote(self) -> dict[str, Any] | None:
        fs, path = location.remote_fs(lock_url(self.url))
        try:
            return _parse(fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise location.storage_error(e, self.url, "reading the lease of") from None

    def _write_remote(self) -> None:
        fs, path = location.remote_fs(lock_url(self.url))
        self.holder["renewed"] = time.time()
        try:
            fs.pipe_file(path, json.dumps(self.holder).encode())
        except Exception as e:  # noqa: BLE001
            raise location.storage_error(e, self.url, "writing the lease of") from None

    def _stale(self, h: dict[str, Any]) -> bool:
        if time.time() - float(h.get("renewed", 0)) > float(h.get("ttl", self.ttl)):
            return True
        return h.get("host") == socket.gethostname() and not _pid_alive(int(h.get("pid", -1)))

    def _acquire_remote(self, takeover: bool) -> None:
        self.holder["ttl"] = self.ttl
        current = self._read_remote()
        if current is not None:
            if not self._stale(current):
                raise LeaseHeld(f"{self.url} is being written by {_describe(current)}; wait for it to finish or "
                                "stop it, then rerun")
            if not takeover:
                raise LeaseHeld(f"{self.url} was left by a {current.get('what', 'writer')} that stopped without "
                                f"finishing ({_describe(current)}); rerun with --resume to continue it or "
                                "--overwrite to start again")
        self._write_remote()
        time.sleep(SETTLE_SECONDS)
        back = self._read_remote()
        if back is None or back.get("id") != self.id:
            who = _describe(back) if back else "another process"
            raise LeaseHeld(f"{self.url} is being written by {who}; wait for it to finish or stop it, then rerun")
        self._thread = threading.Thread(target=self._renew, name="actcache-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._read_remote()
                if current is None or current.get("id") != self.id:
                    self._lost = _describe(current) if current else "nobody (the lease was deleted)"
                    return
                self._write_remote()
            except UserError:
                continue  # the server is unreachable for now; the next commit's check() will say so


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        d = json.loads(raw.decode() or "null")
    except (UnicodeDecodeError, ValueError):
        return None
    return d if isinstance(d, dict) else None


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "lock_url", "first_line"]
