"""Helpers shared by the evaluation tests: a tiny random model's store, hand-built SAEs."""

from __future__ import annotations

from pathlib import Path

import torch

from actcache.common.sae import SAE, Metadata, SAEConfig

RANDOM = "random:n_layers=3,d_model=32,n_heads=4,d_vocab=500,n_ctx=64,seed=0"
HOOK = "blocks.1.hook_resid_post"
MODEL_D = 32


def harvest_store(out: Path, data: Path, tokens: int = 2048, ctx: int = 16, hooks=(HOOK, "blocks.2.hook_mlp_out"),
                  model: str = RANDOM):
    from actcache.harvest.api import HarvestConfig, harvest

    cfg = HarvestConfig(out=str(out), hooks=list(hooks), model=model, dataset=str(data), context_size=ctx,
                        tokens=tokens, batch_size=8, chunk_sequences=8, device="cpu")
    return harvest(cfg, progress=False)


def make_sae(kind: str, d: int = MODEL_D, hook: str = HOOK, d_sae: int | None = None, seed: int = 0,
             model: str = RANDOM) -> SAE:
    """'exact': relu(x) - relu(-x) = x, an exact reconstruction; 'zero': decodes to zero; 'random': a
    standard SAE with random weights; 'topk': a random topk SAE."""
    g = torch.Generator().manual_seed(seed)
    meta = Metadata(hook_name=hook, model_name=model, model_spec=model)
    if kind == "exact":
        eye = torch.eye(d)
        w = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d), "W_dec": torch.cat([eye, -eye], 0),
             "b_dec": torch.zeros(d)}
        return SAE(SAEConfig("standard", d, 2 * d, metadata=meta), w)
    n = d_sae or 4 * d
    w = {"W_enc": torch.randn(d, n, generator=g) / d ** 0.5, "b_enc": torch.zeros(n),
         "W_dec": torch.randn(n, d, generator=g) / n ** 0.5, "b_dec": torch.zeros(d)}
    if kind == "zero":
        w["W_dec"] = torch.zeros(n, d)
        return SAE(SAEConfig("standard", d, n, metadata=meta), w)
    if kind == "topk":
        return SAE(SAEConfig("topk", d, n, k=4, metadata=meta), w)
    return SAE(SAEConfig("standard", d, n, metadata=meta), w)
