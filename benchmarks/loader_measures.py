"""Measurements of the train loader, through its public interface: the in-order read+decode rate it
cannot beat, and how well its batches mix sequences."""

from __future__ import annotations

import time

import numpy as np
import torch

from actcache.common.store import ActivationStore
from actcache.train.loader import ActivationLoader


def raw_read_rate(store: ActivationStore | str, hook: str, max_chunks: int | None = None) -> dict:
    """Read and decode chunks in order, one after another: the rate a loader cannot beat on one reader."""
    store = ActivationStore.open(store) if isinstance(store, str) else store
    n = store.n_committed if max_chunks is None else min(max_chunks, store.n_committed)
    t = time.perf_counter()
    rows = 0
    for j in range(n):
        rows += store.read_chunk(hook, j).shape[0]
    dt = time.perf_counter() - t
    return {"tokens": rows, "seconds": dt, "tokens_per_s": rows / dt}


def shuffle_quality(loader: ActivationLoader, n_batches: int = 8) -> dict:
    """How well batches mix sequences: the mean fraction of a batch's token pairs that come from the
    same sequence, against that fraction for a uniform shuffle of the whole store (the ideal) and
    for reading in order. A value near the ideal means batches look globally shuffled."""
    ctx = loader.store.manifest.context_size
    n_tokens = loader.store.n_committed * loader.store.manifest.chunk_sequences * ctx
    n_tokens = min(n_tokens, loader.store.manifest.n_tokens)
    fractions = []
    for _ in range(n_batches):
        _, rows = loader.next_batch(return_rows=True)
        _, counts = torch.unique(rows // ctx, return_counts=True)
        b = rows.shape[0]
        same = float((counts * (counts - 1)).sum()) / (b * (b - 1))
        fractions.append(same)
    ideal = (ctx - 1) / max(n_tokens - 1, 1)
    b = loader.batch_size
    in_order = (min(ctx, b) - 1) / max(b - 1, 1)
    mean = float(np.mean(fractions))
    return {"same_sequence_pair_fraction": mean, "ideal_global_shuffle": ideal, "in_order": in_order,
            "ratio_to_ideal": mean / ideal if ideal else float("nan")}
