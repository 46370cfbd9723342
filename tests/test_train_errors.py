"""Every bad input of the train stage gives one clear line (UserError, exit 2) and writes nothing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.common.errors import UserError
from actcache.common.store import ActivationStore, chunk_stats
from tests.conftest import make_sweep, sweep_toml, write_sweep, single_thread
from tests.synthetic import make_store
from actcache.train.checkpoint import load_checkpoint
from actcache.train.config import load_config
from actcache.train.sweep import train_sweep

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"


TOPK = {"name": "t", "architecture": "topk", "k": 4}
HEAD = {"batch_tokens": 128, "tokens": 2048, "log_every_steps": 4, "eval_tokens": 512, "skip_special_tokens": False}


def config(*saes: dict, **top) -> dict:
    """This file's small sweep: the SAEs given (one TopK SAE when neither SAEs nor a grid are)."""
    if not saes and "grid" not in top:
        saes = (TOPK,)
    return make_sweep(*saes, defaults={"d_sae": 32, "lr": 1e-3}, **{**HEAD, **top})


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = tmp_path_factory.mktemp("errors") / "s.zarr"
    make_store(url, d=8, n_features=16, n_sequences=128, context_size=16, chunk_sequences=16)  # 2048 tokens
    return str(url)


def fails(store_url, cfg, out, match, **kw):
    with pytest.raises(UserError, match=match) as e:
        train_sweep(store_url, cfg, out, progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not Path(out).exists(), "a refused run must not create its output folder"
    return str(e.value)


def test_hook_not_in_store(store_url, tmp_path):
    msg = fails(store_url, config(hook="blocks.9.hook_resid_post"), tmp_path / "o", "not in the store")
    assert HOOK in msg  # names the hooks it has


def test_d_in_mismatch(store_url, tmp_path):
    fails(store_url, config(d_in=576), tmp_path / "o", r"d_in = 576 .* has d = 8")


def test_unknown_architecture_names_the_accepted_ones(store_url, tmp_path):
    msg = fails(store_url, config({"name": "x", "architecture": "topkk", "k": 4}), tmp_path / "o",
                "unknown architecture 'topkk'")
    assert "standard, topk, batchtopk, jumprelu, gated, matryoshka_batchtopk" in msg


def test_parameter_the_architecture_does_not_take(store_url, tmp_path):
    msg = fails(store_url, config({"name": "x", "architecture": "topk", "k": 4, "l1_coefficient": 2.0}),
                tmp_path / "o", "does not take 'l1_coefficient'")
    assert "aux_loss_coefficient" in msg and "k," in msg
    # in a grid too
    fails(store_url, config(grid={"architecture": ["standard"], "k": [4]}), tmp_path / "o",
          "'standard' does not take 'k'")


def test_k_larger_than_d_sae(store_url, tmp_path):
    fails(store_url, config({"name": "x", "architecture": "batchtopk", "k": 64}), tmp_path / "o",
          "k = 64 must be between 1 and d_sae = 32")


def test_more_tokens_than_the_store_needs_permission(store_url, tmp_path):
    fails(store_url, config(tokens=4096), tmp_path / "o", "store holds 2,048.*--repeat-epochs")
    with single_thread():
        s = train_sweep(store_url, config(tokens=4096), tmp_path / "ok", repeat_epochs=True, progress=False)
        assert s["tokens"] == 4096
        s = train_sweep(store_url, config(tokens=4096, repeat_epochs=True), tmp_path / "ok2", progress=False)
        assert s["tokens"] == 4096


def test_config_mistakes(store_url, tmp_path):
    misspelt = config()
    misspelt["batchsize"] = misspelt.pop("batch_tokens")
    fails(store_url, misspelt, tmp_path / "o", "unknown config key 'batchsize'")
    fails(store_url, config({"name": "x", "architecture": "topk"}), tmp_path / "o", "needs k")
    twins = config({"name": "a", "architecture": "topk", "k": 2}, {"name": "a", "architecture": "topk", "k": 3})
    fails(store_url, twins, tmp_path / "o", "two SAEs are named 'a'")
    fails(store_url, config(grid={"k": [4]}), tmp_path / "o", "has no architecture")
    # about TOML text itself: a file that breaks off inside a table header
    fails(store_url, sweep_toml(config()) + "\n[[sae\n", tmp_path / "o", "not valid TOML")
    with pytest.raises(UserError, match="no config file"):
        load_config(tmp_path / "missing.toml")


def test_grid_expands_with_automatic_names():
    cfg = load_config(config({"name": "relu", "architecture": "standard"},
                             grid={"architecture": ["batchtopk"], "k": [16, 64], "expansion": [8, 16]}))
    assert [s.name for s in cfg.saes] == ["relu", "batchtopk-k16-x8", "batchtopk-k16-x16", "batchtopk-k64-x8",
                                          "batchtopk-k64-x16"]
    s = cfg.saes[3]
    assert (s.k, s.expansion, s.d_sae, s.lr, s.topk_threshold_lr, s.l1_coefficient) == (64, 8, None, 1e-3, 0.01, None)
    assert (cfg.saes[0].d_sae, cfg.saes[0].expansion) == (32, None)  # from [defaults]
    # [defaults] keys that an architecture does not take are skipped for it
    assert cfg.saes[0].k is None and cfg.saes[0].l1_coefficient == 5.0


def test_output_folder_rules(store_url, tmp_path):
    with single_thread():
        out = tmp_path / "run"
        train_sweep(store_url, config(), out, progress=False)
        with pytest.raises(UserError, match="already holds a training run; pass --resume"):
            train_sweep(store_url, config(), out, progress=False)
        with pytest.raises(UserError, match="holds a different run"):
            train_sweep(store_url, config(seed=5), out, resume=True, progress=False)
        # resuming a finished run only re-exports it
        again = train_sweep(store_url, config(), out, resume=True, progress=False)
        assert again["steps"] == 16
        other = tmp_path / "other"
        other.mkdir()
        (other / "notes.txt").write_text("mine")
        with pytest.raises(UserError, match="not empty and holds no actcache run"):
            train_sweep(store_url, config(), other, progress=False)


def test_nan_loss_stops_with_the_sae_name_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    url = tmp_path / "bad.zarr"
    make_store(url, d=8, n_features=16, n_sequences=128, context_size=16, chunk_sequences=16)
    store = ActivationStore.open(url, mode="r+")
    bad_chunk = 5
    acts = np.full((16 * 16, 8), np.inf, dtype=np.float16)
    store.write_chunk(bad_chunk, store.read_tokens(bad_chunk), {HOOK: acts}, {HOOK: chunk_stats(acts)})
    store.finalize()
    # window_chunks = 1: the bad chunk's window starts at a known step
    from actcache.train.loader import ActivationLoader

    order = ActivationLoader(str(url), HOOK, 128, seed=0, window_chunks=1).chunk_order(0)
    bad_step = order.index(bad_chunk) * 256 // 128
    assert bad_step >= 2, "choose another bad chunk so that a checkpoint comes first"
    cfg = config({"name": "fine", "architecture": "standard"}, {"name": "victim", "architecture": "topk", "k": 4},
                 window_chunks=1, checkpoint_every_tokens=128)
    with single_thread():
        with pytest.raises(UserError) as e:
            train_sweep(str(url), cfg, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "SAE 'fine'" in msg and f"at step {bad_step}" in msg and f"checkpoint (step {bad_step})" in msg
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt["step"] == bad_step
    for member in ckpt["members"].values():
        assert all(bool(torch.isfinite(v).all()) for v in member["sae"].values())


def test_cli_prints_one_line_and_exits_2(store_url, tmp_path):
    cfg = write_sweep(config({"name": "x", "architecture": "topk", "k": 4, "l1_coefficient": 2.0}), tmp_path / "c.toml")
    proc = subprocess.run([sys.executable, "-m", "actcache", "train", store_url, "--config", str(cfg),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("actcache: error: SAE 'x'")
    assert not (tmp_path / "o").exists()


def test_a_run_record_of_the_release_before_still_resumes(tmp_path):
    """run.json written before the sweep's batch_size became batch_tokens (and --allow-repeat its
    repeat_epochs) is the same run; another batch is not."""
    import json

    from actcache.common.outputs import RUN_FILE
    from actcache.train.checkpoint import prepare_output

    run = {"store": "s.zarr", "config": {"batch_tokens": 128, "repeat_epochs": True, "tokens": 2048}}
    (tmp_path / "run").mkdir()
    old = {"store": "s.zarr", "config": {"batch_size": 128, "repeat_epochs": False, "tokens": 2048},
           "allow_repeat": True}
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(old))
    assert prepare_output(tmp_path / "run", run, resume=True) is True
    other = dict(run, config=dict(run["config"], batch_tokens=256))
    with pytest.raises(UserError, match="holds a different run"):
        prepare_output(tmp_path / "run", other, resume=True)
