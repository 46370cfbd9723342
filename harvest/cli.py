"""`actcache harvest`: parse the options, call harvest(), print the summary."""

from __future__ import annotations

import click

from ..common import codecs
from ..common.progress import parse_count

from .api import OVERFLOW_MODES, HarvestConfig, harvest
from .data import STDLIB
from .models import DEFAULT_MODEL, DTYPES


def _count(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_count(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a count (write e.g. 100M, 2k, 50000)") from None


@click.command("harvest")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Hub name, local HF folder, .gguf file, alias, or random:key=value,... (tests).")
@click.option("--hook", "hooks", multiple=True, required=True,
              help="TransformerLens hook name, e.g. blocks.8.hook_resid_pre (repeat for several).")
@click.option("--dataset", default=STDLIB, show_default=True,
              help="Hub dataset name, local file/folder/glob (text, json, jsonl, parquet, csv), or 'stdlib'.")
@click.option("--split", default="train", show_default=True)
@click.option("--name", default=None, help="The dataset's configuration name.")
@click.option("--text-column", default="text", show_default=True,
              help="Column with text; a pre-tokenised input_ids column is used when this one is absent.")
@click.option("--streaming", is_flag=True, help="Stream the dataset instead of downloading it whole.")
@click.option("--context-size", default=128, show_default=True, type=int, help="Tokens per sequence.")
@click.option("--tokens", default="1M", show_default=True, callback=_count, help="Tokens to harvest (e.g. 100M).")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Sequences per forward pass.")
@click.option("--out", required=True, help="The store: a local path or s3://bucket/prefix.")
@click.option("--codec", default=codecs.DEFAULT_CODEC, show_default=True, help="zstd[-L], lz4, blosc-zstd[-L], none.")
@click.option("--seed", default=0, show_default=True, type=int, help="Shuffles the dataset's rows.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda when there is one).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)),
              help="The model's compute dtype (activations are stored as float16).")
@click.option("--tokenizer", default=None, help="Tokenizer (model spec or folder) for a model without one.")
@click.option("--resume", is_flag=True, help="Continue an interrupted harvest with the same arguments.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--overflow", default="error", show_default=True, type=click.Choice(OVERFLOW_MODES),
              help="Values beyond float16's range: stop with an error, or clamp (recorded in the manifest).")
@click.option("--no-prepend-bos", "no_bos", is_flag=True, help="Do not start every sequence with BOS.")
@click.option("--chunk-sequences", default=None, type=int,
              help="Sequences per chunk (default: about 16 MiB of float16 per chunk of the widest hook).")
def harvest_command(model: str, hooks: tuple[str, ...], dataset: str, split: str, name: str | None,
                    text_column: str, streaming: bool, context_size: int, tokens: int, batch_size: int, out: str,
                    codec: str, seed: int, device: str | None, dtype: str, tokenizer: str | None, resume: bool,
                    overwrite: bool, overflow: str, no_bos: bool, chunk_sequences: int | None) -> None:
    """Run a model once over a dataset; write the activations of its hooks to a compressed Zarr store."""
    cfg = HarvestConfig(
        out=out, hooks=list(hooks), model=model, dataset=dataset, split=split, name=name, text_column=text_column,
        streaming=streaming, context_size=context_size, tokens=tokens, batch_size=batch_size, codec=codec,
        seed=seed, device=device, dtype=dtype, tokenizer=tokenizer, prepend_bos=not no_bos, overflow=overflow,
        resume=resume, overwrite=overwrite, chunk_sequences=chunk_sequences,
    )
    click.echo(harvest(cfg).summary())
