"""Generation with functions spliced in at hooks (steering), with a key/value cache.

    rows = generate(model, tokens, 20, splices={"blocks.4.hook_resid_post": steering_hook(direction, 8.0)})

The prompt runs once; each new token then runs alone against the keys and values of the positions
before it (the Hugging Face cache behind a TransformerLens 4 bridge), instead of the whole sequence
again. Models that give no cache (TransformerLens 3, the bridge's native random models) run the whole
sequence at every step, with the same result. A splice here is position-aware: fn(x, start) gets the
activations [batch, n, d] of positions start .. start + n - 1 and returns their replacement."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch

from . import splice

PositionedSplice = Callable[[torch.Tensor, int], torch.Tensor]


def steering_hook(direction: torch.Tensor, strength: float, n_prompt: int | None = None,
                  rows: int | None = None) -> PositionedSplice:
    """x -> x + strength * direction at every position (n_prompt: only at positions below n_prompt;
    rows: only in the first `rows` sequences of the batch)."""
    def add(x: torch.Tensor, start: int = 0) -> torch.Tensor:
        d = (float(strength) * direction).to(x.device, x.dtype)
        stop = x.shape[1] if n_prompt is None else max(0, min(x.shape[1], int(n_prompt) - int(start)))
        out = x.clone()
        out[slice(rows), :stop] += d
        return out

    return add


@torch.inference_mode()
def generate(model: Any, tokens: torch.Tensor, max_new_tokens: int, *,
             splices: Mapping[str, PositionedSplice] | None = None, temperature: float = 0.0,
             seed: int | None = None, stop_at_eos: bool = True, use_cache: bool = True,
             logits_out: list[torch.Tensor] | None = None) -> list[list[int]]:
    """New token ids after each row of `tokens` [rows, pos], greedy (temperature 0) or sampled, every
    row with its own generator seeded with `seed` (rows that agree draw the same). use_cache=False runs
    the whole sequence at every step (the reference the cache is checked against). logits_out, when
    given, receives the logits [rows, vocab] of every step."""
    rows = tokens.shape[0]
    gens = [torch.Generator().manual_seed(int(seed if seed is not None else 0)) for _ in range(rows)]
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    splices = dict(splices or {})
    seq = tokens.clone()
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    past: Any = None
    start = 0  # the first position the next pass computes
    for _ in range(int(max_new_tokens)):
        at = {h: functools.partial(fn, start=start) for h, fn in splices.items()}
        if use_cache:
            logits, past = splice.forward_step(model, seq[:, start:], at, past)
            if past is None:  # no cache from this model: whole sequences from here on
                use_cache = False
        else:
            logits, _ = splice.forward(model, seq, at)
        start = seq.shape[1] if use_cache else 0
        last = logits[:, -1].float().cpu()
        if logits_out is not None:
            logits_out.append(last)
        nxt = []
        for r in range(rows):
            if temperature and temperature > 0:
                t = int(torch.multinomial(torch.softmax(last[r] / float(temperature), -1), 1, generator=gens[r]))
            else:
                t = int(last[r].argmax())
            nxt.append(t)
            if not done[r]:
                out[r].append(t)
                done[r] = stop_at_eos and eos is not None and t == int(eos)
        if all(done):
            break
        seq = torch.cat([seq, torch.tensor(nxt, dtype=seq.dtype)[:, None]], dim=1)
    return out
