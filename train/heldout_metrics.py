"""Activation metrics of SAEs on the held-out activations of a store (no model): every SAE of a run
sees each chunk once, read and decoded once for all of them.

Definitions follow SAELens's run_evals (get_sparsity_and_variance_metrics), on raw activations:
  explained_variance   1 - sum ||x - x_hat||^2 / (sum ||x||^2 - n ||mean x||^2)   (fvu = 1 - that)
  mse                  mean over tokens of ||x - x_hat||^2 (summed over dimensions)
  cossim               mean over tokens of cos(x, x_hat)
  l2_norm_in/out       mean ||x||, mean ||x_hat||;  l2_ratio = mean of ||x_hat|| / ||x||
  relative_reconstruction_bias   mean ||x_hat||^2 / mean <x, x_hat>
  l0                   mean number of latents != 0 per token
  dead_fraction        latents that never fire on these tokens
  dense_fraction       latents that fire on more than 10% of them
  feature_density_histogram   counts of log10(firing rate) in bins (never-firing latents counted apart)
Special-token positions (the store's BOS/EOS/pad ids) are left out unless include_special_tokens.
For a transcoder the target x is the activation of its output hook and x_hat its map of the input
hook's activation at the same token (l2_norm_in is then the norm of the target)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..common.errors import UserError
from ..common.progress import token_bar
from .flags import DENSE_RATE

HIST_EDGES = [float(e) for e in np.arange(-8.0, 0.01, 0.5)]  # log10 firing rate, -8 .. 0


def special_ids(store: Any) -> list[int]:
    """The token ids training leaves out by default: the store tokenizer's BOS, EOS and pad."""
    t = store.manifest.tokenizer
    return sorted({i for i in (t.bos_token_id, t.eos_token_id, t.pad_token_id) if i is not None})


def iter_rows(store: Any, hook: str, seq_range: tuple[int, int], keep_special: bool,
              max_rows: int = 8192, hook_out: str | None = None):
    """(activations float32 [rows, d], tokens [rows]) of the sequences [a, b) of a hook, chunk by chunk;
    with hook_out, ((activations of hook, activations of hook_out), tokens), the same rows of both."""
    a, b = seq_range
    ctx = store.manifest.context_size
    cs = store.manifest.chunk_sequences
    skip = [] if keep_special else special_ids(store)
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


class _Acc:
    def __init__(self, d_sae: int):
        self.sse = 0.0
        self.cos = 0.0
        self.norm_in = 0.0
        self.norm_out = 0.0
        self.ratio = 0.0
        self.out_sq = 0.0
        self.dot = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.float64)


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
    acc = {name: _Acc(int(s.cfg.d_sae)) for name, s in saes.items()}
    sum_x = torch.zeros(d_out, dtype=torch.float64)
    sum_sq = 0.0
    n = 0
    a_, b_ = seq_range
    bar = token_bar((b_ - a_) * store.manifest.context_size, f"eval (activations of {hook})", disable=not progress)
    for x_in, tok in iter_rows(store, hook, seq_range, include_special_tokens, max_rows, hook_out=hook_out):
        if hook_out:
            x_in, x = x_in[0].to(device), x_in[1].to(device)
        else:
            x_in = x = x_in.to(device)
        sum_x += x.sum(0).double().cpu()
        sum_sq += float(x.double().pow(2).sum())
        n += x.shape[0]
        norm_in = x.norm(dim=-1)
        safe_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        for name, sae in saes.items():
            a = acc[name]
            f = sae.encode(x_in.to(sae.W_dec.dtype))
            xh = (sae(x_in.to(sae.W_dec.dtype)) if hook_out else sae.decode(f)).float()
            a.sse += float((x - xh).double().pow(2).sum())
            norm_out = xh.norm(dim=-1)
            a.cos += float(((x * xh).sum(-1) / (norm_in * norm_out)).nan_to_num(0.0).double().sum())
            a.norm_in += float(norm_in.double().sum())
            a.norm_out += float(norm_out.double().sum())
            a.ratio += float((norm_out / safe_in).double().sum())
            a.out_sq += float(norm_out.double().pow(2).sum())
            a.dot += float((x * xh).sum(-1).double().sum())
            active = f != 0
            a.l0 += float(active.sum())
            a.fired += active.sum(0).double().cpu()
        bar.update(len(tok))
    bar.update(max(0, bar.total - bar.n))  # the special-token positions left out count as read
    bar.close()
    if n == 0:
        raise UserError(f"no tokens to evaluate in sequences {seq_range[0]}:{seq_range[1]} of {store.url}"
                        + ("" if include_special_tokens else " once special tokens are left out"))
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    out: dict[str, dict[str, Any]] = {}
    for name, a in acc.items():
        # None: undefined (no variance to explain, no output to compare); a NaN is a computation gone bad
        ev = 1.0 - a.sse / total_var if total_var > 0 else None
        rate = a.fired / n
        out[name] = {
            "explained_variance": ev, "fvu": None if ev is None else 1.0 - ev, "mse": a.sse / n, "cossim": a.cos / n,
            "l2_norm_in": a.norm_in / n, "l2_norm_out": a.norm_out / n, "l2_ratio": a.ratio / n,
            "relative_reconstruction_bias": a.out_sq / a.dot if a.dot else None,
            "l0": a.l0 / n, "dead_fraction": float((a.fired == 0).double().mean()),
            "dense_fraction": float((rate > DENSE_RATE).double().mean()),
            "feature_density_histogram": density_histogram(rate),
            "activation_tokens": n,
            "log10_density": torch.log10(rate + 1e-10).float(),
        }
    return out


def density_histogram(rate: torch.Tensor, edges: Sequence[float] = HIST_EDGES) -> dict[str, Any]:
    """Counts of latents by log10 firing rate in the bins [edges[i], edges[i+1]); rates below the first
    edge land in the first bin; latents that never fired are counted as `never`."""
    r = rate.double()
    fired = r > 0
    logs = torch.log10(r[fired]).clamp(min=edges[0], max=edges[-1] - 1e-9).numpy()
    counts, _ = np.histogram(logs, bins=np.asarray(edges))
    return {"log10_edges": list(edges), "counts": [int(c) for c in counts], "never": int((~fired).sum())}


def finite_or_none(v: float) -> float | None:
    return v if isinstance(v, float) and math.isfinite(v) else None
