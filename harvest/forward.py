"""The forward passes of one chunk: the float16 activations of its token windows, batch by batch."""

from __future__ import annotations

import numpy as np
import torch

from ..common.errors import OverflowError16
from ..common.manifest import Manifest

from .models import HookedModel
from .writer import ChunkWriter

FLOAT16_MAX = 65504.0


def compute_chunk(model: HookedModel, tokens: np.ndarray, m: Manifest, clamped: dict[str, int],
                  writer: ChunkWriter, bar=None) -> dict[str, np.ndarray]:
    """The float16 activations {hook: [rows * ctx, d]} of one chunk's token windows, in batches of
    m.batch_size that never straddle chunks (so a resumed run, or another rank, repeats them exactly);
    values clamped to float16's range are counted into `clamped`. `bar`, when given, counts the tokens
    of each batch; the writer is asked after each batch whether it failed."""
    ctx, bs = m.context_size, m.batch_size
    acts = {h.name: np.empty((len(tokens) * ctx, h.d), dtype=np.float16) for h in m.hooks}
    for s in range(0, len(tokens), bs):
        batch = torch.from_numpy(tokens[s:s + bs]).to(model.device, torch.long)
        for h, x in model.run(batch, m.hook_names).items():
            x16 = to_float16(x, h, m.overflow, clamped)
            acts[h][s * ctx:s * ctx + x16.shape[0] * ctx] = x16.reshape(-1, x16.shape[-1]).numpy()
        writer.check()
        if bar is not None:
            bar.update(batch.numel())
    return acts


def ordered_counts(counts: dict[str, int], m: Manifest) -> dict[str, int]:
    """Per-hook counts in the manifest's hook order (the manifest's bytes do not depend on which hook
    was clamped first, or on which process counted it)."""
    return {h: int(counts[h]) for h in m.hook_names if counts.get(h)}


def to_float16(x: torch.Tensor, hook: str, overflow: str, clamped: dict[str, int]) -> torch.Tensor:
    """x as float16 on the CPU; values beyond float16's range stop the harvest or are clamped and counted."""
    peak = x.abs().amax()
    if not bool(peak <= FLOAT16_MAX):  # also true for NaN: then look closer
        over = torch.isfinite(x) & (x.abs() > FLOAT16_MAX)
        n = int(over.sum())
        if n:
            if overflow != "clamp":
                big = float(x[over].abs().max())
                raise OverflowError16(
                    f"{n} activations of {hook} are beyond the float16 range (largest magnitude {big:.4g} > "
                    f"{FLOAT16_MAX:.0f}): rerun with --overwrite --overflow clamp to clamp them (recorded in the "
                    "manifest), or harvest another hook")
            x = torch.where(over, x.clamp(-FLOAT16_MAX, FLOAT16_MAX), x)  # infinities stay (counted as non-finite)
            clamped[hook] = clamped.get(hook, 0) + n
    return x.to(torch.float16).cpu()  # convert where x is: half the bytes to copy
