"""Which codec reads fastest from local disk? The same activations written twice through the real store
API, once with `--codec none` and once with the default `blosc-zstd-5`, then read three ways:

  none, mmap:          ActivationStore.read_chunk memory-maps each chunk file and checks its crc32c
  none, zarr decode:   the same store through zarr's codec chain (bytes + crc32c), mmap turned off
  blosc-zstd-5:        the default, decoded by zarr

For each: the raw in-order read rate (every chunk read, then copied into one float16 buffer, as the
loader does; GB/s of float16 activations), and the training loader's tokens/s (ActivationLoader on the
CPU: threads, shuffle window, float32 batches; first batch excluded), each with the CPU time the
process spent for it (all threads): on a machine shared with other work, CPU time per byte varies
much less than wall-clock rates. The ways take turns within each
round and the best round counts, so bursts of load on a shared machine hit all alike. The stores are
read from the page cache (they were just written): this is the CPU cost of reading, not the disk's.

    python -m benchmarks.bench_codec_read [--tokens 256k] [--d 768] [--rounds 3] [--seconds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from actcache.common.progress import parse_count
from actcache.common.store import ActivationStore
from actcache.train.loader import ActivationLoader
from benchmarks.synthetic import make_store

ROOT = Path(__file__).resolve().parents[1]

HOOK = "blocks.0.hook_resid_pre"
WAYS = [("none, mmap", "none", True), ("none, zarr decode", "none", False), ("blosc-zstd-5", "blosc-zstd-5", True)]


def _open(path: Path, mmap_reads: bool) -> ActivationStore:
    store = ActivationStore.open(path)
    store.mmap_reads = mmap_reads
    return store


def raw_read(store: ActivationStore, hook: str = HOOK) -> tuple[float, float]:
    """(GB/s, CPU seconds per GB) of float16 activations: every committed chunk in order, read and
    copied into one buffer. CPU time counts every thread of the process (blosc's or zarr's too)."""
    d = store.manifest.hook(hook).d
    buf = np.empty((store.chunk_row_range(0)[1], d), dtype=np.float16)
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = 0
    for j in range(store.n_committed):
        x = store.read_chunk(hook, j)
        np.copyto(buf[:x.shape[0]], x)
        nbytes += x.nbytes
    gb = nbytes / 1e9
    return gb / (time.perf_counter() - t0), (time.process_time() - c0) / gb


def loader_rate(store: ActivationStore, batch_size: int, threads: int, window_chunks: int, seconds: float,
                hook: str = HOOK) -> tuple[float, float, float]:
    """(tokens/s, share of the time the consumer waited, CPU seconds per million tokens) of the CPU
    training loader, first batch excluded."""
    with ActivationLoader(store, hook, batch_size, seed=0, window_chunks=window_chunks, threads=threads,
                          device="cpu", repeat=True) as loader:
        loader.next_batch()
        w0, n, t0, c0 = loader.wait_seconds, 0, time.perf_counter(), time.process_time()
        while n < 2 or time.perf_counter() - t0 < seconds:
            loader.next_batch()
            n += 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return n * batch_size / dt, (loader.wait_seconds - w0) / dt, cpu / (n * batch_size / 1e6)


def crc_rate(store: ActivationStore, hook: str = HOOK) -> float:
    """GB/s of google_crc32c over one chunk already in memory (the check the mmap path adds)."""
    import google_crc32c

    x = np.ascontiguousarray(store.read_chunk(hook, 0)).view(np.uint8)
    x.flags.writeable = False
    best = float("inf")
    for _ in range(9):
        t0 = time.perf_counter()
        google_crc32c.value(x)
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def run(root: Path, tokens: int, d: int, context_size: int, chunk_sequences: int, rounds: int, seconds: float,
        batch_size: int, threads: int, window_chunks: int) -> dict:
    n_seq = max(1, tokens // context_size)
    paths = {}
    for codec in ("none", "blosc-zstd-5"):
        paths[codec] = root / f"{codec}.zarr"
        # same seed: the same activations in both stores (Gaussian float16, about as incompressible as real ones)
        make_store(paths[codec], d=d, n_sequences=n_seq, context_size=context_size,
                   chunk_sequences=chunk_sequences, codec=codec, fast_random=True)
    a, b = _open(paths["none"], True), _open(paths["blosc-zstd-5"], True)
    assert a.mapped_chunks(f"activations/{HOOK}") is not None and b.mapped_chunks(f"activations/{HOOK}") is None
    if not np.array_equal(a.read_chunk(HOOK, 0), b.read_chunk(HOOK, 0)):
        raise AssertionError("the two stores do not hold the same activations")
    raw_bytes = a.chunk_row_range(a.n_committed - 1)[1] * d * 2
    sizes = {c: ActivationStore.open(p).nbytes_stored(f"activations/{HOOK}") for c, p in paths.items()}
    inf = float("inf")
    best: dict[str, dict] = {name: {"raw_read_gb_per_s": 0.0, "raw_read_cpu_s_per_gb": inf,
                                    "loader_tokens_per_s": 0.0, "loader_cpu_s_per_mtok": inf} for name, _, _ in WAYS}
    for _ in range(rounds):
        for name, codec, mm in WAYS:
            r = best[name]
            for _ in range(3):  # a raw pass is short: three per round
                gbs, cpu = raw_read(_open(paths[codec], mm))
                r["raw_read_gb_per_s"] = max(r["raw_read_gb_per_s"], gbs)
                r["raw_read_cpu_s_per_gb"] = min(r["raw_read_cpu_s_per_gb"], cpu)
            rate, wait, cpu = loader_rate(_open(paths[codec], mm), batch_size, threads, window_chunks, seconds)
            r["loader_cpu_s_per_mtok"] = min(r["loader_cpu_s_per_mtok"], cpu)
            if rate > r["loader_tokens_per_s"]:
                r["loader_tokens_per_s"], r["loader_wait_fraction"] = rate, wait
    for name, codec, _ in WAYS:
        best[name]["stored_over_raw"] = sizes[codec] / raw_bytes
    base = best["none, zarr decode"]
    for r in best.values():
        r["raw_read_vs_zarr_decode"] = r["raw_read_gb_per_s"] / base["raw_read_gb_per_s"]
        r["loader_vs_zarr_decode"] = r["loader_tokens_per_s"] / base["loader_tokens_per_s"]
    return {"tokens": n_seq * context_size, "d": d, "chunk_tokens": chunk_sequences * context_size,
            "rounds": rounds, "seconds_per_loader_run": seconds, "batch_size": batch_size, "threads": threads,
            "window_chunks": window_chunks, "crc32c_gb_per_s": crc_rate(a), "ways": best}


def format_table(r: dict) -> str:
    lines = [f"{r['tokens']:,} tokens, d = {r['d']}, chunks of {r['chunk_tokens']:,} tokens; loader: batch "
             f"{r['batch_size']}, {r['threads']} threads, window {r['window_chunks']}; best of {r['rounds']} rounds",
             "", "| read | stored / raw | raw read GB/s | raw read CPU s/GB | loader tokens/s | "
             "loader CPU s per 1M tokens | consumer waited |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, w in r["ways"].items():
        lines.append(f"| {name} | {w['stored_over_raw']:.3f} | {w['raw_read_gb_per_s']:.2f} "
                     f"({w['raw_read_vs_zarr_decode']:.2f}x) | {w['raw_read_cpu_s_per_gb']:.3f} | "
                     f"{w['loader_tokens_per_s']:,.0f} ({w['loader_vs_zarr_decode']:.2f}x) | "
                     f"{w['loader_cpu_s_per_mtok']:.2f} | {100 * w['loader_wait_fraction']:.0f}% |")
    lines.append(f"\ncrc32c (google_crc32c) over one chunk in memory: {r['crc32c_gb_per_s']:.1f} GB/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="256k")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--chunk-sequences", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window-chunks", type=int, default=8)
    p.add_argument("--dir", help="where to write the two stores (default: a temporary folder, removed after)")
    p.add_argument("--json", help="also write the result as JSON here")
    a = p.parse_args(argv)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="codec-read-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        r = run(root, parse_count(a.tokens), a.d, a.context_size, a.chunk_sequences, a.rounds, a.seconds,
                a.batch_size, a.threads, a.window_chunks)
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
