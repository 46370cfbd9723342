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
    from benchmarks.bench_harvest import bare_forward

    bare = bare_forward(model, tokens, HOOKS)
    assert all(bare[h].dtype == torch.float16 and bare[h].device.type == "cpu" for h in HOOKS)


@pytest.mark.parametrize("spec", [RANDOM, "random:n_layers=3,d_model=32,d_vocab=50,n_ctx=16"])
def test_hooks_are_checked_from_the_config_before_any_weights(spec, monkeypatch):
    from actcache.harvest import models

    def no_loading(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(models, "_boot_random", no_loading)
    n = parse_random_spec(spec)["n_layers"]
    assert models.config_n_layers(spec) == n
    with pytest.raises(UserError, match=r"unknown hook 'blocks.0.hook_resid_psot'.*did you mean blocks.0.hook_resid_post"):
        models.precheck_hooks(spec, ["blocks.0.hook_resid_psot"])
    with pytest.raises(UserError, match=r"unknown hook 'blocks.1.attn.hook_zz'.*did you mean blocks.1.attn.hook_z"):
        models.precheck_hooks(spec, ["blocks.1.attn.hook_zz"])
    with pytest.raises(UserError, match=rf"past the last layer.*{n} layers"):
        models.precheck_hooks(spec, [f"blocks.{n}.hook_resid_pre"])
    with pytest.raises(UserError, match="given twice"):
        models.precheck_hooks(spec, ["hook_embed", "hook_embed"])
    # every name the real model accepts passes the check from the config
    models.precheck_hooks(spec, HOOKS + ["blocks.0.mlp.hook_post", "hook_embed", "ln_final.hook_normalized",
                                         "blocks.0.ln1.hook_normalized", "blocks.0.attn.q.hook_out"])


def test_every_hook_of_a_loaded_model_passes_the_config_check(model):
    from actcache.harvest.models import check_hook_names

    check_hook_names(model.hook_names, model.info.n_layers, model.info.name)


@pytest.mark.slow
def test_misspelt_hook_on_the_bundled_model_is_reported_before_the_weights_load(bundled_model):
    """The error comes from the configuration: a small fraction of the time loading takes."""
    import time

    from actcache.harvest.data import files_fingerprint
    from actcache.harvest.models import (DEFAULT_MODEL, bundled_gguf, check_hook_names, config_n_layers,
                                         precheck_hooks)

    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"unknown hook 'blocks.3.hook_resid_psot'.*did you mean blocks.3.hook_resid_post"):
        precheck_hooks(DEFAULT_MODEL, ["blocks.3.hook_resid_psot"])
    with pytest.raises(UserError, match="past the last layer: .* has 30 layers"):
        precheck_hooks(DEFAULT_MODEL, ["blocks.30.hook_mlp_out"])
    t_check = time.perf_counter() - t0
    m, t_load = bundled_model.model, bundled_model.load_seconds
    assert config_n_layers(DEFAULT_MODEL) == m.info.n_layers
    assert m.info.revision == files_fingerprint([bundled_gguf()])  # the GGUF file's content
    check_hook_names(m.hook_names, m.info.n_layers, DEFAULT_MODEL)  # the patterns cover every real name
    print(f"hook check from the config {t_check:.3f} s; loading the model {t_load:.1f} s")
    assert t_check < 0.2 * t_load, (t_check, t_load)


def test_model_revision_is_a_fingerprint_of_local_weights(model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from actcache.harvest.data import files_fingerprint

    assert model.info.revision is None  # a random: spec is its own revision (the seed fixes the weights)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    hf.save_pretrained(tmp_path / "tiny")
    m = load_model(str(tmp_path / "tiny"), device="cpu")
    rev = m.info.revision
    assert rev == files_fingerprint(sorted(p for p in (tmp_path / "tiny").iterdir())) and len(rev) == 16
    torch.manual_seed(1)
    LlamaForCausalLM(hf.config).save_pretrained(tmp_path / "tiny")  # other weights, same names
    assert load_model(str(tmp_path / "tiny"), device="cpu").info.revision != rev
