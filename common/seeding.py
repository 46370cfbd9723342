"""Deterministic random streams derived from a seed and a path of integers."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed that depends only on (seed, *path): independent streams for each use."""
    h = hashlib.sha256(repr((int(seed),) + tuple(path)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *path: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, *path)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *path))
    return g


def permutation(n: int, seed: int, *path: int | str) -> torch.Tensor:
    """A permutation of range(n) that is a pure function of (n, seed, *path)."""
    return torch.randperm(n, generator=generator(seed, *path))
