"""Compiled CPU kernels of TopK SAEs: the k largest pre-activations of every token (on the CPU the
largest single cost of a training step after the encoder's matrix product, and of encoding with a
trained TopK SAE), and the active entries regrouped by latent for the weight gradients.

Top-k: torch.topk on the CPU copies each row into (value, index) pairs and partially sorts them.
Here each row is selected by radix select on the bits of its float32 values (keys in the order of
the floats): a pass to build an 11-bit histogram, two more over the few candidates left, and a last
pass that writes out the entries above the threshold; ties at the threshold go to the lowest
columns. Compiled with numba (without the GIL) and run on as many threads as torch uses, each on its
own block of rows, from a small thread pool: in a check, numba's own parallel loops beside torch's
thread team made a training step several times slower on 2 cores. Other devices, dtypes and sizes
use torch.topk.

The set of columns is the same as torch.topk's (bar ties); their order within a row is ascending.

Grouping by latent: a counting sort (stable: within a latent the entries keep their order), in place
of torch.sort on the CPU."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_lock = threading.Lock()
_kernels: dict = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _compile() -> dict:
    """The numba kernels, compiled on first use (and cached on disk by numba)."""
    with _lock:
        if not _kernels:
            from numba import njit

            @njit(cache=True, boundscheck=False, nogil=True)
            def select(pre, k, out, values, start, stop):  # pragma: no cover - compiled
                n = pre.shape[1]
                bits = pre.view(np.uint32)
                for b in range(start, stop):
                    keys = np.empty(n, np.uint32)
                    cand = np.empty(n, np.uint32)
                    hist = np.zeros(2048, np.int32)
                    # keys ordered as the floats: negatives have every bit flipped, positives the sign bit set
                    for j in range(n):
                        u = bits[b, j]
                        key = (u ^ np.uint32(0xFFFFFFFF)) if (u >> np.uint32(31)) else (u | np.uint32(0x80000000))
                        keys[j] = key
                        hist[key >> np.uint32(21)] += 1
                    need = k
                    d = 2047
                    while hist[d] < need:
                        need -= hist[d]
                        d -= 1
                    m = 0
                    top = np.uint32(d)
                    for j in range(n):
                        if (keys[j] >> np.uint32(21)) == top:
                            cand[m] = keys[j]
                            m += 1
                    for shift, width in ((10, 11), (0, 10)):
                        hist[:] = 0
                        mask = np.uint32((1 << width) - 1)
                        for i in range(m):
                            hist[(cand[i] >> np.uint32(shift)) & mask] += 1
                        d = (1 << width) - 1
                        while hist[d] < need:
                            need -= hist[d]
                            d -= 1
                        kept = 0
                        for i in range(m):
                            if ((cand[i] >> np.uint32(shift)) & mask) == np.uint32(d):
                                cand[kept] = cand[i]
                                kept += 1
                        m = kept
                    threshold = cand[0]  # the k-th largest key; `need` of the keys equal to it are taken
                    c = 0
                    for j in range(n):
                        key = keys[j]
                        if key > threshold or (key == threshold and need > 0):
                            if key == threshold:
                                need -= 1
                            out[b, c] = j
                            values[b, c] = pre[b, j]
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

            _kernels.update(select=select, group=group)
    return _kernels


def _fast_path(pre: torch.Tensor, k: int) -> bool:
    return (pre.device.type == "cpu" and pre.dtype == torch.float32 and pre.dim() == 2 and 0 < k < pre.shape[1]
            and pre.shape[0] >= 64 and not pre.requires_grad)


def _workers(n: int) -> ThreadPoolExecutor | None:
    """A pool of n - 1 threads (the caller's is the n-th), kept between calls."""
    global _pool, _pool_size
    if n <= 1:
        return None
    with _lock:
        if _pool is None or _pool_size != n - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(n - 1, thread_name_prefix="actcache-topk"), n - 1
        return _pool


def topk_entries(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries along the last dimension of `pre` ([rows, n]: (values [rows, k], columns
    int64 [rows, k]); other shapes, devices and dtypes go to torch.topk).

    NaN ranks above every number, as in torch.topk."""
    if not _fast_path(pre, k):
        return pre.topk(k, dim=-1, sorted=False)
    select = _compile()["select"]
    a = pre.contiguous().numpy()
    cols = torch.empty((pre.shape[0], k), dtype=torch.int64)
    values = torch.empty((pre.shape[0], k), dtype=pre.dtype)
    o, v = cols.numpy(), values.numpy()
    n_rows = a.shape[0]
    threads = max(1, min(torch.get_num_threads(), n_rows // 32))
    pool = _workers(threads)
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    futures = [pool.submit(select, a, k, o, v, bounds[i], bounds[i + 1]) for i in range(1, threads)] if pool else []
    select(a, k, o, v, bounds[0], bounds[1])
    for f in futures:
        f.result()
    return values, cols


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
