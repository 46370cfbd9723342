"""Store locations: a local path or an fsspec URL (s3://bucket/prefix), opened as a zarr store."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from .errors import UserError, first_line

T = TypeVar("T")


def is_remote(url: str | os.PathLike) -> bool:
    """True for fsspec URLs such as s3://bucket/key; False for local paths (and file://)."""
    s = str(url)
    return "://" in s and not s.startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    s = str(url)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser()


def _quiet_async_noise() -> None:
    """aiohttp (under s3fs) leaves tasks whose failure nobody awaits when a server goes away; asyncio then
    prints their tracebacks through logging's last-resort handler, beside our one-line error. A
    NullHandler on the asyncio logger stops that last resort; an application that configures logging
    still receives those records through its own handlers."""
    import logging

    lg = logging.getLogger("asyncio")
    if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
        lg.addHandler(logging.NullHandler())


def open_store(url: str | os.PathLike, read_only: bool = False, storage_options: dict | None = None) -> Store:
    """A zarr Store for a location. Endpoint and keys of S3 come from the standard AWS chain
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/...), from the options in force
    (`storage_options()`: the command line's --storage-option key=value) and from storage_options
    (s3fs's names: endpoint_url, key, secret, anon...), each overriding the one before. S3 is read
    with obstore when it is installed (measured faster: see docs/performance.md, "Reading from S3"; s3fs when
    a profile is named) and written with s3fs; ACTCACHE_S3_BACKEND=fsspec or =obstore picks the reader."""
    if not is_remote(url):
        return LocalStore(local_path(url), read_only=read_only)
    s = str(url)
    _quiet_async_noise()
    options = _fsspec_only({**_fs_options(s), **(storage_options or {})})
    try:
        if read_only and s.startswith("s3://") and s3_read_backend() == "obstore" and "profile" not in options:
            return _obstore_store(s, options)
        store = FsspecStore.from_url(s, storage_options=options, read_only=read_only)
        _bounded(store.fs)
        return store
    except ImportError as e:
        raise UserError(f"cannot open {s}: {e}; install the S3 extra: pip install 'actcache[s3]'") from None


def s3_read_backend() -> str:
    """The zarr store that reads s3://: ACTCACHE_S3_BACKEND if set; else obstore when it is installed,
    unless the keys can only come from an AWS profile (obstore reads neither AWS_PROFILE nor
    ~/.aws/credentials), where s3fs (botocore's full credential chain) reads."""
    chosen = os.environ.get("ACTCACHE_S3_BACKEND", "").strip().lower()
    if chosen and chosen not in ("obstore", "fsspec"):
        raise UserError(f"ACTCACHE_S3_BACKEND={chosen!r}: use obstore or fsspec")
    if chosen:
        return chosen
    import importlib.util

    if importlib.util.find_spec("obstore") is None:
        return "fsspec"
    profile = os.environ.get("AWS_PROFILE") or Path(
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().exists()
    return "fsspec" if profile and not os.environ.get("AWS_ACCESS_KEY_ID") else "obstore"


def _obstore_store(url: str, options: dict) -> Store:
    """A read-only zarr ObjectStore over obstore's S3Store (Rust, many requests in flight, no GIL).
    s3fs-style options are translated; the rest of the configuration comes from the AWS variables."""
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    bucket, _, prefix = url[len("s3://"):].partition("/")
    names = {"endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key",
             "token": "session_token", "region_name": "region", "anon": "skip_signature"}
    config = {names.get(k, k): v for k, v in options.items() if k != "config_kwargs"}
    endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL", ""))
    bounds = obstore_options()
    client = {**bounds["client_options"], **({"allow_http": True} if endpoint.startswith("http://") else {})}
    return ObjectStore(S3Store(bucket, prefix=prefix.strip("/") or None, client_options=client,
                               retry_config=bounds["retry_config"], **config), read_only=True)


def exists(url: str | os.PathLike) -> bool:
    """Whether anything is at this location (a file, a non-empty folder, or objects under a prefix)."""
    if not is_remote(url):
        p = local_path(url)
        return p.exists() and (p.is_file() or any(p.iterdir()))
    with storage_errors(url, "looking at"):
        fs, path = remote_fs(url)
        try:
            return bool(fs.exists(path) and (fs.isfile(path) or fs.ls(path)))
        except FileNotFoundError:
            return False


def disk_usage(url: str | os.PathLike, prefix: str = "") -> int:
    """Bytes stored under a location (optionally under a sub-prefix such as 'activations')."""
    if not is_remote(url):
        root = local_path(url) / prefix
        if root.is_file():
            return root.stat().st_size
        return _tree_bytes(root)
    fs, path = remote_fs(url)
    full = f"{path.rstrip('/')}/{prefix}" if prefix else path
    return int(fs.du(full, total=True)) if fs.exists(full) else 0


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under a folder, walked one directory at a time (a store of 100M tokens holds
    tens of thousands of chunk files: no list of them is built)."""
    total, todo = 0, [str(root)]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        todo.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total


def remote_fs(url: str | os.PathLike):
    """The fsspec filesystem and path of a URL, with its listing cache dropped: another process
    (or an earlier harvest) may have changed what is there since fsspec last looked."""
    import fsspec

    _quiet_async_noise()
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **_fs_options(str(url)))
    except ImportError as e:
        raise UserError(f"cannot open {url}: {e}; install the S3 extra: pip install 'actcache[s3]'") from None
    fs.invalidate_cache()
    return _bounded(fs), path


def check_reachable(url: str | os.PathLike) -> None:
    """Fail early, with one line, when a remote location cannot be used: the endpoint is down, the
    bucket does not exist, or the credentials are refused. Local paths: nothing to do."""
    if not is_remote(url):
        return
    with storage_errors(url, "opening"):
        fs, path = remote_fs(url)
        fs.ls(path.split("/", 1)[0], detail=False)  # the endpoint answers, the bucket exists, the keys work


def storage_failure(e: BaseException) -> bool:
    """Whether an exception (or one it wraps) is a failure of the storage: a refused connection, a
    missing bucket, refused credentials, an I/O error; not a damaged chunk."""
    x, seen = e, 0
    while x is not None and seen < 10:
        mod = type(x).__module__ or ""
        if isinstance(x, (OSError, TimeoutError)) or mod.startswith(("botocore", "aiohttp", "s3fs", "obstore")):
            return True
        x, seen = x.__cause__ or x.__context__, seen + 1
    return False


@contextlib.contextmanager
def storage_errors(url: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turn a storage failure inside the block into one UserError line (other errors pass through)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        if storage_failure(e):
            raise storage_error(e, url, doing) from None
        raise


class StorageFailure(UserError):
    """A storage failure as one line; `transient` when it may pass by itself (retried, see `retrying`)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


_UNREACHABLE = ("EndpointConnectionError", "Could not connect", "Connection refused", "ClientConnectorError",
                "ConnectTimeout", "ReadTimeout", "ServerDisconnected")
_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")
# what waiting does not fix: a full or read-only disk, refused permissions, a path that is not there
_LASTING_TYPES = ("NotFoundError", "UnauthenticatedError", "PermissionDeniedError")  # obstore's
_LASTING_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                   errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL}


def _chain(e: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _failure_kind(e: BaseException) -> tuple[str, OSError | None]:
    """What kind of storage failure e is: "disk full", "no bucket", "denied", "unreachable", "lasting"
    (another error that waiting does not fix) or "other"; with the OSError of its chain, if any."""
    chain = _chain(e)
    text = " ".join(f"{type(x).__name__} {x}" for x in chain)
    os_err = next((x for x in chain if isinstance(x, OSError) and x.errno is not None), None)
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "disk full", os_err
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "no bucket", os_err
    if any(isinstance(x, PermissionError) for x in chain) or any(k in text for k in _DENIED):
        return "denied", os_err
    if any(k in text for k in _UNREACHABLE):
        return "unreachable", os_err
    if (os_err is not None and os_err.errno in _LASTING_ERRNOS) or any(
            isinstance(x, FileNotFoundError) or type(x).__name__ in _LASTING_TYPES for x in chain):
        return "lasting", os_err
    return "other", os_err


def storage_error(e: BaseException, url: str | os.PathLike, doing: str = "accessing") -> UserError:
    """One line for a storage failure (local or S3): what went wrong with which location, and what to do."""
    if isinstance(e, UserError):
        return e
    kind, os_err = _failure_kind(e)
    rerun = ("rerun the same command with --resume" if _RESUMABLE[0]
             else "rerun the same command (it starts over)")
    if kind == "disk full":
        return StorageFailure(f"disk full while {doing} {url} ({os_err.strerror}): free some space and {rerun}")
    if kind == "no bucket":
        return StorageFailure(f"the bucket of {url} does not exist: create it, or fix the URL")
    if kind == "denied":
        return StorageFailure(f"access to {url} was denied: check the credentials (AWS_ACCESS_KEY_ID, "
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's permissions")
    if kind == "unreachable":
        return StorageFailure(
            f"cannot reach the storage server while {doing} {url}: check that it is up and the endpoint "
            "(AWS_ENDPOINT_URL or --storage-option endpoint_url=...) is right, then "
            + ("rerun (add --resume where the work had begun)" if _RESUMABLE[0] else "rerun the same command"),
            transient=True)
    culprit = os_err or e
    return StorageFailure(f"{doing} {url} failed ({type(culprit).__name__}: {first_line(culprit)}); fix the cause "
                          f"and {rerun}", transient=kind == "other")


# ---------------------------------------------------------------------- retries across brief outages
# The one policy for retrying storage operations: a budget of seconds per operation, counted from the
# start of its first failed attempt (--storage-option retry_seconds=N, else $ACTCACHE_STORAGE_RETRY_SECONDS,
# else RETRY_SECONDS; 0 turns retries off), waits doubling from FIRST_WAIT up to MAX_WAIT, each one
# shortened by a random fraction of up to a half (jitter: writers that failed together do not return together).
RETRY_SECONDS = 60.0
RETRY_ENV = "ACTCACHE_STORAGE_RETRY_SECONDS"
RETRY_OPTION = "retry_seconds"
FIRST_WAIT, MAX_WAIT = 0.5, 8.0
# The budget is a deadline only if no single attempt can run long past it: every S3 request times out
# (REQUEST_TIMEOUT seconds without a byte from the server, --storage-option request_timeout=N; connecting
# at most CONNECT_TIMEOUT), and the clients' own retry loops, each a second policy that the budget would
# not bound (botocore: 5 attempts of up to 60 s each by default; s3fs: 5 more around those; obstore: 10
# over 3 minutes), are cut to quick ones: the waiting is this module's. An operation then gives up at
# most about one request timeout after its budget ran out.
REQUEST_TIMEOUT = 10.0
REQUEST_TIMEOUT_OPTION = "request_timeout"
CONNECT_TIMEOUT = 5.0
OBSTORE_QUICK_RETRIES_SECONDS = 2  # obstore retries a refused connection within this, never after
S3FS_ATTEMPTS = 1  # s3fs's own loop around botocore's


def _seconds(raw: Any) -> float:
    """A --storage-option's seconds as a float; NaN where the text is not a number (the caller's check
    then rejects it with its own message)."""
    try:
        return float(raw)
    except ValueError:
        return math.nan


def request_timeout() -> float:
    """Seconds an S3 request may wait for the server's next byte (--storage-option request_timeout=N)."""
    raw = _OPTIONS.get(REQUEST_TIMEOUT_OPTION)
    if raw is None or not str(raw).strip():
        return REQUEST_TIMEOUT
    value = _seconds(raw)
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"--storage-option {REQUEST_TIMEOUT_OPTION}={raw!r}: give the seconds an S3 request may "
                        "wait for the server (a number > 0)")
    return value


def _s3fs_timeouts(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with the request timeouts and a single botocore attempt (the caller's config_kwargs win)."""
    t = request_timeout()
    config = {"connect_timeout": min(CONNECT_TIMEOUT, t), "read_timeout": t, "retries": {"total_max_attempts": 1}}
    return {**options, "config_kwargs": {**config, **(options.get("config_kwargs") or {})}}


def obstore_options() -> dict[str, Any]:
    """obstore's client options and retry config: the same request timeouts, quick retries only."""
    from datetime import timedelta

    t = request_timeout()
    return {"client_options": {"connect_timeout": timedelta(seconds=min(CONNECT_TIMEOUT, t)),
                               "read_timeout": timedelta(seconds=t)},
            "retry_config": {"max_retries": 3, "retry_timeout": timedelta(seconds=OBSTORE_QUICK_RETRIES_SECONDS)}}


def _bounded(fs: Any) -> Any:
    """An fsspec filesystem with s3fs's own retry loop cut to S3FS_ATTEMPTS (see REQUEST_TIMEOUT)."""
    if hasattr(fs, "retries") and type(fs).__module__.startswith("s3fs"):
        fs.retries = S3FS_ATTEMPTS
    return fs

# the help of --storage-option, on every command that opens a store
STORAGE_OPTION_HELP = (
    "key=value passed to the store's filesystem (repeatable), e.g. endpoint_url=http://host:9000, profile=NAME, "
    f"key=..., secret=...; {RETRY_OPTION}=N, how long to retry a failing storage operation (default "
    f"{RETRY_SECONDS:g} s); {REQUEST_TIMEOUT_OPTION}=N, how long one S3 request may wait for the server (default "
    f"{REQUEST_TIMEOUT:g} s); beside the standard AWS chain; never written anywhere.")


def retry_seconds() -> float:
    """The retry budget in force, in seconds; a value that is not a number >= 0 is a UserError."""
    raw, where = _OPTIONS.get(RETRY_OPTION), f"--storage-option {RETRY_OPTION}"
    if raw is None:
        raw, where = os.environ.get(RETRY_ENV), RETRY_ENV
    if raw is None or not str(raw).strip():
        return RETRY_SECONDS
    value = _seconds(raw)
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{where}={raw!r}: give the seconds to keep retrying a failed storage operation "
                        "(0 turns retries off)")
    return value


def transient_failure(e: BaseException) -> bool:
    """Whether a storage failure may pass by itself and is worth retrying: a refused or dropped
    connection, a timeout, a server error. Never: a missing bucket, refused credentials, a full or
    read-only disk, a missing file, a damaged chunk, or any other error a user must fix."""
    if isinstance(e, UserError):
        return isinstance(e, StorageFailure) and e.transient
    return storage_failure(e) and _failure_kind(e)[0] in ("unreachable", "other")


def retrying(operation: Callable[[], T], url: str | os.PathLike, doing: str) -> T:
    """operation(), run again after a transient storage failure (`transient_failure`) until it succeeds
    or the retry budget (`retry_seconds`) is spent; then its last error is raised as it was. Only for
    operations that may run twice: writing a chunk, a commit (which checks the lease again), a read.
    Each retry is one log line: what failed, the attempt, the wait."""
    from .progress import log

    deadline: float | None = None
    attempt = 1
    while True:
        began = time.monotonic()
        try:
            return operation()
        except BaseException as e:  # noqa: BLE001  (re-raised unless it is a transient storage failure)
            if not isinstance(e, Exception) or not transient_failure(e):
                raise
            if deadline is None:
                deadline = began + retry_seconds()
            wait = min(MAX_WAIT, FIRST_WAIT * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise
            cause = next((x for x in _chain(e) if not isinstance(x, UserError)), e)
            log.warning(f"{doing} {url} failed ({type(cause).__name__}: {first_line(cause, 160)}); attempt "
                        f"{attempt}, retrying in {wait:.1f} s (for up to {retry_seconds():g} s in all)")
            time.sleep(wait)
            attempt += 1


_OPTIONS: dict[str, Any] = {}  # the fsspec options in force (storage_options); held in memory only
# whether the command in force can continue where it stopped (harvest and train take --resume): the
# fix an error line names depends on it
_RESUMABLE = [False]


def _fs_options(url: str) -> dict:
    out: dict[str, Any] = {}
    if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        out["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    out.update(_OPTIONS)
    out = _fsspec_only(out)
    return _s3fs_timeouts(out) if url.startswith(("s3://", "s3a://")) else out


def _fsspec_only(options: dict[str, Any]) -> dict[str, Any]:
    """The options meant for the filesystem: without ours (retry_seconds, request_timeout)."""
    return {k: v for k, v in options.items() if k not in (RETRY_OPTION, REQUEST_TIMEOUT_OPTION)}


def parse_storage_options(items: "list[str] | tuple[str, ...] | dict[str, Any] | None") -> dict[str, Any]:
    """--storage-option key=value (repeatable) as fsspec options: true/false become booleans, the rest
    stay strings (e.g. endpoint_url=http://127.0.0.1:9000, key=..., secret=..., profile=..., anon=true).
    One key is ours, not the filesystem's: retry_seconds (see `retry_seconds`)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        k, eq, v = str(item).partition("=")
        if not eq or not k.strip():
            raise UserError(f"--storage-option {k.strip() or item!r}...: write key=value "
                            "(e.g. endpoint_url=http://host:9000)")
        out[k.strip()] = {"true": True, "false": False}.get(v.strip().lower(), v.strip())
    return out


@contextlib.contextmanager
def storage_options(options: "list[str] | tuple[str, ...] | dict[str, Any] | None",
                    resumable: bool = False) -> Iterator[None]:
    """Use these fsspec options (credentials, endpoint_url ...) for every remote location opened
    inside the block, beside the standard AWS chain. They are kept in memory only: no manifest,
    run.json, summary or log line ever holds them. resumable: the command inside the block takes
    --resume (harvest, train), so its error lines may tell the user to rerun with it."""
    global _OPTIONS
    previous, was_resumable = _OPTIONS, _RESUMABLE[0]
    _OPTIONS = {**previous, **parse_storage_options(options)}
    _RESUMABLE[0] = resumable
    try:
        retry_seconds()  # a bad budget or timeout is refused before any work
        request_timeout()
        yield
    finally:
        _OPTIONS = previous
        _RESUMABLE[0] = was_resumable
