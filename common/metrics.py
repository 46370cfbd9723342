"""Reconstruction and sparsity metrics of an SAE, defined once: the sweep's export, eval's held-out
metrics and analyse all feed batches to a Metrics accumulator.

Definitions follow SAELens's run_evals (get_sparsity_and_variance_metrics), over the n tokens seen,
x the activation (or, for a transcoder, the target it reconstructs), x_hat the reconstruction, f the
latents:
  mse                  mean over tokens of ||x - x_hat||^2 (summed over dimensions)
  explained_variance   1 - sum ||x - x_hat||^2 / (sum ||x||^2 - n ||mean x||^2)   (fvu = 1 - that)
  cossim               mean over tokens of cos(x, x_hat) (0 where either is zero)
  l2_norm_in/out       mean ||x||, mean ||x_hat||;  l2_ratio = mean of ||x_hat|| / ||x||
  relative_reconstruction_bias   mean ||x_hat||^2 / mean <x, x_hat>
  l0                   mean number of latents != 0 per token
  dead_fraction        latents that never fire on these tokens
  dense_fraction       latents that fire on more than 10% of them
  feature_density_histogram   counts of log10(firing rate) in bins (never-firing latents counted apart)
  log10_density        log10(firing rate + 1e-10) per latent (SAELens's sparsity.safetensors)
Per-token terms are computed in the dtype given (float32, or float64 for exact small cases) and
summed in float64."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

DENSE_RATE = 0.1
HIST_EDGES = [float(e) for e in np.arange(-8.0, 0.01, 0.5)]  # log10 firing rate, -8 .. 0


def token_errors(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token [n]: the squared error ||x - x_hat||^2 and cos(x, x_hat) (0 where a norm is zero)."""
    sse = (x - x_hat).pow(2).sum(-1)
    cos = ((x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1))).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return sse, cos


def _sum(t: torch.Tensor) -> float:
    return float(t.double().sum())


class Metrics:
    """Streaming accumulator of the metrics above: update(x, x_hat, latents) per batch of tokens
    [n, d] (latents [n, d_sae], optional: without them there is no L0 or density), then result()."""

    def __init__(self, d_sae: int | None = None):
        self.n = 0
        self.sum_x: torch.Tensor | None = None  # float64 [d], on the CPU
        self.sum_sq = 0.0
        self.sse = 0.0
        self.cos = 0.0
        self.norm_in = 0.0
        self.norm_out = 0.0
        self.ratio = 0.0
        self.out_sq = 0.0
        self.dot = 0.0
        self.l0 = 0.0
        self.fired = None if d_sae is None else torch.zeros(int(d_sae), dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor | None = None,
               active: torch.Tensor | None = None) -> None:
        """active: instead of latents, the latent of each non-zero entry of the batch's code (SAE.forward_entries)."""
        x_hat = x_hat.to(x.dtype)
        sx = x.sum(0).double().cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq += _sum(x.pow(2))
        self.n += int(x.shape[0])
        sse, cos = token_errors(x, x_hat)
        self.sse += _sum(sse)
        self.cos += _sum(cos)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        safe_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        self.norm_in += _sum(norm_in)
        self.norm_out += _sum(norm_out)
        self.ratio += _sum(norm_out / safe_in)
        self.out_sq += _sum(norm_out.pow(2))
        self.dot += _sum((x * x_hat).sum(-1))
        if latents is not None:
            # exact integer counts; torch sums a bool matrix through an int64 copy, several times slower
            self.l0 += float(torch.count_nonzero(latents))
            fired = (latents != 0).sum(0, dtype=torch.int32).double().cpu()
            self.fired = fired if self.fired is None else self.fired + fired
        elif active is not None:
            if self.fired is None:
                raise ValueError("counting active latents needs Metrics(d_sae)")
            self.l0 += float(active.numel())
            fired = torch.bincount(active, minlength=self.fired.numel()).double().cpu()
            self.fired = self.fired + fired

    @property
    def total_variance(self) -> float:
        """sum ||x - mean x||^2 over the tokens seen."""
        if self.sum_x is None:
            return 0.0
        return self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n

    def result(self) -> dict[str, Any]:
        """The metrics (names above; log10_density a float32 tensor) over every token seen; a ratio whose
        denominator is zero is None."""
        n = self.n
        if n == 0:
            raise ValueError("no tokens were given to the metrics")
        var = self.total_variance
        # None: undefined (no variance to explain, no output to compare); a NaN is a computation gone bad
        fvu = self.sse / var if var > 0 else None
        out: dict[str, Any] = {
            "explained_variance": None if fvu is None else 1.0 - fvu, "fvu": fvu, "mse": self.sse / n,
            "cossim": self.cos / n, "l2_norm_in": self.norm_in / n, "l2_norm_out": self.norm_out / n,
            "l2_ratio": self.ratio / n,
            "relative_reconstruction_bias": self.out_sq / self.dot if self.dot else None,
        }
        if self.fired is not None:
            rate = self.fired / n
            out.update({
                "l0": self.l0 / n, "dead_fraction": float((self.fired == 0).double().mean()),
                "dense_fraction": float((rate > DENSE_RATE).double().mean()),
                "feature_density_histogram": density_histogram(rate),
                "log10_density": torch.log10(rate + 1e-10).float(),
            })
        return out


def density_histogram(rate: torch.Tensor, edges: Sequence[float] = HIST_EDGES) -> dict[str, Any]:
    """Counts of latents by log10 firing rate in the bins [edges[i], edges[i+1]); rates below the first
    edge land in the first bin; latents that never fired are counted as `never`."""
    r = rate.double()
    fired = r > 0
    logs = torch.log10(r[fired]).clamp(min=edges[0], max=edges[-1] - 1e-9).numpy()
    counts, _ = np.histogram(logs, bins=np.asarray(edges))
    return {"log10_edges": list(edges), "counts": [int(c) for c in counts], "never": int((~fired).sum())}
