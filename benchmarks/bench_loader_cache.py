"""The scale benchmark's loader step, alone and twice in a row on each store given, to tell the loader's
own cost from the disk's: the user and system CPU-seconds of each step process, the blocks it read
from the disk (rusage inblock, 512-byte units) and its report. The second run of a store finds in the
page cache the chunks the first read (the step's chunk order is seeded), so run 1 against run 2 is a
cold read against a warm one of the same work.

    python -m benchmarks.bench_loader_cache STORE [STORE ...]      # e.g. the stores of bench_scale --keep

Prints one JSON line per run."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def loader_step(store: str, tokens: int, batch: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "step", "loader", "--store", store,
                        "--tokens", str(tokens), "--batch", str(batch)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"the loader step failed on {store}: {p.stderr.strip().splitlines()[-1:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall": round(wall, 2), "user": round(after.ru_utime - before.ru_utime, 2),
            "sys": round(after.ru_stime - before.ru_stime, 2), "inblock": after.ru_inblock - before.ru_inblock,
            "tokens_per_s": round(r["tokens_per_s"]), "raw_tokens_per_s": round(r["raw_tokens_per_s"]),
            "wait_seconds": round(r["wait_seconds"], 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--tokens", type=int, default=1_048_576)
    ap.add_argument("--batch", type=int, default=4096)
    a = ap.parse_args(argv)
    for store in a.stores:
        for run in (1, 2):
            print(json.dumps({"store": os.path.basename(store.rstrip("/")), "run": run,
                              **loader_step(store, a.tokens, a.batch)}), flush=True)


if __name__ == "__main__":
    main()
