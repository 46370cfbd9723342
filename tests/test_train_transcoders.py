"""Transcoders and sweeps over several hooks: transcoders recover a planted linear-sparse map from
one hook to another; exported, they load in SAELens and give our outputs; in a sweep with SAEs on
other hooks each module equals the same module trained alone, bitwise, while every chunk is read
once for all hooks; an interrupted two-hook sweep resumes bitwise."""

import collections
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_sweep, single_thread
from tests.synthetic import feature_recovery, make_store
from tests.test_train_reliability import crash_after_checkpoint
from tests.test_train_saes import one_thread  # noqa: F401  (a fixture)
from tests.test_train_sweep import SAELENS_CHECK
from actcache.common.errors import UserError
from actcache.common.store import ActivationStore
from actcache.train.architectures import SAEConfig, build_sae
from actcache.train.checkpoint import load_checkpoint
from actcache.train.config import load_config, resolve
from actcache.train.loader import ActivationLoader, normalisation_scale
from actcache.common.sae import SAE
from actcache.train.sweep import train_sweep

RES, IN, OUT = "blocks.0.hook_resid_pre", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
# thresholds as in the planted-dictionary tests of the SAEs: explained variance of the output on the
# evaluation tokens, and the fraction of the 64 planted atoms matched with cosine similarity above 0.9
MIN_EXPLAINED_VARIANCE = 0.78
MIN_RECOVERED = 0.85
TRANSCODERS = [
    {"name": "relu", "architecture": "transcoder", "l1_coefficient": 0.5},
    {"name": "skip", "architecture": "skip_transcoder", "l1_coefficient": 0.5},
    {"name": "topk", "architecture": "topk_transcoder", "k": 3},
    {"name": "jump", "architecture": "jumprelu_transcoder", "l0_coefficient": 0.5},
    {"name": "jump-skip", "architecture": "jumprelu_skip_transcoder", "l0_coefficient": 0.5},
]
SAELENS_CLASS = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder", "topk": "TopKSAE",
                 "jumprelu_transcoder": "JumpReLUTranscoder", "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}


@pytest.fixture(scope="module")
def planted_map(tmp_path_factory):
    """A store whose OUT hook is a planted linear-sparse map of its IN hook, and one sweep of every
    transcoder architecture from IN to OUT."""
    with single_thread():
        root = tmp_path_factory.mktemp("transcoders")
        _, planted = make_store(root / "s.zarr", d=32, n_features=64, n_sequences=512, context_size=32,
                                chunk_sequences=32, active=3, hooks=(RES, IN, OUT), maps={OUT: IN},
                                gains={OUT: 3.0})
        cfg = make_sweep(*TRANSCODERS, defaults={"lr": 3e-3, "d_sae": 128, "lr_warmup_steps": 20, "hook_out": OUT},
                         hook=IN, batch_tokens=256, tokens=300_000, log_every_steps=100, repeat_epochs=True,
                         dead_window_tokens=20000, eval_tokens=8192)
        summary = train_sweep(str(root / "s.zarr"), cfg, root / "out", progress=False)
    return summary, planted, root


@pytest.mark.parametrize("name", [t["name"] for t in TRANSCODERS])
def test_transcoder_recovers_a_planted_map(planted_map, name):
    summary, planted, root = planted_map
    row = next(r for r in summary["saes"] if r["name"] == name)
    assert row["hook"] == IN and row["hook_out"] == OUT and row["d_out"] == 32
    assert row["explained_variance"] >= MIN_EXPLAINED_VARIANCE, row  # of the output hook
    assert 1.0 <= row["l0"] <= 8, row
    metrics = [json.loads(line) for line in (root / "out" / name / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["fvu"] < 0.3 and "l0" in metrics[-1]
    sae = SAE.load_from_disk(row["path"])
    outputs = planted.outputs[OUT]
    # the map itself: one planted atom on its own (at a typical magnitude) gives that atom's output direction
    with torch.no_grad():
        response = sae(planted.offset + 1.25 * planted.features) - sae(planted.offset[None])  # OUT's gain: 3
    cos = torch.nn.functional.cosine_similarity(response, outputs.features, dim=1)
    assert float((cos > 0.9).float().mean()) >= MIN_RECOVERED, (name, cos)
    if "W_skip" in sae.form.weight_keys:
        # the skip carries part of the map (the linear part), so the latents need not hold whole atoms
        assert float(sae.W_skip.norm()) > 0.1
    else:  # the decoder's rows are the planted output atoms
        recovered = float((feature_recovery(sae.W_dec, outputs.features) > 0.9).float().mean())
        assert recovered >= MIN_RECOVERED, (name, recovered)


def test_exported_transcoders_fold_both_normalisations(planted_map):
    """The exported module on raw activations is the trained one on scaled input, unscaled output."""
    summary, _, root = planted_map
    store = ActivationStore.open(str(root / "s.zarr"))
    s_in, s_out = normalisation_scale(store, IN), normalisation_scale(store, OUT)
    assert abs(s_in - s_out) > 0.05 * s_in  # the two scales differ, so mixing them up would show
    x = torch.from_numpy(store.read_chunk(IN, 0)[:512]).float()
    cfg = resolve(load_config(make_sweep(*TRANSCODERS, defaults={"d_sae": 128, "hook_out": OUT}, hook=IN,
                                         tokens=300_000, batch_tokens=256, repeat_epochs=True)), store)
    trained = load_checkpoint(root / "out")["members"]
    for sc in cfg.saes:
        ts = build_sae(sc, torch.Generator().manual_seed(0))
        ts.load_state_dict(trained[sc.name]["sae"])
        sae = SAE.load_from_disk(root / "out" / sc.name)
        y = torch.from_numpy(store.read_chunk(OUT, 0)[:512]).float()
        with torch.no_grad():
            x_hat = ts.step_loss(x * s_in, 1.0, torch.zeros(128, dtype=torch.bool), False, target=y * s_out).x_hat
        torch.testing.assert_close(sae(x), x_hat / s_out, atol=1e-4, rtol=1e-4)
        meta = sae.cfg.metadata
        assert meta.hook_name == IN and meta.hook_name_out == OUT and sae.cfg.d_out == 32
        assert sae.cfg.apply_b_dec_to_input is False


def test_saelens_loads_exported_transcoders_with_its_classes(saelens_python, planted_map, tmp_path):
    summary, _, root = planted_map
    x = torch.from_numpy(ActivationStore.open(str(root / "s.zarr")).read_chunk(IN, 1)[:256]).float()
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "check.py").write_text(SAELENS_CHECK)
    proc = subprocess.run([saelens_python, str(tmp_path / "check.py"), str(tmp_path / "x.pt"),
                           *[r["path"] for r in summary["saes"]]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "x.pt.out")
    for row in summary["saes"]:
        ours, t = SAE.load_from_disk(row["path"]), theirs[row["name"]]
        assert t["arch"] == row["exported_as"] == ours.cfg.architecture, row
        assert t["class"] == SAELENS_CLASS[row["exported_as"]] and t["hook_out"] == OUT
        out, f = ours.forward_with_activations(x)
        torch.testing.assert_close(t["encode"], f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t["forward"], out, atol=1e-5, rtol=1e-5)
        assert float((f > 0).float().sum(1).mean()) > 0


def test_topk_transcoder_to_a_narrower_hook_exports_in_a_form_of_its_own(tmp_path):
    """SAELens has no TopK transcoder: with d_out != d_in the folder loads here only, and the config
    says so when it is read against the store."""
    make_store(tmp_path / "s.zarr", d=16, n_features=32, n_sequences=64, context_size=16, chunk_sequences=16,
               hooks=(IN, OUT), maps={OUT: IN}, dims={OUT: 8})
    cfg = resolve(load_config(make_sweep({"name": "t", "architecture": "topk_transcoder", "k": 2, "hook_out": OUT,
                                          "d_sae": 32}, hook=IN, tokens=1024, batch_tokens=128, eval_tokens=512)),
                  ActivationStore.open(str(tmp_path / "s.zarr")))
    assert any("SAELens has no TopK transcoder" in w for w in cfg.warnings)
    summary = train_sweep(str(tmp_path / "s.zarr"), cfg, tmp_path / "out", progress=False)
    assert summary["saes"][0]["exported_as"] == "topk_transcoder"
    sae = SAE.load_from_disk(tmp_path / "out" / "t")
    y, f = sae.forward_with_activations(torch.randn(4, 16))
    assert y.shape == (4, 8) and int((f > 0).sum(1).max()) <= 2


# ------------------------------------------------------------------ several hooks, one read
@pytest.fixture
def reads(monkeypatch):
    """Every (hook, chunk) and token chunk the store is asked for, by anyone (loader threads included)."""
    seen = {"acts": collections.Counter(), "tokens": collections.Counter()}
    read_chunk, read_tokens = ActivationStore.read_chunk, ActivationStore.read_tokens
    read_chunk_into = ActivationStore.read_chunk_into

    def rc(self, hook, j):
        seen["acts"][hook, j] += 1
        return read_chunk(self, hook, j)

    def rci(self, hook, j, out):  # the loader decodes into its window this way
        seen["acts"][hook, j] += 1
        return read_chunk_into(self, hook, j, out)

    def rt(self, j):
        seen["tokens"][j] += 1
        return read_tokens(self, j)

    monkeypatch.setattr(ActivationStore, "read_chunk", rc)
    monkeypatch.setattr(ActivationStore, "read_chunk_into", rci)
    monkeypatch.setattr(ActivationStore, "read_tokens", rt)
    return seen


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    url = tmp_path_factory.mktemp("hooks") / "s.zarr"
    make_store(url, d=16, n_features=48, n_sequences=256, context_size=32, chunk_sequences=16, hooks=(RES, IN, OUT),
               maps={OUT: IN})
    return str(url)


def test_a_loader_of_two_hooks_reads_each_chunk_once_and_gives_each_hook_its_own_stream(small_store, reads):
    one = {h: ActivationLoader(small_store, h, 200, seed=5, window_chunks=3, threads=2, skip_special_tokens=True,
                               repeat=False) for h in (IN, OUT)}
    expected = {h: [ld.next_batch(return_rows=True) for _ in range(20)] for h, ld in one.items()}
    for ld in one.values():
        ld.close()
    reads["acts"].clear()
    reads["tokens"].clear()
    both = ActivationLoader(small_store, [IN, OUT], 200, seed=5, window_chunks=3, threads=2, skip_special_tokens=True,
                            repeat=False)
    assert both.scales == {IN: one[IN].scale, OUT: one[OUT].scale}
    for i in range(20):
        batches, rows = both.next_batch(return_rows=True)
        for h in (IN, OUT):
            assert torch.equal(batches[h], expected[h][i][0]) and torch.equal(rows, expected[h][i][1])
    both.close()
    read = set(reads["tokens"])
    assert len(read) >= 9  # 4000 tokens of 496 per chunk, and the next window prefetched
    assert all(c == 1 for c in reads["tokens"].values()) and all(c == 1 for c in reads["acts"].values())
    assert set(reads["acts"]) == {(h, j) for h in (IN, OUT) for j in read}


MIXED = [
    {"name": "sae-res", "architecture": "topk", "k": 4, "hook": RES},
    {"name": "sae-in", "architecture": "jumprelu", "l0_coefficient": 0.5},
    {"name": "tc-topk", "architecture": "topk_transcoder", "k": 4, "hook_out": OUT},
    {"name": "tc-jump-skip", "architecture": "jumprelu_skip_transcoder", "l0_coefficient": 0.5, "hook_out": OUT},
]
MIXED_TOP = dict(hook=IN, batch_tokens=256, tokens=12800, seed=3, log_every_steps=10, dead_window_tokens=2048,
                 eval_tokens=2048, window_chunks=2, checkpoint_every_tokens=2560, repeat_epochs=True)


def _mixed(*saes):
    return make_sweep(*saes, defaults={"lr": 1e-3, "d_sae": 64}, **MIXED_TOP)


@pytest.fixture(scope="module")
def mixed_run(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "out"
    with single_thread():
        summary = train_sweep(small_store, _mixed(*MIXED), out, progress=False)
    return summary, out


def _same_module(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(str(a / name / "sae_weights.safetensors")), load_file(str(b / name / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (name, k)
    assert (a / name / "metrics.jsonl").read_text() == (b / name / "metrics.jsonl").read_text()


def test_each_module_of_a_mixed_sweep_equals_it_trained_alone_and_chunks_are_read_once(
        mixed_run, small_store, tmp_path, reads, one_thread):
    summary, out = mixed_run
    assert summary["hooks"] == [RES, IN, OUT]
    table = (out / "summary.md").read_text()
    assert f"| tc-topk | {IN} → {OUT} | topk_transcoder (exported as topk) |" in table and f"| sae-res | {RES} | topk |" in table
    assert {r["name"]: r["exported_as"] for r in summary["saes"]} == {
        "sae-res": "topk", "sae-in": "jumprelu", "tc-topk": "topk", "tc-jump-skip": "jumprelu_skip_transcoder"}
    # the one-hook SAE on RES, alone: bitwise the same, and its hook's chunks read as often as in
    # the mixed sweep's training (which read three hooks from each chunk)
    counts = {}
    for entry in (MIXED[0], MIXED[2]):
        reads["acts"].clear()
        reads["tokens"].clear()
        train_sweep(small_store, _mixed(entry), tmp_path / entry["name"], progress=False)
        _same_module(out, tmp_path / entry["name"], entry["name"])
        counts[entry["name"]] = (collections.Counter(reads["acts"]), collections.Counter(reads["tokens"]))
    acts_res, tokens_res = counts["sae-res"]
    acts_tc, tokens_tc = counts["tc-topk"]
    assert set(h for h, _ in acts_res) == {RES} and set(h for h, _ in acts_tc) == {IN, OUT}
    # a transcoder's two hooks: every chunk of IN is read exactly as often as the same chunk of OUT
    assert {j: c for (h, j), c in acts_tc.items() if h == IN} == {j: c for (h, j), c in acts_tc.items() if h == OUT}
    assert tokens_res == tokens_tc  # the same stream: the same chunks, the same number of times

    reads["acts"].clear()
    reads["tokens"].clear()
    train_sweep(small_store, _mixed(*MIXED), tmp_path / "again", progress=False)
    for h, acts in ((RES, acts_res), (IN, acts_tc), (OUT, acts_tc)):
        assert {j: c for (hh, j), c in reads["acts"].items() if hh == h} == {j: c for (hh, j), c in acts.items()
                                                                              if hh == h}, h
    assert reads["tokens"] == tokens_res


def test_a_two_hook_sweep_resumes_bitwise(mixed_run, small_store, tmp_path, monkeypatch, one_thread):
    _, out = mixed_run
    cut = tmp_path / "cut"
    crash_after_checkpoint(monkeypatch, small_store, _mixed(*MIXED), cut, 20)
    assert load_checkpoint(cut)["step"] == 20
    train_sweep(small_store, _mixed(*MIXED), cut, resume=True, progress=False)
    a, b = load_checkpoint(out), load_checkpoint(cut)
    assert a["step"] == b["step"] == 50
    for entry in MIXED:
        name = entry["name"]
        for k, v in a["members"][name]["sae"].items():
            assert torch.equal(v, b["members"][name]["sae"][k]), (name, k)
        _same_module(out, cut, name)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("sae, top, message", [
    ({"name": "t", "architecture": "topk_transcoder", "k": 4}, {}, "architecture 'topk_transcoder' needs hook_out"),
    ({"name": "t", "architecture": "topk", "k": 4, "hook_out": OUT}, {}, "architecture 'topk' does not take 'hook_out'"),
    ({"name": "t", "architecture": "topk_transcoder", "k": 4, "hook_out": "blocks.0.hook_mlp_ou"}, {},
     "SAE 't': hook_out 'blocks.0.hook_mlp_ou' is not in the store"),
    ({"name": "t", "architecture": "topk", "k": 4, "hook": "blocks.0.hook_resid_pr"}, {},
     "did you mean 'blocks.0.hook_resid_pre'?"),
    ({"name": "t", "architecture": "topk", "k": 4}, {"hook": None}, "SAE 't' names no hook"),
])
def test_hook_keys_are_checked(small_store, sae, top, message):
    raw = make_sweep(sae, tokens=2048, batch_tokens=256, **top)
    if raw.get("hook") is None:
        del raw["hook"]
    with pytest.raises(UserError, match=re.escape(message)):
        resolve(load_config(raw), ActivationStore.open(small_store))


def test_grid_over_hooks_names_each_sae_by_its_hook():
    cfg = load_config({"tokens": 2048, "batch_tokens": 256, "grid": {"architecture": "topk", "k": [4], "hook": [RES, IN]}})
    assert [(s.name, s.hook) for s in cfg.saes] == [(f"topk-k4-{RES}", RES), (f"topk-k4-{IN}", IN)]
    assert cfg.hooks == [RES, IN]


def test_a_transcoder_has_the_output_width_after_its_latents_and_an_encoder_of_its_own():
    sc = SAEConfig(name="t", architecture="jumprelu_skip_transcoder", hook=IN, hook_out=OUT, d_in=16, d_out=8,
                   d_sae=32)
    sae = build_sae(sc, torch.Generator().manual_seed(0))
    assert sae.W_enc.shape == (16, 32) and sae.W_dec.shape == (32, 8) and sae.W_skip.shape == (8, 16)
    assert sae.b_dec.shape == (8,) and not torch.equal(sae.W_enc[:8], sae.W_dec.t()[:8])
