"""The sweep configuration: a TOML file naming the hook, the data budget and the SAEs to train.

Top-level keys (all optional except `hook` and `tokens`):
  hook                     the store's hook to train on, e.g. "blocks.8.hook_resid_pre"
  tokens                   training tokens (an integer, or a string such as "50M")
  batch_size = 4096        tokens per step; every SAE steps on the same batch
  seed = 0                 data order and SAE initialisation are pure functions of it
  checkpoint_every_tokens  tokens between checkpoints (default: a tenth of `tokens`)
  log_every_steps = 100    steps between lines of metrics.jsonl
  repeat_epochs = false    allow more training tokens than the store holds (the data repeats, reshuffled)
  window_chunks = 8        chunks fetched, decoded and shuffled together (the shuffle window)
  loader_threads = 4       threads that fetch and decode chunks
  skip_special_tokens = false   leave out positions whose token is the BOS, EOS or pad token
  normalize = true         scale activations by one constant so that E||x||^2 = d_in (from the
                           store's statistics); folded into the exported weights
  dead_window_tokens = 10_000_000   a latent that has not fired for this many tokens counts as dead
  eval_tokens = 65536      tokens for the final evaluation of every SAE (L0, FVU, feature density)
  d_in                     optional; checked against the hook's width in the store

[defaults] holds SAE keys that every SAE starts from (keys an architecture does not take are
skipped for it); [[sae]] tables add SAEs one by one; [grid] holds lists whose product adds SAEs,
each on top of [defaults] and named automatically, e.g. "batchtopk-k16-x8".

SAE keys, for every architecture:
  name, architecture (standard | topk | batchtopk | jumprelu | gated | matryoshka_batchtopk),
  expansion = 16 (d_sae = expansion * d_in) or d_sae, lr = 2e-4, lr_warmup_steps = 0,
  lr_decay_steps (linear decay to zero over the last steps; default: the last fifth of the run),
  grad_clip = 1.0 (max gradient norm; 0 turns clipping off), adam_beta1 = 0.9, adam_beta2 = 0.999
and by architecture:
  standard:             l1_coefficient = 5.0, sparsity_warmup_steps (default: the first 5% of steps)
  gated:                l1_coefficient = 5.0, sparsity_warmup_steps
  jumprelu:             l0_coefficient = 1.0, sparsity_warmup_steps, jumprelu_bandwidth = 0.05,
                        jumprelu_init_threshold = 0.01
  topk:                 k, aux_k (default d_in // 2), aux_loss_coefficient = 1/32
  batchtopk:            k, aux_k, aux_loss_coefficient, topk_threshold_lr = 0.01
  matryoshka_batchtopk: k, aux_k, aux_loss_coefficient, topk_threshold_lr,
                        matryoshka_widths (increasing; d_sae is added as the last level)
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.progress import parse_count

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk")
COMMON_KEYS = ("name", "architecture", "expansion", "d_sae", "lr", "lr_warmup_steps", "lr_decay_steps",
               "grad_clip", "adam_beta1", "adam_beta2")
_TOPK_KEYS = ("k", "aux_k", "aux_loss_coefficient")
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "standard": ("l1_coefficient", "sparsity_warmup_steps"),
    "gated": ("l1_coefficient", "sparsity_warmup_steps"),
    "jumprelu": ("l0_coefficient", "sparsity_warmup_steps", "jumprelu_bandwidth", "jumprelu_init_threshold"),
    "topk": _TOPK_KEYS,
    "batchtopk": _TOPK_KEYS + ("topk_threshold_lr",),
    "matryoshka_batchtopk": _TOPK_KEYS + ("topk_threshold_lr", "matryoshka_widths"),
}
TOP_KEYS = ("hook", "tokens", "batch_size", "seed", "checkpoint_every_tokens", "log_every_steps", "repeat_epochs",
            "window_chunks", "loader_threads", "skip_special_tokens", "normalize", "dead_window_tokens",
            "eval_tokens", "d_in", "held_out", "defaults", "sae", "grid")
_SHORT = {"k": "k", "expansion": "x", "d_sae": "d", "l1_coefficient": "l1_", "l0_coefficient": "l0_", "lr": "lr"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SAEConfig:
    """One SAE of the sweep. Keys that do not apply to its architecture stay None."""

    name: str
    architecture: str
    expansion: float | None = 16
    d_sae: int | None = None
    lr: float = 2e-4
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    l1_coefficient: float | None = None
    l0_coefficient: float | None = None
    sparsity_warmup_steps: int | None = None
    jumprelu_bandwidth: float | None = None
    jumprelu_init_threshold: float | None = None
    k: int | None = None
    aux_k: int | None = None
    aux_loss_coefficient: float | None = None
    topk_threshold_lr: float | None = None
    matryoshka_widths: list[int] | None = None
    d_in: int | None = None  # filled from the store

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "standard": {"l1_coefficient": 5.0},
    "gated": {"l1_coefficient": 5.0},
    "jumprelu": {"l0_coefficient": 1.0, "jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.01},
    "topk": {"aux_loss_coefficient": 1 / 32},
    "batchtopk": {"aux_loss_coefficient": 1 / 32, "topk_threshold_lr": 0.01},
    "matryoshka_batchtopk": {"aux_loss_coefficient": 1 / 32, "topk_threshold_lr": 0.01},
}


@dataclass
class SweepConfig:
    """A whole sweep: the data stream every SAE shares, and the SAEs."""

    hook: str
    tokens: int
    saes: list[SAEConfig]
    batch_size: int = 4096
    seed: int = 0
    checkpoint_every_tokens: int | None = None
    log_every_steps: int = 100
    repeat_epochs: bool = False
    window_chunks: int = 8
    loader_threads: int = 4
    skip_special_tokens: bool = False
    normalize: bool = True
    dead_window_tokens: int = 10_000_000
    eval_tokens: int = 65536
    d_in: int | None = None
    held_out: list[int] | None = None  # [start_sequence, stop_sequence): never read by training (checked by the loader)

    @property
    def n_steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def checkpoint_every_steps(self) -> int:
        every = self.checkpoint_every_tokens or max(self.tokens // 10, 1)
        return max(1, every // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "saes"}
        d["saes"] = [s.to_dict() for s in self.saes]
        return d


# ------------------------------------------------------------------------- loading
def load_config(source: str | Path | dict) -> SweepConfig:
    """A SweepConfig from a TOML file path, TOML text, or an already parsed dict."""
    if isinstance(source, dict):
        raw = source
    elif isinstance(source, Path) or ("\n" not in str(source) and "=" not in str(source)):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"no config file at {path}: check the path given to --config")
        text, where = path.read_text(), str(path)
    else:
        text, where = str(source), "the config"
    if not isinstance(source, dict):
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{where} is not valid TOML: {e}") from None
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> SweepConfig:
    """Check and expand a parsed TOML document: defaults, [[sae]] entries and the [grid] product."""
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}; the accepted top-level keys are: {', '.join(TOP_KEYS)}")
    for key in ("hook", "tokens"):
        if key not in raw:
            raise UserError(f"the config has no {key!r}; add e.g. "
                            + ('hook = "blocks.8.hook_resid_pre"' if key == "hook" else "tokens = 50_000_000"))
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError("[defaults] must be a table of SAE keys")
    all_keys = set(COMMON_KEYS) | {k for ks in ARCH_KEYS.values() for k in ks}
    for k in defaults:
        if k == "name":
            raise UserError("[defaults] cannot set 'name': every SAE needs its own")
        if k not in all_keys:
            raise UserError(f"unknown SAE key {k!r} in [defaults]; accepted keys: {', '.join(sorted(all_keys))}")

    entries: list[tuple[dict[str, Any], set[str]]] = []
    sae_list = raw.get("sae", [])
    if not isinstance(sae_list, list):
        raise UserError("[[sae]] entries must be an array of tables (write [[sae]], not [sae])")
    for i, entry in enumerate(sae_list):
        if "name" not in entry:
            raise UserError(f"[[sae]] number {i + 1} has no name; add name = \"...\"")
        entries.append((dict(entry), set(entry)))
    grid = raw.get("grid")
    if grid:
        if "name" in grid:
            raise UserError("[grid] cannot list names; grid SAEs are named automatically")
        keys = list(grid)
        values = [v if isinstance(v, list) and k != "matryoshka_widths" or
                  (k == "matryoshka_widths" and v and isinstance(v[0], list)) else [v] for k, v in grid.items()]
        for combo in itertools.product(*values):
            entry = dict(zip(keys, combo))
            arch = entry.get("architecture", defaults.get("architecture"))
            tags = [_tag(k, v) for k, v in entry.items() if k != "architecture"]
            entry["name"] = "-".join([str(arch)] + tags)
            entries.append((entry, set(entry) - {"name"}))
    if not entries:
        raise UserError("the config names no SAE: add [[sae]] tables or a [grid]")

    saes = [_make_sae(entry, explicit, defaults) for entry, explicit in entries]
    names = [s.name for s in saes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"two SAEs are named {dup!r}; give each SAE a different name")

    top = {k: v for k, v in raw.items() if k not in ("defaults", "sae", "grid")}
    for key in ("tokens", "batch_size", "checkpoint_every_tokens", "dead_window_tokens", "eval_tokens"):
        if key in top:
            try:
                top[key] = parse_count(top[key])
            except ValueError:
                raise UserError(f"{key} must be a whole number such as 50_000_000 or \"50M\", not {top[key]!r}") from None
    cfg = SweepConfig(saes=saes, **top)
    if cfg.batch_size <= 0 or cfg.tokens < cfg.batch_size:
        raise UserError(f"tokens ({cfg.tokens}) must be at least one batch (batch_size = {cfg.batch_size})")
    if cfg.window_chunks < 1 or cfg.loader_threads < 1 or cfg.log_every_steps < 1:
        raise UserError("window_chunks, loader_threads and log_every_steps must be at least 1")
    return cfg


def _tag(key: str, value: Any) -> str:
    if isinstance(value, list):
        text = "_".join(str(v) for v in value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"{_SHORT.get(key, key)}{text}"


def _make_sae(entry: dict[str, Any], explicit: set[str], defaults: dict[str, Any]) -> SAEConfig:
    name = str(entry["name"])
    if not _NAME_OK.match(name):
        raise UserError(f"SAE name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    arch = entry.get("architecture", defaults.get("architecture"))
    if arch is None:
        raise UserError(f"SAE {name!r} has no architecture; choose one of: {', '.join(ARCHITECTURES)}")
    if arch not in ARCHITECTURES:
        raise UserError(f"SAE {name!r}: unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    accepted = set(COMMON_KEYS) | set(ARCH_KEYS[arch])
    for k in explicit:
        if k not in accepted:
            raise UserError(f"SAE {name!r}: architecture {arch!r} does not take {k!r}; it takes: "
                            f"{', '.join(sorted(accepted - {'name'}))}")
    values: dict[str, Any] = dict(_ARCH_DEFAULTS[arch])
    values.update({k: v for k, v in defaults.items() if k in accepted})
    values.update(entry)
    values["architecture"] = arch
    # width: an SAE's own expansion/d_sae beats [defaults]; giving both at one level is ambiguous
    for level in (explicit, set(defaults)):
        if "expansion" in level and "d_sae" in level:
            raise UserError(f"SAE {name!r}: give expansion or d_sae, not both")
        if "expansion" in level:
            values["d_sae"] = None
            break
        if "d_sae" in level:
            values["expansion"] = None
            break
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk") and values.get("k") is None:
        raise UserError(f"SAE {name!r}: architecture {arch!r} needs k (the number of active latents)")
    try:
        return SAEConfig(**values)
    except TypeError as e:
        raise UserError(f"SAE {name!r}: {e}") from None


# ------------------------------------------------------------------------- against the store
def resolve(cfg: SweepConfig, store, allow_repeat: bool = False) -> SweepConfig:
    """Check the config against a store and fill in d_in, d_sae and the step-based defaults."""
    m = store.manifest
    if cfg.hook not in m.hook_names:
        raise UserError(f"hook {cfg.hook!r} is not in the store {store.url}; it has: {', '.join(m.hook_names)}")
    d_in = m.hook(cfg.hook).d
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise UserError(f"the config says d_in = {cfg.d_in} but hook {cfg.hook!r} in the store has d = {d_in}; "
                        "remove d_in or pick the matching hook")
    cfg.d_in = d_in
    available = _committed_tokens(store)
    if available == 0:
        raise UserError(f"the store {store.url} holds no committed chunk yet; finish the harvest first")
    if cfg.tokens > available and not (cfg.repeat_epochs or allow_repeat):
        raise UserError(f"the config asks for {cfg.tokens:,} training tokens but the store holds {available:,}; "
                        "lower tokens, or allow repeated epochs with repeat_epochs = true or --allow-repeat")
    n_steps = cfg.n_steps
    for s in cfg.saes:
        s.d_in = d_in
        if s.d_sae is None:
            s.d_sae = int(round(float(s.expansion) * d_in))
        if s.d_sae < 1:
            raise UserError(f"SAE {s.name!r}: d_sae must be positive")
        if s.k is not None:
            if s.k < 1 or s.k > s.d_sae:
                raise UserError(f"SAE {s.name!r}: k = {s.k} must be between 1 and d_sae = {s.d_sae}")
        if s.aux_k is None and s.architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
            s.aux_k = max(1, min(d_in // 2, s.d_sae))
        if s.lr_decay_steps is None:
            s.lr_decay_steps = n_steps // 5
        if s.architecture in ("standard", "gated", "jumprelu") and s.sparsity_warmup_steps is None:
            s.sparsity_warmup_steps = n_steps // 20
        if s.architecture == "matryoshka_batchtopk":
            widths = [int(w) for w in (s.matryoshka_widths or [])]
            if not widths or widths[-1] != s.d_sae:
                widths.append(s.d_sae)
            if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1:
                raise UserError(f"SAE {s.name!r}: matryoshka_widths must increase and stay within d_sae = {s.d_sae}; "
                                f"got {s.matryoshka_widths}")
            s.matryoshka_widths = widths
    return cfg


def _committed_tokens(store) -> int:
    m = store.manifest
    n_seq = min(store.n_committed * m.chunk_sequences, m.n_sequences)
    return n_seq * m.context_size
