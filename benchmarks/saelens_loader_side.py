"""SAELens's side of the loader benchmark (benchmarks/bench_loader_cpu.py), run with the python of an
environment that has sae-lens; prints one JSON object on stdout.

  write  an actcache store's rows of one hook (read with plain zarr: the public format), written as a
         SAELens activation cache the way CacheActivationsRunner writes one: shards of float16
         Array2D [context, d] per sequence with their token_ids (Dataset.from_dict with its features,
         save_to_disk), then its own _consolidate_shards into one folder that datasets.load_from_disk
         and ActivationsStore read. Sequences stay in store order (the runner's shuffle is not saved).
  time   ActivationsStore over that cache (no model: cached activations only), serving float32
         training batches: the CPU-seconds and wall seconds of `tokens` worth of batches after the
         first, and the process's peak resident memory.

    python -m benchmarks.saelens_loader_side write --store s.zarr --hook blocks.0.hook_resid_pre --out cache
    python -m benchmarks.saelens_loader_side time --cache cache --hook blocks.0.hook_resid_pre --tokens 4194304
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: VmHWM, the high-water mark of its own address space
    (ru_maxrss would carry over the parent's resident size at fork across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_cache(store: str, hook: str, out: Path, block_sequences: int = 512) -> dict:
    import zarr
    from datasets import Array2D, Features, Sequence, Value
    from datasets import Dataset
    from sae_lens.cache_activations_runner import CacheActivationsRunner

    root = zarr.open_group(store, mode="r")
    man = root.attrs["actcache"]
    ctx = man["context_size"]
    n_seq = min(man["n_chunks_committed"] * man["chunk_sequences"], man["n_sequences"])
    acts = root["activations"][hook]
    d = acts.shape[1]
    # the features CacheActivationsRunner gives its shards
    feats = Features({hook: Array2D(shape=(ctx, d), dtype="float16"),
                      "token_ids": Sequence(Value(dtype="int32"), length=ctx)})
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; name a new folder for the cache")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp_shards"
    tmp.mkdir()
    t0 = time.perf_counter()
    for i, a in enumerate(range(0, n_seq, block_sequences)):
        b = min(n_seq, a + block_sequences)
        x = torch.from_numpy(np.asarray(acts[a * ctx:b * ctx]).reshape(b - a, ctx, d))
        t = torch.from_numpy(np.asarray(root["tokens"][a:b]).astype(np.int32))
        Dataset.from_dict({hook: x, "token_ids": t}, features=feats).save_to_disk(str(tmp / f"shard_{i:05d}"),
                                                                                   num_shards=1)
    CacheActivationsRunner._consolidate_shards(tmp, out, copy_files=False)
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"cache": str(out), "sequences": n_seq, "tokens": n_seq * ctx, "bytes": nbytes,
            "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}


def time_store(cache: str, hook: str, tokens: int, batch_size: int, context_size: int, d: int,
               n_batches_in_buffer: int, store_batch_size_prompts: int = 32,
               exclude_special_tokens: list[int] | None = None) -> dict:
    from sae_lens.training.activations_store import ActivationsStore

    for p in Path(cache).rglob("*.arrow"):  # into the page cache, as the other sides find their files
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    rss0 = peak_rss_bytes()
    store = ActivationsStore(model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
                             context_size=context_size, d_in=d, n_batches_in_buffer=n_batches_in_buffer,
                             total_training_tokens=tokens, store_batch_size_prompts=store_batch_size_prompts,
                             train_batch_size_tokens=batch_size, prepend_bos=False, normalize_activations="none",
                             device=torch.device("cpu"), dtype="float32", cached_activations_path=cache,
                             exclude_special_tokens=(torch.tensor(exclude_special_tokens)
                                                     if exclude_special_tokens else None))
    first = next(store)
    assert first.shape == (batch_size, d) and first.dtype == torch.float32
    n = max(1, tokens // batch_size)
    c, w = time.process_time(), time.perf_counter()
    for _ in range(n):
        next(store)
    cpu, wall = time.process_time() - c, time.perf_counter() - w
    return {"tokens": n * batch_size, "cpu_s": cpu, "wall_s": wall, "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_bytes": rss0, "n_batches_in_buffer": n_batches_in_buffer,
            "store_batch_size_prompts": store_batch_size_prompts,
            "mixing_buffer_tokens": n_batches_in_buffer * context_size, "torch_threads": torch.get_num_threads(),
            "exclude_special_tokens": exclude_special_tokens or []}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["write", "time"])
    p.add_argument("--store")
    p.add_argument("--hook", required=True)
    p.add_argument("--out")
    p.add_argument("--cache")
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--n-batches-in-buffer", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--exclude-special-tokens", default="", help="token ids left out of the batches, comma-separated")
    a = p.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    if a.what == "write":
        r = write_cache(a.store, a.hook, Path(a.out))
    else:
        r = time_store(a.cache, a.hook, a.tokens, a.batch_size, a.context_size, a.d, a.n_batches_in_buffer,
                       exclude_special_tokens=[int(t) for t in a.exclude_special_tokens.split(",") if t])
    import sae_lens

    r["sae_lens_version"] = sae_lens.__version__
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    sys.exit(main() and 0)
