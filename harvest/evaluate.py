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
cfg.metadata.hook_name (this package's SAE class, or SAELens's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..common.errors import UserError
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
    """name -> hook, after checking that the model has each hook and that its width is the SAE's d_in."""
    hooks = {name: splice.sae_hook(sae) for name, sae in saes.items()}
    unique = sorted(set(hooks.values()))
    for h in unique:
        try:
            model._check_names([h])
        except UserError as e:
            who = ", ".join(n for n, hh in hooks.items() if hh == h)
            raise UserError(f"SAE {who}: {e}") from None
    dims = model.hook_dims(unique)
    for name, sae in saes.items():
        d = dims[hooks[name]]
        if int(sae.cfg.d_in) != d:
            raise UserError(f"SAE {name} has d_in {sae.cfg.d_in} but {hooks[name]} of {model.info.name} has width {d}")
    return hooks


@torch.inference_mode()
def downstream_metrics(model: Any, batches: Iterable[torch.Tensor], saes: Mapping[str, Any], *,
                       special_ids: Sequence[int] = (), include_special_tokens: bool = False,
                       one_pass: bool = True) -> dict[str, dict[str, float]]:
    """CE loss and KL metrics (names above) of each SAE (name -> SAE) over batches of token windows
    [batch, context] (int tensors). one_pass=False reruns the whole model for every ablation and SAE,
    as SAELens does (the reference the shared pass is tested against)."""
    hooks = check_saes(model, saes)
    by_hook: dict[str, list[str]] = {}
    for name, h in hooks.items():
        by_hook.setdefault(h, []).append(name)
    sums = {h: _HookSums(saes={n: _Sums() for n in names}) for h, names in by_hook.items()}
    clean_ce, n_ce, n_kl, vocab = 0.0, 0, 0, model.vocab_size
    for tokens in batches:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if int(tokens.max()) >= vocab:
            raise UserError(f"the stored token id {int(tokens.max())} is outside the vocabulary of {model.info.name} "
                            f"({vocab} tokens): the store was tokenised for another model")
        keep = None if include_special_tokens or not special_ids else splice.special_token_mask(tokens, special_ids)
        mask = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep
        mask_ce = mask[:, :-1]
        logits, cache = splice.clean_pass(model, tokens, list(by_hook) if one_pass else [])
        logp = F.log_softmax(logits.float(), dim=-1)
        del logits
        clean_ce += float(token_ce(logp, tokens)[mask_ce.to(logp.device)].double().sum())
        n_ce += int(mask_ce.sum())
        n_kl += int(mask.sum())
        m_dev = mask.to(logp.device)
        for h, names in by_hook.items():
            layer = splice.resume_layer(h)
            start = (layer, cache[splice.resid_hook(layer)]) if one_pass and layer is not None else None
            runs: list[tuple[_Sums, splice.Replacement, torch.Tensor | None]] = [
                (sums[h].ablation, splice.zero_ablation, None)]
            runs += [(sums[h].saes[n], splice.SAESplice(saes[n]), keep) for n in names]
            for acc, fn, k in runs:
                new, _ = splice.forward(model, tokens, {h: fn}, keep=k, start=start)
                logp_new = F.log_softmax(new.float(), dim=-1)
                del new
                acc.ce += float(token_ce(logp_new, tokens)[mask_ce.to(logp.device)].double().sum())
                acc.kl += float(token_kl(logp, logp_new)[m_dev].double().sum())
        del cache
    if n_ce == 0:
        raise UserError("no token positions to score once special tokens are left out; "
                        "give more tokens or --include-special-tokens")
    out: dict[str, dict[str, float]] = {}
    without = clean_ce / n_ce
    for h, s in sums.items():
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
