"""No fill value stands in for missing data: zarr reads an absent chunk as its fill value (zeros). The
chunk file of each array a command relies on (token ids, per-chunk and summary statistics, digests) is
deleted from a real store, and each command that reads it (train's normalisation, eval, features, info,
verify) must refuse in one line naming the array and the chunk, never go on with zeros."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from actcache.common.store import ActivationStore, chunk_key

from eval_fixtures import HOOK, harvest_store, make_sae
from harvest_fixtures import cli_subprocess, run_cli, write_token_jsonl
from tests.conftest import make_sweep, write_sweep


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A harvested store (random model, held-out chunks at the end) and the facts the tests need."""
    tmp = tmp_path_factory.mktemp("missing")
    data = write_token_jsonl(tmp / "data.jsonl", vocab=500)
    harvest_store(tmp / "acts.zarr", data, tokens=1024, hooks=(HOOK,))
    st = ActivationStore.open(str(tmp / "acts.zarr"))
    held = st.held_out_range()
    assert held is not None and st.manifest.complete
    return tmp / "acts.zarr", held[0] // st.manifest.chunk_sequences


def damaged(base, tmp_path: Path, path: str, j: int) -> Path:
    """A copy of the store without chunk j of the array at `path` (its file deleted)."""
    store = tmp_path / "acts.zarr"
    shutil.copytree(base[0], store)
    st = ActivationStore.open(str(store), check=False)
    f = store / chunk_key(st.array(path), j)
    assert f.is_file(), f
    f.unlink()
    return store


def run_folder(tmp_path: Path, store: Path) -> Path:
    run = tmp_path / "run"
    make_sae("random", hook=HOOK).save_model(run / "s")
    (run / "summary.json").write_text(json.dumps({"store": str(store), "saes": [{"name": "s"}]}))
    return run


def one_line(code: int, err: str, *says: str) -> str:
    """The command failed with one error line (log lines of the work begun may come before it), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("actcache: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    for s in says:
        assert s in errors[0], errors[0]
    return errors[0]


def train_args(tmp_path: Path, store: Path, skip_special: bool = True, hook: str = HOOK) -> list[str]:
    cfg = make_sweep({"name": "t", "architecture": "topk", "k": 4}, defaults={"d_sae": 64}, hook=hook,
                     tokens=896, batch_tokens=64, eval_tokens=128, skip_special_tokens=skip_special)  # every training chunk
    return ["train", str(store), "--config", str(write_sweep(cfg, tmp_path / "s.toml")), "--out",
            str(tmp_path / "out"), "--no-progress"]


# ------------------------------------------------------------------ token ids
def test_a_missing_token_chunk_stops_eval_features_and_verify(base, tmp_path, capfd):
    j = base[1] - 1  # not the last chunk, which opening the store checks already
    store = damaged(base, tmp_path, "tokens", j)
    run = run_folder(tmp_path, store)
    cs = ActivationStore.open(str(store)).manifest.chunk_sequences
    want = f"chunk {j} of tokens in {store} is committed but missing"
    one_line(*run_cli(["eval", str(run), "--held-out", f"{j * cs}:{(j + 1) * cs}"], capfd)[::2], want)
    assert not (run / "s" / "eval.json").exists()
    one_line(*run_cli(["features", str(run), "--all", "--out", str(tmp_path / "f"), "--no-logits",
                               "--no-progress"], capfd)[::2], want)
    assert not (tmp_path / "f").exists()
    code, out, _ = run_cli(["verify", str(store)], capfd)
    assert code == 1 and f"tokens chunk {j}: missing" in out


def test_a_missing_training_token_chunk_stops_train(tmp_path, capfd):
    """Training reads token ids to leave BOS/EOS/pad out (a store whose tokenizer has them)."""
    from tests.conftest import SYNTHETIC_HOOK
    from tests.synthetic import make_store

    store = tmp_path / "syn.zarr"
    make_store(store, d=8, n_features=16, n_sequences=64, context_size=16, chunk_sequences=8)
    assert ActivationStore.open(str(store)).manifest.tokenizer.bos_token_id is not None
    (store / chunk_key(ActivationStore.open(str(store)).array("tokens"), 3)).unlink()
    args = train_args(tmp_path, store, hook=SYNTHETIC_HOOK)
    one_line(*run_cli(args, capfd)[::2], f"chunk 3 of tokens in {store} is committed but missing")
    assert not (tmp_path / "out" / "t").exists()


# ------------------------------------------------------------------ per-chunk statistics
def test_a_missing_per_chunk_statistic_stops_info_and_verify(base, tmp_path, capfd):
    path = "stats/chunks"  # every hook's partial sums of a chunk (format 3)
    store = damaged(base, tmp_path, path, 1)
    one_line(*run_cli(["info", str(store)], capfd)[::2], f"chunk 1 of {path} in {store} is committed but missing")
    code, out, _ = run_cli(["verify", str(store)], capfd)
    assert code == 1 and f"{path} chunk 1: missing" in out, out


@pytest.mark.parametrize("chunk", [0, 1])
def test_train_never_normalises_with_a_missing_statistic(base, tmp_path, capfd, chunk):
    path = "stats/chunks"
    store = damaged(base, tmp_path, path, chunk)
    # skip_special_tokens off: the token ids are not read, the statistics decide the scale
    one_line(*run_cli(train_args(tmp_path, store, skip_special=False), capfd)[::2],
             f"chunk {chunk} of {path} in {store} is committed but missing")
    assert not (tmp_path / "out" / "t").exists()


# ------------------------------------------------------------------ digests and summary statistics
def test_a_missing_digest_is_named_by_verify(base, tmp_path, capfd):
    store = damaged(base, tmp_path, "digests", 2)
    code, out, _ = run_cli(["verify", str(store)], capfd)
    assert code == 1 and "digests chunk 2: missing" in out, out
    assert "does not match the digest" not in out  # not a zero digest compared with the data
    # the fingerprint is not recomputed from a zero digest either: the API names the chunk
    with pytest.raises(Exception, match="chunk 2 of digests .* is committed but missing"):
        ActivationStore.open(str(store)).compute_fingerprint()


@pytest.mark.parametrize("key", ["mean", "var"])
def test_a_missing_summary_statistic_is_named_by_verify(base, tmp_path, capfd, key):
    store = damaged(base, tmp_path, f"stats/{HOOK}/{key}", 0)
    code, out, _ = run_cli(["verify", str(store)], capfd)
    assert code == 1 and f"stats/{HOOK}/{key}: missing (it would read as zeros)" in out, out


@pytest.mark.parametrize("key", ["count", "mean_norm", "max_abs", "n_nonfinite"])
def test_a_missing_or_changed_summary_scalar_is_named_by_verify(base, tmp_path, capfd, key):
    """Format 3 keeps the scalars in the attributes of stats/<hook>: one removed or changed is named."""
    for change in ("missing", "changed"):
        store = tmp_path / change / "acts.zarr"
        shutil.copytree(base[0], store)
        meta_file = store / "stats" / HOOK / "zarr.json"
        meta = json.loads(meta_file.read_text())
        if change == "missing":
            del meta["attributes"][key]
        else:
            meta["attributes"][key] += 1.0
        meta_file.write_text(json.dumps(meta))
        code, out, _ = run_cli(["verify", str(store)], capfd)
        want = "missing" if change == "missing" else "does not match the per-chunk statistics"
        assert code == 1 and f"stats/{HOOK}: attribute {key!r} {want}" in out, out


def test_a_real_process_names_the_missing_chunk(base, tmp_path):
    """The same refusal from the installed entry point in a fresh process (info, per-chunk count)."""
    path = "stats/chunks"
    store = damaged(base, tmp_path, path, 0)
    r = cli_subprocess(["info", str(store)])
    one_line(r.returncode, r.stderr, f"chunk 0 of {path} in {store} is committed but missing")
