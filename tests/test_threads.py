"""The SAEs of a sweep spread over the CPU's cores: the same bits as stepping them one after another
with torch's own threads, at any thread count, every architecture; errors and the thread count as a
user relies on."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import make_sweep, write_sweep
from tests.synthetic import make_store
from actcache.train.architectures import ARCHITECTURES
from actcache.train.config import load_config, resolve
from actcache.train.threads import each_on_cores, one_torch_thread, spread_pays
from actcache.train.trainer import build_members, each_member, optimise_member, output_hook
from actcache.common.outputs import WEIGHTS_FILENAME
from actcache.common.store import ActivationStore

ROOT = Path(__file__).resolve().parents[1]

HOOK = "blocks.0.hook_resid_pre"
OUT = "blocks.0.hook_mlp_out"
SAES = [
    {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
    {"name": "gated", "architecture": "gated", "l1_coefficient": 1.0},
    {"name": "jump", "architecture": "jumprelu", "l0_coefficient": 0.5},
    {"name": "topk", "architecture": "topk", "k": 24},
    {"name": "topk-wide", "architecture": "topk", "k": 48, "expansion": 16},
    {"name": "batchtopk", "architecture": "batchtopk", "k": 24},
    {"name": "matryoshka", "architecture": "matryoshka_batchtopk", "k": 24, "matryoshka_widths": [128]},
    {"name": "tc", "architecture": "transcoder", "hook_out": OUT, "l1_coefficient": 0.5},
    {"name": "skip-tc", "architecture": "skip_transcoder", "hook_out": OUT, "l1_coefficient": 0.5},
    {"name": "topk-tc", "architecture": "topk_transcoder", "hook_out": OUT, "k": 24},
    {"name": "jump-tc", "architecture": "jumprelu_transcoder", "hook_out": OUT, "l0_coefficient": 0.5},
    {"name": "jump-skip-tc", "architecture": "jumprelu_skip_transcoder", "hook_out": OUT, "l0_coefficient": 0.5},
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Every architecture on one store, and batches large enough that torch and the compiled kernels
    split their work over threads (1,024 tokens, d 64, up to 1,024 latents)."""
    root = tmp_path_factory.mktemp("threads")
    make_store(root / "s.zarr", d=64, n_features=96, n_sequences=256, context_size=32, chunk_sequences=16,
               hooks=(HOOK, OUT), maps={OUT: HOOK})
    store = ActivationStore.open(str(root / "s.zarr"))
    cfg = resolve(load_config(make_sweep(*SAES, defaults={"expansion": 8}, batch_tokens=1024, tokens=4096,
                                         seed=3)), store)
    gen = torch.Generator().manual_seed(0)
    batches = [{h: torch.randn(1024, 64, generator=gen) * 3 + 1 for h in (HOOK, OUT)} for _ in range(4)]
    return cfg, batches, str(root / "s.zarr")


def test_every_architecture_of_the_sweep_is_here():
    names = {s["architecture"] for s in SAES}
    assert names == set(ARCHITECTURES)


def _train(cfg, batches, spread: bool, threads: int) -> list[dict[str, torch.Tensor]]:
    """The sweep's SAEs initialised and stepped at `threads`, as the trainer does."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        members = build_members(cfg, torch.device("cpu"))
        for m in members:
            m.sae.init_b_dec(batches[0][output_hook(m.cfg)])
        dead = {m.cfg.name: torch.rand(m.cfg.d_sae, generator=torch.Generator().manual_seed(1)) < 0.3
                for m in members}
        for step, batch in enumerate(batches):
            def one(m):  # AuxK on from the second step, on a fixed set of "dead" latents
                return optimise_member(m, batch, step, len(batches), dead[m.cfg.name], step > 0)
            if spread:
                each_member(one, members, torch.device("cpu"), cfg.batch_tokens)
            else:
                for m in members:
                    one(m)
        return [{k: v.clone() for k, v in m.sae.state_dict().items()} for m in members]
    finally:
        torch.set_num_threads(n)


def test_the_weights_are_the_same_at_any_thread_count_spread_or_not(sweep):
    cfg, batches, _ = sweep
    alone_two = _train(cfg, batches, spread=False, threads=2)
    alone_one = _train(cfg, batches, spread=False, threads=1)
    alone_three = _train(cfg, batches, spread=False, threads=3)
    spread = _train(cfg, batches, spread=True, threads=2)
    for c, a, b, t, s in zip(cfg.saes, alone_two, alone_one, alone_three, spread):
        for k in a:
            assert torch.equal(a[k], b[k]), (c.name, k, "two threads against one")
            assert torch.equal(a[k], t[k]), (c.name, k, "two threads against three")
            assert torch.equal(a[k], s[k]), (c.name, k, "spread over the cores against one after another")
    # and training moved the weights (the comparison is not of untouched initial values)
    fresh = build_members(cfg, torch.device("cpu"))
    assert not torch.equal(fresh[3].sae.W_enc, spread[3]["W_enc"])


def test_a_sweep_from_the_command_line_exports_the_same_weights_at_one_and_two_threads(sweep, tmp_path):
    """`actcache train` in a fresh process at OMP_NUM_THREADS=1 and 2: byte-identical weight files (the
    TopK SAEs spread over the cores at two threads, the standard one alone on torch's two threads)."""
    cfg_path = write_sweep(make_sweep({"name": "topk", "architecture": "topk", "k": 24},
                                      {"name": "topk-wide", "architecture": "topk", "k": 48, "expansion": 16},
                                      {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
                                      defaults={"expansion": 8}, batch_tokens=1024, tokens=8192, seed=3,
                                      eval_tokens=2048), tmp_path / "sweep.toml")
    weights = {}
    for threads in ("1", "2"):
        out = tmp_path / f"out-{threads}"
        proc = subprocess.run([sys.executable, "-m", "actcache", "train", sweep[2], "--config", str(cfg_path),
                               "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        assert proc.returncode == 0, proc.stderr
        weights[threads] = {p.parent.name: p.read_bytes() for p in out.glob(f"*/{WEIGHTS_FILENAME}")}
    assert set(weights["1"]) == {"topk", "topk-wide", "relu"}
    assert weights["1"] == weights["2"]


def test_items_run_on_every_thread_and_in_order_of_the_items():
    seen = []
    both = threading.Barrier(2, timeout=60)  # the two dearest items wait for each other: two threads run them

    def fn(i):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if i >= 6:
            both.wait()
        x = torch.randn(256, 256)
        for _ in range(5):
            x = torch.tanh(x @ x.T / 256)
        return i * 10

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = each_on_cores(fn, list(range(8)), torch.device("cpu"), cost=lambda i: i)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    assert out == [i * 10 for i in range(8)]
    assert len({name for name, _ in seen}) == 2, "both threads took items"
    assert all(t == 1 for _, t in seen), "each item ran with torch at one thread"


def test_uneven_items_are_left_to_torchs_own_threads():
    assert spread_pays([1] * 8, 2) and spread_pays([2, 2, 2, 2, 1, 1, 1, 1], 2) and spread_pays([1] * 8, 8)
    assert not spread_pays([10, 1], 2)  # one SAE far dearer than the other: its core would do nearly all
    assert not spread_pays([1] * 8, 16)  # fewer SAEs than threads: half the cores would idle
    assert not spread_pays([1], 2) and not spread_pays([1, 1], 1)
    seen = []
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = each_on_cores(lambda i: seen.append((threading.current_thread(), torch.get_num_threads())) or i,
                            [0, 1], torch.device("cpu"), cost=lambda i: 10 if i == 0 else 1)
    finally:
        torch.set_num_threads(n)
    assert out == [0, 1] and seen == [(threading.main_thread(), 2)] * 2


def test_the_first_error_in_item_order_is_raised_and_threads_are_restored():
    started = []

    def fn(i):
        started.append(i)
        if i in (2, 5):
            raise ValueError(f"item {i}")
        return i

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="item 2"):
            each_on_cores(fn, list(range(6)), torch.device("cpu"))
        assert torch.get_num_threads() == 2
        # once an item failed, the items not started are not run
        with pytest.raises(ValueError):
            each_on_cores(fn, list(range(2, 400)), torch.device("cpu"))
        assert len(started) < 6 + 398
    finally:
        torch.set_num_threads(n)


def test_one_torch_thread_restores_the_count_after_an_error():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError):
            with one_torch_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
