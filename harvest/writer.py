"""The background store writer: statistics, compression and chunk writes overlap the forward pass.

The main thread hands over whole chunks through a bounded queue (so at most `max_pending` chunks
wait in memory); one writer thread writes each chunk's arrays and then advances the commit counter,
in order. A failure in the writer reaches the main thread as a one-line UserError at its next call,
and the store stays resumable: every chunk below the counter is complete."""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np

from ..common import location
from ..common.errors import UserError
from ..common.store import ActivationStore, chunk_stats


_STOP = object()


class ChunkWriter:
    """Writes chunks of a store on a background thread; use as a context manager."""

    def __init__(self, store: ActivationStore, max_pending: int = 2, commit: bool = True):
        """commit=False (a rank of a distributed harvest): write chunks without advancing the counter;
        `wait_written(j)` says when chunk j is in the store, and rank 0 queues the commits itself."""
        self.store = store
        self._commit = commit
        self._written: set[int] = set()
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: UserError | None = None
        self._thread = threading.Thread(target=self._loop, name="actcache-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- main thread
    def submit(self, j: int, tokens: np.ndarray, acts: dict[str, np.ndarray], **fields: Any) -> None:
        """Queue chunk j (tokens [n, ctx] int32, acts {hook: [n*ctx, d] float16}); blocks while the queue
        is full. `fields` (manifest fields such as n_clamped) are written with the chunk's commit."""
        self._put(("chunk", j, tokens, acts, fields))

    def truncate(self, n_sequences: int) -> None:
        """Shrink the store to n_sequences, in order with the chunk writes (the data ran out)."""
        self._put(("truncate", n_sequences))

    def commit(self, n_chunks_committed: int, **fields: Any) -> None:
        """Queue a commit of the counter (in order with the chunk writes and truncations queued before)."""
        self._put(("commit", n_chunks_committed, fields))

    def wait_written(self, j: int) -> None:
        """Block until chunk j is written (raises the writer's error if it failed)."""
        with self._cond:
            while j not in self._written and self._error is None and self._thread.is_alive():
                self._cond.wait(0.1)
        self.check()
        if j not in self._written:
            raise UserError(f"chunk {j} of {self.store.url} was never written")

    def close(self) -> None:
        """Wait for every queued chunk to be committed; raise the writer's error if it failed."""
        if self._thread.is_alive():
            self._put(_STOP)
            self._thread.join()
        self.check()

    def abandon(self) -> None:
        """Stop after the chunks already queued (the main thread failed); never raises."""
        if self._thread.is_alive():
            try:
                self._put(_STOP)
            except UserError:
                pass
            self._thread.join()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item: Any) -> None:
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    # ---------------------------------------------------------------- writer thread
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if item[0] == "truncate":
                    self.store.truncate(item[1])
                elif item[0] == "commit":
                    self.store.commit(item[1], **item[2])
                else:
                    _, j, tokens, acts, fields = item
                    stats = {h: chunk_stats(x) for h, x in acts.items()}
                    self.store.write_chunk(j, tokens, acts, stats)
                    if self._commit:
                        self.store.commit(j + 1, **fields)
                    with self._cond:
                        self._written.add(j)
                        self._cond.notify_all()
            except BaseException as e:  # noqa: BLE001  (every failure must reach the main thread)
                self._error = _as_user_error(e, item[1] if item[0] == "chunk" else None, self.store.url)
                with self._cond:
                    self._cond.notify_all()
                self._drain()
                return

    def _drain(self) -> None:
        """Empty the queue so a main thread blocked in put() wakes up and sees the error."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


def _as_user_error(e: BaseException, j: int | None, url: str) -> UserError:
    if isinstance(e, UserError):
        return e
    msg = str(location.storage_error(e, url, f"writing chunk {j} of" if j is not None else "writing"))
    return UserError(msg if "--resume" in msg else f"{msg} with --resume")
