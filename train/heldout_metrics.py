"""Activation metrics of SAEs on the held-out activations of a store (no model): every SAE of a run
sees each chunk once, read and decoded once for all of them.

The metrics and their definitions: common/metrics.py (SAELens's run_evals, on raw activations).
Special-token positions (the store's BOS/EOS/pad ids) are left out unless include_special_tokens.
For a transcoder the target x is the activation of its output hook and x_hat its map of the input
hook's activation at the same token (l2_norm_in is then the norm of the target)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..common.errors import UserError
from ..common.manifest import special_token_ids
from ..common.metrics import Metrics
from ..common.progress import token_bar


def iter_rows(store: Any, hook: str, seq_range: tuple[int, int], keep_special: bool,
              max_rows: int = 8192, hook_out: str | None = None):
    """(activations float32 [rows, d], tokens [rows]) of the sequences [a, b) of a hook, chunk by chunk;
    with hook_out, ((activations of hook, activations of hook_out), tokens), the same rows of both."""
    a, b = seq_range
    ctx = store.manifest.context_size
    cs = store.manifest.chunk_sequences
    skip = [] if keep_special else special_token_ids(store.manifest.tokenizer)
    hooks = [hook] if hook_out is None else [hook, hook_out]
    for j in range(a // cs, -(-b // cs)):
        s0, s1 = store.chunk_sequence_range(j)
        lo, hi = max(a, s0), min(b, s1)
        if lo >= hi:
            continue
        xs = [store.read_chunk(h, j)[(lo - s0) * ctx:(hi - s0) * ctx] for h in hooks]
        tok = np.asarray(store.read_tokens(j))[lo - s0:hi - s0].reshape(-1)
        if skip:
            keep = ~np.isin(tok, skip)
            xs, tok = [x[keep] for x in xs], tok[keep]
        for i in range(0, len(tok), max_rows):
            rows = [torch.from_numpy(np.asarray(x[i:i + max_rows], dtype=np.float32)) for x in xs]
            yield (rows[0] if hook_out is None else tuple(rows)), tok[i:i + max_rows]


@torch.no_grad()
def heldout_metrics(saes: Mapping[str, Any], store: Any, hook: str, seq_range: tuple[int, int], *,
                    hook_out: str | None = None, include_special_tokens: bool = False,
                    device: str | torch.device = "cpu", max_rows: int = 8192,
                    progress: bool = False) -> dict[str, dict[str, Any]]:
    """Metrics of each SAE (name -> SAE with encode/decode) on the stored activations of `hook` for the
    sequences seq_range = (start, stop); returns name -> metrics (see the module docstring).
    hook_out: the SAEs are transcoders from `hook` to hook_out: each maps the activations of `hook`
    (its forward, skip term included) and is measured against those of hook_out. progress: a bar."""
    hook_out = None if hook_out == hook else hook_out
    for h in [hook] + ([hook_out] if hook_out else []):
        if h not in store.manifest.hook_names:
            raise UserError(f"the store {store.url} has no activations of {h}; it has "
                            f"{', '.join(store.manifest.hook_names)}")
    d = store.manifest.hook(hook).d
    d_out = store.manifest.hook(hook_out).d if hook_out else d
    for name, sae in saes.items():
        if int(sae.cfg.d_in) != d:
            raise UserError(f"SAE {name} has d_in {sae.cfg.d_in} but {hook} in {store.url} has width {d}")
        if hook_out and int(sae.W_dec.shape[-1]) != d_out:
            raise UserError(f"transcoder {name} writes width {sae.W_dec.shape[-1]} but {hook_out} in {store.url} "
                            f"has width {d_out}")
    acc = {name: Metrics(int(s.cfg.d_sae)) for name, s in saes.items()}
    n = 0
    a_, b_ = seq_range
    bar = token_bar((b_ - a_) * store.manifest.context_size, f"eval (activations of {hook})", disable=not progress)
    for x_in, tok in iter_rows(store, hook, seq_range, include_special_tokens, max_rows, hook_out=hook_out):
        if hook_out:
            x_in, x = x_in[0].to(device), x_in[1].to(device)
        else:
            x_in = x = x_in.to(device)
        n += x.shape[0]
        for name, sae in saes.items():
            f = sae.encode(x_in.to(sae.W_dec.dtype))
            xh = (sae(x_in.to(sae.W_dec.dtype)) if hook_out else sae.decode(f)).float()
            acc[name].update(x, xh, f)
        bar.update(len(tok))
    bar.update(max(0, bar.total - bar.n))  # the special-token positions left out count as read
    bar.close()
    if n == 0:
        raise UserError(f"no tokens to evaluate in sequences {seq_range[0]}:{seq_range[1]} of {store.url}"
                        + ("" if include_special_tokens else " once special tokens are left out"))
    return {name: {**m.result(), "activation_tokens": n} for name, m in acc.items()}
