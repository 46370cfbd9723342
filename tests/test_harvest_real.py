"""The bundled real model (SmolLM2-135M, GGUF) through TransformerLens: a few sequences of the stdlib
corpus, stored activations against run_with_cache; text packing with its tokenizer."""

import numpy as np
import pytest
import torch

from actcache.common.store import ActivationStore
from actcache import HarvestConfig, harvest, verify
from actcache.harvest.data import TokenWindows, resolve_source, stdlib_files
from actcache.harvest.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z", "blocks.2.hook_mlp_out"]


@pytest.fixture(scope="module")
def model(bundled_model):
    return bundled_model.model  # loaded once per run (conftest)


def test_bundled_model_info(model):
    i = model.info
    assert (i.n_layers, i.d_model, i.architecture) == (30, 576, "LlamaForCausalLM")
    t = model.tokenizer_info()
    assert t.name == DEFAULT_MODEL and t.vocab_size == 49152 and t.bos_token_id is not None


def test_stored_activations_equal_run_with_cache(model, tmp_path):
    cfg = HarvestConfig(out=str(tmp_path / "real.zarr"), hooks=HOOKS, dataset="stdlib", context_size=48,
                        tokens=6 * 48, batch_size=4, device="cpu")
    res = harvest(cfg, progress=False, model=model)
    assert res.n_tokens == 6 * 48 and res.hooks == {HOOKS[0]: 576, HOOKS[1]: 576, HOOKS[2]: 576}
    store = ActivationStore.open(cfg.out)
    tokens = store.tokens[:]
    assert (tokens[:, 0] == model.tokenizer.bos_token_id).all()  # prepend_bos
    first = model.tokenizer.decode(tokens[0, 1:])
    assert any(first in open(f, encoding="utf-8").read() for f in stdlib_files())  # a piece of the stdlib, verbatim
    _, cache = model.tl.run_with_cache(torch.from_numpy(tokens.astype(np.int64)),
                                       names_filter=lambda n: n in HOOKS)  # the whole model, no early stop
    for h in HOOKS:
        stored = torch.from_numpy(store.activations(h)[:]).float()
        torch.testing.assert_close(stored, cache[h].reshape(6 * 48, -1), rtol=2e-3, atol=1e-4)
    assert verify(cfg.out).ok


def test_text_is_packed_with_eos_between_documents_and_bos_first(model, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma delta " * 6)
    (folder / "b.txt").write_text("one two three four five " * 6)
    tok = model.tokenizer
    tw = TokenWindows(resolve_source(str(folder)), 16, tok, 49152, seed=0)
    body = np.concatenate([w[1:] for w in tw.windows()])
    assert all(w[0] == tok.bos_token_id for w in tw.windows())
    docs = [tok((folder / f).read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for f in ("a.txt", "b.txt")]
    stream = [np.concatenate([docs[0], docs[1]]), np.concatenate([docs[1], docs[0]])]  # either order (shuffled)
    assert any(np.array_equal(body, s[:len(body)]) for s in stream) and len(body) >= len(stream[0]) - 15
    assert (body == tok.eos_token_id).sum() >= 1
