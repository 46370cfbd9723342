"""Synthetic actcache stores: activations built from a planted sparse dictionary, written through
the real store API in seconds (no model involved). The benchmarks time the loader and the sweep on
them; the tests import them too (tests/synthetic.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
from actcache.common.store import ActivationStore, chunk_stats

BOS_ID = 1
VOCAB = 1000


@dataclass
class Planted:
    """The ground truth of a synthetic store: unit-norm features [n_features, d] and the offset."""

    features: torch.Tensor
    offset: torch.Tensor


def planted_dictionary(d: int, n_features: int, seed: int = 0) -> Planted:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_features, d, generator=g)
    f = f / f.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g) * 0.5
    return Planted(f, offset)


def sample_activations(planted: Planted, n: int, g: torch.Generator, active: float = 4.0,
                       noise: float = 0.01) -> torch.Tensor:
    """n activations, each a sum of about `active` planted features with random magnitudes."""
    n_features, d = planted.features.shape
    p = active / n_features
    on = torch.rand(n, n_features, generator=g) < p
    mags = (0.5 + torch.rand(n, n_features, generator=g) * 1.5) * on
    x = mags @ planted.features + planted.offset + noise * torch.randn(n, d, generator=g)
    return x


def make_store(url, *, d: int = 32, n_features: int = 128, n_sequences: int = 256, context_size: int = 32,
               chunk_sequences: int = 16, hooks: tuple[str, ...] = ("blocks.0.hook_resid_pre",),
               seed: int = 0, active: float = 4.0, bos_norm: float = 0.0, codec: str = "zstd-1",
               fast_random: bool = False) -> tuple[ActivationStore, Planted]:
    """Write a complete store whose activations come from a planted dictionary.

    bos_norm > 0 makes position 0 (a BOS token) an outlier of that norm, as real models do.
    fast_random fills activations with plain Gaussian noise (for timing, where content does not matter)."""
    manifest = Manifest(
        model=ModelInfo(name="synthetic", d_model=d, n_layers=1, n_ctx=context_size),
        tokenizer=TokenizerInfo(name="synthetic", vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_id=2),
        dataset=DatasetInfo(path="synthetic", text_column=None),
        hooks=[HookInfo(h, d) for h in hooks],
        context_size=context_size, prepend_bos=True, seed=seed, n_sequences=n_sequences,
        chunk_sequences=chunk_sequences, codec=codec, batch_size=chunk_sequences,
    )
    store = ActivationStore.create(url, manifest)
    planted = planted_dictionary(d, n_features, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for j in range(manifest.n_chunks):
        a, b = store.chunk_sequence_range(j)
        n_seq = b - a
        tokens = torch.randint(3, VOCAB, (n_seq, context_size), generator=g, dtype=torch.int32)
        tokens[:, 0] = BOS_ID
        acts = {}
        for h in hooks:
            rows = n_seq * context_size
            if fast_random:
                x = torch.randn(rows, d, generator=g)
            else:
                x = sample_activations(planted, rows, g, active=active)
            if bos_norm:
                bos = torch.zeros(d)
                bos[0] = bos_norm
                x.view(n_seq, context_size, d)[:, 0] = bos
            acts[h] = x.to(torch.float16).numpy()
        store.write_chunk(j, tokens.numpy(), acts, {h: chunk_stats(acts[h]) for h in hooks})
        store.commit(j + 1)
    store.finalize()
    return store, planted
