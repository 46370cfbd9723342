"""Where the time of a lockstep sweep goes: torch.profiler over a short run of the benchmark's
8 TopK SAEs (k 16..128 x expansion 8, 16) at d=576, reading a synthetic store. Prints the
operators by total CPU time (the loader's reads and the SAE arithmetic side by side).

    python -m benchmarks.profile_sweep --tokens 16k --batch-size 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_train import synthetic_store
from actcache.common.progress import parse_count


def sweep_config(tokens: int, batch_size: int, hook: str) -> dict:
    return {"hook": hook, "tokens": tokens, "batch_size": batch_size, "seed": 0, "log_every_steps": 10**9,
            "eval_tokens": batch_size, "defaults": {"architecture": "topk", "lr": 1e-3},
            "grid": {"k": [16, 32, 64, 128], "expansion": [8, 16]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=15, help="operators to list")
    a = ap.parse_args()
    from actcache.train import train_sweep

    tokens = parse_count(a.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(str(Path(tmp) / "s.zarr"), tokens=max(tokens, 131072))
        cfg = sweep_config(tokens, a.batch_size, "blocks.0.hook_resid_pre")
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            summary = train_sweep(store, cfg, Path(tmp) / "runs", progress=False)
        wall = time.perf_counter() - t
    print(f"8 TopK SAEs, {tokens} tokens, batch {a.batch_size}: {wall:.1f} s under the profiler, "
          f"{summary['train_seconds']:.1f} s of it training")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
