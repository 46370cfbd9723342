"""The training loader against the raw read of its store and against SAELens's ActivationsStore, side
by side on one store, in CPU-seconds and wall seconds, with peak memory and where the loader's time goes.

Each measurement runs in a process of its own (so its CPU time and peak memory are its own), one after
another, in interleaved rounds (the order rotates from round to round), after reading its files once so
that every side finds them in the page cache:

  raw          the raw in-order read+decode: store.read_chunk of every committed chunk, in order;
  raw_zarr     the same through zarr's codec pipeline (store.direct_decode off: how read_chunk decoded a
               compressed local chunk before CodedChunks, and how it decodes a remote one);
  decode_into  the same chunks decoded in order into one reused buffer (store.read_chunk_into): what
               the loader's readers do, the floor of decoding;
  decode_convert  decode_into, each chunk then converted in order to scaled float32 in one reused
               buffer: the floor of any loader that hands out float32 rows (no shuffle, no batches).
               decode_convert / raw is the most a CPU loader can reach of the raw read (`ceiling`);
  loader       ActivationLoader with the trainer's defaults (batch 4096, window 8 chunks, 4 reader
               threads, special tokens left out, normalised float32 batches on the CPU), its steady
               state: an epoch's worth of batches after the first; with the CPU time of each of its threads (readers, window assembler, the
               consumer's thread that gathers and converts the batches);
  saelens      SAELens's ActivationsStore reading its own cache of the same activations
               (benchmarks/saelens_loader_side.py, run by ACTCACHE_SAELENS_PYTHON: an environment with
               sae-lens), written from the store's rows in its own cache format beforehand, leaving
               out the same special tokens (exclude_special_tokens).

    python -m benchmarks.bench_loader_cpu                         # a synthetic d 768 store of 4,194,304 tokens
    python -m benchmarks.bench_loader_cpu --tokens 262144 --rounds 2
    python -m benchmarks.bench_loader_cpu --store acts.zarr --hook blocks.0.hook_resid_pre

Without --store, a synthetic store (Gaussian float16 rows, blosc-zstd-5, the harvest's chunk size) is
built under --work and deleted at the end with the SAELens cache (unless --keep). Prints one JSON
object (and writes it to --out)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from actcache.common.manifest import special_token_ids
from actcache.common.store import ActivationStore, chunk_sequences_for
from actcache.train.loader import ActivationLoader
from benchmarks.report import emit_result
from benchmarks.saelens_loader_side import peak_rss_bytes  # the same measure on both sides

HOOK = "blocks.0.hook_resid_pre"
ROOT = Path(__file__).resolve().parents[1]
SIDES = ("raw", "raw_zarr", "decode_into", "decode_convert", "loader", "saelens")
WORK_PREFIX = "bench_loader_cpu_"


# ----------------------------------------------------------------------------- one measurement (a child)
def _warm(folder: str) -> None:
    """Read every file under a folder once (into the page cache; not timed)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def _thread_cpu() -> dict[str, float]:
    """CPU-seconds of each live Python thread of this process, by name (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def _role(name: str) -> str:
    if name.startswith("actcache-read"):
        return "readers (fetch + decode into the window)"
    if name.startswith("actcache-window"):
        return "window assembler (permutation, waits)"
    return "consumer (gather + float32 conversion of the batches)" if name == "MainThread" else "other"


def child(side: str, store_url: str, hook: str, batch: int, window_chunks: int, threads: int) -> dict:
    store = ActivationStore.open(store_url)
    _warm(os.path.join(store_url, "activations", hook))
    n = store.n_committed
    rows = store.chunk_row_range(n - 1)[1]
    rss0 = peak_rss_bytes()
    out: dict = {}
    if side in ("raw", "raw_zarr"):
        store.direct_decode = side == "raw"
        c, w = time.process_time(), time.perf_counter()
        for j in range(n):
            store.read_chunk(hook, j)
        tokens = rows
    elif side in ("decode_into", "decode_convert"):
        r0, r1 = store.chunk_row_range(0)
        half = torch.empty((r1 - r0, store.manifest.hook(hook).d), dtype=torch.float16)
        single = torch.empty(half.shape, dtype=torch.float32)
        buf, convert, scale = half.numpy(), side == "decode_convert", 0.5  # any scale: the cost is the same
        c, w = time.process_time(), time.perf_counter()
        for j in range(n):
            a, b = store.chunk_row_range(j)
            store.read_chunk_into(hook, j, buf[:b - a])
            if convert:
                torch.mul(half[:b - a], scale, out=single[:b - a])
        tokens = rows
    elif side == "loader":
        loader = ActivationLoader(store, hook, batch, seed=0, window_chunks=window_chunks, threads=threads,
                                  device="cpu", repeat=True, skip_special_tokens=True)
        loader.next_batch()  # start-up: the first window, not the steady state
        n_batches = max(1, rows // batch)
        before, wait0 = _thread_cpu(), loader.wait_seconds
        c, w = time.process_time(), time.perf_counter()
        for _ in range(n_batches):
            loader.next_batch()
        after = _thread_cpu()
        tokens = n_batches * batch
        roles: dict[str, float] = {}
        for name, t in after.items():
            roles[_role(name)] = roles.get(_role(name), 0.0) + t - before.get(name, 0.0)
        out["thread_cpu_s"] = roles
        out["consumer_wait_s"] = loader.wait_seconds - wait0
        out.update(batch_size=batch, window_chunks=window_chunks, threads=threads, skip_special_tokens=True)
    else:
        raise ValueError(side)
    cpu, wall = time.process_time() - c, time.perf_counter() - w
    if side == "loader":
        loader.close()
    out.update(tokens=tokens, cpu_s=cpu, wall_s=wall, peak_rss_bytes=peak_rss_bytes(), rss_before_bytes=rss0,
               torch_threads=torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------- the whole benchmark
def _run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def build_store(path: Path, tokens: int, d: int = 768, context_size: int = 128) -> ActivationStore:
    from benchmarks.synthetic import make_store

    store, _ = make_store(path, d=d, n_sequences=tokens // context_size, context_size=context_size,
                          chunk_sequences=chunk_sequences_for(context_size, d), codec="blosc-zstd-5",
                          fast_random=True)
    return store


def run(tokens: int, rounds: int, work: Path, store_url: str | None, hook: str, saelens_python: str | None,
        batch: int = 4096, window_chunks: int = 8, threads: int = 4, torch_threads: int = 1,
        saelens_buffer_batches: int = 64) -> dict:
    d = 768
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hook": hook,
                    "command": "python -m benchmarks.bench_loader_cpu " + " ".join(sys.argv[1:])}
    made = []
    try:
        if store_url is None:
            need = int(tokens * d * 2 * (0.9 + (1.05 if saelens_python else 0)) * 1.1)
            free = shutil.disk_usage(work).free
            if free < need:
                raise SystemExit(f"{work} has {free / 2**30:.1f} GiB free; this benchmark needs about "
                                 f"{need / 2**30:.1f} GiB (the store and SAELens's cache): free space or pass --work")
            store_url = str(work / "store.zarr")
            made.append(Path(store_url))
            t = time.perf_counter()
            build_store(Path(store_url), tokens, d)
            result["store_build_s"] = time.perf_counter() - t
            result["store_note"] = ("synthetic: Gaussian float16 rows (d 768, context 128, blosc-zstd-5, the harvest's "
                                    "chunk size); real activations compress better, decoding costs about the same")
        store = ActivationStore.open(store_url)
        d = store.manifest.hook(hook).d
        result["store"] = {"url": store_url, "tokens": store.chunk_row_range(store.n_committed - 1)[1], "d": d,
                           "chunks": store.n_committed, "chunk_sequences": store.manifest.chunk_sequences,
                           "codec": store.manifest.codec, "bytes": store.nbytes_stored(f"activations/{hook}")}
        ctx = store.manifest.context_size
        special = special_token_ids(store.manifest.tokenizer)
        sides = [s for s in SIDES if s != "saelens" or saelens_python]
        cache = work / "saelens_cache"
        if saelens_python:
            made.append(cache)
            result["saelens_cache"] = _run([saelens_python, "-m", "benchmarks.saelens_loader_side", "write",
                                            "--store", store_url, "--hook", hook, "--out", str(cache)])
        else:
            result["saelens_note"] = ("no SAELens side: set ACTCACHE_SAELENS_PYTHON (an environment with sae-lens) "
                                      "or run `make setup-saelens`")
        per: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                if side == "saelens":
                    cmd = [saelens_python, "-m", "benchmarks.saelens_loader_side", "time", "--cache", str(cache),
                           "--hook", hook, "--tokens", str(result["store"]["tokens"]), "--batch-size", str(batch),
                           "--context-size", str(ctx), "--d", str(d), "--torch-threads", str(torch_threads),
                           "--n-batches-in-buffer", str(saelens_buffer_batches),
                           "--exclude-special-tokens", ",".join(map(str, special))]
                else:
                    cmd = [sys.executable, "-m", "benchmarks.bench_loader_cpu", "--child", side, "--store", store_url,
                           "--hook", hook, "--batch", str(batch), "--window-chunks", str(window_chunks),
                           "--threads", str(threads), "--torch-threads", str(torch_threads)]
                m = _run(cmd)
                m["round"], m["position"] = r, order.index(side)
                per[side].append(m)
                print(f"bench_loader_cpu: round {r} {side}: {m['tokens'] / m['cpu_s']:,.0f} tokens/CPU-s, "
                      f"{m['tokens'] / m['wall_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
        result["runs"] = per
        summary: dict = {}
        for side, ms in per.items():
            summary[side] = {"tokens_per_cpu_s": _spread([m["tokens"] / m["cpu_s"] for m in ms]),
                             "tokens_per_wall_s": _spread([m["tokens"] / m["wall_s"] for m in ms]),
                             "peak_rss_gib": max(m["peak_rss_bytes"] for m in ms) / 2**30,
                             "rss_before_timing_gib": max(m["rss_before_bytes"] for m in ms) / 2**30}
        ratios: dict = {}
        for other in [s for s in sides if s != "loader"]:
            for unit in ("cpu_s", "wall_s"):
                # round by round: the loader and the other side of the same round
                ratios[f"loader / {other}, per {unit.replace('_s', '-second')}"] = _spread(
                    [(a["tokens"] / a[unit]) / (b["tokens"] / b[unit]) for a, b in zip(per["loader"], per[other])])
        result["summary"], result["ratios"] = summary, ratios
        if "decode_convert" in per:
            result["ceiling"] = {
                "decode_convert / raw, per CPU-second": _spread(
                    [(a["tokens"] / a["cpu_s"]) / (b["tokens"] / b["cpu_s"]) for a, b in zip(per["decode_convert"], per["raw"])]),
                "note": "the most any loader of float32 rows on this CPU can reach of the raw read: it must at "
                        "least decode every row (as the raw read does) and write it out as float32"}
        threads_cpu = [m["thread_cpu_s"] for m in per["loader"]]
        result["loader_profile"] = {
            "cpu_s_by_thread_role": {k: statistics.median(t.get(k, 0.0) for t in threads_cpu) for k in threads_cpu[0]},
            "note": "median over rounds of the CPU-seconds each of the loader's threads spent in the timed epoch"}
        result["settings"] = {"batch_size": batch, "window_chunks": window_chunks, "loader_threads": threads,
                              "torch_threads": torch_threads, "rounds": rounds,
                              "saelens_n_batches_in_buffer": saelens_buffer_batches,
                              "saelens_store_batch_size_prompts": 32, "special_tokens_left_out": special,
                              "nice": os.nice(0)}
    finally:
        for p in made:  # only what this run built
            shutil.rmtree(p, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="an existing store (default: build a synthetic d 768 one, deleted afterwards)")
    p.add_argument("--hook", default=HOOK)
    p.add_argument("--tokens", type=int, default=4_194_304, help="synthetic store size in tokens (context 128)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", help="folder for the synthetic store and SAELens's cache (default: a new temporary one)")
    p.add_argument("--saelens-python", help="python of an environment with sae-lens (default: "
                   "$ACTCACHE_SAELENS_PYTHON, else .venv-saelens; none there: no SAELens side)")
    p.add_argument("--no-saelens", action="store_true", help="leave the SAELens side out")
    p.add_argument("--saelens-buffer-batches", type=int, default=64,
                   help="ActivationsStore's n_batches_in_buffer (its mixing buffer holds this many x context tokens)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--window-chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", choices=[s for s in SIDES if s != "saelens"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    if a.child:
        r = child(a.child, a.store, a.hook, a.batch, a.window_chunks, a.threads)
        print(json.dumps(r))
        return r
    from benchmarks.run import saelens_python

    py = None if a.no_saelens else saelens_python(a.saelens_python)
    own = a.work is None
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX) if own else a.work)
    try:
        r = run(a.tokens, a.rounds, work, a.store, a.hook, py, a.batch, a.window_chunks, a.threads,
                a.torch_threads, a.saelens_buffer_batches)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    emit_result(r, a.out, indent=1)
    return r


if __name__ == "__main__":
    main()
