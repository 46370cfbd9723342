"""The top-context pass against the SAE encoder's own rate (ratios, not absolute times, are the point).

  encode:      every SAE encodes the chosen tokens, already in memory on the device, batch by batch:
               the limit of any pass that must look at every latent of every token;
  bookkeeping: the same plus the per-latent statistics (top-k merge, histogram, quantile samples),
               still from memory: what the bookkeeping costs on top of the encoder;
  pass:        collect_top_contexts as `actcache features` runs it: read and decode each chunk from
               the store (the next one in the background) and encode and keep statistics.
The pass's fraction of the encode rate is what docs/performance.md quotes.

    python -m benchmarks.bench_features                       # a synthetic d=256 store, 2 SAEs of 4096 latents
    python -m benchmarks.bench_features --store acts.zarr --saes runs/s1 --tokens 1M

Prints one JSON object."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actcache.common.progress import parse_count
from actcache.common.store import ActivationStore
from actcache.train.features.api import (
    FeatureOptions, collect_top_contexts, find_saes, sae_hook, special_ids)
from actcache.train.features.contexts import LatentAccumulator
from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.common.device import pick_device
from benchmarks.report import emit_result

ROOT = Path(__file__).resolve().parents[1]

HOOK = "blocks.0.hook_resid_pre"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def synthetic_saes(d: int, d_sae: int, k: int, seed: int = 0) -> dict[str, SAE]:
    """A TopK SAE (L0 = k) and a JumpReLU SAE with random weights: the encoder cost of trained ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for arch in ("topk", "jumprelu"):
        w = {"W_enc": torch.randn(d, d_sae, generator=g) / d**0.5, "b_enc": torch.zeros(d_sae),
             "W_dec": torch.randn(d_sae, d, generator=g) / d**0.5, "b_dec": torch.zeros(d)}
        extra = {"k": k} if arch == "topk" else {}
        if arch == "jumprelu":
            w["threshold"] = torch.full((d_sae,), 2.5)  # about 0.6% of N(0, 1) pre-activations pass
        cfg = SAEConfig(architecture=arch, d_in=d, d_sae=d_sae, metadata=Metadata(hook_name=HOOK), **extra)
        out[f"{arch}-{d_sae}"] = SAE(cfg, w)
    return out


def load_range(store: ActivationStore, hooks: set[str], a: int, b: int, dev: torch.device) -> tuple[dict, torch.Tensor]:
    """The activations of sequences [a, b) without special tokens, in memory on the device as float32."""
    T = store.manifest.context_size
    toks = store.tokens[a:b].reshape(-1)
    rows = np.nonzero(~np.isin(toks, special_ids(store)))[0]
    xs = {h: torch.from_numpy(store.activations(h)[a * T:b * T][rows]).to(dev).float() for h in hooks}
    return xs, torch.from_numpy(rows + a * T).to(dev)


def run(store_url: str, saes: dict[str, SAE], tokens: int, device: str | None = None, top: int = 20,
        repeats: int = 2) -> dict:
    store = ActivationStore.open(store_url)
    dev = pick_device(device)
    hooks = {n: sae_hook(n, s, store) for n, s in saes.items()}
    T = store.manifest.context_size
    a = 0
    b = min(store.n_committed * store.manifest.chunk_sequences, store.manifest.n_sequences, -(-tokens // T))
    opts = FeatureOptions(top=top)
    for s in saes.values():
        s.to(dev)
    xs, tok = load_range(store, set(hooks.values()), a, b, dev)
    n = int(tok.numel())
    widest = max(s.cfg.d_sae for s in saes.values())
    B = max(128, min(8192, 2**26 // (4 * widest)))  # the pass's own batch rows

    def encode_only() -> None:
        for r in range(0, n, B):
            for name, s in saes.items():
                s.encode(xs[hooks[name]][r:r + B])

    def with_bookkeeping() -> None:
        acc = {name: LatentAccumulator(s.cfg.d_sae, top, device=dev) for name, s in saes.items()}
        for r in range(0, n, B):
            for name, s in saes.items():
                acc[name].update(s.encode(xs[hooks[name]][r:r + B]), tok[r:r + B])

    def once(fn) -> float:
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - t

    kinds = {"encode": encode_only, "bookkeeping": with_bookkeeping,
             "pass": lambda: collect_top_contexts(store, saes, hooks, (a, b), opts, dev)}
    best = {k: float("inf") for k in kinds}
    with torch.no_grad():
        encode_only()  # warm-up
        for _ in range(repeats):  # interleaved rounds, best of each: a busy machine hits all three alike
            for k, fn in kinds.items():
                best[k] = min(best[k], once(fn))
    t_enc, t_book, t_pass = best["encode"], best["bookkeeping"], best["pass"]
    return {
        "store": str(store_url), "device": str(dev), "torch_threads": torch.get_num_threads(), "tokens": n,
        "batch_rows": B, "top": top,
        "saes": {name: {"architecture": s.cfg.architecture, "d_in": s.cfg.d_in, "d_sae": s.cfg.d_sae}
                 for name, s in saes.items()},
        "encode_tokens_per_s": n / t_enc, "bookkeeping_tokens_per_s": n / t_book, "pass_tokens_per_s": n / t_pass,
        "bookkeeping_fraction_of_encode": t_enc / t_book, "pass_fraction_of_encode": t_enc / t_pass,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="an existing store (default: build a synthetic one)")
    p.add_argument("--saes", help="a run folder or SAE folder (default: random TopK and JumpReLU SAEs)")
    p.add_argument("--tokens", default="64k")
    p.add_argument("--d", type=int, default=256, help="synthetic store width")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best of each is kept")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    tokens = parse_count(args.tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    try:
        store = args.store
        if store is None:
            from tests.synthetic import make_store

            tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
            store = str(tmp / "s.zarr")
            T = 128
            make_store(store, d=args.d, n_features=4 * args.d, n_sequences=-(-tokens // T), context_size=T,
                       chunk_sequences=max(1, 2**23 // (T * args.d * 2)), active=16.0)
        if args.saes:
            saes = {n: SAE.load_from_disk(f) for n, f in find_saes(args.saes).items()}
        else:
            saes = synthetic_saes(args.d, args.d_sae, args.k)
        result = run(store, saes, tokens, args.device, args.top, args.repeats)
        result["command"] = "python -m benchmarks.bench_features " + " ".join(argv if argv is not None else sys.argv[1:])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    emit_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
