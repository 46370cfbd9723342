"""A hook on the model's last block: the harvest stops after that block. Watched from outside the
hook system (plain torch forward pre-hooks on ln_final and the unembedding), and the stored activations
are those of the whole model's forward (run_with_cache)."""

import numpy as np
import pytest
import torch

from actcache import HarvestConfig, harvest
from actcache.common.store import ActivationStore
from actcache.harvest.models import load_model
from harvest_fixtures import RANDOM, write_token_jsonl

LAST = "blocks.1.hook_resid_post"  # RANDOM has two blocks


@pytest.fixture(scope="module")
def watched():
    """The model, and the names of its final modules each time one of them starts."""
    model = load_model(RANDOM, device="cpu")
    calls: list[str] = []
    modules = dict(model.tl.named_modules())
    finals = [n for n in ("ln_final", "unembed") if n in modules]
    assert finals == ["ln_final", "unembed"], sorted(modules)[:20]
    for n in finals:
        modules[n].register_forward_pre_hook(lambda mod, args, n=n: calls.append(n))
    return model, calls


def test_the_watch_sees_the_unembedding_of_a_whole_forward(watched):
    model, calls = watched
    calls.clear()
    with torch.inference_mode():
        model.tl(torch.zeros((1, 4), dtype=torch.long))
    assert calls == ["ln_final", "unembed"]
    calls.clear()  # a hook inside ln_final: ln_final runs, the unembedding after it does not
    model.run(torch.zeros((1, 4), dtype=torch.long), ["ln_final.hook_normalized"])
    assert calls == ["ln_final"]


@pytest.mark.parametrize("hooks", [[LAST], ["blocks.0.hook_resid_pre", LAST], ["blocks.1.attn.hook_z"]])
def test_run_stops_after_the_last_block(watched, hooks):
    model, calls = watched
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    calls.clear()
    got = model.run(tokens, hooks)
    assert calls == [] and sorted(got) == sorted(hooks)
    _, cache = model.tl.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    for h in hooks:
        torch.testing.assert_close(got[h], cache[h].reshape(2, 16, -1), rtol=1e-5, atol=1e-6)


def test_harvest_of_a_last_block_hook_never_runs_the_unembedding(watched, tmp_path):
    model, calls = watched
    data = write_token_jsonl(tmp_path / "toks.jsonl")
    cfg = HarvestConfig(out=str(tmp_path / "acts.zarr"), hooks=[LAST], model=RANDOM, dataset=str(data),
                        context_size=32, tokens=12 * 32, batch_size=4, chunk_sequences=4, device="cpu")
    calls.clear()
    harvest(cfg, progress=False, model=model)
    assert calls == []
    store = ActivationStore.open(cfg.out)
    tokens = torch.from_numpy(store.tokens[:].astype(np.int64))
    _, cache = model.tl.run_with_cache(tokens, names_filter=lambda n: n == LAST)
    assert calls == ["ln_final", "unembed"]  # the bare forward does run it
    stored = torch.from_numpy(store.activations(LAST)[:]).float()
    torch.testing.assert_close(stored, cache[LAST].reshape(12 * 32, -1), rtol=2e-3, atol=1e-5)
