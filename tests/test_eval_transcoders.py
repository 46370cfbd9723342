"""Transcoders in `actcache eval`: the splice (output hook replaced by the transcoder's map of the input
hook, skip term included) against an independent splice written here with plain torch forward hooks on
the model's hook modules, and the held-out activation metrics against a brute-force computation from
the store's arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.common.store import ActivationStore
from actcache.harvest.evaluate import downstream_metrics

from eval_fixtures import MODEL_D, RANDOM, harvest_store, make_sae
from harvest_fixtures import run_cli, write_token_jsonl

import actcache.train.architectures  # noqa: F401  (registers the transcoder forms)

IN, OUT = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"


def transcoder(skip: bool, seed: int = 0, d_sae: int = 96) -> SAE:
    g = torch.Generator().manual_seed(seed)
    d = MODEL_D
    w = {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.1 - 0.2,
         "W_dec": torch.randn(d_sae, d, generator=g) / d_sae ** 0.5, "b_dec": torch.randn(d, generator=g) * 0.1}
    if skip:
        w["W_skip"] = torch.randn(d, d, generator=g) / d ** 0.5
    meta = Metadata(hook_name=IN, hook_name_out=OUT, model_name=RANDOM, model_spec=RANDOM)
    arch = "skip_transcoder" if skip else "transcoder"
    return SAE(SAEConfig(arch, d, d_sae, d_out=d, apply_b_dec_to_input=False, metadata=meta), w)


def by_hand(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's map written out: relu(x W_enc + b_enc) W_dec + b_dec (+ x W_skip^T)."""
    out = torch.relu(x @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec
    if hasattr(sae, "W_skip"):
        out = out + x @ sae.W_skip.T
    return out


def independent_logits(model, tokens: torch.Tensor, replace) -> torch.Tensor:
    """Logits of the model with torch forward hooks on its HookPoint modules: the input hook's output
    is kept, the output hook's output is replaced by replace(kept input, clean output)."""
    tl = model.tl
    kept = {}

    def keep(module, inputs, output):
        kept["x"] = output.detach().clone()

    def swap(module, inputs, output):
        return replace(kept["x"], output)

    handles = [tl.hook_dict[IN].register_forward_hook(keep), tl.hook_dict[OUT].register_forward_hook(swap)]
    try:
        with torch.no_grad():
            return tl(tokens, return_type="logits").float()
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tcstore")
    data = write_token_jsonl(tmp / "data.jsonl", vocab=500)
    harvest_store(tmp / "acts.zarr", data, hooks=(IN, OUT))
    return str(tmp / "acts.zarr")


@pytest.fixture(scope="module")
def model():
    from actcache.harvest.models import load_model

    return load_model(RANDOM, device="cpu")


def _tokens(store_url, a=100, b=112):
    return torch.from_numpy(np.asarray(ActivationStore.open(store_url).tokens[a:b]).astype(np.int64))


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_splice_equals_an_independent_splice(model, store_url, skip):
    sae = transcoder(skip)
    tokens = _tokens(store_url)
    special = [int(tokens[0, 0])]  # one token id treated as special: its positions keep their clean output
    keep = tokens != special[0]
    m = downstream_metrics(model, [tokens[:8], tokens[8:]], {"t": sae}, special_ids=special)["t"]

    clean = independent_logits(model, tokens, lambda x, out: out)
    spliced = independent_logits(model, tokens, lambda x, out: torch.where(keep[..., None], by_hand(sae, x), out))
    zeroed = independent_logits(model, tokens, lambda x, out: torch.zeros_like(out))

    def ce(logits):
        per = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                              reduction="none").view(tokens.shape[0], -1)
        return float(per[keep[:, :-1]].double().mean())

    def kl(logits):
        lp, lq = F.log_softmax(clean, -1), F.log_softmax(logits, -1)
        per = (lp.exp() * (lp - lq)).sum(-1)
        return float(per[keep].double().mean())

    assert m["ce_loss_without_sae"] == pytest.approx(ce(clean), rel=1e-5)
    assert m["ce_loss_with_sae"] == pytest.approx(ce(spliced), rel=1e-5)
    assert m["ce_loss_with_ablation"] == pytest.approx(ce(zeroed), rel=1e-5)
    assert m["kl_div_with_sae"] == pytest.approx(kl(spliced), rel=1e-4, abs=1e-7)
    assert m["kl_div_with_ablation"] == pytest.approx(kl(zeroed), rel=1e-4, abs=1e-7)
    assert m["ce_loss_with_sae"] != pytest.approx(m["ce_loss_without_sae"], abs=1e-4)  # the splice did something
    # the shared clean pass (blocks below the input hook's layer skipped) equals whole-model passes
    sep = downstream_metrics(model, [tokens[:8], tokens[8:]], {"t": sae}, special_ids=special, one_pass=False)["t"]
    assert sep["ce_loss_with_sae"] == pytest.approx(m["ce_loss_with_sae"], rel=1e-5)


def test_cli_evaluates_a_transcoder_beside_an_sae(tmp_path, store_url, capfd):
    run = tmp_path / "run"
    tc, sae = transcoder(True, seed=1), make_sae("random", hook=IN)
    tc.save_model(run / "tc")
    sae.save_model(run / "sae")
    (run / "run.json").write_text(json.dumps({"store": store_url, "store_chunks": 12, "held_out": [96, 128]}))
    (run / "summary.json").write_text(json.dumps({"hook": IN, "saes": [
        {"name": "tc", "architecture": "skip_transcoder", "d_in": MODEL_D, "d_sae": 96, "hook": IN, "hook_out": OUT,
         "l0": 40.0, "fvu": 0.9, "explained_variance": 0.1, "dead_fraction_eval": 0.0},
        {"name": "sae", "architecture": "standard", "d_in": MODEL_D, "d_sae": 128, "hook": IN,
         "l0": 60.0, "fvu": 0.5, "explained_variance": 0.5, "dead_fraction_eval": 0.0}]}))
    code, out, err = run_cli(["eval", str(run), "--tokens", "256", "--json"], capfd)
    assert code == 0, err
    records = {r["name"]: r for r in json.loads(out)}
    assert list(records) == ["tc", "sae"]  # sweep order, not alphabetical
    r = records["tc"]
    assert r["hook"] == IN and r["hook_out"] == OUT and r["architecture"] == "skip_transcoder"
    assert r["ce_loss_score"] is not None and r["kl_div_with_sae"] > 0
    # activation metrics from the store: the output hook's activations against the map of the input hook's
    st = ActivationStore.open(store_url)
    a, b = r["sequences_scored"]["start_sequence"], r["sequences_scored"]["stop_sequence"]
    ctx = st.manifest.context_size
    x_in = torch.from_numpy(np.asarray(st.activations(IN)[a * ctx:b * ctx], dtype=np.float32))
    x_out = torch.from_numpy(np.asarray(st.activations(OUT)[a * ctx:b * ctx], dtype=np.float32)).double()
    toks = np.asarray(st.tokens[a:b]).reshape(-1)
    special = [i for i in r["special_token_ids"]]
    rows = torch.from_numpy(~np.isin(toks, special))
    x_in, x_out = x_in[rows], x_out[rows]
    with torch.no_grad():
        err_ = (x_out - by_hand(tc, x_in).double()).pow(2).sum()
        f = torch.relu(x_in @ tc.W_enc + tc.b_enc)
    var = (x_out - x_out.mean(0)).pow(2).sum()
    assert r["fvu"] == pytest.approx(float(err_ / var), rel=1e-4)
    assert r["l0"] == pytest.approx(float((f > 0).float().sum(1).mean()), rel=1e-5)
    # the run's summary keeps its training-stream columns and gains the held-out ones
    table = (run / "summary.md").read_text()
    assert "FVU (train)" in table and "FVU (held-out)" in table and "CE loss score (held-out)" in table
    assert f"{IN} → {OUT}" in table
