"""The session's generation on the bundled SmolLM2-135M (a real model through the GGUF path, key/value
cache included): cached generation equals whole-sequence generation token for token, and the steered
continuation equals the transformers model's own greedy generation with a plain forward hook adding
strength x the decoder row. Kept small: 6 new tokens."""

from __future__ import annotations

import pytest
import torch

from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.harvest.models import DEFAULT_MODEL
from actcache.harvest.session import Session
from tests.explore_fixtures import hf_greedy

pytestmark = pytest.mark.slow
LAYER = 4
HOOK = f"blocks.{LAYER}.hook_resid_post"
N = 6


@pytest.fixture(scope="module")
def session(bundled_model, tmp_path_factory):
    d = int(bundled_model.model.info.d_model)
    g = torch.Generator().manual_seed(0)
    meta = Metadata(hook_name=HOOK, model_spec=DEFAULT_MODEL, prepend_bos=True)
    folder = tmp_path_factory.mktemp("bundled-session") / "sae"
    SAE(SAEConfig("standard", d, 64, metadata=meta),
        {"W_enc": torch.randn(d, 64, generator=g), "b_enc": torch.zeros(64),
         "W_dec": torch.randn(64, d, generator=g) / d ** 0.5, "b_dec": torch.zeros(d)}).save_model(folder)
    return Session(folder, model=bundled_model.model)


def test_cached_steering_equals_whole_sequences_and_a_plain_forward_hook(session, hf_model):
    hf, _ = hf_model
    cached = session.steer("The weather today", 5, 40.0, N)
    whole = session.steer("The weather today", 5, 40.0, N, use_cache=False)
    assert cached.steered_tokens == whole.steered_tokens and cached.plain_tokens == whole.plain_tokens
    torch.testing.assert_close(torch.stack(cached.step_logits), torch.stack(whole.step_logits), atol=2e-3, rtol=1e-3)
    direction = 40.0 * session.get().sae.W_dec[5].detach()
    steered, logits = hf_greedy(hf, cached.prompt_tokens, N, direction, layer=LAYER)
    plain, _ = hf_greedy(hf, cached.prompt_tokens, N, layer=LAYER)
    assert cached.steered_tokens == steered and cached.plain_tokens == plain
    assert cached.steered_tokens != cached.plain_tokens
    torch.testing.assert_close(torch.stack(cached.step_logits)[:, 0], logits, atol=2e-3, rtol=1e-3)
