"""HarvestConfig: every option of a harvest, in one place.

Each field is an `option` (common/options.py) carrying its help text, unit and valid values;
`actcache harvest` builds its command-line options from these fields (harvest/cli.py), the class
docstring lists them, and docs/options.md shows them as a table, so the command line,
`help(HarvestConfig)`, the checks and the docs cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass

from ..common import codecs
from ..common.options import configurable, option, storage_options_option

from .data import STDLIB
from .models import DEFAULT_MODEL, DTYPES

OVERFLOW_MODES = ("error", "clamp")
DEFAULT_HELD_OUT = "5%"


@configurable
@dataclass
class HarvestConfig:
    """Everything a harvest depends on. The options of `actcache harvest` are generated from these
    fields, so both show the same names, defaults and help."""

    out: str = option(help="The store: a local path or s3://bucket/prefix.")
    hooks: list[str] = option(help="TransformerLens hook name, e.g. blocks.8.hook_resid_pre (repeat for several).",
                              kind="str_list", flag="--hook")
    model: str = option(DEFAULT_MODEL,
                        "Hub name, local HF folder, .gguf file, alias, or random:key=value,... (tests).")
    dataset: str = option(STDLIB, "Hub dataset name, local file/folder/glob (text, json, jsonl, parquet, csv), "
                                  "or 'stdlib'. A row, or a whole text file, is one document.")
    split: str = option("train", "The dataset split.")
    name: str | None = option(None, "The dataset's configuration name.")
    text_column: str = option("text", "Column with text; a pre-tokenised input_ids column is used when this one "
                                      "is absent.")
    streaming: bool = option(False, "Stream the dataset instead of downloading it whole.")
    context_size: int = option(128, "Tokens per sequence.", unit="tokens", low=2)
    tokens: int | str = option(1_000_000, "Tokens to harvest (e.g. 100M).", kind="count", unit="tokens", low=1)
    batch_size: int = option(32, "Sequences per forward pass.", unit="sequences", low=1)
    codec: str = option(codecs.DEFAULT_CODEC, "zstd[-L], lz4, blosc-zstd[-L], none.")
    seed: int = option(0, "Shuffles the dataset's documents (whole documents, never parts of them).")
    device: str | None = option(None, "cuda, cuda:1, cpu... (default: cuda when there is one).")
    dtype: str = option("float32", "The model's compute dtype (activations are stored as float16).",
                        kind="choice", choices=tuple(DTYPES))
    tokenizer: str | None = option(None, "Tokenizer (model spec or folder) for a model without one.")
    prepend_bos: bool = option(True, "Start every sequence with BOS (--no-prepend-bos: do not).")
    overflow: str = option("error", "Values beyond float16's range: stop with an error, or clamp (recorded in the "
                                    "manifest).", kind="choice", choices=OVERFLOW_MODES)
    resume: bool = option(False, "Continue an interrupted harvest with the same arguments.")
    overwrite: bool = option(False, "Replace an existing store.")
    chunk_sequences: int | None = option(None, "Sequences per chunk (default: about 16 MiB of float16 per chunk "
                                               "of the widest hook).", kind="int", unit="sequences", low=1)
    held_out: str | int = option(DEFAULT_HELD_OUT, "Whole chunks set aside at the end of the store for "
                                                   "evaluation, never trained on: a share of the store (e.g. "
                                                   "5%) or a token count (e.g. 20k); 0 holds out nothing.",
                                 kind="size", unit="tokens")
    allow_short: bool = option(False, "Accept a store shorter than --tokens when the dataset runs out (exit 0 "
                                      "instead of an error); the store is complete either way.")
    storage_options: tuple[str, ...] | list[str] = storage_options_option()
