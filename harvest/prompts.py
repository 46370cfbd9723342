"""A model's text <-> token ids for the analysis tools: prompts checked against the vocabulary and the
context, token strings, special tokens, single-token targets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..common.errors import UserError
from ..common.manifest import special_token_ids

Prompt = str | Sequence[int]


def tokenize(model: Any, prompt: Prompt, prepend_bos: bool = True, room: int = 0) -> torch.Tensor:
    """[1, pos] token ids of a text (BOS in front when prepend_bos and the tokenizer has one) or of a
    list of ids, checked against the vocabulary and the model's context (`room` tokens kept free)."""
    if isinstance(prompt, str):
        tok = model.tokenizer
        if tok is None:
            raise UserError(f"{model.info.name} has no tokenizer: give token ids, or a tokenizer (--tokenizer)")
        ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
        if prepend_bos and tok.bos_token_id is not None:
            ids = [int(tok.bos_token_id)] + ids
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise UserError("the prompt is empty")
    vocab = model.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary of {model.info.name} ({vocab} tokens)")
    n_ctx = int(model.info.n_ctx)
    if len(ids) + room > n_ctx:
        extra = f" plus {room} new tokens" if room else ""
        raise UserError(f"the prompt has {len(ids)} tokens{extra}, more than the {n_ctx}-token context of "
                        f"{model.info.name}; shorten it")
    return torch.tensor([ids], dtype=torch.long)


def token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for (the id itself where there is no tokenizer)."""
    tok = model.tokenizer
    if tok is None:
        return [f"<{int(i)}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def text_of(model: Any) -> Callable[[Sequence[int]], str]:
    """A function from token ids to the text they decode to (ids in <> without a tokenizer)."""
    tok = model.tokenizer
    if tok is None:
        return lambda ids: " ".join(f"<{i}>" for i in ids)
    return lambda ids: tok.decode(list(ids))


def special_ids(model: Any) -> list[int]:
    """BOS, EOS and pad ids of the model's tokenizer."""
    return special_token_ids(model.tokenizer)


def single_token(model: Any, target: str | int) -> int:
    """The id of a target given as an id or as text that is exactly one token."""
    if isinstance(target, int):
        if not 0 <= target < model.vocab_size:
            raise UserError(f"target id {target} is outside the vocabulary of {model.info.name}")
        return target
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"{model.info.name} has no tokenizer: give the target as a token id")
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = " + ".join(repr(tok.decode([i])) for i in ids) or "nothing"
        raise UserError(f"the target {target!r} is {len(ids)} tokens ({pieces}), not one; "
                        "give a single token (mind the leading space, e.g. ' Paris')")
    return int(ids[0])
