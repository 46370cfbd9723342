"""Store format 3 and the reader's checks: absent, truncated and corrupt chunks are one-line errors,
open() compares the manifest with the arrays, the fingerprint identifies the data, held-out chunks,
version 1 stays readable, xarray opens a store, and the plain-zarr snippet of docs/store-format.md gives exact counts."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from actcache import HarvestConfig, harvest, info, verify
from actcache.common.errors import StoreError
from actcache.common.info import format_info
from actcache.common.store import ATTR, ActivationStore
from harvest_fixtures import HOOKS, RANDOM, ROOT, env, write_token_jsonl
from synthetic import make_store
from tests.conftest import make_sweep

HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture()
def store_path(tmp_path):
    """A complete synthetic store of 40 sequences in chunks of 16: the last chunk holds 8."""
    make_store(tmp_path / "s.zarr", n_sequences=40, chunk_sequences=16, d=16, n_features=32)
    return tmp_path / "s.zarr"


def chunk_file(store: Path, j: int, array: str = f"activations/{HOOK}") -> Path:
    return store / array / "c" / str(j) / "0"


def damage_chunk(f: Path, damage: str) -> None:
    """Delete a chunk file, cut it in half, flip one bit of its data or of its stored crc32c (the data
    intact, its checksum not), or empty it."""
    raw = f.read_bytes()
    if damage == "flipped checksum":
        f.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x01]))
    elif damage == "deleted":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped byte":
        f.write_bytes(raw[:20] + bytes([raw[20] ^ 0x10]) + raw[21:])
    else:
        f.write_bytes(b"")


def test_reading_an_absent_token_chunk_or_an_uncommitted_chunk_is_an_error(store_path):
    chunk_file(store_path, 0, "tokens").unlink()
    store = ActivationStore.open(store_path)
    with pytest.raises(StoreError, match=r"chunk 0 of tokens .* committed but missing.*actcache verify"):
        store.read_tokens(0)
    with pytest.raises(StoreError, match="chunk 3 of .* is not committed"):
        store.read_chunk(HOOK, 3)


def test_open_checks_the_manifest_against_the_arrays(store_path, tmp_path):
    def broken(change) -> str:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}.zarr"
        shutil.copytree(store_path, copy)
        change(copy)
        with pytest.raises(StoreError) as e:
            ActivationStore.open(copy)
        assert "\n" not in str(e.value) and "actcache verify" in str(e.value)
        rep = verify(copy)  # verify lists it too, and never crashes
        assert not rep.ok
        return str(e.value)

    assert "chunk 2 is committed but missing" in broken(lambda p: chunk_file(p, 2).unlink())
    assert f"activations/{HOOK}: missing" in broken(lambda p: shutil.rmtree(p / "activations" / HOOK))

    def wider(p):
        zarr.open_array(p / "activations" / HOOK, mode="r+").resize((40 * 32, 17))
    assert "do not match the manifest" in broken(wider)

    def overcommitted(p):
        g = zarr.open_group(p, mode="r+")
        m = dict(g.attrs[ATTR])
        m["n_chunks_committed"] = 7
        g.attrs[ATTR] = m
    assert "7 chunks committed" in broken(overcommitted)


def test_committed_counts_are_exact_with_a_partial_last_chunk(store_path):
    store = ActivationStore.open(store_path)
    assert store.n_chunks == 3 and store.n_committed == 3
    assert store.n_committed_sequences == 40 and store.n_committed_tokens == 40 * 32
    assert info(store_path)["n_tokens"] == 40 * 32


def test_fingerprint_survives_a_copy_and_changes_with_any_stored_value(store_path, tmp_path):
    store = ActivationStore.open(store_path)
    fp = store.fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and store.compute_fingerprint() == fp
    rep = verify(store_path)
    assert rep.ok and rep.fingerprint == fp

    copy = tmp_path / "elsewhere" / "moved.zarr"
    copy.parent.mkdir()
    shutil.copytree(store_path, copy)
    assert ActivationStore.open(copy).fingerprint == fp and verify(copy).fingerprint == fp

    def changed(array: str, index) -> str:
        c = tmp_path / f"c{len(list(tmp_path.iterdir()))}.zarr"
        shutil.copytree(store_path, c)
        a = zarr.open_array(c / array, mode="r+")  # a valid chunk (its checksum is right): only the digest tells
        v = a[index]
        a[index] = v + 1 if a.dtype.kind in "iu" else np.float16(v) + np.float16(0.5)
        rep = verify(c)
        assert not rep.ok and any("does not match the digest" in p for p in rep.problems)
        return rep.fingerprint

    got = {changed(f"activations/{HOOK}", (40 * 32 - 1, 3)), changed("tokens", (5, 7)), changed("tokens", (39, 31))}
    assert fp not in got and len(got) == 3
    other, _ = make_store(tmp_path / "seed1.zarr", n_sequences=40, chunk_sequences=16, d=16, n_features=32, seed=1)
    assert other.fingerprint != fp


def test_a_format_1_store_is_still_read(tmp_path):
    """Format 1 is format 2's layout (tests/data/store-v2.zarr, written by that release) without digests."""
    store_path = tmp_path / "v1.zarr"
    shutil.copytree(ROOT / "tests" / "data" / "store-v2.zarr", store_path)
    g = zarr.open_group(store_path, mode="r+")
    m = dict(g.attrs[ATTR])
    for k in ("held_out", "fingerprint", "planned_n_sequences", "n_clamped", "device"):
        m.pop(k)
    m.update(format_version=1, extra={"device": "cpu", "n_clamped": {HOOK: 3}})
    g.attrs[ATTR] = m
    del g["digests"]
    store = ActivationStore.open(store_path)
    assert store.manifest.format_version == 1 and store.held_out_range() is None and store.fingerprint is None
    assert store.manifest.device == "cpu" and store.manifest.n_clamped == {HOOK: 3}
    assert store.read_chunk(HOOK, 2).shape == (4 * 8, 8)
    rep = verify(store_path)
    assert rep.ok and rep.fingerprint is None
    text = format_info(info(store_path))
    assert "format 1" in text and "held out   none" in text and "fingerprint none (format 1 store)" in text


def test_xarray_opens_a_store(store_path):
    xr = pytest.importorskip("xarray")
    store = ActivationStore.open(store_path)
    root = xr.open_zarr(store_path, consolidated=False)
    assert root["tokens"].dims == ("sequence", "position") and root.sizes["sequence"] == 40
    np.testing.assert_array_equal(root["tokens"].values, store.tokens[:])
    acts = xr.open_zarr(store_path, group="activations", consolidated=False)
    assert acts[HOOK].dims == ("token", f"d_{HOOK}")
    np.testing.assert_array_equal(acts[HOOK][32:64].values, store.activations(HOOK)[32:64])
    stats = xr.open_zarr(store_path, group=f"stats/{HOOK}", consolidated=False)
    np.testing.assert_allclose(stats["mean"].values, store.stats(HOOK)["mean"])


def _readme_snippet() -> str:
    text = (ROOT / "docs" / "store-format.md").read_text()
    section = text.split("## Reading a store with plain zarr", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_plain_zarr_snippet_gives_exact_counts(tmp_path):
    """The snippet, run without this package on a harvested store with a partial last chunk and a
    held-out part, selects exactly the committed and the training sequences."""
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=60)
    out = tmp_path / "acts.zarr"
    cfg = HarvestConfig(out=str(out), hooks=HOOKS[:2], model=RANDOM, dataset=str(data), context_size=32,
                        tokens=30 * 32, batch_size=4, chunk_sequences=8, device="cpu")
    harvest(cfg, progress=False)
    store = ActivationStore.open(out)
    assert store.held_out_range() == (24, 30)  # 5% of 4 chunks: the last one (6 sequences)
    script = _readme_snippet().replace('"acts.zarr"', "sys.argv[1]")
    script = "import sys, json\n" + script + (
        "\nprint(json.dumps({'n': n, 'tokens': list(tokens.shape), 'acts': list(acts.shape), 'train': list(train),"
        " 'held': list(held), 'count': float(count), 'chunk_counts': [float(c) for c in chunk_counts],"
        " 'mean': mean.tolist(), 'var': var.tolist(),"
        " 'foreign': sorted(k for k in sys.modules if k.split('.')[0] in ('actcache', 'torch'))}))\n")
    p = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env(), cwd="/")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["foreign"] == [] and d["n"] == 30 and d["tokens"] == [30, 32] and d["acts"] == [30 * 32, 64]
    assert d["train"] == [0, 24] and d["held"] == [24, 30]
    # the statistics it reads are those of the activations, computed here from the arrays themselves
    x = zarr.open_group(out, mode="r")["activations"][HOOKS[0]][:].astype(np.float64)
    assert d["count"] == 30 * 32 and d["chunk_counts"] == [8 * 32, 8 * 32, 8 * 32, 6 * 32]
    np.testing.assert_allclose(d["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d["var"], x.var(0), rtol=1e-7, atol=1e-9)


def test_held_out_size_options_and_info(tmp_path):
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=80)
    base = dict(hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32, tokens=40 * 32, batch_size=4,
                chunk_sequences=4, device="cpu")

    def held(spec, name):
        cfg = HarvestConfig(out=str(tmp_path / f"{name}.zarr"), **base)
        cfg.held_out = spec
        harvest(cfg, progress=False)
        return ActivationStore.open(cfg.out).held_out_range()

    assert held("0", "none") is None
    assert held("20%", "pct") == (32, 40)  # 20% of 10 chunks
    assert held("300", "tok") == (28, 40)  # 300 tokens: 10 sequences, rounded up to 3 whole chunks
    d = info(tmp_path / "pct.zarr")
    assert d["held_out"] == {"start_sequence": 32, "stop_sequence": 40} and d["fingerprint"]
    text = format_info(d)
    assert "sequences 32..40" in text and d["fingerprint"] in text
    cfg = HarvestConfig(out=str(tmp_path / "bad.zarr"), **base)
    for bad in ("100%", "-1", "lots", str(40 * 32)):
        cfg.held_out = bad
        with pytest.raises(Exception, match="held-out"):
            harvest(cfg, progress=False)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped byte"])
def test_train_on_a_store_with_a_damaged_chunk_stops_with_one_line(tmp_path, damage):
    """The real trainer reading a real damaged chunk: never trains on zeros or garbage."""
    from actcache.train.sweep import train_sweep

    url = tmp_path / "s.zarr"
    make_store(url, d=8, n_features=16, n_sequences=128, context_size=16, chunk_sequences=16)  # 8 chunks
    damage_chunk(chunk_file(url, 3), damage)
    sweep = make_sweep({"name": "t", "architecture": "topk", "k": 4}, defaults={"d_sae": 16, "lr": 1e-3}, hook=HOOK,
                       batch_size=128, tokens=1792, log_every_steps=4, eval_tokens=256)
    with pytest.raises(StoreError) as e:
        train_sweep(str(url), sweep, str(tmp_path / "run"), progress=False)
    assert "\n" not in str(e.value) and f"chunk 3 of activations/{HOOK}" in str(e.value)
    assert "actcache verify" in str(e.value)
