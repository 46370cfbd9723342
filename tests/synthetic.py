"""Synthetic actcache stores for the train tests: the planted-dictionary stores of
benchmarks/synthetic.py (shared with the benchmarks), and helpers to judge what an SAE recovered."""

from __future__ import annotations

import torch

from benchmarks.synthetic import BOS_ID, VOCAB, Planted, make_store, planted_dictionary, sample_activations

__all__ = ["BOS_ID", "VOCAB", "Planted", "feature_recovery", "make_store", "planted_dictionary",
           "sample_activations", "write_toml"]


def feature_recovery(W_dec: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """For each planted feature, the best cosine similarity with any decoder row."""
    dec = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (features @ dec.T).max(dim=1).values


def write_toml(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)

