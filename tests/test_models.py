"""harvest.models: random specs, hook names and dims, the stop layer, run() against run_with_cache."""

import pytest
import torch

from actcache.common.errors import UserError
from actcache.harvest.models import load_model, parse_random_spec
from harvest_fixtures import HOOKS, RANDOM


@pytest.fixture(scope="module")
def model():
    return load_model(RANDOM, device="cpu")


def test_same_random_spec_gives_same_weights_and_seed_changes_them(model):
    again = load_model(RANDOM, device="cpu")
    other = load_model(RANDOM.replace("seed=0", "seed=1"), device="cpu")
    a, b, c = (dict(m.tl.named_parameters()) for m in (model, again, other))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_random_spec_fills_transformer_lens_defaults():
    cfg = parse_random_spec("random:n_layers=1,d_model=32,n_heads=2,d_vocab=50,n_ctx=16,act_fn=relu")
    assert cfg["d_head"] == 16 and cfg["d_mlp"] == 128 and cfg["act_fn"] == "relu" and cfg["seed"] == 0
    with pytest.raises(UserError, match="missing d_model"):
        parse_random_spec("random:n_layers=1")


def test_model_info(model):
    assert (model.info.d_model, model.info.n_layers, model.info.n_ctx, model.info.dtype) == (64, 2, 256, "float32")
    assert model.tokenizer is None and model.tokenizer_info().vocab_size == 1000


def test_hook_dims_flatten_heads(model):
    dims = model.hook_dims(HOOKS + ["blocks.0.mlp.hook_post"])
    assert dims == {"blocks.0.hook_resid_pre": 64, "blocks.0.attn.hook_z": 64, "blocks.1.hook_mlp_out": 64,
                    "blocks.1.hook_resid_post": 64, "blocks.0.mlp.hook_post": 256}


def test_stop_layer_is_one_past_the_deepest_hook(model):
    assert model.stop_layer(["blocks.0.hook_resid_pre"]) == 1
    assert model.stop_layer(["hook_embed", "blocks.0.hook_mlp_out"]) == 1
    assert model.stop_layer(["hook_embed"]) == 0
    assert model.stop_layer(["blocks.0.hook_resid_pre", "ln_final.hook_normalized"]) is None


def test_unknown_hook_suggests_close_names(model):
    with pytest.raises(UserError, match=r"unknown hook 'blocks.0.hook_resid_psot'.*did you mean blocks.0.hook_resid_post"):
        model.hook_dims(["blocks.0.hook_resid_psot"])


def test_hook_past_last_layer(model):
    with pytest.raises(UserError, match=r"past the last layer.*2 layers"):
        model.hook_dims(["blocks.2.hook_resid_pre"])


def test_run_equals_run_with_cache(model):
    tokens = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    got = model.run(tokens, HOOKS)
    _, cache = model.tl.run_with_cache(tokens, names_filter=lambda n: n in HOOKS)
    for h in HOOKS:
        ref = cache[h].reshape(3, 24, -1)
        assert got[h].shape == ref.shape
        torch.testing.assert_close(got[h], ref, rtol=1e-5, atol=1e-6)
    bare = model.bare_forward(tokens, HOOKS)
    assert all(bare[h].dtype == torch.float16 and bare[h].device.type == "cpu" for h in HOOKS)
