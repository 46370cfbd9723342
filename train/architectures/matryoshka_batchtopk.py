"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024)."""

from __future__ import annotations

from ...common.errors import UserError
from ..sparse_ops import sparse_decode
from .base import Option, mse, register
from .batchtopk import BatchTopKSAE


@register
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Nested prefixes of the latents (matryoshka_widths) must each reconstruct x on their own; the
    inner levels' losses are added. Exported like BatchTopK (JumpReLU with a calibrated threshold)."""

    architecture = "matryoshka_batchtopk"
    help = "BatchTopK whose nested prefixes of latents each reconstruct on their own"
    keys = BatchTopKSAE.keys + (
        Option("matryoshka_widths", "int_list", None, "increasing prefix sizes; d_sae is added as the last level",
            low=1, default_text="[d_sae] (one level)"),)

    @classmethod
    def resolve(cls, cfg, d_in, d_out, n_steps):
        warnings = super().resolve(cfg, d_in, d_out, n_steps)
        widths = [int(w) for w in (cfg.matryoshka_widths or [])]
        if not widths or widths[-1] != cfg.d_sae:
            widths.append(cfg.d_sae)
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1:
            raise UserError(f"SAE {cfg.name!r}: matryoshka_widths must increase and stay within d_sae = {cfg.d_sae}; "
                            f"got {cfg.matryoshka_widths}")
        cfg.matryoshka_widths = widths
        return warnings

    def _extra_losses(self, x, cols, vals, offsets, loss, terms):
        widths = self.cfg.matryoshka_widths
        recon = self.b_dec.expand_as(x)
        prev = 0
        for width in widths[:-1]:
            in_level = ((cols >= prev) & (cols < width)).to(vals.dtype)
            recon = recon + sparse_decode(cols, vals * in_level, offsets, self.W_dec)
            level = mse(recon, x)
            terms[f"mse_{width}"] = level
            loss = loss + level
            prev = width
        return loss, terms
