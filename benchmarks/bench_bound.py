"""The lockstep sweep against its arithmetic bound.

The sweep of `make bench-sweep4096` (benchmarks/run.py's SWEEP4096 plan: the eight TopK SAEs k 16..128
x expansion 8, 16 at batch 4096, its sweep.toml) trained by `train_sweep`, against the same SAE
arithmetic alone: the same SAEs (built by the trainer's own `build_members`) taking the forward, the
backward and the optimiser step (with the SAE's decoder-norm hooks around it) on the same batches,
already in memory; no loader, no metrics, no dead-latent bookkeeping, no checkpoints, no export.

    fraction = bound time / sweep time        (1.0: the sweep does nothing but the arithmetic)

for each torch thread count given. On a machine shared with other work a wall-clock time measures the
neighbours as much as the code: the two are alternated in one process, every round, and compared both
in wall time (the training loop's, `Trainer.train`) and in CPU-seconds of the process (all its threads,
the loader's readers included). The loader alone, delivering the same batches, is timed the same way:
it is the part of the gap that data costs.

    python -m benchmarks.bench_bound                           # a synthetic d 128 store of the plan's tokens
    python -m benchmarks.bench_bound --steps 16 --threads 1,2 --rounds 1   # shorter, checkpoints as often
    python -m benchmarks.bench_bound --store acts.zarr --hook blocks.2.hook_resid_post

Prints one JSON object (and writes it with --out)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.outputs import is_run
from actcache.common.store import ActivationStore
from actcache.train import train_sweep
from actcache.train.config import SweepConfig, load_config, resolve
from actcache.train.loader import ActivationLoader
from actcache.train.trainer import Trainer, build_members, each_member, optimise_member, output_hook
from benchmarks.run import SWEEP4096, SWEEP4096_MODEL, Plan, sweep_toml
from benchmarks.report import emit_result

SYNTHETIC_HOOK = "blocks.0.hook_resid_pre"


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, user + system)."""
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> dict[str, float]:
    w, c = clock()
    return {"wall": w - t[0], "cpu": c - t[1]}


def plan_for(steps: int, hook: str, configs: list | None = None, batch_size: int | None = None) -> Plan:
    """The bench-sweep4096 plan with `steps` steps on `hook` (and, for tests, other SAEs or batch)."""
    plan = dataclasses.replace(SWEEP4096, hook=hook)
    if configs is not None:
        plan.configs = list(configs)
    if batch_size is not None:
        plan.batch_size = batch_size
    plan.sweep_tokens = steps * plan.batch_size
    return plan


def plan_toml(plan: Plan) -> str:
    """The plan's sweep.toml, with checkpoints as often (in steps) as in the full 64-step sweep, where
    the default (a tenth of the tokens) puts one every 6 steps; a shorter run keeps that spacing."""
    full_steps = SWEEP4096.sweep_tokens // SWEEP4096.batch_size
    every = max(1, full_steps // 10) * plan.batch_size
    return f"checkpoint_every_tokens = {every}\n" + sweep_toml(plan)


def resolved_config(plan: Plan, store: ActivationStore) -> SweepConfig:
    return resolve(load_config(plan_toml(plan)), store)


def loader_for(cfg: SweepConfig, store: ActivationStore) -> ActivationLoader:
    """The loader exactly as train_sweep builds it for this config (same batches, same order)."""
    return ActivationLoader(store, cfg.hooks, cfg.batch_tokens, seed=cfg.seed, window_chunks=cfg.window_chunks,
                            threads=cfg.loader_threads, device="cpu", skip_special_tokens=cfg.skip_special_tokens,
                            normalize=cfg.normalize, repeat=cfg.repeat_epochs, held_out=cfg.held_out)


def batches_in_memory(cfg: SweepConfig, store: ActivationStore) -> list[dict[str, torch.Tensor]]:
    """The sweep's own batches, every step, read once and kept (copied out of the loader's buffers)."""
    loader = loader_for(cfg, store)
    try:
        return [{h: x.clone() for h, x in loader.next_batches().items()} for _ in range(cfg.n_steps)]
    finally:
        loader.close()


def arithmetic(cfg: SweepConfig, batches: list[dict[str, torch.Tensor]], steps: int | None = None
               ) -> dict[str, float]:
    """The SAE arithmetic of the sweep alone, timed over its steps: per step and SAE the loss (forward),
    the backward, the SAE's gradient projection, clipping, the Adam step and the decoder renormalisation,
    by the trainer's own optimise_member, spread over the cores as the trainer spreads them (each_member),
    without the trainer's bookkeeping; the SAEs start as the trainer's (same seed, same b_dec)."""
    device = torch.device("cpu")
    members = build_members(cfg, device)
    for m in members:
        m.sae.init_b_dec(batches[0][output_hook(m.cfg)])
    not_dead = {m.cfg.name: torch.zeros(m.cfg.d_sae, dtype=torch.bool) for m in members}
    t = clock()
    for step in range(cfg.n_steps if steps is None else steps):
        batch = batches[step]
        each_member(lambda m: optimise_member(m, batch, step, cfg.n_steps, not_dead[m.cfg.name], False),
                    members, device, cfg.batch_tokens)
    return since(t)


def loader_alone(cfg: SweepConfig, store: ActivationStore) -> dict[str, float]:
    """The data side of the sweep alone: the same loader delivering the same batches, no SAE."""
    loader = loader_for(cfg, store)
    try:
        t = clock()
        for _ in range(cfg.n_steps):
            loader.next_batches()
        return since(t)
    finally:
        loader.close()


@contextlib.contextmanager
def timing_train_loop(record: dict):
    """Times Trainer.train (the lockstep loop: loader, steps, metrics, checkpoints) inside train_sweep."""
    original = Trainer.train

    def timed(self):
        t = clock()
        try:
            return original(self)
        finally:
            record.update(since(t))

    Trainer.train = timed
    try:
        yield record
    finally:
        Trainer.train = original


def sweep(plan: Plan, store_url: str, work: Path) -> dict[str, object]:
    """train_sweep on the plan's sweep.toml: its training loop and the whole call."""
    out = work / "sweep-out"
    if out.exists() and not is_run(out):
        raise SystemExit(f"{out} is not a training run; pass another --work folder")
    shutil.rmtree(out, ignore_errors=True)
    loop: dict = {}
    with timing_train_loop(loop):
        t = clock()
        summary = train_sweep(store_url, plan_toml(plan), out, progress=False)
        call = since(t)
    shutil.rmtree(out, ignore_errors=True)
    return {"loop": loop, "call": call, "tokens": summary.get("tokens")}


def fraction(bound: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """bound / other, in wall and in CPU seconds (1.0: the other does only the arithmetic)."""
    return {k: bound[k] / other[k] for k in ("wall", "cpu") if other.get(k)}


def _best(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: min(r[k] for r in rows) for k in ("wall", "cpu")}


def run(store_url: str, plan: Plan, threads: list[int], rounds: int = 2, work: Path | None = None) -> dict:
    """For each thread count: `rounds` rounds of (arithmetic, sweep, loader alone), alternated; the
    fraction of each round and of the best times."""
    work = Path(work or tempfile.mkdtemp(prefix="bench-bound-"))
    work.mkdir(parents=True, exist_ok=True)
    store = ActivationStore.open(store_url)
    cfg = resolved_config(plan, store)
    batches = batches_in_memory(cfg, store)
    before = torch.get_num_threads()
    result: dict = {"store": store_url, "hook": plan.hook, "d_in": cfg.d_in, "batch_size": cfg.batch_tokens,
                    "steps": cfg.n_steps, "saes": [f"{s.name} (d_sae {s.d_sae})" for s in cfg.saes],
                    "checkpoint_every_steps": cfg.checkpoint_every_steps, "by_threads": {}}
    try:
        for n in threads:
            torch.set_num_threads(n)
            arithmetic(cfg, batches, steps=1)  # warm-up: the thread team is started outside the timing
            rows = []
            for r in range(rounds):
                b = arithmetic(cfg, batches)
                s = sweep(plan, store_url, work)
                ld = loader_alone(cfg, store)
                rows.append({"round": r, "bound": b, "sweep_loop": s["loop"], "sweep_call": s["call"], "loader": ld,
                             "fraction_loop": fraction(b, s["loop"]), "fraction_call": fraction(b, s["call"]),
                             "loader_share_of_loop": fraction(ld, s["loop"])})
                print(f"bench_bound: threads {n} round {r}: bound {b['wall']:.1f} s wall / {b['cpu']:.1f} CPU-s; "
                      f"sweep loop {s['loop']['wall']:.1f} / {s['loop']['cpu']:.1f}; fraction "
                      f"{rows[-1]['fraction_loop']}", file=sys.stderr, flush=True)
            best = {"bound": _best([r["bound"] for r in rows]), "sweep_loop": _best([r["sweep_loop"] for r in rows]),
                    "sweep_call": _best([r["sweep_call"] for r in rows]), "loader": _best([r["loader"] for r in rows])}
            best["fraction_loop"] = fraction(best["bound"], best["sweep_loop"])
            best["fraction_call"] = fraction(best["bound"], best["sweep_call"])
            best["loader_share_of_loop"] = fraction(best["loader"], best["sweep_loop"])
            result["by_threads"][str(n)] = {"rounds": rows, "best": best}
    finally:
        torch.set_num_threads(before)
    return result


def synthetic_store(path: Path, tokens: int, d: int, context_size: int = 128) -> str:
    from benchmarks.synthetic import make_store

    make_store(str(path), d=d, n_sequences=max(1, tokens // context_size), context_size=context_size,
               chunk_sequences=64, fast_random=True)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    from actcache.common.progress import parse_count

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a store (default: a synthetic one at the plan's width, in --work)")
    ap.add_argument("--hook", help=f"the hook to train on (default: {SYNTHETIC_HOOK} of the synthetic store)")
    ap.add_argument("--steps", type=int, default=SWEEP4096.sweep_tokens // SWEEP4096.batch_size,
                    help="training steps (default: the plan's 64)")
    ap.add_argument("--batch-size", type=int, help="tokens per step (default: the plan's 4096)")
    ap.add_argument("--d-model", type=int, default=SWEEP4096_MODEL["d_model"], help="width of the synthetic store")
    ap.add_argument("--configs", help="TopK SAEs as k x expansion, e.g. 16x8,32x8 (default: the plan's eight)")
    ap.add_argument("--store-tokens", default=None, help="tokens of the synthetic store (default: the sweep's)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", help="folder for the store and the sweep's output (default: a temporary one)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")] if a.configs else None
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-bound-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = a.store
        if store is None:
            plan0 = plan_for(a.steps, SYNTHETIC_HOOK, configs, a.batch_size)
            tokens = parse_count(a.store_tokens) if a.store_tokens else plan0.sweep_tokens
            store = synthetic_store(work / "bound.zarr", tokens, a.d_model)
        plan = plan_for(a.steps, a.hook or SYNTHETIC_HOOK, configs, a.batch_size)
        res = run(store, plan, [int(t) for t in a.threads.split(",")], a.rounds, work)
    finally:
        if a.work is None:  # the temporary folder is ours: the synthetic store and the sweep's output
            shutil.rmtree(work, ignore_errors=True)
    res["command"] = "python -m benchmarks.bench_bound " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    emit_result(res, a.out, indent=1)
    return res


if __name__ == "__main__":
    main()
