"""A sweep under torchrun (two CPU ranks, gloo): every SAE is bitwise the one a single process trains;
a rank killed with SIGKILL is resumed per rank; a resume with another number of ranks is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_sweep, write_sweep
from tests.synthetic import make_store
from distributed_fixtures import one_thread_env, our_errors, run, torchrun, worker_pid
from harvest_fixtures import ROOT

pytest.importorskip("torch.distributed")

SWEEP = make_sweep(
    {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
    {"name": "wide-gated", "architecture": "gated", "d_sae": 128},
    {"name": "jump", "architecture": "jumprelu", "l0_coefficient": 0.5},
    defaults={"lr": 1e-3, "d_sae": 64},
    grid={"architecture": ["topk", "batchtopk"], "k": [4, 8]},
    batch_tokens=256, tokens=32768, seed=3, log_every_steps=10, dead_window_tokens=2048, eval_tokens=2048,
    window_chunks=2, repeat_epochs=True, checkpoint_every_tokens=2048,
)
NAMES = ["relu", "wide-gated", "jump", "topk-k4", "topk-k8", "batchtopk-k4", "batchtopk-k8"]


def train_args(store: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(store), "--config", str(config), "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The store, the sweep file, and the sweep trained by one process (one thread)."""
    d = tmp_path_factory.mktemp("dsweep")
    make_store(d / "s.zarr", d=16, n_features=48, n_sequences=256, context_size=32, chunk_sequences=16)
    write_sweep(SWEEP, d / "sweep.toml")
    done = run([sys.executable, "-m", "actcache", *train_args(d / "s.zarr", d / "sweep.toml", d / "single")])
    assert done.returncode == 0, done.stderr[-3000:]
    return d


def assert_same_saes(got: Path, want: Path) -> None:
    """Every file of every SAE folder (weights, sparsity, cfg.json, metrics) byte for byte; the summary
    rows equal but for the folder path."""
    for name in NAMES:
        files = sorted(p.name for p in (want / name).iterdir())
        assert sorted(p.name for p in (got / name).iterdir()) == files
        for f in files:
            assert (got / name / f).read_bytes() == (want / name / f).read_bytes(), (name, f)
    rows = [json.loads((f / "summary.json").read_text())["saes"] for f in (got, want)]
    assert [{k: v for k, v in r.items() if k != "path"} for r in rows[0]] == \
           [{k: v for k, v in r.items() if k != "path"} for r in rows[1]]


def test_torchrun_sweep_is_bitwise_one_process_sweep(single):
    out = single / "two"
    done = run(torchrun(2, train_args(single / "s.zarr", single / "sweep.toml", out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("7 SAEs in") == 1  # rank 0 speaks for the job
    assert_same_saes(out, single / "single")
    shares = [json.loads((out / "summary.json").read_text())["ranks"]]
    assert shares == [2] and (out / "rank-0-of-2").is_dir() and (out / "rank-1-of-2").is_dir()


def test_killed_rank_resumes_per_rank_and_world_size_must_match(single):
    out = single / "killed"
    args = train_args(single / "s.zarr", single / "sweep.toml", out)
    p = subprocess.Popen(torchrun(2, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=one_thread_env(), cwd=ROOT)
    try:
        deadline = time.time() + 180
        ckpt = out / "rank-1-of-2" / "checkpoint.safetensors"
        while not ckpt.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.01)
        victim = worker_pid(p.pid, 1)
        assert victim is not None, "rank 1 is gone before its first checkpoint was seen"
        os.kill(victim, signal.SIGKILL)
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and not (out / "summary.json").exists()

    alone = run([sys.executable, "-m", "actcache", *args, "--resume"])
    lines = our_errors(alone.stderr)
    assert alone.returncode != 0 and len(lines) == 1 and "rerun with 2 ranks" in lines[0], alone.stderr[-2000:]

    again = run(torchrun(2, args + ["--resume"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stderr  # from the ranks' own checkpoints
    assert_same_saes(out, single / "single")


def test_shares_are_balanced_by_cost():
    from actcache.train.config import parse_config
    from actcache.train.distributed import assign, step_cost

    cfg = parse_config(SWEEP)
    for c in cfg.saes:
        c.d_in = 16
        c.d_sae = c.d_sae or 64
    shares = assign(cfg.saes, 2, cfg.batch_tokens)
    assert sorted(i for s in shares for i in s) == list(range(len(cfg.saes)))
    loads = [sum(step_cost(cfg.saes[i], cfg.batch_tokens) for i in s) for s in shares]
    dearest = max(step_cost(c, cfg.batch_tokens) for c in cfg.saes)
    assert abs(loads[0] - loads[1]) <= dearest  # the greedy bound
    wide = [c.name for c in cfg.saes].index("wide-gated")
    assert step_cost(cfg.saes[wide], 256) == max(step_cost(c, 256) for c in cfg.saes)
    assert assign(cfg.saes, 2, cfg.batch_tokens) == shares  # deterministic
