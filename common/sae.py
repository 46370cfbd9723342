"""A trained SAE for inference, in the SAELens v6 layout: cfg.json + sae_weights.safetensors.

The API mirrors what SAELens users know: encode, decode, forward, forward_with_activations,
W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, cfg, save_model, load_from_disk. SAELens
forms: standard, topk, jumprelu (also how batchtopk and matryoshka_batchtopk SAEs are exported),
gated, and the transcoders (transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder
and our topk_transcoder). Every form an exported folder can name is declared here, so a fresh process
loads any of them without the training side; an architecture of another package brings its form
through the entry point group `actcache.inference_forms` (name = the form, value = "module:FORM").

Loading checks the folder before anything runs (`load_from_disk`): cfg.json's keys present and typed,
every tensor of the form there, of the shape cfg.json implies (d_in, d_sae, d_out), the file complete
and every weight finite; anything else is one UserError line naming the folder, the file and the tensor.

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

from .errors import UserError, first_line
from .sparse_kernels import topk_entries
from .outputs import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME  # an SAE folder's names: one home

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
    needs_k: bool = False  # cfg.json must give k (the TopK forms)


# the shape of each weight, in cfg.json's sizes (d_out: a transcoder's output width, else d_in); a form
# of another package whose weights are not named here is checked for presence and finiteness only
WEIGHT_SHAPES: dict[str, tuple[str, ...]] = {
    "W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_out"), "b_dec": ("d_out",),
    "threshold": ("d_sae",), "b_gate": ("d_sae",), "b_mag": ("d_sae",), "r_mag": ("d_sae",),
    "W_skip": ("d_out", "d_in"),
}


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


def _topk(sae, x):
    """A TopK encoder's pre-activations and its k largest of each row: (pre, values, columns)."""
    if sae.cfg.rescale_acts_by_decoder_norm:
        raise UserError("rescale_acts_by_decoder_norm SAEs are not supported")
    pre = _pre(sae, x)
    pre += sae.b_enc
    vals, idx = topk_entries(pre, int(sae.cfg.k))
    return pre, vals, idx


def _encode_topk(sae, x):
    pre, vals, idx = _topk(sae, x)
    if pre.requires_grad:
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    # the pre-activations' own matrix holds the code: on the CPU each fresh matrix this size is mapped
    # page by page, which costs over half as much as the encoder's product
    return pre.zero_().scatter_(-1, idx, torch.relu(vals))


def _entries_topk(sae, x):
    """The positive entries of a TopK code, (rows, cols, values) by row then column, without its matrix."""
    pre, vals, idx = _topk(sae, x)  # the columns of each row ascending
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(idx.shape[1])
    cols, vals = idx.reshape(-1), vals.reshape(-1)
    on = vals > 0
    return rows[on], cols[on], vals[on]


def _encode_gated(sae, x):
    pre = _pre(sae, x)
    active = (pre + sae.b_gate) > 0
    return active * torch.relu(pre * sae.r_mag.exp() + sae.b_mag)


# the SAELens v6 forms this package reads and writes (train/architectures/base.py: a class's
# `inference_form` names one of them, or brings a form of its own)
INFERENCE_FORMS: dict[str, InferenceForm] = {}
ENTRY_POINT_GROUP = "actcache.inference_forms"
# the encoders of the forms below, for architectures that register forms of their own
encode_relu, encode_jumprelu, encode_topk = _encode_standard, _encode_jumprelu, _encode_topk
# encoders whose positive entries can be had without the dense code (SAE.encode_entries)
_ENTRIES = {_encode_topk: _entries_topk}
# weight names by form (a live view of INFERENCE_FORMS)
WEIGHT_KEYS: dict[str, tuple[str, ...]] = {}


def register_inference_form(form: InferenceForm) -> None:
    known = INFERENCE_FORMS.get(form.name)
    if known is not None and known != form:
        raise ValueError(f"the SAELens form {form.name!r} is already registered differently")
    INFERENCE_FORMS[form.name] = form
    WEIGHT_KEYS[form.name] = form.weight_keys


_BASIC = ("W_enc", "b_enc", "W_dec", "b_dec")
for _form in (
        InferenceForm("standard", _BASIC, _encode_standard),
        InferenceForm("topk", _BASIC, _encode_topk, needs_k=True),
        InferenceForm("jumprelu", _BASIC + ("threshold",), _encode_jumprelu),
        InferenceForm("gated", ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"), _encode_gated),
        # the transcoders (train/architectures/transcoder.py, jumprelu_transcoder.py, topk_transcoder.py)
        InferenceForm("transcoder", _BASIC, _encode_standard, "SAELens Transcoder"),
        InferenceForm("skip_transcoder", _BASIC + ("W_skip",), _encode_standard, "SAELens SkipTranscoder"),
        InferenceForm("jumprelu_transcoder", _BASIC + ("threshold",), _encode_jumprelu,
                      "SAELens JumpReLUTranscoder"),
        InferenceForm("jumprelu_skip_transcoder", _BASIC + ("threshold", "W_skip"), _encode_jumprelu,
                      "SAELens JumpReLUSkipTranscoder"),
        # SAELens 6.54 has no TopK transcoder class; one as wide as its input is exported as SAELens's topk
        InferenceForm("topk_transcoder", _BASIC, _encode_topk,
                      "a TopK transcoder whose output is not as wide as its input (no SAELens class)", needs_k=True),
):
    register_inference_form(_form)


def inference_form(name: str) -> InferenceForm | None:
    """The form an exported folder's cfg.json names: declared here, registered in this process, or
    brought by another installed package through the entry point group ENTRY_POINT_GROUP."""
    form = INFERENCE_FORMS.get(name)
    if form is not None:
        return form
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                loaded = ep.load()
            except Exception as e:  # noqa: BLE001  (another package's import failing)
                raise UserError(f"the SAE form {name!r} comes from {ep.value}, which cannot be imported "
                                f"({first_line(e)})") from None
            if not isinstance(loaded, InferenceForm) or loaded.name != name:
                raise UserError(f"the entry point {ep.value} of {ENTRY_POINT_GROUP} is not the InferenceForm {name!r}")
            register_inference_form(loaded)
            return loaded
    return None


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
    def from_dict(cls, d: dict[str, Any], where: str = CFG_FILENAME) -> "SAEConfig":
        """The config of a cfg.json dict, every key this package reads checked for presence and type
        (a UserError line starting with `where` otherwise); keys it does not read are left aside."""
        if not isinstance(d, dict):
            raise UserError(f"{where} holds {type(d).__name__}, not an object of SAE settings")
        for key in CFG_REQUIRED:
            if key not in d:
                raise UserError(f"{where} lacks the key {key!r} (it needs {', '.join(CFG_REQUIRED)})")
        kw: dict[str, Any] = {}
        for key, (kinds, text) in CFG_TYPES.items():
            if key not in d or (d[key] is None and key not in CFG_REQUIRED):
                continue
            v = d[key]
            if not _is_kind(v, kinds):
                raise UserError(f"{where}: {key} must be {text}, not {v!r}")
            kw[key] = v
        for key in ("d_in", "d_sae", "d_out", "k"):
            if kw.get(key) is not None and kw[key] < 1:
                raise UserError(f"{where}: {key} must be at least 1, not {kw[key]}")
        if "dtype" in kw:
            kw["dtype"] = _dtype_name(kw["dtype"], f"{where}: dtype")
        kw["metadata"] = Metadata(d.get("metadata") or {})
        return cls(**kw)


# cfg.json: the keys a folder must have, and the type of each key this package reads
CFG_REQUIRED = ("architecture", "d_in", "d_sae")
CFG_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "architecture": ((str,), "a string"), "d_in": ((int,), "a whole number"), "d_sae": ((int,), "a whole number"),
    "dtype": ((str,), "a string such as \"float32\""), "device": ((str,), "a string"),
    "apply_b_dec_to_input": ((bool,), "true or false"), "normalize_activations": ((str,), "a string"),
    "reshape_activations": ((str,), "a string"), "k": ((int,), "a whole number"),
    "rescale_acts_by_decoder_norm": ((bool,), "true or false"), "d_out": ((int,), "a whole number"),
    "metadata": ((dict,), "an object"),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _is_kind(v: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(v, bool) and bool not in kinds:
        return False
    return isinstance(v, kinds)


def _dtype_name(name: str, where: str) -> str:
    short = name[len("torch."):] if name.startswith("torch.") else name
    if short not in FLOAT_DTYPES:
        raise UserError(f"{where} {name!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return short


class SAE(nn.Module):
    """An exported sparse autoencoder: f = encode(x), x_hat = decode(f), all on raw activations."""

    def __init__(self, cfg: SAEConfig, weights: dict[str, torch.Tensor], where: str = "the SAE"):
        super().__init__()
        form = inference_form(cfg.architecture)
        if form is None:
            raise UserError(f"{where}: architecture {cfg.architecture!r} cannot be loaded; known: "
                            f"{', '.join(INFERENCE_FORMS)}")
        if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
            raise UserError(f"{where}: only SAEs with normalize_activations and reshape_activations = 'none' are "
                            "supported")
        check_weights(cfg, weights, where, form)
        self.cfg = cfg
        dtype = getattr(torch, _dtype_name(cfg.dtype, f"{where}: dtype"))
        for key in form.weight_keys:
            self.register_parameter(key, nn.Parameter(weights[key].to(dtype=dtype, device=cfg.device),
                                                      requires_grad=False))
        self.form = form
        if "b_enc" not in self.form.weight_keys:
            self.b_enc = None

    # ------------------------------------------------------------------ the maps
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in]."""
        return self.form.encode(self, x)

    def encode_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positive latent activations of activations x [B, d_in] as entries (rows, latents, values),
        ordered by row then latent: what `(f > 0).nonzero()` and f at those places give for f = encode(x).
        A TopK form's entries come from its selection directly, without the [B, d_sae] matrix."""
        entries = _ENTRIES.get(self.form.encode)
        if entries is not None and x.dim() == 2:
            return entries(self, x)
        f = self.encode(x)
        r, c = (f > 0).nonzero(as_tuple=True)
        return r, c, f[r, c]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction [..., d_out] of latent activations f [..., d_sae] (d_out = d_in for an SAE;
        a skip transcoder's skip term is added by forward, as in SAELens)."""
        return f @ self.W_dec + self.b_dec

    def forward_with_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [..., d_out], latent activations [..., d_sae]) of input activations x."""
        f = self.encode(x)
        return self._with_skip(self.decode(f), x), f

    @property
    def sparse_code(self) -> bool:
        """Whether encode_entries gets the code's entries without its dense matrix (the TopK forms)."""
        return self.form.encode in _ENTRIES

    def forward_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(output [B, d_out], the code's positive entries (rows, latents, values)) of activations x [B, d_in]:
        forward_with_activations without the dense code, the output summed over the active latents'
        decoder rows (the same up to float rounding; for sparse codes, the TopK forms)."""
        rows, cols, vals = self.encode_entries(x)
        offsets = torch.searchsorted(rows, torch.arange(x.shape[0], device=rows.device))
        out = torch.nn.functional.embedding_bag(cols, self.W_dec, offsets, mode="sum",
                                                per_sample_weights=vals.to(self.W_dec.dtype)) + self.b_dec
        return self._with_skip(out, x), (rows, cols, vals)

    def _with_skip(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if "W_skip" in self.form.weight_keys:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.t()
        return out

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
        """Load a folder written by save_model (or by SAELens, for the architectures above), checked
        first: cfg.json's keys and types, every tensor's presence, shape and finiteness, the file whole.
        Anything wrong is one UserError line naming the folder, the file and the tensor."""
        path = Path(path)
        cfg_path, w_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
        if not path.is_dir():
            raise UserError(f"{path} is not an SAE folder (no such folder)")
        if not cfg_path.is_file() or not w_path.is_file():
            raise UserError(f"{path} is not an SAE folder (it needs {CFG_FILENAME} and {WEIGHTS_FILENAME})")
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{cfg_path} cannot be read as JSON ({first_line(e, 120)})") from None
        cfg = SAEConfig.from_dict(raw, str(cfg_path))
        cfg.device = device
        if dtype is not None:
            cfg.dtype = _dtype_name(dtype, "dtype")
        form = inference_form(cfg.architecture)
        if form is None:
            raise UserError(f"{cfg_path}: architecture {cfg.architecture!r} cannot be loaded; known: "
                            f"{', '.join(INFERENCE_FORMS)}")
        return cls(cfg, read_weights(w_path), where=str(w_path))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or damaged file is one UserError line."""
    try:
        return load_file(str(path))
    except OSError as e:
        raise UserError(f"{path} cannot be read ({first_line(e, 120)})") from None
    except Exception as e:  # noqa: BLE001  (safetensors' SafetensorError: a truncated or damaged file)
        raise UserError(f"{path} is damaged or truncated ({first_line(e, 120)}); export or copy the SAE "
                        "again") from None


def expected_shapes(cfg: SAEConfig, form: InferenceForm) -> dict[str, tuple[int, ...]]:
    """The shape cfg implies for each weight of the form that WEIGHT_SHAPES knows."""
    sizes = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "d_out": cfg.d_out if cfg.d_out is not None else cfg.d_in}
    return {k: tuple(int(sizes[n]) for n in WEIGHT_SHAPES[k]) for k in form.weight_keys if k in WEIGHT_SHAPES}


def check_weights(cfg: SAEConfig, weights: dict[str, torch.Tensor], where: str,
                  form: InferenceForm | None = None, finite: bool = True) -> None:
    """Every tensor the form needs is there, floating point, of the shape cfg implies, and (finite)
    holds no NaN or infinity; otherwise one UserError line naming `where` and the tensor."""
    form = form or inference_form(cfg.architecture)
    if form is None:
        raise UserError(f"{where}: architecture {cfg.architecture!r} cannot be loaded")
    missing = [k for k in form.weight_keys if k not in weights]
    if missing:
        raise UserError(f"{where} lacks the tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)} that "
                        f"architecture {cfg.architecture!r} needs")
    if form.needs_k:
        if cfg.k is None:
            raise UserError(f"{where}: architecture {cfg.architecture!r} needs k in cfg.json")
        if cfg.k > cfg.d_sae:
            raise UserError(f"{where}: k = {cfg.k} is more than d_sae = {cfg.d_sae} (cfg.json)")
    shapes = expected_shapes(cfg, form)
    for key in form.weight_keys:
        t = weights[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise UserError(f"{where}: tensor {key} is {getattr(t, 'dtype', type(t).__name__)}, not floating point")
        want = shapes.get(key)
        if want is not None and tuple(t.shape) != want:
            sizes = ", ".join(f"{n} {v}" for n, v in zip(WEIGHT_SHAPES[key], want))
            raise UserError(f"{where}: tensor {key} has shape {list(t.shape)} but cfg.json ({sizes}) implies "
                            f"{list(want)}; the folder's files do not belong together")
        if finite:
            ok = torch.isfinite(t)
            if not bool(ok.all()):
                bad = int((~ok).sum())
                raise UserError(f"{where}: tensor {key} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                                "(NaN or infinity); the SAE diverged or the file was damaged: retrain or re-export it")
