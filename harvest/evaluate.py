"""The model side of evaluation: the model's next-token loss with each SAE spliced in, with the
definitions and names of SAELens's run_evals (sae_lens/evals.py: get_recons_loss and
get_downstream_reconstruction_metrics):

  ce_loss_without_sae    mean next-token cross-entropy of the clean model
  ce_loss_with_sae       the same with the SAE's reconstruction in place of the hook's activation
  ce_loss_with_ablation  the same with the hook's activation set to zero (every position, as SAELens does)
  ce_loss_score          (ablation - with_sae) / (ablation - without_sae)
  kl_div_with_sae        mean over positions of KL(clean next-token distribution || spliced one)
  kl_div_with_ablation   the same for zero ablation
  kl_div_score           (kl_ablation - kl_sae) / kl_ablation

Special-token positions (BOS/EOS/pad) keep their clean activation and are left out of the means,
as SAELens does with its ignore tokens: a cross-entropy term counts when the position it predicts
from is kept, a KL term when its own position is. include_special_tokens replaces and counts them.

Many SAEs, one model pass: each batch of token windows runs through the clean model once, which keeps
the residual stream entering each SAE's layer; the zero ablation of a hook and every SAE at it then run
only the layers from there on (see splice.py). SAEs are any objects with encode, decode and
cfg.metadata.hook_name (this package's SAE class, or SAELens's).

Transcoders (cfg.metadata.hook_name_out names another hook) are scored the same way: the activation
at the output hook is replaced by the transcoder applied to the activation at the input hook, in the
same pass (skip term included), and the zero ablation they are scored against is of the output hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..common.errors import UserError
from ..common.progress import token_bar
from . import splice

CE_KEYS = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score")
KL_KEYS = ("kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")


@dataclass
class _Sums:
    ce: float = 0.0
    kl: float = 0.0


@dataclass
class _HookSums:
    ablation: _Sums = field(default_factory=_Sums)
    saes: dict[str, _Sums] = field(default_factory=dict)


def token_ce(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy [batch, pos - 1] from log-probabilities [batch, pos, vocab]."""
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]


def token_kl(logp_clean: torch.Tensor, logp_new: torch.Tensor) -> torch.Tensor:
    """KL(clean || new) per position [batch, pos]."""
    return F.kl_div(logp_new, logp_clean, log_target=True, reduction="none").sum(-1)


def check_saes(model: Any, saes: Mapping[str, Any]) -> dict[str, str]:
    """name -> hook it reads, after checking that the model has each hook an SAE reads (and a
    transcoder's output hook) and that their widths are the SAE's d_in (and its output width)."""
    hooks = {name: splice.sae_hook(sae) for name, sae in saes.items()}
    outs = {name: splice.sae_hook_out(sae) for name, sae in saes.items()}
    unique = sorted(set(hooks.values()) | set(outs.values()))
    for h in unique:
        try:
            model._check_names([h])
        except UserError as e:
            who = ", ".join(n for n in saes if h in (hooks[n], outs[n]))
            raise UserError(f"SAE {who}: {e}") from None
    dims = model.hook_dims(unique)
    for name, sae in saes.items():
        d = dims[hooks[name]]
        if int(sae.cfg.d_in) != d:
            raise UserError(f"SAE {name} has d_in {sae.cfg.d_in} but {hooks[name]} of {model.info.name} has width {d}")
        d_out = int(sae.W_dec.shape[-1])
        if outs[name] != hooks[name] and d_out != dims[outs[name]]:
            raise UserError(f"transcoder {name} writes width {d_out} but {outs[name]} of {model.info.name} has width "
                            f"{dims[outs[name]]}")
    return hooks


def _site(sae: Any) -> tuple[str, str]:
    """(the hook an SAE reads, the hook its output replaces): equal for an SAE, two for a transcoder."""
    return splice.sae_hook(sae), splice.sae_hook_out(sae)


def _start_layer(site: tuple[str, str]) -> int | None:
    layers = [splice.resume_layer(h) for h in site]
    return None if any(L is None for L in layers) else min(layers)


@torch.inference_mode()
def downstream_metrics(model: Any, batches: Iterable[torch.Tensor], saes: Mapping[str, Any], *,
                       special_ids: Sequence[int] = (), include_special_tokens: bool = False,
                       one_pass: bool = True, progress: bool = False,
                       total_tokens: int | None = None) -> dict[str, dict[str, float]]:
    """CE loss and KL metrics (names above) of each SAE (name -> SAE) over batches of token windows
    [batch, context] (int tensors). A transcoder replaces its output hook with its map of its input
    hook (splice.TranscoderSplice), and its zero ablation is of the output hook. one_pass=False reruns
    the whole model for every ablation and SAE, as SAELens does (the reference the shared pass is
    tested against). progress: a bar of tokens on stderr (total_tokens, when known, gives an ETA)
    naming the SAE being run."""
    check_saes(model, saes)
    by_site: dict[tuple[str, str], list[str]] = {}
    for name, sae in saes.items():
        by_site.setdefault(_site(sae), []).append(name)
    sums = {site: _HookSums(saes={n: _Sums() for n in names}) for site, names in by_site.items()}
    starts = {site: _start_layer(site) for site in by_site}
    need = list(dict.fromkeys(splice.resid_hook(L) for L in starts.values() if L is not None)) if one_pass else []
    clean_ce, n_ce, n_kl, vocab = 0.0, 0, 0, model.vocab_size
    order = [n for names in by_site.values() for n in names]
    bar = token_bar(total_tokens, "eval (model)", disable=not progress)
    try:
        for tokens in batches:
            tokens = torch.as_tensor(tokens, dtype=torch.long)
            if int(tokens.max()) >= vocab:
                raise UserError(f"the stored token id {int(tokens.max())} is outside the vocabulary of "
                                f"{model.info.name} ({vocab} tokens): the store was tokenised for another model")
            keep = None if include_special_tokens or not special_ids else splice.special_token_mask(tokens, special_ids)
            mask = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep
            mask_ce = mask[:, :-1]
            logits, cache = splice.forward(model, tokens, cache=need)
            logp = F.log_softmax(logits.float(), dim=-1)
            del logits
            clean_ce += float(token_ce(logp, tokens)[mask_ce.to(logp.device)].double().sum())
            n_ce += int(mask_ce.sum())
            n_kl += int(mask.sum())
            m_dev = mask.to(logp.device)
            for site, names in by_site.items():
                layer = starts[site]
                start = (layer, cache[splice.resid_hook(layer)]) if one_pass and layer is not None else None
                runs: list[tuple[str | None, _Sums, dict[str, splice.Replacement], torch.Tensor | None]] = [
                    (None, sums[site].ablation, {site[1]: splice.zero_ablation}, None)]
                runs += [(n, sums[site].saes[n], splice.replacement_of(saes[n]), keep) for n in names]
                for name, acc, fns, k in runs:
                    if name is not None:
                        bar.set_postfix_str(f"SAE {order.index(name) + 1}/{len(order)} {name}")
                    new, _ = splice.forward(model, tokens, fns, keep=k, start=start)
                    logp_new = F.log_softmax(new.float(), dim=-1)
                    del new
                    acc.ce += float(token_ce(logp_new, tokens)[mask_ce.to(logp.device)].double().sum())
                    acc.kl += float(token_kl(logp, logp_new)[m_dev].double().sum())
            del cache
            bar.update(tokens.numel())
    finally:
        bar.close()
    if n_ce == 0:
        raise UserError("no token positions to score once special tokens are left out; "
                        "give more tokens or --include-special-tokens")
    out: dict[str, dict[str, float]] = {}
    without = clean_ce / n_ce
    for site, s in sums.items():
        abl_ce, abl_kl = s.ablation.ce / n_ce, s.ablation.kl / n_kl
        for name, acc in s.saes.items():
            ce, kl = acc.ce / n_ce, acc.kl / n_kl
            out[name] = {
                "ce_loss_without_sae": without, "ce_loss_with_sae": ce, "ce_loss_with_ablation": abl_ce,
                "ce_loss_score": _ratio(abl_ce - ce, abl_ce - without),
                "kl_div_with_sae": kl, "kl_div_with_ablation": abl_kl,
                "kl_div_score": _ratio(abl_kl - kl, abl_kl),
                "ce_tokens": n_ce, "kl_tokens": n_kl,
            }
    return out


def _ratio(a: float, b: float) -> float | None:
    """a / b; None (undefined, not a failure) when b is 0."""
    return a / b if b != 0 else None
