"""Sparse encoder/decoder operations for TopK-style SAEs: only the active latents are decoded, and the
encoder's gradient touches only the active columns, so a step costs one dense matrix product
(the pre-activations) instead of six.

A sparse code is (cols, vals, offsets): the latent index and value of every active entry, grouped by
token in order, with offsets[b] the first entry of token b (the layout of torch's embedding_bag)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherPre(torch.autograd.Function):
    """pre[b, c] = (x[b] - b_dec) @ W_enc[:, c] + b_enc[c] for the active entries only.

    The forward returns the already computed values; the backward builds the gradients of W_enc,
    b_enc and b_dec from the active entries alone (a sparse-dense product)."""

    @staticmethod
    def forward(ctx, values, xc, W_enc, b_enc, b_dec, rows, cols):  # noqa: D401
        ctx.save_for_backward(xc, W_enc, rows, cols)
        ctx.d_sae = W_enc.shape[1]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        xc, W_enc, rows, cols = ctx.saved_tensors
        d_sae, batch = ctx.d_sae, xc.shape[0]
        g = grad.reshape(-1)
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, g)
        sparse = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, batch),
                                         is_coalesced=False, check_invariants=False)
        grad_W_enc = torch.sparse.mm(sparse, xc).t()
        # xc = x - b_dec, so b_dec receives minus the sum over tokens of the gradient reaching xc
        # (a transcoder's encoder reads x itself: b_dec is None then)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[4] else None
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def gather_pre(values: torch.Tensor, xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
               b_dec: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Differentiable pre-activations of the active entries (values computed without grad)."""
    return _GatherPre.apply(values, xc, W_enc, b_enc, b_dec, rows, cols)


def sparse_decode(cols: torch.Tensor, vals: torch.Tensor, offsets: torch.Tensor | None,
                  W_dec: torch.Tensor) -> torch.Tensor:
    """sum over a token's active entries of vals * W_dec[cols]: [batch, d_in], without b_dec.

    cols/vals are [batch, k] (offsets None) or flat with offsets."""
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)


def topk_code(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations of every token: (rows [B*k], cols [B, k])."""
    _, cols = pre.topk(k, dim=1, sorted=False)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols


def batch_topk_code(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k * batch largest positive pre-activations of the whole batch, grouped by token:
    (rows, cols, offsets), flat and sorted by token."""
    batch, d_sae = pre.shape
    n = min(k * batch, pre.numel())
    flat = pre.relu().reshape(-1).topk(n, sorted=False).indices
    flat = flat.sort().values
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    cols = flat - rows * d_sae
    offsets = torch.searchsorted(rows, torch.arange(batch, device=pre.device))
    return rows, cols, offsets
