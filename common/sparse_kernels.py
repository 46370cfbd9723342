"""Compiled CPU kernels of TopK SAEs: the k largest pre-activations of every token (on the CPU the
largest single cost of a training step after the encoder's matrix product, and of encoding with a
trained TopK SAE), and the active entries regrouped by latent for the weight gradients.

Top-k: torch.topk on the CPU copies each row into (value, index) pairs and partially sorts them.
Here each row is selected on the bits of its float32 values (keys in the order of the floats): one
pass builds a histogram of the keys' top 11 bits, which names the bucket that holds the k-th largest;
a second pass collects, in column order, the keys of that bucket and above (a few more than k); the
bucket alone is sorted for the exact threshold, and the collected keys above it are written out; ties
at the threshold go to the lowest columns. Compiled with numba (without the GIL) and run on as many
threads as torch uses, each on its own block of rows, from a small thread pool: in a check, numba's
own parallel loops beside torch's thread team made a training step several times slower on 2 cores.
Other devices, dtypes and sizes use torch.topk.

The set of columns is the same as torch.topk's (bar ties); their order within a row is ascending
(torch.topk's, where it is used, are sorted to match).

Grouping by latent: a counting sort (stable: within a latent the entries keep their order), in place
of torch.sort on the CPU."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .pools import kept_pool

_lock = threading.Lock()
_kernels: dict = {}


def _compile() -> dict:
    """The numba kernels, compiled on first use (and cached on disk by numba)."""
    with _lock:
        if not _kernels:
            from numba import njit

            @njit(cache=True, boundscheck=False, nogil=True)
            def select(pre, k, out, values, start, stop):  # pragma: no cover - compiled
                n = pre.shape[1]
                bits = pre.view(np.uint32)
                keys = np.empty(n, np.uint32)
                taken_key = np.empty(n, np.uint32)
                taken_col = np.empty(n, np.int64)
                bucket = np.empty(n, np.uint32)
                hist = np.zeros(2048, np.int32)
                for b in range(start, stop):
                    # keys ordered as the floats (negatives: every bit flipped; positives: the sign bit set),
                    # a histogram of their top 11 bits, and the largest key
                    hist[:] = 0
                    top = np.uint32(0)
                    for j in range(n):
                        u = bits[b, j]
                        key = u ^ (np.uint32(np.int32(u) >> np.int32(31)) | np.uint32(0x80000000))
                        keys[j] = key
                        hist[key >> np.uint32(21)] += 1
                        if key > top:
                            top = key
                    # the bucket that holds the k-th largest key, walking down from the largest key's
                    d = np.int64(top >> np.uint32(21))
                    need = k
                    while hist[d] < need:
                        need -= hist[d]
                        d -= 1
                    # the keys of that bucket and above, in column order: everything above it is taken
                    low = np.uint32(d) << np.uint32(21)
                    high = low | np.uint32(0x1FFFFF)
                    m = 0
                    nb = 0
                    for j in range(n):
                        key = keys[j]
                        if key >= low:
                            taken_key[m] = key
                            taken_col[m] = j
                            m += 1
                            if key <= high:
                                bucket[nb] = key
                                nb += 1
                    # the k-th largest key: the need-th largest of the bucket; of the keys equal to it, the
                    # ones left after the larger keys of the bucket are taken (the lowest columns)
                    srt = np.sort(bucket[:nb])
                    threshold = srt[nb - need]
                    i = nb - 1
                    while srt[i] > threshold:
                        need -= 1
                        i -= 1
                    c = 0
                    for i in range(m):
                        key = taken_key[i]
                        if key > threshold or (key == threshold and need > 0):
                            if key == threshold:
                                need -= 1
                            out[b, c] = taken_col[i]
                            values[b, c] = pre[b, taken_col[i]]
                            c += 1

            @njit(cache=True, boundscheck=False, nogil=True)
            def group(cols, rows, n_groups, order, grouped_rows, offsets):  # pragma: no cover - compiled
                for c in cols:
                    offsets[c + 1] += 1
                for g in range(n_groups):
                    offsets[g + 1] += offsets[g]
                at = offsets[:-1].copy()
                for e in range(cols.shape[0]):
                    c = cols[e]
                    order[at[c]] = e
                    grouped_rows[at[c]] = rows[e]
                    at[c] += 1

            @njit(cache=True, boundscheck=False, nogil=True, fastmath=True)
            def dots(a, rows, b, cols, out, start, stop):  # pragma: no cover - compiled
                d = a.shape[1]
                for e in range(start, stop):
                    r = rows[e]
                    c = cols[e]
                    acc = np.float32(0.0)
                    for i in range(d):
                        acc += a[r, i] * b[c, i]
                    out[e] = acc

            _kernels.update(select=select, group=group, dots=dots)
    return _kernels


def _fast_path(pre: torch.Tensor, k: int) -> bool:
    return (pre.device.type == "cpu" and pre.dtype == torch.float32 and pre.dim() == 2 and 0 < k < pre.shape[1]
            and pre.shape[0] >= 64 and not pre.requires_grad)


def _workers(n: int) -> ThreadPoolExecutor | None:
    """A pool of n - 1 threads (the caller's is the n-th), kept between calls."""
    return kept_pool("topk", n - 1) if n > 1 else None


def topk_entries(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries along the last dimension of `pre` ([rows, n]: (values [rows, k], columns
    int64 [rows, k]), the columns of each row in ascending order; other shapes, devices and dtypes go
    to torch.topk, whose columns are then sorted).

    NaN ranks above every number, as in torch.topk."""
    if not _fast_path(pre, k):
        values, cols = pre.topk(k, dim=-1, sorted=False)
        cols, order = cols.sort(dim=-1)
        return values.gather(-1, order), cols
    a = pre.contiguous().numpy()
    cols = torch.empty((pre.shape[0], k), dtype=torch.int64)
    values = torch.empty((pre.shape[0], k), dtype=pre.dtype)
    _in_blocks(_compile()["select"], a.shape[0], 32, a, k, cols.numpy(), values.numpy())
    return values, cols


def entry_dots(a: torch.Tensor, rows: torch.Tensor, b: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows[e]] . b[cols[e]] for every entry e of a sparse matrix (the gradient of its values
    when it multiplies b and the product's gradient is a); float32 on the CPU, else through torch.

    Compiled: each dot product is summed in vector lanes, in one fixed order whatever the thread count."""
    if not (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.dim() == b.dim() == 2
            and rows.numel() >= 4096 and not torch.is_grad_enabled()):
        return (a.index_select(0, rows) * b.index_select(0, cols)).sum(1)
    out = torch.empty(rows.numel(), dtype=a.dtype)
    _in_blocks(_compile()["dots"], rows.numel(), 1024, a.detach().contiguous().numpy(), rows.contiguous().numpy(),
               b.detach().contiguous().numpy(), cols.contiguous().numpy(), out.numpy())
    return out


def _in_blocks(kernel, n: int, least: int, *args) -> None:
    """kernel(*args, start, stop) over [0, n) in one block per thread torch uses (blocks of at least
    `least`), the caller's thread taking the first."""
    threads = max(1, min(torch.get_num_threads(), n // least))
    pool = _workers(threads)
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)] if pool else []
    kernel(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()


def group_by(cols: torch.Tensor, rows: torch.Tensor, n_groups: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries (flat `cols` in [0, n_groups), `rows`) regrouped by column, stably:
    (order, rows[order], offsets [n_groups]: the first position of each column)."""
    if cols.device.type != "cpu":
        order = torch.sort(cols, stable=True).indices
        counts = torch.bincount(cols, minlength=n_groups)
        return order, rows.index_select(0, order), counts.cumsum(0) - counts
    group = _compile()["group"]
    order = torch.empty_like(cols)
    grouped = torch.empty_like(rows)
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64)
    group(cols.contiguous().numpy(), rows.contiguous().numpy(), n_groups, order.numpy(), grouped.numpy(),
          offsets.numpy())
    return order, grouped, offsets[:-1]
