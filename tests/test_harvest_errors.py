"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and the store untouched."""

import json
import shutil

import pytest

from actcache.harvest import HarvestConfig, harvest
from harvest_fixtures import (HOOKS, RANDOM, cli_subprocess, harvest_args, message_lines,
                              run_cli, snapshot, write_token_jsonl)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_jsonl(tmp_path_factory.mktemp("data") / "toks.jsonl", n_docs=40)


@pytest.fixture(scope="module")
def existing(tmp_path_factory, data):
    """A finished small store that the bad commands must leave exactly as it is."""
    out = tmp_path_factory.mktemp("existing") / "acts.zarr"
    harvest(HarvestConfig(out=str(out), hooks=HOOKS[:2], model=RANDOM, dataset=str(data), context_size=32,
                          tokens=512, batch_size=4, chunk_sequences=8, device="cpu"), progress=False)
    return out


def assert_one_line_error(code, err, *fragments):
    lines = message_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("actcache: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def write(path, text):
    path.write_text(text)
    return path


CASES = {
    # name: (extra args or overrides, expected fragments)
    "unknown model": (dict(model="no-such-org/no-such-model-xyz"), ["unknown model 'no-such-org/no-such-model-xyz'"]),
    "unknown hook": (dict(hooks=["blocks.1.hook_mlp_outt"]), ["unknown hook", "did you mean blocks.1.hook_mlp_out"]),
    "hook past last layer": (dict(hooks=["blocks.7.hook_resid_post"]), ["past the last layer", "2 layers"]),
    "missing dataset path": (dict(dataset="./no/such/dir/data.jsonl"), ["dataset path ./no/such/dir/data.jsonl does not exist"]),
    "missing text column": (dict(dataset="columns"), ["no column 'text'", "columns: id, content", "--text-column"]),
    "empty dataset": (dict(dataset="empty"), ["empty.txt is empty"]),
    "short dataset": (dict(dataset="short"), ["gave no token window"]),
    "context larger than n_ctx": (dict(extra=["--context-size", "512"]), ["context size 512", "n_ctx (256)"]),
    "invalid codec": (dict(extra=["--codec", "zstd-99"]), ["invalid codec 'zstd-99'"]),
    "unknown codec": (dict(extra=["--codec", "brotli"]), ["invalid codec 'brotli'", "zstd"]),
    "token ids outside the vocabulary": (dict(dataset="bigids"), ["token id 5000", "outside the model's vocabulary"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, data, capfd):
    over, fragments = CASES[case]
    datasets = {
        "columns": write(tmp_path / "c.jsonl", '{"id": 1, "content": "x"}\n'),
        "empty": write(tmp_path / "empty.txt", ""),
        "short": write(tmp_path / "short.jsonl", '{"input_ids": [1, 2, 3]}\n'),
        "bigids": write(tmp_path / "big.jsonl", json.dumps({"input_ids": [5000] * 100}) + "\n"),
    }
    dataset = datasets.get(over.get("dataset"), over.get("dataset", data))
    out = tmp_path / "new.zarr"
    args = harvest_args(out, dataset, *over.get("extra", []), hooks=over.get("hooks", HOOKS[:1]),
                        model=over.get("model", RANDOM), tokens=512)
    code, _, err = run_cli(args, capfd)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_existing_output_is_never_touched(existing, data, capfd):
    before = snapshot(existing)
    code, _, err = run_cli(harvest_args(existing, data, hooks=HOOKS[:2], tokens=512), capfd)
    assert_one_line_error(code, err, "already exists", "--resume", "--overwrite")
    assert snapshot(existing) == before


@pytest.mark.parametrize("change,fragment", [
    (["--seed", "3"], "seed (store has 0, now 3)"),
    (["--batch-size", "8"], "batch_size (store has 4, now 8)"),
    (["--hook", HOOKS[2]], "hooks"),
])
def test_resume_with_other_arguments_is_refused_naming_the_difference(existing, data, capfd, change, fragment):
    before = snapshot(existing)
    args = harvest_args(existing, data, "--resume", hooks=HOOKS[:2], tokens=512)
    if change[0] == "--batch-size":
        args[args.index("--batch-size") + 1] = change[1]
    else:
        args += change
    code, _, err = run_cli(args, capfd)
    assert_one_line_error(code, err, "cannot resume", fragment)
    assert snapshot(existing) == before


def test_other_format_version_is_refused(existing, data, tmp_path, capfd):
    old = tmp_path / "v99.zarr"
    shutil.copytree(existing, old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["actcache"]["format_version"] = 99
    (old / "zarr.json").write_text(json.dumps(meta))
    before = snapshot(old)
    for args in (harvest_args(old, data, "--resume", hooks=HOOKS[:2], tokens=512), ["info", str(old)],
                 ["verify", str(old)]):
        code, _, err = run_cli(args, capfd)
        assert_one_line_error(code, err, "format version 99")
    assert snapshot(old) == before


def test_errors_in_a_real_process(existing, data, tmp_path):
    p = cli_subprocess(harvest_args(tmp_path / "n.zarr", data, hooks=["blocks.0.hook_resid_psot"]))
    assert_one_line_error(p.returncode, p.stderr, "did you mean blocks.0.hook_resid_post")
    before = snapshot(existing)
    p = cli_subprocess(harvest_args(existing, data, hooks=HOOKS[:2]))
    assert_one_line_error(p.returncode, p.stderr, "already exists")
    assert snapshot(existing) == before and not (tmp_path / "n.zarr").exists()


def test_ctrl_c_during_a_harvest_says_how_to_continue(data, tmp_path):
    """SIGINT to a real harvest: one line saying to rerun with --resume, exit 130, and the store resumable."""
    import signal
    import subprocess
    import sys
    import time

    from harvest_fixtures import ROOT, env

    out = tmp_path / "i.zarr"
    # enough data (about 300k tokens) that the harvest cannot finish before the signal lands
    big = write_token_jsonl(tmp_path / "big.jsonl", n_docs=3_000)
    args = harvest_args(out, big, hooks=HOOKS[:1], tokens=2_000_000, batch=2, chunk=2)
    # Ctrl-C as in a terminal: a test run started in the background (nohup, `&` in a script) ignores
    # SIGINT, and children inherit that; the harvest gets the default disposition, as a user's shell gives it
    p = subprocess.Popen([sys.executable, "-m", "actcache", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env(), cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    from actcache.common.store import ActivationStore

    def committed() -> int:
        try:
            return ActivationStore.open(str(out), "r").n_committed
        except Exception:  # noqa: BLE001  (not created yet)
            return 0

    deadline = time.time() + 120
    while committed() < 1 and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()  # inside the forward passes
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = message_lines(err)
    assert p.returncode == 130, err
    assert lines[-1] == "actcache: interrupted; rerun with --resume to continue", err
    assert "Traceback" not in err and "aborted" not in err
    assert committed() >= 1  # what was committed stays, for --resume
