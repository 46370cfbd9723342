"""Evaluation on the bundled SmolLM2-135M (a trained model, so zero ablation costs real loss): the CE loss
score and KL agree with an independent computation through transformers forward hooks, and with
SAELens's run_evals in the sae-lens environment on the same SAE folder and token windows."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actcache.common.sae import SAE, Metadata, SAEConfig
from benchmarks.bench_eval import save_plain_hf

from harvest_fixtures import ROOT, env

LAYER = 4
HOOK = f"blocks.{LAYER}.hook_resid_post"
N_WINDOWS, CTX, RANK = 4, 32, 48


@pytest.fixture(scope="module")
def windows(hf_model):
    """Token windows of Python source, each starting with BOS, as a harvest writes them."""
    import json as json_module

    _, tok = hf_model
    ids = tok(Path(json_module.__file__).read_text())["input_ids"]
    body = CTX - 1
    rows = [[tok.bos_token_id] + ids[i * body:(i + 1) * body] for i in range(N_WINDOWS)]
    return torch.tensor(rows, dtype=torch.long)


def _special(tok) -> list[int]:
    return sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None})


def _resid(hf, tokens):
    out = {}
    h = hf.model.layers[LAYER].register_forward_hook(lambda m, i, o: out.setdefault("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(tokens)
    h.remove()
    return out["x"]


@pytest.fixture(scope="module")
def pca_sae(hf_model, windows, tmp_path_factory):
    """An SAE that projects onto the top principal directions: a reconstruction between exact and zero."""
    hf, _ = hf_model
    x = _resid(hf, windows)[:, 1:].reshape(-1, hf.config.hidden_size)
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    basis = v[:RANK].T.contiguous()
    meta = Metadata(hook_name=HOOK, hook_head_index=None, model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                    context_size=CTX, prepend_bos=True, dataset_path="", sae_lens_version="6.54.12",
                    sae_lens_training_version="6.54.12")
    sae = SAE(SAEConfig("standard", x.shape[1], 2 * RANK, metadata=meta),
              {"W_enc": torch.cat([basis, -basis], 1), "b_enc": torch.zeros(2 * RANK),
               "W_dec": torch.cat([basis.T, -basis.T], 0), "b_dec": mu})
    folder = tmp_path_factory.mktemp("pca") / "pca-sae"
    sae.save_model(folder)
    return sae, folder


def _independent(hf, tokens, sae, special):
    """CE and KL with the SAE spliced in by a transformers forward hook on the layer's output."""
    keep = ~torch.isin(tokens, torch.tensor(special))

    def run(replace):
        def hook(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            new = torch.where(keep[..., None], replace(h), h) if replace is not sae_fwd else \
                torch.where(keep[..., None], sae.decode(sae.encode(h)), h)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        handle = hf.model.layers[LAYER].register_forward_hook(hook) if replace is not None else None
        with torch.no_grad():
            logits = hf(tokens).logits
        if handle:
            handle.remove()
        return F.log_softmax(logits.float(), -1)

    sae_fwd = object()
    clean = run(None)
    with_sae = run(sae_fwd)

    def zero_hook(mod, inp, out):  # zero ablation replaces every position, as SAELens's does
        h = out[0] if isinstance(out, tuple) else out
        return (torch.zeros_like(h),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(h)

    handle = hf.model.layers[LAYER].register_forward_hook(zero_hook)
    with torch.no_grad():
        zero = F.log_softmax(hf(tokens).logits.float(), -1)
    handle.remove()

    def ce(lp):
        per = -lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        return float(per[keep[:, :-1]].mean())

    def kl(lp):
        per = (clean.exp() * (clean - lp)).sum(-1)
        return float(per[keep].mean())

    c0, c1, c2 = ce(clean), ce(with_sae), ce(zero)
    return {"ce_loss_score": (c2 - c1) / (c2 - c0), "kl_div_with_sae": kl(with_sae),
            "kl_div_score": (kl(zero) - kl(with_sae)) / kl(zero), "ce_loss_without_sae": c0}


@pytest.fixture(scope="module")
def ours(hf_model, windows, pca_sae):
    import copy

    from actcache.common.manifest import ModelInfo
    from actcache.harvest.evaluate import downstream_metrics
    from actcache.harvest.models import DEFAULT_MODEL, HookedModel, _wrap_hf

    hf, tok = hf_model
    # the bridge over a copy of the same weights (loading the GGUF file again costs most of this test's time);
    # the bridge replaces the copy's layers, the reference keeps its own
    tl = _wrap_hf(DEFAULT_MODEL, copy.deepcopy(hf), tok, "cpu", torch.float32).eval()
    c = hf.config
    model = HookedModel(tl, ModelInfo(name=DEFAULT_MODEL, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                                      n_ctx=2048), tok, "cpu")
    assert not any(type(m).__name__ == "BlockBridge" for m in hf.modules())
    special = _special(tok)
    return downstream_metrics(model, [windows[:2], windows[2:]], {"pca": pca_sae[0]}, special_ids=special)["pca"]


def test_scores_agree_with_transformers_forward_hooks(hf_model, windows, pca_sae, ours):
    hf, tok = hf_model
    ref = _independent(hf, windows, pca_sae[0], _special(tok))
    assert 0.05 < ref["ce_loss_score"] < 0.98  # a real gap between clean and ablated, and a lossy SAE
    assert ours["ce_loss_without_sae"] == pytest.approx(ref["ce_loss_without_sae"], rel=1e-4)
    for key in ("ce_loss_score", "kl_div_score"):
        assert ours[key] == pytest.approx(ref[key], abs=2e-3), key
    assert ours["kl_div_with_sae"] == pytest.approx(ref["kl_div_with_sae"], rel=1e-2)


@pytest.mark.skipif(not os.environ.get("ACTCACHE_SAELENS_PYTHON"), reason="needs ACTCACHE_SAELENS_PYTHON (sae-lens env)")
def test_scores_agree_with_saelens_run_evals(hf_model, windows, pca_sae, ours, tmp_path):
    hf, tok = hf_model
    folder = tmp_path / "hf"
    save_plain_hf(hf, tok, folder)
    np.save(tmp_path / "toks.npy", windows.numpy())
    res = subprocess.run([os.environ["ACTCACHE_SAELENS_PYTHON"], "benchmarks/eval_saelens_side.py", "--hf-folder",
                          str(folder), "--tokens", str(tmp_path / "toks.npy"), "--sae", str(pca_sae[1]), "--batch", "2",
                          "--special", ",".join(map(str, _special(tok)))],
                         capture_output=True, text=True, cwd=ROOT, env=env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["max_abs_logit_diff"] < 1e-2  # the HookedTransformer is the same model
    theirs = out["saes"][str(pca_sae[1])]
    for key in ("ce_loss_score", "kl_div_score"):
        assert ours[key] == pytest.approx(theirs[key], abs=0.01), key
