"""Sparse encoder/decoder operations for TopK-style SAEs: only the active latents are decoded, and the
gradients of the encoder and the decoder touch only the active columns, so a step costs one dense
matrix product (the pre-activations) instead of six.

A sparse code is (cols, vals, offsets): the latent index and value of every active entry, grouped by
token in order, with offsets[b] the first entry of token b (the layout of torch's embedding_bag).
Both weight gradients sum, for each latent, over the tokens where it is active: `ByLatent` regroups
the entries by latent once per step, and each gradient is then one embedding_bag over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.sparse_kernels import entry_dots, group_by, topk_entries


class ByLatent:
    """A sparse code's entries regrouped by latent (its transpose): built on first use, in a step's
    backward, and shared by the encoder's and the decoder's gradient.

    rows/cols: the token and the latent of every entry, flat, grouped by token."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, d_sae: int):
        self.rows, self.cols, self.d_sae = rows, cols, d_sae
        self._grouped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._grouped is None:
            # stable: within a latent the tokens stay in order, so every sum is taken in one fixed order
            self._grouped = group_by(self.cols, self.rows, self.d_sae)
        return self._grouped

    def sum_rows(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[d_sae, dense.shape[1]]: for each latent c, the sum over its entries e of weights[e] * dense[rows[e]]
        (Sᵀ @ dense, S the [batch, d_sae] sparse matrix of the entries with these weights)."""
        order, rows, offsets = self._groups()
        return F.embedding_bag(rows, dense, offsets, mode="sum", per_sample_weights=weights.index_select(0, order))


class _GatherPre(torch.autograd.Function):
    """pre[b, c] = (x[b] - b_dec) @ W_enc[:, c] + b_enc[c] for the active entries only.

    The forward returns the already computed values; the backward builds the gradients of W_enc,
    b_enc and b_dec from the active entries alone (a sparse-dense product)."""

    @staticmethod
    def forward(ctx, values, xc, W_enc, b_enc, b_dec, by):  # noqa: D401
        ctx.save_for_backward(xc, W_enc)
        ctx.by = by
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        xc, W_enc = ctx.saved_tensors
        by = ctx.by
        g = grad.reshape(-1)
        grad_b_enc = torch.zeros(by.d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, by.cols, g)
        grad_W_enc = by.sum_rows(g, xc).t()
        # xc = x - b_dec, so b_dec receives minus the sum over tokens of the gradient reaching xc
        # (a transcoder's encoder reads x itself: b_dec is None then)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[4] else None
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


def gather_pre(values: torch.Tensor, xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
               b_dec: torch.Tensor | None, by: ByLatent) -> torch.Tensor:
    """Differentiable pre-activations of the active entries `by` holds (values computed without grad)."""
    return _GatherPre.apply(values, xc, W_enc, b_enc, b_dec, by)


class _SparseDecode(torch.autograd.Function):
    """embedding_bag's sum with per-entry weights, whose weight gradient is summed latent by latent
    (ByLatent) rather than scattered entry by entry."""

    @staticmethod
    def forward(ctx, vals, W_dec, cols, offsets, by):  # noqa: D401
        ctx.save_for_backward(vals, W_dec, cols, offsets)
        ctx.by = by
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, grad):
        vals, W_dec, cols, offsets = ctx.saved_tensors
        grad_vals = grad_W_dec = None
        if ctx.needs_input_grad[0] and grad.device.type == "cpu":
            # each entry's weight gets the dot product of its token's gradient and its latent's row
            grad_vals = entry_dots(grad, ctx.by.rows, W_dec, cols.reshape(-1)).reshape(vals.shape)
        elif ctx.needs_input_grad[0]:
            # the gradient of the entries' weights alone: embedding_bag's own backward, W_dec held fixed
            with torch.enable_grad():
                v = vals.detach().requires_grad_()
                out = F.embedding_bag(cols, W_dec.detach(), offsets, mode="sum", per_sample_weights=v)
                (grad_vals,) = torch.autograd.grad(out, v, grad)
        if ctx.needs_input_grad[1]:
            grad_W_dec = ctx.by.sum_rows(vals.detach().reshape(-1), grad)
        return grad_vals, grad_W_dec, None, None, None


def sparse_decode(cols: torch.Tensor, vals: torch.Tensor, offsets: torch.Tensor | None,
                  W_dec: torch.Tensor, by: ByLatent | None = None) -> torch.Tensor:
    """sum over a token's active entries of vals * W_dec[cols]: [batch, d_in], without b_dec.

    cols/vals are [batch, k] (offsets None) or flat with offsets. With `by` (the same entries by
    latent), W_dec's gradient is summed latent by latent, several times faster on the CPU."""
    if by is None:
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)
    return _SparseDecode.apply(vals, W_dec, cols, offsets, by)


def topk_code(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest pre-activations of every token: (rows [B*k], cols [B, k], their values [B, k])."""
    values, cols = topk_entries(pre, k)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols, values


def batch_topk_code(pre: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k * batch largest positive pre-activations of the whole batch, grouped by token:
    (rows, cols, offsets, their pre-activations), flat and sorted by token."""
    batch, d_sae = pre.shape
    n = min(k * batch, pre.numel())
    flat = pre.relu().reshape(-1).topk(n, sorted=False).indices
    flat = flat.sort().values
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    cols = flat - rows * d_sae
    offsets = torch.searchsorted(rows, torch.arange(batch, device=pre.device))
    return rows, cols, offsets, pre.reshape(-1).index_select(0, flat)
