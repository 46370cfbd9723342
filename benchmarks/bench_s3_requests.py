"""Requests and time per store operation on S3: a loopback moto server counts every request and
answers each after a set delay (a network round trip; requests may overlap), for a store of
`--hooks` hooks: create, write+commit a chunk, finalize, read a chunk of one array.

    python -m benchmarks.bench_s3_requests --hooks 1 --latency-ms 20

Prints one JSON object."""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
from actcache.common.store import ActivationStore, chunk_stats
from benchmarks.s3_server import moto_s3


def run(hooks: int = 1, latency_ms: float = 20.0, chunks: int = 8, d: int = 64) -> dict:
    m = Manifest(model=ModelInfo("random:bench", d_model=d, n_layers=1, n_ctx=128), tokenizer=TokenizerInfo(),
                 dataset=DatasetInfo(path="synthetic"),
                 hooks=[HookInfo(f"blocks.{i}.hook_resid_pre", d) for i in range(hooks)],
                 context_size=128, prepend_bos=False, seed=0, n_sequences=16 * chunks, chunk_sequences=16,
                 codec="blosc-zstd-5", batch_size=16)
    log: list[tuple[str, str, str]] = []
    out: dict[str, dict] = {}

    def timed(name: str, fn, per: int = 1):
        n0, t = len(log), time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t
        out[name] = {"requests": (len(log) - n0) / per, "seconds": dt / per,
                     "by_method": {k: v / per for k, v in collections.Counter(x[0] for x in log[n0:]).items()}}
        return r

    with moto_s3(("acts",), requests=log, latency=latency_ms / 1000):
        url = "s3://acts/bench-requests/acts.zarr"
        store = timed("create", lambda: ActivationStore.create(url, m))
        x = np.random.default_rng(0).standard_normal((16 * 128, d)).astype(np.float16)
        acts = {h.name: x for h in m.hooks}
        stats = {k: chunk_stats(v) for k, v in acts.items()}

        def write_all() -> None:
            for j in range(chunks):
                store.write_chunk(j, np.zeros((16, 128), np.int32), acts, stats)
                store.commit(j + 1)

        timed("write_and_commit_a_chunk", write_all, per=chunks)
        timed("finalize", store.finalize)
        reader = ActivationStore.open(url)
        reader.read_chunk(m.hooks[0].name, 0)  # opens the array (its metadata)
        timed("read_a_chunk_of_one_array",
              lambda: [reader.read_chunk(m.hooks[0].name, j) for j in range(1, chunks)], per=chunks - 1)
    return {"hooks": hooks, "latency_ms": latency_ms, "operations": out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hooks", type=int, default=1)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--chunks", type=int, default=8)
    a = p.parse_args(argv)
    res = run(a.hooks, a.latency_ms, a.chunks)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
