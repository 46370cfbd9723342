"""One harvest over many processes under torchrun: every rank runs the same command.

The chunks are shared out deterministically: a harvest that starts (or resumes) at chunk `start`
gives chunk start + i to rank i % world. The work goes in rounds of `world` consecutive chunks;
every rank reads the token windows of the whole round (the windows are a pure function of the
arguments, so every rank sees the same ones) and keeps its own chunk's. Each rank runs the model on
its chunk and writes that chunk's arrays, per-chunk statistics and digest into the store, on its
writer thread, without touching the commit counter.

Rank 0 alone creates (or reopens) the store, holds the lease, and advances the counter: after each
round every rank reports which of its chunks are written (and the values it clamped there), and
rank 0 commits, in order, the chunks below the first one not yet written. When the data runs out
inside a round, rank 0 also computes that round's last, short chunk itself, after shrinking the
store, exactly as one process would. So the finished store is the one a single process writes with
the same arguments, byte for byte, and chunks at or past the counter are, as always, rewritten by
`--resume`, with any number of ranks."""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from ..common import location, outputs
from ..common.distributed import Ranks, ranks_from_env
from ..common.errors import UserError
from ..common.lease import Lease
from ..common.progress import log, token_bar
from ..common.store import ActivationStore

from .api import (HarvestResult, _check_ran_out, _check_same_arguments, _existing_store, _held_out_spec, _manifest,
                  _remove_partial_files, _result, _validate, compute_chunk, ordered_counts)
from .config import HarvestConfig
from .data import TokenWindows, prefetch, resolve_source
from .models import HookedModel, load_model, precheck_hooks
from .writer import ChunkWriter

SLOTS = 2  # chunks one rank may report per round: its own, and (rank 0) the short last chunk


def harvest_ranks(cfg: HarvestConfig, progress: bool, model: HookedModel | None, t_start: float) -> HarvestResult:
    """harvest() on one rank of a torchrun job (see the module's docstring)."""
    with ranks_from_env() as ranks:
        ranks.check_same_arguments(dataclasses.astuple(cfg))

        def validate() -> tuple[int, tuple[str, float]]:
            n = _validate(cfg)
            return n, _held_out_spec(cfg.held_out, n)

        n_tokens, held_out = ranks.agree(validate)
        ranks.agree(lambda: location.check_reachable(cfg.out))
        lease = ranks.agree(lambda: Lease.acquire(cfg.out, "harvest", takeover=cfg.resume or cfg.overwrite),
                            only_root=True)
        try:
            return _harvest(cfg, ranks, progress and ranks.is_root, model, t_start, n_tokens, held_out, lease)
        finally:
            if lease is not None:
                lease.release()


def _harvest(cfg: HarvestConfig, ranks: Ranks, progress: bool, model: HookedModel | None, t_start: float,
             n_tokens: int, held_out: tuple[str, float], lease: Lease | None) -> HarvestResult:
    def load():
        nonlocal model
        src = resolve_source(cfg.dataset, cfg.name, cfg.split, cfg.streaming)
        found = _existing_store(cfg) if ranks.is_root else (None, False)
        if model is None:
            precheck_hooks(cfg.model, cfg.hooks)
            model = load_model(cfg.model, device=ranks.device(cfg.device), dtype=cfg.dtype, tokenizer=cfg.tokenizer)
        elif (model.info.name, model.info.dtype) != (cfg.model, cfg.dtype):
            raise_user(f"the loaded model is {model.info.name} ({model.info.dtype}) but the config asks for "
                       f"{cfg.model} ({cfg.dtype})")
        if cfg.context_size > model.info.n_ctx:
            raise_user(f"context size {cfg.context_size} is larger than the model's n_ctx ({model.info.n_ctx}): "
                       f"use --context-size {model.info.n_ctx} or less")
        dims = model.hook_dims(cfg.hooks)
        data = TokenWindows(src, cfg.context_size, model.tokenizer, model.vocab_size, cfg.text_column,
                            cfg.prepend_bos, cfg.seed)
        return found, data, _manifest(cfg, model, data, dims, n_tokens, held_out)

    found, data, manifest = ranks.agree(load)
    assert model is not None

    def plan() -> tuple[int, int]:  # rank 0: where to start, and whether the store is complete already
        existing, _ = found
        if existing is None:
            return 0, 0
        _check_same_arguments(existing.manifest, manifest, cfg.out)
        if existing.n_committed == 0 and not existing.manifest.complete:
            return 0, 0
        return existing.n_committed, int(existing.manifest.complete)

    start, complete = ranks.broadcast(list(ranks.agree(plan, only_root=True) or (0, 0)))
    if complete:
        if ranks.is_root:
            log.info(f"{cfg.out} is already complete")
        store = ranks.agree(lambda: ActivationStore.open(cfg.out, "r"))
        ranks.agree(lambda: _check_ran_out(store, cfg), only_root=True)
        return _result(store, cfg, t_start, 0, 0.0, start)

    windows = prefetch(data.windows(skip=start * manifest.chunk_sequences))
    first = next(windows, None)

    def nonempty() -> None:
        if first is None and start == 0:
            raise_user(f"dataset {cfg.dataset} gave no token window: it is empty, or its text is shorter "
                       f"than one window of {cfg.context_size} tokens")

    ranks.agree(nonempty)
    windows = itertools.chain([first] if first is not None else [], windows)

    def create() -> ActivationStore:  # rank 0: a new store, or the one to resume
        existing, replace = found
        if start == 0:
            lease.check()
            with location.storage_errors(cfg.out, "creating"):
                if (replace or existing is not None) and location.exists(cfg.out):
                    outputs.remove_output(cfg.out, outputs.STORE)
                store = ActivationStore.create(cfg.out, manifest)
        else:
            store = ActivationStore.open(cfg.out, "r+")
            _remove_partial_files(cfg.out)
            log.info(f"resuming {cfg.out} at chunk {start} of {store.n_chunks} on {ranks.world} ranks")
        store.before_commit = lease.check
        with location.storage_errors(cfg.out, "writing"):
            store.commit(start, device=str(model.device))
        return store

    store = ranks.agree(create, only_root=True)
    opened = ranks.agree(lambda: None if ranks.is_root else ActivationStore.open(cfg.out, "r+"))
    store = store if ranks.is_root else opened

    t_loop = time.time()
    done = _rounds(store, model, windows, cfg, ranks, start, progress)
    def finish() -> None:  # rank 0: the summary statistics, the fingerprint, the store marked complete
        with location.storage_errors(cfg.out, "finishing"):
            store.finalize()
        _check_ran_out(store, cfg)

    ranks.agree(finish, only_root=True)
    final = store if ranks.is_root else ActivationStore.open(cfg.out, "r")
    return _result(final, cfg, t_start, done, time.time() - t_loop, start)


def raise_user(msg: str) -> None:
    raise UserError(msg)


def _rounds(store: ActivationStore, model: HookedModel, windows, cfg: HarvestConfig, ranks: Ranks, start: int,
            progress: bool) -> int:
    """The rounds of chunks; returns the tokens computed by all ranks together."""
    m = store.manifest
    hooks = m.hook_names
    n_chunks, ctx, world = m.n_chunks, m.context_size, ranks.world
    clamped = {h: int(n) for h, n in m.n_clamped.items()}  # rank 0: the running total, in chunk order
    written: dict[int, list[int]] = {}  # rank 0: chunk -> values clamped per hook, once written
    committed = start
    done = 0
    reports: list[int] = []  # this rank's chunks written but not yet reported
    own_clamps: dict[int, list[int]] = {}

    def report(writer: ChunkWriter, wait: list[int]) -> list[int]:
        for j in wait:
            writer.wait_written(j)
        reports.extend(wait)
        payload = []
        for _ in range(SLOTS):
            j = reports.pop(0) if reports else -1
            payload += [j] + (own_clamps.pop(j) if j >= 0 else [0] * len(hooks))
        return payload

    def settle(payloads: list[list[int]], writer: ChunkWriter | None) -> None:
        nonlocal committed
        if not ranks.is_root:
            return
        for p in payloads:
            for s in range(SLOTS):
                row = p[s * (1 + len(hooks)):(s + 1) * (1 + len(hooks))]
                if row[0] >= 0:
                    written[row[0]] = row[1:]
        advanced = False
        while committed in written:
            for h, n in zip(hooks, written.pop(committed)):
                if n:
                    clamped[h] = clamped.get(h, 0) + n
            committed += 1
            advanced = True
        if advanced:
            fields = {"n_clamped": ordered_counts(clamped, m)} if m.overflow == "clamp" else {}
            if writer is not None:
                writer.commit(committed, **fields)
            else:
                store.commit(committed, **fields)

    pending: list[int] = []  # this rank's chunks submitted, not yet reported
    writer = ChunkWriter(store, commit=False)
    try:
        with token_bar(m.n_tokens, "harvest", initial=start * m.chunk_sequences * ctx, disable=not progress) as bar:
            for r0 in range(start, n_chunks, world):
                mine = r0 + ranks.rank
                rows_of: dict[int, list] = {}
                short = None
                for j in range(r0, min(r0 + world, n_chunks)):
                    a, b = store.chunk_sequence_range(j)
                    rows = list(itertools.islice(windows, b - a))
                    rows_of[j] = rows
                    if len(rows) < b - a:
                        short = j
                        break
                round_tokens = sum(len(r) for r in rows_of.values()) * ctx

                def work() -> list[int]:
                    submit = []
                    if mine in rows_of and (short is None or mine < short):
                        submit.append(mine)
                    if ranks.is_root and short is not None:
                        a = store.chunk_sequence_range(short)[0]
                        log.info(f"the dataset ran out after {a + len(rows_of[short])} of {m.n_sequences} sequences")
                        writer.truncate(a + len(rows_of[short]))
                        if rows_of[short]:
                            submit.append(short)
                    for j in submit:
                        counts: dict[str, int] = {}
                        tokens = np.stack(rows_of[j])
                        acts = compute_chunk(model, tokens, m, counts, writer, _Quiet())
                        own_clamps[j] = [int(counts.get(h, 0)) for h in hooks]
                        writer.submit(j, tokens, acts)
                    previous = list(pending)
                    pending.clear()
                    pending.extend(submit)
                    return report(writer, previous)

                payload = ranks.agree(work)
                settle(ranks.all_gather(payload), writer)
                bar.update(round_tokens)
                done += round_tokens
                if short is not None:
                    break

            def finish() -> list[int]:
                writer.close()
                last = report(writer, list(pending))
                pending.clear()
                return last

            settle(ranks.all_gather(ranks.agree(finish)), None)
    except BaseException:
        writer.abandon()
        raise
    if ranks.is_root:
        expected = store.n_chunks
        if committed != expected:
            raise_user(f"only {committed} of {expected} chunks of {cfg.out} were written; rerun with --resume")
    return done


class _Quiet:
    """A progress bar that shows nothing (each rank's own batches: rank 0 counts whole rounds)."""

    def update(self, n: int) -> None:
        pass
