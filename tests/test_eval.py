"""Evaluation on a tiny random model: the metrics' sanity points, the shared clean pass against separate
passes, the held-out activation metrics against a brute-force computation, and the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.common.store import ActivationStore
from actcache.harvest import splice
from actcache.harvest.evaluate import downstream_metrics
from actcache.train.heldout_metrics import heldout_metrics

from eval_fixtures import HOOK, RANDOM, harvest_store, make_sae
from harvest_fixtures import message_lines, run_cli, write_token_jsonl


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalstore")
    data = write_token_jsonl(tmp / "data.jsonl", vocab=500)
    harvest_store(tmp / "acts.zarr", data)
    return str(tmp / "acts.zarr")


@pytest.fixture(scope="module")
def model():
    from actcache.harvest.models import load_model

    return load_model(RANDOM, device="cpu")


def _batches(store_url, a=100, b=116, bs=8):
    toks = np.asarray(ActivationStore.open(store_url).tokens[a:b]).astype(np.int64)
    return [torch.from_numpy(toks[i:i + bs]) for i in range(0, len(toks), bs)]


def test_exact_sae_scores_one_and_zero_sae_scores_zero(model, store_url):
    saes = {"exact": make_sae("exact"), "zero": make_sae("zero"), "random": make_sae("random")}
    m = downstream_metrics(model, _batches(store_url), saes, include_special_tokens=True)
    assert m["exact"]["ce_loss_with_ablation"] != pytest.approx(m["exact"]["ce_loss_without_sae"], abs=1e-3)
    assert m["exact"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["exact"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)
    assert m["exact"]["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["zero"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["zero"]["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert all(r[k] >= 0 for r in m.values() for k in ("kl_div_with_sae", "kl_div_with_ablation"))
    assert m["random"]["kl_div_with_sae"] > 0


def test_special_tokens_keep_their_clean_activation(model, store_url):
    batches = _batches(store_url)
    special = [int(batches[0][0, 0]), int(batches[0][0, 1])]
    m = downstream_metrics(model, batches, {"zero": make_sae("zero")}, special_ids=special)
    n = sum(int(splice.special_token_mask(b, special).sum()) for b in batches)
    assert m["zero"]["kl_tokens"] == n < sum(b.numel() for b in batches)
    # a zero SAE leaves special positions alone while the zero ablation does not: the scores differ from 0
    assert m["zero"]["ce_loss_with_sae"] != m["zero"]["ce_loss_with_ablation"]


def test_one_shared_pass_equals_separate_passes(model, store_url):
    saes = {"a": make_sae("random", seed=1), "b": make_sae("topk", seed=2),
            "mlp": make_sae("random", hook="blocks.2.hook_mlp_out", seed=3),
            "z": make_sae("random", hook="blocks.0.attn.hook_z", seed=4)}
    batches = _batches(store_url)
    special = [int(batches[0][0, 0])]
    shared = downstream_metrics(model, batches, saes, special_ids=special)
    separate = {n: downstream_metrics(model, batches, {n: s}, special_ids=special, one_pass=False)[n]
                for n, s in saes.items()}
    for n in saes:
        for key, v in separate[n].items():
            assert shared[n][key] == pytest.approx(v, rel=1e-5, abs=1e-6), (n, key)


def test_a_pass_from_a_layer_runs_no_block_below_it(model, store_url):
    tokens = _batches(store_url)[0]
    clean, cache = splice.clean_pass(model, tokens, [HOOK])
    calls = []
    handle = model.tl.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        again, _ = splice.forward(model, tokens, {HOOK: lambda x: x}, start=(1, cache[splice.resid_hook(1)]))
    finally:
        handle.remove()
    assert calls == [] and torch.equal(again, clean)


def test_run_with_saes_returns_latents(model, store_url):
    tokens = _batches(store_url)[0]
    sae = make_sae("topk")
    logits, latents = splice.run_with_saes(model, tokens, [sae])
    acts = model.run(tokens, [HOOK])[HOOK]
    assert torch.allclose(latents[HOOK], sae.encode(acts), atol=1e-5)
    assert logits.shape[:2] == tokens.shape


def test_heldout_metrics_match_a_brute_force_computation(store_url):
    store = ActivationStore.open(store_url)
    sae = make_sae("topk")
    got = heldout_metrics({"s": sae}, store, HOOK, (100, 120))["s"]
    ctx = store.manifest.context_size
    x = torch.from_numpy(np.asarray(store.activations(HOOK)[100 * ctx:120 * ctx], dtype=np.float64))
    f = sae.encode(x.float()).double()
    xh = sae.decode(f.float()).double()
    sse = (x - xh).pow(2).sum()
    assert got["explained_variance"] == pytest.approx(float(1 - sse / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert got["mse"] == pytest.approx(float(sse / len(x)), rel=1e-5)
    assert got["cossim"] == pytest.approx(float(torch.nn.functional.cosine_similarity(x, xh).mean()), rel=1e-5)
    assert got["l0"] == pytest.approx(4.0)
    rate = (f != 0).double().mean(0)
    assert got["dead_fraction"] == pytest.approx(float((rate == 0).double().mean()))
    assert got["dense_fraction"] == pytest.approx(float((rate > 0.1).double().mean()))
    h = got["feature_density_histogram"]
    assert sum(h["counts"]) + h["never"] == sae.cfg.d_sae


def test_a_topk_saes_sparse_forward_scores_as_its_dense_code(store_url):
    """The sweep's final evaluation runs a TopK SAE without its dense code (forward_entries, Metrics(active=)):
    the same counts exactly, the same reconstruction metrics up to float rounding, and both match float64."""
    from actcache.common.metrics import Metrics

    store = ActivationStore.open(store_url)
    sae = make_sae("topk")
    assert sae.sparse_code and not make_sae("random").sparse_code
    ctx = store.manifest.context_size
    x = torch.from_numpy(np.asarray(store.activations(HOOK)[100 * ctx:120 * ctx], dtype=np.float32))
    with torch.no_grad():
        out, (rows, cols, vals) = sae.forward_entries(x)
        dense_out, f = sae.forward_with_activations(x)
    assert torch.allclose(out, dense_out, rtol=1e-5, atol=1e-6)
    dense, sparse = Metrics(sae.cfg.d_sae), Metrics(sae.cfg.d_sae)
    dense.update(x, dense_out, f)
    sparse.update(x, out, active=cols)
    a, b = dense.result(), sparse.result()
    for key in ("l0", "dead_fraction", "dense_fraction", "feature_density_histogram"):
        assert a[key] == b[key], key
    assert torch.equal(a["log10_density"], b["log10_density"])
    xd, fd = x.double(), f.double()
    xh = fd @ sae.W_dec.double() + sae.b_dec.double()
    ev = float(1 - (xd - xh).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
    assert b["explained_variance"] == pytest.approx(ev, rel=1e-5)
    assert b["l0"] == pytest.approx(float((fd != 0).sum(1).double().mean()))


# ------------------------------------------------------------------------------------------ the CLI
def _run_folder(tmp_path, store_url, saes, run_json):
    run = tmp_path / "run"
    for name, sae in saes.items():
        sae.save_model(run / name)
    (run / "run.json").write_text(json.dumps(run_json))
    (run / "summary.json").write_text(json.dumps({"hook": HOOK, "saes": [
        {"name": n, "architecture": s.cfg.architecture, "d_sae": s.cfg.d_sae, "k": s.cfg.k, "l0": 1.0}
        for n, s in saes.items()]}))
    return run


def test_cli_writes_eval_json_summary_columns_and_plot(tmp_path, store_url, capfd, monkeypatch):
    run = _run_folder(tmp_path, store_url, {"a": make_sae("random"), "b": make_sae("topk")},
                      {"store": str(tmp_path / "other.zarr"), "store_chunks": 16})
    code, out, err = run_cli(["eval", str(run), "--store", store_url, "--held-out", "100:128", "--tokens", "128",
                              "--json"], capfd)
    assert code == 0, err
    records = json.loads(out)
    assert [r["name"] for r in records] == ["a", "b"]
    assert records[0]["sequences_scored"] == {"start_sequence": 100, "stop_sequence": 108}
    saved = json.loads((run / "a" / "eval.json").read_text())
    assert saved["ce_loss_score"] == records[0]["ce_loss_score"] and "kl_div_score" in saved
    summary = json.loads((run / "summary.json").read_text())
    assert summary["saes"][1]["eval"]["l0"] == pytest.approx(4.0)
    assert "CE loss score" in (run / "summary.md").read_text()
    assert (run / "frontier_ce.png").stat().st_size > 0
    # a second store the run did not train on, without a held-out part: all of it is held out
    monkeypatch.setattr(ActivationStore, "held_out_range", lambda self: None, raising=False)
    code, out, err = run_cli(["eval", str(run / "a"), "--store", store_url, "--tokens", "32", "--json"], capfd)
    assert code == 0, err
    assert json.loads(out)[0]["held_out"] == {"start_sequence": 0, "stop_sequence": 128}


def _refused(args, capfd, words, *folders):
    code, out, err = run_cli(args, capfd)
    lines = message_lines(err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith("actcache: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    for f in folders:
        assert not (Path(f) / "eval.json").exists()


def test_cli_refuses_bad_input(tmp_path, store_url, capfd, monkeypatch):
    ok = tmp_path / "ok"
    make_sae("random").save_model(ok)
    held = ["--held-out", "100:104"]
    (tmp_path / "empty").mkdir()
    _refused(["eval", str(tmp_path / "empty"), "--store", store_url, *held], capfd, ["holds no SAE"])
    far = tmp_path / "far"
    make_sae("random", hook="blocks.7.hook_resid_post").save_model(far)
    _refused(["eval", str(ok), str(far), "--store", store_url, *held], capfd, ["blocks.7", "past the last layer"], ok)
    narrow = tmp_path / "narrow"
    make_sae("random", d=16).save_model(narrow)
    _refused(["eval", str(narrow), "--store", store_url, *held], capfd, ["d_in 16", "width 32"], narrow)
    other = RANDOM.replace("seed=0", "seed=1")
    _refused(["eval", str(ok), "--store", store_url, "--model", other, *held], capfd, ["harvested from", "--force"], ok)
    small_vocab = RANDOM.replace("d_vocab=500", "d_vocab=100")
    _refused(["eval", str(ok), "--store", store_url, "--model", small_vocab, "--force", *held], capfd,
             ["outside the vocabulary"], ok)
    _refused(["eval", str(ok), "--store", store_url, "--held-out", "10:10"], capfd, ["empty"], ok)
    _refused(["eval", str(ok), "--store", store_url, "--held-out", "100:999"], capfd, ["committed sequences"], ok)
    monkeypatch.setattr(ActivationStore, "held_out_range", lambda self: None, raising=False)
    _refused(["eval", str(ok), "--store", store_url], capfd, ["no held-out part", "--held-out"], ok)
    run = _run_folder(tmp_path, store_url, {"a": make_sae("random")},
                      {"store": store_url, "store_chunks": 16, "held_out": [112, 128]})
    _refused(["eval", str(run)], capfd, ["no held-out part"], run / "a")  # the run's own store: no default range
    _refused(["eval", str(run), "--held-out", "100:120"], capfd, ["sequences 100:112", "training tokens of run"],
             run / "a")
