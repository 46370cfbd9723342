"""analyse, steer and attribute on the bundled SmolLM2-135M (a trained model: steering and logits mean
something), each checked against an independent computation through transformers' own forward."""

from __future__ import annotations

import copy

import pytest
import torch

from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.harvest.analysis import analyse, attribute, steer, tokenize

LAYER = 24
HOOK = f"blocks.{LAYER}.hook_resid_post"
RANK = 32
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(hf_model):
    """Our HookedModel: the TransformerLens bridge over a copy of the same weights (the bridge replaces
    the copy's layers; the reference model keeps its own)."""
    from actcache.common.manifest import ModelInfo
    from actcache.harvest.models import DEFAULT_MODEL, HookedModel, _wrap_hf

    hf, tok = hf_model
    tl = _wrap_hf(DEFAULT_MODEL, copy.deepcopy(hf), tok, "cpu", torch.float32).eval()
    c = hf.config
    return HookedModel(tl, ModelInfo(name=DEFAULT_MODEL, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                                     n_ctx=c.max_position_embeddings), tok, "cpu")


def _hf_pass(hf, tokens):
    """(logits, activation after block LAYER, residual entering the final norm) from transformers."""
    got = {}

    def keep(name, value):  # a forward hook that returns None leaves the module's output as it is
        got[name] = value.detach()

    h1 = hf.model.layers[LAYER].register_forward_hook(lambda m, i, o: keep("x", o[0] if isinstance(o, tuple) else o))
    h2 = hf.model.norm.register_forward_hook(lambda m, i, o: keep("final", i[0]))
    with torch.no_grad():
        logits = hf(tokens).logits
    h1.remove()
    h2.remove()
    return logits, got["x"], got["final"]


@pytest.fixture(scope="module")
def sae(hf_model, tmp_path_factory):
    """An SAE whose latents are +/- the top principal directions of the layer's activations on some
    Python source (a reconstruction between exact and zero), saved as a folder naming the model."""
    import json as json_module
    from pathlib import Path

    hf, tok = hf_model
    ids = tok(Path(json_module.__file__).read_text())["input_ids"][:192]
    _, x, _ = _hf_pass(hf, torch.tensor([[tok.bos_token_id] + ids]))
    x = x[0, 1:]
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    basis = v[:RANK].T.contiguous()
    meta = Metadata(hook_name=HOOK, model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                    model_spec="smollm2-135m-instruct-q4", prepend_bos=True, context_size=128)
    s = SAE(SAEConfig("standard", x.shape[1], 2 * RANK, metadata=meta),
            {"W_enc": torch.cat([basis, -basis], 1), "b_enc": torch.zeros(2 * RANK),
             "W_dec": torch.cat([basis.T, -basis.T], 0), "b_dec": mu})
    folder = tmp_path_factory.mktemp("analysis") / "pca"
    s.save_model(folder)
    return folder


def test_analyse_error_equals_an_independent_computation(model, hf_model, sae):
    hf, tok = hf_model
    a = analyse(sae, PROMPT, model=model, top=3)
    loaded = SAE.load_from_disk(sae)
    tokens = torch.tensor([[tok.bos_token_id] + tok(PROMPT)["input_ids"]])
    assert [t.token_id for t in a.tokens] == tokens[0].tolist()  # BOS added, as the metadata says
    assert a.tokens[0].special and not any(t.special for t in a.tokens[1:])
    _, x, _ = _hf_pass(hf, tokens)
    x = x[0, 1:].double()  # BOS left out
    f = loaded.encode(x.float())
    xh = loaded.decode(f).double()
    sse = (x - xh).pow(2).sum()
    assert a.n_tokens_scored == x.shape[0]
    assert a.mse == pytest.approx(float(sse / x.shape[0]), rel=1e-3)
    assert a.fvu == pytest.approx(float(sse / (x - x.mean(0)).pow(2).sum()), rel=1e-3)
    assert a.cossim == pytest.approx(float(torch.cosine_similarity(x, xh, dim=-1).mean()), rel=1e-4)
    assert 0.1 < a.cossim < 0.999  # a lossy SAE: neither exact nor nothing
    top = f[-1].topk(3)
    assert a.tokens[-1].latents == top.indices.tolist()
    assert a.tokens[-1].token == " is"


def test_attribution_adds_up_to_the_logit_of_the_transformers_forward(model, hf_model, sae):
    hf, tok = hf_model
    r = attribute(sae, PROMPT, " Paris", model=model, top=5)
    tokens = tokenize(model, PROMPT, True)
    logits, x, final = _hf_pass(hf, tokens)
    t = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert r.target_id == t and r.position == tokens.shape[1] - 1
    ref_logit = float(logits[0, -1, t])
    # the decomposition: every latent's contribution plus the remainder is the model's logit
    assert float(r.contributions.double().sum()) + r.remainder == pytest.approx(ref_logit, abs=2e-3)
    assert r.features_total + sum(r.remainder_terms.values()) == pytest.approx(ref_logit, abs=2e-3)
    # each contribution, independently: activation x (W_dec[i] . w * W_U[:, t] / s), s frozen at the clean pass
    loaded = SAE.load_from_disk(sae)
    xf = final[0, -1].double()
    s = torch.sqrt(xf.pow(2).mean() + hf.model.norm.variance_epsilon)
    u = hf.model.norm.weight.double() * hf.lm_head.weight[t].double() / s
    f = loaded.encode(x[0, -1])
    ref = f.double() * (loaded.W_dec.double() @ u)
    torch.testing.assert_close(r.contributions.double(), ref, atol=2e-3, rtol=1e-3)
    assert r.remainder_terms["error"] == pytest.approx(float((x[0, -1].double() - loaded.decode(f).double()) @ u),
                                                       abs=2e-3)
    assert [row["latent"] for row in r.top] == ref.abs().topk(len(r.top)).indices.tolist()


def test_steering_moves_generation_toward_the_latents_logit_effects(model, sae):
    loaded = SAE.load_from_disk(sae)
    effects = loaded.W_dec @ model.tl.W_U.detach().float()  # [d_sae, vocab]: each latent's logit effects
    rank = effects.argsort(-1, descending=True).argsort(-1)  # 0: the latent's top logit effect
    # the layer's activations have norms of about 440 on text: 300 is a large strength
    feature = 5
    s = steer(sae, "The weather today", feature, strength=300.0, model=model, max_new_tokens=4)
    steered, plain = rank[feature, s.steered_tokens], rank[feature, s.plain_tokens]
    assert int(steered.median()) < 50, (s.steered_text, steered)
    assert int(steered.median()) * 20 < int(plain.median()), (s.steered_text, s.plain_text)


def test_strength_zero_gives_exactly_the_plain_continuation(model, sae):
    s = steer(sae, "The weather today", 5, strength=0.0, model=model, max_new_tokens=4)
    assert s.steered_tokens == s.plain_tokens and s.steered_text == s.plain_text
    with torch.no_grad():  # and the plain one is the model's greedy continuation, one sequence at a time
        seq = tokenize(model, "The weather today", True)
        for want in s.plain_tokens:
            nxt = int(model.tl(seq)[0, -1].argmax())
            assert nxt == want
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
