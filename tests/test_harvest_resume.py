"""Resume: a harvest killed with SIGKILL at several points, or stopped by a full disk, and resumed with
--resume, ends byte for byte equal to an uninterrupted run."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from actcache import HarvestConfig, harvest, verify
from actcache.common.store import ActivationStore
from actcache.harvest.data import TokenWindows, resolve_source
from harvest_fixtures import HOOKS, RANDOM, ROOT, array_files, cli_subprocess, env, harvest_args, write_token_jsonl


def committed(store) -> int:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["actcache"]["n_chunks_committed"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return -1


def start(args):
    return subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)


def kill_when(p, store, condition, timeout=120.0) -> int:
    """SIGKILL the process as soon as condition(n_committed) holds; returns the count seen at that moment."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = committed(store)
        if condition(n):
            p.send_signal(signal.SIGKILL)
            p.wait()
            return n
        if p.poll() is not None:
            pytest.fail(f"the harvest ended before it could be killed: {p.stderr.read()[-2000:]}")
        time.sleep(0.005)
    p.kill()
    pytest.fail("the harvest did not reach the kill point in time")


def chunks_past_counter(store, counter) -> set[int]:
    """The chunks with a file in some array (activations, tokens, digests, statistics) at or past the
    counter: written, or being written, but not committed."""
    return {int(f.name) for c in store.rglob("c") if c.is_dir() for f in c.iterdir()
            if f.name.isdigit() and int(f.name) >= counter}


def reference(tmp_path, data, n_tokens, hooks=HOOKS, chunk=8, batch=4, seed=0):
    cfg = HarvestConfig(out=str(tmp_path / "reference.zarr"), hooks=list(hooks), model=RANDOM, dataset=str(data),
                        context_size=32, tokens=n_tokens, batch_size=batch, chunk_sequences=chunk, seed=seed,
                        device="cpu")
    harvest(cfg, progress=False)
    return tmp_path / "reference.zarr"


def test_sigkill_at_several_points_then_resume_is_byte_identical(tmp_path):
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=400)
    n_tokens, n_chunks = 24 * 8 * 32, 24
    out = tmp_path / "killed.zarr"
    args = harvest_args(out, data, tokens=n_tokens, chunk=8, batch=4)

    seen = [kill_when(start(args), out, lambda n: n >= 1)]  # right after the first commit
    assert 1 <= seen[0] < n_chunks
    past = [chunks_past_counter(out, committed(out))]
    seen.append(kill_when(start(args + ["--resume"]), out, lambda n: n >= n_chunks // 2))  # mid-way
    assert seen[1] < n_chunks
    past.append(chunks_past_counter(out, committed(out)))
    p = start(args + ["--resume"])  # at an arbitrary moment: a few milliseconds after the next commit
    seen.append(kill_when(p, out, lambda n: n > seen[1] + 1 and time.sleep(0.013) is None))
    assert committed(out) < n_chunks, "the last kill came too late to test anything"
    past.append(chunks_past_counter(out, committed(out)))
    # a kill loses at most one chunk that reached the disk: the next one is handed to the writer only
    # after this one is written and its commit queued before it (with the part of a chunk in the forward)
    assert all(len(p) <= 1 for p in past), past
    assert verify(out).ok  # everything below the counter is intact at every moment

    done = cli_subprocess(args + ["--resume"])
    assert done.returncode == 0, done.stderr
    assert "resumed at chunk" in done.stdout
    ref = reference(tmp_path, data, n_tokens)
    got, want = array_files(out), array_files(ref)
    assert got.keys() == want.keys() and len(want) > 4 * n_chunks
    assert [k for k in want if got[k] != want[k]] == []
    assert verify(out).ok
    fp = ActivationStore.open(out).fingerprint  # the per-chunk digests were kept across the kills
    assert fp is not None and fp == ActivationStore.open(ref).fingerprint == verify(out).fingerprint


def _dataset_with_a_late_incompressible_part(tmp_path):
    """Most documents repeat one token (their activation chunks compress well); a few are random (they
    do not). Returns the data file, a seed, and the first chunk that holds random tokens (>= 2)."""
    rng = np.random.default_rng(1)
    with open(tmp_path / "mixed.jsonl", "w") as f:
        for i in range(40):
            ids = rng.integers(0, 1000, 160).tolist() if i % 8 == 0 else [7] * 160
            f.write(json.dumps({"input_ids": ids}) + "\n")
    data = tmp_path / "mixed.jsonl"
    for seed in range(50):
        windows = TokenWindows(resolve_source(str(data)), 32, vocab_size=1000, seed=seed).windows()
        first_random = next(i for i, w in enumerate(windows) if (w != 7).any())
        if first_random // 8 >= 2:
            return data, seed, first_random // 8
    pytest.fail("no seed puts the random documents late enough")


def test_disk_full_mid_write_is_one_line_and_resume_completes(tmp_path):
    data, seed, first_bad = _dataset_with_a_late_incompressible_part(tmp_path)
    out = tmp_path / "full.zarr"
    hooks = ["blocks.0.hook_resid_pre"]
    args = harvest_args(out, data, "--seed", str(seed), hooks=hooks, tokens=16 * 8 * 32, chunk=8, batch=4)

    def small_files():  # a real write failure: the kernel refuses files above 16 KiB (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    p = subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True, env=env(),
                       cwd=ROOT, timeout=300, preexec_fn=small_files)
    errors = [l for l in p.stderr.splitlines() if "error" in l.lower()]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(errors) == 1 and errors[0].startswith("actcache: error: disk full while writing chunk")
    assert "--resume" in errors[0]
    assert committed(out) == first_bad and verify(out).ok  # resumable: what is committed is whole

    done = cli_subprocess(args + ["--resume"])
    assert done.returncode == 0, done.stderr
    ref = reference(tmp_path, data, 16 * 8 * 32, hooks=hooks, seed=seed)
    got, want = array_files(out), array_files(ref)
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []


def test_resume_after_a_kill_during_store_creation(tmp_path):
    import zarr

    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=40)
    out = tmp_path / "half.zarr"
    group = zarr.open_group(str(out), mode="w", zarr_format=3)  # the group and an array, but no manifest yet
    group.create_array("tokens", shape=(4, 32), dtype="int32")
    cfg = HarvestConfig(out=str(out), hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32,
                        tokens=16 * 32, batch_size=4, chunk_sequences=8, device="cpu", resume=True)
    harvest(cfg, progress=False)
    ref = reference(tmp_path, data, 16 * 32, hooks=HOOKS[:1])
    assert array_files(out) == array_files(ref) and verify(out).ok


def test_two_overwrite_harvests_racing_on_one_store_second_fails_at_once(tmp_path):
    """Two real processes, `--overwrite` on one store with different seeds: the second stops at once with
    one line naming the holder; the store is wholly the first one's."""
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=400)
    n_tokens = 24 * 8 * 32
    out = tmp_path / "raced.zarr"
    first = start(harvest_args(out, data, "--overwrite", "--seed", "1", tokens=n_tokens, chunk=8, batch=4))
    deadline = time.time() + 120
    while committed(out) < 1 and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    assert first.poll() is None, "the first harvest ended before the second could race it"
    # the first is paused mid-harvest (holding its lease), so it cannot finish while the second starts up
    os.kill(first.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        second = cli_subprocess(harvest_args(out, data, "--overwrite", "--seed", "2", tokens=n_tokens, chunk=8,
                                             batch=4))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    errors = [l for l in second.stderr.splitlines() if "error" in l.lower()]
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert len(errors) == 1 and "is being written by harvest pid" in errors[0] and str(first.pid) in errors[0]
    assert time.time() - t0 < 60
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    ref = reference(tmp_path, data, n_tokens, seed=1)
    got, want = array_files(out), array_files(ref)
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []
    assert verify(out).ok
