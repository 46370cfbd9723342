"""A trained SAE for inference, in the SAELens v6 layout: cfg.json + sae_weights.safetensors.

The API mirrors what SAELens users know: encode, decode, forward, forward_with_activations,
W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, cfg, save_model, load_from_disk. SAELens
forms: standard, topk, jumprelu (also how batchtopk and matryoshka_batchtopk SAEs are exported) and
gated; an architecture may register more (`register_inference_form`), as the transcoders do.

A transcoder reads one hook and reconstructs another (cfg.d_out, cfg.metadata.hook_name_out; its
encoder reads x itself, apply_b_dec_to_input = false); a form whose weights include W_skip adds the
skip connection x @ W_skip^T to the output, as SAELens's skip transcoders do."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save
from torch import nn

from .errors import UserError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# the SAELens release whose on-disk format these folders follow
SAELENS_FORMAT_VERSION = "6.54.12"


@dataclass(frozen=True)
class InferenceForm:
    """How an exported architecture (cfg.json "architecture") runs: its weights and its encoder.
    encode(sae, x) returns the latent activations; decode is f @ W_dec + b_dec for every form."""

    name: str
    weight_keys: tuple[str, ...]
    encode: Callable[["SAE", torch.Tensor], torch.Tensor]
    description: str = ""


def _pre(sae: "SAE", x: torch.Tensor) -> torch.Tensor:
    x = x.to(sae.W_enc.dtype)
    if sae.cfg.apply_b_dec_to_input:
        x = x - sae.b_dec
    return x @ sae.W_enc


def _encode_standard(sae, x):
    return torch.relu(_pre(sae, x) + sae.b_enc)


def _encode_jumprelu(sae, x):
    pre = _pre(sae, x) + sae.b_enc
    return torch.relu(pre) * (pre > sae.threshold)


def _encode_topk(sae, x):
    if sae.cfg.rescale_acts_by_decoder_norm:
        raise UserError("rescale_acts_by_decoder_norm SAEs are not supported")
    pre = _pre(sae, x) + sae.b_enc
    vals, idx = pre.topk(int(sae.cfg.k), dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def _encode_gated(sae, x):
    pre = _pre(sae, x)
    active = (pre + sae.b_gate) > 0
    return active * torch.relu(pre * sae.r_mag.exp() + sae.b_mag)


# the SAELens v6 forms this package reads and writes; architectures may add forms
# (train/architectures/base.py: a class's `inference_form`)
INFERENCE_FORMS: dict[str, InferenceForm] = {}
# the encoders of the forms below, for architectures that register forms of their own
encode_relu, encode_jumprelu, encode_topk = _encode_standard, _encode_jumprelu, _encode_topk
# weight names by form (a live view of INFERENCE_FORMS)
WEIGHT_KEYS: dict[str, tuple[str, ...]] = {}


def register_inference_form(form: InferenceForm) -> None:
    known = INFERENCE_FORMS.get(form.name)
    if known is not None and known != form:
        raise ValueError(f"the SAELens form {form.name!r} is already registered differently")
    INFERENCE_FORMS[form.name] = form
    WEIGHT_KEYS[form.name] = form.weight_keys


for _form in (InferenceForm("standard", ("W_enc", "b_enc", "W_dec", "b_dec"), _encode_standard),
              InferenceForm("topk", ("W_enc", "b_enc", "W_dec", "b_dec"), _encode_topk),
              InferenceForm("jumprelu", ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), _encode_jumprelu),
              InferenceForm("gated", ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"), _encode_gated)):
    register_inference_form(_form)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the usual permissions (safetensors' save_file creates files 0600)."""
    Path(path).write_bytes(save(tensors))


class Metadata(dict):
    """cfg.metadata: a dict that also reads as attributes (cfg.metadata.hook_name), None if absent."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


@dataclass
class SAEConfig:
    """The fields of SAELens's v6 cfg.json that describe how to run the SAE."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool | None = None
    d_out: int | None = None  # a transcoder's output width
    metadata: Metadata = field(default_factory=Metadata)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metadata"] = dict(self.metadata)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["metadata"] = Metadata(d.get("metadata") or {})
        return cls(**kw)


class SAE(nn.Module):
    """An exported sparse autoencoder: f = encode(x), x_hat = decode(f), all on raw activations."""

    def __init__(self, cfg: SAEConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        if cfg.architecture not in INFERENCE_FORMS:
            raise UserError(f"architecture {cfg.architecture!r} cannot be loaded; known: {', '.join(INFERENCE_FORMS)}")
        if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
            raise UserError("only SAEs with normalize_activations and reshape_activations = 'none' are supported")
        missing = set(WEIGHT_KEYS[cfg.architecture]) - set(weights)
        if missing:
            raise UserError(f"the SAE weights lack {', '.join(sorted(missing))} for architecture {cfg.architecture!r}")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        for key in WEIGHT_KEYS[cfg.architecture]:
            self.register_parameter(key, nn.Parameter(weights[key].to(dtype=dtype, device=cfg.device),
                                                      requires_grad=False))
        self.form = INFERENCE_FORMS[cfg.architecture]
        if "b_enc" not in self.form.weight_keys:
            self.b_enc = None

    # ------------------------------------------------------------------ the maps
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in]."""
        return self.form.encode(self, x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction [..., d_out] of latent activations f [..., d_sae] (d_out = d_in for an SAE;
        a skip transcoder's skip term is added by forward, as in SAELens)."""
        return f @ self.W_dec + self.b_dec

    def forward_with_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [..., d_out], latent activations [..., d_sae]) of input activations x."""
        f = self.encode(x)
        out = self.decode(f)
        if "W_skip" in self.form.weight_keys:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.t()
        return out, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_activations(x)[0]

    # ------------------------------------------------------------------ files
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write cfg.json and sae_weights.safetensors into the folder `path` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: getattr(self, k).detach().contiguous().cpu() for k in WEIGHT_KEYS[self.cfg.architecture]}
        wpath, cpath = path / WEIGHTS_FILENAME, path / CFG_FILENAME
        write_safetensors(weights, wpath)
        cpath.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return wpath, cpath

    @classmethod
    def load_from_disk(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> "SAE":
        """Load a folder written by save_model (or by SAELens, for the architectures above)."""
        path = Path(path)
        if not (path / CFG_FILENAME).is_file() or not (path / WEIGHTS_FILENAME).is_file():
            raise UserError(f"{path} is not an SAE folder (it needs {CFG_FILENAME} and {WEIGHTS_FILENAME})")
        cfg = SAEConfig.from_dict(json.loads((path / CFG_FILENAME).read_text()))
        cfg.device = device
        if dtype is not None:
            cfg.dtype = dtype
        return cls(cfg, load_file(str(path / WEIGHTS_FILENAME)))

