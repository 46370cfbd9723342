"""Top-activating contexts of every latent, from one streaming pass over a store (no model).

Per latent the accumulator keeps, in memory bounded by d_sae x (top + groups x per_group):
  - the `top` largest activations, ordered by (value descending, token index ascending), so ties go to
    the earlier token; token index = sequence * context_size + position (the store's row);
  - how often it fired (activation > 0) and the sum of its activations;
  - a histogram of its non-zero activations over [0, M) in `n_bins` equal bins, where M is the
    smallest power of two above its largest activation. When a larger activation arrives M doubles
    and pairs of bins merge, so the streamed histogram equals the one computed at the end;
  - quantile examples: the activations fall into `n_groups` equal intervals of [0, M); in each the
    `per_group` events with the smallest (key, token index), key = hash(token index, latent), are kept (bottom-k sampling
    is a uniform sample without replacement, and two samples merge by keeping the smallest keys,
    which is what happens when M doubles). The hash makes the sample a pure function of the data.

Every update works on the non-zero entries of the batch only, and candidates that cannot enter the
top-k or a sample (compared with the current k-th value or key) are dropped before any sorting, so
after the first chunks the bookkeeping is a few bincounts per batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..threads import one_torch_thread

NO_EXP = -(2**40)  # exponent of a latent that has not fired yet
KEY_BITS = 40
KEY_EMPTY = 2**KEY_BITS  # sample key of an empty slot (real keys are below it)
_MASK62 = (1 << 62) - 1
_P1, _P2, _P3 = 0x9E3779B97F4A7C15 & _MASK62, 0xC2B2AE3D27D4EB4F & _MASK62, 0x165667B19E3779F9 & _MASK62


def sample_key(token: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """A pseudo-random integer in [0, 2**40) per (token index, latent); the same on every device."""
    h = (token * _P1 + latent * _P2) & _MASK62
    h = h ^ (h >> 29)
    h = (h * _P3) & _MASK62
    return (h ^ (h >> 32)) >> (62 - KEY_BITS)


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """The permutation that sorts by keys[0], then keys[1], ... (all ascending)."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for k in reversed(keys):
        order = order[torch.sort(k[order], stable=True).indices]
    return order


def _compact(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(ids, return_inverse=True) for ids in [0, n), without sorting."""
    present = torch.bincount(ids, minlength=n) > 0
    return present.nonzero().squeeze(1), torch.cumsum(present, 0)[ids] - 1


def _ranks(segment_sorted: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Position of each element within its run of equal (sorted) segment ids."""
    counts = torch.bincount(segment_sorted, minlength=n_segments)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(segment_sorted.numel(), device=segment_sorted.device) - starts[segment_sorted]


@dataclass
class LatentStats:
    """The finished statistics of one SAE over the pass (CPU tensors)."""

    n_tokens: int
    count: torch.Tensor  # int64 [d_sae]: tokens where the latent fired
    act_sum: torch.Tensor  # float64 [d_sae]
    top_val: torch.Tensor  # float32 [d_sae, top]; -1 where empty
    top_idx: torch.Tensor  # int64 [d_sae, top]; -1 where empty
    hist_exp: torch.Tensor  # int64 [d_sae]: histogram range is [0, 2**hist_exp); NO_EXP if never fired
    hist: torch.Tensor  # int64 [d_sae, n_bins]
    sample_key: torch.Tensor  # int64 [d_sae, n_groups, per_group]; KEY_EMPTY where empty
    sample_val: torch.Tensor  # float32 [d_sae, n_groups, per_group]
    sample_idx: torch.Tensor  # int64 [d_sae, n_groups, per_group]

    @property
    def d_sae(self) -> int:
        return int(self.count.numel())

    @property
    def n_groups(self) -> int:
        return int(self.sample_key.shape[1])

    @property
    def n_bins(self) -> int:
        return int(self.hist.shape[1])


class LatentAccumulator:
    """Streaming per-latent statistics of one SAE; feed it update(f, token_index) batch by batch,
    with token indices increasing across the whole stream."""

    def __init__(self, d_sae: int, top: int = 20, n_bins: int = 32, n_groups: int = 8, per_group: int = 3,
                 device: str | torch.device = "cpu"):
        if n_bins & (n_bins - 1) or n_groups & (n_groups - 1) or n_bins % n_groups:
            raise ValueError("n_bins and n_groups must be powers of two, n_groups dividing n_bins")
        dev = torch.device(device)
        self.d, self.top, self.n_bins, self.n_groups, self.per_group = d_sae, top, n_bins, n_groups, per_group
        self.log2_bins, self.log2_groups = int(math.log2(n_bins)), int(math.log2(n_groups))
        self.n_tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.top_val = torch.full((d_sae, top), -1.0, device=dev)
        self.top_idx = torch.full((d_sae, top), -1, dtype=torch.int64, device=dev)
        self.exp = torch.full((d_sae,), NO_EXP, dtype=torch.int64, device=dev)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.int64, device=dev)
        shape = (d_sae, n_groups, per_group)
        self.s_key = torch.full(shape, KEY_EMPTY, dtype=torch.int64, device=dev)
        self.s_val = torch.full(shape, -1.0, device=dev)
        self.s_idx = torch.full(shape, -1, dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def update(self, f: torch.Tensor, token: torch.Tensor) -> None:
        """f: latent activations [B, d_sae]; token: int64 [B], the store row of each activation."""
        self._one_thread(self._update, f, token)

    @torch.no_grad()
    def update_entries(self, rows: torch.Tensor, lat: torch.Tensor, v: torch.Tensor, token: torch.Tensor) -> None:
        """The same from the batch's positive activations alone (SAE.encode_entries): rows, lat, v [n] in
        row-major order (by row, then latent), as `(f > 0).nonzero()` gives them; token: int64 [B]."""
        self._one_thread(self._update_entries, rows, lat, v, token, None)

    @staticmethod
    def _one_thread(fn, *args) -> None:
        if args[0].device.type != "cpu":
            return fn(*args)
        # on the CPU the bookkeeping is many small operations on the batch's non-zero entries:
        # one thread does them several times faster than a team that must meet at every one
        # (measured: 4-8x on a busy 2-core machine), and leaves the cores to the encoder
        with one_torch_thread():
            fn(*args)

    def _update(self, f: torch.Tensor, token: torch.Tensor) -> None:
        r, lat = (f > 0).nonzero(as_tuple=True)
        self._update_entries(r, lat, f[r, lat], token, f)

    def _update_entries(self, r: torch.Tensor, lat: torch.Tensor, v: torch.Tensor, token: torch.Tensor,
                        f: torch.Tensor | None) -> None:
        """f, where the caller has it: the dense batch, for a shortcut when a batch has many candidates."""
        self.n_tokens += int(token.shape[0])
        if lat.numel() == 0:
            return
        v = v.float()
        t = token[r]
        fired = torch.bincount(lat, minlength=self.d)
        self.count += fired
        self.act_sum += torch.bincount(lat, weights=v.double(), minlength=self.d)

        # the histogram range: the smallest power of two above each latent's largest activation so far
        bmax = torch.zeros(self.d, device=v.device).scatter_reduce_(0, lat, v, "amax")
        e_new = torch.frexp(bmax).exponent.long()  # bmax < 2**e_new
        need = (fired > 0) & (e_new > self.exp)
        if bool(need.any()):
            fresh = need & (self.exp == NO_EXP)
            self.exp[fresh] = e_new[fresh]
            grow = need & ~fresh
            if bool(grow.any()):
                self._rescale(grow.nonzero().squeeze(1), e_new)
        e = self.exp[lat]
        bins = torch.floor(torch.ldexp(v, (self.log2_bins - e).float())).clamp_(0, self.n_bins - 1).long()
        self.hist.view(-1).index_add_(0, lat * self.n_bins + bins, torch.ones_like(bins))

        keep = v > self.top_val[lat, -1]  # strictly: an equal value comes later, so it ranks lower
        if f is not None and int(keep.sum()) > 4 * self.d * self.top and f.shape[0] > self.top:
            # many candidates (the first batches): none below the batch's own k-th value can enter
            kth = f.topk(self.top, dim=0).values[-1]
            keep &= v >= kth[lat]
        if bool(keep.any()):
            self._merge_top(lat[keep], v[keep], t[keep])

        group = bins >> (self.log2_bins - self.log2_groups)
        key = sample_key(t, lat)
        keep = key < self.s_key.view(-1)[(lat * self.n_groups + group) * self.per_group + self.per_group - 1]
        if bool(keep.any()):
            self._merge_samples(lat[keep], group[keep], key[keep], v[keep], t[keep])

    def _merge_top(self, lat: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> None:
        u, inv = _compact(lat, self.d)
        k = self.top
        old_v, old_t = self.top_val[u], self.top_idx[u]
        seg_old = torch.arange(u.numel(), device=u.device).repeat_interleave(k)
        ok = old_v.reshape(-1) > 0
        seg = torch.cat([seg_old[ok], inv])
        val = torch.cat([old_v.reshape(-1)[ok], v])
        idx = torch.cat([old_t.reshape(-1)[ok], t])
        # one stable sort on (segment, value descending): the bits of a non-negative float32 order like
        # its value; equal values keep the order of the concatenation, which is token order (the kept
        # entries of a latent come before the batch's, and the batch's are in row order)
        order = torch.sort((seg << 31) | (0x7FFFFFFF - val.view(torch.int32).long()), stable=True).indices
        seg, val, idx = seg[order], val[order], idx[order]
        rank = _ranks(seg, u.numel())
        sel = rank < k
        new_v = torch.full((u.numel(), k), -1.0, device=u.device)
        new_t = torch.full((u.numel(), k), -1, dtype=torch.int64, device=u.device)
        new_v[seg[sel], rank[sel]] = val[sel]
        new_t[seg[sel], rank[sel]] = idx[sel]
        self.top_val[u], self.top_idx[u] = new_v, new_t

    def _merge_samples(self, lat: torch.Tensor, group: torch.Tensor, key: torch.Tensor, v: torch.Tensor,
                       t: torch.Tensor) -> None:
        G, s = self.n_groups, self.per_group
        cell = lat * G + group
        u, inv = _compact(cell, self.d * G)
        ul, ug = u // G, u % G
        old_k, old_v, old_t = self.s_key[ul, ug], self.s_val[ul, ug], self.s_idx[ul, ug]
        seg_old = torch.arange(u.numel(), device=u.device).repeat_interleave(s)
        ok = old_k.reshape(-1) < KEY_EMPTY
        seg = torch.cat([seg_old[ok], inv])
        kk = torch.cat([old_k.reshape(-1)[ok], key])
        val = torch.cat([old_v.reshape(-1)[ok], v])
        idx = torch.cat([old_t.reshape(-1)[ok], t])
        # by (segment, key); equal keys keep the concatenation's order, which is token order
        if u.numel() < 2 ** (63 - KEY_BITS):
            order = torch.sort((seg << KEY_BITS) | kk, stable=True).indices
        else:
            order = _lexsort([seg, kk])
        seg, kk, val, idx = seg[order], kk[order], val[order], idx[order]
        rank = _ranks(seg, u.numel())
        sel = rank < s
        nk = torch.full((u.numel(), s), KEY_EMPTY, dtype=torch.int64, device=u.device)
        nv = torch.full((u.numel(), s), -1.0, device=u.device)
        nt = torch.full((u.numel(), s), -1, dtype=torch.int64, device=u.device)
        nk[seg[sel], rank[sel]], nv[seg[sel], rank[sel]], nt[seg[sel], rank[sel]] = kk[sel], val[sel], idx[sel]
        self.s_key[ul, ug], self.s_val[ul, ug], self.s_idx[ul, ug] = nk, nv, nt

    def _rescale(self, rows: torch.Tensor, e_new: torch.Tensor) -> None:
        """Widen the histogram range of `rows` to 2**e_new: merge bins and sample groups in aligned blocks."""
        c_all = e_new[rows] - self.exp[rows]
        for c in torch.unique(c_all).tolist():
            sel = rows[c_all == c]
            n = sel.numel()
            fb = 1 << min(c, self.log2_bins)
            h = torch.zeros(n, self.n_bins, dtype=torch.int64, device=sel.device)
            h[:, : self.n_bins // fb] = self.hist[sel].view(n, self.n_bins // fb, fb).sum(-1)
            self.hist[sel] = h
            fg = 1 << min(c, self.log2_groups)
            G, s = self.n_groups, self.per_group
            kk = self.s_key[sel].view(n, G // fg, fg * s)
            vv = self.s_val[sel].view(n, G // fg, fg * s)
            tt = self.s_idx[sel].view(n, G // fg, fg * s)
            # order each merged block by (key, token index); empty slots (KEY_EMPTY, -1) sort last
            o = torch.sort(tt.masked_fill(kk == KEY_EMPTY, 2**62), dim=-1, stable=True).indices
            kk, vv, tt = kk.gather(-1, o), vv.gather(-1, o), tt.gather(-1, o)
            o = torch.sort(kk, dim=-1, stable=True).indices[..., :s]
            nk = torch.full((n, G, s), KEY_EMPTY, dtype=torch.int64, device=sel.device)
            nv = torch.full((n, G, s), -1.0, device=sel.device)
            nt = torch.full((n, G, s), -1, dtype=torch.int64, device=sel.device)
            nk[:, : G // fg], nv[:, : G // fg], nt[:, : G // fg] = kk.gather(-1, o), vv.gather(-1, o), tt.gather(-1, o)
            self.s_key[sel], self.s_val[sel], self.s_idx[sel] = nk, nv, nt
        self.exp[rows] = e_new[rows]

    def result(self) -> LatentStats:
        cpu = lambda x: x.detach().cpu()  # noqa: E731
        return LatentStats(self.n_tokens, cpu(self.count), cpu(self.act_sum), cpu(self.top_val), cpu(self.top_idx),
                           cpu(self.exp), cpu(self.hist), cpu(self.s_key), cpu(self.s_val), cpu(self.s_idx))


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, n: int = 10, block: int = 512
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each latent's decoder row through the unembedding (W_dec @ W_U, no final normalisation):
    (top values, top token ids, bottom values, bottom token ids), each [d_sae, n]; computed in blocks
    of latents so memory stays at block x d_vocab."""
    W_U = W_U.float()
    n = min(n, W_U.shape[1])
    out = ([], [], [], [])
    for i in range(0, W_dec.shape[0], block):
        eff = W_dec[i:i + block].float().to(W_U.device) @ W_U
        hi = eff.topk(n, dim=1)
        lo = eff.topk(n, dim=1, largest=False)
        for lst, x in zip(out, (hi.values, hi.indices, lo.values, lo.indices)):
            lst.append(x.cpu())
    return tuple(torch.cat(x) for x in out)  # type: ignore[return-value]
