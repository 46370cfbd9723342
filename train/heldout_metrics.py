"""Activation metrics of SAEs on the held-out activations of a store (no model): every SAE of a run
sees each chunk once, read and decoded once for all of them.

The metrics and their definitions: common/metrics.py (SAELens's run_evals, on raw activations).
Special-token positions (the store's BOS/EOS/pad ids) are left out unless include_special_tokens."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from ..common.errors import UserError
from ..common.manifest import special_token_ids
from ..common.metrics import Metrics


def iter_rows(store: Any, hook: str, seq_range: tuple[int, int], keep_special: bool,
              max_rows: int = 8192):
    """(activations float32 [rows, d], tokens [rows]) of the sequences [a, b) of a hook, chunk by chunk."""
    a, b = seq_range
    ctx = store.manifest.context_size
    cs = store.manifest.chunk_sequences
    skip = [] if keep_special else special_token_ids(store.manifest.tokenizer)
    for j in range(a // cs, -(-b // cs)):
        s0, s1 = store.chunk_sequence_range(j)
        lo, hi = max(a, s0), min(b, s1)
        if lo >= hi:
            continue
        x = store.read_chunk(hook, j)[(lo - s0) * ctx:(hi - s0) * ctx]
        tok = np.asarray(store.read_tokens(j))[lo - s0:hi - s0].reshape(-1)
        if skip:
            keep = ~np.isin(tok, skip)
            x, tok = x[keep], tok[keep]
        for i in range(0, len(x), max_rows):
            yield torch.from_numpy(np.asarray(x[i:i + max_rows], dtype=np.float32)), tok[i:i + max_rows]


@torch.no_grad()
def heldout_metrics(saes: Mapping[str, Any], store: Any, hook: str, seq_range: tuple[int, int], *,
                    include_special_tokens: bool = False, device: str | torch.device = "cpu",
                    max_rows: int = 8192) -> dict[str, dict[str, Any]]:
    """Metrics of each SAE (name -> SAE with encode/decode) on the stored activations of `hook` for the
    sequences seq_range = (start, stop); returns name -> metrics (see the module docstring)."""
    if hook not in store.manifest.hook_names:
        raise UserError(f"the store {store.url} has no activations of {hook}; it has {', '.join(store.manifest.hook_names)}")
    d = store.manifest.hook(hook).d
    for name, sae in saes.items():
        if int(sae.cfg.d_in) != d:
            raise UserError(f"SAE {name} has d_in {sae.cfg.d_in} but {hook} in {store.url} has width {d}")
    acc = {name: Metrics(int(s.cfg.d_sae)) for name, s in saes.items()}
    n = 0
    for x, _ in iter_rows(store, hook, seq_range, include_special_tokens, max_rows):
        x = x.to(device)
        n += x.shape[0]
        for name, sae in saes.items():
            f = sae.encode(x.to(sae.W_dec.dtype))
            acc[name].update(x, sae.decode(f).float(), f)
    if n == 0:
        raise UserError(f"no tokens to evaluate in sequences {seq_range[0]}:{seq_range[1]} of {store.url}"
                        + ("" if include_special_tokens else " once special tokens are left out"))
    return {name: {**m.result(), "activation_tokens": n} for name, m in acc.items()}


def finite_or_none(v: float) -> float | None:
    return v if isinstance(v, float) and math.isfinite(v) else None
