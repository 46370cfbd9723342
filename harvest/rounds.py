"""The chunks of one harvest, computed and written by every rank of a job (one process is a world of one).

The chunks are shared out deterministically: a harvest that starts (or resumes) at chunk `start`
gives chunk start + i to rank i % world. The work goes in rounds of `world` consecutive chunks;
every rank reads the token windows of the whole round (the windows are a pure function of the
arguments, so every rank sees the same ones) and keeps its own chunk's. Each rank runs the model on
its chunk and hands that chunk's arrays, per-chunk statistics and digest to its writer thread,
which writes them into the store without touching the commit counter.

Rank 0 alone advances the counter: in each round, after computing, every rank reports which of its
chunks of the round before are written (and the values it clamped there), and rank 0 queues a commit
of the chunks below the first one not yet written, before any rank queues its new chunk. So a write
that fails leaves every chunk written before it committed. When the data runs out inside a round,
rank 0 also computes that round's last, short chunk itself, after shrinking the store. The finished
store is thus the same, byte for byte, for any number of ranks, and chunks at or past the counter
are, as always, rewritten by `--resume`, with any number of ranks."""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np

from ..common.distributed import Ranks
from ..common.errors import UserError
from ..common.progress import log, token_bar
from ..common.store import ActivationStore

from .forward import compute_chunk, ordered_counts
from .models import HookedModel
from .writer import ChunkWriter

SLOTS = 2  # chunks one rank may report per round: its own, and (rank 0) the short last chunk


class _Ledger:
    """Rank 0's record of the chunks the ranks have written, and the commit counter it advances over them."""

    def __init__(self, store: ActivationStore, start: int):
        self.store = store
        self.hooks = store.manifest.hook_names
        self.clamped = {h: int(n) for h, n in store.manifest.n_clamped.items()}  # running total, in chunk order
        self.written: dict[int, list[int]] = {}  # chunk -> values clamped per hook
        self.committed = start

    def settle(self, payloads: list[list[int]], writer: ChunkWriter | None) -> None:
        """Record every rank's report, and commit (through the writer, in order with the chunk writes
        queued before, or directly once it is closed) the chunks below the first one not yet written."""
        width = 1 + len(self.hooks)
        for p in payloads:
            for s in range(SLOTS):
                row = p[s * width:(s + 1) * width]
                if row[0] >= 0:
                    self.written[row[0]] = row[1:]
        if self.committed not in self.written:
            return
        while self.committed in self.written:
            for h, n in zip(self.hooks, self.written.pop(self.committed)):
                if n:
                    self.clamped[h] = self.clamped.get(h, 0) + n
            self.committed += 1
        m = self.store.manifest
        fields = {"n_clamped": ordered_counts(self.clamped, m)} if m.overflow == "clamp" else {}
        (writer.commit if writer is not None else self.store.commit)(self.committed, **fields)


class _Reports:
    """This rank's chunks handed to its writer, and the fixed-size report of those written."""

    def __init__(self, n_hooks: int):
        self.n_hooks = n_hooks
        self.pending: list[int] = []  # submitted, not yet known to be written
        self.written: list[int] = []  # written, not yet reported
        self.clamps: dict[int, list[int]] = {}  # chunk -> values clamped per hook

    def report(self, writer: ChunkWriter) -> list[int]:
        """Wait until every pending chunk is written, then the payload of up to SLOTS of them."""
        for j in self.pending:
            writer.wait_written(j)
        self.written.extend(self.pending)
        self.pending = []
        payload = []
        for _ in range(SLOTS):
            j = self.written.pop(0) if self.written else -1
            payload += [j] + (self.clamps.pop(j) if j >= 0 else [0] * self.n_hooks)
        return payload


def write_chunks(store: ActivationStore, model: HookedModel, windows: Iterator[np.ndarray], ranks: Ranks,
                 start: int, progress: bool) -> int:
    """Compute and write chunks start.. of the store on every rank (see the module's docstring); returns
    the tokens computed by all ranks together. Rank 0 commits them; the store is not finalised here."""
    m = store.manifest
    hooks = m.hook_names
    ledger = _Ledger(store, start) if ranks.is_root else None
    mine = _Reports(len(hooks))
    done = 0
    writer = ChunkWriter(store, commit=False)
    try:
        with token_bar(m.n_tokens, "harvest", initial=start * m.chunk_sequences * m.context_size,
                       disable=not progress) as bar:
            batch_bar = bar if ranks.world == 1 else None  # one process counts batches; a job, whole rounds
            for r0 in range(start, m.n_chunks, ranks.world):
                rows_of, short = _read_round(store, windows, r0, ranks.world)
                own = [j for j in (r0 + ranks.rank,) if j in rows_of and (short is None or j < short)]
                if ranks.is_root and short is not None and rows_of[short]:
                    own.append(short)

                def compute() -> tuple[list, list[int]]:
                    computed = []
                    for j in own:
                        counts: dict[str, int] = {}
                        tokens = np.stack(rows_of[j])
                        computed.append((j, tokens, compute_chunk(model, tokens, m, counts, writer, batch_bar)))
                        mine.clamps[j] = [int(counts.get(h, 0)) for h in hooks]
                    return computed, mine.report(writer)

                computed, payload = ranks.agree(compute)
                gathered = ranks.all_gather(payload)
                if ledger is not None:
                    ledger.settle(gathered, writer)

                def submit() -> None:
                    if ranks.is_root and short is not None:
                        a = store.chunk_sequence_range(short)[0]
                        log.info(f"the dataset ran out after {a + len(rows_of[short])} of {m.n_sequences} sequences")
                        writer.truncate(a + len(rows_of[short]))
                    for j, tokens, acts in computed:
                        writer.submit(j, tokens, acts)
                    mine.pending = [j for j, _, _ in computed]

                ranks.agree(submit)
                round_tokens = sum(len(r) for r in rows_of.values()) * m.context_size
                if batch_bar is None:
                    bar.update(round_tokens)
                done += round_tokens
                if short is not None:
                    break

            def finish() -> list[int]:
                writer.close()
                return mine.report(writer)

            gathered = ranks.all_gather(ranks.agree(finish))
            if ledger is not None:
                ledger.settle(gathered, None)
    except BaseException:
        writer.abandon()
        raise
    if ledger is not None and ledger.committed != store.n_chunks:
        raise UserError(f"only {ledger.committed} of {store.n_chunks} chunks of {store.url} were written; "
                        "rerun with --resume")
    return done


def _read_round(store: ActivationStore, windows: Iterator[np.ndarray], r0: int,
                world: int) -> tuple[dict[int, list], int | None]:
    """The token windows of the round's chunks r0..r0+world-1 ({chunk: rows}), and the chunk where the
    data ran out (it holds fewer rows than planned, perhaps none), if it did."""
    rows_of: dict[int, list] = {}
    for j in range(r0, min(r0 + world, store.n_chunks)):
        a, b = store.chunk_sequence_range(j)
        rows_of[j] = list(itertools.islice(windows, b - a))
        if len(rows_of[j]) < b - a:
            return rows_of, j
    return rows_of, None
