"""write_features: top contexts of every latent of a run's SAEs, from one pass over a store.

    from actcache.train.features import write_features
    write_features("runs/s1", "runs/s1/features")           # the store named in runs/s1/summary.json

The output folder holds machine-readable JSON (described in the README, "Top contexts and the
feature browser") and, unless site=False, the static feature browser (index.html) beside it."""

from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...common import finite, location, outputs
from ...common.device import pick_device
from ...common.errors import StoreError, UserError, first_line
from ...common.manifest import special_token_ids
from ...common.metrics import density_histogram
from ...common.options import check_values, configurable, option
from ...common.progress import log, token_bar
from ...common.store import ActivationStore
from ...common.sae import SAE
from ..flags import DENSE_RATE, flags_of
from .contexts import LatentAccumulator, LatentStats, logit_effects

FORMAT = outputs.FEATURES_FORMAT
FORMAT_VERSION = 2  # 2: "sequences" is a list of ranges; n_sequences, held_out_range, held_out_sequences, training_sequences; per-SAE dense_fraction and flags
# hooks whose space is the residual stream, where W_dec @ W_U reads as direct logit effects
ModelLoader = Callable[[str, "str | None"], "tuple[torch.Tensor | None, Any]"]
RESIDUAL_HOOKS = re.compile(r"(^|\.)(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_out|hook_attn_out)$")


@configurable
@dataclass
class FeatureOptions:
    """What is kept per latent (write_features(options=...); `actcache features` sets top)."""

    top: int = option(20, "Largest activations kept per latent.", unit="examples", low=1)
    window_before: int = option(12, "Tokens shown before the activating one.", unit="tokens", low=0)
    window_after: int = option(4, "Tokens shown after the activating one.", unit="tokens", low=0)
    n_bins: int = option(32, "Bins of the activation histogram.", unit="bins", low=1)
    n_groups: int = option(8, "Quantile groups of the examples shown besides the top ones.", unit="groups", low=0)
    per_group: int = option(3, "Examples per quantile group.", unit="examples", low=0)
    n_logits: int = option(10, "Logit effects kept each way (promoted, suppressed).", unit="tokens", low=0)
    block: int = option(256, "Latents per data file of the browser.", unit="latents", low=1)
    skip_special_tokens: bool = option(True, "Leave BOS/EOS/pad positions out.")


# ------------------------------------------------------------------------------------ inputs
def find_saes(run: str | Path, names: list[str] | tuple[str, ...] | None = None) -> dict[str, Path]:
    """The SAE folders of a run (sub-folders with a cfg.json), or the run itself when it is one SAE."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist")
    found = {p.name: p for p in outputs.sae_folders(run)}
    if not found:
        raise UserError(f"{run} holds no SAE folder (a folder with {outputs.CFG_FILENAME} and "
                        f"{outputs.WEIGHTS_FILENAME}); pass a training run's --out folder")
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise UserError(f"no SAE named {missing[0]!r} in {run}; it has: {', '.join(found)}")
        found = {n: found[n] for n in names}
    return found


_run_meta = outputs.run_meta


def resolve_store(run: Path, store: str | None, meta: dict[str, Any]) -> ActivationStore:
    if store is None:
        named = meta.get("store")
        if not named:
            raise UserError(f"{run} does not name its store (no run.json or summary.json); pass --store")
        candidates = [named]
        if not location.is_remote(named) and not os.path.isabs(named):  # relative to where training ran
            candidates += [str(run / named), str(run.parent / named)]
        store = next((c for c in candidates if location.exists(c)), named)
    return ActivationStore.open(store)


def _range_of(value: Any) -> tuple[int, int] | None:
    if isinstance(value, dict) and "start_sequence" in value:
        return int(value["start_sequence"]), int(value["stop_sequence"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


@dataclass
class Selection:
    """The sequences a features pass reads: ranges [a, b) in order, and what they are ("all",
    "held-out", "sampled", "held-out, sampled"), with the store's held-out range (None if it has none)."""

    ranges: list[tuple[int, int]]
    what: str
    held_out: tuple[int, int] | None = None

    @property
    def n_sequences(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def held_out_sequences(self) -> int:
        """How many of the chosen sequences lie in the store's held-out range."""
        if self.held_out is None:
            return 0
        h0, h1 = self.held_out
        return sum(max(0, min(b, h1) - max(a, h0)) for a, b in self.ranges)


def sample_evenly(store: ActivationStore, a: int, b: int, n: int) -> list[tuple[int, int]]:
    """About n sequences of [a, b) spread evenly over it, in whole chunks: as few chunks as hold n
    sequences, picked at even spacing from the first chunk to the last, n shared out evenly among them
    (each from the start of its chunk). A chunk is read and decoded whole, so this reads about n
    sequences' worth of data however large the store is (one sequence from each of many chunks would
    decode them all)."""
    if n >= b - a:
        return [(a, b)]
    cs = store.manifest.chunk_sequences
    chunks = list(range(a // cs, -(-b // cs)))
    k = min(len(chunks), -(-n // cs))
    while True:  # one more chunk while the range's ends cut the picked ones short of n
        out = _spread(chunks, k, cs, a, b, n)
        if k == len(chunks) or sum(hi - lo for lo, hi in out) >= n:
            return out
        k += 1


def _spread(chunks: list[int], k: int, cs: int, a: int, b: int, n: int) -> list[tuple[int, int]]:
    picked = sorted(set(np.linspace(0, len(chunks) - 1, k).round().astype(int).tolist()))
    quota = np.diff(np.linspace(0, n, len(picked) + 1).round().astype(int)).tolist()
    out, carry = [], 0
    for i, q in zip(picked, quota):
        lo = max(a, chunks[i] * cs)
        hi = min(b, (chunks[i] + 1) * cs, lo + q + carry)
        carry += q - (hi - lo)  # a chunk cut short by the range's ends passes the rest on
        if hi > lo:
            out.append((lo, hi))
    for j, (lo, hi) in enumerate(out):  # what the last chunks could not hold goes to the room left in others
        more = min(carry, min(b, (lo // cs + 1) * cs) - hi)
        out[j], carry = (lo, hi + more), carry - more
    return out


def choose_sequences(store: ActivationStore, held_out_only: bool, tokens: int | None,
                     meta: dict[str, Any] | None = None) -> Selection:
    """The sequences to read: every committed sequence of the store (training and held-out) by
    default, or only its held-out range (the store's, or the run's own for stores that predate it)
    with held_out_only. tokens bounds them, sampled evenly across that range (sample_evenly)."""
    m = store.manifest
    committed = store.n_committed_sequences
    rng = store.held_out_range()
    if rng is None and meta:
        rng = _range_of(meta.get("held_out"))
    held = (int(rng[0]), min(int(rng[1]), committed)) if rng is not None else None
    a, b, what = 0, committed, "all"
    if held_out_only:
        if held is None:
            log.warning(f"the store {store.url} sets no sequences aside for evaluation; reading all of them")
        else:
            a, b, what = held[0], held[1], "held-out"
    if b <= a:
        raise StoreError(f"{store.url} has no committed sequence in the {what} range [{a}, {b}); "
                         "finish the harvest or read the whole store (leave out --held-out-only)")
    ranges = [(a, b)]
    if tokens is not None:
        if tokens <= 0:
            raise UserError(f"--tokens must be positive, got {tokens}")
        n = -(-tokens // m.context_size)
        if n < b - a:
            ranges = sample_evenly(store, a, b, n)
            what = "sampled" if what == "all" else f"{what}, sampled"
    return Selection(ranges, what, held)


def sae_hook(name: str, sae: SAE, store: ActivationStore) -> str:
    """The store hook an SAE reads, checked against the store's widths."""
    hooks = store.manifest.hooks
    hook = sae.cfg.metadata.get("hook_name")
    if hook is None:
        fits = [h.name for h in hooks if h.d == sae.cfg.d_in]
        if len(fits) != 1:
            raise UserError(f"SAE {name!r} names no hook (cfg.json metadata.hook_name) and the store "
                            f"has {len(fits)} hooks of width {sae.cfg.d_in}")
        return fits[0]
    if hook not in store.manifest.hook_names:
        raise UserError(f"SAE {name!r} reads {hook}, which the store {store.url} lacks; "
                        f"it has: {', '.join(store.manifest.hook_names)}")
    d = store.manifest.hook(hook).d
    if d != sae.cfg.d_in:
        raise UserError(f"SAE {name!r} has d_in {sae.cfg.d_in} but the store's {hook} has width {d}")
    return hook


# ------------------------------------------------------------------------------------ the pass
def special_ids(store: ActivationStore) -> list[int]:
    """The token ids the pass leaves out by default: the store tokenizer's BOS, EOS and pad."""
    return special_token_ids(store.manifest.tokenizer)


@torch.no_grad()
def collect_top_contexts(store: ActivationStore, saes: dict[str, SAE], hooks: dict[str, str],
                         sequences: tuple[int, int] | list[tuple[int, int]], opts: FeatureOptions | None = None,
                         device: str | torch.device = "cpu", progress: bool = False,
                         batch_rows: int | None = None) -> dict[str, LatentStats]:
    """One pass over sequences [a, b) (or a list of such ranges): each chunk's tokens and activations
    are read and decoded once (the next chunk is read while this one is encoded) and every SAE encodes
    them in turn."""
    opts = opts or FeatureOptions()
    dev = torch.device(device)
    ranges = [tuple(sequences)] if isinstance(sequences, tuple) and len(sequences) == 2 and \
        all(isinstance(v, (int, np.integer)) for v in sequences) else [tuple(r) for r in sequences]
    T = store.manifest.context_size
    cs = store.manifest.chunk_sequences
    skip = special_ids(store) if opts.skip_special_tokens else []
    acc = {n: LatentAccumulator(s.cfg.d_sae, opts.top, opts.n_bins, opts.n_groups, opts.per_group, dev)
           for n, s in saes.items()}
    for s in saes.values():
        s.to(dev)
    needed = sorted(set(hooks.values()))
    widest = max(s.cfg.d_sae for s in saes.values())
    rows_per_batch = batch_rows or max(128, min(8192, 2**26 // (4 * widest)))

    def read(part: tuple[int, int, int]) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
        j, lo, hi = part
        s0, _ = store.chunk_sequence_range(j)
        tok = store.read_tokens(j)[lo - s0:hi - s0]
        r0 = (lo - s0) * T
        acts = {h: store.read_chunk(h, j)[r0:r0 + (hi - lo) * T] for h in needed}
        return lo, tok, acts

    # (chunk, first sequence, stop) of each piece of the ranges that lies in one chunk
    chunks = [(j, max(a, j * cs), min(b, (j + 1) * cs)) for a, b in ranges for j in range(a // cs, -(-b // cs))]
    bar = token_bar(sum(b - a for a, b in ranges) * T, "top contexts", disable=not progress)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="actcache-features") as pool:
        pending = [pool.submit(read, j) for j in chunks[:2]]
        for i in range(len(chunks)):
            lo, tok, acts = pending.pop(0).result()
            if i + 2 < len(chunks):
                pending.append(pool.submit(read, chunks[i + 2]))
            flat = tok.reshape(-1)
            rows = np.arange(flat.size, dtype=np.int64)
            if skip:
                rows = rows[~np.isin(flat, skip)]
            token_index = torch.from_numpy(rows + lo * T).to(dev)
            # float16 as stored is what crosses to the device; converted once there for every SAE
            xs = {h: torch.from_numpy(np.ascontiguousarray(x[rows])).to(dev).float() for h, x in acts.items()}
            for r in range(0, rows.size, rows_per_batch):
                t = token_index[r:r + rows_per_batch]
                for name, sae in saes.items():
                    acc[name].update_entries(*sae.encode_entries(xs[hooks[name]][r:r + rows_per_batch]), t)
            bar.update(flat.size)
    bar.close()
    return {n: a_.result() for n, a_ in acc.items()}


def fetch_windows(store: ActivationStore, index: np.ndarray, before: int, after: int) -> np.ndarray:
    """Token ids around each store row in `index` (int64 [n]): [n, before + 1 + after], -1 past the
    ends of the row's sequence. Reads each needed tokens chunk once."""
    T = store.manifest.context_size
    cs = store.manifest.chunk_sequences
    width = before + 1 + after
    out = np.full((index.size, width), -1, dtype=np.int64)
    seq, pos = index // T, index % T
    chunk = seq // cs
    offsets = np.arange(-before, after + 1)
    for j in np.unique(chunk):
        sel = np.nonzero(chunk == j)[0]
        s0, _ = store.chunk_sequence_range(int(j))
        tok = store.read_tokens(int(j))
        p = pos[sel, None] + offsets[None, :]
        ok = (p >= 0) & (p < T)
        rows = np.broadcast_to((seq[sel] - s0)[:, None], p.shape)
        vals = np.where(ok, tok[rows, np.clip(p, 0, T - 1)], -1)
        out[sel] = vals
    return out


# ------------------------------------------------------------------------------------ output
class _Examples:
    """Example records for store rows, built in bulk: windows are read once, trimmed to the sequence."""

    def __init__(self, store: ActivationStore, index: np.ndarray, values: np.ndarray, before: int, after: int):
        self.T = store.manifest.context_size
        self.before = before
        w = np.full((index.size, before + 1 + after), -1, dtype=np.int64)
        used = index >= 0
        if used.any():
            w[used] = fetch_windows(store, index[used], before, after)
        inside = w >= 0
        self.lo = np.argmax(inside, axis=1).tolist()
        self.hi = (w.shape[1] - np.argmax(inside[:, ::-1], axis=1)).tolist()
        self.windows = w.tolist()
        self.index = index.tolist()
        self.values = np.round(values.astype(np.float64), 6).tolist()

    def __call__(self, i: int) -> dict[str, Any]:
        idx, lo = self.index[i], self.lo[i]
        return {"seq": idx // self.T, "pos": idx % self.T, "act": self.values[i],
                "tokens": self.windows[i][lo:self.hi[i]], "at": self.before - lo}


def latent_records(stats: LatentStats, store: ActivationStore, opts: FeatureOptions,
                   logits: tuple[torch.Tensor, ...] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready record per latent (see the README for the fields)."""
    d, k = stats.d_sae, stats.top_val.shape[1]
    G, s, nb = stats.n_groups, stats.sample_key.shape[2], stats.n_bins
    ex = _Examples(store, np.concatenate([stats.top_idx.numpy().reshape(-1), stats.sample_idx.numpy().reshape(-1)]),
                   np.concatenate([stats.top_val.numpy().reshape(-1), stats.sample_val.numpy().reshape(-1)]),
                   opts.window_before, opts.window_after)
    top_ok = (stats.top_idx >= 0).tolist()
    smp_ok = (stats.sample_idx >= 0).tolist()
    group_n = stats.hist.view(d, G, nb // G).sum(-1).tolist()
    count, act_sum, exps = stats.count.tolist(), stats.act_sum.tolist(), stats.hist_exp.tolist()
    hist, top_max = stats.hist.tolist(), stats.top_val[:, 0].tolist()
    if logits is not None:
        pv, pi, nv, ni = (x.tolist() for x in logits)
    n_tok = max(stats.n_tokens, 1)
    records = []
    for i in range(d):
        n = count[i]
        rec: dict[str, Any] = {
            "id": i, "n_fired": n, "density": n / n_tok,
            "mean_act": act_sum[i] / n if n else 0.0, "mean_act_all": act_sum[i] / n_tok,
            "max_act": top_max[i] if n else 0.0, "histogram": None, "top": [], "quantiles": [],
            "top_tokens": [], "logits": None,
        }
        if n:
            M = math.ldexp(1.0, exps[i])
            rec["histogram"] = {"max": M, "counts": hist[i]}
            rec["top"] = [ex(i * k + r) for r in range(k) if top_ok[i][r]]
            for g in reversed(range(G)):
                base = d * k + (i * G + g) * s
                sample = sorted((ex(base + r) for r in range(s) if smp_ok[i][g][r]),
                                key=lambda e: (-e["act"], e["seq"], e["pos"]))
                if sample:
                    rec["quantiles"].append({"lo": M * g / G, "hi": M * (g + 1) / G, "n": group_n[i][g],
                                             "examples": sample})
            toks: dict[int, int] = {}
            for e in rec["top"]:
                t = e["tokens"][e["at"]]
                toks[t] = toks.get(t, 0) + 1
            rec["top_tokens"] = [[t, c] for t, c in sorted(toks.items(), key=lambda tc: -tc[1])[:5]]
        if logits is not None:
            rec["logits"] = {"positive": [[t, round(v, 5)] for t, v in zip(pi[i], pv[i])],
                             "negative": [[t, round(v, 5)] for t, v in zip(ni[i], nv[i])]}
        records.append(rec)
    return records


def _density_histogram(density: np.ndarray) -> dict[str, Any]:
    """Latents by log10 density, in bins of 0.5 from -8 to 0 (common/metrics.py); dead latents counted apart."""
    h = density_histogram(torch.from_numpy(np.asarray(density, dtype=np.float64)))
    return {"log10_edges": h["log10_edges"], "counts": h["counts"], "dead": h["never"]}


def _write_data(path: Path, key: str, obj: Any) -> list[str]:
    """Write path.json, and path.js for the browser (file:// pages cannot fetch JSON; a script can).
    A non-finite number is written as null (JSON has no NaN); returns the key paths of those."""
    text, bad = finite.dumps(obj, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(text)
    path.with_suffix(".js").write_text(f"actcacheData({json.dumps(key)},{text});\n")
    return bad


def _token_strings(ids: set[int], tokenizer: Any) -> dict[str, str]:
    out = {}
    for i in sorted(ids):
        if i < 0:
            continue
        try:
            out[str(i)] = tokenizer.decode([i])
        except Exception:  # a tokenizer that cannot decode one id on its own: show the id
            out[str(i)] = f"#{i}"
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "sae"


def page_folders(names: list[str]) -> dict[str, str]:
    """The browser folder of each SAE name (its characters outside [A-Za-z0-9._-] replaced); two names
    that would share a folder (`a b` and `a_b`, or names differing in case only) are refused."""
    folders: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        folder = _safe_name(name)
        other = seen.get(folder.lower())
        if other is not None:
            raise UserError(f"the SAEs {other!r} and {name!r} would share the browser folder saes/{folder}; "
                            "rename one of the SAE folders, or pick one with --sae")
        seen[folder.lower()] = name
        folders[name] = folder
    return folders


def write_features(run: str | Path, out: str | Path, store: str | None = None, saes: list[str] | None = None,
                   tokens: int | None = None, top: int = 20, held_out_only: bool = False, overwrite: bool = False,
                   unembedding: torch.Tensor | None = None, tokenizer: Any = None,
                   model_loader: ModelLoader | None = None, device: str | None = None, progress: bool = True,
                   site: bool = True, options: FeatureOptions | None = None,
                   held_out: bool | None = None) -> dict[str, Any]:
    """Top contexts, densities, histograms (and logit effects, when the unembedding is known) of every
    SAE of `run`, written under `out`; returns the content of out/features.json. Nothing is left in
    `out` if it fails.

    The tokens read: every committed sequence of the store (what the SAEs trained on and the held-out
    part), special tokens left out as training leaves them out; tokens: at most this many, sampled
    evenly across the store (choose_sequences); held_out_only: only the store's held-out sequences.
    features.json records the ranges read and how many of their tokens were held out. held_out: the
    older name of held_out_only (True: held-out only, False: the whole store), kept for callers of it.

    unembedding: the model's W_U [d_model, d_vocab] (logit effects are W_dec @ W_U), or None;
    tokenizer: anything with decode([id]) -> str, for the token strings of the browser, or None;
    model_loader: called as model_loader(model_spec, tokenizer_spec) -> (W_U or None, tokenizer or None)
    once the inputs are checked, when neither of the two is given (the command line passes one that
    loads the model the store's manifest names, or the SAE's metadata.model_spec)."""
    out = Path(out)
    if held_out is not None:
        held_out_only = bool(held_out)
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    opts = options or FeatureOptions()
    opts.top = top
    check_values(opts, "FeatureOptions")
    run = Path(run)
    folders = find_saes(run, saes)
    meta = _run_meta(run)
    st = resolve_store(run, store, meta)
    page_folders(list(folders))
    outputs.check_destination(out, outputs.FEATURES, inputs=[run, st.url, *folders.values()], replace=overwrite)
    if not overwrite and (out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir())))):
        if outputs.is_features(out) and not out.is_symlink():  # --overwrite would replace it, and only it
            raise UserError(f"{out} exists; pass --overwrite to replace it (only a features output is replaced), "
                            "or choose another --out")
        raise UserError(f"{out} exists and holds no features output; choose another --out (nothing was touched)")
    with outputs.lease(out, "features", takeover=True), outputs.publish(out, outputs.FEATURES, replace=overwrite) as tmp:
        return _write_features(tmp, folders, meta, st, tokens, held_out_only, unembedding, tokenizer, model_loader,
                               device, progress, site, opts)


def _write_features(tmp: Path, folders: dict[str, Path], meta: dict[str, Any], st: ActivationStore,
                    tokens: int | None, held_out_only: bool, unembedding: torch.Tensor | None, tokenizer: Any,
                    model_loader: ModelLoader | None, device: str | None, progress: bool, site: bool,
                    opts: FeatureOptions) -> dict[str, Any]:
    """write_features into the temporary folder `tmp`, which publish() then renames into place."""
    digests = {n: outputs.sae_digest(p) for n, p in folders.items()}
    loaded = {n: SAE.load_from_disk(p) for n, p in folders.items()}
    hooks = {n: sae_hook(n, s, st) for n, s in loaded.items()}
    sel = choose_sequences(st, held_out_only, tokens, meta)
    dev = pick_device(device)
    if model_loader is not None and unembedding is None and tokenizer is None:
        first = next(iter(loaded.values()))
        spec = first.cfg.metadata.get("model_spec") or st.manifest.model.name
        try:
            unembedding, tokenizer = model_loader(spec, st.manifest.tokenizer.name)
        except Exception as e:  # the model is optional here: say why, go on without logit effects
            log.warning(f"no logit effects or token strings: could not load the model {spec!r} ({first_line(e)})")
    log.info(f"top contexts of {len(loaded)} SAEs over {sel.n_sequences} sequences ({sel.what}: "
             f"{describe_ranges(sel.ranges)}) of {st.url} on {dev}")
    t0 = time.perf_counter()
    stats = collect_top_contexts(st, loaded, hooks, sel.ranges, opts, dev, progress)
    seconds = time.perf_counter() - t0

    metrics = {r["name"]: r for r in meta.get("saes", []) if isinstance(r, dict) and "name" in r}
    pages = page_folders(list(loaded))
    non_finite: dict[str, list[str]] = {}
    vocab_ids: set[int] = set()
    entries = []
    for name, sae in loaded.items():
        logits = None
        if unembedding is not None:
            if not RESIDUAL_HOOKS.search(hooks[name]) or unembedding.shape[0] != sae.cfg.d_in:
                log.info(f"no logit effects for {name}: {hooks[name]} is not a residual-stream hook of width "
                         f"{unembedding.shape[0]}")
            else:
                logits = logit_effects(sae.W_dec.detach(), unembedding.to(dev), opts.n_logits)
        recs = latent_records(stats[name], st, opts, logits)
        folder = pages[name]
        base = tmp / outputs.FEATURES_SAES / folder
        bad: list[str] = []
        for i in range(0, len(recs), opts.block):
            bad += _write_data(base / "blocks" / f"{i // opts.block:05d}", f"{folder}/{i // opts.block}",
                               {"sae": name, "start": i, "stop": min(i + opts.block, len(recs)),
                                "latents": recs[i:i + opts.block]})
        for r in recs:
            for e in r["top"] + [x for q in r["quantiles"] for x in q["examples"]]:
                vocab_ids.update(e["tokens"])
            if r["logits"]:
                vocab_ids.update(t for t, _ in r["logits"]["positive"] + r["logits"]["negative"])
        density = np.array([r["density"] for r in recs])
        index = {
            "sae": name, "density": [r["density"] for r in recs], "max_act": [r["max_act"] for r in recs],
            "mean_act": [r["mean_act"] for r in recs],
            "top_token": [r["top_tokens"][0][0] if r["top_tokens"] else None for r in recs],
            "token_latents": _token_index(recs),
        }
        bad += _write_data(base / "latents", f"{folder}/latents", index)
        if bad:
            non_finite[name] = bad
        s = stats[name]
        entries.append({
            "name": name, "folder": f"{outputs.FEATURES_SAES}/{folder}", "sae_path": str(folders[name]),
            "sae_digest": digests[name], "hook": hooks[name], "architecture": sae.cfg.architecture,
            "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "n_blocks": -(-len(recs) // opts.block),
            "l0": float(s.count.sum()) / max(s.n_tokens, 1), "dead_fraction": float((density == 0).mean()),
            "dense_fraction": float((density > DENSE_RATE).mean()),
            "logit_effects": logits is not None, "density_histogram": _density_histogram(density),
            "training_metrics": {k: v for k, v in metrics.get(name, {}).items()
                                 if k in ("l0", "fvu", "explained_variance", "mse", "dead_fraction_eval",
                                          "dense_fraction_eval", "k")},
        })
        entries[-1]["flags"] = flags_of(entries[-1], sae.cfg.d_in)
    vocab = _token_strings(vocab_ids, tokenizer) if tokenizer is not None else None
    if vocab is not None:
        _write_data((tmp / outputs.FEATURES_VOCAB).with_suffix(""), "vocab", vocab)
    n_tokens = next(iter(stats.values())).n_tokens
    summary = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "store": st.url,
        "store_fingerprint": st.manifest.fingerprint, "model": st.manifest.model.name,
        "sequences": [list(r) for r in sel.ranges], "range": sel.what, "n_sequences": sel.n_sequences,
        "held_out_range": list(sel.held_out) if sel.held_out else None,
        "held_out_sequences": sel.held_out_sequences(),
        "training_sequences": sel.n_sequences - sel.held_out_sequences(), "n_tokens": n_tokens,
        "special_tokens_skipped": special_ids(st) if opts.skip_special_tokens else [],
        "top": opts.top, "window": [opts.window_before, opts.window_after], "histogram_bins": opts.n_bins,
        "quantile_groups": opts.n_groups, "per_group": opts.per_group, "block": opts.block,
        "vocab": outputs.FEATURES_VOCAB if vocab is not None else None, "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds else None, "saes": entries,
        "non_finite": non_finite,
    }
    summary, bad = finite.finite_json(summary)
    if bad:
        summary["non_finite"][outputs.FEATURES_FILE] = bad
    _write_data(tmp / "features", "features", summary)
    if site:
        from .browser import write_site

        write_site(tmp, summary)
    return summary


def describe_ranges(ranges: list[tuple[int, int]] | list[list[int]], most: int = 3) -> str:
    """'0:64' or '0:8, 96:104, 192:200 and 5 more ranges' (sequences of the store)."""
    text = ", ".join(f"{a}:{b}" for a, b in ranges[:most])
    return text + (f" and {len(ranges) - most} more ranges" if len(ranges) > most else "")


def _token_index(recs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """token id -> latents whose top examples fire on it, the most frequent first."""
    pairs: dict[int, list[tuple[int, float, int]]] = {}
    for r in recs:
        for t, c in r["top_tokens"]:
            pairs.setdefault(t, []).append((c, r["max_act"], r["id"]))
    return {str(t): [i for _, _, i in sorted(v, key=lambda x: (-x[0], -x[1]))] for t, v in pairs.items()}


def load_features(out: str | Path) -> dict[str, Any]:
    """The features.json of an output folder. Each SAE's entry gets "stale": true (and a warning) when
    the weights in its folder are no longer the ones it measured (or the folder is gone)."""
    p = Path(out) / outputs.FEATURES_FILE
    if not p.is_file():
        raise UserError(f"{out} holds no features.json; run `actcache features` first")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} cannot be read ({first_line(e)}); rerun `actcache features` with --overwrite") from None
    for entry in data.get("saes", []):
        folder = entry.get("sae_path")
        entry["stale"] = not (folder and outputs.is_current(entry, folder))
        if entry["stale"]:
            log.warning(f"the features of {entry.get('name')} in {out} measured other weights than those now in "
                        f"{folder or 'its folder'}: rerun `actcache features` with --overwrite")
    return data
