"""Harvest throughput against the bare forward pass of the same model on the same tokens.

The bare pass is TransformerLens run_with_cache with the same hooks and stop layer, copied to CPU
float16: what a harvest could reach if writing cost nothing. Both run in this one process, on the
same token windows, alternating, and the best rate of each is kept (the ratio is what matters; a
shared machine makes absolute rates noisy). Rates per CPU-second of this process (all its threads:
the writer's and the data reader's included) are reported too: on a machine that other jobs share
they are steadier than wall-clock rates. Also reports bytes on disk per token against raw float16.

    python -m benchmarks.bench_harvest --hook blocks.4.hook_resid_post --tokens 32k
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actcache.common.progress import parse_count
from actcache.harvest.api import HarvestConfig, harvest
from actcache.harvest.data import STDLIB, TokenWindows, resolve_source
from actcache.harvest.models import DEFAULT_MODEL, HookedModel, load_model


@torch.inference_mode()
def bare_forward(model: HookedModel, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """TransformerLens run_with_cache with the same hooks and stop layer as a harvest, copied to CPU
    float16: the upper bound a harvest can reach."""
    wanted = set(hooks)
    _, cache = model.tl.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in wanted,
                                       stop_at_layer=model.stop_layer(hooks))
    return {h: cache[h].to("cpu", torch.float16) for h in hooks}


def run(model: str = DEFAULT_MODEL, hooks: list[str] | None = None, n_tokens: int = 16384, context_size: int = 128,
        batch_size: int = 16, device: str | None = None, dataset: str = STDLIB, codec: str | None = None,
        repeats: int = 2) -> dict:
    """Measure harvest and bare tokens/s on the same tokens; returns the figures as a dict."""
    hooks = list(hooks or ["blocks.4.hook_resid_post"])
    m = load_model(model, device=device)
    dims = m.hook_dims(hooks)
    n_seq = -(-n_tokens // context_size)
    windows = TokenWindows(resolve_source(dataset), context_size, m.tokenizer, m.vocab_size, seed=0).windows()
    tokens = torch.from_numpy(np.stack(list(itertools.islice(windows, n_seq))).astype(np.int64))
    n_seq = tokens.shape[0]
    bare_forward(m, tokens[:batch_size], hooks)  # warm-up

    def bare() -> tuple[float, float]:
        t, cpu = time.perf_counter(), time.process_time()
        for s in range(0, n_seq, batch_size):
            bare_forward(m, tokens[s:s + batch_size], hooks)
        return n_seq * context_size / (time.perf_counter() - t), n_seq * context_size / (time.process_time() - cpu)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(out=str(Path(tmp) / "bench.zarr"), hooks=hooks, model=model, dataset=dataset,
                            context_size=context_size, tokens=n_seq * context_size, batch_size=batch_size,
                            device=m.device, overwrite=True, **({"codec": codec} if codec else {}))
        bare_rates, bare_cpu, harvest_rates, harvest_cpu = [], [], [], []
        for _ in range(repeats):
            wall, cpu = bare()
            bare_rates.append(wall)
            bare_cpu.append(cpu)
            cpu = time.process_time()
            res = harvest(cfg, progress=False, model=m)
            harvest_cpu.append(res.tokens_this_run / (time.process_time() - cpu))  # the whole call, model loaded
            harvest_rates.append(res.tokens_per_s)
    return {
        "model": model, "hooks": dims, "device": m.device, "n_tokens": res.n_tokens, "context_size": context_size,
        "batch_size": batch_size, "codec": res.codec, "torch_threads": torch.get_num_threads(),
        "harvest_tokens_per_s": max(harvest_rates), "bare_tokens_per_s": max(bare_rates),
        "ratio_vs_bare": max(harvest_rates) / max(bare_rates),
        "harvest_runs_tokens_per_s": harvest_rates, "bare_runs_tokens_per_s": bare_rates,
        "harvest_tokens_per_cpu_s": max(harvest_cpu), "bare_tokens_per_cpu_s": max(bare_cpu),
        "cpu_ratio_vs_bare": max(harvest_cpu) / max(bare_cpu),
        "bytes_per_token": res.activation_bytes / res.n_tokens,
        "raw_fp16_bytes_per_token": 2 * sum(dims.values()),
        "compression_ratio": res.compression_ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--hook", dest="hooks", action="append", help="repeat for several (default blocks.4.hook_resid_post)")
    ap.add_argument("--tokens", default="16384")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dataset", default=STDLIB)
    ap.add_argument("--codec", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(run(a.model, a.hooks, parse_count(a.tokens), a.context_size, a.batch_size, a.device,
                         a.dataset, a.codec, a.repeats), indent=2))


if __name__ == "__main__":
    main()
