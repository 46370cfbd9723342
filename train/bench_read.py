"""`actcache bench-read STORE`: the rate at which the training loader reads a store from here.

It runs the real loader (ActivationLoader: the thread pool that fetches and decodes chunks, the
shuffle window, float32 batches) for a few seconds and reports the tokens/s it delivers, the bytes
per second that implies (as stored, compressed, and decoded), and the fraction of the time a
consumer waited for a window that was not ready yet. With --step-ms the consumer spends that long
on every batch (as a training step would; it sleeps, so the loader's threads have the CPU), and the
wait fraction says whether the loader keeps up with such a step.

    from actcache.train.bench_read import bench_read
    r = bench_read("s3://bucket/acts.zarr", threads=16, window_chunks=8, seconds=20)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import click

from ..common import location
from ..common.errors import UserError
from ..common.options import command_options, configurable, from_click, option, storage_options_option
from ..common.store import ActivationStore
from .loader import ActivationLoader


def bench_read(url: str, hook: str | None = None, batch_size: int = 4096, threads: int = 4, window_chunks: int = 8,
               seconds: float = 10.0, step_ms: float = 0.0, seed: int = 0, min_batches: int = 2) -> dict:
    """Time the training loader on a store for about `seconds` (after its first batch) and return the rates.

    Keys: tokens, batches, seconds (the timed part), first_batch_seconds (start-up: opening the store
    and the first window), tokens_per_s, decoded_gb_per_s (float16 bytes delivered), stored_gb_per_s
    (the same at the store's compression ratio: what comes off the disk or the network),
    compression_ratio (stored / decoded bytes of the hook's committed chunks), wait_fraction (of the
    timed part, the consumer blocked on the loader), backend (local, obstore or fsspec), and the settings."""
    if batch_size < 1 or threads < 1 or window_chunks < 1:
        raise UserError("--batch-size, --threads and --window-chunks must be at least 1")
    if seconds <= 0 or step_ms < 0:
        raise UserError("--seconds must be positive and --step-ms not negative")
    t_open = time.perf_counter()
    store = ActivationStore.open(url)
    hook = hook or store.manifest.hook_names[0]
    array = store.activations(hook)  # a StoreError naming the hooks there are, for a wrong name
    d = int(array.shape[1])
    n_committed = store.n_committed
    if n_committed == 0:
        raise UserError(f"the store {url} holds no committed chunk yet")
    stored = store.nbytes_stored(f"activations/{hook}")
    decoded_total = store.chunk_row_range(n_committed - 1)[1] * d * 2
    ratio = stored / decoded_total if decoded_total else float("nan")

    loader = ActivationLoader(store, hook, batch_size, seed=seed, window_chunks=window_chunks, threads=threads,
                              device="cpu", normalize=True, repeat=True)
    try:
        loader.next_batch()
        first = time.perf_counter() - t_open
        wait0 = loader.wait_seconds
        pause = step_ms / 1000.0
        n = 0
        t0 = time.perf_counter()
        while n < min_batches or time.perf_counter() - t0 < seconds:
            loader.next_batch()
            n += 1
            if pause:
                time.sleep(pause)
        elapsed = time.perf_counter() - t0
        wait = loader.wait_seconds - wait0
    finally:
        loader.close()
    tokens = n * batch_size
    rate = tokens / elapsed
    backend = "local" if not location.is_remote(url) else (
        location.s3_read_backend() if str(url).startswith("s3://") else "fsspec")
    return {"store": str(url), "hook": hook, "d": d, "backend": backend, "batch_size": batch_size,
            "threads": threads, "window_chunks": window_chunks, "step_ms": step_ms,
            "chunk_tokens": store.manifest.chunk_sequences * store.manifest.context_size,
            "codec": store.manifest.codec, "tokens": tokens, "batches": n, "seconds": elapsed,
            "first_batch_seconds": first, "tokens_per_s": rate, "decoded_gb_per_s": rate * d * 2 / 1e9,
            "stored_gb_per_s": rate * d * 2 * ratio / 1e9, "compression_ratio": ratio,
            "wait_seconds": wait, "wait_fraction": wait / elapsed}


def format_result(r: dict) -> str:
    step = f", consumer step {r['step_ms']:g} ms" if r["step_ms"] else ", consumer takes no time per batch"
    return "\n".join([
        f"{r['store']} [{r['hook']}, d={r['d']}, codec {r['codec']}, read by {r['backend']}]",
        f"loader: batch {r['batch_size']}, {r['threads']} threads, window {r['window_chunks']} chunks "
        f"of {r['chunk_tokens']} tokens{step}",
        f"tokens/s:        {r['tokens_per_s']:,.0f}  ({r['batches']} batches in {r['seconds']:.1f}s; "
        f"first batch after {r['first_batch_seconds']:.2f}s)",
        f"decoded GB/s:    {r['decoded_gb_per_s']:.3f}  (float16 activations delivered)",
        f"stored GB/s:     {r['stored_gb_per_s']:.3f}  (compressed, fetched; stored/decoded = {r['compression_ratio']:.3f})",
        f"consumer waited: {100 * r['wait_fraction']:.1f}% of the time",
    ])


@configurable
@dataclass
class BenchReadOptions:
    """The options of `actcache bench-read STORE`."""

    hook: str | None = option(None, "Hook to read (default: the store's first).", kind="str")
    batch_tokens: int = option(4096, "Tokens per batch.", kind="count", unit="tokens", low=1,
                               old_names=("batch_size",))
    threads: int = option(4, "Loader threads (the sweep's loader_threads).", unit="threads", low=1)
    window_chunks: int = option(8, "Chunks per shuffle window.", unit="chunks", low=1)
    seconds: float = option(10.0, "How long to time the loader.", unit="seconds", low=0, low_open=True)
    step_ms: float = option(0.0, "Time a consumer spends per batch (a training step); 0: as fast as the loader "
                                 "goes.", unit="milliseconds", low=0)
    as_json: bool = option(False, "Print one JSON object instead of the table.", flag="--json")
    storage_options: tuple[str, ...] = storage_options_option()


@click.command("bench-read")
@click.argument("store")
@command_options(BenchReadOptions)
def bench_read_command(store: str, **given: Any) -> None:
    """GB/s and tokens/s the training loader gets from STORE (a folder or s3://...) here, and the
    fraction of the time a training step would wait for data. Reads only; nothing is written."""
    try:
        o = BenchReadOptions(**from_click(BenchReadOptions, given))
        with location.storage_options(list(o.storage_options)):
            r = bench_read(store, o.hook, o.batch_tokens, o.threads, o.window_chunks, o.seconds, o.step_ms)
    except UserError:
        raise
    except Exception as e:  # the storage underneath failed (S3 unreachable, denied...): one line
        raise location.storage_error(e, store, "reading") from None
    if o.as_json:
        import json

        click.echo(json.dumps(r, indent=1))
    else:
        click.echo(format_result(r))
