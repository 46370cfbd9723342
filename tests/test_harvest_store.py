"""A harvest of a random model: the stored activations are run_with_cache's, the statistics are the
data's, the store reads back with plain zarr, info and verify describe and check it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from actcache.common.store import ActivationStore
from actcache import HarvestConfig, harvest, info, verify
from actcache.harvest.models import load_model
from harvest_fixtures import HOOKS, RANDOM, cli_subprocess, env, harvest_args, message_lines, run_cli, write_token_jsonl


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    data = write_token_jsonl(tmp / "toks.jsonl")
    cfg = HarvestConfig(out=str(tmp / "acts.zarr"), hooks=HOOKS, model=RANDOM, dataset=str(data), context_size=32,
                        tokens=30 * 32, batch_size=4, chunk_sequences=8, device="cpu")
    return cfg, harvest(cfg, progress=False)


def test_result_and_manifest(harvested):
    cfg, res = harvested
    assert res.n_tokens == 30 * 32 and res.hooks == dict.fromkeys(HOOKS, 64)
    assert res.bytes_on_disk > res.activation_bytes > 0 and res.raw_bytes == 30 * 32 * 4 * 64 * 2
    assert res.tokens_per_s > 0 and "960 tokens" in res.summary()
    m = ActivationStore.open(cfg.out).manifest
    assert m.complete and m.n_chunks_committed == 4 and m.n_chunks == 4  # 8 + 8 + 8 + 6 sequences
    assert m.hook_names == HOOKS and m.chunk_sequences == 8 and m.batch_size == 4
    assert m.dataset.text_column is None and m.dataset.fingerprint and not m.prepend_bos  # no tokenizer: no BOS


def test_stored_activations_equal_run_with_cache_on_stored_tokens(harvested):
    cfg, _ = harvested
    store = ActivationStore.open(cfg.out)
    tokens = torch.from_numpy(store.tokens[:].astype(np.int64))
    assert tokens.shape == (30, 32)
    model = load_model(RANDOM, device="cpu")  # a fresh load: the same spec gives the same weights
    _, cache = model.tl.run_with_cache(tokens, names_filter=lambda n: n in HOOKS)
    for h in HOOKS:
        stored = torch.from_numpy(store.activations(h)[:]).float()
        ref = cache[h].reshape(30 * 32, -1)
        assert stored.shape == ref.shape
        torch.testing.assert_close(stored, ref, rtol=2e-3, atol=1e-5)  # float16 rounding


def test_tokens_are_the_dataset_packed_in_order(harvested):
    cfg, _ = harvested
    from actcache.harvest.data import TokenWindows, resolve_source

    windows = TokenWindows(resolve_source(cfg.dataset), 32, vocab_size=1000, seed=0).windows()
    expected = np.stack([next(windows) for _ in range(30)])
    np.testing.assert_array_equal(ActivationStore.open(cfg.out).tokens[:], expected)
    rows = [json.loads(line)["input_ids"] for line in open(cfg.dataset)]
    assert set(expected.ravel().tolist()) <= {t for r in rows for t in r}


def test_statistics_are_those_of_the_stored_data(harvested):
    cfg, _ = harvested
    store = ActivationStore.open(cfg.out)
    for h in HOOKS:
        x = store.activations(h)[:].astype(np.float64)
        s = store.stats(h)
        assert s["count"] == x.shape[0]
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-6, atol=1e-9)
        assert s["max_abs"] == np.abs(x).max() and s["n_nonfinite"] == 0
        np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
        np.testing.assert_allclose(store.group["stats"][h]["mean"][:], x.mean(0), rtol=1e-9, atol=1e-12)


def test_store_reads_back_with_plain_zarr(harvested):
    cfg, _ = harvested
    script = (
        "import sys, json, zarr\n"
        "g = zarr.open_group(sys.argv[1], mode='r')\n"
        "m = g.attrs['actcache']\n"
        "h = m['hooks'][1]['name']\n"
        "a = g['activations'][h]\n"
        "print(json.dumps({'hook': h, 'shape': list(a.shape), 'dtype': str(a.dtype), 'ctx': m['context_size'],\n"
        "  'tokens': g['tokens'][:2].tolist(), 'row5': a[5].astype(float).tolist(),\n"
        "  'mean': g['stats'][h]['mean'][:3].tolist(), 'committed': m['n_chunks_committed'],\n"
        "  'foreign': sorted(k for k in sys.modules if k.split('.')[0] in ('actcache', 'common', 'harvest', 'torch'))}))\n"
    )
    p = subprocess.run([sys.executable, "-c", script, cfg.out], capture_output=True, text=True, env=env(), cwd="/")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    store = ActivationStore.open(cfg.out)
    assert d["foreign"] == [] and d["hook"] == HOOKS[1] and d["ctx"] == 32 and d["committed"] == 4
    assert d["shape"] == [30 * 32, 64] and d["dtype"] == "float16"
    assert d["tokens"] == store.tokens[:2].tolist()
    assert d["row5"] == store.activations(HOOKS[1])[5].astype(float).tolist()
    assert d["mean"] == store.stats(HOOKS[1])["mean"][:3].tolist()


def test_info(harvested, capfd):
    cfg, res = harvested
    d = info(cfg.out)
    assert d["complete"] and d["n_tokens"] == 960 and d["bytes_on_disk"] == res.bytes_on_disk
    assert d["compression_ratio"] == pytest.approx(res.compression_ratio)
    assert d["hooks"][HOOKS[0]]["count"] == 960 and d["manifest"]["model"]["name"] == RANDOM
    code, out, _ = run_cli(["info", cfg.out, "--json"], capfd)
    assert code == 0 and json.loads(out)["n_tokens"] == 960
    code, out, _ = run_cli(["info", cfg.out], capfd)
    assert code == 0 and "960" in out and HOOKS[2] in out


def test_verify_passes_then_finds_corruption_and_missing_chunks(harvested, tmp_path, capfd):
    import shutil

    cfg, _ = harvested
    assert verify(cfg.out).ok
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cfg.out, copy)
    chunk = copy / "activations" / HOOKS[2] / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    chunk.write_bytes(bytes(raw))
    (copy / "tokens" / "c" / "2" / "0").unlink()
    rep = verify(copy)
    assert not rep.ok and rep.chunks_checked == 4
    assert any(f"activations/{HOOKS[2]} chunk 1: unreadable" in p and "checksum" in p for p in rep.problems)
    assert any("tokens chunk 2: missing" in p for p in rep.problems)
    p = cli_subprocess(["verify", str(copy)])
    assert p.returncode == 1 and "DAMAGED" in p.stdout and "Traceback" not in p.stderr
    assert run_cli(["verify", cfg.out], capfd)[0] == 0


def test_overflow_stops_by_default_and_clamps_when_asked(tmp_path):
    from actcache.common.errors import OverflowError16

    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=20, vocab=100)
    big = "random:n_layers=1,d_model=32,n_heads=2,d_vocab=100,n_ctx=64,initializer_range=100000"
    cfg = HarvestConfig(out=str(tmp_path / "o.zarr"), hooks=["blocks.0.hook_resid_pre"], model=big,
                        dataset=str(data), context_size=16, tokens=256, batch_size=4, device="cpu")
    with pytest.raises(OverflowError16, match=r"blocks.0.hook_resid_pre.*largest magnitude [0-9.e+]+ > 65504"):
        harvest(cfg, progress=False)
    cfg.overflow, cfg.overwrite = "clamp", True
    harvest(cfg, progress=False)
    store = ActivationStore.open(cfg.out)
    x = store.activations("blocks.0.hook_resid_pre")[:]
    assert store.manifest.overflow == "clamp" and store.manifest.n_clamped["blocks.0.hook_resid_pre"] > 0
    assert np.isfinite(x).all() and np.abs(x).max() == 65504


def test_dataset_running_out_gives_a_shorter_complete_store_and_a_failing_exit(tmp_path):
    from actcache.harvest.api import DataRanOut

    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=5)
    n_available = sum(len(json.loads(l)["input_ids"]) for l in open(data)) // 32
    cfg = HarvestConfig(out=str(tmp_path / "s.zarr"), hooks=HOOKS[:1], model=RANDOM, dataset=str(data),
                        context_size=32, tokens=10_000, batch_size=4, chunk_sequences=4, device="cpu")
    with pytest.raises(DataRanOut, match=f"holds {n_available * 32:,} of the 10,016 tokens asked for.*--allow-short"):
        harvest(cfg, progress=False)
    store = ActivationStore.open(cfg.out)
    assert store.manifest.complete and store.tokens.shape[0] == n_available and store.n_committed_sequences == n_available
    assert store.manifest.planned_n_sequences == 313 and store.fingerprint is not None
    a, b = store.held_out_range()
    assert b == n_available and a == (store.n_chunks - 1) * 4  # the held-out chunk moved to the new end
    assert verify(cfg.out).ok
    cfg.resume = True  # nothing left to do, and the planned size still matches: the same verdict
    with pytest.raises(DataRanOut):
        harvest(cfg, progress=False)
    cfg.allow_short = True  # the user accepts the shorter store
    assert harvest(cfg, progress=False).n_tokens == n_available * 32
    p = cli_subprocess(harvest_args(tmp_path / "cli.zarr", data, hooks=HOOKS[:1], tokens=10_000, chunk=4))
    errors = message_lines(p.stderr)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert errors[-1].startswith("actcache: error: the dataset ran out") and verify(tmp_path / "cli.zarr").ok


def test_local_hugging_face_folder_without_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "tiny-llama")
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=10)
    cfg = HarvestConfig(out=str(tmp_path / "l.zarr"), hooks=["blocks.0.hook_resid_post"], model=str(tmp_path / "tiny-llama"),
                        dataset=str(data), context_size=16, tokens=8 * 16, batch_size=4, device="cpu")
    harvest(cfg, progress=False)
    store = ActivationStore.open(cfg.out)
    assert store.manifest.model.architecture == "LlamaForCausalLM" and store.manifest.tokenizer.name is None
    with torch.no_grad():
        ref = hf(torch.from_numpy(store.tokens[:].astype(np.int64)), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(torch.from_numpy(store.activations("blocks.0.hook_resid_post")[:]).float(),
                               ref.reshape(8 * 16, 64), rtol=2e-3, atol=1e-5)


def test_chunk_stats_leave_out_and_count_non_finite_values():
    from actcache.common.store import chunk_stats

    x = np.arange(24, dtype=np.float16).reshape(6, 4) - 10
    x[1, 2], x[4, 0] = np.inf, np.nan
    s = chunk_stats(x)
    clean = np.where(np.isfinite(x), x, 0).astype(np.float64)
    assert s.count == 6 and s.n_nonfinite == 2 and s.max_abs == 13
    np.testing.assert_array_equal(s.sum, clean.sum(0))
    np.testing.assert_array_equal(s.sumsq, (clean**2).sum(0))
    np.testing.assert_allclose(s.norm_sum, np.linalg.norm(clean, axis=1).sum(), rtol=1e-12)
    assert chunk_stats(torch.from_numpy(x)).n_nonfinite == 2
