"""Gated SAE (Rajamanoharan et al. 2024)."""

from __future__ import annotations

import torch
from torch import nn

from .base import SPARSITY_WARMUP_KEY, Option, StepOut, TrainingSAE, mse, register


@register
class GatedSAE(TrainingSAE):
    """Gated SAE: a gate path decides which latents fire, a magnitude path (sharing W_enc, rescaled by
    exp(r_mag)) how strongly; L1 on the gate path plus an auxiliary reconstruction from the gate path
    through a frozen decoder. Decoder rows stay at unit norm, as in the paper; otherwise shrinking them
    (with r_mag compensating) would dodge the L1 penalty."""

    architecture = "gated"
    encoder_matrices = 2  # the gate and the magnitude paths
    help = "a gate path picks the latents, a magnitude path sizes them"
    keys = (Option("l1_coefficient", "float", 5.0, "weight of the L1 penalty on the gate path", low=0),
            SPARSITY_WARMUP_KEY)
    saelens_architecture = "gated"
    unit_norm_decoder = True

    def init_params(self, device) -> None:
        d_sae = self.cfg.d_sae
        self.b_gate = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, device=device))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, device=device))

    def step_loss(self, x, coefficient, dead, aux_on):
        pre = (x - self.b_dec) @ self.W_enc
        pi_gate = pre + self.b_gate
        pi_mag = pre * self.r_mag.exp() + self.b_mag
        active = pi_gate > 0
        acts = active * torch.relu(pi_mag)
        x_hat = acts @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        gate = torch.relu(pi_gate)
        l1 = (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
        aux = mse(gate @ self.W_dec.detach() + self.b_dec.detach(), x)
        loss = rec + coefficient * self.cfg.l1_coefficient * l1 + aux
        fired = acts > 0
        return StepOut(loss, {"mse": rec, "l1": l1, "aux": aux}, x_hat.detach(), fired.any(0),
                       fired.sum(-1).float().mean())

    def export_state(self, scale, scale_out=None):
        arch, extra, st = super().export_state(scale, scale_out)
        st.update(b_gate=self.b_gate.detach().clone(), b_mag=self.b_mag.detach().clone(),
                  r_mag=self.r_mag.detach().clone())
        return arch, extra, st
