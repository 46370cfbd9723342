"""Synthetic actcache stores: activations built from a planted sparse dictionary, written through
the real store API in seconds (no model involved). The benchmarks time the loader and the sweep on
them; the tests import them too (tests/synthetic.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
from actcache.common.store import ActivationStore, chunk_stats

BOS_ID = 1
VOCAB = 1000


@dataclass
class Planted:
    """The ground truth of a synthetic store: unit-norm features [n_features, d] and the offset.

    outputs: for a store with planted maps, {output hook: the Planted dictionary its activations are
    written in}; the output's row i uses the same sparse code as its input hook's row i."""

    features: torch.Tensor
    offset: torch.Tensor
    outputs: dict[str, "Planted"] = field(default_factory=dict)


def planted_dictionary(d: int, n_features: int, seed: int = 0) -> Planted:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_features, d, generator=g)
    f = f / f.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g) * 0.5
    return Planted(f, offset)


def sample_codes(n_features: int, n: int, g: torch.Generator, active: float = 4.0) -> torch.Tensor:
    """n sparse codes [n, n_features]: about `active` features on per row, magnitudes in [0.5, 2]."""
    p = active / n_features
    on = torch.rand(n, n_features, generator=g) < p
    return (0.5 + torch.rand(n, n_features, generator=g) * 1.5) * on


def decode_codes(planted: Planted, codes: torch.Tensor, g: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    """Activations from codes: codes @ features + offset + a little Gaussian noise."""
    return codes @ planted.features + planted.offset + noise * torch.randn(codes.shape[0], planted.features.shape[1],
                                                                            generator=g)


def sample_activations(planted: Planted, n: int, g: torch.Generator, active: float = 4.0,
                       noise: float = 0.01) -> torch.Tensor:
    """n activations, each a sum of about `active` planted features with random magnitudes."""
    return decode_codes(planted, sample_codes(planted.features.shape[0], n, g, active), g, noise)


def make_store(url, *, d: int = 32, n_features: int = 128, n_sequences: int = 256, context_size: int = 32,
               chunk_sequences: int = 16, hooks: tuple[str, ...] = ("blocks.0.hook_resid_pre",),
               seed: int = 0, active: float = 4.0, bos_norm: float = 0.0, codec: str = "zstd-1",
               fast_random: bool = False, maps: dict[str, str] | None = None,
               dims: dict[str, int] | None = None, gains: dict[str, float] | None = None
               ) -> tuple[ActivationStore, Planted]:
    """Write a complete store whose activations come from a planted dictionary.

    bos_norm > 0 makes position 0 (a BOS token) an outlier of that norm, as real models do.
    fast_random fills activations with plain Gaussian noise (for timing, where content does not matter).
    maps {output hook: input hook} plants a linear-sparse map: the output hook's row i is the input
    hook's sparse code of row i written in a dictionary of its own (planted.outputs[output hook], width
    dims.get(output hook, d)), so a transcoder from input to output can recover that dictionary.
    dims {hook: width} sets a hook's width (default d); hooks without a map use the first dictionary
    when their width is d, else one of their own. gains {hook: factor} scales a hook's activations
    (the hooks of a real model differ in norm)."""
    maps = dict(maps or {})
    dims = dict(dims or {})
    for out, inp in maps.items():
        if out not in hooks or inp not in hooks or inp in maps or hooks.index(inp) > hooks.index(out):
            raise ValueError(f"map {inp} -> {out}: both must be hooks, the input named first and not itself an output")
    manifest = Manifest(
        model=ModelInfo(name="synthetic", d_model=d, n_layers=1, n_ctx=context_size),
        tokenizer=TokenizerInfo(name="synthetic", vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_id=2),
        dataset=DatasetInfo(path="synthetic", text_column=None),
        hooks=[HookInfo(h, dims.get(h, d)) for h in hooks],
        context_size=context_size, prepend_bos=True, seed=seed, n_sequences=n_sequences,
        chunk_sequences=chunk_sequences, codec=codec, batch_size=chunk_sequences,
    )
    store = ActivationStore.create(url, manifest)
    planted = planted_dictionary(d, n_features, seed)
    dictionaries = {}
    for i, h in enumerate(hooks):
        if h in maps or dims.get(h, d) != d:
            dictionaries[h] = planted_dictionary(dims.get(h, d), n_features, seed + 1000 + i)
    planted.outputs.update({h: dictionaries[h] for h in maps})
    g = torch.Generator().manual_seed(seed + 1)
    for j in range(manifest.n_chunks):
        a, b = store.chunk_sequence_range(j)
        n_seq = b - a
        tokens = torch.randint(3, VOCAB, (n_seq, context_size), generator=g, dtype=torch.int32)
        tokens[:, 0] = BOS_ID
        acts, codes = {}, {}
        for h in hooks:
            rows = n_seq * context_size
            width = dims.get(h, d)
            if fast_random:
                x = torch.randn(rows, width, generator=g)
            elif h in maps:
                x = decode_codes(dictionaries[h], codes[maps[h]], g)
            else:
                codes[h] = sample_codes(n_features, rows, g, active)
                x = decode_codes(dictionaries.get(h, planted), codes[h], g)
            if gains and h in gains:
                x = x * gains[h]
            if bos_norm:
                bos = torch.zeros(width)
                bos[0] = bos_norm
                x.view(n_seq, context_size, width)[:, 0] = bos
            acts[h] = x.to(torch.float16).numpy()
        store.write_chunk(j, tokens.numpy(), acts, {h: chunk_stats(acts[h]) for h in hooks})
        store.commit(j + 1)
    store.finalize()
    return store, planted
