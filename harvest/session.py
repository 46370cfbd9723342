"""A session: the model and the SAEs of one or more runs loaded once, for asking many questions.

    from actcache.harvest.session import Session
    s = Session("runs/s1")                                    # every SAE of the run, the model they name
    s.top_features("The weather today is sunny", k=5)         # per token: top latents with their top contexts
    s.latent(123)                                             # a latent's card from the features output
    s.steer("The weather today", latent=123, strength=8)      # .steered_text beside .plain_text
    s.attribute("The capital of France is", " Paris")         # each latent's share of the logit
    s.analyse("The weather today is sunny")                   # top latents and the reconstruction error

Paths are run folders (every sub-folder with a cfg.json is an SAE) or SAE folders (ours or SAELens v6);
a loaded SAE object works too. Methods take `sae=NAME` where the session holds several (default: the
first). The model is the one the SAEs name (cfg.json metadata.model_spec, else model_name), loaded
through harvest/models.py unless given (`model=` a spec or a loaded HookedModel); every SAE must name
the same one. Top contexts come from the features output of each run (`actcache features RUN --out
RUN/features`, found there, beside an SAE folder, or given with features=); without one, latents are
listed without contexts and `missing_features` says the command that builds it.

Definitions (the same as analysis.py's functions, which are one-shot sessions):

Reconstruction metrics (analyse: mse, fvu, cossim, l0) are common/metrics.py's (SAELens's run_evals),
over the prompt's tokens, special tokens (BOS/EOS/pad) left out unless include_special_tokens.

Steering adds strength * W_dec[latent] to the hook's activation (every position, or the prompt's only)
while generating; the plain continuation runs beside it in the same batch. Generation uses the model's
key/value cache (generation.py).

Attribution is exact for the model's actual forward pass. The logit of the target token t at position p
is unembed(norm(x_final)), where x_final is the residual stream entering the final normalisation. With
the normalisation's scale s (the RMS, or the standard deviation for LayerNorm, of x_final at p on the
clean pass) frozen, that logit is linear in x_final:

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

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..common.errors import UserError
from ..common.finite import finite_json
from ..common.metrics import Metrics, token_errors
from ..common.progress import stage
from ..common import outputs
from ..common.features_output import DEFAULT_FOLDER, FeaturesOutput, build_command, is_features_output
from . import splice
from .generation import generate, steering_hook
from .prompts import Prompt, single_token, special_ids, text_of, token_strings, tokenize

CONTEXTS = 3  # top contexts shown per latent by top_features


# ------------------------------------------------------------------------------------------ results
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


@dataclass
class Context:
    """One top-activating example of a latent from the features output: the tokens around it, `at` the
    index of the activating one, and where it is in the store."""

    act: float
    tokens: list[str]
    at: int
    seq: int
    pos: int


@dataclass
class LatentHit:
    latent: int
    activation: float
    density: float | None = None   # from the features output (None without one)
    max_act: float | None = None
    contexts: list[Context] = field(default_factory=list)


@dataclass
class TokenFeatures:
    position: int
    token_id: int
    token: str
    special: bool
    latents: list[LatentHit]


@dataclass
class TopFeatures:
    """top_features()'s result: per token its top latents, each with its top contexts."""

    model: str
    sae: str
    hook: str
    tokens: list[TokenFeatures]
    features: str | None      # the features output the contexts come from
    note: str | None = None   # why there are no contexts, and the command that builds them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.model} {self.hook} ({self.sae})" + (f"; {self.note}" if self.note else "")]
        for t in self.tokens:
            lines.append(f"{t.position:>4}{'*' if t.special else ' '}{t.token!r}")
            for h in t.latents:
                ctx = "  |  ".join(_context_text(c) for c in h.contexts)
                lines.append(f"        {h.latent:>7} {h.activation:>9.4g}   {ctx}")
        return "\n".join(lines)


def _context_text(c: Context) -> str:
    return "".join(f"[{s}]" if i == c.at else s for i, s in enumerate(c.tokens)).replace("\n", "\\n")


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
    seconds: float = 0.0
    step_logits: list[torch.Tensor] = field(default_factory=list, repr=False)  # per step [2, vocab]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "step_logits"}

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


def check_strength(strength: Any, name: str = "strength") -> float:
    """A steering strength as a finite float, or one line saying what to give (`name`: how the caller
    spells the option, e.g. --strength)."""
    try:
        value = float(strength)
        if isinstance(strength, bool) or not math.isfinite(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name} {strength!r}: give a finite number (a multiple of the decoder row)") from None
    return value


def check_temperature(temperature: Any, name: str = "temperature") -> float:
    """A sampling temperature: 0 (greedy) or a finite positive number."""
    try:
        value = float(temperature)
        if isinstance(temperature, bool) or not math.isfinite(value) or value < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name} {temperature!r}: give 0 (greedy) or a finite positive number") from None
    return value


# ------------------------------------------------------------------------------------------ loading
@dataclass
class LoadedSAE:
    """One SAE of a session: its name, folder, weights, hook and the features output of its latents."""

    name: str
    folder: Path | None
    sae: Any
    hook: str
    features: FeaturesOutput | None = None
    features_name: str | None = None   # its name in the features output

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def prepend_bos(self) -> bool:
        v = (getattr(self.sae.cfg, "metadata", None) or {}).get("prepend_bos")
        return True if v is None else bool(v)


def model_spec_of(sae: Any) -> str | None:
    """The model an SAE names: metadata.model_spec (what actcache loads), else metadata.model_name."""
    meta = getattr(sae.cfg, "metadata", None) or {}
    return meta.get("model_spec") or meta.get("model_name")


def _sae_folders(path: Path) -> tuple[list[Path], Path | None]:
    """(SAE folders, run folder or None) of a path given to a session."""
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder (from `actcache train`) or an SAE folder")
    found = outputs.sae_folders(path)
    if not found:
        raise UserError(f"{path} holds no SAE folder ({outputs.CFG_FILENAME} and {outputs.WEIGHTS_FILENAME}); "
                        "give a run or an SAE folder")
    return found, (None if found == [path] else path)


def _features_candidates(path: Path, run: Path | None) -> list[Path]:
    """Where a path's features output is looked for: RUN/features, or the run's beside an SAE folder."""
    if run is not None:
        return [run / DEFAULT_FOLDER]
    return [path.parent / DEFAULT_FOLDER, path / DEFAULT_FOLDER]


class Session:
    """The model and SAEs loaded once; see the module docstring."""

    def __init__(self, paths: Any, *, model: Any = None, features: Sequence[str | Path] = (),
                 device: str | None = None, tokenizer: str | None = None):
        from ..common.sae import SAE
        from .evaluate import check_saes
        from .models import load_model

        items = list(paths) if isinstance(paths, (list, tuple)) else [paths]
        if not items:
            raise UserError("no SAE given: pass a run folder or an SAE folder")
        given = [FeaturesOutput(f) for f in features]
        found: list[tuple[Path | None, Any, list[Path], Path]] = []  # folder, sae, features candidates, origin
        for item in items:
            if isinstance(item, (str, Path)):
                path = Path(item)
                folders, run = _sae_folders(path)
                cands = _features_candidates(path, run)
                origin = run or outputs.run_of(path) or path  # what `actcache features` is given
                found += [(f, SAE.load_from_disk(f), cands, origin) for f in folders]
            else:
                found.append((None, item, [], Path(".")))
        self.saes: dict[str, LoadedSAE] = {}
        self.missing_features: dict[str, str] = {}  # SAE name -> the command that builds its features output
        self._why: dict[str, str] = {}               # SAE name -> why it has no top contexts
        opened: dict[Path, FeaturesOutput] = {}
        for folder, sae, cands, origin in found:
            base = folder.name if folder is not None else "sae"
            name = base if base not in self.saes else f"{folder.parent.name}/{base}" if folder else f"sae{len(self.saes)}"
            entry = LoadedSAE(name, folder, sae, splice.sae_hook(sae))
            self.saes[name] = entry
            if folder is None:
                continue
            for c in cands:
                if c not in opened and is_features_output(c):
                    opened[c] = FeaturesOutput(c)
            stale = None
            for fo in given + [opened[c] for c in cands if c in opened]:
                rec = fo.entry_for(folder)
                if rec is None:
                    continue
                if fo.is_current(rec, folder):
                    entry.features, entry.features_name = fo, rec["name"]
                    break
                stale = stale or fo
            if entry.features is None:
                self.missing_features[name] = build_command(origin, overwrite=stale is not None)
                self._why[name] = (f"the features output {stale.folder} measured other weights than those now in "
                                   f"{folder}" if stale is not None else f"{name} has no features output")
        if model is None or isinstance(model, str):
            specs = sorted({m for e in self.saes.values() if (m := model_spec_of(e.sae))})
            if model is None and len(specs) > 1:
                raise UserError(f"the SAEs name different models ({', '.join(specs)}); explore one model's SAEs "
                                "at a time, or pass --model")
            spec = model or (specs[0] if specs else None)
            if not spec:
                raise UserError("the SAE's cfg.json names no model (metadata.model_spec or model_name): pass --model")
            model = load_model(spec, device=device, tokenizer=tokenizer)
        self.model = model
        check_saes(model, {n: e.sae for n, e in self.saes.items()})
        for e in self.saes.values():
            if e.sae.W_dec.device != torch.device(model.device):
                e.sae.to(model.device)
        self.special = set(special_ids(model))

    # -------------------------------------------------------------------------------------- helpers
    @property
    def sae_names(self) -> list[str]:
        return list(self.saes)

    def get(self, sae: str | None = None) -> LoadedSAE:
        """The SAE of that name (the first one when None)."""
        if sae is None:
            return next(iter(self.saes.values()))
        e = self.saes.get(sae)
        if e is None:
            raise UserError(f"no SAE named {sae!r} in this session; it has: {', '.join(self.saes)}")
        return e

    def features_problem(self, sae: str | None = None) -> str:
        """Why an SAE has no top contexts, and the command that builds them (one line)."""
        e = self.get(sae)
        cmd = self.missing_features.get(e.name)
        why = self._why.get(e.name, f"{e.name} was given as a loaded SAE, without a features output")
        return f"{why}; build it with `{cmd}`" if cmd else why

    def check_latent(self, latent: Any, sae: str | None = None) -> int:
        e = self.get(sae)
        try:
            i = int(latent)
            if i != float(latent):
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"latent {latent!r} is not a whole number") from None
        if not 0 <= i < e.d_sae:
            raise UserError(f"latent {i} is out of range: {e.name} has {e.d_sae} latents (0 .. {e.d_sae - 1})")
        return i

    def tokenize(self, prompt: Prompt, sae: str | None = None, room: int = 0) -> torch.Tensor:
        return tokenize(self.model, prompt, self.get(sae).prepend_bos, room)

    def _encode(self, e: LoadedSAE, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the hook's activation [pos, d_in], latents [pos, d_sae]) of one tokenized prompt."""
        _, got = splice.forward(self.model, tokens, cache=[e.hook])
        x = got[e.hook][0].to(e.sae.W_dec.device, e.sae.W_dec.dtype)
        return x, e.sae.encode(x)

    # -------------------------------------------------------------------------------------- analyse
    @torch.inference_mode()
    def analyse(self, prompt: Prompt, top: int = 5, sae: str | None = None, *,
                include_special_tokens: bool = False) -> Analysis:
        """The top `top` latents of every token of the prompt at the SAE's hook, and how well the SAE
        reconstructs the activations (mse, fvu, cossim; definitions in common/metrics.py)."""
        e = self.get(sae)
        tokens = self.tokenize(prompt, e.name)
        x, f = self._encode(e, tokens)
        xh = e.sae.decode(f)
        xf, xhf = x.double(), xh.double()
        sse_tok, cos_tok = token_errors(xf, xhf)
        ids = tokens[0].tolist()
        keep = torch.tensor([include_special_tokens or i not in self.special for i in ids])
        if not keep.any():
            raise UserError("the prompt has only special tokens; give some text")
        k = max(0, min(int(top), e.d_sae))
        vals, idx = f.float().topk(k, dim=-1) if k else (f[:, :0], f[:, :0].long())
        strings = token_strings(self.model, ids)
        rows = []
        for p, i in enumerate(ids):
            active = [(int(j), float(v)) for j, v in zip(idx[p], vals[p]) if v != 0]
            rows.append(TokenLatents(p, int(i), strings[p], i in self.special, [j for j, _ in active],
                                     [v for _, v in active], int((f[p] != 0).sum()), float(sse_tok[p]),
                                     float(cos_tok[p])))
        m = Metrics(e.d_sae)
        m.update(xf[keep], xhf[keep], f[keep])
        r = m.result()
        return Analysis(model=self.model.info.name, hook=e.hook, tokens=rows, mse=r["mse"], fvu=r["fvu"],
                        cossim=r["cossim"], l0=r["l0"], n_tokens_scored=m.n,
                        latents=f.detach().cpu(), activations=x.detach().cpu(), reconstruction=xh.detach().cpu())

    # -------------------------------------------------------------------------------------- top features
    @torch.inference_mode()
    def top_features(self, text: Prompt, k: int = 5, sae: str | None = None, contexts: int = CONTEXTS) -> TopFeatures:
        """Per token of the text, its `k` most active latents, each joined with its top `contexts`
        examples from the features output (none where the session has no features output)."""
        e = self.get(sae)
        tokens = self.tokenize(text, e.name)
        _, f = self._encode(e, tokens)
        kk = max(0, min(int(k), e.d_sae))
        vals, idx = f.float().topk(kk, dim=-1) if kk else (f[:, :0].float(), f[:, :0].long())
        ids = tokens[0].tolist()
        strings = token_strings(self.model, ids)
        rows = []
        for p, t in enumerate(ids):
            hits = [self._hit(e, int(j), float(v), contexts) for j, v in zip(idx[p].tolist(), vals[p].tolist()) if v > 0]
            rows.append(TokenFeatures(p, int(t), strings[p], t in self.special, hits))
        note = None if e.features is not None else f"no top contexts: {self.features_problem(e.name)}"
        return TopFeatures(model=self.model.info.name, sae=e.name, hook=e.hook, tokens=rows,
                           features=str(e.features.folder) if e.features else None, note=note)

    def _hit(self, e: LoadedSAE, latent: int, value: float, n_contexts: int) -> LatentHit:
        if e.features is None:
            return LatentHit(latent, value)
        rec = e.features.latent(e.features_name, latent)
        return LatentHit(latent, value, rec.get("density"), rec.get("max_act"),
                         [self._context(e, ex) for ex in rec.get("top", [])[:n_contexts]])

    def _context(self, e: LoadedSAE, ex: dict[str, Any]) -> Context:
        return Context(act=float(ex["act"]), tokens=[self._token_string(e, t) for t in ex["tokens"]],
                       at=int(ex["at"]), seq=int(ex["seq"]), pos=int(ex["pos"]))

    def _token_string(self, e: LoadedSAE, token_id: int) -> str:
        if e.features is not None and str(int(token_id)) in e.features.vocab:
            return e.features.vocab[str(int(token_id))]
        return token_strings(self.model, [token_id])[0]

    def latent(self, latent: int, sae: str | None = None) -> dict[str, Any]:
        """A latent's card: its record in the features output (density, histogram, top and quantile
        examples, logit effects) with token strings in place of ids."""
        e = self.get(sae)
        i = self.check_latent(latent, e.name)
        if e.features is None:
            raise UserError(f"no latent card: {self.features_problem(e.name)}")
        rec = dict(e.features.latent(e.features_name, i))
        show = lambda ex: asdict(self._context(e, ex))  # noqa: E731
        rec["top"] = [show(ex) for ex in rec.get("top", [])]
        rec["quantiles"] = [{**q, "examples": [show(ex) for ex in q["examples"]]} for q in rec.get("quantiles", [])]
        rec["top_tokens"] = [[self._token_string(e, t), c] for t, c in rec.get("top_tokens", [])]
        if rec.get("logits"):
            rec["logits"] = {side: [[self._token_string(e, t), v] for t, v in pairs]
                             for side, pairs in rec["logits"].items()}
        rec["sae"] = e.name
        return rec

    # -------------------------------------------------------------------------------------- steer
    @torch.inference_mode()
    def steer(self, prompt: Prompt, latent: int, strength: float = 8.0, tokens: int = 20, sae: str | None = None, *,
              positions: str = "all", temperature: float = 0.0, seed: int | None = None,
              use_cache: bool = True) -> Steering:
        """Generate `tokens` new tokens after the prompt with strength * W_dec[latent] added to the hook's
        activation (at every position, or the prompt's only: positions="prompt"), and the plain
        continuation beside it. Greedy at temperature 0, else sampled with a generator seeded with `seed`
        (the same draws for both). The two run as one batch of two sequences, the direction added to the
        first only."""
        import time

        if positions not in ("all", "prompt"):
            raise UserError(f"positions {positions!r}: choose all or prompt")
        strength = check_strength(strength)
        temperature = check_temperature(temperature)
        if int(tokens) < 1:
            raise UserError("the number of new tokens must be at least 1")
        e = self.get(sae)
        latent = self.check_latent(latent, e.name)
        ids = self.tokenize(prompt, e.name, room=int(tokens))
        fn = steering_hook(e.sae.W_dec[latent].detach(), strength, ids.shape[1] if positions == "prompt" else None,
                           rows=1)
        steps: list[torch.Tensor] = []
        t0 = time.perf_counter()
        with stage(f"generating {int(tokens)} tokens, steered and plain"):  # a line if it takes a while
            steered, plain = generate(self.model, ids.repeat(2, 1), int(tokens), splices={e.hook: fn},
                                      temperature=temperature, seed=seed, use_cache=use_cache, logits_out=steps)
        seconds = time.perf_counter() - t0
        text = text_of(self.model)
        return Steering(model=self.model.info.name, hook=e.hook, feature=latent, strength=strength,
                        positions=positions, prompt_tokens=ids[0].tolist(), steered_tokens=steered,
                        plain_tokens=plain, steered_text=text(steered), plain_text=text(plain),
                        temperature=float(temperature), seed=seed, seconds=seconds, step_logits=steps)

    # -------------------------------------------------------------------------------------- attribute
    @torch.inference_mode()
    def attribute(self, prompt: Prompt, target: str | int, sae: str | None = None, *, position: int = -1,
                  top: int = 10) -> Attribution:
        """Each latent's direct contribution, at `position`, to the logit of `target` for the next token:
        activation * (W_dec[i] . u), u the unembedding direction of the target through the final
        normalisation with its scale frozen at the clean pass's value; the remainder holds the rest."""
        e = self.get(sae)
        hm, hook = self.model, e.hook
        if not _RESIDUAL_HOOK.match(hook) or int(e.sae.cfg.d_in) != int(hm.info.d_model):
            raise UserError(f"attribution needs an SAE on the residual stream (hook_resid_*, hook_mlp_out, "
                            f"hook_attn_out); {hook} has no direct path to the logits")
        t_id = single_token(hm, target)
        tokens = self.tokenize(prompt, e.name)
        n = tokens.shape[1]
        if not -n <= position < n:
            raise UserError(f"position {position} is outside the prompt's {n} tokens")
        p = position % n
        tl = hm.tl
        kind, w, b = _final_norm(tl)
        if kind is None:
            raise UserError(f"{hm.info.name} has no final normalisation that attribution understands")
        # the residual stream entering the final norm: TransformerLens 4 names it, 3 has the last block's output
        final = ("ln_final.hook_in" if "ln_final.hook_in" in tl.hook_dict
                 else f"blocks.{hm.info.n_layers - 1}.hook_resid_post")
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
        sae_ = e.sae
        x = got[hook][0, p].to(sae_.W_dec.device, sae_.W_dec.dtype)
        f = sae_.encode(x[None])[0]
        xh = sae_.decode(f[None])[0]
        contrib = f.to(dt) * proj(sae_.W_dec.detach())
        terms = {"b_dec": float(proj(sae_.b_dec.detach())), "error": float(proj(x.to(dt) - xh.to(dt))),
                 "rest": float(proj(x_final - x.to(dt))), "bias": bias}
        total = float(contrib.sum())
        k = max(0, min(int(top), e.d_sae))
        order = contrib.abs().topk(k).indices.tolist() if k else []
        rows = [{"latent": int(i), "activation": float(f[i]), "contribution": float(contrib[i])}
                for i in order if f[i] != 0]
        ids = tokens[0].tolist()
        return Attribution(model=hm.info.name, hook=hook, position=p, token=token_strings(hm, [ids[p]])[0],
                           target=token_strings(hm, [t_id])[0], target_id=t_id, logit=logit, scale=s, top=rows,
                           features_total=total, remainder=logit - total, remainder_terms=terms,
                           contributions=contrib.float().cpu())


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
