"""`actcache eval`: score SAEs with the model on held-out tokens of a store (a thin layer over
actcache.evaluate.evaluate)."""

from __future__ import annotations

import json

import click

from .common.progress import quiet_option
from .common.commands import storage_option


@click.command("eval")
@click.argument("runs_or_saes", nargs=-1)
@click.option("--sae", "sae_dirs", multiple=True, help="An SAE folder in the SAELens format (repeatable).")
@click.option("--store", default=None, help="The store to take held-out tokens from (default: the run's).")
@click.option("--model", default=None, help="Model spec (default: the one the SAE or the store names).")
@click.option("--tokens", default=None, help="Score at most this many tokens (e.g. 16k; default: the whole held-out part).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Token windows per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="The model's compute dtype.")
@click.option("--held-out", "held_out", default=None,
              help="START:STOP in sequences of the store to evaluate on (default: the store's held-out part).")
@click.option("--include-special-tokens", is_flag=True, help="Replace and score BOS/EOS/pad positions too.")
@click.option("--force", is_flag=True, help="Evaluate with a model other than the store's.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@quiet_option
@storage_option
def eval_command(runs_or_saes, sae_dirs, store, model, tokens, batch_size, device, dtype, held_out,
                 include_special_tokens, force, as_json, storage_options) -> None:
    """Splice each SAE of RUNS_OR_SAES (run folders or SAE folders) into the model on held-out token
    windows of the store and report CE loss score, KL and activation metrics; writes eval.json in each
    SAE folder and the columns in the run's summary. Transcoders replace their output hook with their
    map of their input hook."""
    from .common.progress import parse_count
    from .evaluate import evaluate, non_finite_error, records_table

    from .common.errors import UserError

    try:
        n = parse_count(tokens) if tokens else None
    except (ValueError, OverflowError):
        raise UserError(f"--tokens {tokens!r} is not a count (e.g. 4096 or 16k)") from None
    if n is not None and n < 1:
        raise UserError(f"--tokens {tokens}: give a positive number of tokens to score (e.g. 16k)")
    records = evaluate(runs_or_saes, sae_dirs=sae_dirs, store=store, model=model, tokens=n, batch_size=batch_size,
                       device=device, dtype=dtype, held_out=held_out, include_special_tokens=include_special_tokens,
                       force=force, write=True, storage_options=list(storage_options))
    if as_json:
        click.echo(json.dumps(records, indent=2, allow_nan=False))
    else:
        click.echo(records_table(records))
        r = records[0]
        s = r["sequences_scored"]
        click.echo(f"\n{r['ce_tokens']} token positions of sequences {s['start_sequence']}:{s['stop_sequence']} of "
                   f"{r['store']} (fingerprint {r['store_fingerprint']}); eval.json in each SAE folder")
    bad = non_finite_error(records)
    if bad is not None:
        raise bad
