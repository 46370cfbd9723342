"""Every option is checked before the work, in real processes through the `actcache` entry point: a
non-finite steering strength, a negative token count, an output folder that cannot be written, SAE
names that would share a browser folder, a transcoder that reads and reconstructs the same hook, a
local model folder that holds a pickle, a resumed torchrun run with another number of ranks; and
non-finite results are flagged (null in JSON), warned about, and exit non-zero."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch

from actcache.common.sae import SAE, Metadata, SAEConfig

from eval_fixtures import HOOK, RANDOM, harvest_store, make_sae
from harvest_fixtures import cli_subprocess, message_lines, run_cli, write_token_jsonl
from tests.conftest import make_sweep, write_sweep


def one_line(r, *says: str, code: int = 2) -> str:
    lines = message_lines(r.stderr)
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("actcache: error: "), (r.returncode,
                                                                                                  r.stderr)
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A store of a random model and a run of two SAEs, in a folder every user may read (the read-only
    cases run as an unprivileged user when the tests run as root, who may write anywhere)."""
    tmp = Path(tempfile.mkdtemp(prefix="actcache-opts-"))
    tmp.chmod(0o755)
    data = write_token_jsonl(tmp / "data.jsonl", vocab=500)
    harvest_store(tmp / "acts.zarr", data, tokens=1024, hooks=(HOOK,))
    run = tmp / "run"
    for name, seed in (("a", 1), ("b", 2)):
        make_sae("random", hook=HOOK, seed=seed).save_model(run / name)
    (run / "summary.json").write_text(json.dumps({"store": str(tmp / "acts.zarr"), "saes": []}))
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
    yield tmp, run
    shutil.rmtree(tmp, ignore_errors=True)


def unprivileged(args: list[str]):
    """`actcache ARGS` in a fresh process as a user whom a read-only folder stops (nobody, when root)."""
    if os.geteuid() != 0:
        return cli_subprocess(args)
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder stops nobody")
    import subprocess
    import sys

    from harvest_fixtures import ROOT, env

    e = env() | {"HOME": "/tmp"}
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "actcache", *args], capture_output=True, text=True, env=e, cwd="/tmp", timeout=300)


def read_only(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    return folder


# ------------------------------------------------------------------ options checked before the work
@pytest.mark.parametrize("strength", ["nan", "inf", "-inf"])
def test_steer_refuses_a_non_finite_strength(shared, strength):
    _, run = shared
    r = cli_subprocess(["steer", str(run / "a"), "--feature", "0", "--strength", strength, "--prompt", "x"])
    one_line(r, f"--strength {float(strength)!r}: give a finite number")
    assert r.stdout == ""


@pytest.mark.parametrize("tokens", ["-5", "0"])
def test_eval_refuses_a_token_count_that_is_not_positive_and_keeps_the_old_result(shared, tokens):
    _, run = shared
    (run / "a" / "eval.json").write_text('{"kept": true}')
    r = cli_subprocess(["eval", str(run), "--tokens", tokens])
    one_line(r, f"--tokens {tokens}: give a positive number of tokens")
    assert json.loads((run / "a" / "eval.json").read_text()) == {"kept": True}
    (run / "a" / "eval.json").unlink()


def test_features_refuses_an_output_folder_it_cannot_write_before_the_work(shared):
    tmp, run = shared
    parent = read_only(tmp / "ro-features")
    try:
        t = time.perf_counter()
        r = unprivileged(["features", str(run), "--out", str(parent / "feat"), "--no-logits", "--no-progress"])
        # the lease beside --out is the first thing written: it names the folder and the cause
        line = one_line(r, str(parent), "Permission denied")
        assert "top contexts" not in r.stderr and r.stdout == ""  # refused before the pass over the store
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
    assert time.perf_counter() - t < 60, line


def test_eval_refuses_an_sae_folder_it_cannot_write_before_the_work(shared):
    tmp, _ = shared
    (tmp / "open").mkdir(exist_ok=True)
    (tmp / "open").chmod(0o777)  # eval's lease on the run (beside it) can be taken: the SAE folder is what stops it
    run = tmp / "open" / "ro-run"
    make_sae("random", hook=HOOK).save_model(run / "s")
    (run / "summary.json").write_text(json.dumps({"store": str(tmp / "acts.zarr"), "saes": []}))
    for p in [run, *run.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    read_only(run / "s")
    try:
        r = unprivileged(["eval", str(run)])
        one_line(r, f"cannot write eval.json in {run / 's'}", "Permission denied")
        assert r.stdout == ""
    finally:
        (run / "s").chmod(0o755)
    assert not (run / "s" / "eval.json").exists()


def test_sae_names_that_share_a_browser_folder_are_refused(shared, tmp_path):
    tmp, _ = shared
    run = tmp_path / "run"
    for name in ("a b", "a_b"):
        make_sae("random", hook=HOOK).save_model(run / name)
    (run / "summary.json").write_text(json.dumps({"store": str(tmp / "acts.zarr"), "saes": []}))
    r = cli_subprocess(["features", str(run), "--out", str(tmp_path / "f"), "--no-logits"])
    one_line(r, "the SAEs 'a b' and 'a_b' would share the browser folder saes/a_b")
    assert not (tmp_path / "f").exists()
    # one of them alone is fine: the name is sanitised, the page is its own
    r = cli_subprocess(["features", str(run), "--sae", "a b", "--out", str(tmp_path / "f"), "--no-logits",
                        "--tokens", "256"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f" / "saes" / "a_b" / "latents.json").is_file()


def test_a_transcoder_that_reconstructs_its_own_input_hook_is_refused_at_config_time(shared, tmp_path, capfd):
    tmp, _ = shared
    cfg = make_sweep({"name": "t", "architecture": "transcoder", "hook_out": HOOK}, defaults={"d_sae": 64},
                     hook=HOOK, tokens=512, batch_tokens=64)
    code, out, err = run_cli(["train", str(tmp / "acts.zarr"), "--config", str(write_sweep(cfg, tmp_path / "s.toml")),
                              "--out", str(tmp_path / "out")], capfd)
    assert code == 2 and err.strip().count("\n") == 0
    assert f"SAE 't': hook_out is {HOOK!r}, the hook it reads" in err
    assert not (tmp_path / "out").exists()


def test_a_local_model_folder_holding_a_pickle_is_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10}))
    torch.save({"wte.weight": torch.zeros(10, 8)}, folder / "pytorch_model.bin")
    for command in (["hooks", str(folder)], ["analyse", str(tmp_path / "none"), "--model", str(folder), "--prompt", "x"]):
        if command[0] == "analyse":
            make_sae("random", d=8, hook="blocks.0.hook_resid_pre").save_model(tmp_path / "none")
        r = cli_subprocess(command)
        one_line(r, f"the model folder {folder} holds its weights as a pickle (pytorch_model.bin)")
        assert "Unpickling" not in r.stderr


def test_resuming_with_another_number_of_ranks_says_how_many(shared, tmp_path, capfd):
    tmp, _ = shared
    cfg = make_sweep({"name": "t", "architecture": "topk", "k": 4}, defaults={"d_sae": 64}, hook=HOOK,
                     tokens=512, batch_tokens=64, eval_tokens=128)
    args = ["train", str(tmp / "acts.zarr"), "--config", str(write_sweep(cfg, tmp_path / "s.toml")),
            "--out", str(tmp_path / "out"), "--no-progress"]
    code, _, err = run_cli(args, capfd)
    assert code == 0, err
    run_json = tmp_path / "out" / "run.json"
    run = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**run, "world_size": 2}))  # as a two-rank torchrun job records it
    code, _, err = run_cli(args + ["--resume"], capfd)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "was trained on 2 ranks and this run has 1" in err and "rerun with 2 ranks (torchrun --nproc-per-node 2" in err


# ------------------------------------------------------------------ non-finite results
def test_non_finite_metrics_are_null_flagged_warned_and_exit_non_zero(shared, tmp_path):
    """Weights that are finite but overflow float32 on the way (W_enc of 1e30): eval's metrics come out
    non-finite. They are written as null with the flag, never as a bare NaN, and the exit is 1."""
    tmp, _ = shared
    g = torch.Generator().manual_seed(0)
    d, n = 32, 64
    w = {"W_enc": torch.randn(d, n, generator=g) * 1e30, "b_enc": torch.zeros(n),
         "W_dec": torch.randn(n, d, generator=g) * 1e30, "b_dec": torch.zeros(d)}
    meta = Metadata(hook_name=HOOK, model_name=RANDOM, model_spec=RANDOM)
    SAE(SAEConfig("standard", d, n, metadata=meta), w).save_model(tmp_path / "big")
    r = cli_subprocess(["eval", "--sae", str(tmp_path / "big"), "--store", str(tmp / "acts.zarr"), "--json",
                        "--tokens", "64"])
    assert r.returncode == 1, r.stderr
    assert "non-finite metrics" in r.stderr and "big" in r.stderr
    assert "NaN" not in r.stdout and "Infinity" not in r.stdout
    rec = json.loads(r.stdout)[0]
    assert rec["non_finite"] and all(rec[k] is None for k in rec["non_finite"] if "." not in k and "[" not in k)
    text = (tmp_path / "big" / "eval.json").read_text()
    assert "NaN" not in text and json.loads(text)["non_finite"] == rec["non_finite"]


    # analyse (token ids: the random model has no tokenizer): the same flag, and JSON without NaN
    from actcache.harvest.analysis import analyse

    d = analyse(tmp_path / "big", [1, 2, 3, 4], top=2).to_dict()
    assert d["non_finite"] and "NaN" not in json.dumps(d)
