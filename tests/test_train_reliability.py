"""The train stage under faults and hostile input: a crafted checkpoint, two writers on one run folder,
a crash mid-line, a full disk during a checkpoint, damaged chunks, and held-out sequences that must
never be read. Each with real processes and real files."""

import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actcache.common.errors import UserError
from actcache.common.store import ActivationStore
from actcache.train import trainer as trainer_module
from actcache.train.checkpoint import CHECKPOINT, load_checkpoint
from actcache.train.loader import ActivationLoader, normalisation_scale
from actcache.train.sweep import train_sweep
from distributed_fixtures import retry_lines
from tests.conftest import make_sweep, write_sweep, single_thread
from tests.synthetic import make_store

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"
SAES = ({"name": "t", "architecture": "topk", "k": 4}, {"name": "j", "architecture": "jumprelu"})
HEAD = {"batch_tokens": 128, "tokens": 4096, "log_every_steps": 8, "eval_tokens": 512, "window_chunks": 2, "seed": 1}


def config(*saes: dict, **top) -> dict:
    """This file's small sweep: a TopK and a JumpReLU SAE unless other SAEs are given."""
    return make_sweep(*(saes or SAES), defaults={"d_sae": 32, "lr": 1e-3}, **{**HEAD, **top})


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = tmp_path_factory.mktemp("rel") / "s.zarr"
    make_store(url, d=8, n_features=16, n_sequences=256, context_size=16, chunk_sequences=16)  # 16 chunks, 4096 tokens
    return str(url)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():  # the same arithmetic as the OMP_NUM_THREADS=1 subprocesses
        yield


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actcache", *map(str, args)], cwd=ROOT, env=kw.pop("env", env()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_error_line(proc: subprocess.Popen, timeout: float = 180) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    retried = retry_lines(err)  # a storage failure is retried first, each retry one line
    lines = [line for line in err.splitlines() if "error" in line.lower() and line not in retried]
    assert len(lines) == 1 and lines[0].startswith("actcache: error: "), err[-3000:]
    assert err.rstrip().endswith(lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------ safe loading
class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # what a crafted pickle does: call a function of the attacker's choice on load
        return (os.system, (f"touch {self.path}",))


def test_crafted_pickle_checkpoint_is_refused_and_runs_nothing(store_url, tmp_path):
    out = tmp_path / "run"
    train_sweep(store_url, config(), out, progress=False)
    (out / CHECKPOINT).unlink()
    marker = tmp_path / "pwned"
    with open(out / "checkpoint.pt", "wb") as f:
        pickle.dump({"step": 3, "members": _Touch(str(marker))}, f)
    # the file is live: unpickling it does create the marker
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(out / 'checkpoint.pt')!r}, 'rb'))"],
                   check=True, timeout=60)
    assert marker.exists()
    marker.unlink()

    cfg = write_sweep(config(), tmp_path / "sweep.toml")
    line = one_error_line(cli("train", store_url, "--config", cfg, "--out", out, "--resume"))
    assert "checkpoint.pt is a pickle file" in line and "--overwrite" in line
    assert not marker.exists()


def test_damaged_or_foreign_safetensors_checkpoint_is_one_line(store_url, tmp_path):
    out = tmp_path / "run"
    train_sweep(store_url, config(), out, progress=False)
    good = (out / CHECKPOINT).read_bytes()
    for bad in (good[:len(good) // 2], b"", b"\x00" * 64, good[:9] + b"X" + good[10:]):
        (out / CHECKPOINT).write_bytes(bad)
        with pytest.raises(UserError, match="the checkpoint .* cannot be read") as e:
            train_sweep(store_url, config(), out, resume=True, progress=False)
        assert "\n" not in str(e.value)
    # a valid safetensors file that is not an actcache checkpoint
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(out / CHECKPOINT))
    with pytest.raises(UserError, match="not an actcache checkpoint"):
        train_sweep(store_url, config(), out, resume=True, progress=False)


def test_checkpoint_round_trips_every_value_exactly(store_url, tmp_path):
    out = tmp_path / "run"
    train_sweep(store_url, config(), out, progress=False)
    st = load_checkpoint(out)
    assert st["step"] == 32 and isinstance(st["train_seconds"], float)
    opt = st["members"]["t"]["opt"]
    assert set(opt["state"]) == {0, 1, 2, 3} and isinstance(opt["param_groups"][0]["betas"], tuple)
    assert st["torch_rng"].dtype == torch.uint8 and st["members"]["t"]["aux_on"] in (True, False)
    assert st["loader"]["step"] == 32


# ------------------------------------------------------------------------------------ run folder
def test_two_trains_racing_on_one_folder_one_stops_at_once_naming_the_other(store_url, tmp_path):
    cfg = write_sweep(config(tokens=128 * 1000, checkpoint_every_tokens=128 * 10, repeat_epochs=True,
                             log_every_steps=10), tmp_path / "sweep.toml")
    out = tmp_path / "run"
    procs = [cli("train", store_url, "--config", cfg, "--out", out, "--resume", "--no-progress") for _ in range(2)]
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    loser = next((p for p in procs if p.poll() is not None), None)
    assert loser is not None, "neither run stopped"
    winner = procs[1 - procs.index(loser)]
    assert winner.poll() is None, "both runs ended: make the run longer so that they overlap"
    line = one_error_line(loser)
    assert f"being written by train pid {winner.pid}" in line
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err[-2000:]
    for name in ("t", "j"):
        steps = [json.loads(line)["step"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(0, 1000, 10)) + [999]
    assert not list(out.glob("*.tmp"))


def crash_after_checkpoint(monkeypatch, store_url: str, sweep: dict, out: Path, step: int, last_words=None) -> None:
    """Run a sweep that dies right after writing its checkpoint of `step` (last_words(trainer) runs first)."""
    original = trainer_module.Trainer.checkpoint

    def checkpoint_then_die(self, wait=True):
        original(self)  # written and on disk before the crash
        if self.step == step:
            if last_words is not None:
                last_words(self)
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer_module.Trainer, "checkpoint", checkpoint_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sweep(store_url, sweep, out, progress=False)
    monkeypatch.undo()


def test_overwrite_replaces_a_crashed_run_and_nothing_else(store_url, tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_after_checkpoint(monkeypatch, store_url, config(checkpoint_every_tokens=1024), out, 8)
    with pytest.raises(UserError, match="already holds a training run; pass --resume .* --overwrite"):
        train_sweep(store_url, config(seed=9), out, progress=False)
    with pytest.raises(UserError, match="contradict"):
        train_sweep(store_url, config(seed=9), out, resume=True, overwrite=True, progress=False)
    s = train_sweep(store_url, config(seed=9), out, overwrite=True, progress=False)
    assert s["seed"] == 9 and json.loads((out / "run.json").read_text())["config"]["seed"] == 9
    fresh = train_sweep(store_url, config(seed=9), tmp_path / "fresh", progress=False)
    for name in ("t", "j"):
        a, b = load_file(str(out / name / "sae_weights.safetensors")), load_file(
            str(tmp_path / "fresh" / name / "sae_weights.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (out / name / "metrics.jsonl").read_text() == (tmp_path / "fresh" / name / "metrics.jsonl").read_text()
    assert fresh["saes"][0]["explained_variance"] == s["saes"][0]["explained_variance"]
    # a folder that is not a run is never deleted
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="holds no actcache run"):
        train_sweep(store_url, config(), other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep"


def test_half_written_metrics_line_does_not_break_resume(store_url, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def half_a_line(trainer):
        with open(trainer.members[0].metrics_path, "a") as f:
            f.write('{"step": 16, "tokens": 21')  # the process died inside this write

    crash_after_checkpoint(monkeypatch, store_url, config(checkpoint_every_tokens=128 * 8), out, 16, half_a_line)
    train_sweep(store_url, config(checkpoint_every_tokens=128 * 8), out, resume=True, progress=False)
    train_sweep(store_url, config(checkpoint_every_tokens=128 * 8), tmp_path / "ref", progress=False)
    for name in ("t", "j"):
        assert (out / name / "metrics.jsonl").read_text() == (tmp_path / "ref" / name / "metrics.jsonl").read_text()


def test_disk_full_during_a_checkpoint_is_one_line_keeps_the_last_one_and_resume_is_bitwise(
        store_url, tmp_path, monkeypatch):
    sweep = config(checkpoint_every_tokens=128 * 8, log_every_steps=16)
    cfg = write_sweep(sweep, tmp_path / "sweep.toml")
    out = tmp_path / "run"
    crash_after_checkpoint(monkeypatch, store_url, sweep, out, 8)
    before = (out / CHECKPOINT).read_bytes()
    assert load_checkpoint(out)["step"] == 8

    def small_files():  # a real write failure: the kernel refuses files larger than the checkpoint (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) - 1, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    line = one_error_line(cli("train", store_url, "--config", cfg, "--out", out, "--resume", "--no-progress",
                              preexec_fn=small_files))
    assert line.startswith(f"actcache: error: disk full while writing {out / CHECKPOINT}")
    assert line.endswith("free some space and rerun the same command with --resume")
    assert (out / CHECKPOINT).read_bytes() == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    train_sweep(store_url, sweep, out, resume=True, progress=False)
    train_sweep(store_url, sweep, tmp_path / "ref", progress=False)
    a, b = load_checkpoint(out), load_checkpoint(tmp_path / "ref")
    assert a["step"] == b["step"] == 32
    for name in ("t", "j"):
        for k, v in a["members"][name]["sae"].items():
            assert torch.equal(v, b["members"][name]["sae"][k]), (name, k)
        for pa, pb in zip(a["members"][name]["opt"]["state"].values(), b["members"][name]["opt"]["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa)
        assert (out / name / "metrics.jsonl").read_text().count("\n") == (
            tmp_path / "ref" / name / "metrics.jsonl").read_text().count("\n")


# ------------------------------------------------------------------------------------ damaged chunks
def _chunk_file(store: Path, j: int) -> Path:
    p = store / "activations" / HOOK / "c" / str(j) / "0"
    assert p.is_file()
    return p


def test_a_damaged_chunk_read_by_train_is_one_line_naming_it(tmp_path):
    damages = {"deleted": lambda data: None, "truncated": lambda data: data[:len(data) // 2],
               "flipped": lambda data: data[:40] + bytes([data[40] ^ 0x10]) + data[41:], "empty": lambda data: b""}
    cfg = write_sweep(config(tokens=2048), tmp_path / "sweep.toml")
    runs = {}
    for i, (name, damage) in enumerate(damages.items()):  # one store per kind of damage, trained side by side
        url = tmp_path / f"{name}.zarr"
        make_store(url, d=8, n_features=16, n_sequences=128, context_size=16, chunk_sequences=16)
        j = 2 + i
        f = _chunk_file(url, j)
        data = damage(f.read_bytes())
        if data is None:
            f.unlink()
        else:
            f.write_bytes(data)
        runs[name] = (j, cli("train", url, "--config", cfg, "--out", tmp_path / f"run-{name}", "--no-progress"))
    for name, (j, proc) in runs.items():
        line = one_error_line(proc)
        assert f"chunk {j}" in line and HOOK in line and "actcache verify" in line, (name, line)


# ------------------------------------------------------------------------------------ held-out sequences
@pytest.fixture
def reads(monkeypatch):
    """Every chunk the store is asked for, by anyone (the loader's threads included)."""
    seen = {"acts": [], "tokens": []}
    read_chunk, read_tokens = ActivationStore.read_chunk, ActivationStore.read_tokens
    read_chunk_into = ActivationStore.read_chunk_into

    def rc(self, hook, j):
        seen["acts"].append(j)
        return read_chunk(self, hook, j)

    def rci(self, hook, j, out):  # the loader decodes into its window this way
        seen["acts"].append(j)
        return read_chunk_into(self, hook, j, out)

    def rt(self, j):
        seen["tokens"].append(j)
        return read_tokens(self, j)

    monkeypatch.setattr(ActivationStore, "read_chunk", rc)
    monkeypatch.setattr(ActivationStore, "read_chunk_into", rci)
    monkeypatch.setattr(ActivationStore, "read_tokens", rt)
    return seen


def _direct_scale(store: ActivationStore, chunks: list[int]) -> float:
    x = np.concatenate([store.activations(HOOK)[slice(*store.chunk_row_range(j))] for j in chunks]).astype(np.float64)
    return float(np.sqrt(x.shape[1] / (x ** 2).sum(1).mean()))


def test_training_never_reads_a_user_named_held_out_range(store_url, tmp_path, reads):
    # sequences [72, 100) touch chunks 4, 5 and 6 (16 sequences each): all three stay unread
    cfg = config(tokens=128 * 40, repeat_epochs=True, skip_special_tokens=True, held_out="72:100")
    out = tmp_path / "run"
    summary = train_sweep(store_url, cfg, out, progress=False)
    assert reads["acts"] and set(reads["acts"]) == set(range(16)) - {4, 5, 6}
    assert set(reads["tokens"]) <= set(range(16)) - {4, 5, 6}
    held = [{"start_sequence": 72, "stop_sequence": 100}]
    run = json.loads((out / "run.json").read_text())
    assert run["held_out"] == held and summary["held_out"] == held
    assert "store_fingerprint" in run and "store_fingerprint" in summary
    assert json.loads((out / "summary.json").read_text())["held_out"] == held
    # normalisation from the training chunks only
    store = ActivationStore.open(store_url)
    train_ids = [j for j in range(16) if j not in (4, 5, 6)]
    assert summary["normalization_scale"] == pytest.approx(_direct_scale(store, train_ids), rel=1e-4)
    assert abs(_direct_scale(store, train_ids) - normalisation_scale(store, HOOK)) > 1e-6


def test_loader_skips_the_stores_own_held_out_part(store_url, monkeypatch, reads):
    monkeypatch.setattr(ActivationStore, "held_out_range", lambda self: (224, 256), raising=False)
    ld = ActivationLoader(store_url, HOOK, batch_size=256, seed=0, window_chunks=3, threads=2, repeat=True)
    rows = torch.cat([ld.next_batch(return_rows=True)[1] for _ in range(3 * 14 * 256 // 256)])
    ld.close()
    assert int(rows.max()) < 224 * 16  # no row of sequences 224..255
    assert set(reads["acts"]) == set(range(14))
    assert ld.state_dict()["held_out"] == [[224, 256]]


def test_bad_held_out_range_is_refused_before_anything_is_written(store_url, tmp_path):
    for bad in ([10, 5], [0, 9999], [1.5, 4], [3], "all"):
        with pytest.raises(UserError, match="held_out") as e:
            train_sweep(store_url, config(held_out=bad), tmp_path / "o", progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "o").exists()
    # everything held out
    with pytest.raises(UserError, match="outside the held-out part"):
        train_sweep(store_url, config(held_out="0:256"), tmp_path / "o", progress=False)
    # fewer training tokens than asked for once the range is left out
    with pytest.raises(UserError, match="outside its held-out part"):
        train_sweep(store_url, config(held_out="0:16"), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3_store():
    """An S3 server on loopback that the tests stop and start again (conftest's moto_s3), holding a
    synthetic store; its AWS_* variables in os.environ while the module's tests run."""
    from conftest import moto_s3

    with moto_s3("train-rel") as server, pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        url = "s3://train-rel/s.zarr"
        make_store(url, d=8, n_features=16, n_sequences=128, context_size=16, chunk_sequences=16)  # 8 chunks
        yield {"server": server, "url": url, "endpoint": server.endpoint}


def test_s3_endpoint_dying_during_training_is_one_line_and_resume_completes(s3_store, tmp_path):
    s3 = s3_store
    cfg = write_sweep(config(tokens=128 * 100, checkpoint_every_tokens=128 * 5, repeat_epochs=True,
                             log_every_steps=10), tmp_path / "sweep.toml")
    out = tmp_path / "run"
    # a retry budget of 1 s: the reads are retried, briefly, before the one line
    victim = cli("train", s3["url"], "--config", cfg, "--out", out, "--no-progress",
                 env=env(ACTCACHE_STORAGE_RETRY_SECONDS="1"))
    wait_for_checkpoint(victim, out)
    s3["server"].stop()
    line = one_error_line(victim)
    assert "reading chunk" in line and s3["url"] in line and "--resume" in line, line
    st = load_checkpoint(out)
    assert 5 <= st["step"] < 100 and f"the checkpoint of step {st['step']}" in line

    restart(s3)  # the same data, back again
    resumed = cli("train", s3["url"], "--config", cfg, "--out", out, "--resume", "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming at step {st['step']}" in err
    steps = [json.loads(line)["step"] for line in (out / "t" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 100, 10)) + [99]


def wait_for_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and not (out / CHECKPOINT).is_file() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the server stopped: make it longer"


def restart(s3) -> None:
    s3["server"].start_again()  # the same port, the same objects


def test_s3_server_restarting_during_training_is_retried_and_the_run_is_bitwise_the_same(s3_store, tmp_path):
    """A real training process reading the store from S3; the server stops after the first checkpoint and
    is back on the same port 3 s later: the reads are retried, the run finishes by itself (exit 0, no
    --resume) with bitwise the weights of an uninterrupted run."""
    s3 = s3_store
    sweep = config(tokens=128 * 100, checkpoint_every_tokens=128 * 5, repeat_epochs=True, log_every_steps=10)
    cfg = write_sweep(sweep, tmp_path / "sweep.toml")
    out = tmp_path / "run"
    p = cli("train", s3["url"], "--config", cfg, "--out", out, "--no-progress")
    try:
        wait_for_checkpoint(p, out)
        s3["server"].stop()
        time.sleep(3)
    finally:
        restart(s3)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "Traceback" not in err and "actcache: error" not in err, err[-3000:]
    retried = retry_lines(err)
    assert retried and all(f" in {s3['url']} failed (" in line for line in retried), err[-3000:]
    assert "resuming" not in err

    train_sweep(s3["url"], sweep, tmp_path / "ref", progress=False)  # uninterrupted, in this process
    for name in ("t", "j"):
        a, b = (load_file(str(d / name / "sae_weights.safetensors")) for d in (out, tmp_path / "ref"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_s3_location_problems_at_the_start_are_one_line_before_any_work(s3_store, tmp_path):
    import urllib.request

    s3 = s3_store
    cfg = write_sweep(config(), tmp_path / "sweep.toml")
    closed = f"http://127.0.0.1:{_closed_port()}"
    cases = {
        "no bucket": cli("train", "s3://no-such-bucket/s.zarr", "--config", cfg, "--out", tmp_path / "a"),
        "endpoint down": cli("train", s3["url"], "--config", cfg, "--out", tmp_path / "b",
                             env=env(AWS_ENDPOINT_URL=closed, AWS_MAX_ATTEMPTS="1")),
    }
    lines = {name: one_error_line(p) for name, p in cases.items()}
    assert "s3://no-such-bucket/s.zarr" in lines["no bucket"]
    assert s3["url"] in lines["endpoint down"] and "AWS_ENDPOINT_URL" in lines["endpoint down"]
    # wrong credentials: the server now checks every request's key, and "test" is no key it knows
    reset = f"{s3['endpoint']}/moto-api/reset-auth"
    urllib.request.urlopen(urllib.request.Request(reset, data=b"0", method="POST", headers=TEXT)).read()
    try:
        line = one_error_line(cli("train", s3["url"], "--config", cfg, "--out", tmp_path / "c",
                                  env=env(AWS_MAX_ATTEMPTS="1")))
    finally:
        urllib.request.urlopen(urllib.request.Request(reset, data=b"inf", method="POST", headers=TEXT)).read()
    assert s3["url"] in line, line
    assert not any((tmp_path / x).exists() for x in "abc")


TEXT = {"Content-Type": "text/plain"}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
