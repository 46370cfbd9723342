"""Run a model with functions spliced in at its hooks: the activation at a hook is replaced by
f(activation), for example an SAE's reconstruction. Shared by evaluation and the analysis tools.

    logits = splice.forward(model, tokens, {"blocks.4.hook_resid_post": sae})          # any x -> x
    logits, latents = splice.run_with_saes(model, tokens, [sae])                         # SAEs by their hooks
    logits = splice.forward(model, tokens, splice.replacement_of(transcoder))          # in hook -> out hook

A transcoder (metadata.hook_name_out differs from hook_name) is spliced by replacing the activation
at its output hook with the transcoder applied to the activation at its input hook, in the same pass
(a skip transcoder's skip term included): TranscoderSplice.

Activations are handed to a replacement as [batch, pos, d] (per-head hooks such as attn.hook_z are
flattened to heads * d_head and put back), and a boolean `keep` [batch, pos] mask leaves the masked-off
positions (special tokens, by default) at their clean value.

Many replacements of one model pass: `clean_pass` runs the model once and keeps the residual stream
entering each layer that a later spliced pass needs; `forward(..., start=(layer, resid))` then runs
only the layers from `layer` onward. TransformerLens 3 (HookedTransformer) skips the earlier blocks
itself. TransformerLens 4's TransformerBridge accepts start_at_layer but still runs the blocks below it
(their output is discarded), so for a bridge over a Hugging Face model the earlier blocks are cut out
of the model's layer list for the duration of the call; where that list cannot be found the bridge
runs them (same result, no saving)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..common.errors import UserError

Replacement = Callable[[torch.Tensor], torch.Tensor]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str) -> int | None:
    """The block a hook belongs to, or None (embedding hooks, ln_final, unembed)."""
    m = _BLOCK.match(hook)
    return int(m.group(1)) if m else None


def resume_layer(hook: str) -> int | None:
    """The layer a pass can start at and still reach `hook` (None: it needs the whole model)."""
    return hook_layer(hook)


def resid_hook(layer: int) -> str:
    """The hook holding the residual stream entering `layer` (what a pass started there takes)."""
    return f"blocks.{layer}.hook_resid_pre"


def special_token_mask(tokens: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """True where a token is NOT special: the positions a splice replaces and the metrics count."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for i in special_ids:
        keep &= tokens != int(i)
    return keep


def _as_hook_fn(fn: Replacement | None, keep: torch.Tensor | None,
                record: dict[str, torch.Tensor] | None, name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def hook_fn(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], shape[1], -1)
        if record is not None:
            record[name] = flat
        if fn is None:
            return x
        new = fn(flat).to(flat.dtype)
        if keep is not None:
            new = torch.where(keep.to(new.device)[..., None], new, flat)
        return new.reshape(shape)

    return hook_fn


@contextlib.contextmanager
def _blocks_from(tl: Any, layer: int) -> Iterator[None]:
    """For a TransformerBridge over a Hugging Face model: drop blocks below `layer` from the model's
    layer list while a start_at_layer pass runs (the bridge would otherwise run and discard them)."""
    holder, attr = _layer_list(tl)
    if holder is None or layer == 0:
        yield
        return
    full = getattr(holder, attr)
    setattr(holder, attr, torch.nn.ModuleList(list(full)[layer:]))
    try:
        yield
    finally:
        setattr(holder, attr, full)


def _layer_list(tl: Any) -> tuple[Any, str | None]:
    """(module, attribute) of the ModuleList whose entries are the bridge's blocks, or (None, None)."""
    cached = getattr(tl, "_actcache_layer_list", None)
    if cached is not None:
        return cached
    found: tuple[Any, str | None] = (None, None)
    under = getattr(getattr(tl, "_driver", None), "underlying_model", None)
    blocks = getattr(tl, "blocks", None)
    if under is not None and blocks is not None and len(blocks):
        for name, mod in under.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) == len(blocks) and mod[0] is blocks[0]:
                parent_name, _, attr = name.rpartition(".")
                found = (under.get_submodule(parent_name) if parent_name else under, attr)
                break
    try:
        object.__setattr__(tl, "_actcache_layer_list", found)
    except AttributeError:
        pass
    return found


def _is_bridge(tl: Any) -> bool:
    return hasattr(tl, "_driver")


@torch.inference_mode()
def forward(model: Any, tokens: torch.Tensor, splices: Mapping[str, Replacement] | None = None, *,
            keep: torch.Tensor | None = None, cache: Sequence[str] = (),
            start: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [batch, pos, vocab] of the model with each hook's activation replaced by splices[hook](x).

    model: a harvest.models.HookedModel (or a bare TransformerLens model). keep: [batch, pos] bool, the
    positions to replace (None: all). cache: hooks whose incoming (pre-replacement) activation to return,
    flattened to [batch, pos, d]. start: (layer, residual entering that layer) to run only the layers from
    there on; tokens still give the batch's shape. Returns (logits, cached activations)."""
    tl = getattr(model, "tl", model)
    device = next(tl.parameters()).device
    splices = dict(splices or {})
    got: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys([*splices, *cache]))
    fwd = [(h, _as_hook_fn(splices.get(h), keep, got if h in cache else None, h)) for h in names]
    if start is None:
        logits = tl.run_with_hooks(tokens.to(device), fwd_hooks=fwd, return_type="logits")
    else:
        layer, resid = start
        for h in names:
            at = hook_layer(h)
            if at is None or at < layer:
                raise ValueError(f"hook {h} comes before layer {layer}, where this pass starts")
        ctx = _blocks_from(tl, layer) if _is_bridge(tl) else contextlib.nullcontext()
        with ctx:
            logits = tl.run_with_hooks(resid.to(device), fwd_hooks=fwd, return_type="logits", start_at_layer=layer)
    return logits, got


@torch.inference_mode()
def forward_step(model: Any, tokens: torch.Tensor, splices: Mapping[str, Replacement] | None = None,
                 past: Any = None) -> tuple[torch.Tensor, Any]:
    """One step of incremental decoding: logits [batch, new, vocab] of `tokens` (the new positions only,
    when `past` holds the keys and values of the ones before), with the splices applied to the new
    positions, and the key/value cache after the step. The cache is the Hugging Face one that a
    TransformerLens 4 bridge hands back; where the model gives none (TransformerLens 3, the bridge's
    native random models) the returned cache is None and the caller runs whole sequences instead."""
    tl = getattr(model, "tl", model)
    if not _is_bridge(tl):
        if past is not None:
            raise ValueError("this model has no key/value cache: pass the whole sequence with past=None")
        return forward(model, tokens, splices)[0], None
    device = next(tl.parameters()).device
    fwd = [(h, _as_hook_fn(fn, None, None, h)) for h, fn in (splices or {}).items()]
    kw = {"past_key_values": past} if past is not None else {}
    logits, cache = tl.run_with_hooks(tokens.to(device), fwd_hooks=fwd, return_type="logits_and_cache", **kw)
    return logits, cache


@torch.inference_mode()
def clean_pass(model: Any, tokens: torch.Tensor, hooks: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One unmodified pass: logits, plus the activation at each hook in `hooks` and the residual entering
    every layer a spliced pass at those hooks can start from (keys: hook names, see resid_hook)."""
    need = list(dict.fromkeys([*hooks, *(resid_hook(L) for h in hooks if (L := resume_layer(h)) is not None)]))
    return forward(model, tokens, cache=need)


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@dataclass
class SAESplice:
    """An SAE as a replacement: x -> decode(encode(x)), keeping the latents of the last call if asked."""

    sae: Any
    record_latents: bool = False
    latents: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sae.W_dec
        f = self.sae.encode(x.to(w.device, w.dtype))
        if self.record_latents:
            self.latents = f
        return self.sae.decode(f).to(x.device)


@dataclass
class TranscoderSplice:
    """A transcoder as a pair of hook functions: at its input hook the activation is kept (unchanged);
    at its output hook the activation is replaced by the transcoder applied to the kept input,
    skip connection included (the SAE's forward). Use as `splices()`, a dict of two hooks."""

    sae: Any
    hook_in: str
    hook_out: str
    _x: torch.Tensor | None = None

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return x

    def _replace(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is None:
            raise ValueError(f"{self.hook_out} ran before {self.hook_in}: a transcoder's input must come first")
        w = self.sae.W_dec
        out = self.sae(self._x.to(w.device, w.dtype))
        self._x = None
        return out.to(x.device)

    def splices(self) -> dict[str, Replacement]:
        return {self.hook_in: self._keep, self.hook_out: self._replace}


def sae_hook(sae: Any) -> str:
    """The hook an SAE (or a transcoder) reads: metadata.hook_name."""
    hook = getattr(getattr(sae.cfg, "metadata", None) or {}, "get", lambda k: None)("hook_name")
    if not hook:
        raise UserError("the SAE's cfg.json names no hook (metadata.hook_name); it cannot be spliced in")
    return hook


def sae_hook_out(sae: Any) -> str:
    """The hook an SAE's output replaces: its own hook, or a transcoder's metadata.hook_name_out."""
    return (getattr(getattr(sae.cfg, "metadata", None) or {}, "get", lambda k: None)("hook_name_out")
            or sae_hook(sae))


def is_transcoder(sae: Any) -> bool:
    return sae_hook_out(sae) != sae_hook(sae)


def replacement_of(sae: Any) -> dict[str, Replacement]:
    """The splices that put an SAE in the model: {hook: SAE} for an SAE, the input and output hooks
    of a transcoder (TranscoderSplice)."""
    if is_transcoder(sae):
        return TranscoderSplice(sae, sae_hook(sae), sae_hook_out(sae)).splices()
    return {sae_hook(sae): SAESplice(sae)}


def run_with_saes(model: Any, tokens: torch.Tensor, saes: Sequence[Any], *, special_ids: Sequence[int] = (),
                  include_special_tokens: bool = False, return_latents: bool = True
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits with every SAE spliced in at its own hook (metadata.hook_name) in one pass, and each
    hook's latent activations [batch, pos, d_sae]. Special-token positions keep their clean activation
    unless include_special_tokens."""
    by_hook: dict[str, SAESplice] = {}
    for sae in saes:
        h = sae_hook(sae)
        if h in by_hook:
            raise UserError(f"two SAEs at the hook {h}: splice them in one at a time")
        by_hook[h] = SAESplice(sae, record_latents=return_latents)
    keep = None if include_special_tokens or not special_ids else special_token_mask(tokens, special_ids)
    logits, _ = forward(model, tokens, by_hook, keep=keep)
    return logits, {h: s.latents for h, s in by_hook.items() if s.latents is not None}
