"""The SAE architectures, as trained: standard, topk, batchtopk, jumprelu, gated, matryoshka_batchtopk.

Every SAE holds W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in] and its own encoder biases,
trains on normalised activations x, and returns its loss terms from `step_loss`. Initialisation:
decoder rows random at unit norm, W_enc = W_dec^T, b_dec at the geometric median of a sample.
TopK-family SAEs and JumpReLU keep decoder rows at unit norm (the gradient component parallel to each
row is removed before the optimiser step, and rows are renormalised after it); standard and gated
SAEs instead weight their L1 penalty by the decoder row norms. `export_state` folds the normalisation
scale into the weights and returns what SAELens 6 expects for the architecture it loads as."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import SAEConfig
from .sparse_ops import batch_topk_code, gather_pre, sparse_decode, topk_code


@dataclass
class StepOut:
    """One SAE's result on one batch. Tensors stay on the device (no host sync)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    fired: torch.Tensor  # bool [d_sae]: latents active on at least one token of the batch
    l0: torch.Tensor  # mean number of active latents per token
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def geometric_median(x: torch.Tensor, iters: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    x = x.to(torch.float64)
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if torch.allclose(m_new, m, atol=1e-10, rtol=0):
            m = m_new
            break
        m = m_new
    return m.to(torch.float32)


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


class TrainingSAE(nn.Module):
    architecture = "base"
    unit_norm_decoder = False
    export_architecture = "standard"

    def __init__(self, cfg: SAEConfig, generator: torch.Generator, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device))
        self.W_enc = nn.Parameter(W_dec.t().clone().contiguous().to(device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        self.init_params(device)

    def init_params(self, device) -> None:
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, device=device))

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        self.b_dec.copy_(geometric_median(sample).to(self.b_dec.device))

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def step_loss(self, x: torch.Tensor, coefficient: float, dead: torch.Tensor, aux_on: bool) -> StepOut:
        raise NotImplementedError

    # ------------------------------------------------------------------ export
    def export_state(self, scale: float) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(SAELens architecture, extra cfg fields, weights) with x -> scale * x folded in."""
        st = {"W_enc": self.W_enc.detach() * scale, "W_dec": self.W_dec.detach() / scale,
              "b_dec": self.b_dec.detach() / scale}
        if hasattr(self, "b_enc"):
            st["b_enc"] = self.b_enc.detach().clone()
        return self.export_architecture, {}, st


# ---------------------------------------------------------------------- dense ReLU family
class StandardSAE(TrainingSAE):
    """ReLU latents with an L1 penalty weighted by decoder row norms."""

    architecture = "standard"

    def step_loss(self, x, coefficient, dead, aux_on):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        x_hat = acts @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = rec + coefficient * self.cfg.l1_coefficient * l1
        active = acts > 0
        return StepOut(loss, {"mse": rec, "l1": l1}, x_hat.detach(), active.any(0), active.sum(-1).float().mean())


class GatedSAE(TrainingSAE):
    """Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path
    (sharing W_enc, rescaled by exp(r_mag)) how strongly; L1 on the gate path plus an auxiliary
    reconstruction from the gate path through a frozen decoder. Decoder rows stay at unit norm, as in
    the paper; otherwise shrinking them (with r_mag compensating) would dodge the L1 penalty."""

    architecture = "gated"
    export_architecture = "gated"
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

    def export_state(self, scale):
        _, _, st = super().export_state(scale)
        st.update(b_gate=self.b_gate.detach().clone(), b_mag=self.b_mag.detach().clone(),
                  r_mag=self.r_mag.detach().clone())
        return "gated", {}, st


# ---------------------------------------------------------------------- JumpReLU
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


class JumpReLUSAE(TrainingSAE):
    """JumpReLU (Rajamanoharan et al. 2024): latents fire above a learned threshold; an L0 penalty
    trained through straight-through estimators."""

    architecture = "jumprelu"
    export_architecture = "jumprelu"
    unit_norm_decoder = True

    def init_params(self, device) -> None:
        super().init_params(device)
        self.threshold = nn.Parameter(torch.full((self.cfg.d_sae,), float(self.cfg.jumprelu_init_threshold),
                                                 device=device))

    def step_loss(self, x, coefficient, dead, aux_on):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        bw = float(self.cfg.jumprelu_bandwidth)
        acts = _JumpReLU.apply(pre, self.threshold, bw)
        x_hat = acts @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        l0_soft = _Step.apply(pre, self.threshold, bw).sum(-1).mean()
        loss = rec + coefficient * self.cfg.l0_coefficient * l0_soft
        active = acts.detach() > 0
        return StepOut(loss, {"mse": rec, "l0_penalty": l0_soft}, x_hat.detach(), active.any(0),
                       active.sum(-1).float().mean())

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=0.0)

    def export_state(self, scale):
        _, _, st = super().export_state(scale)
        st["threshold"] = self.threshold.detach().clone()
        return "jumprelu", {}, st


# ---------------------------------------------------------------------- TopK family (sparse)
class TopKSAE(TrainingSAE):
    """TopK (Gao et al. 2024): the k largest latents of each token, ReLU'd, plus the AuxK loss that
    lets the top `aux_k` dead latents reconstruct the residual. Decodes only the active latents."""

    architecture = "topk"
    export_architecture = "topk"
    unit_norm_decoder = True

    def _code(self, pre):
        rows, cols = topk_code(pre, self.cfg.k)
        return rows, cols, None

    def _encode_sparse(self, x):
        xc = (x - self.b_dec).detach()
        with torch.no_grad():
            pre = xc @ self.W_enc + self.b_enc
        rows, cols, offsets = self._code(pre)
        flat_cols = cols.reshape(-1)
        values = pre.reshape(-1).index_select(0, rows * pre.shape[1] + flat_cols)
        pre_active = gather_pre(values, xc, self.W_enc, self.b_enc, self.b_dec, rows, flat_cols)
        vals = torch.relu(pre_active).reshape(cols.shape)
        return pre, xc, rows, cols, offsets, vals

    def _aux_loss(self, x, x_hat, pre, xc, dead):
        """AuxK: the top aux_k dead latents (by pre-activation) reconstruct the residual x - x_hat."""
        aux_k = min(self.cfg.aux_k, pre.shape[1])
        with torch.no_grad():
            masked = pre.masked_fill(~dead[None, :], float("-inf"))
            _, cols = masked.topk(aux_k, dim=1, sorted=False)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(aux_k)
        flat_cols = cols.reshape(-1)
        values = pre.reshape(-1).index_select(0, rows * pre.shape[1] + flat_cols)
        vals = torch.relu(gather_pre(values, xc, self.W_enc, self.b_enc, self.b_dec, rows, flat_cols))
        vals = (vals * dead.index_select(0, flat_cols)).reshape(cols.shape)
        recon = sparse_decode(cols, vals, None, self.W_dec)
        residual = (x - x_hat).detach()
        n_dead = dead.sum().to(x.dtype)
        scale = torch.clamp(n_dead / aux_k, max=1.0)
        return scale * mse(recon, residual)

    def step_loss(self, x, coefficient, dead, aux_on):
        pre, xc, rows, cols, offsets, vals = self._encode_sparse(x)
        x_hat = sparse_decode(cols, vals, offsets, self.W_dec) + self.b_dec
        rec = mse(x_hat, x)
        terms = {"mse": rec}
        loss = rec
        if aux_on:
            aux = self._aux_loss(x, x_hat, pre, xc, dead)
            terms["aux"] = aux
            loss = loss + self.cfg.aux_loss_coefficient * aux
        loss, terms = self._extra_losses(x, cols, vals, offsets, loss, terms)
        positive = (vals.detach() > 0).reshape(-1).to(x.dtype)
        fired = torch.zeros(self.cfg.d_sae, device=x.device).index_add_(0, cols.reshape(-1), positive) > 0
        l0 = positive.sum() / x.shape[0]
        out = StepOut(loss, terms, x_hat.detach(), fired, l0)
        self._after_forward(vals)
        return out

    def _extra_losses(self, x, cols, vals, offsets, loss, terms):
        return loss, terms

    def _after_forward(self, vals) -> None:
        pass

    def export_state(self, scale):
        arch, extra, st = super().export_state(scale)
        return "topk", {"k": int(self.cfg.k), "rescale_acts_by_decoder_norm": False}, st


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): the k * batch largest latents of the whole batch; a threshold
    tracked as a running average of the smallest selected value replaces the batch top-k at
    inference, so it exports as a JumpReLU SAE with that threshold on every latent."""

    architecture = "batchtopk"
    export_architecture = "jumprelu"

    def init_params(self, device) -> None:
        super().init_params(device)
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64, device=device))

    def _code(self, pre):
        return batch_topk_code(pre, self.cfg.k)

    @torch.no_grad()
    def _after_forward(self, vals) -> None:
        v = vals.detach()
        positive = v > 0
        smallest = torch.where(positive, v, torch.full_like(v, float("inf"))).min().to(torch.float64)
        lr = float(self.cfg.topk_threshold_lr)
        updated = (1 - lr) * self.topk_threshold + lr * smallest
        self.topk_threshold.copy_(torch.where(positive.any(), updated, self.topk_threshold))

    def export_state(self, scale):
        _, _, st = TrainingSAE.export_state(self, scale)
        st["threshold"] = torch.full_like(st["b_enc"], float(self.topk_threshold))
        return "jumprelu", {}, st


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the latents
    (matryoshka_widths) must each reconstruct x on their own; the inner levels' losses are added."""

    architecture = "matryoshka_batchtopk"

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


ARCHITECTURE_CLASSES: dict[str, type[TrainingSAE]] = {
    "standard": StandardSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
}


def build_sae(cfg: SAEConfig, generator: torch.Generator, device: torch.device | str = "cpu") -> TrainingSAE:
    """A freshly initialised SAE of the configured architecture (b_dec still zero; see init_b_dec)."""
    return ARCHITECTURE_CLASSES[cfg.architecture](cfg, generator, device)
