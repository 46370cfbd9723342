"""Train-stage measurements on one store, in one run (ratios, not absolute times, are the point):

  run_loader: the shuffled loader's tokens/s against reading and decoding every chunk in order (the limit);
  run_sweep:  8 TopK SAEs (k in 16, 32, 64, 128 x expansion 8, 16) trained in lockstep against the same
              8 trained one after another by the same code;
  run_fused_encoder: whether one wide encoder product for several SAEs (they share the batch) beats
              one product per SAE, forward and backward.

    python -m benchmarks.bench_train --store acts.zarr --hook blocks.8.hook_resid_pre --tokens 1M
    python -m benchmarks.bench_train            # builds a synthetic d=576 store first

Prints one JSON object: with the sweep, the share of its time the loader alone takes (data_share); on a
GPU also host-to-device GB/s."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from actcache.common.progress import parse_count
from actcache.common.store import ActivationStore
from actcache.train.loader import ActivationLoader
from benchmarks.loader_measures import raw_read_rate, shuffle_quality
from actcache.common.device import pick_device
from actcache.train import train_sweep

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIGS = [{"k": k, "expansion": e} for e in (8, 16) for k in (16, 32, 64, 128)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loader(store_url: str, hook: str, batch_size: int = 4096, window_chunks: int = 8, threads: int = 4,
               device: str | None = None, max_tokens: int | None = None) -> dict:
    """Loader tokens/s (shuffled, normalised float32 batches on the device) vs in-order raw read+decode."""
    store = ActivationStore.open(store_url)
    dev = pick_device(device)
    n_chunks = store.n_committed
    if max_tokens:
        per_chunk = store.manifest.chunk_sequences * store.manifest.context_size
        n_chunks = max(1, min(n_chunks, max_tokens // per_chunk))
    raw_before = raw_read_rate(store, hook, max_chunks=n_chunks)
    n_tokens = raw_before["tokens"]
    n_batches = max(1, n_tokens // batch_size)
    loader = ActivationLoader(store, hook, batch_size, seed=0, window_chunks=window_chunks, threads=threads,
                              device=dev, repeat=True, max_chunks=n_chunks)
    loader.next_batch()  # steady state: the first window's load is start-up latency, not throughput
    _sync(dev)
    t = time.perf_counter()
    for _ in range(n_batches):
        x = loader.next_batch()
    _sync(dev)
    dt = time.perf_counter() - t
    loader.close()
    raw_after = raw_read_rate(store, hook, max_chunks=n_chunks)
    raw = (raw_before["tokens_per_s"] + raw_after["tokens_per_s"]) / 2
    rate = n_batches * batch_size / dt
    d = store.manifest.hook(hook).d
    result = {"device": str(dev), "tokens": n_batches * batch_size, "batch_size": batch_size,
              "window_chunks": window_chunks, "threads": threads, "loader_tokens_per_s": rate,
              "raw_in_order_tokens_per_s": raw, "raw_before": raw_before["tokens_per_s"],
              "raw_after": raw_after["tokens_per_s"], "ratio": rate / raw, "loader_wait_seconds": loader.wait_seconds,
              "loader_seconds": dt, "shape": list(x.shape)}
    if dev.type == "cuda":
        result["h2d_gb_per_s_achieved"] = rate * d * 2 / 1e9
        result["h2d_gb_per_s_pinned_peak"] = _pinned_copy_rate(batch_size, d, dev)
    q = shuffle_quality(ActivationLoader(store, hook, batch_size, seed=0, window_chunks=window_chunks,
                                         threads=threads, device="cpu"), n_batches=min(8, n_batches))
    result["shuffle"] = q
    return result


def _pinned_copy_rate(batch: int, d: int, dev: torch.device, n: int = 50) -> float:
    host = torch.empty((batch, d), dtype=torch.float16, pin_memory=True)
    dst = torch.empty((batch, d), dtype=torch.float16, device=dev)
    dst.copy_(host, non_blocking=True)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        dst.copy_(host, non_blocking=True)
    _sync(dev)
    return n * host.numel() * 2 / (time.perf_counter() - t) / 1e9


def _sweep(hook: str, tokens: int, batch_size: int, configs: list[dict], lr: float) -> dict:
    """The sweep configuration (as train_sweep takes it) of TopK SAEs with the given k and expansion."""
    return {"hook": hook, "tokens": tokens, "batch_tokens": batch_size, "seed": 0, "log_every_steps": 1_000_000,
            "eval_tokens": batch_size, "repeat_epochs": True, "checkpoint_every_tokens": tokens * 10,
            "defaults": {"lr": lr},
            "sae": [{"name": f"topk-k{c['k']}-x{c['expansion']}", "architecture": "topk", "k": c["k"],
                     "expansion": c["expansion"]} for c in configs]}


def run_sweep(store_url: str, hook: str, tokens: int, configs: list[dict] | None = None, batch_size: int = 4096,
              device: str | None = None, lr: float = 2e-4, work: str | None = None) -> dict:
    """Wall time of the training loop: all configs in lockstep vs each config alone, one after another."""
    configs = configs or DEFAULT_CONFIGS
    tmp = Path(work or tempfile.mkdtemp(prefix="bench_train_"))
    try:
        t = time.perf_counter()
        lock = train_sweep(store_url, _sweep(hook, tokens, batch_size, configs, lr), tmp / "lockstep",
                           device=device, progress=False)
        lock_wall = time.perf_counter() - t
        singles, seq_train, seq_wall = [], 0.0, 0.0
        for c in configs:
            t = time.perf_counter()
            s = train_sweep(store_url, _sweep(hook, tokens, batch_size, [c], lr), tmp / f"single-{len(singles)}",
                            device=device, progress=False)
            seq_wall += time.perf_counter() - t
            seq_train += s["train_seconds"]
            singles.append({"name": s["saes"][0]["name"], "train_seconds": s["train_seconds"]})
        loader_only = _loader_only_seconds(store_url, hook, tokens, batch_size, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"device": lock["device"], "tokens": lock["tokens"], "batch_size": batch_size, "n_saes": len(configs),
            "lockstep_train_seconds": lock["train_seconds"], "sequential_train_seconds": seq_train,
            "speedup": seq_train / lock["train_seconds"], "lockstep_wall_seconds": lock_wall,
            "sequential_wall_seconds": seq_wall, "lockstep_tokens_per_s": lock["tokens_per_s"],
            "loader_only_seconds": loader_only,
            "data_share": loader_only / lock["train_seconds"],
            "singles": singles,
            "lockstep_results": [{k: r[k] for k in ("name", "l0", "fvu")} for r in lock["saes"]]}


def _loader_only_seconds(store_url: str, hook: str, tokens: int, batch_size: int, device: str | None) -> float:
    """The data side of the lockstep loop alone: the loader delivering the sweep's batches onto the
    device with no SAE to train. Its share of the loop's time bounds how long training can wait for data."""
    dev = pick_device(device)
    loader = ActivationLoader(store_url, hook, batch_size, seed=0, device=dev, repeat=True)
    try:
        _sync(dev)
        t = time.perf_counter()
        for _ in range(max(1, tokens // batch_size)):
            loader.next_batch()
        _sync(dev)
        return time.perf_counter() - t
    finally:
        loader.close()


def run_fused_encoder(d_in: int = 576, d_sae: int = 4608, n_saes: int = 4, batch_size: int = 4096,
                      device: str | None = None, repeats: int = 5) -> dict:
    """Forward+backward of the encoder products of n same-shape SAEs: one per SAE vs one wide product
    (x @ [W_1 | ... | W_n]; possible because every SAE of a sweep sees the same batch)."""
    dev = pick_device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, d_in, generator=g).to(dev)
    Ws = [torch.randn(d_in, d_sae, generator=g).div_(d_in ** 0.5).to(dev).requires_grad_() for _ in range(n_saes)]
    wide = torch.cat([w.detach() for w in Ws], 1).requires_grad_()
    grad = torch.randn(batch_size, d_sae, generator=g).to(dev)

    def separate():
        for w in Ws:
            (x @ w).backward(grad)

    def fused():
        (x @ wide).backward(grad.repeat(1, n_saes))

    def timed(fn):
        fn()
        _sync(dev)
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(dev)
        return (time.perf_counter() - t) / repeats

    sep, fus = timed(separate), timed(fused)
    return {"device": str(dev), "n_saes": n_saes, "d_in": d_in, "d_sae": d_sae, "batch_size": batch_size,
            "separate_seconds": sep, "fused_seconds": fus, "fused_speedup": sep / fus}


def check_cuda_path(store_url: str, hook: str, batch_size: int = 4096, n_batches: int = 24) -> dict:
    """On a CUDA machine: the pinned/side-stream loader gives exactly the CPU loader's batches, and a short
    lockstep sweep of every architecture trains and exports on the GPU."""
    cpu = ActivationLoader(store_url, hook, batch_size, seed=7, window_chunks=2, device="cpu")
    gpu = ActivationLoader(store_url, hook, batch_size, seed=7, window_chunks=2, device="cuda")
    same = all(torch.equal(cpu.next_batch(), gpu.next_batch().cpu()) for _ in range(n_batches))
    cpu.close()
    gpu.close()
    archs = ["standard", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"]
    sweep = {"hook": hook, "tokens": batch_size * 50, "batch_tokens": batch_size, "log_every_steps": 10,
             "eval_tokens": 8192, "defaults": {"lr": 2e-4, "expansion": 4},
             "sae": [{"name": a, "architecture": a, **({"k": 32} if "topk" in a else {})} for a in archs]}
    tmp = Path(tempfile.mkdtemp(prefix="bench_cuda_"))
    try:
        s = train_sweep(store_url, sweep, tmp / "out", device="cuda", progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"gpu_batches_equal_cpu_batches": same, "sweep_device": s["device"],
            "sweep": [{k: r[k] for k in ("name", "exported_as", "l0", "fvu")} for r in s["saes"]],
            "sweep_tokens_per_s": s["tokens_per_s"]}


def synthetic_store(path: str, tokens: int, d: int = 576, context_size: int = 128) -> str:
    from benchmarks.synthetic import make_store

    if Path(path).exists():
        return path
    n_seq = max(1, tokens // context_size)
    make_store(path, d=d, n_sequences=n_seq, context_size=context_size, chunk_sequences=64, fast_random=True)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="an actcache store (default: a synthetic d=576 store in a temp folder)")
    p.add_argument("--hook", default="blocks.0.hook_resid_pre")
    p.add_argument("--store-tokens", default="512k", help="size of the synthetic store")
    p.add_argument("--tokens", default="64k", help="training tokens per SAE in the sweep comparison")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--parts", default="loader,sweep,fused")
    p.add_argument("--ks", default="16,32,64,128", help="TopK k values of the sweep")
    p.add_argument("--expansions", default="8,16", help="expansion factors of the sweep")
    args = p.parse_args(argv)
    store = args.store or synthetic_store(str(Path(tempfile.gettempdir()) / "actcache_bench_576.zarr"),
                                          parse_count(args.store_tokens))
    parts = args.parts.split(",")
    out: dict = {"store": store, "hook": args.hook, "torch": torch.__version__,
                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "cpu_threads": torch.get_num_threads()}
    if "loader" in parts:
        out["loader"] = run_loader(store, args.hook, args.batch_size, threads=args.threads, device=args.device)
        print(json.dumps(out["loader"]), file=sys.stderr)
    if "sweep" in parts:
        configs = [{"k": int(k), "expansion": int(e)} for e in args.expansions.split(",") for k in args.ks.split(",")]
        out["sweep"] = run_sweep(store, args.hook, parse_count(args.tokens), configs=configs,
                                 batch_size=args.batch_size, device=args.device)
        print(json.dumps(out["sweep"]), file=sys.stderr)
    if "cuda" in parts and torch.cuda.is_available():
        out["cuda_check"] = check_cuda_path(store, args.hook, args.batch_size)
        print(json.dumps(out["cuda_check"]), file=sys.stderr)
    if "fused" in parts:
        out["fused_encoder"] = run_fused_encoder(batch_size=args.batch_size, device=args.device)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
