"""Look inside an SAE with its model: encode a text, steer generation, attribute a logit, list hooks.

    from actcache.harvest.analysis import analyse, steer, attribute, list_hooks
    a = analyse("runs/s1/topk-k32", "The weather today is sunny")     # top latents per token, reconstruction error
    s = steer("runs/s1/topk-k32", "The weather today", feature=123, strength=8)   # s.steered_text, s.plain_text
    r = attribute("runs/s1/topk-k32", "The capital of France is", " Paris")       # r.top, r.remainder
    hooks = list_hooks("smollm2-135m-instruct-q4")                     # names, shapes, which fire

Each takes an SAE folder (ours or any SAELens v6 folder) or a loaded SAE, and loads the model the SAE
names (cfg.json metadata.model_spec, else model_name) unless given `model=` (a spec or a loaded
HookedModel). A text is tokenized with BOS in front when the SAE's metadata says prepend_bos (the
tokenizer does not add it by itself); a list of token ids is used as given.

Reconstruction metrics (analyse: mse, fvu, cossim, l0) are common/metrics.py's (SAELens's run_evals),
over the prompt's tokens, special tokens (BOS/EOS/pad) left out unless include_special_tokens.

Attribution (attribute) is exact for the model's actual forward pass. The logit of the target token t
at position p is unembed(norm(x_final)), where x_final is the residual stream entering the final
normalisation. With the normalisation's scale s (the RMS, or the standard deviation for LayerNorm, of
x_final at p on the clean pass) frozen, that logit is linear in x_final:

  logit_t = sum_i f_i * (W_dec[i] . u) + (b_dec . u) + (error . u) + (rest . u) + bias
  u       = w * W_U[:, t] / s      (w: the norm's weight; for LayerNorm each vector is centred first)
  error   = x_hook - x_hat         (what the SAE does not reconstruct)
  rest    = x_final - x_hook       (everything the model adds after the hook: later layers)
  bias    = b_norm . W_U[:, t] + b_U[t]

The per-latent contributions f_i * (W_dec[i] . u) plus remainder = b_dec + error + rest + bias terms add
up to the model's logit exactly (up to float rounding). The model runs clean (no SAE spliced in): the
SAE only splits the hook's activation into features. Hooks whose activation is not in the residual
stream's basis (per-head hooks, MLP hidden units) have no direct path and are refused."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..common.errors import UserError, first_line
from ..common.manifest import special_token_ids
from ..common.metrics import Metrics, token_errors
from . import splice

Prompt = str | Sequence[int]


# ------------------------------------------------------------------------------------------ loading
def load_sae(sae_or_dir: Any, device: str = "cpu") -> Any:
    """An SAE folder (ours or SAELens v6) -> the inference SAE; a loaded SAE is returned as it is."""
    if isinstance(sae_or_dir, (str, Path)):
        from ..common.sae import SAE

        if not Path(sae_or_dir).exists():
            raise UserError(f"{sae_or_dir} does not exist: give an SAE folder (cfg.json and sae_weights.safetensors)")
        return SAE.load_from_disk(sae_or_dir, device=device)
    return sae_or_dir


def model_spec_of(sae: Any) -> str | None:
    """The model an SAE names: metadata.model_spec (what actcache loads), else metadata.model_name."""
    meta = getattr(sae.cfg, "metadata", None) or {}
    return meta.get("model_spec") or meta.get("model_name")


def load_for(sae_or_dir: Any, model: Any = None, device: str | None = None,
             tokenizer: str | None = None) -> tuple[Any, Any, str]:
    """(SAE, HookedModel, hook) with the SAE's hook and width checked against the model."""
    from .evaluate import check_saes
    from .models import load_model

    sae = load_sae(sae_or_dir)
    hook = splice.sae_hook(sae)
    if model is None or isinstance(model, str):
        spec = model or model_spec_of(sae)
        if not spec:
            raise UserError("the SAE's cfg.json names no model (metadata.model_spec or model_name): pass --model")
        model = load_model(spec, device=device, tokenizer=tokenizer)
    check_saes(model, {_sae_name(sae_or_dir): sae})
    w = sae.W_dec
    if w.device != torch.device(model.device):
        sae.to(model.device)
    return sae, model, hook


def _sae_name(sae_or_dir: Any) -> str:
    return Path(sae_or_dir).name if isinstance(sae_or_dir, (str, Path)) else "sae"


def _prepend_bos(sae: Any) -> bool:
    meta = getattr(sae.cfg, "metadata", None) or {}
    v = meta.get("prepend_bos")
    return True if v is None else bool(v)


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


def _special_ids(model: Any) -> list[int]:
    return special_token_ids(model.tokenizer)


def _check_feature(sae: Any, feature: int) -> int:
    d_sae = int(sae.cfg.d_sae)
    if not 0 <= int(feature) < d_sae:
        raise UserError(f"latent {feature} is out of range: the SAE has {d_sae} latents (0 .. {d_sae - 1})")
    return int(feature)


def _activation(model: Any, tokens: torch.Tensor, hooks: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits, got = splice.forward(model, tokens, cache=list(hooks))
    return logits, got


# ------------------------------------------------------------------------------------------ analyse
@dataclass
class TokenLatents:
    position: int
    token_id: int
    token: str
    special: bool
    latents: list[int]
    values: list[float]
    l0: int
    mse: float
    cossim: float


@dataclass
class Analysis:
    """What analyse() finds: per token its top latents, and the reconstruction error of the prompt."""

    model: str
    hook: str
    tokens: list[TokenLatents]
    mse: float
    fvu: float | None  # None: undefined (the scored tokens' activations have no variance, e.g. one token)
    cossim: float
    l0: float
    n_tokens_scored: int
    latents: torch.Tensor = field(repr=False)        # [pos, d_sae]
    activations: torch.Tensor = field(repr=False)    # [pos, d_in], the hook's activation
    reconstruction: torch.Tensor = field(repr=False)  # [pos, d_in]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a non-finite metric is null and named in "non_finite"."""
        from ..common.finite import finite_json

        d = {k: v for k, v in asdict(self).items() if k not in ("latents", "activations", "reconstruction")}
        d, d["non_finite"] = finite_json(d)
        return d

    def table(self) -> str:
        fvu = "n/a" if self.fvu is None else f"{self.fvu:.4g}"
        lines = [f"{self.model} {self.hook}: mse {self.mse:.4g}  fvu {fvu}  cossim {self.cossim:.4f}  "
                 f"l0 {self.l0:.1f}  ({self.n_tokens_scored} tokens scored)"]
        w = max((len(repr(t.token)) for t in self.tokens), default=5)
        for t in self.tokens:
            top = "  ".join(f"{i}:{v:.3g}" for i, v in zip(t.latents, t.values))
            mark = "*" if t.special else " "
            lines.append(f"{t.position:>4}{mark}{repr(t.token):<{w}}  l0 {t.l0:<4} {top}")
        if any(t.special for t in self.tokens):
            lines.append("(* special token: left out of the error metrics)")
        return "\n".join(lines)


@torch.inference_mode()
def analyse(sae_or_dir: Any, prompt: Prompt, model: Any = None, top: int = 5, *, device: str | None = None,
            include_special_tokens: bool = False, tokenizer: str | None = None) -> Analysis:
    """Encode the prompt's activations at the SAE's hook: the top `top` latents of every token, and how
    well the SAE reconstructs the activations (mse, fvu, cossim; definitions in common/metrics.py)."""
    sae, hm, hook = load_for(sae_or_dir, model, device, tokenizer)
    tokens = tokenize(hm, prompt, _prepend_bos(sae))
    _, got = _activation(hm, tokens, [hook])
    x = got[hook][0].to(sae.W_dec.device, sae.W_dec.dtype)
    f = sae.encode(x)
    xh = sae.decode(f)
    xf, xhf = x.double(), xh.double()
    sse_tok, cos_tok = token_errors(xf, xhf)
    ids = tokens[0].tolist()
    special = set(_special_ids(hm))
    keep = torch.tensor([include_special_tokens or i not in special for i in ids])
    if not keep.any():
        raise UserError("the prompt has only special tokens; give some text")
    k = max(0, min(int(top), int(sae.cfg.d_sae)))
    vals, idx = f.float().topk(k, dim=-1) if k else (f[:, :0], f[:, :0].long())
    strings = token_strings(hm, ids)
    rows = []
    for p, i in enumerate(ids):
        active = [(int(j), float(v)) for j, v in zip(idx[p], vals[p]) if v != 0]
        rows.append(TokenLatents(p, int(i), strings[p], i in special, [j for j, _ in active], [v for _, v in active],
                                 int((f[p] != 0).sum()), float(sse_tok[p]), float(cos_tok[p])))
    m = Metrics(int(sae.cfg.d_sae))
    m.update(xf[keep], xhf[keep], f[keep])
    r = m.result()
    return Analysis(model=hm.info.name, hook=hook, tokens=rows, mse=r["mse"], fvu=r["fvu"], cossim=r["cossim"],
                    l0=r["l0"], n_tokens_scored=m.n,
                    latents=f.detach().cpu(), activations=x.detach().cpu(), reconstruction=xh.detach().cpu())


# ------------------------------------------------------------------------------------------ steer
@dataclass
class Steering:
    """steer()'s result: the prompt's tokens and both continuations (new tokens only)."""

    model: str
    hook: str
    feature: int
    strength: float
    positions: str
    prompt_tokens: list[int]
    steered_tokens: list[int]
    plain_tokens: list[int]
    steered_text: str
    plain_text: str
    temperature: float
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def side_by_side(self, width: int = 60) -> str:
        import textwrap

        left = textwrap.wrap(self.steered_text.replace("\n", "\\n"), width) or [""]
        right = textwrap.wrap(self.plain_text.replace("\n", "\\n"), width) or [""]
        head_l = f"steered (latent {self.feature} x {self.strength:g}, {self.positions} positions)"
        lines = [f"{head_l:<{width}} | plain", f"{'-' * width}-+-{'-' * width}"]
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{a:<{width}} | {b}")
        return "\n".join(lines)


def generate(model: Any, tokens: torch.Tensor, max_new_tokens: int, *, splices: dict[str, Any] | None = None,
             temperature: float = 0.0, seed: int | None = None, stop_at_eos: bool = True) -> list[list[int]]:
    """New token ids after each row of `tokens` [rows, pos]: each step runs the whole sequences through
    the model (with the splices) and takes each row's next token greedily (temperature 0) or sampled,
    every row with its own generator seeded with `seed` (rows that agree draw the same)."""
    rows = tokens.shape[0]
    gens = [torch.Generator().manual_seed(int(seed if seed is not None else 0)) for _ in range(rows)]
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    seq = tokens.clone()
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(int(max_new_tokens)):
        logits, _ = splice.forward(model, seq, splices or {})
        last = logits[:, -1].float().cpu()
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


def steering_hook(direction: torch.Tensor, strength: float, n_prompt: int | None = None, rows: int | None = None):
    """x -> x + strength * direction at every position (n_prompt: only the first n_prompt positions;
    rows: only the first `rows` sequences of the batch)."""
    def add(x: torch.Tensor) -> torch.Tensor:
        d = (float(strength) * direction).to(x.device, x.dtype)
        out = x.clone()
        out[slice(rows), slice(n_prompt)] += d
        return out

    return add


def steer(sae_or_dir: Any, prompt: Prompt, feature: int, strength: float = 8.0, model: Any = None, *,
          max_new_tokens: int = 20, positions: str = "all", temperature: float = 0.0, seed: int | None = None,
          device: str | None = None, tokenizer: str | None = None) -> Steering:
    """Generate after the prompt with strength * W_dec[feature] added to the hook's activation (at every
    position, or the prompt's only: positions="prompt"), and the plain continuation beside it. Greedy at
    temperature 0, else sampled with a generator seeded with `seed` (the same draws for both). The two
    continuations run as one batch of two sequences, the direction added to the first only."""
    if positions not in ("all", "prompt"):
        raise UserError(f"positions {positions!r}: choose all or prompt")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise UserError(f"--strength {strength!r}: give a finite number (a multiple of the decoder row)")
    if not math.isfinite(temperature):
        raise UserError(f"--temperature {temperature!r}: give a finite number, 0 for greedy")
    if temperature < 0:
        raise UserError("temperature must be 0 (greedy) or more")
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    sae, hm, hook = load_for(sae_or_dir, model, device, tokenizer)
    feature = _check_feature(sae, feature)
    tokens = tokenize(hm, prompt, _prepend_bos(sae), room=max_new_tokens)
    direction = sae.W_dec[feature].detach()
    fn = steering_hook(direction, strength, tokens.shape[1] if positions == "prompt" else None, rows=1)
    steered, plain = generate(hm, tokens.repeat(2, 1), max_new_tokens, splices={hook: fn},
                              temperature=temperature, seed=seed)
    text = _decoder(hm)
    return Steering(model=hm.info.name, hook=hook, feature=feature, strength=float(strength), positions=positions,
                    prompt_tokens=tokens[0].tolist(), steered_tokens=steered, plain_tokens=plain,
                    steered_text=text(steered), plain_text=text(plain), temperature=float(temperature), seed=seed)


def _decoder(model: Any):
    tok = model.tokenizer
    if tok is None:
        return lambda ids: " ".join(f"<{i}>" for i in ids)
    return lambda ids: tok.decode(ids)


# ------------------------------------------------------------------------------------------ attribute
@dataclass
class Attribution:
    """attribute()'s result: logit = sum(contributions) + remainder (see the module docstring)."""

    model: str
    hook: str
    position: int
    token: str
    target: str
    target_id: int
    logit: float                 # the model's logit of the target at the position (clean pass)
    scale: float                 # the final normalisation's scale s at the position
    top: list[dict[str, Any]]    # [{"latent", "activation", "contribution"}], largest |contribution| first
    features_total: float        # sum of every latent's contribution
    remainder: float             # logit - features_total
    remainder_terms: dict[str, float]  # b_dec, error, rest (later layers), bias; they add up to remainder
    contributions: torch.Tensor = field(repr=False)  # [d_sae]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "contributions"}

    def table(self) -> str:
        lines = [f"logit of {self.target!r} (id {self.target_id}) after position {self.position} ({self.token!r}): "
                 f"{self.logit:.4f}",
                 f"  latents {self.features_total:+.4f}   remainder {self.remainder:+.4f} "
                 f"(" + ", ".join(f"{k} {v:+.4f}" for k, v in self.remainder_terms.items()) + ")",
                 f"{'latent':>8} {'activation':>11} {'contribution':>13}"]
        for r in self.top:
            lines.append(f"{r['latent']:>8} {r['activation']:>11.4g} {r['contribution']:>+13.4f}")
        return "\n".join(lines)


# hooks whose activation lives in the residual stream's basis (d_model wide, summed into it)
_RESIDUAL_HOOK = re.compile(r"^(blocks\.\d+\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_out|hook_attn_out"
                            r"|hook_in|hook_out)|hook_embed|hook_pos_embed)$")


def _final_norm(tl: Any) -> tuple[str | None, torch.Tensor | None, torch.Tensor | None]:
    """(kind "LN"/"RMS"/None, weight, bias) of the model's final normalisation."""
    kind = getattr(tl.cfg, "normalization_type", None)
    ln = getattr(tl, "ln_final", None)
    if kind is None or ln is None:
        return None, None, None
    kind = "LN" if str(kind).startswith("LN") else "RMS"
    params = dict(ln.named_parameters())
    w = next((v for k, v in params.items() if k.split(".")[-1] in ("w", "weight")), None)
    b = next((v for k, v in params.items() if k.split(".")[-1] in ("b", "bias")), None)
    return kind, w, b


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


@torch.inference_mode()
def attribute(sae_or_dir: Any, prompt: Prompt, target: str | int, model: Any = None, *, position: int = -1,
              top: int = 10, device: str | None = None, tokenizer: str | None = None) -> Attribution:
    """Each latent's direct contribution, at `position`, to the logit of `target` for the next token:
    activation * (W_dec[i] . u), u the unembedding direction of the target through the final
    normalisation with its scale frozen at the clean pass's value; the remainder holds the rest."""
    sae, hm, hook = load_for(sae_or_dir, model, device, tokenizer)
    if not _RESIDUAL_HOOK.match(hook) or int(sae.cfg.d_in) != int(hm.info.d_model):
        raise UserError(f"attribution needs an SAE on the residual stream (hook_resid_*, hook_mlp_out, hook_attn_out); "
                        f"{hook} has no direct path to the logits")
    t_id = single_token(hm, target)
    tokens = tokenize(hm, prompt, _prepend_bos(sae))
    n = tokens.shape[1]
    if not -n <= position < n:
        raise UserError(f"position {position} is outside the prompt's {n} tokens")
    p = position % n
    tl = hm.tl
    kind, w, b = _final_norm(tl)
    if kind is None:
        raise UserError(f"{hm.info.name} has no final normalisation that attribution understands")
    # the residual stream entering the final norm: TransformerLens 4 names it, 3 has the last block's output
    final = "ln_final.hook_in" if "ln_final.hook_in" in tl.hook_dict else f"blocks.{hm.info.n_layers - 1}.hook_resid_post"
    scale_hook = "ln_final.hook_scale"
    if scale_hook not in tl.hook_dict or final not in tl.hook_dict:
        raise UserError(f"{hm.info.name} does not expose {final} and {scale_hook}; cannot attribute")
    logits, got = splice.forward(hm, tokens, cache=list(dict.fromkeys([hook, final, scale_hook])))
    dt = torch.float64
    x_final = got[final][0, p].to(dt)
    s = float(got[scale_hook][0, p].reshape(-1)[0])
    W_U = tl.W_U.detach()
    u = W_U[:, t_id].to(dt) * (w.detach().to(dt) if w is not None else 1.0)
    b_U = getattr(tl, "b_U", None)
    bias = float(b.detach().to(dt) @ W_U[:, t_id].to(dt)) if (b is not None and kind == "LN") else 0.0
    bias += float(b_U[t_id]) if b_U is not None else 0.0

    def proj(v: torch.Tensor) -> torch.Tensor:  # v [..., d] -> its frozen-scale share of the logit
        v = v.to(dt)
        if kind == "LN":
            v = v - v.mean(-1, keepdim=True)
        return (v / s) @ u

    logit = float(logits[0, p, t_id])
    # the frozen-scale map must give the model's own logit back, else this model is not one it understands
    mine = float(proj(x_final)) + bias
    if abs(mine - logit) > 1e-3 * max(1.0, abs(logit)):
        raise UserError(f"the final normalisation or unembedding of {hm.info.name} is not one attribution "
                        f"understands (recomputed logit {mine:.4f}, the model's {logit:.4f})")
    x = got[hook][0, p].to(sae.W_dec.device, sae.W_dec.dtype)
    f = sae.encode(x[None])[0]
    xh = sae.decode(f[None])[0]
    contrib = f.to(dt) * proj(sae.W_dec.detach())
    terms = {"b_dec": float(proj(sae.b_dec.detach())), "error": float(proj(x.to(dt) - xh.to(dt))),
             "rest": float(proj(x_final - x.to(dt))), "bias": bias}
    total = float(contrib.sum())
    k = max(0, min(int(top), int(sae.cfg.d_sae)))
    order = contrib.abs().topk(k).indices.tolist() if k else []
    rows = [{"latent": int(i), "activation": float(f[i]), "contribution": float(contrib[i])}
            for i in order if f[i] != 0]
    ids = tokens[0].tolist()
    return Attribution(model=hm.info.name, hook=hook, position=p, token=token_strings(hm, [ids[p]])[0],
                       target=token_strings(hm, [t_id])[0], target_id=t_id, logit=logit, scale=s, top=rows,
                       features_total=total, remainder=logit - total, remainder_terms=terms,
                       contributions=contrib.float().cpu())


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
