"""The sweep-against-its-arithmetic benchmark runs at toy size, on the sweep definitions of
`make bench-sweep4096`, and its fractions are the measured times divided."""

import json

import pytest

from benchmarks import bench_bound
from benchmarks.run import SWEEP4096, sweep_toml


def test_plan_is_the_sweep4096_plan_with_fewer_steps():
    plan = bench_bound.plan_for(3, "blocks.0.hook_resid_pre")
    assert plan.configs == SWEEP4096.configs and plan.batch_size == SWEEP4096.batch_size == 4096
    assert plan.sweep_tokens == 3 * 4096 and plan.lr == SWEEP4096.lr
    toml = sweep_toml(plan)
    assert 'architecture = "topk"' in toml and "k = [16, 32, 64, 128]" in toml and "expansion = [8, 16]" in toml


def test_runs_at_toy_size_and_the_fraction_is_bound_over_sweep(tmp_path):
    out = tmp_path / "bound.json"
    res = bench_bound.main(["--steps", "3", "--batch-size", "256", "--d-model", "16", "--configs", "4x2,8x2",
                            "--threads", "1", "--rounds", "2", "--work", str(tmp_path / "w"), "--out", str(out)])
    assert json.loads(out.read_text())["steps"] == res["steps"] == 3
    assert len(res["saes"]) == 2 and res["d_in"] == 16
    one = res["by_threads"]["1"]
    assert len(one["rounds"]) == 2
    for row in one["rounds"]:
        for part in ("bound", "sweep_loop", "sweep_call", "loader"):
            assert row[part]["wall"] > 0 and row[part]["cpu"] >= 0
        # the training loop is part of the call
        assert row["sweep_loop"]["wall"] < row["sweep_call"]["wall"]
        for k in ("wall", "cpu"):
            if row["sweep_loop"][k] > 0:
                assert row["fraction_loop"][k] == pytest.approx(row["bound"][k] / row["sweep_loop"][k])
            assert row["fraction_call"][k] == pytest.approx(row["bound"][k] / row["sweep_call"][k])
    best = one["best"]
    assert best["bound"]["wall"] == min(r["bound"]["wall"] for r in one["rounds"])
    assert best["fraction_call"]["wall"] == pytest.approx(best["bound"]["wall"] / best["sweep_call"]["wall"])


def test_the_arithmetic_trains_the_sweeps_saes_on_its_batches(tmp_path, monkeypatch):
    """The bound does the sweep's work: the same SAEs, the same steps, the same batches, so the
    same weights as the trainer's first steps (before export folds the normalisation in)."""
    import torch

    from actcache.common.store import ActivationStore
    from actcache.train.trainer import Trainer, build_members

    store_url = bench_bound.synthetic_store(tmp_path / "s.zarr", 2048, 16)
    plan = bench_bound.plan_for(2, "blocks.0.hook_resid_pre", [(4, 2)], 256)
    store = ActivationStore.open(store_url)
    cfg = bench_bound.resolved_config(plan, store)
    batches = bench_bound.batches_in_memory(cfg, store)
    assert len(batches) == 2 and batches[0]["blocks.0.hook_resid_pre"].shape == (256, 16)

    seen = []
    orig = build_members

    def keep(*a, **k):
        ms = orig(*a, **k)
        seen.append(ms)
        return ms

    monkeypatch.setattr(bench_bound, "build_members", keep)
    bench_bound.arithmetic(cfg, batches)
    ours = seen[0][0].sae

    trainer = Trainer(cfg, bench_bound.loader_for(cfg, store), tmp_path / "run", torch.device("cpu"), progress=False)
    m = trainer.members[0]
    m.sae.init_b_dec(batches[0][cfg.saes[0].hook])
    for step in range(2):
        trainer.step = step
        trainer._step_member(m, batches[step])
    for name, p in m.sae.state_dict().items():
        assert torch.equal(p, ours.state_dict()[name]), name
