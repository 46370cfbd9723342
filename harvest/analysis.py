"""Look inside an SAE with its model, one question at a time: encode a text, steer generation,
attribute a logit, list hooks.

    from actcache.harvest.analysis import analyse, steer, attribute, list_hooks
    a = analyse("runs/s1/topk-k32", "The weather today is sunny")     # top latents per token, reconstruction error
    s = steer("runs/s1/topk-k32", "The weather today", feature=123, strength=8)   # s.steered_text, s.plain_text
    r = attribute("runs/s1/topk-k32", "The capital of France is", " Paris")       # r.top, r.remainder
    hooks = list_hooks("smollm2-135m-instruct-q4")                     # names, shapes, which fire

Each takes an SAE folder (ours or any SAELens v6 folder) or a loaded SAE, and loads the model the SAE
names (cfg.json metadata.model_spec, else model_name) unless given `model=` (a spec or a loaded
HookedModel). Each is a one-shot harvest.session.Session, where the computations and their
definitions live: to ask several questions, open a Session and keep the model loaded. A text is
tokenized with BOS in front when the SAE's metadata says prepend_bos (the tokenizer does not add it by
itself); a list of token ids is used as given."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..common.errors import UserError, first_line
from .generation import generate, steering_hook
from .prompts import Prompt, single_token, token_strings, tokenize
from .session import Analysis, Attribution, Session, Steering, model_spec_of

__all__ = ["Analysis", "Attribution", "HookInfo", "PROBE", "Prompt", "Session", "Steering", "analyse", "attribute",
           "generate", "list_hooks", "model_spec_of", "single_token", "steer", "steering_hook", "token_strings",
           "tokenize"]


def _session(sae_or_dir: Any, model: Any, device: str | None, tokenizer: str | None) -> Session:
    return Session(sae_or_dir, model=model, device=device, tokenizer=tokenizer)


def analyse(sae_or_dir: Any, prompt: Prompt, model: Any = None, top: int = 5, *, device: str | None = None,
            include_special_tokens: bool = False, tokenizer: str | None = None) -> Analysis:
    """Session.analyse for one SAE: the top latents of every token and the reconstruction error."""
    return _session(sae_or_dir, model, device, tokenizer).analyse(prompt, top,
                                                                   include_special_tokens=include_special_tokens)


def steer(sae_or_dir: Any, prompt: Prompt, feature: int, strength: float = 8.0, model: Any = None, *,
          max_new_tokens: int = 20, positions: str = "all", temperature: float = 0.0, seed: int | None = None,
          device: str | None = None, tokenizer: str | None = None) -> Steering:
    """Session.steer for one SAE: the steered continuation beside the plain one."""
    return _session(sae_or_dir, model, device, tokenizer).steer(prompt, feature, strength, max_new_tokens,
                                                                 positions=positions, temperature=temperature,
                                                                 seed=seed)


def attribute(sae_or_dir: Any, prompt: Prompt, target: str | int, model: Any = None, *, position: int = -1,
              top: int = 10, device: str | None = None, tokenizer: str | None = None) -> Attribution:
    """Session.attribute for one SAE: each latent's direct contribution to the target's logit."""
    return _session(sae_or_dir, model, device, tokenizer).attribute(prompt, target, position=position, top=top)


# ------------------------------------------------------------------------------------------ hooks
@dataclass
class HookInfo:
    name: str
    fires: bool
    shape: list[int] | None   # the activation's shape on a probe of 1 x PROBE tokens
    width: int | None         # per token, heads flattened ([batch, pos, ...] hooks), as harvest stores it


PROBE = 5


@torch.inference_mode()
def list_hooks(model: Any, device: str | None = None) -> list[HookInfo]:
    """Every hook name the model accepts (aliases included), with the shape it has on a probe pass of
    PROBE tokens and the per-token width; hooks that TransformerLens leaves switched off do not fire."""
    from .models import load_model

    hm = load_model(model, device=device) if isinstance(model, str) else model
    names = sorted(hm.tl.hook_dict)
    got: dict[str, torch.Size] = {}

    def capture(x: torch.Tensor, hook: Any = None, name: str = "") -> None:
        got[name] = x.shape

    n = min(PROBE, int(hm.info.n_ctx))
    probe = torch.zeros((1, n), dtype=torch.long, device=hm.device)
    live = list(names)
    while True:  # TransformerLens refuses hooks it has switched off: leave each out, they do not fire
        try:
            hm.tl.run_with_hooks(probe, fwd_hooks=[(h, functools.partial(capture, name=h)) for h in live])
            break
        except (ValueError, RuntimeError, AssertionError) as e:
            m = re.search(r"[Cc]annot add hook (\S+)\s", str(e))
            if m is None or m.group(1) not in live:
                raise UserError(f"a probe pass through {hm.info.name} failed: {first_line(e)}") from None
            live.remove(m.group(1))
            got.clear()
    out = []
    for h in names:
        shape = got.get(h)
        width = None
        if shape is not None and len(shape) >= 2 and shape[0] == 1 and shape[1] == n:
            width = 1
            for d in shape[2:]:
                width *= int(d)
        out.append(HookInfo(h, shape is not None, list(shape) if shape is not None else None, width))
    return out
