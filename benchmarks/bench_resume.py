"""Resume at scale: a harvest and a training run SIGKILLed about halfway and resumed give the same
result as uninterrupted ones, and how much work the kill cost.

  harvest   the scale benchmark's d_model-768 harvest (benchmarks/bench_scale.py: one thin block, the
            hook on its input, context 128) run once uninterrupted; then again, killed with SIGKILL once
            the manifest's commit counter passes half the chunks, and resumed (`resume=True`). Same
            store fingerprint? Lost work: the chunks the resumed run had to do again (those past the
            counter when the kill came), and the extra CPU-seconds of killed + resumed over uninterrupted.
  train     one TopK SAE (k 32, expansion 4, batch 4096, a checkpoint every tenth) on that store,
            uninterrupted; then killed about halfway (by the uninterrupted run's wall time) and resumed
            with --resume. Same exported weights, bit for bit? Lost work: the steps past the last
            checkpoint when the kill came (at most one checkpoint interval).

Each run is its own process; CPU-seconds and peak memory come from wait4.

    python -m benchmarks.bench_resume --tokens 1M --work /big/disk
    python -m benchmarks.bench_resume --tokens 64k --d-model 64 --train-tokens 16k   # small

Prints one JSON object (and writes it with --out)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.outputs import METRICS_FILE, WEIGHTS_FILENAME, is_store
from actcache.common.progress import parse_count
from benchmarks.bench_scale import HOOK, measure, model_spec, write_dataset
from benchmarks.report import emit_result


def committed(store: Path) -> int:
    """The store's commit counter, read as any zarr reader would (0 before the manifest exists)."""
    try:
        return int(json.loads((store / "zarr.json").read_text())["attributes"]["actcache"]["n_chunks_committed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def fingerprint(store: Path) -> str:
    from actcache.common.store import ActivationStore

    return ActivationStore.open(str(store)).fingerprint


def harvest_cmd(store: Path, data: Path, a: argparse.Namespace, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bench_resume", "step-harvest", "--store", str(store), "--data", str(data),
            "--model", model_spec(a.d_model, a.ctx, a.vocab), "--ctx", str(a.ctx), "--tokens", str(a.tokens),
            "--batch", str(a.harvest_batch)] + (["--resume"] if resume else [])


def step_harvest(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for k in ("--store", "--data", "--model"):
        p.add_argument(k, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    from actcache import HarvestConfig, harvest

    cfg = HarvestConfig(out=a.store, hooks=[HOOK], model=a.model, dataset=a.data, context_size=a.ctx,
                        tokens=a.tokens, batch_size=a.batch, device="cpu", streaming=True, resume=a.resume)
    r = harvest(cfg, progress=False)
    print(json.dumps({"tokens": r.n_tokens, "loop_seconds": r.loop_seconds}))


def kill_when(cmd: list[str], ready, env: dict[str, str], poll: float = 0.05) -> dict[str, Any]:
    """Start cmd, SIGKILL it once ready() is true (or let it finish); its CPU-seconds from wait4."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    while p.poll() is None:
        if ready():
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(poll)
    _, status, usage = os.wait4(p.pid, 0) if p.returncode is None else (0, 0, None)
    out = {"killed": killed, "wall_seconds": time.perf_counter() - t}
    if usage is not None:
        out["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return out


def _check(m: dict[str, Any], what: str) -> dict[str, Any]:
    if m["rc"] != 0:
        raise RuntimeError(f"{what} failed (exit {m['rc']}): {m['stderr'][-2000:]}")
    return {"wall_seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"], "peak_rss_bytes": m["peak_rss_bytes"]}


def chunk_files_past(store: Path, counter: int) -> int:
    """Activation chunks on disk at or past the counter: written, not committed (lost to a kill)."""
    arr = store / "activations" / HOOK / "c"
    if not arr.is_dir():
        return 0
    return sum(1 for f in arr.iterdir() if f.name.isdigit() and int(f.name) >= counter)


def bench_harvest(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    data = write_dataset(work / "data.jsonl", a.tokens + a.tokens // 4, a.vocab)
    whole, cut = work / "whole.zarr", work / "cut.zarr"
    print("[bench-resume] harvest, uninterrupted", file=sys.stderr, flush=True)
    full = _check(measure(harvest_cmd(whole, data, a), env=env, cwd=ROOT), "the uninterrupted harvest")
    n_chunks = committed(whole)
    half = max(1, n_chunks // 2)
    print(f"[bench-resume] harvest, killed at {half} of {n_chunks} chunks", file=sys.stderr, flush=True)
    k = kill_when(harvest_cmd(cut, data, a), lambda: committed(cut) >= half, env)
    at_kill = committed(cut)
    past = chunk_files_past(cut, at_kill)
    print("[bench-resume] harvest, resumed", file=sys.stderr, flush=True)
    res = _check(measure(harvest_cmd(cut, data, a, resume=True), env=env, cwd=ROOT), "the resumed harvest")
    same = fingerprint(whole) == fingerprint(cut)
    extra = k.get("cpu_seconds", 0.0) + res["cpu_seconds"] - full["cpu_seconds"]
    per_chunk = full["cpu_seconds"] / n_chunks
    out = {"tokens": a.tokens, "chunks": n_chunks, "uninterrupted": full, "killed": k, "committed_at_kill": at_kill,
           "chunk_files_past_counter_at_kill": past, "redone_chunks": n_chunks - at_kill, "resumed": res,
           "same_fingerprint": same, "extra_cpu_seconds": extra,
           "extra_cpu_in_chunks": extra / per_chunk, "cpu_seconds_per_chunk": per_chunk,
           "bytes_on_disk": sum(f.stat().st_size for f in whole.rglob("*") if f.is_file())}
    if is_store(cut):  # the killed and resumed copy: only ever a store this benchmark wrote
        shutil.rmtree(cut, ignore_errors=True)
    return out


def _sweep_toml(a: argparse.Namespace) -> str:
    return "\n".join([f'hook = "{HOOK}"', f"tokens = {a.train_tokens}", f"batch_tokens = {a.train_batch}", "seed = 0",
                      f"eval_tokens = {a.train_batch}", "log_every_steps = 1", "",
                      "[[sae]]", 'name = "topk-k32-x4"', 'architecture = "topk"', "k = 32", "expansion = 4", ""])


def weights_digest(run: Path) -> dict[str, str]:
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(run.rglob(WEIGHTS_FILENAME))}


def bench_train(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    from actcache.train.checkpoint import load_checkpoint

    store = work / "whole.zarr"
    cfg = work / "sweep.toml"
    cfg.write_text(_sweep_toml(a))

    def cmd(out: Path, resume: bool = False) -> list[str]:
        return [sys.executable, "-m", "actcache", "train", str(store), "--config", str(cfg), "--out", str(out),
                "--device", "cpu", "--no-progress"] + (["--resume"] if resume else [])

    whole, cut = work / "run-whole", work / "run-cut"
    print("[bench-resume] train, uninterrupted", file=sys.stderr, flush=True)
    full = _check(measure(cmd(whole), env=env, cwd=ROOT), "the uninterrupted training run")
    n_steps = a.train_tokens // a.train_batch
    every = max(1, (a.train_tokens // 10) // a.train_batch)
    metrics = cut / "topk-k32-x4" / METRICS_FILE

    def lines() -> int:
        try:
            return metrics.read_bytes().count(b"\n")
        except OSError:
            return 0

    print("[bench-resume] train, killed halfway", file=sys.stderr, flush=True)
    # a metrics line per step: kill once half the steps are done
    k = kill_when(cmd(cut), lambda: lines() >= max(1, n_steps // 2), env)
    steps_at_kill = lines()
    st = load_checkpoint(cut)
    ckpt_step = int(st["step"]) if st is not None else 0
    print("[bench-resume] train, resumed", file=sys.stderr, flush=True)
    res = _check(measure(cmd(cut, resume=True), env=env, cwd=ROOT), "the resumed training run")
    a_w, b_w = weights_digest(whole), weights_digest(cut)
    out = {"train_tokens": a.train_tokens, "batch_size": a.train_batch, "steps": n_steps,
           "checkpoint_every_steps": every, "uninterrupted": full, "killed": k, "steps_done_at_kill": steps_at_kill,
           "checkpoint_step_at_kill": ckpt_step, "steps_lost": steps_at_kill - ckpt_step, "resumed": res,
           "same_weights_bitwise": bool(a_w) and a_w == b_w, "weights_sha256": a_w}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "step-harvest":
        step_harvest(argv[1:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=parse_count, default=1_048_576, help="harvest size")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--harvest-batch", type=int, default=32)
    ap.add_argument("--train-tokens", type=parse_count, default=65_536)
    ap.add_argument("--train-batch", type=int, default=4096)
    ap.add_argument("--parts", default="harvest,train")
    ap.add_argument("--work", help="folder for the stores and runs (default: a temporary one, deleted after)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    res: dict[str, Any] = {"command": "python -m benchmarks.bench_resume " + " ".join(argv),
                           "date": time.strftime("%Y-%m-%d %H:%M"), "d_model": a.d_model}
    try:
        res["harvest"] = bench_harvest(a, work, env)
        if "train" in a.parts:
            res["train"] = bench_train(a, work, env)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    emit_result(res, a.out, indent=1)
    return res


if __name__ == "__main__":
    main()
