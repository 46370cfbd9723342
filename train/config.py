"""The sweep configuration: a TOML file naming the hook(s), the data budget and the SAEs to train.

Every key is described once: the sweep-level keys by the fields of `SweepConfig` (each an `option`
of common/options.py: kind, default, valid range, unit, help, old names), the SAE keys by the
registered architectures (train/architectures/, as `Option`s too). Parsing, validation, the error
messages and the key tables of docs/options.md (`python -m actcache.options_reference --write`) and
docs/sweep-config.md (`python -m actcache.train.architectures --readme docs/sweep-config.md`) all
come from there. An old key name (`batch_size`, now `batch_tokens`) works with a deprecation line.

[defaults] holds SAE keys that every SAE starts from (keys an architecture does not take are
skipped for it); [[sae]] tables add SAEs one by one; [grid] holds lists whose product adds SAEs,
each on top of [defaults] and named automatically, e.g. "batchtopk-k16-x8".

Every SAE reads its own `hook` (the top-level `hook` by default); transcoders also name the
`hook_out` they reconstruct. One loader reads every hook the SAEs need, each chunk once.

Every value is checked when the config is read, before the store is opened: a value that cannot be
right is a UserError naming the key; a legal but surprising one is a warning (`SweepConfig.warnings`,
also logged), one line each."""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import UserError
from ..common.manifest import special_token_ids
from ..common.options import (Option, configurable, did_you_mean, markdown_table, old_names, option, options_of,
                              warn_deprecated)
from ..common.progress import log
from .architectures import ARCHITECTURES, COMMON_KEYS, SAEConfig, all_sae_keys, get_architecture
from ..common.outputs import RUN_FILES
from .loader import training_chunks

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SAEConfig", "SweepConfig", "load_config", "parse_config", "resolve", "sweep_keys", "readme_tables"]

# an SAE's folder sits beside the run's own files: its name must not be one of them (compared
# case-insensitively, as macOS and Windows file systems do), nor start like one
_RUN_PREFIXES = ("checkpoint", "summary", "run.", "frontier", "rank-")
TABLES = ("defaults", "sae", "grid")
_SHORT = {"k": "k", "expansion": "x", "d_sae": "d", "l1_coefficient": "l1_", "l0_coefficient": "l0_", "lr": "lr",
          "hook": "", "hook_out": "to-"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@configurable
@dataclass
class SweepConfig:
    """A whole sweep: the data stream every SAE shares, and the SAEs."""

    tokens: int = option(help='training tokens (an integer, or a string such as "50M")', kind="count",
                         unit="tokens", low=1)
    hook: str | None = option(None, 'the store\'s hook to train on, e.g. "blocks.8.hook_resid_pre"; the default '
                              "of every SAE's `hook`", kind="str", default_text="none: then every SAE names its `hook`")
    saes: list[SAEConfig] = field(default_factory=list)
    batch_tokens: int = option(4096, "tokens per step; every SAE steps on the same batch", kind="count",
                               unit="tokens", low=1, old_names=("batch_size",))
    seed: int = option(0, "data order and SAE initialisation are pure functions of it", low=0)
    checkpoint_every_tokens: int | None = option(None, "tokens between checkpoints", kind="count", unit="tokens",
                                                 low=1, default_text="a tenth of `tokens`")
    log_every_steps: int = option(100, "steps between lines of metrics.jsonl", unit="steps", low=1)
    repeat_epochs: bool = option(False, "allow more training tokens than the store holds (the data repeats, "
                                 "reshuffled); `actcache train --repeat-epochs` sets it too",
                                 old_names=("allow_repeat",))
    window_chunks: int = option(8, "chunks fetched, decoded and shuffled together (the shuffle window)",
                                unit="chunks", low=1)
    loader_threads: int = option(4, "threads that fetch and decode chunks", unit="threads", low=1)
    skip_special_tokens: bool = option(True, "leave out positions whose token is the BOS, EOS or pad token "
                                       "(as SAELens does); the exported cfg.json records it")
    normalize: bool = option(True, "scale activations by one constant so that E‖x‖² = d_in (from the store's "
                             "statistics); folded into the exported weights")
    dead_window_tokens: int = option(10_000_000, "a latent that has not fired for this many tokens counts "
                                     "as dead", kind="count", unit="tokens", low=1)
    eval_tokens: int = option(65536, "tokens for the final evaluation of every SAE (L0, FVU, feature "
                              "density), and for calibrating BatchTopK thresholds", kind="count", unit="tokens", low=1)
    d_in: int | None = option(None, "checked against the width of the top-level `hook` in the store", kind="int",
                              low=1, default_text="from the store")
    held_out: list[int] | None = option(None, '"START:STOP": sequences of the store that training never reads '
                                        "(for stores without their own held-out part); the loader checks it",
                                        kind="range", unit="sequences", default_text="the store's own held-out part")
    warnings: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def hooks(self) -> list[str]:
        """Every hook the SAEs read or reconstruct, in the order they are first named."""
        return list(dict.fromkeys(h for s in self.saes for h in (s.hook, s.hook_out) if h))

    @property
    def n_steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def checkpoint_every_steps(self) -> int:
        every = self.checkpoint_every_tokens or max(self.tokens // 10, 1)
        return max(1, every // self.batch_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in sweep_keys()}
        d["saes"] = [s.to_dict() for s in self.saes]
        return d


def sweep_keys() -> dict[str, Option]:
    """The sweep-level keys, in the order of SweepConfig's fields."""
    return options_of(SweepConfig)


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


def _unknown_sae_key(key: str, where: str) -> UserError:
    known = all_sae_keys()
    hint = did_you_mean(key, known)
    if not hint and key in sweep_keys():
        hint = f"; {key!r} is a top-level key: move it above the tables"
    return UserError(f"unknown SAE key {key!r} in {where}{hint or '; accepted keys: ' + ', '.join(known)}")


def parse_config(raw: dict[str, Any]) -> SweepConfig:
    """Check and expand a parsed TOML document: defaults, [[sae]] entries and the [grid] product."""
    top_keys = sweep_keys()
    raw = dict(raw)
    for old, new in old_names(top_keys.values()).items():
        if old in raw:
            warn_deprecated(f"the config key {old!r}", repr(new))
            if new in raw:
                raise UserError(f"the config gives both {old!r} and {new!r}; keep {new!r}")
            raw[new] = raw.pop(old)
    for k in raw:
        if k not in top_keys and k not in TABLES:
            hint = did_you_mean(k, list(top_keys) + list(TABLES))
            if not hint and k in all_sae_keys():
                hint = f"; {k!r} is an SAE key: put it in [defaults], an [[sae]] table or [grid]"
            raise UserError(f"unknown config key {k!r}{hint or '; the accepted top-level keys are: ' + ', '.join(list(top_keys) + list(TABLES))}")
    if "tokens" not in raw:
        raise UserError("the config has no 'tokens'; add e.g. tokens = 50_000_000")
    top = {k: top_keys[k].check(v, "the config") for k, v in raw.items() if k in top_keys}

    known = all_sae_keys()
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError("[defaults] must be a table of SAE keys")
    for k, v in defaults.items():
        if k == "name":
            raise UserError("[defaults] cannot set 'name': every SAE needs its own")
        if k not in known:
            raise _unknown_sae_key(k, "[defaults]")
        known[k].check(v, "[defaults]")
    if "architecture" in defaults:
        _check_architecture(defaults["architecture"], "[defaults]")

    entries: list[tuple[dict[str, Any], set[str]]] = []
    sae_list = raw.get("sae", [])
    if not isinstance(sae_list, list) or not all(isinstance(e, dict) for e in sae_list):
        raise UserError("[[sae]] entries must be an array of tables (write [[sae]], not [sae])")
    for i, entry in enumerate(sae_list):
        where = f"[[sae]] {entry['name']!r}" if isinstance(entry.get("name"), str) else f"[[sae]] number {i + 1}"
        for k in entry:
            if k not in known:
                raise _unknown_sae_key(k, where)
        if "name" not in entry:
            raise UserError(f"[[sae]] number {i + 1} has no name; add name = \"...\"")
        known["name"].check(entry["name"], where)
        entries.append((dict(entry), set(entry)))
    grid = raw.get("grid")
    if grid is not None and not isinstance(grid, dict):
        raise UserError("[grid] must be a table of lists, e.g. k = [16, 32]")
    if grid:
        if "name" in grid:
            raise UserError("[grid] cannot list names; grid SAEs are named automatically")
        for k in grid:
            if k not in known:
                raise _unknown_sae_key(k, "[grid]")
        keys = list(grid)
        values = [v if isinstance(v, list) and k != "matryoshka_widths" or
                  (k == "matryoshka_widths" and v and isinstance(v[0], list)) else [v] for k, v in grid.items()]
        for k, vs in zip(keys, values):
            if not vs:
                raise UserError(f"[grid] {k} is an empty list; give at least one value")
        for combo in itertools.product(*values):
            entry = dict(zip(keys, combo))
            arch = entry.get("architecture", defaults.get("architecture"))
            tags = [_tag(k, v) for k, v in entry.items() if k != "architecture"]
            entry["name"] = "-".join([str(arch)] + tags)
            entries.append((entry, set(entry) - {"name"}))
    if not entries:
        raise UserError("the config names no SAE: add [[sae]] tables or a [grid]")

    saes = [_make_sae(entry, explicit, defaults, top.get("hook")) for entry, explicit in entries]
    names = [s.name for s in saes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"two SAEs are named {dup!r}; give each SAE a different name")

    cfg = SweepConfig(saes=saes, **top)
    if cfg.tokens < cfg.batch_tokens:
        raise UserError(f"tokens ({cfg.tokens}) must be at least one batch (batch_tokens = {cfg.batch_tokens})")
    if cfg.checkpoint_every_tokens is not None and cfg.checkpoint_every_tokens >= cfg.tokens:
        cfg.warnings.append(f"checkpoint_every_tokens = {cfg.checkpoint_every_tokens:,} is not less than tokens = "
                            f"{cfg.tokens:,}: the only checkpoint is the final one")
    if cfg.eval_tokens < cfg.batch_tokens and cfg.eval_tokens < 4096:
        cfg.warnings.append(f"eval_tokens = {cfg.eval_tokens:,} is small: the final L0 and FVU, and BatchTopK "
                            "thresholds, rest on few tokens")
    return cfg


def _check_architecture(arch: Any, where: str) -> str:
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UserError(f"{where}: unknown architecture {arch!r}{did_you_mean(arch, ARCHITECTURES)}; "
                        f"choose one of: {', '.join(ARCHITECTURES)}")
    return arch


def _tag(key: str, value: Any) -> str:
    if isinstance(value, list):
        text = "_".join(str(v) for v in value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"{_SHORT.get(key, key)}{text}"


def _make_sae(entry: dict[str, Any], explicit: set[str], defaults: dict[str, Any], hook: str | None) -> SAEConfig:
    name = str(entry["name"])
    if not _NAME_OK.match(name):
        raise UserError(f"SAE name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    low = name.lower()
    if low in RUN_FILES or low.startswith(_RUN_PREFIXES):
        raise UserError(f"SAE name {name!r} would collide with the run's own files ({', '.join(RUN_FILES)}); "
                        "choose another name")
    arch_name = entry.get("architecture", defaults.get("architecture"))
    if arch_name is None:
        raise UserError(f"SAE {name!r} has no architecture; add architecture = \"...\", one of: "
                        f"{', '.join(ARCHITECTURES)}")
    arch = get_architecture(_check_architecture(arch_name, f"SAE {name!r}"))
    keys = {k.name: k for k in arch.all_keys()}
    for k in explicit:
        if k not in keys:
            raise UserError(f"SAE {name!r}: architecture {arch_name!r} does not take {k!r}; it takes: "
                            f"{', '.join(sorted(set(keys) - {'name'}))}")
    values: dict[str, Any] = {k: v for k, v in defaults.items() if k in keys}
    values.update(entry)
    values["architecture"] = arch_name
    if values.get("hook") is None:
        if hook is None:
            raise UserError(f"SAE {name!r} names no hook; add hook = \"blocks.8.hook_resid_pre\" at the top of "
                            "the config (every SAE's default) or in the SAE's table")
        values["hook"] = hook
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
    for k, spec in keys.items():
        if values.get(k) is not None:
            values[k] = spec.check(values[k], f"SAE {name!r}")
        elif spec.required:
            raise UserError(f"SAE {name!r}: architecture {arch_name!r} needs {k} ({spec.help})")
    if arch.transcoder and values.get("hook_out") == values["hook"]:
        raise UserError(f"SAE {name!r}: hook_out is {values['hook']!r}, the hook it reads; a transcoder reconstructs "
                        "another hook of the same pass (e.g. hook = blocks.8.ln2.hook_normalized, hook_out = "
                        "blocks.8.hook_mlp_out); to reconstruct the hook itself, use an SAE architecture")
    return SAEConfig(**values)


# ------------------------------------------------------------------------- against the store
def resolve(cfg: SweepConfig, store) -> SweepConfig:
    """Check the config against a store and fill in d_in, d_sae and the step-based defaults (each
    architecture resolves its own keys). Warnings are logged and added to cfg.warnings."""
    m = store.manifest
    for s in cfg.saes:
        for key in ("hook", "hook_out"):
            h = getattr(s, key)
            if h is not None and h not in m.hook_names:
                where = "hook" if cfg.hook == h and key == "hook" else f"SAE {s.name!r}: {key}"
                raise UserError(f"{where} {h!r} is not in the store {store.url}; it has: {', '.join(m.hook_names)}"
                                f"{did_you_mean(h, m.hook_names)}")
    if cfg.hook is not None:
        if cfg.hook not in m.hook_names:
            raise UserError(f"hook {cfg.hook!r} is not in the store {store.url}; it has: {', '.join(m.hook_names)}"
                            f"{did_you_mean(cfg.hook, m.hook_names)}")
        d_in = m.hook(cfg.hook).d
        if cfg.d_in is not None and cfg.d_in != d_in:
            raise UserError(f"the config says d_in = {cfg.d_in} but hook {cfg.hook!r} in the store has d = {d_in}; "
                            "remove d_in or pick the matching hook")
        cfg.d_in = d_in
    elif cfg.d_in is not None:
        raise UserError(f"the config says d_in = {cfg.d_in} but names no top-level hook to check it against; "
                        "remove d_in")
    if store.n_committed == 0:
        raise UserError(f"the store {store.url} holds no committed chunk yet; finish the harvest first")
    chunks = training_chunks(store, cfg.held_out)
    if not chunks:
        raise UserError(f"the store {store.url} has no committed chunk outside the held-out part; harvest more, "
                        "or hold out less")
    available = sum(b - a for a, b in map(store.chunk_sequence_range, chunks)) * m.context_size
    repeat = cfg.repeat_epochs
    if cfg.tokens > available and not repeat:
        held = " outside its held-out part" if available < store.n_committed_tokens else ""
        raise UserError(f"the config asks for {cfg.tokens:,} training tokens but the store holds {available:,}{held}; "
                        "lower tokens, or allow repeated epochs with repeat_epochs = true or --repeat-epochs")
    if cfg.skip_special_tokens and not repeat:
        usable = _usable_tokens(store, chunks, cfg.tokens, available)
        if cfg.tokens > usable:
            # asking for the whole store is common: the few skipped positions are made up by starting
            # a second (reshuffled) epoch, and the run says so
            cfg.repeat_epochs = True
            cfg.warnings.append(f"the store holds {usable:,} training tokens besides its BOS/EOS/pad tokens "
                                f"(skip_special_tokens = true), fewer than the {cfg.tokens:,} asked for; the last "
                                f"{cfg.tokens - usable:,} come from a second, reshuffled pass")
    for s in cfg.saes:
        d_in, d_out = m.hook(s.hook).d, m.hook(s.hook_out or s.hook).d
        cfg.warnings.extend(get_architecture(s.architecture).resolve(s, d_in, d_out, cfg.n_steps))
    for w in cfg.warnings:
        log.warning(f"warning: {w}")
    return cfg


def _usable_tokens(store, chunks: list[int], wanted: int, total: int) -> int:
    """Training tokens (in `chunks`) that are not BOS/EOS/pad: exact where `wanted` comes near the total
    (the token ids of those chunks are read then), otherwise an estimate from the first that is enough to say yes."""
    import numpy as np

    tok = store.manifest.tokenizer
    special = special_token_ids(tok)
    if not special:
        return total
    share = float(np.isin(store.read_tokens(chunks[0]), special).mean())
    if wanted <= 0.9 * total * (1 - share):
        return total
    return sum(int((~np.isin(store.read_tokens(j), special)).sum()) for j in chunks)




# ------------------------------------------------------------------------- the reference tables
def readme_tables() -> str:
    """The markdown tables of every sweep key and every SAE key (docs/options.md and docs/sweep-config.md embed them)."""
    lines = ["Top-level keys (a count is an integer or a string such as `\"50M\"`):", "",
             markdown_table(sweep_keys().values(), cli=False), "",
             "SAE keys (in `[defaults]`, `[[sae]]` or `[grid]`), with the architectures that take them:", "",
             "| key | architectures | default | unit | valid | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    users: dict[str, list[str]] = {}
    specs: dict[str, Option] = {}
    for name, cls in ARCHITECTURES.items():
        for k in cls.all_keys():
            users.setdefault(k.name, []).append(name)
            specs.setdefault(k.name, k)
    common = {k.name for k in COMMON_KEYS}
    for key, k in specs.items():
        archs = "all" if key in common else ", ".join(f"`{a}`" for a in users[key])
        lines.append(f"| `{key}` | {archs} | {k.default_for_docs()} | {k.unit or ''} | {k.valid_text()} | {k.help} |")
    lines += ["", "Architectures:", "", "| architecture | exported to SAELens as | takes k | AuxK | transcoder | what it is |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, cls in ARCHITECTURES.items():
        kind = "with skip" if cls.skip else "yes" if cls.transcoder else "no"
        lines.append(f"| `{name}` | `{cls.saelens_architecture}` | {'yes' if cls.takes_k else 'no'} | "
                     f"{'yes' if cls.uses_auxk else 'no'} | {kind} | {cls.help} |")
    return "\n".join(lines)


README_BEGIN = "<!-- sweep keys: generated by `python -m actcache.train.architectures --readme docs/sweep-config.md` -->"
README_END = "<!-- end of sweep keys -->"


def readme_with_tables(text: str) -> str:
    """The text of docs/sweep-config.md with its generated block replaced by readme_tables()."""
    start, end = text.index(README_BEGIN), text.index(README_END)
    return text[:start] + README_BEGIN + "\n" + readme_tables() + "\n" + text[end:]
