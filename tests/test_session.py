"""The Session on a tiny random Llama (a Hugging Face folder, so it runs with a key/value cache like a
real model): steering against an independent forward hook on the transformers model, cached generation
against whole-sequence generation, top features joined with the features output read by hand, and
bad input. The bundled model: test_session_bundled.py."""

from __future__ import annotations

import json

import pytest
import torch

from actcache.common.errors import UserError
from actcache.harvest.session import Session
from tests.explore_fixtures import HOOK, build_lab, hf_greedy, hf_hook_activation


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_lab(tmp_path_factory.mktemp("session"))


@pytest.fixture(scope="module")
def session(lab):
    return Session(lab.run)


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_steered_logits_equal_an_independent_forward_hook(lab, session, positions):
    latent, strength, n = 7, 6.0, 6
    s = session.steer("w5 w17 w300 w42", latent, strength, n, positions=positions)
    ids = s.prompt_tokens
    assert ids[0] == 1 and len(ids) == 5  # BOS, then one token per word
    row = session.get().sae.W_dec[latent].detach()
    steered, steered_logits = hf_greedy(lab.hf, ids, n, strength * row,
                                         n_prompt=len(ids) if positions == "prompt" else None)
    plain, plain_logits = hf_greedy(lab.hf, ids, n, None)
    assert s.steered_tokens == steered and s.plain_tokens == plain
    assert s.steered_tokens != s.plain_tokens  # the direction changes what comes out
    ours = torch.stack(s.step_logits)  # [steps, 2, vocab]
    torch.testing.assert_close(ours[:, 0], steered_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[:, 1], plain_logits, atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_whole_sequence_generation(session):
    for kw in ({}, {"positions": "prompt"}, {"temperature": 1.0, "seed": 4}):
        cached = session.steer("w9 w8 w7", 11, 5.0, 12, **kw)
        whole = session.steer("w9 w8 w7", 11, 5.0, 12, use_cache=False, **kw)
        assert cached.steered_tokens == whole.steered_tokens
        assert cached.plain_tokens == whole.plain_tokens
        torch.testing.assert_close(torch.stack(cached.step_logits), torch.stack(whole.step_logits),
                                   atol=1e-4, rtol=1e-4)


def test_top_features_are_the_latents_of_the_text_joined_with_their_contexts(lab, session):
    t = session.top_features("w5 w17 w300", k=4, sae="beta", contexts=2)
    assert t.features == str(lab.features) and t.note is None
    sae = session.get("beta").sae
    # the latents: an independent pass with a plain forward hook on the transformers model
    f = sae.encode(hf_hook_activation(lab.hf, [1, 5, 17, 300]))
    assert [tok.token for tok in t.tokens] == ["<s>", "w5", "w17", "w300"]
    assert t.tokens[0].special and not t.tokens[1].special
    n_contexts = 0
    for tok in t.tokens:
        want = [j for j in f[tok.position].topk(4).indices.tolist() if f[tok.position, j] > 0]
        assert [h.latent for h in tok.latents] == want
        for hit in tok.latents:
            assert hit.activation == pytest.approx(float(f[tok.position, hit.latent]), rel=1e-4, abs=1e-6)
            # the contexts: the latent's record read by hand from its block file (256 latents per block)
            block = json.loads((lab.features / "saes" / "beta" / "blocks" / f"{hit.latent // 256:05d}.json").read_text())
            rec = block["latents"][hit.latent % 256]
            assert rec["id"] == hit.latent and hit.density == rec["density"]
            vocab = json.loads((lab.features / "vocab.json").read_text())
            assert [c.tokens for c in hit.contexts] == [[vocab[str(i)] for i in e["tokens"]] for e in rec["top"][:2]]
            assert [c.at for c in hit.contexts] == [e["at"] for e in rec["top"][:2]]
            n_contexts += len(hit.contexts)
    assert n_contexts > 0
    card = session.latent(299, "beta")  # a latent of the second block
    assert card["id"] == 299 and card["sae"] == "beta"


def test_attribution_adds_up_to_the_logit(lab, session):
    r = session.attribute("w5 w17 w300", "w9", sae="alpha", top=5)
    with torch.no_grad():
        logit = float(lab.hf(torch.tensor([[1, 5, 17, 300]])).logits[0, -1, 9])
    assert r.logit == pytest.approx(logit, abs=1e-4)
    assert float(r.contributions.double().sum()) + r.remainder == pytest.approx(logit, abs=1e-4)
    assert r.features_total + sum(r.remainder_terms.values()) == pytest.approx(logit, abs=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.steer("w5", 7, float("nan"), 3), "strength nan: give a finite number"),
    (lambda s: s.steer("w5", 7, float("inf"), 3), "strength inf: give a finite number"),
    (lambda s: s.steer("w5", 96, 1.0, 3, sae="alpha"), "latent 96 is out of range: alpha has 96 latents"),
    (lambda s: s.latent("x"), "latent 'x' is not a whole number"),
    (lambda s: s.top_features(" ".join(["w5"] * 64)), "more than the 64-token context"),
    (lambda s: s.steer(" ".join(["w5"] * 60), 1, 1.0, 8), "plus 8 new tokens"),
    (lambda s: s.top_features("w5", sae="gamma"), "no SAE named 'gamma'"),
])
def test_bad_input_is_one_clear_error(session, call, message):
    with pytest.raises(UserError, match=message):
        call(session)


def test_a_run_without_features_output_says_the_command(lab, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lab.run / "alpha", run / "alpha")
    s = Session(run)
    assert s.missing_features == {"alpha": f"actcache features {run} --out {run / 'features'}"}
    t = s.top_features("w5 w6", k=2)
    assert t.features is None
    assert t.note == f"no top contexts: alpha has no features output; build it with `actcache features {run} --out {run / 'features'}`"
    assert all(not h.contexts for tok in t.tokens for h in tok.latents)
    with pytest.raises(UserError, match="no latent card: alpha has no features output; build it with `actcache features"):
        s.latent(3)
    assert s.get().hook == HOOK


def test_features_of_other_weights_are_not_shown(lab, tmp_path):
    """A features output measured the weights of its time: after the SAE is retrained (new weights),
    its contexts are not shown as this SAE's, and the command to rebuild them is said."""
    import shutil

    from tests.explore_fixtures import random_sae

    run = tmp_path / "run"
    shutil.copytree(lab.run, run)  # a copied run: the same weights, so its features output still holds
    assert Session(run).missing_features == {}
    random_sae("alpha", str(lab.model_dir), 7).save_model(run / "alpha")  # retrained: other weights
    s = Session(run)
    assert s.missing_features == {"alpha": f"actcache features {run} --out {run / 'features'} --overwrite"}
    assert s.get("beta").features is not None
    assert "measured other weights than those now in" in s.top_features("w5", sae="alpha").note


def test_an_sae_folder_of_a_run_finds_the_runs_features_output(lab, session, tmp_path):
    s = Session(lab.run / "beta", model=session.model)  # the loaded model is reused, not loaded again
    assert s.sae_names == ["beta"] and s.get().features is not None and s.missing_features == {}
    import shutil

    shutil.copytree(lab.run, tmp_path / "run", ignore=shutil.ignore_patterns("features"))
    s = Session(tmp_path / "run" / "beta", model=session.model)
    run = tmp_path / "run"
    assert s.missing_features == {"beta": f"actcache features {run} --out {run / 'features'}"}
