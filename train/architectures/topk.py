"""TopK SAE (Gao et al. 2024)."""

from __future__ import annotations

import math

import torch

from ..sparse_ops import ByLatent, gather_pre, sparse_decode, topk_code
from ...common.sparse_kernels import topk_entries
from .base import StepOut, TrainingSAE, mse, register


@register
class TopKSAE(TrainingSAE):
    """TopK: the k largest latents of each token, ReLU'd, plus the AuxK loss that lets the top `aux_k`
    dead latents reconstruct the residual. Decodes only the active latents (train/sparse_ops.py).

    Subclasses change which latents are active (`_code`) and may add loss terms (`_extra_losses`).

    Initialisation: besides b_dec, the first batch sets the scale of W_enc (`init_b_dec`). With
    W_enc = W_dec^T and unit decoder rows, the k active latents sum to a reconstruction several times
    too long when k is a sizeable fraction of d_in (at k = d_in and 16x expansion about five times: an
    explained variance near -12 at the first step), and Adam, moving each weight by about lr per
    step, needs hundreds of steps at lr 1e-3 to shrink it. The encoder is therefore multiplied by the
    least-squares factor that best matches the first batch's reconstruction to its input; the set of
    active latents does not change (a positive factor keeps the order of the pre-activations, and
    b_enc is zero). Transcoders (an encoder of their own; the first batch here is their output) are
    left as they are."""

    architecture = "topk"
    sparse_decoder = True
    help = "the k largest latents of each token"
    takes_k = True
    uses_auxk = True
    saelens_architecture = "topk"
    unit_norm_decoder = True

    def _code(self, pre):
        """The active entries: (rows, cols, offsets or None, their pre-activations)."""
        rows, cols, values = topk_code(pre, self.cfg.k)
        return rows, cols, None, values

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        super().init_b_dec(sample)
        if self.transcoder:
            return
        _, xc, by, cols, offsets, vals = self._encode_sparse(sample)
        recon = sparse_decode(cols, vals, offsets, self.W_dec, by)
        # <recon, xc> is a sum of relu(p) * p >= 0: the factor is positive unless nothing fired. The sums
        # are taken token by token, then exactly: torch sums a whole matrix in an order that depends on
        # its thread count, and the weights would then too
        num, den = _exact_sum((recon * xc).sum(1)), _exact_sum(recon.pow(2).sum(1))
        if den > 0 and math.isfinite(num / den) and num / den > 0:
            self.W_enc.mul_(num / den)

    def _encode_sparse(self, x):
        xc = self.encoder_input(x).detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc, out=self._pre_buffer(xc.shape[0]))
        rows, cols, offsets, values = self._code(pre)
        flat_cols = cols.reshape(-1)
        values = values.reshape(-1)
        by = ByLatent(rows, flat_cols, pre.shape[1])
        pre_active = gather_pre(values, xc, self.W_enc, self.b_enc, self.input_bias(), by)
        vals = torch.relu(pre_active).reshape(cols.shape)
        return pre, xc, by, cols, offsets, vals

    def _pre_buffer(self, rows: int) -> torch.Tensor:
        """The pre-activations' matrix [rows, d_sae], reused from step to step: on the CPU a fresh one of
        this size (tens of MB) is mapped anew each time, and writing it page by page costs over half as
        much as the encoder's product. It lives for one step (the code's values and the AuxK input are
        taken from it before the next)."""
        shape = (rows, self.W_enc.shape[1])
        buf = self.__dict__.get("_pre")
        if buf is None or buf.shape != shape or buf.device != self.W_enc.device or buf.dtype != self.W_enc.dtype:
            buf = self.__dict__["_pre"] = torch.empty(shape, device=self.W_enc.device, dtype=self.W_enc.dtype)
        return buf

    def _aux_loss(self, x, x_hat, pre, xc, dead):
        """AuxK: the top aux_k dead latents (by pre-activation) reconstruct the residual x - x_hat
        (x: the target, a transcoder's output)."""
        aux_k = min(self.cfg.aux_k, pre.shape[1])
        with torch.no_grad():
            masked = pre.masked_fill(~dead[None, :], float("-inf"))
            _, cols = topk_entries(masked, aux_k)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(aux_k)
        flat_cols = cols.reshape(-1)
        values = pre.reshape(-1).index_select(0, rows * pre.shape[1] + flat_cols)
        by = ByLatent(rows, flat_cols, pre.shape[1])
        vals = torch.relu(gather_pre(values, xc, self.W_enc, self.b_enc, self.input_bias(), by))
        vals = (vals * dead.index_select(0, flat_cols)).reshape(cols.shape)
        recon = sparse_decode(cols, vals, None, self.W_dec, by)
        residual = (x - x_hat).detach()
        n_dead = dead.sum().to(x.dtype)
        scale = torch.clamp(n_dead / aux_k, max=1.0)
        return scale * mse(recon, residual)

    def step_loss(self, x, coefficient, dead, aux_on, target=None):
        y = x if target is None else target
        pre, xc, by, cols, offsets, vals = self._encode_sparse(x)
        x_hat = self.add_skip(sparse_decode(cols, vals, offsets, self.W_dec, by) + self.b_dec, x)
        rec = mse(x_hat, y)
        terms = {"mse": rec}
        loss = rec
        if aux_on:
            aux = self._aux_loss(y, x_hat, pre, xc, dead)
            terms["aux"] = aux
            loss = loss + self.cfg.aux_loss_coefficient * aux
        loss, terms = self._extra_losses(y, cols, vals, offsets, loss, terms)
        positive = (vals.detach() > 0).reshape(-1).to(x.dtype)
        fired = torch.zeros(self.cfg.d_sae, device=x.device).index_add_(0, cols.reshape(-1), positive) > 0
        l0 = positive.sum() / x.shape[0]
        out = StepOut(loss, terms, x_hat.detach(), fired, l0)
        self._after_forward(vals)
        return out

    def _extra_losses(self, x, cols, vals, offsets, loss, terms):
        """Further loss terms; x is what the module reconstructs (a transcoder's target)."""
        return loss, terms

    def _after_forward(self, vals) -> None:
        pass

    def export_state(self, scale, scale_out=None):
        arch, extra, st = super().export_state(scale, scale_out)
        return arch, {**extra, "k": int(self.cfg.k), "rescale_acts_by_decoder_norm": False}, st


def _exact_sum(v: torch.Tensor) -> float:
    """The sum of a vector's values, correctly rounded (the same whatever the order or thread count)."""
    return math.fsum(v.double().cpu().tolist())
