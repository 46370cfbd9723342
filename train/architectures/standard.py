"""Standard SAE: ReLU latents with an L1 penalty weighted by decoder row norms."""

from __future__ import annotations

import torch

from .base import SPARSITY_WARMUP_KEY, Option, StepOut, TrainingSAE, mse, register


@register
class StandardSAE(TrainingSAE):
    """ReLU latents with an L1 penalty weighted by decoder row norms (decoder rows are free)."""

    architecture = "standard"
    help = "ReLU latents, L1 penalty weighted by decoder norms"
    keys = (Option("l1_coefficient", "float", 5.0, "weight of the L1 penalty", low=0), SPARSITY_WARMUP_KEY)
    saelens_architecture = "standard"

    def step_loss(self, x, coefficient, dead, aux_on, target=None):
        y = x if target is None else target
        pre = self.encoder_input(x) @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        x_hat = self.add_skip(acts @ self.W_dec + self.b_dec, x)
        rec = mse(x_hat, y)
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = rec + coefficient * self.cfg.l1_coefficient * l1
        active = acts > 0
        return StepOut(loss, {"mse": rec, "l1": l1}, x_hat.detach(), active.any(0), active.sum(-1).float().mean())
