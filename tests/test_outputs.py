"""Output folders: --overwrite deletes only the project's own output of the same kind, never '.', a
parent, the command's input or a symlink's target; a second writer is refused, also through a symlink;
results name the weights they measured and go stale with them.

One suite of destination cases runs against every kind of output folder (store, run, features output)
through the real `actcache` entry point; the races use real processes paused with SIGSTOP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actcache.common import outputs
from actcache.train import train_sweep
from actcache.train.features import load_features, write_features
from conftest import make_sweep, single_thread, write_sweep
from eval_fixtures import HOOK, RANDOM, harvest_store
from harvest_fixtures import env, message_lines, run_cli, write_token_jsonl

SWEEP = make_sweep({"name": "t", "architecture": "topk", "k": 4}, defaults={"lr": 1e-3, "d_sae": 64}, hook=HOOK,
                   tokens=1024, batch_tokens=128, seed=1, eval_tokens=256, window_chunks=2, held_out="100:128")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("outputs")
    (base / "data").mkdir()
    data = write_token_jsonl(base / "data" / "d.jsonl", vocab=500)
    harvest_store(base / "acts.zarr", data)
    write_sweep(SWEEP, base / "sweep.toml")
    with single_thread():
        train_sweep(str(base / "acts.zarr"), SWEEP, base / "run", progress=False)
    write_features(base / "run", base / "features", tokens=256, held_out=False, top=3, progress=False)
    shutil.copytree(base / "acts.zarr", base / "copy.zarr")
    return base


def command(kind: str, world: Path, out: str | Path) -> list[str]:
    """The command that writes an output of `kind` at `out`, with --overwrite."""
    if kind == "store":
        return ["harvest", "--model", RANDOM, "--dataset", str(world / "data" / "d.jsonl"), "--hook", HOOK,
                "--context-size", "16", "--tokens", "256", "--batch-size", "8", "--chunk-sequences", "8",
                "--out", str(out), "--overwrite"]
    if kind == "run":
        return ["train", str(world / "acts.zarr"), "--config", str(world / "sweep.toml"), "--out", str(out), "--overwrite",
                "--no-progress"]
    return ["features", str(world / "run"), "--out", str(out), "--tokens", "128", "--all", "--overwrite",
            "--no-logits", "--no-progress"]


KINDS = {"store": outputs.STORE, "run": outputs.RUN, "features": outputs.FEATURES}
INPUT = {"store": "data", "run": "acts.zarr", "features": "run"}  # a folder each command reads
OTHER = {"store": "run", "run": "features", "features": "copy.zarr"}  # an output of another kind


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(args, capfd, *words) -> str:
    code, out, err = run_cli(args, capfd)
    lines = message_lines(err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith("actcache: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return request.param


def test_a_users_folder_is_never_replaced(kind, world, tmp_path, capfd):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(command(kind, world, mine), capfd, "nothing was deleted")
    assert tree(mine) == {"notes.txt": b"keep"}


def test_the_current_folder_and_its_parents_are_refused(kind, world, tmp_path, capfd, monkeypatch):
    here = tmp_path / "here"
    (here / "deep").mkdir(parents=True)
    (here / "notes.txt").write_text("keep")
    monkeypatch.chdir(here / "deep")
    refused(command(kind, world, ".."), capfd, "current folder or one of its parents")
    refused(command(kind, world, "."), capfd, "current folder")
    assert (here / "notes.txt").read_text() == "keep" and (here / "deep").is_dir()


def test_the_commands_own_input_is_refused(kind, world, capfd):
    src = world / INPUT[kind]
    before = tree(src)
    refused(command(kind, world, src), capfd, "input")
    refused(command(kind, world, world), capfd, "input")  # the folder holding it
    assert tree(src) == before


def test_an_output_of_another_kind_is_refused(kind, world, capfd):
    other = world / OTHER[kind]
    before = tree(other)
    line = refused(command(kind, world, other), capfd, "nothing was deleted")
    assert f"no actcache {KINDS[kind].name}" in line
    assert tree(other) == before


def test_a_symlink_is_never_replaced_through(kind, world, tmp_path, capfd):
    target = tmp_path / "real"
    assert run_cli(command(kind, world, target), capfd)[0] == 0
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    refused(command(kind, world, link), capfd, "symbolic link")
    assert tree(target) == before


def test_an_output_of_the_same_kind_is_replaced(kind, world, tmp_path, capfd):
    out = tmp_path / "out"
    code, _, err = run_cli(command(kind, world, out), capfd)
    assert code == 0, err
    assert outputs.kind_of(out) is KINDS[kind]
    code, _, err = run_cli(command(kind, world, out), capfd)
    assert code == 0, err
    assert outputs.kind_of(out) is KINDS[kind]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder or lock left
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # as any folder the user makes (not private: 0700)


def test_a_users_file_in_a_runs_sae_folder_or_features_output_refuses_train_overwrite(world, tmp_path, capfd):
    """A README added to an SAE folder before sharing it, or notes in the run's features output, were
    deleted with the run by train --overwrite."""
    run = tmp_path / "run"
    assert run_cli(command("run", world, run), capfd)[0] == 0
    assert run_cli(command("features", world, run / "features"), capfd)[0] == 0
    for extra in (run / "t" / "README.md", run / "features" / "notes.txt"):
        extra.write_text("keep")
        before = tree(run)
        refused(command("run", world, run), capfd, str(extra.relative_to(run)), "nothing was deleted")
        assert tree(run) == before
        extra.unlink()
    assert run_cli(command("run", world, run), capfd)[0] == 0  # its own files only: replaced
    assert not (run / "features").exists()


def test_another_commands_write_probe_is_not_a_users_file(world, tmp_path):
    """eval creates and removes a probe file in a run and its SAE folders before its work; a train
    --overwrite that came at that instant called it a file actcache did not write, instead of naming
    the eval that holds the run."""
    import tempfile

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    for folder in (run, run / "t"):
        fd, name = tempfile.mkstemp(prefix=outputs.PROBE_MARK, dir=folder)
        os.close(fd)
        assert outputs.owned_entries(run, outputs.RUN)[1] == [], folder
        os.unlink(name)
    (run / "t" / "notes.txt").write_text("keep")  # while a user's file still is
    assert outputs.owned_entries(run, outputs.RUN)[1] == [run / "t"]


def test_an_output_holding_a_users_files_is_not_replaced(kind, world, tmp_path, capfd):
    """A user's file or folder beside our own entries, or a link to elsewhere among them, refuses
    --overwrite of the whole output (a features output and a store lost them before)."""
    out = tmp_path / "out"
    assert run_cli(command(kind, world, out), capfd)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("keep")
    for extra in ("notes.txt", "mine", "link"):
        before = tree(out)
        if extra == "notes.txt":
            (out / extra).write_text("keep")
        elif extra == "mine":
            (out / extra).mkdir()
            (out / extra / "draft.txt").write_text("keep")
        else:
            (out / extra).symlink_to(elsewhere)
        refused(command(kind, world, out), capfd, extra, "did not write", "nothing was deleted")
        assert {k: v for k, v in tree(out).items() if not k.startswith(extra)} == before
        assert outputs.kind_of(out) is KINDS[kind] and tree(elsewhere) == {"data.txt": b"keep"}
        shutil.rmtree(out / extra) if extra == "mine" else (out / extra).unlink()
    assert run_cli(command(kind, world, out), capfd)[0] == 0  # once they are moved away, it is replaced


# ---------------------------------------------------------------------------------- real processes
def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=cwd)


def wait_for_lease(out: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    lock = Path(outputs.lock_path(out))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lock.is_file() and f'"pid": {p.pid}' in lock.read_text():
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    raise AssertionError("the first process never took its lease")


def test_the_users_files_survive_features_overwrite_in_a_real_process(world, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    p = subprocess.run([sys.executable, "-m", "actcache", *command("features", world, mine)], capture_output=True,
                       text=True, env=env(), cwd=tmp_path, timeout=300)
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "nothing was deleted" in p.stderr, p.stderr
    assert tree(mine) == {"thesis.tex": b"years of work"}


def test_two_features_into_one_new_folder_one_is_refused_at_once(world, tmp_path):
    out = tmp_path / "f"
    first = start(command("features", world, out)[:-1] + ["--tokens", "128"], tmp_path)
    try:
        wait_for_lease(out, first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, "-m", "actcache", *command("features", world, out)],
                                capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
        assert second.returncode != 0, second.stderr
        assert f"being written by features pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert outputs.is_features(out)


def test_a_symlink_does_not_get_around_the_lease(world, tmp_path):
    real = tmp_path / "acts.zarr"
    args = command("store", world, real)
    first = start([a for a in args if a != "--overwrite"], tmp_path)
    try:
        wait_for_lease(real, first)
        first.send_signal(signal.SIGSTOP)
        link = tmp_path / "link.zarr"
        link.symlink_to(real)
        resume = [a if a != str(real) else str(link) for a in args if a != "--overwrite"] + ["--resume"]
        second = subprocess.run([sys.executable, "-m", "actcache", *resume], capture_output=True, text=True,
                                env=env(), cwd=tmp_path, timeout=300)
        assert second.returncode != 0 and f"being written by harvest pid {first.pid}" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err


def test_features_killed_midway_leaves_the_old_output_and_the_next_run_cleans_up(world, tmp_path, capfd):
    """SIGKILL during a features --overwrite: the previous output is untouched; the killed writer's
    temporary folder (which nothing else removes) is deleted by the next writer of that output, and a
    neighbour's temporary folder is not."""
    out = tmp_path / "f"
    assert run_cli(command("features", world, out), capfd)[0] == 0
    before = tree(out)
    neighbour = tmp_path / f"{outputs.TEMP_MARK}f.x.abcdefgh"  # what a writer of --out f.x would make
    neighbour.mkdir()
    p = start(command("features", world, out), tmp_path)
    try:
        wait_for_lease(out, p)
        p.send_signal(signal.SIGSTOP)
        deadline = time.time() + 60
        while not [q for q in tmp_path.iterdir() if q.name.startswith(f"{outputs.TEMP_MARK}f.") and q != neighbour]:
            p.send_signal(signal.SIGCONT)
            time.sleep(0.01)
            p.send_signal(signal.SIGSTOP)
            assert time.time() < deadline and p.poll() is None
    finally:
        p.kill()
        p.wait(timeout=60)
    assert tree(out) == before
    assert run_cli(command("features", world, out), capfd)[0] == 0
    assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".")) == [neighbour.name]


def test_eval_and_train_on_one_run_one_is_refused_at_once(world, tmp_path, capfd):
    """An eval paused mid-work holds its run: a train --overwrite of that run is refused naming it (it used
    to replace the weights under the eval, which then wrote its eval.json and CE plot of the deleted SAEs
    beside the new ones, exit 0); a paused train refuses an eval the same way."""
    run = tmp_path / "run"
    assert run_cli(command("run", world, run), capfd)[0] == 0
    ev = start(["eval", str(run), "--tokens", "64"], tmp_path)
    try:
        wait_for_lease(run, ev)
        ev.send_signal(signal.SIGSTOP)
        refused(command("run", world, run), capfd, f"being written by eval pid {ev.pid}")
    finally:
        ev.send_signal(signal.SIGCONT)
    _, err = ev.communicate(timeout=300)
    assert ev.returncode == 0, err
    assert outputs.read_eval(run / "t") is not None  # it measured the weights that are there

    tr = start(command("run", world, run), tmp_path)
    try:
        wait_for_lease(run, tr)
        tr.send_signal(signal.SIGSTOP)
        refused(["eval", str(run), "--tokens", "64"], capfd, f"being written by train pid {tr.pid}")
    finally:
        tr.send_signal(signal.SIGCONT)
    _, err = tr.communicate(timeout=300)
    assert tr.returncode == 0, err
    assert not (run / "t" / "eval.json").exists() and not (run / outputs.CE_FRONTIER_PLOT).exists()


# ---------------------------------------------------------------------------------- results and weights
def test_results_record_the_weights_they_measured_and_go_stale_with_them(world, tmp_path, capfd):
    run = tmp_path / "run"
    assert run_cli(command("run", world, run), capfd)[0] == 0
    code, out, err = run_cli(["eval", str(run), "--tokens", "64", "--json"], capfd)
    assert code == 0, err
    record = json.loads(out)[0]
    folder = run / "t"
    import hashlib

    want = "sha256:" + hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert record["sae_digest"]["weights"] == want
    assert outputs.read_eval(folder)["ce_loss_score"] == record["ce_loss_score"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["saes"][0]["eval"]["sae_digest"]["weights"] == want
    assert (run / "frontier_ce.png").is_file()

    feats = write_features(run, tmp_path / "feats", tokens=128, held_out=False, top=3, progress=False)
    assert feats["saes"][0]["sae_digest"]["weights"] == want
    assert load_features(tmp_path / "feats")["saes"][0]["stale"] is False

    # other weights in the folder (changed by hand): the result is stale and readers drop it
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["b_dec"] = weights["b_dec"] + 1
    save_file(weights, str(folder / "sae_weights.safetensors"))
    assert outputs.read_eval(folder) is None
    assert load_features(tmp_path / "feats")["saes"][0]["stale"] is True
    from actcache.evaluate import write_run_summary

    write_run_summary(run, [])
    assert "eval" not in json.loads((run / "summary.json").read_text())["saes"][0]

    # train --overwrite leaves no derived result behind
    code, out, err = run_cli(["eval", str(run), "--tokens", "64"], capfd)
    assert code == 0, err
    assert (folder / "eval.json").is_file()
    assert run_cli(command("run", world, run), capfd)[0] == 0
    assert not (folder / "eval.json").exists() and not (run / "frontier_ce.png").exists()
    assert "eval" not in json.loads((run / "summary.json").read_text())["saes"][0]
