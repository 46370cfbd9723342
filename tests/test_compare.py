"""`actcache compare`: runs of different stores are refused in one line; runs of one store compare, with
the numbers the folders hold; held-out and training-stream numbers are never mixed silently."""

from __future__ import annotations

import json
import shutil

import pytest

from actcache.train import train_sweep
from actcache.common.outputs import sae_digest
from actcache.train.compare import compare, compare_table

from conftest import make_sweep, single_thread
from harvest_fixtures import message_lines, run_cli
from tests.synthetic import make_store

HOOK = "blocks.0.hook_resid_pre"


def sweep(seed: int) -> dict:
    return make_sweep({"name": "topk4", "architecture": "topk", "k": 4},
                      {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
                      defaults={"lr": 1e-3, "d_sae": 32}, hook=HOOK, tokens=2048, batch_tokens=256, seed=seed,
                      eval_tokens=1024, window_chunks=2, log_every_steps=8, dead_window_tokens=1024)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    for name, seed in (("s1", 0), ("s2", 1)):
        make_store(base / f"{name}.zarr", d=16, n_features=32, n_sequences=128, context_size=16, chunk_sequences=16,
                   seed=seed)
    with single_thread():
        train_sweep(str(base / "s1.zarr"), sweep(1), base / "a", progress=False)
        train_sweep(str(base / "s1.zarr"), sweep(2), base / "b", progress=False)
        train_sweep(str(base / "s2.zarr"), sweep(1), base / "c", progress=False)
    return base


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_runs_of_different_stores_are_refused_in_one_line(runs, capfd):
    a, c = _summary(runs / "a"), _summary(runs / "c")
    assert a["store_fingerprint"] != c["store_fingerprint"]
    code, out, err = run_cli(["compare", str(runs / "a"), str(runs / "c")], capfd)
    lines = message_lines(err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith("actcache: error:"), err
    assert "different data" in lines[0] and a["store_fingerprint"] in lines[0] and c["store_fingerprint"] in lines[0]
    assert "--allow-mixed" in lines[0] and out == ""
    # asked for, they are shown as two groups
    code, out, err = run_cli(["compare", str(runs / "a"), str(runs / "c"), "--allow-mixed", "--json"], capfd)
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert [g["store_fingerprint"] for g in groups] == [a["store_fingerprint"], c["store_fingerprint"]]


def test_runs_of_one_store_compare_with_the_numbers_the_folders_hold(runs, capfd, tmp_path):
    plot = tmp_path / "frontier.png"
    code, out, err = run_cli(["compare", str(runs / "a"), str(runs / "b"), "--json", "--plot", str(plot)], capfd)
    assert code == 0, err
    (group,) = json.loads(out)["groups"]
    assert group["measured_on"] == "training stream"
    rows = [(r["source"], r["name"], r["l0"], r["fvu"]) for r in group["rows"]]
    want = [(str(runs / run), s["name"], s["l0"], s["fvu"]) for run in "ab" for s in _summary(runs / run)["saes"]]
    assert rows == want  # folders in the order given, SAEs in sweep order, the values summary.json holds
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli(["compare", str(runs / "a"), str(runs / "b" / "relu")], capfd)
    assert code == 0, err
    assert "| relu |" in out and "L0 (training stream)" in out


def test_held_out_numbers_group_apart_from_training_stream_ones(runs, tmp_path):
    """An evaluated SAE (eval.json) is compared on its held-out numbers, which do not mix with another
    run's training-stream numbers; two evaluated SAEs of the same scored sequences compare."""
    a = tmp_path / "a"
    shutil.copytree(runs / "a", a)
    fp = _summary(a)["store_fingerprint"]
    for name, (l0, fvu, ce) in {"topk4": (4.0, 0.31, 0.87), "relu": (9.5, 0.22, 0.91)}.items():
        (a / name / "eval.json").write_text(json.dumps({
            "name": name, "l0": l0, "fvu": fvu, "ce_loss_score": ce, "kl_div_score": 0.8, "dead_fraction": 0.1,
            "dense_fraction": 0.0, "store_fingerprint": fp, "held_out": {"start_sequence": 112, "stop_sequence": 128},
            "sequences_scored": {"start_sequence": 112, "stop_sequence": 120}, "sae_digest": sae_digest(a / name)}))
    (group,) = compare([a])
    assert [(r.l0, r.fvu, r.ce_loss_score, r.measured_on) for r in group.rows] == [
        (4.0, 0.31, 0.87, "held-out"), (9.5, 0.22, 0.91, "held-out")]
    with pytest.raises(Exception, match="different data"):
        compare([a, runs / "b"])
    groups = compare([a, runs / "b"], allow_mixed=True)
    assert [g.measured_on for g in groups] == ["held-out", "training stream"]
    # an evaluation of other weights (the folder retrained since) is shown as stale, never used
    ev = json.loads((a / "relu" / "eval.json").read_text())
    (a / "relu" / "eval.json").write_text(json.dumps({**ev, "sae_digest": {"weights": "sha256:0", "cfg": "sha256:0"}}))
    groups = compare([a], allow_mixed=True)
    relu = next(r for g in groups for r in g.rows if r.name == "relu")
    assert relu.stale_eval and relu.measured_on == "training stream" and relu.l0 == _summary(a)["saes"][1]["l0"]
    assert "stale eval" in compare_table(groups)


def test_flags_show_in_compare(runs):
    (group,) = compare([runs / "a"])
    s = _summary(runs / "a")
    for row, want in zip(group.rows, s["saes"]):
        assert row.flags == want["flags"]
