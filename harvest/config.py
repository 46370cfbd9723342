"""HarvestConfig: every option of a harvest, in one place.

Each field carries its help text and its command-line name in its metadata; `actcache harvest`
builds its options from these fields (harvest/cli.py), and the class docstring lists them, so the
command line, `help(HarvestConfig)` and the code cannot drift apart."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..common import codecs, location

from .data import STDLIB
from .models import DEFAULT_MODEL, DTYPES

OVERFLOW_MODES = ("error", "clamp")
DEFAULT_HELD_OUT = "5%"


def option(default: Any = dataclasses.MISSING, help: str = "", cli: str | None = None, *,
           choices: tuple[str, ...] | None = None, multiple: bool = False, count: bool = False,
           secret: bool = False) -> Any:
    """A dataclass field with what the command line needs: its help, its option name (default
    --field-name; a bool defaulting to True gets --name/--no-name), the allowed choices, whether it
    repeats, and whether it is a token count written like 100M. A secret field stays out of repr()."""
    meta = {"help": help, "cli": cli, "choices": choices, "multiple": multiple, "count": count}
    if default is dataclasses.MISSING:
        return field(metadata=meta, repr=not secret)  # required
    return field(default=default, metadata=meta, repr=not secret)


@dataclass
class HarvestConfig:
    out: str = option(help="The store: a local path or s3://bucket/prefix.")
    hooks: list[str] = option(help="TransformerLens hook name, e.g. blocks.8.hook_resid_pre (repeat for several).",
                              cli="--hook", multiple=True)
    model: str = option(DEFAULT_MODEL,
                        "Hub name, local HF folder, .gguf file, alias, or random:key=value,... (tests).")
    dataset: str = option(STDLIB, "Hub dataset name, local file/folder/glob (text, json, jsonl, parquet, csv), "
                                  "or 'stdlib'. A row, or a whole text file, is one document.")
    split: str = option("train", "The dataset split.")
    name: str | None = option(None, "The dataset's configuration name.")
    text_column: str = option("text", "Column with text; a pre-tokenised input_ids column is used when this one "
                                      "is absent.")
    streaming: bool = option(False, "Stream the dataset instead of downloading it whole.")
    context_size: int = option(128, "Tokens per sequence.")
    tokens: int | str = option(1_000_000, "Tokens to harvest (e.g. 100M).", count=True)
    batch_size: int = option(32, "Sequences per forward pass.")
    codec: str = option(codecs.DEFAULT_CODEC, "zstd[-L], lz4, blosc-zstd[-L], none.")
    seed: int = option(0, "Shuffles the dataset's documents (whole documents, never parts of them).")
    device: str | None = option(None, "cuda, cuda:1, cpu... (default: cuda when there is one).")
    dtype: str = option("float32", "The model's compute dtype (activations are stored as float16).",
                        choices=tuple(DTYPES))
    tokenizer: str | None = option(None, "Tokenizer (model spec or folder) for a model without one.")
    prepend_bos: bool = option(True, "Start every sequence with BOS (--no-prepend-bos: do not).")
    overflow: str = option("error", "Values beyond float16's range: stop with an error, or clamp (recorded in the "
                                    "manifest).", choices=OVERFLOW_MODES)
    resume: bool = option(False, "Continue an interrupted harvest with the same arguments.")
    overwrite: bool = option(False, "Replace an existing store.")
    chunk_sequences: int | None = option(None, "Sequences per chunk (default: about 16 MiB of float16 per chunk "
                                               "of the widest hook).")
    held_out: str | int = option(DEFAULT_HELD_OUT, "Whole chunks set aside at the end of the store for "
                                                   "evaluation, never trained on: a fraction of the store (e.g. "
                                                   "5%) or a token count (e.g. 20k); 0 holds out nothing.")
    allow_short: bool = option(False, "Accept a store shorter than --tokens when the dataset runs out (exit 0 "
                                      "instead of an error); the store is complete either way.")
    storage_options: tuple[str, ...] | list[str] = option(
        (), location.STORAGE_OPTION_HELP,
        "--storage-option", multiple=True, secret=True)


def fields_with_options() -> list[dataclasses.Field]:
    return list(dataclasses.fields(HarvestConfig))


def cli_name(f: dataclasses.Field) -> str:
    """The option's name on the command line, e.g. --context-size."""
    return f.metadata.get("cli") or "--" + f.name.replace("_", "-")


def _docstring() -> str:
    lines = ["Everything a harvest depends on. The options of `actcache harvest` are generated from these "
             "fields, so both show the same names, defaults and help:", ""]
    for f in fields_with_options():
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        lines.append(f"{f.name} ({cli_name(f)}; {default}): {f.metadata['help']}")
    return "\n".join(lines)


HarvestConfig.__doc__ = _docstring()
