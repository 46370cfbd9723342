"""analyse / steer / attribute / hooks on a tiny random model: the commands, their JSON, and bad input
(one line, non-zero exit). The numbers against an independent computation: test_analysis_bundled.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from actcache.common.errors import UserError
from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.harvest.analysis import analyse, attribute, list_hooks, steer

from harvest_fixtures import ROOT, env, message_lines, run_cli

SPEC = "random:n_layers=2,d_model=32,n_ctx=24,d_vocab=49152,seed=0"  # the bundled tokenizer's vocabulary
HOOK = "blocks.0.hook_resid_post"
D, D_SAE = 32, 64


def _sae(hook: str = HOOK, d_in: int = D, spec: str = SPEC) -> SAE:
    g = torch.Generator().manual_seed(0)
    meta = Metadata(hook_name=hook, model_spec=spec, prepend_bos=False)
    return SAE(SAEConfig("standard", d_in, D_SAE, metadata=meta),
               {"W_enc": torch.randn(d_in, D_SAE, generator=g), "b_enc": torch.zeros(D_SAE),
                "W_dec": torch.randn(D_SAE, d_in, generator=g) / 4, "b_dec": torch.randn(d_in, generator=g)})


@pytest.fixture(scope="module")
def model():
    from actcache.harvest.models import load_model

    return load_model(SPEC, device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("an") / "sae"
    _sae().save_model(f)
    return f


def test_analyse_lists_top_latents_and_error(model, folder):
    a = analyse(folder, [1, 2, 3, 4, 5], model=model, top=3)
    assert [t.token_id for t in a.tokens] == [1, 2, 3, 4, 5]  # ids are used as given
    f = a.latents
    for t in a.tokens:
        assert t.latents == f[t.position].topk(3).indices.tolist()
        assert t.values == pytest.approx(f[t.position].topk(3).values.tolist())
    x, xh = a.activations.double(), a.reconstruction.double()
    assert a.mse == pytest.approx(float((x - xh).pow(2).sum(-1).mean()))
    assert a.l0 == pytest.approx(float((f != 0).sum(-1).double().mean()))


def test_attribution_adds_up_on_a_layernorm_model(model, folder):
    r = attribute(folder, [1, 2, 3, 4], 7, model=model, top=4)
    logits, _ = __import__("actcache.harvest.splice", fromlist=["forward"]).forward(model, torch.tensor([[1, 2, 3, 4]]))
    assert r.logit == pytest.approx(float(logits[0, -1, 7]), abs=1e-5)
    assert float(r.contributions.double().sum()) + r.remainder == pytest.approx(r.logit, abs=1e-4)
    assert r.features_total + sum(r.remainder_terms.values()) == pytest.approx(r.logit, abs=1e-4)
    assert len(r.top) == 4 and abs(r.top[0]["contribution"]) >= abs(r.top[-1]["contribution"])


def test_steering_positions_and_sampling(model, folder):
    s0 = steer(folder, [1, 2, 3], 5, strength=0.0, model=model, max_new_tokens=6, temperature=1.0, seed=3)
    assert s0.steered_tokens == s0.plain_tokens
    again = steer(folder, [1, 2, 3], 5, strength=0.0, model=model, max_new_tokens=6, temperature=1.0, seed=3)
    assert again.plain_tokens == s0.plain_tokens  # the seed fixes the draws
    big = steer(folder, [1, 2, 3], 5, strength=50.0, model=model, max_new_tokens=6)
    prompt_only = steer(folder, [1, 2, 3], 5, strength=50.0, model=model, max_new_tokens=6, positions="prompt")
    assert big.plain_tokens == prompt_only.plain_tokens
    assert big.steered_tokens != big.plain_tokens
    assert prompt_only.steered_tokens != big.steered_tokens


def test_hooks_lists_names_widths_and_which_fire(model):
    rows = {r.name: r for r in list_hooks(model)}
    assert rows[HOOK].fires and rows[HOOK].width == D
    assert rows["blocks.0.attn.hook_z"].width == D  # heads flattened
    assert not rows["blocks.0.attn.hook_result"].fires  # switched off unless asked for
    assert set(rows) == set(model.tl.hook_dict)


def _cli(*args, ok=True):
    res = subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True, cwd=ROOT,
                         env=env(), timeout=300)
    if ok:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_commands(folder, capfd):
    """The commands as a user runs them: steer and hooks through the entry point in this process, and the
    error through a real process (its exit status and stderr as a shell sees them)."""
    tok = ("--tokenizer", "smollm2-135m-instruct-q4")  # a random model has no tokenizer of its own
    code, stdout, err = run_cli(["steer", str(folder), "--feature", "5", "--strength", "0", "--prompt", "The weather",
                                 "--max-new-tokens", "3", *tok, "--json"], capfd)
    assert code == 0, err[-2000:]
    out = json.loads(stdout)
    assert out["steered_tokens"] == out["plain_tokens"] and len(out["plain_tokens"]) == 3
    assert out["prompt_tokens"] == [504, 3947]  # no BOS: the SAE's metadata says prepend_bos false
    bad = _cli("attribute", str(folder), "--prompt", "The capital of France is", "--target", " Parisian", *tok,
               "--quiet", ok=False)  # no progress lines of the (slow) tokenizer load: the error alone
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert message_lines(bad.stderr) == [bad.stderr.strip()]
    assert bad.stderr.startswith("actcache: error: the target ' Parisian' is 2 tokens")
    code, stdout, err = run_cli(["hooks", SPEC, "--json"], capfd)
    assert code == 0, err[-2000:]
    hooks = json.loads(stdout)
    assert {"name": HOOK, "fires": True, "shape": [1, 5, D], "width": D} in hooks


@pytest.mark.parametrize("make, call, message", [
    (None, lambda m, f: steer(f, [1, 2], 64, model=m, max_new_tokens=2), "latent 64 is out of range"),
    (None, lambda m, f: analyse(f, list(range(25)), model=m), "more than the 24-token context"),
    (None, lambda m, f: steer(f, list(range(20)), 1, model=m, max_new_tokens=5), "plus 5 new tokens"),
    (lambda p: _sae(hook="blocks.0.hook_mlp_outt").save_model(p), lambda m, f: analyse(f, [1, 2], model=m),
     "unknown hook"),
    (lambda p: _sae(d_in=16).save_model(p), lambda m, f: analyse(f, [1, 2], model=m), "has d_in 16 but"),
    (lambda p: _sae(hook="blocks.0.mlp.hook_post", d_in=128).save_model(p),
     lambda m, f: attribute(f, [1, 2], 3, model=m), "needs an SAE on the residual stream"),
])
def test_bad_input_is_one_clear_error(model, folder, tmp_path, make, call, message):
    f = folder
    if make is not None:
        f = tmp_path / "other"
        make(f)
    with pytest.raises(UserError, match=message):
        call(model, f)
