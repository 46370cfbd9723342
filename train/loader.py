"""The batch stream: shuffled windows of store chunks, decoded by threads, shuffled per token.

Order of operations for epoch e:
  1. the committed chunks in the order of a seeded permutation (seed, "chunks", e);
  2. consecutive groups of `window_chunks` of them form windows; a window's chunks are fetched and
     decoded by a thread pool (the codecs release the GIL) straight into one reused host buffer (pinned
     when CUDA is there); optionally BOS/EOS/pad positions are left out (the window keeps every row and
     the index of the kept ones, which a batch gathers through: no row is moved to leave one out);
  3. the window's kept rows are permuted by (seed, "window", e, w), so a batch mixes many sequences and chunks;
  4. batches are consecutive slices of the concatenation of all permuted windows of all epochs.
So batch `step` is a pure function of (store, seed, step), every SAE of a sweep sees the same stream,
and the position (epoch, window, offset) is all the state there is.

Several hooks: a loader given a list of hooks reads, for every chunk, each hook's array once (and
the token ids once), keeps the same positions of every hook and applies one permutation to all of
them, so row i of every hook's batch is the same token. The order does not depend on which hooks are
read: the batch of a hook is the same whether the loader reads it alone or with others. While one window is consumed the
next is fetched and decoded in the background.

Held-out sequences: the chunks are those committed chunks that share no sequence with the store's
held-out part (`store.held_out_range()`, format 2 on) or with a range the caller names (`held_out`, the
sweep's `held_out = "START:STOP"`, for stores without one). Such chunks are never read, not read and
discarded; chunk ids keep their store numbering, so with nothing held out the stream is unchanged.

Normalisation: x is multiplied by one constant, sqrt(d_in / E||x||^2), with E||x||^2 = sum over
dimensions of (var + mean^2) from the store's statistics of the training chunks (never of held-out
ones), so that E||x||^2 = d_in after scaling.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..common import location
from ..common.errors import StoreError, UserError, first_line
from ..common.manifest import special_token_ids
from ..common.seeding import permutation
from ..common.store import ActivationStore

# rows gathered and converted at a time on the CPU: 512 rows of d 768 in float16 (768 KiB) stay in cache
GATHER_BLOCK = 512


def normalisation_scale(store: ActivationStore, hook: str, chunks: list[int] | None = None) -> float:
    """The constant that brings E||x||^2 to d_in, from the harvest statistics (no pass over the data).

    `chunks`: the chunks training reads (held-out chunks excluded); default every committed chunk."""
    d = store.manifest.hook(hook).d
    count, sumsq = _count_and_sumsq(store, hook, range(store.n_committed) if chunks is None else sorted(chunks))
    if not count:
        raise UserError(f"the store {store.url} has no statistics for {hook!r}; finish the harvest first")
    mean_sq = float(np.sum(sumsq / count))  # sum over dims of E[x_d^2]
    return math.sqrt(d / mean_sq) if mean_sq > 0 else 1.0


PARTIALS_PER_READ = 256  # per-chunk partial sums read at a time: memory bounded by this, not by the store


def _count_and_sumsq(store: ActivationStore, hook: str, chunks: "range | list[int]") -> tuple[float, np.ndarray]:
    """Tokens and per-dimension sum of squares of a hook over these committed chunks. A complete store
    keeps its summary (what finalize wrote, over every chunk): that, less the few chunks left out (the
    held-out part); else the chunks' own partial sums, a block at a time."""
    d = store.manifest.hook(hook).d
    left_out = sorted(set(range(store.n_committed)) - set(chunks))
    if store.manifest.complete and store.n_committed == store.n_chunks and len(left_out) < len(chunks):
        s = store.summary(hook)
        count, sumsq = float(s["count"]), s["count"] * (np.asarray(s["var"]) + np.asarray(s["mean"]) ** 2)
        sign, todo = -1.0, left_out
    else:
        count, sumsq, sign, todo = 0.0, np.zeros(d), 1.0, list(chunks)
    for i in range(0, len(todo), PARTIALS_PER_READ):
        part = store.partial_table(hook, todo[i:i + PARTIALS_PER_READ], ("count", "sumsq"))
        count += sign * float(part["count"].sum())
        sumsq = sumsq + sign * part["sumsq"].sum(axis=0)
    return count, sumsq


def held_out_ranges(store: ActivationStore, held_out: "list[int] | tuple[int, int] | None" = None
                    ) -> list[tuple[int, int]]:
    """The sequence ranges [start, stop) that training must not read: the store's own held-out part
    (format 2 and 3 stores) and a range the user names (`held_out = "START:STOP"` in the sweep config)."""
    ranges = []
    own = store.held_out_range()  # None for stores of format 1
    if own is not None:
        ranges.append((int(own[0]), int(own[1])))
    if held_out is not None:
        n = store.manifest.n_sequences
        ok = (isinstance(held_out, (list, tuple)) and len(held_out) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in held_out))
        if not ok or not 0 <= held_out[0] < held_out[1] <= n:
            raise UserError(f"held_out = {held_out!r} must be [start_sequence, stop_sequence] with "
                            f"0 <= start < stop <= {n} (the store's sequences)")
        ranges.append((int(held_out[0]), int(held_out[1])))
    return ranges


def training_chunks(store: ActivationStore, held_out: "list[int] | tuple[int, int] | None" = None) -> list[int]:
    """The committed chunks training may read: every chunk that shares no sequence with a held-out
    range (a chunk that overlaps one is left out whole, so its held-out sequences are never decoded)."""
    ranges = held_out_ranges(store, held_out)
    return [j for j in range(store.n_committed)
            if not any(a < store.chunk_sequence_range(j)[1] and store.chunk_sequence_range(j)[0] < b
                       for a, b in ranges)]


@dataclass
class _Window:
    epoch: int
    index: int
    acts: dict[str, torch.Tensor]  # hook -> [rows, d] float16 as stored (pinned memory with CUDA), every row
    rows: torch.Tensor  # int64 [kept]: the store row of each kept position
    perm: torch.Tensor  # int64 [kept]
    at: "torch.Tensor | None" = None  # int64 [kept]: where each kept position's row is in acts (None: i)


class ActivationLoader:
    """Batches of float32 activations [batch_size, d] on `device`, scaled by `scale`.

    `hook` is one hook name (next_batch() returns a tensor) or a list of them (next_batch() returns
    {hook: tensor}, rows aligned: row i of every hook is the same token); next_batches() always
    returns the dict. `scales[hook]` is each hook's normalisation constant (`scale`: the first hook's).

    Iterate it, or call next_batch(). state_dict()/load_state_dict() save and restore the position,
    which does not depend on the hooks read."""

    def __init__(self, store: ActivationStore | str, hook: "str | Sequence[str]", batch_size: int, seed: int = 0,
                 window_chunks: int = 8, threads: int = 4, device: str | torch.device = "cpu",
                 skip_special_tokens: bool = False, normalize: bool = True, repeat: bool = True,
                 prefetch: bool = True, max_chunks: int | None = None,
                 held_out: "list[int] | tuple[int, int] | None" = None):
        self.store = ActivationStore.open(store) if isinstance(store, str) else store
        self.single = isinstance(hook, str)
        self.hooks: tuple[str, ...] = (hook,) if self.single else tuple(dict.fromkeys(hook))
        if not self.hooks:
            raise ValueError("a loader needs at least one hook")
        self.hook = self.hooks[0]
        for h in self.hooks:
            self.store.activations(h)
        self.dims = {h: self.store.manifest.hook(h).d for h in self.hooks}
        self.d = self.dims[self.hook]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.window_chunks = int(window_chunks)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.skip_special_tokens = skip_special_tokens
        self.repeat = repeat
        self.prefetch = prefetch
        # the chunks this loader may read: committed, and outside every held-out range
        self.held_out = held_out_ranges(self.store, held_out)
        ids = training_chunks(self.store, held_out)
        self.chunk_ids = ids if max_chunks is None else ids[:max_chunks]
        self.n_chunks = len(self.chunk_ids)
        if self.n_chunks == 0:
            what = "no committed chunk yet" if not self.store.n_committed else "no committed chunk outside the held-out part"
            raise UserError(f"the store {self.store.url} holds {what}")
        # statistics of the training chunks only (with nothing held out: of every committed chunk)
        self.scales = {h: (normalisation_scale(self.store, h, self.chunk_ids if self.held_out else None)
                           if normalize else 1.0) for h in self.hooks}
        self.scale = self.scales[self.hook]
        tok = self.store.manifest.tokenizer
        self.special_ids = special_token_ids(tok)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="actcache-read")
        # one more thread assembles the next window (it waits on the readers, so it cannot be one of them)
        self.assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actcache-window")
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # position of the next batch
        self.epoch = 0
        self.window = 0
        self.offset = 0
        self.step = 0
        self._current: _Window | None = None
        self._next: Future | None = None
        self._next_key: tuple[int, int] | None = None
        self.wait_seconds = 0.0  # time next_batch spent waiting for a window that was not ready
        self.read_failed = False  # set when reading a chunk failed (the error itself reaches next_batch)
        self._staging: list[dict[str, torch.Tensor] | None] = [None, None]
        self._gather_stage: dict[int, torch.Tensor] = {}  # width -> the CPU gather's float16 block buffer
        self._copied: list = [None, None]
        # two reusable window buffers: one being consumed, one being filled (no fresh allocation per window)
        per_chunk = self.store.manifest.chunk_sequences * self.store.manifest.context_size
        self._slot_rows = per_chunk * min(self.window_chunks, self.n_chunks)
        self._slots: list[dict[str, torch.Tensor] | None] = [None, None]

    # ------------------------------------------------------------------ geometry
    def chunk_order(self, epoch: int) -> list[int]:
        """The chunk ids of an epoch, in reading order (a seeded permutation of the training chunks)."""
        return [self.chunk_ids[i] for i in permutation(self.n_chunks, self.seed, "chunks", epoch).tolist()]

    @property
    def n_rows(self) -> int:
        """Store rows (tokens) per epoch before special tokens are skipped."""
        return sum(r1 - r0 for r0, r1 in map(self.store.chunk_row_range, self.chunk_ids))

    def n_windows(self) -> int:
        return -(-self.n_chunks // self.window_chunks)

    def window_chunk_ids(self, epoch: int, w: int) -> list[int]:
        order = self.chunk_order(epoch)
        return order[w * self.window_chunks:(w + 1) * self.window_chunks]

    # ------------------------------------------------------------------ reading
    def _slot(self, epoch: int, w: int) -> dict[str, torch.Tensor]:
        i = (epoch * self.n_windows() + w) % 2
        if self._slots[i] is None:
            # float16 as stored (pinned with CUDA): the shuffle gather moves half the bytes, and only the
            # rows of a batch are converted to scaled float32, once, after the gather
            self._slots[i] = {h: torch.empty((self._slot_rows, d), dtype=torch.float16, pin_memory=self.cuda)
                              for h, d in self.dims.items()}
        return self._slots[i]

    def _read_chunk(self, hook: str, j: int, out: torch.Tensor | None = None) -> np.ndarray:
        """Chunk j of a hook, through the store (which refuses absent or damaged chunks); with `out`,
        decoded straight into it (a compressed local chunk needs no array of its own). Any other
        failure (a storage error, a decode error) becomes one line naming the chunk."""
        try:
            if out is not None:
                return self.store.read_chunk_into(hook, j, out.numpy())
            return self.store.read_chunk(hook, j)
        except UserError:
            self.read_failed = True
            raise
        except Exception as e:  # noqa: BLE001
            self.read_failed = True
            raise _read_error(self.store, f"activations/{hook}", j, e) from None

    def _read_tokens(self, j: int) -> np.ndarray:
        try:
            return self.store.read_tokens(j)
        except UserError:
            self.read_failed = True
            raise
        except Exception as e:  # noqa: BLE001
            self.read_failed = True
            raise _read_error(self.store, "tokens", j, e) from None

    def _read_into(self, j: int, dst: dict[str, torch.Tensor]) -> "np.ndarray | None":
        """Decode chunk j of every hook (each array once) straight into dst, its place in the window;
        when skipping special tokens, return the mask of its rows to keep (the token ids read once)."""
        for h in self.hooks:
            self._read_chunk(h, j, dst[h])
        if self.skip_special_tokens and self.special_ids:
            return ~np.isin(self._read_tokens(j).reshape(-1), self.special_ids)
        return None

    def _load_window(self, epoch: int, w: int) -> _Window:
        ids = self.window_chunk_ids(epoch, w)
        slot = self._slot(epoch, w)
        # every chunk decoded straight into its place in the window, in parallel; special tokens are left
        # out by indexing (the kept positions), never by moving rows
        offsets, at = [], 0
        for j in ids:
            r0, r1 = self.store.chunk_row_range(j)
            offsets.append((at, r1 - r0))
            at += r1 - r0
        futures = [self.pool.submit(self._read_into, j, {h: b[o:o + size] for h, b in slot.items()})
                   for j, (o, size) in zip(ids, offsets)]
        keeps = [f.result() for f in futures]
        rows = [np.arange(*self.store.chunk_row_range(j), dtype=np.int64) for j in ids]
        where = None
        if self.skip_special_tokens and self.special_ids:
            where = torch.from_numpy(np.concatenate([o + np.flatnonzero(k) for (o, _), k in zip(offsets, keeps)]))
            rows = [r[k] for r, k in zip(rows, keeps)]
        rows_t = torch.from_numpy(np.concatenate(rows))
        perm = permutation(rows_t.shape[0], self.seed, "window", epoch, w)
        return _Window(epoch, w, {h: b[:at] for h, b in slot.items()}, rows_t, perm, where)

    def _following(self, epoch: int, w: int) -> tuple[int, int]:
        return (epoch, w + 1) if w + 1 < self.n_windows() else (epoch + 1, 0)

    def _start_loading(self, key: tuple[int, int]) -> None:
        if key[0] > 0 and not self.repeat:
            return
        self._next_key = key
        self._next = self.assembler.submit(self._load_window, *key)

    def _window_at(self, epoch: int, w: int) -> _Window:
        if self._current is not None and (self._current.epoch, self._current.index) == (epoch, w):
            return self._current
        if epoch > 0 and not self.repeat:
            raise UserError("the data ran out: the store holds fewer tokens than asked for; allow repeated epochs")
        if self._next_key == (epoch, w) and self._next is not None:
            t = time.perf_counter()
            win = self._next.result()
            self.wait_seconds += time.perf_counter() - t
        else:
            self._drain()  # a prefetch of another window must not be writing while this one loads
            t = time.perf_counter()
            win = self._load_window(epoch, w)
            self.wait_seconds += time.perf_counter() - t
        self._next = None
        self._next_key = None
        self._current = win
        if self.prefetch:
            self._start_loading(self._following(epoch, w))
        return win

    def _drain(self) -> None:
        """Wait for an in-flight prefetch and forget it (its window is no longer the next one)."""
        if self._next is not None:
            try:
                self._next.result()
            except Exception:  # noqa: BLE001  (a window nobody will read; if its chunks are bad, reading them again says so)
                pass
        self._next, self._next_key = None, None

    # ------------------------------------------------------------------ batches
    def next_batch(self, return_rows: bool = False):
        """The next batch [batch_size, d] (float32, scaled, on the device); with return_rows also the
        store rows. A loader of several hooks returns {hook: batch} (rows aligned across hooks)."""
        out = self.next_batches(return_rows)
        if return_rows:
            batches, rows = out
            return (batches[self.hook] if self.single else batches), rows
        return out[self.hook] if self.single else out

    def next_batches(self, return_rows: bool = False):
        """The next batch of every hook, {hook: [batch_size, d_hook]}; with return_rows also the store rows."""
        slot = self.step % 2
        if self.cuda:
            host = self._batch_buffers(slot)
        else:  # float32 batches of their own (a caller may keep them); assembled block by block
            out = {h: torch.empty((self.batch_size, d), dtype=torch.float32) for h, d in self.dims.items()}
        row_parts, at = [], 0
        while at < self.batch_size:
            win = self._window_at(self.epoch, self.window)
            n = win.perm.shape[0]
            take = min(self.batch_size - at, n - self.offset)
            idx = win.perm[self.offset:self.offset + take]
            src = idx if win.at is None else win.at.index_select(0, idx)  # kept position -> window row
            # gather now: the window's buffer is refilled once the stream moves two windows on
            for h in self.hooks:
                if self.cuda:
                    torch.index_select(win.acts[h], 0, src, out=host[h][at:at + take])
                else:
                    self._gather_scaled(win.acts[h], src, out[h][at:at + take], self.scales[h])
            if return_rows:
                row_parts.append(win.rows.index_select(0, idx))
            at += take
            self.offset += take
            if self.offset >= n:
                self.epoch, self.window = self._following(self.epoch, self.window)
                self.offset = 0
        self.step += 1
        batches = self._to_device(host, slot) if self.cuda else out
        if return_rows:
            return batches, torch.cat(row_parts)
        return batches

    def _gather_scaled(self, src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
        """dst (float32) = src[idx] (float16) converted and multiplied by scale, in blocks of GATHER_BLOCK
        rows: each block is gathered into a small reused float16 buffer that stays in the CPU cache while
        it is converted, so the rows cross memory once (a gather of the whole batch, then its conversion,
        would move them three times). The same values as src[idx].to(float32).mul_(scale)."""
        d = src.shape[1]
        stage = self._gather_stage.get(d)
        if stage is None:
            stage = self._gather_stage[d] = torch.empty((GATHER_BLOCK, d), dtype=torch.float16)
        for k in range(0, idx.shape[0], GATHER_BLOCK):
            part = idx[k:k + GATHER_BLOCK]
            s, o = stage[:part.shape[0]], dst[k:k + GATHER_BLOCK]
            torch.index_select(src, 0, part, out=s)
            o.copy_(s)
            if scale != 1.0:
                o.mul_(scale)

    def _batch_buffers(self, slot: int) -> dict[str, torch.Tensor]:
        # one of two pinned staging buffers per hook; the copy out of them two batches ago is waited for
        if self._staging[slot] is None:
            self._staging[slot] = {h: torch.empty((self.batch_size, d), dtype=torch.float16, pin_memory=True)
                                   for h, d in self.dims.items()}
            self._copied[slot] = torch.cuda.Event()
        else:
            self._copied[slot].synchronize()
        return self._staging[slot]

    def _to_device(self, host: dict[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
        out = {}
        # non_blocking copies on a side stream; the compute stream waits for these copies only
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            devs = {h: buf.to(self.device, non_blocking=True) for h, buf in host.items()}
            self._copied[slot].record(self.copy_stream)
        main.wait_stream(self.copy_stream)
        for h, dev in devs.items():
            dev.record_stream(main)
            x = dev.to(torch.float32)
            out[h] = x.mul_(self.scales[h]) if self.scales[h] != 1.0 else x
        return out

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset, "step": self.step,
                "seed": self.seed, "batch_size": self.batch_size, "window_chunks": self.window_chunks,
                "n_chunks": self.n_chunks, "skip_special_tokens": self.skip_special_tokens,
                "held_out": [list(r) for r in self.held_out]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "window_chunks", "n_chunks", "skip_special_tokens", "held_out"):
            mine = [list(r) for r in self.held_out] if key == "held_out" else getattr(self, key)
            if state.get(key, [] if key == "held_out" else None) != mine:
                raise UserError(f"the saved loader state has {key} = {state.get(key)}, this loader {mine}; "
                                "resume with the same config and store")
        self._drain()
        self._current = None
        self.epoch, self.window, self.offset, self.step = state["epoch"], state["window"], state["offset"], state["step"]

    def seek(self, step: int) -> None:
        """Move to the position of batch `step` from the start (reads token ids only when skipping)."""
        self._drain()
        self._current = None
        self.epoch, self.window, self.offset, self.step = 0, 0, 0, 0
        remaining = step * self.batch_size
        while remaining:
            n = self._window_rows(self.epoch, self.window)
            if remaining < n:
                self.offset = remaining
                break
            remaining -= n
            self.epoch, self.window = self._following(self.epoch, self.window)
        self.step = step

    def _window_rows(self, epoch: int, w: int) -> int:
        total = 0
        for j in self.window_chunk_ids(epoch, w):
            if self.skip_special_tokens and self.special_ids:
                total += int((~np.isin(self._read_tokens(j), self.special_ids)).sum())
            else:
                r0, r1 = self.store.chunk_row_range(j)
                total += r1 - r0
        return total

    def close(self) -> None:
        self._drain()
        self.assembler.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_error(store: ActivationStore, array: str, j: int, e: BaseException) -> StoreError:
    what = f"{type(e).__name__}: {first_line(e)}"
    if location.storage_failure(e):
        return StoreError(f"reading chunk {j} of {array} in {store.url} failed ({what}); check that the store "
                          "is reachable, and run `actcache verify` on it if this persists")
    return StoreError(f"chunk {j} of {array} in {store.url} cannot be decoded ({what}); it is damaged: run "
                      f"`actcache verify {store.url}`")
