"""Helpers shared by the torchrun and S3 tests: one-thread subprocesses, torchrun command lines, the
pid of a rank's worker, our error and retry lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
