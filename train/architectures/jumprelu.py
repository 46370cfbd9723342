"""JumpReLU SAE (Rajamanoharan et al. 2024)."""

from __future__ import annotations

import torch
from torch import nn

from .base import SPARSITY_WARMUP_KEY, Option, StepOut, TrainingSAE, mse, register


class _JumpReLU(torch.autograd.Function):
    """z * (z > t): exact gradient to z where active; straight-through (rectangle kernel of width
    `bandwidth`) gradient to the threshold t."""

    @staticmethod
    def forward(ctx, z, t, bandwidth):
        ctx.save_for_backward(z, t)
        ctx.bandwidth = bandwidth
        return z * (z > t)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        bw = ctx.bandwidth
        window = ((z - t).abs() < bw / 2).to(g.dtype)
        grad_t = -(t / bw * window * g).sum(0)
        return g * (z > t), grad_t, None


class _Step(torch.autograd.Function):
    """1[z > t] with a straight-through gradient to t only."""

    @staticmethod
    def forward(ctx, z, t, bandwidth):
        ctx.save_for_backward(z, t)
        ctx.bandwidth = bandwidth
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        bw = ctx.bandwidth
        window = ((z - t).abs() < bw / 2).to(g.dtype)
        return None, -(window * g).sum(0) / bw, None


@register
class JumpReLUSAE(TrainingSAE):
    """JumpReLU: latents fire above a learned per-latent threshold; an L0 penalty trained through
    straight-through estimators. Decoder rows stay at unit norm."""

    architecture = "jumprelu"
    help = "learned per-latent thresholds, L0 penalty"
    keys = (Option("l0_coefficient", "float", 1.0, "weight of the L0 penalty", low=0),
            SPARSITY_WARMUP_KEY,
            Option("jumprelu_bandwidth", "float", 0.05, "width of the straight-through kernel", low=0, low_open=True),
            Option("jumprelu_init_threshold", "float", 0.01, "initial threshold of every latent", low=0))
    saelens_architecture = "jumprelu"
    unit_norm_decoder = True

    def init_params(self, device) -> None:
        super().init_params(device)
        self.threshold = nn.Parameter(torch.full((self.cfg.d_sae,), float(self.cfg.jumprelu_init_threshold),
                                                 device=device))

    def step_loss(self, x, coefficient, dead, aux_on, target=None):
        y = x if target is None else target
        pre = self.encoder_input(x) @ self.W_enc + self.b_enc
        bw = float(self.cfg.jumprelu_bandwidth)
        acts = _JumpReLU.apply(pre, self.threshold, bw)
        x_hat = self.add_skip(acts @ self.W_dec + self.b_dec, x)
        rec = mse(x_hat, y)
        l0_soft = _Step.apply(pre, self.threshold, bw).sum(-1).mean()
        loss = rec + coefficient * self.cfg.l0_coefficient * l0_soft
        active = acts.detach() > 0
        return StepOut(loss, {"mse": rec, "l0_penalty": l0_soft}, x_hat.detach(), active.any(0),
                       active.sum(-1).float().mean())

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=0.0)

    def export_state(self, scale, scale_out=None):
        arch, extra, st = super().export_state(scale, scale_out)
        st["threshold"] = self.threshold.detach().clone()
        return arch, extra, st
