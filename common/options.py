"""Options: one description of each option, from which the command line, the config-file keys, the
validation and the reference tables (docs/options.md) all come.

A config is a dataclass whose fields are made with `option(...)`: the field's name is the option's
name (the TOML key, the Python keyword, and, dashed, the command-line flag), and its `Option` says
the rest: the kind of value, its unit, the valid range, the help text, and the old names it still
answers to for one release (each use of one prints a one-line deprecation warning on stderr).

    @configurable
    @dataclass
    class EvalOptions:
        batch_size: int = option(8, "Token windows per forward pass.", unit="sequences", low=1)

    @command_options(EvalOptions)        # the click options, generated
    def eval_command(**given): opts = EvalOptions(**from_click(EvalOptions, given))

    from_mapping(SweepConfig, toml_dict)  # the same checks for a config file; unknown keys are errors
    markdown_table(EvalOptions)          # the reference table

A number whose meaning depends on a unit carries the unit in its name where two readings are
possible (`batch_tokens` of a sweep against the `batch_size` in sequences of a forward pass). A range
of a store's sequences is written one way everywhere: "START:STOP" (`parse_range`).

The command-line side is a short module over click (already the command line's library) rather than
a dataclass-to-argparse library: the commands are one click group with lazily loaded subcommands,
and the same `Option.check` serves click, TOML and Python callers alike."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import click

from .errors import UserError
from .progress import log, parse_count

KIND_TEXT = {"float": "number", "int": "integer", "count": "count", "bool": "bool", "str": "string",
             "int_list": "list of integers", "str_list": "strings", "choice": "one of", "range": "START:STOP",
             "size": "percentage or count"}
_warned: set[str] = set()


@dataclass(frozen=True)
class Option:
    """One option: its kind of value, default, help, valid range and unit.

    kind: "float", "int", "count" (an integer or a string such as "50M"), "bool", "str", "int_list",
    "str_list" (repeatable on the command line), "choice" (one of `choices`) or "range" ("START:STOP"
    in sequences of a store). low/high bound the value (inclusive unless low_open/high_open). default
    None with default_text means the default is computed later (default_text says how). unit: what a
    number counts (tokens, sequences, steps, chunks...). old_names: earlier names, accepted with a
    deprecation warning. flag: the command-line name when it is not --name-with-dashes; cli=False
    keeps the option off the command line. secret: never shown in repr() or logs."""

    name: str
    kind: str
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    default_text: str | None = None
    required: bool = False
    unit: str | None = None
    choices: tuple[str, ...] = ()
    old_names: tuple[str, ...] = ()
    flag: str | None = None
    cli: bool = True
    secret: bool = False
    metavar: str | None = None
    hidden: bool = False  # on the command line but out of --help (an alias kept for scripts)

    # ------------------------------------------------------------------ checking a value
    def check(self, value: Any, where: str = "", label: str | None = None) -> Any:
        """The value, normalised (counts parsed, ranges as [start, stop]), or a UserError naming the
        option (as `label`, e.g. its flag, or its name) and what it accepts. `where` prefixes the
        message (e.g. "[defaults]")."""
        kind = self.kind
        name = label or self.name
        at = f"{where}: " if where else ""
        bad = f"{at}{name} must be {self.type_text()}, not {value!r}"
        if kind == "bool":
            if not isinstance(value, bool):
                raise UserError(bad)
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise UserError(bad)
            return value
        if kind == "size":  # a share of something ("5%") or a count of it ("20k", 0)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise UserError(bad)
            text = str(value).strip()
            try:
                ok = 0 <= float(text[:-1]) < 100 if text.endswith("%") else parse_count(text) >= 0
            except (ValueError, OverflowError):
                ok = False
            if not ok:
                raise UserError(f"{at}invalid {self.name.replace('_', '-')} size {value!r}: give a percentage below "
                                "100% (e.g. 5%), a count (e.g. 8192 or 10k), or 0 for none")
            return value
        if kind == "choice":
            if value not in self.choices:
                raise UserError(bad)
            return value
        if kind == "str_list":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                    not all(isinstance(v, str) for v in value):
                raise UserError(bad)
            return list(value)
        if kind == "range":
            if isinstance(value, (list, tuple)):  # the list form [start, stop] of earlier releases
                if not (len(value) == 2 and all(_is_int(v) for v in value)):
                    raise UserError(bad)
                text = f"{value[0]}:{value[1]}"
                warn_deprecated(f"{self.name} = {list(value)!r}", f'{self.name} = "{text}"')
                value = text
            if not isinstance(value, str):
                raise UserError(bad)
            return list(parse_range(value, f"{at}{name}"))
        if kind == "int_list":
            if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
                raise UserError(bad)
            for v in value:
                self._check_range(v, at, name)
            return list(value)
        if kind == "count":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise UserError(bad)
            try:
                value = parse_count(value)
            except (ValueError, OverflowError):
                raise UserError(bad) from None
        elif kind == "int":
            if not _is_int(value):
                raise UserError(bad)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(bad)
            if not math.isfinite(value):
                raise UserError(f"{at}{name} {value!r}: give a finite number" if name.startswith("-")
                                else f"{at}{name} must be a finite number, not {value!r}")
            value = float(value)
        else:  # pragma: no cover - a programming error in a declaration
            raise ValueError(f"unknown option kind {kind!r}")
        self._check_range(value, at, name)
        return value

    def _check_range(self, value: Any, at: str, name: str) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            if name.startswith("-"):  # a command-line flag: "--tokens 0: give a positive number of tokens"
                positive = (self.low == 1 and self.kind in ("int", "count") or self.low == 0 and self.low_open) \
                    and self.high is None
                want = f"a positive number of {self.unit}" if positive and self.unit else f"a value {self.range_text()}"
                raise UserError(f"{at}{name} {value!r}: give {want}")
            raise UserError(f"{at}{name} = {value!r} is out of range; it must be {self.range_text()}")

    # ------------------------------------------------------------------ describing it
    def type_text(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        return {"float": "a number", "int": "a whole number", "count": 'a whole number such as 50_000_000 or "50M"',
                "bool": "true or false", "str": "a string", "str_list": "a list of strings",
                "int_list": "a list of whole numbers such as [64, 256]",
                "range": 'a range of sequences "START:STOP"',
                "size": 'a percentage below 100% (e.g. "5%") or a count (e.g. 20k; 0 for none)'}[self.kind]

    def range_text(self) -> str:
        lo = None if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        hi = None if self.high is None else (f"< {self.high:g}" if self.high_open else f"<= {self.high:g}")
        if lo and hi and self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        return lo or hi or "any"

    def valid_text(self) -> str:
        """The kind and range, for the reference tables."""
        if self.kind == "choice":
            return " \\| ".join(f"`{c}`" for c in self.choices)
        r = self.range_text()
        return KIND_TEXT[self.kind] if r == "any" else f"{KIND_TEXT[self.kind]} {r}"

    def default_for_docs(self) -> str:
        if self.required:
            return "required"
        if self.default is None or self.default == () or self.default == []:
            return self.default_text or "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, float):
            return f"{self.default:g}" if self.default != 1 / 32 else "1/32"
        if isinstance(self.default, str):
            return f'"{self.default}"'
        return f"{self.default:_}" if isinstance(self.default, int) and self.default >= 10_000 else str(self.default)

    @property
    def flag_name(self) -> str:
        """The option on the command line, e.g. --context-size."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def flag_decl(self) -> str:
        """As click declares it: a switch that is on by default also has its --no- form."""
        return f"{self.flag_name}/--no-{self.flag_name[2:]}" if self.kind == "bool" and self.default is True \
            else self.flag_name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_range(text: str, what: str = "the range") -> tuple[int, int]:
    """"START:STOP" (sequences of a store, STOP excluded) as (start, stop): the one way a range of a
    store is written, in every command and config file."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = (int(p.strip().replace("_", "")) for p in parts)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a range of sequences: write START:STOP, e.g. 100:128") from None
    if a < 0 or b <= a:
        raise UserError(f"{what} {text!r} is empty or negative: write START:STOP with 0 <= START < STOP")
    return a, b


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr, once per process for each old name."""
    if old in _warned:
        return
    _warned.add(old)
    log.warning(f"warning: {old} is deprecated and will be removed in the next release; use {new}")


# ---------------------------------------------------------------------- declaring options
def option(default: Any = dataclasses.MISSING, help: str = "", kind: str | None = None, **kw: Any) -> Any:
    """A dataclass field described by an Option (its name is the field's). Without a default the
    option is required. kind defaults from the default's type (bool, int, float, str, list)."""
    if kind is None:
        kind = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int)
                else "float" if isinstance(default, float) else "str_list" if isinstance(default, (list, tuple))
                else "str")
    required = default is dataclasses.MISSING
    spec = Option("", kind, None if required else default, help, required=required, **kw)
    meta = {"option": spec}
    if required:
        return dataclasses.field(metadata=meta, repr=not spec.secret)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta, repr=not spec.secret)
    return dataclasses.field(default=default, metadata=meta, repr=not spec.secret)


def storage_options_option() -> Any:
    """The field of every command that opens a store: --storage-option KEY=VALUE (repeatable), fsspec
    options such as an S3 endpoint or profile; secret: never shown in repr() or written anywhere."""
    from .location import STORAGE_OPTION_HELP

    return option((), STORAGE_OPTION_HELP, kind="str_list", flag="--storage-option", secret=True, metavar="KEY=VALUE")


def options_of(cls: type) -> dict[str, Option]:
    """The options of a config dataclass, by name, in field order."""
    cached = cls.__dict__.get("_options_")
    if cached is not None:
        return cached
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            default = None if f.default is dataclasses.MISSING else f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            out[f.name] = dataclasses.replace(spec, name=f.name, default=spec.default if spec.required else default)
    setattr(cls, "_options_", out)
    return out


def old_names(options: Iterable[Option]) -> dict[str, str]:
    """old name -> current name."""
    return {old: o.name for o in options for old in o.old_names}


def configurable(cls: type) -> type:
    """Class decorator for a config dataclass: old names keep working as keywords and attributes
    (with a deprecation warning), an attribute that is no field is an error (a misspelt name never
    reads or writes quietly), and the class docstring lists the options."""
    opts = options_of(cls)
    renamed = old_names(opts.values())
    names = {f.name for f in dataclasses.fields(cls)}
    init = cls.__init__

    @functools.wraps(init)  # help() and IDEs still show the fields as parameters
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for old, new in renamed.items():
            if old in kwargs:
                warn_deprecated(f"{cls.__name__}({old}=...)", f"{new}=")
                if new in kwargs:
                    raise TypeError(f"{cls.__name__} got both {old} and {new}")
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in names:
            if name in renamed:
                warn_deprecated(f"{cls.__name__}.{name}", renamed[name])
                name = renamed[name]
            else:
                raise AttributeError(f"{cls.__name__} has no option {name!r}{did_you_mean(name, names)}")
        object.__setattr__(self, name, value)

    def alias(old: str, new: str) -> property:
        def get(self: Any) -> Any:
            warn_deprecated(f"{cls.__name__}.{old}", new)
            return getattr(self, new)

        def set_(self: Any, value: Any) -> None:
            setattr(self, new, value)

        return property(get, set_)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__setattr__ = __setattr__  # type: ignore[method-assign]
    for old, new in renamed.items():
        setattr(cls, old, alias(old, new))
    if cls.__doc__ is None or cls.__doc__.startswith(cls.__name__ + "("):  # dataclass's generated signature
        cls.__doc__ = ""
    cls.__doc__ = (cls.__doc__ + "\n\nOptions:\n\n" + "\n".join(
        f"{o.name} ({o.flag_name}; {o.default_for_docs()}{', ' + o.unit if o.unit else ''}): {o.help}"
        for o in opts.values())).strip()
    return cls


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------- reading a mapping (TOML)
def from_mapping(cls: type, raw: dict[str, Any], where: str = "the config", what: str = "key") -> dict[str, Any]:
    """The checked keyword arguments of cls from a mapping (a TOML table): old names are renamed with
    a warning; an unknown key is a UserError naming the nearest known one."""
    opts = options_of(cls)
    renamed = old_names(opts.values())
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in renamed:
            warn_deprecated(f"{what} {k!r}", repr(renamed[k]))
            k = renamed[k]
        if k not in opts:
            hint = did_you_mean(k, opts)
            raise UserError(f"unknown {what} {k!r} in {where}{hint or '; accepted: ' + ', '.join(opts)}")
        out[k] = opts[k].check(v, where)
    return out


def check_values(obj: Any, where: str = "") -> None:
    """Check every option value of a config dataclass instance (as Python code built it); None
    stands for "the computed default" wherever an option is not required."""
    for name, o in options_of(type(obj)).items():
        v = getattr(obj, name)
        if v is not None or o.required:
            o.check(list(v) if o.kind == "str_list" and isinstance(v, tuple) else v, where)


# ---------------------------------------------------------------------- the command line
class _Value(click.ParamType):
    """A command-line value checked by its Option; a bad one is one line (a UserError), not click's
    usage block."""

    def __init__(self, opt: Option):
        self.opt = opt
        self.name = {"count": "count", "int": "integer", "float": "float", "range": "range"}.get(opt.kind, "text")

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        o = self.opt
        if value is None or not isinstance(value, str):
            return value
        if o.kind in ("int", "float"):
            try:
                value = int(value) if o.kind == "int" else float(value)
            except ValueError:
                raise UserError(f"{o.flag_name} {value!r} is not {o.type_text()}") from None
        elif o.kind == "count":
            try:
                value = parse_count(value)
            except (ValueError, OverflowError):
                raise UserError(f"{o.flag_name} {value!r} is not a count (write e.g. 100M, 2k, 50000)") from None
        elif o.kind == "range":
            if value:
                parse_range(value, o.flag_name)
            return value
        else:
            return value
        return o.check(value, label=o.flag_name)


def click_decorators(cls: type, only: Iterable[str] | None = None) -> list[Callable]:
    """The click options of a config dataclass (those with cli=True, or the names in `only`), old
    names included as hidden options."""
    out = []
    for o in options_of(cls).values():
        if not o.cli or (only is not None and o.name not in only):
            continue
        kw: dict[str, Any] = {"help": o.help + (f" [unit: {o.unit}]" if o.unit else "")}
        if o.metavar:
            kw["metavar"] = o.metavar
        if o.hidden:
            kw["hidden"] = True
        decls = [o.flag_decl]
        if o.required:
            kw["required"] = True
        else:
            kw["default"] = list(o.default) if o.kind == "str_list" else o.default
            kw["show_default"] = not (o.default is None or o.default is False or o.default in ((), []))
        if o.kind == "bool":
            if o.default is not True:
                kw["is_flag"] = True
        elif o.kind == "str_list":
            kw["multiple"] = True
        elif o.kind == "choice":
            kw["type"] = click.Choice(list(o.choices))
        elif o.kind in ("int", "float", "count", "range"):
            kw["type"] = _Value(o)
            if o.kind == "range":  # a bare --held-out (a flag of earlier releases) means the default
                kw["is_flag"], kw["flag_value"] = False, ""
        out.append(click.option(*decls, o.name, **kw))
        for old in o.old_names:
            old_kw = {"hidden": True, "default": None, "type": kw.get("type")}
            if o.kind == "bool":
                old_kw = {"hidden": True, "is_flag": True, "default": None}
            elif o.kind == "str_list":
                old_kw["multiple"], old_kw["default"] = True, ()
            out.append(click.option("--" + old.replace("_", "-"), _old_dest(old), **old_kw))
    return out


def _old_dest(old: str) -> str:
    return f"old__{old}"


def command_options(cls: type, only: Iterable[str] | None = None) -> Callable:
    """Decorator: add the click options of `cls` to a command."""
    decorators = click_decorators(cls, only)

    def apply(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def from_click(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of `cls` from a command's keyword arguments (as click passes them), with
    values given under an old name moved to the new one (and a deprecation warning)."""
    out: dict[str, Any] = {}
    for o in options_of(cls).values():
        if o.name in given:
            out[o.name] = _listed(o, given.pop(o.name))
            if o.kind == "range" and out[o.name] == "":
                warn_deprecated(f"{o.flag_name} without START:STOP", f"no {o.flag_name} (the default) or "
                                f"{o.flag_name} START:STOP")
                out[o.name] = None
        for old in o.old_names:
            v = given.pop(_old_dest(old), None)
            if v is None or v == () or v is False:
                continue
            warn_deprecated("--" + old.replace("_", "-"), o.flag_name)
            out[o.name] = _listed(o, v)
    return out


def _listed(o: Option, v: Any) -> Any:
    """A repeated option's values as the field's own sequence type (click gives a tuple)."""
    if o.kind != "str_list":
        return v
    return tuple(v) if isinstance(o.default, tuple) else list(v)


# ---------------------------------------------------------------------- reference tables
def markdown_table(options: Iterable[Option], cli: bool = True) -> str:
    """A markdown table of options: name (flag or key), default, unit, valid values, meaning."""
    head = "option" if cli else "key"
    lines = [f"| {head} | default | unit | valid | meaning |", "| --- | --- | --- | --- | --- |"]
    for o in options:
        name = f"`{o.flag_decl}`" if cli else f"`{o.name}`"
        if o.old_names:
            olds = ", ".join(f"`{'--' + n.replace('_', '-') if cli else n}`" for n in o.old_names)
            name += f" (was {olds})"
        help_ = o.help.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {o.default_for_docs()} | {o.unit or ''} | {o.valid_text()} | {help_} |")
    return "\n".join(lines)
