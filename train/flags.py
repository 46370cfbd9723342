"""Flags for degenerate SAEs: the one rule that the sweep summary, the evaluation table, the feature
browser and `actcache compare` all show (docs/flags.md).

An SAE is flagged when, on the tokens its metrics were measured on:
  dense   more than DENSE_LATENTS (10%) of its latents are dense: each fires on more than
          DENSE_RATE (10%) of the tokens;
  L0      its L0 (mean active latents per token) is above d_in * L0_PER_D_IN (d_in / 4);
  dead    more than DEAD_LATENTS (half) of its latents never fire.
Such an SAE may still reconstruct well (a dense code can), but its latents are not the sparse,
interpretable features the frontier is about: compare it with care."""

from __future__ import annotations

from typing import Any, Mapping

from ..common.metrics import DENSE_RATE  # a latent firing on more than this fraction of tokens is dense

DENSE_LATENTS = 0.1  # flag when more than this fraction of latents is dense
L0_PER_D_IN = 0.25  # flag when L0 > d_in * this
DEAD_LATENTS = 0.5  # flag when more than this fraction of latents never fires


def degenerate_flags(*, l0: float | None = None, d_in: int | None = None, dead_fraction: float | None = None,
                     dense_fraction: float | None = None) -> list[str]:
    """The flags of one SAE's metrics, each a short phrase ('dense: 35% of latents', ...); a metric
    that is None is not judged."""
    out = []
    if dense_fraction is not None and dense_fraction > DENSE_LATENTS:
        out.append(f"dense: {dense_fraction:.0%} of latents fire on >{DENSE_RATE:.0%} of tokens")
    if l0 is not None and d_in and l0 > d_in * L0_PER_D_IN:
        out.append(f"L0 {l0:.1f} > d_in/{round(1 / L0_PER_D_IN)} = {d_in * L0_PER_D_IN:g}")
    if dead_fraction is not None and dead_fraction > DEAD_LATENTS:
        out.append(f"dead: {dead_fraction:.0%} of latents never fire")
    return out


def flags_of(metrics: Mapping[str, Any], d_in: int | None = None) -> list[str]:
    """degenerate_flags of a metrics record as this package writes them: l0, d_in, dead_fraction (or
    dead_fraction_eval) and dense_fraction (or dense_fraction_eval)."""
    def first(*keys: str) -> Any:
        return next((metrics[k] for k in keys if metrics.get(k) is not None), None)

    return degenerate_flags(l0=first("l0"), d_in=d_in or first("d_in"),
                            dead_fraction=first("dead_fraction", "dead_fraction_eval"),
                            dense_fraction=first("dense_fraction", "dense_fraction_eval"))


def short(flags: list[str]) -> str:
    """The flags as a table cell: their first words ('dense, L0'), or '' when none."""
    return ", ".join(f.split(":")[0].split(" ")[0] for f in flags)
