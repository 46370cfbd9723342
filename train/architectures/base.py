"""What every SAE architecture shares: the registry, and the
training module base class.

An architecture is one `TrainingSAE` subclass in one file, registered with `@register`. Its class
attributes state everything the rest of the package needs to know about it:

- `architecture`: the name a sweep's `architecture = "..."` selects;
- `keys`: its own config keys (`Option`, common/options.py: kind, default, valid range, unit, help), beyond the keys every SAE
  takes (`COMMON_KEYS`); `takes_k = True` adds `k`, `uses_auxk = True` adds `aux_k` and
  `aux_loss_coefficient` and makes the trainer switch its AuxK loss on when latents die;
- `transcoder = True`: it reads one hook (`hook`) and reconstructs another of the same forward pass
  (`hook_out`, a key it then takes): the trainer hands step_loss the output hook's batch as `target`,
  the encoder does not subtract b_dec from the input, W_dec and b_dec have the output's width, and
  the export folds each hook's normalisation in; `skip = True` adds a learned linear map W_skip from
  input to output;
- `resolve(cfg, d_in, d_out, n_steps)`: fills what depends on the store and the run (d_sae, aux_k,
  schedule defaults), raises UserError for what cannot be right, returns warnings;
- `step_loss(x, coefficient, dead, aux_on[, target])`: its loss on one batch (target: a transcoder's
  output batch); `log_values()`: extra numbers for metrics.jsonl;
- `calibrate(batches)`: an optional pass over fresh batches after training (e.g. the inference
  threshold of BatchTopK);
- `saelens_architecture` and `export_state(scale[, scale_out])`: how it is saved for SAELens; the form must be one
  common/sae.py declares (so that a fresh process loads the folder without this package), or the class
  brings its own `inference_form` (weight names and encoder), which registration adds; a form of another
  package is then found in a fresh process through the entry point group actcache.inference_forms.

Config parsing and validation (train/config.py), the README's key table, the trainer and the export
all read these attributes; nothing else lists architectures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ...common.errors import UserError
from ...common.options import Option, did_you_mean
from ...common.sae import INFERENCE_FORMS, InferenceForm, register_inference_form


# ------------------------------------------------------------------------- option descriptions
Key = Option  # the name architecture files used before options moved to common/options.py


COMMON_KEYS: tuple[Option, ...] = (
    Option("name", "str", help="the SAE's folder name (letters, digits, '.', '_', '-'); [grid] SAEs are named "
        "automatically", required=True),
    Option("architecture", "str", help="which registered architecture (see the table)", required=True),
    Option("hook", "str", None, "the store's hook this SAE reads (a transcoder's input)",
        default_text="the top-level `hook`"),
    Option("expansion", "float", 16.0, "d_sae = expansion × d_in (or give d_sae)", low=0, low_open=True),
    Option("d_sae", "int", None, "the number of latents, instead of expansion", low=1, unit="latents",
        default_text="expansion × d_in"),
    Option("lr", "float", 2e-4, "Adam learning rate", low=0, low_open=True),
    Option("lr_warmup_steps", "int", 0, "steps of linear learning-rate warm-up from 0", low=0, unit="steps"),
    Option("lr_decay_steps", "int", None, "steps of linear decay to 0 at the end of the run", low=0, unit="steps",
        default_text="the last fifth of the run"),
    Option("grad_clip", "float", 1.0, "maximum gradient norm; 0 turns clipping off", low=0),
    Option("adam_beta1", "float", 0.9, "Adam β1", low=0, high=1, high_open=True),
    Option("adam_beta2", "float", 0.999, "Adam β2", low=0, high=1, high_open=True),
)
K_KEY = Option("k", "int", None, "active latents per token", low=1, required=True, unit="latents")
AUXK_KEYS: tuple[Option, ...] = (
    Option("aux_k", "int", None, "dead latents that reconstruct the residual in the AuxK loss", low=1, unit="latents",
        default_text="d_in / 2"),
    Option("aux_loss_coefficient", "float", 1 / 32, "weight of the AuxK loss", low=0),
)
TRANSCODER_KEYS: tuple[Option, ...] = (
    Option("hook_out", "str", None, "the hook a transcoder reconstructs from `hook` (same forward pass), e.g. "
        '"blocks.8.hook_mlp_out"', required=True),
)
SPARSITY_WARMUP_KEY = Option("sparsity_warmup_steps", "int", None,
                          "steps of linear warm-up of the sparsity coefficient from 0", low=0, unit="steps",
                          default_text="the first 5% of the run")


# ------------------------------------------------------------------------- one SAE's config
class SAEConfig:
    """One SAE of the sweep: its resolved key values, readable as attributes. A key of another
    architecture reads as None (it does not apply); a name that is no SAE key of any registered
    architecture is an AttributeError, so a misspelt key never reads quietly as None."""

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", {})
        arch = ARCHITECTURES.get(values.get("architecture"))
        for key in (arch.all_keys() if arch is not None else COMMON_KEYS):
            if key.default is not None:
                self._values[key.name] = key.default
        for k, v in values.items():
            setattr(self, k, v)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        _check_sae_key(name)
        return self._values.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        _check_sae_key(name)
        self._values[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SAEConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SAEConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if v is not None}


RESOLVED = ("d_in", "d_out")  # not keys: the widths of the SAE's hooks in the store, filled in by resolve()


def _check_sae_key(name: str) -> None:
    known = all_sae_keys()
    if name not in known and name not in RESOLVED:
        raise AttributeError(f"no SAE key {name!r}{did_you_mean(name, known)}")


# ------------------------------------------------------------------------- the registry
ARCHITECTURES: dict[str, type["TrainingSAE"]] = {}


def register(cls: type["TrainingSAE"]) -> type["TrainingSAE"]:
    """Class decorator: make an architecture available to sweeps (by cls.architecture)."""
    name = cls.architecture
    if not name or name == "base" or not isinstance(name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute `architecture` naming it")
    if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
        raise ValueError(f"architecture {name!r} is already registered by {ARCHITECTURES[name].__name__}")
    names = [k.name for k in cls.all_keys()]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"architecture {name!r} declares the key {dup!r} twice")
    if cls.inference_form is not None:
        register_inference_form(cls.inference_form)
    if cls.saelens_architecture not in INFERENCE_FORMS:
        raise ValueError(f"architecture {name!r} exports as {cls.saelens_architecture!r}, which common/sae.py cannot "
                         "run; give the class an inference_form")
    ARCHITECTURES[name] = cls
    return cls


def unregister(name: str) -> None:
    ARCHITECTURES.pop(name, None)


def get_architecture(name: str) -> type["TrainingSAE"]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UserError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


def all_sae_keys() -> dict[str, Option]:
    """Every SAE key any registered architecture takes (the common ones first)."""
    out = {k.name: k for k in COMMON_KEYS}
    for cls in ARCHITECTURES.values():
        for k in cls.all_keys():
            out.setdefault(k.name, k)
    return out


def build_sae(cfg: SAEConfig, generator: torch.Generator, device: torch.device | str = "cpu") -> "TrainingSAE":
    """A freshly initialised SAE of the configured architecture (b_dec still zero; see init_b_dec)."""
    return get_architecture(cfg.architecture)(cfg, generator, device)


# ------------------------------------------------------------------------- the module
@dataclass
class StepOut:
    """One SAE's result on one batch. Tensors stay on the device (no host sync)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    fired: torch.Tensor  # bool [d_sae]: latents active on at least one token of the batch
    l0: torch.Tensor  # mean number of active latents per token
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def geometric_median(x: torch.Tensor, iters: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    x = x.to(torch.float64)
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if torch.allclose(m_new, m, atol=1e-10, rtol=0):
            m = m_new
            break
        m = m_new
    return m.to(torch.float32)


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


class TrainingSAE(nn.Module):
    """The base of every architecture. Initialisation: decoder rows random at unit norm,
    W_enc = W_dec^T, b_dec at the geometric median of the first batch (init_b_dec)."""

    architecture = "base"
    help = ""
    keys: tuple[Option, ...] = ()
    takes_k = False
    uses_auxk = False
    encoder_matrices = 1  # d_in x d_sae matrices its encoder multiplies by (a step's cost, train/distributed.py)
    sparse_decoder = False  # decodes only the k active latents of each token (likewise)
    saelens_architecture = "standard"
    inference_form: InferenceForm | None = None  # a new SAELens form this architecture exports as
    unit_norm_decoder = False
    transcoder = False  # reads `hook`, reconstructs `hook_out` (step_loss gets the output batch as target)
    skip = False  # a learned linear skip connection W_skip [d_out, d_in] from input to output

    @classmethod
    def all_keys(cls) -> tuple[Option, ...]:
        """The keys this architecture takes: the common ones, hook_out for transcoders, k and the AuxK
        keys where they apply, then its own."""
        return (COMMON_KEYS + (TRANSCODER_KEYS if cls.transcoder else ()) + ((K_KEY,) if cls.takes_k else ())
                + (AUXK_KEYS if cls.uses_auxk else ()) + cls.keys)

    @property
    def apply_b_dec_to_input(self) -> bool:
        """Whether the encoder reads x - b_dec (an SAE) or x itself (a transcoder: b_dec is the output's)."""
        return not self.transcoder

    @classmethod
    def resolve(cls, cfg: SAEConfig, d_in: int, d_out: int, n_steps: int) -> list[str]:
        """Fill the store- and run-dependent values of cfg; UserError for what cannot be right; returns
        warnings (one line each) for legal but surprising values. d_out is the width the SAE
        reconstructs (d_in for an SAE of one hook)."""
        where = f"SAE {cfg.name!r}"
        warnings = []
        cfg.d_in = d_in
        if cls.transcoder:
            cfg.d_out = d_out
        if cfg.d_sae is None:
            cfg.d_sae = int(round(float(cfg.expansion) * d_in))
        if cfg.d_sae < 1:
            raise UserError(f"{where}: d_sae must be positive (expansion {cfg.expansion} × d_in {d_in})")
        if cfg.lr_decay_steps is None:
            cfg.lr_decay_steps = n_steps // 5
        if cfg.lr_decay_steps > n_steps:
            warnings.append(f"{where}: lr_decay_steps = {cfg.lr_decay_steps} is longer than the run ({n_steps} "
                            "steps); the learning rate never reaches its full value")
        if cfg.lr_warmup_steps + cfg.lr_decay_steps > n_steps and cfg.lr_decay_steps <= n_steps:
            warnings.append(f"{where}: lr_warmup_steps + lr_decay_steps = "
                            f"{cfg.lr_warmup_steps + cfg.lr_decay_steps} exceed the run's {n_steps} steps")
        if any(k.name == "sparsity_warmup_steps" for k in cls.all_keys()):
            if cfg.sparsity_warmup_steps is None:
                cfg.sparsity_warmup_steps = n_steps // 20
            if cfg.sparsity_warmup_steps > n_steps:
                warnings.append(f"{where}: sparsity_warmup_steps = {cfg.sparsity_warmup_steps} is longer than the "
                                f"run ({n_steps} steps); the sparsity penalty never reaches full strength")
        if cls.takes_k and not 1 <= cfg.k <= cfg.d_sae:
            raise UserError(f"{where}: k = {cfg.k} must be between 1 and d_sae = {cfg.d_sae}")
        if cls.uses_auxk:
            if cfg.aux_k is None:
                cfg.aux_k = max(1, min(d_in // 2, cfg.d_sae))
            if cfg.aux_k > cfg.d_sae:
                raise UserError(f"{where}: aux_k = {cfg.aux_k} must be at most d_sae = {cfg.d_sae}")
        return warnings

    def __init__(self, cfg: SAEConfig, generator: torch.Generator, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        d_out = cfg.d_out if self.transcoder else d_in
        W_dec = torch.randn(d_sae, d_out, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device))
        if self.transcoder:  # input and output directions differ: an encoder of its own, unit columns
            W_enc = torch.randn(d_in, d_sae, generator=generator)
            self.W_enc = nn.Parameter((W_enc / W_enc.norm(dim=0, keepdim=True)).to(device))
        else:
            self.W_enc = nn.Parameter(W_dec.t().clone().contiguous().to(device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, device=device))
        self.init_params(device)

    def init_params(self, device) -> None:
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, device=device))

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """b_dec from the first batch of what the module reconstructs (a transcoder's output)."""
        self.b_dec.copy_(geometric_median(sample).to(self.b_dec.device))

    # ------------------------------------------------------------------ the maps SAEs and transcoders share
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What W_enc multiplies: x - b_dec for an SAE, x for a transcoder."""
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def input_bias(self) -> torch.Tensor | None:
        """The bias subtracted from the input before the encoder (None for a transcoder)."""
        return self.b_dec if self.apply_b_dec_to_input else None

    def add_skip(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output plus the skip connection x @ W_skip^T where the architecture has one."""
        return out + x @ self.W_skip.t() if self.skip else out

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def step_loss(self, x: torch.Tensor, coefficient: float, dead: torch.Tensor, aux_on: bool,
                  target: torch.Tensor | None = None) -> StepOut:
        """The loss on the batch x. target: what to reconstruct, passed to transcoders only (the batch
        of `hook_out`); an SAE reconstructs x."""
        raise NotImplementedError

    def log_values(self) -> dict[str, float]:
        """Architecture-specific numbers for each metrics.jsonl line (read at logging steps only)."""
        return {}

    needs_calibration = False

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> list[str]:
        """After training, on fresh (normalised) batches: set what inference needs. Returns warnings."""
        return []

    # ------------------------------------------------------------------ export
    def export_state(self, scale: float, scale_out: float | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(SAELens architecture, extra cfg fields, weights) with the input normalisation x -> scale * x
        and the output's y -> scale_out * y (a transcoder's; an SAE's is `scale`) folded in."""
        s_out = scale if scale_out is None else scale_out
        st = {"W_enc": self.W_enc.detach() * scale, "W_dec": self.W_dec.detach() / s_out,
              "b_dec": self.b_dec.detach() / s_out}
        if hasattr(self, "b_enc"):
            st["b_enc"] = self.b_enc.detach().clone()
        extra: dict[str, Any] = {}
        if self.skip:  # y_n = ... + (scale x) W_skip^T, y = y_n / s_out
            st["W_skip"] = self.W_skip.detach() * (scale / s_out)
        if self.transcoder:
            extra.update(d_out=int(self.cfg.d_out), apply_b_dec_to_input=False)
        return self.saelens_architecture, extra, st
