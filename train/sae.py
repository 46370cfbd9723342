"""A trained SAE for inference, in the SAELens v6 layout: cfg.json + sae_weights.safetensors.

The API mirrors what SAELens users know: encode, decode, forward, W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc, b_dec, cfg, save_model, load_from_disk. Architectures: standard, topk,
jumprelu (also how batchtopk and matryoshka_batchtopk SAEs are exported) and gated."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..common.errors import UserError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# the SAELens release whose on-disk format these folders follow (checked by the test suite)
SAELENS_FORMAT_VERSION = "6.54.12"
WEIGHT_KEYS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}


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
        if cfg.architecture not in WEIGHT_KEYS:
            raise UserError(f"architecture {cfg.architecture!r} cannot be loaded; known: {', '.join(WEIGHT_KEYS)}")
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
        if cfg.architecture == "gated":
            self.b_enc = None

    # ------------------------------------------------------------------ the maps
    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in]."""
        arch = self.cfg.architecture
        pre = self._pre(x)
        if arch == "gated":
            active = (pre + self.b_gate) > 0
            return active * torch.relu(pre * self.r_mag.exp() + self.b_mag)
        pre = pre + self.b_enc
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        vals, idx = pre.topk(int(self.cfg.k), dim=-1, sorted=False)
        if self.cfg.rescale_acts_by_decoder_norm:
            raise UserError("rescale_acts_by_decoder_norm SAEs are not supported")
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction [..., d_in] of latent activations f [..., d_sae]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ files
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write cfg.json and sae_weights.safetensors into the folder `path` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: getattr(self, k).detach().contiguous().cpu() for k in WEIGHT_KEYS[self.cfg.architecture]}
        wpath, cpath = path / WEIGHTS_FILENAME, path / CFG_FILENAME
        save_file(weights, str(wpath))
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

