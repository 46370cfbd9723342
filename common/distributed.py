"""Running under torchrun: one process per rank, the same command on every rank.

`torchrun --nproc-per-node N --no-python actcache harvest ...` (or `... actcache train ...`) starts N
copies of the command with the environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set. `Ranks.from_env()` sees them and joins the process group: gloo on CPU, nccl when
every rank has a GPU of its own. Without them it is a world of one and nothing here talks to anyone.

Coordination goes through small fixed-size tensors only (never pickled objects). A failure on one
rank must not leave the others waiting in a collective: every step that may fail runs inside
`ranks.agree(...)`, which exchanges an error flag and the message; then rank 0 raises the first
error (naming the rank when it is not its own) and the other ranks raise `PeerFailed`, which the
command line turns into a non-zero exit without printing, so the user reads one line."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

from .errors import UserError, first_line

T = TypeVar("T")
MESSAGE_BYTES = 1024  # an error message travels as this many utf-8 bytes (longer ones are cut)


class PeerFailed(UserError):
    """Another rank failed and rank 0 reports why; this rank stops without a line of its own."""

    quiet = True


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); needs no process group."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


@dataclass
class Ranks:
    """The ranks of one job: this one's rank, how many there are, its local rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """Join torchrun's process group (once per process), or a world of one outside torchrun."""
        if not under_torchrun():
            return cls()
        import torch
        import torch.distributed as dist

        world = int(os.environ["WORLD_SIZE"])
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if world == 1:
            return cls(rank, world, local)
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            try:  # a long timeout: in a sweep, a rank whose share is done waits for the others at the end
                dist.init_process_group(backend, timeout=timedelta(days=7))
            except Exception as e:  # noqa: BLE001  (a rendezvous that fails: one line)
                raise UserError(f"rank {rank} could not join the other {world - 1} ranks ({first_line(e)}); "
                                "check the torchrun arguments (--nnodes, --rdzv-endpoint)") from None
        return cls(rank, world, local, dist.get_backend())

    def device(self, requested: str | None) -> str | None:
        """The device of this rank: cuda:LOCAL_RANK when the request is cuda (or none and there is a
        GPU); a request naming one GPU (cuda:1) is refused when there are several ranks per node."""
        if not self.distributed:
            return requested
        import torch

        if requested is None:
            return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        if requested == "cuda":
            return f"cuda:{self.local_rank}"
        if requested.startswith("cuda:") and self.world > 1:
            raise UserError(f"--device {requested} names one GPU but every rank needs its own: pass --device cuda "
                            "(each rank takes the GPU of its local rank)")
        return requested

    # ------------------------------------------------------------------ collectives
    def _tensor(self, values: list[int]):
        import torch

        dev = f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"
        return torch.tensor(values, dtype=torch.int64, device=dev)

    def all_gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints (the same length on every rank), in rank order."""
        if not self.distributed:
            return [list(values)]
        import torch.distributed as dist

        mine = self._tensor(values)
        out = [self._tensor([0] * len(values)) for _ in range(self.world)]
        try:
            dist.all_gather(out, mine)
        except Exception as e:  # noqa: BLE001  (a rank died: torchrun stops the rest anyway)
            raise UserError(f"rank {self.rank} lost contact with the other ranks ({first_line(e, 160)}): one of them "
                            "stopped; rerun the same command with --resume") from None
        return [[int(v) for v in t.cpu().tolist()] for t in out]

    def broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's list of ints, on every rank."""
        return self.all_gather(values)[0]

    def agree(self, fn: Callable[[], T], only_root: bool = False) -> T | None:
        """Run fn (on rank 0 only, with only_root), then tell every rank whether any rank failed. A
        UserError on some rank stops all of them: rank 0 raises it (prefixed with the failing rank
        when that is another one), the others raise PeerFailed."""
        result, error = None, None
        if not only_root or self.is_root:
            try:
                result = fn()
            except UserError as e:
                if not self.distributed:
                    raise
                error = e
        if not self.distributed:
            return result
        msg = str(error).encode()[:MESSAGE_BYTES] if error is not None else b""
        rows = self.all_gather([1 if error is not None else 0, len(msg)] + list(msg.ljust(MESSAGE_BYTES, b"\0")))
        failed = [r for r, row in enumerate(rows) if row[0]]
        if not failed:
            return result
        if error is not None and (self.is_root or isinstance(error, PeerFailed)):
            raise error
        if self.is_root:
            r = failed[0]
            text = bytes(rows[r][2:2 + rows[r][1]]).decode(errors="replace")
            raise UserError(f"rank {r}: {text}")
        raise PeerFailed(f"rank {failed[0]} failed")

    def check_same_arguments(self, args: Any) -> None:
        """Stop every rank when the ranks were launched with different arguments (a hash of repr(args))."""
        if not self.distributed:
            return
        digest = hashlib.blake2b(repr(args).encode(), digest_size=8).digest()
        rows = self.all_gather(list(digest))
        odd = [r for r, row in enumerate(rows) if row != rows[0]]
        if odd:
            if self.is_root:
                raise UserError(f"the ranks were launched with different arguments (rank {odd[0]} differs from "
                                "rank 0): give every rank the same command")
            raise PeerFailed("different arguments")

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able object, in rank order, on every rank (as UTF-8 bytes in tensors:
        nothing is unpickled)."""
        import json

        data = json.dumps(obj).encode()
        if not self.distributed:
            return [json.loads(data)]
        sizes = [row[0] for row in self.all_gather([len(data)])]
        rows = self.all_gather(list(data.ljust(max(sizes), b"\0")))
        return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]

    def barrier(self) -> None:
        self.all_gather([0])


@contextmanager
def ranks_from_env() -> Iterator[Ranks]:
    """Ranks.from_env(), leaving the process group when done (when this call created it)."""
    import torch.distributed as dist

    created = under_torchrun() and not (dist.is_available() and dist.is_initialized())
    ranks = Ranks.from_env()
    try:
        yield ranks
    finally:
        if created and ranks.distributed and dist.is_initialized():
            dist.destroy_process_group()


def owner(j: int, start: int, world: int) -> int:
    """The rank that computes chunk j of a harvest that starts (or resumes) at chunk `start`."""
    return (j - start) % world
