"""A sweep over the ranks of a torchrun job: each rank trains a share of the SAEs.

Every rank reads the store itself and draws the same batch stream (a pure function of the store,
the seed and the step); an SAE's initialisation depends only on (seed, name). So an SAE trained on
any rank, beside any other SAEs, is bitwise the one a single process trains. The shares are balanced
by the estimated cost of a step (`step_cost`): the SAEs, dearest first, each go to the rank with the
least work so far (ties: the lower rank, then the config's order), which is deterministic.

Each rank keeps its own checkpoint under `<out>/rank-<r>-of-<world>/`; resuming needs the same
number of ranks (run.json records it). Rank 0 holds the run folder's lease, writes run.json, gathers
every rank's rows and writes the one summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..common.outputs import rank_dir
from .architectures import get_architecture
from .config import SAEConfig, SweepConfig

ADAM_COST = 12  # flops per parameter of one fused Adam step, next to 2 per multiply-add of a matmul


def step_cost(c: SAEConfig, batch_size: int) -> float:
    """The relative cost of one training step of an SAE: forward and backward matmuls (3x the forward)
    of its encoder(s) and its decoder (dense, or only k latents per token for the TopK family), plus
    the optimiser's pass over its d_in x d_sae parameters."""
    d_in, d_sae = int(c.d_in), int(c.d_sae)
    d_out = int(getattr(c, "d_out", None) or d_in)  # a transcoder's decoder writes another hook
    k = getattr(c, "k", None)
    arch = get_architecture(c.architecture)
    dec = min(int(k), d_sae) if arch.sparse_decoder and k else d_sae
    matmul = 2 * 3 * batch_size * (arch.encoder_matrices * d_in * d_sae + dec * d_out)
    return float(matmul + ADAM_COST * (d_in + d_out) * d_sae)


def assign(saes: list[SAEConfig], world: int, batch_size: int) -> list[list[int]]:
    """For each rank, the indices (in config order) of the SAEs it trains, balanced by step_cost."""
    load = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    order = sorted(range(len(saes)), key=lambda i: (-step_cost(saes[i], batch_size), i))
    for i in order:
        r = min(range(world), key=lambda q: (load[q], q))
        shares[r].append(i)
        load[r] += step_cost(saes[i], batch_size)
    return [sorted(s) for s in shares]


def share(cfg: SweepConfig, rank: int, world: int) -> SweepConfig:
    """The sweep of one rank: the same data stream, its share of the SAEs."""
    mine = assign(cfg.saes, world, cfg.batch_tokens)[rank]
    return dataclasses.replace(cfg, saes=[cfg.saes[i] for i in mine])


def checkpoint_dir(out: Path, rank: int, world: int) -> Path:
    return rank_dir(out, rank, world)


def merge_rows(cfg: SweepConfig, per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every rank's summary rows, in the config's order of the SAEs."""
    by_name = {row["name"]: row for rows in per_rank for row in rows}
    return [by_name[c.name] for c in cfg.saes]
