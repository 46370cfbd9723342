"""Lockstep sweeps, SAELens export, and resuming after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_sweep, write_sweep, single_thread
from tests.synthetic import make_store
from actcache.train.checkpoint import load_checkpoint
from actcache.common.sae import SAE, WEIGHT_KEYS
from actcache.train.sweep import train_sweep

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"


HEAD = {"batch_tokens": 256, "seed": 3, "log_every_steps": 10, "dead_window_tokens": 2048, "eval_tokens": 2048,
        "window_chunks": 2}


def config(*saes: dict, tokens: int = 16384, **top) -> dict:
    """This file's sweep of the given SAEs over the 16384-token store."""
    return make_sweep(*saes, defaults={"lr": 1e-3, "d_sae": 64}, tokens=tokens, **{**HEAD, **top})


ALL_SAES = (
    {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
    {"name": "gated", "architecture": "gated"},
    {"name": "jump", "architecture": "jumprelu", "l0_coefficient": 0.5},
    {"name": "matryoshka", "architecture": "matryoshka_batchtopk", "k": 4, "matryoshka_widths": [16]},
)
ALL_GRID = {"architecture": ["topk", "batchtopk"], "k": [4]}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = tmp_path_factory.mktemp("sweep") / "s.zarr"
    make_store(url, d=16, n_features=48, n_sequences=512, context_size=32, chunk_sequences=16)
    return str(url)


@pytest.fixture(scope="module")
def all_archs(store_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "out"
    with single_thread():
        summary = train_sweep(store_url, config(*ALL_SAES, grid=ALL_GRID), out, progress=False)
    return summary, out


def _metrics(out: Path, name: str) -> list:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "sae_weights.safetensors"))


def test_lockstep_sweep_equals_single_sae_runs(store_url, all_archs, tmp_path):
    """Every SAE of the sweep saw exactly the batches a run of that SAE alone sees."""
    _, out = all_archs
    with single_thread():
        for entry in [{"name": "topk-k4", "architecture": "topk", "k": 4},
                      {"name": "jump", "architecture": "jumprelu", "l0_coefficient": 0.5}]:
            name = entry["name"]
            single = train_sweep(store_url, config(entry), tmp_path / name, progress=False)
            assert len(single["saes"]) == 1
            a, b = _weights(out / name), _weights(tmp_path / name / name)
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (name, k)
            assert _metrics(out, name) == _metrics(tmp_path / name, name)


def test_folders_have_saelens_layout(all_archs):
    summary, out = all_archs
    for row in summary["saes"]:
        folder = Path(row["path"])
        cfg = json.loads((folder / "cfg.json").read_text())
        for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                    "normalize_activations", "reshape_activations", "metadata"):
            assert key in cfg, (row["name"], key)
        assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
        for key in ("sae_lens_version", "model_name", "hook_name", "context_size", "prepend_bos", "dataset_path"):
            assert key in cfg["metadata"], key
        assert cfg["metadata"]["hook_name"] == HOOK
        assert ("k" in cfg) == (cfg["architecture"] == "topk")
        assert set(_weights(folder)) == set(WEIGHT_KEYS[cfg["architecture"]])
        density = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
        assert density.shape == (cfg["d_sae"],) and float(density.max()) <= 0
        assert (folder / "metrics.jsonl").read_text().count("\n") >= 6


def test_python_api_matches_training_and_folds_normalisation(all_archs, store_url):
    """Exported SAEs run on raw activations x and give what the trained SAE gives on scale * x, / scale."""
    from actcache.common.store import ActivationStore
    from actcache.train.config import load_config, resolve
    from actcache.train.loader import normalisation_scale
    from actcache.train.architectures import build_sae

    summary, out = all_archs
    store = ActivationStore.open(store_url)
    scale = normalisation_scale(store, HOOK)
    assert abs(scale - 1.0) > 0.05  # the fold is really exercised
    x = torch.from_numpy(store.read_chunk(HOOK, 0)[:512]).float()
    cfg = resolve(load_config(config(*ALL_SAES, grid=ALL_GRID)), store)
    trained = load_checkpoint(out)["members"]
    for sc in cfg.saes:
        sae = SAE.load_from_disk(out / sc.name)
        assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16) and sae.b_dec.shape == (16,)
        f = sae.encode(x)
        assert f.shape == (512, 64) and bool((f >= 0).all())
        torch.testing.assert_close(sae(x), sae.decode(f))
        if sc.architecture in ("standard", "gated", "jumprelu", "topk"):  # batch top-k differs by design
            ts = build_sae(sc, torch.Generator().manual_seed(0))
            ts.load_state_dict(trained[sc.name]["sae"])
            with torch.no_grad():
                x_hat = ts.step_loss(x * scale, 1.0, torch.zeros(64, dtype=torch.bool), False).x_hat
            torch.testing.assert_close(sae(x), x_hat / scale, atol=1e-4, rtol=1e-4)
        if sc.architecture == "topk":
            assert int((f > 0).sum(1).max()) <= 4
        again_dir = out / "_copy" / sc.name
        sae.save_model(again_dir)
        torch.testing.assert_close(SAE.load_from_disk(again_dir).encode(x), f)


# run in the sae-lens environment: python check.py x.pt FOLDER... writes x.pt.out, per folder what SAELens
# makes of it (its class, architecture, encode, decode, forward, metadata.hook_name_out)
SAELENS_CHECK = r"""
import sys, torch
from pathlib import Path
from sae_lens import SAE
x = torch.load(sys.argv[1])
out = {}
for folder in sys.argv[2:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        f = sae.encode(x)
        out[Path(folder).name] = {"class": type(sae).__name__, "arch": sae.cfg.architecture(), "encode": f,
                                  "decode": sae.decode(f), "forward": sae(x),
                                  "hook_out": sae.cfg.metadata.hook_name_out}
torch.save(out, sys.argv[1] + ".out")
"""


def test_saelens_loads_every_folder_and_encodes_identically(saelens_python, all_archs, store_url, tmp_path):
    py = saelens_python  # the conftest fixture: skips where there is no sae-lens environment
    from actcache.common.store import ActivationStore

    summary, _ = all_archs
    x = torch.from_numpy(ActivationStore.open(store_url).read_chunk(HOOK, 1)[:256]).float()
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "check.py"
    script.write_text(SAELENS_CHECK)
    folders = [r["path"] for r in summary["saes"]]
    proc = subprocess.run([py, str(script), str(tmp_path / "x.pt"), *folders], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "x.pt.out")
    for row in summary["saes"]:
        ours = SAE.load_from_disk(row["path"])
        t = theirs[row["name"]]
        assert t["arch"] == ours.cfg.architecture == row["exported_as"]
        f = ours.encode(x)
        torch.testing.assert_close(t["encode"], f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t["decode"], ours.decode(f), atol=1e-5, rtol=1e-5)
        assert float((f > 0).float().sum(1).mean()) > 0  # not a trivially silent SAE


# ---------------------------------------------------------------------------------------- resume
RESUME_SAES = (
    {"name": "topk", "architecture": "topk", "k": 4},
    {"name": "batchtopk", "architecture": "batchtopk", "k": 4},
    {"name": "jump", "architecture": "jumprelu", "l0_coefficient": 0.5},
)


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "actcache", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_equals_uninterrupted_run(store_url, tmp_path):
    # 400 steps of 256 tokens over a 16384-token store (repeated epochs), a checkpoint every 20 steps
    cfg = write_sweep(config(*RESUME_SAES, tokens=102400, checkpoint_every_tokens=5120, repeat_epochs=True),
                      tmp_path / "sweep.toml")
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = _run_cli(["train", store_url, "--config", str(cfg), "--out", str(full), "--no-progress"])

    victim = _run_cli(["train", store_url, "--config", str(cfg), "--out", str(cut), "--no-progress"])
    ckpt = cut / "checkpoint.safetensors"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if ckpt.is_file() and load_checkpoint(cut)["step"] >= 60:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed: make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = load_checkpoint(cut)["step"]
    assert 60 <= killed_at < 400 and not (cut / "summary.json").exists()

    # the folder now holds a run: without --resume it is refused with one line
    refused = _run_cli(["train", store_url, "--config", str(cfg), "--out", str(cut)])
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "--resume" in err and "Traceback" not in err

    resumed = _run_cli(["train", store_url, "--config", str(cfg), "--out", str(cut), "--resume", "--no-progress"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming at step {killed_at}" in err
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]

    a, b = load_checkpoint(full), load_checkpoint(cut)
    assert a["step"] == b["step"] == 400
    for name in ("topk", "batchtopk", "jump"):
        sa, sb = a["members"][name], b["members"][name]
        for k in sa["sae"]:
            assert torch.equal(sa["sae"][k], sb["sae"][k]), (name, k)
        assert torch.equal(sa["since_fired"], sb["since_fired"])
        for pa, pb in zip(sa["opt"]["state"].values(), sb["opt"]["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa)
        wa, wb = _weights(full / name), _weights(cut / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert (full / name / "metrics.jsonl").read_text().count("\n") == (cut / name / "metrics.jsonl").read_text().count("\n")
