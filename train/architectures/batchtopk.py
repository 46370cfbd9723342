"""BatchTopK SAE (Bussmann et al. 2024)."""

from __future__ import annotations

import torch

from ...common.errors import UserError
from ..sparse_ops import batch_topk_code
from .base import Option, TrainingSAE, register
from .topk import TopKSAE

# calibration keeps, per batch, this many times k * batch of the largest pre-activations: the global
# cut is exact unless one batch holds more than that share of the global top (then it says so)
CALIBRATION_HEADROOM = 4


@register
class BatchTopKSAE(TopKSAE):
    """BatchTopK: the k * batch largest latents of the whole batch. At inference one threshold on
    every latent replaces the batch top-k, so it exports as a JumpReLU SAE with that threshold.

    The threshold is calibrated after training on fresh tokens (the value above which, on average,
    exactly k latents per token fire), so the exported SAE has the L0 it trained with. The running
    average of the smallest selected value (`topk_threshold`, started at the first batch's value) is
    logged during training and is the fallback when calibration cannot run."""

    architecture = "batchtopk"
    help = "the k × batch largest latents of the batch; exported as JumpReLU with a calibrated threshold"
    keys = (Option("topk_threshold_lr", "float", 0.01, "rate of the running average of the threshold that "
                "metrics.jsonl logs", low=0, low_open=True, high=1),)
    saelens_architecture = "jumprelu"
    needs_calibration = True

    def init_params(self, device) -> None:
        super().init_params(device)
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64, device=device))
        self.inference_threshold: float | None = None

    def _code(self, pre):
        return batch_topk_code(pre, self.cfg.k)

    @torch.no_grad()
    def _after_forward(self, vals) -> None:
        v = vals.detach()
        positive = v > 0
        smallest = torch.where(positive, v, torch.full_like(v, float("inf"))).min().to(torch.float64)
        lr = float(self.cfg.topk_threshold_lr)
        started = self.topk_threshold > 0
        updated = torch.where(started, (1 - lr) * self.topk_threshold + lr * smallest, smallest)
        self.topk_threshold.copy_(torch.where(positive.any(), updated, self.topk_threshold))

    def log_values(self) -> dict[str, float]:
        return {"topk_threshold": float(self.topk_threshold)}

    @torch.no_grad()
    def calibrate(self, batches) -> list[str]:
        """The threshold t such that relu(pre) > t fires k latents per token on average over `batches`."""
        k = int(self.cfg.k)
        kept, n_tokens = [], 0
        for x in batches:
            pre = (self.encoder_input(x) @ self.W_enc + self.b_enc).relu_().reshape(-1)
            n_keep = min(CALIBRATION_HEADROOM * k * x.shape[0], pre.numel())
            kept.append((pre.topk(n_keep, sorted=False).values, n_keep < pre.numel()))
            n_tokens += x.shape[0]
        if not kept:
            raise UserError("no tokens to calibrate the BatchTopK threshold on")
        allv = torch.cat([v for v, _ in kept])
        n = k * n_tokens
        name = f"SAE {self.cfg.name!r}"
        n_positive = int((allv > 0).sum())
        if n_positive < n:
            self.inference_threshold = 0.0
            return [f"{name}: only {n_positive / n_tokens:.1f} latents per token are ever active on the "
                    f"calibration tokens (k = {k}); the exported SAE keeps every positive latent"]
        t = float(allv.topk(n, sorted=False).values.min())
        self.inference_threshold = t
        warnings = []
        if any(cut and float(v.min()) >= t for v, cut in kept):
            warnings.append(f"{name}: one calibration batch holds more than {CALIBRATION_HEADROOM}x its share "
                            "of the active latents; the exported threshold is approximate")
        return warnings

    def export_state(self, scale, scale_out=None):
        arch, extra, st = TrainingSAE.export_state(self, scale, scale_out)
        t = self.inference_threshold if self.inference_threshold is not None else float(self.topk_threshold)
        st["threshold"] = torch.full_like(st["b_enc"], t)
        return arch, extra, st
