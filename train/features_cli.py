"""`actcache features RUN --out DIR`: parse the arguments, call write_features.

The command reads only the store and the SAEs. Logit effects and token strings need the model's
unembedding and tokenizer, which the model side loads: the top-level command hands a loader over in
click's context object (key "load_unembedding"); without one they are left out."""

from __future__ import annotations

from pathlib import Path

import click

from ..common import location, outputs
from ..common.commands import storage_option
from ..common.errors import UserError
from ..common.progress import parse_count, quiet_option
from .features import write_features
from .features.api import describe_ranges

__all__ = ["features_command", "write_features"]


@click.command("features")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: features.json, per-SAE data files and the browser (index.html).")
@click.option("--store", default=None, help="The store to read (default: the one the run was trained on).")
@click.option("--sae", "saes", multiple=True, help="Only this SAE of the run (repeatable; default: all).")
@click.option("--tokens", default=None, help="Read at most this many tokens, e.g. 1M (whole sequences, sampled "
              "evenly across the store).")
@click.option("--top", default=20, show_default=True, type=int, help="Top-activating examples kept per latent.")
@click.option("--held-out-only", is_flag=True,
              help="Read only the store's held-out sequences (default: the whole store, training and held-out).")
@click.option("--all", "whole_store", is_flag=True, hidden=True, help="The default: the whole store.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--logits/--no-logits", default=True, show_default=True,
              help="Load the model the store names for logit effects and token strings.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@quiet_option
@storage_option
@click.pass_context
def features_command(ctx: click.Context, run: str, out: str, store: str | None, saes: tuple[str, ...],
                     tokens: str | None, top: int, held_out_only: bool, whole_store: bool, overwrite: bool, logits: bool,
                     device: str | None, no_progress: bool, storage_options: tuple[str, ...]) -> None:
    """Top-activating contexts of every latent of a run's SAEs, from one pass over the store (no
    model), and a static feature browser: open OUT/index.html. Reads the whole store (the tokens the
    SAEs trained on and the held-out ones, special tokens left out) unless --held-out-only."""
    if held_out_only and whole_store:
        raise UserError("--held-out-only and --all contradict each other; give one")
    try:
        n_tokens = parse_count(tokens) if tokens is not None else None
    except (ValueError, OverflowError):
        raise UserError(f"--tokens {tokens!r} is not a count (e.g. 500k, 2M)") from None
    if n_tokens is not None and n_tokens < 1:
        raise UserError(f"--tokens {tokens}: give a positive number of tokens (e.g. 500k)")
    root = ctx.find_root().obj or {}
    loader = root.get("load_unembedding") if logits else None
    with location.storage_options(list(storage_options)):
        summary = write_features(run, out, store=store, saes=list(saes) or None, tokens=n_tokens, top=top,
                                 held_out_only=held_out_only, overwrite=overwrite, model_loader=loader,
                                 device=device, progress=not no_progress)
    click.echo(f"{summary['n_tokens']} tokens of {summary['n_sequences']} sequences ({summary['range']}: "
               f"{describe_ranges(summary['sequences'])}; {summary['training_sequences']} training, "
               f"{summary['held_out_sequences']} held-out) at {summary['tokens_per_s']:.0f} tokens/s")
    for s in summary["saes"]:
        click.echo(f"  {s['name']}: d_sae {s['d_sae']}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.3f}"
                   f"{', logit effects' if s['logit_effects'] else ''}")
    click.echo(f"open {Path(out) / outputs.FEATURES_INDEX}")
    if summary.get("non_finite"):
        from ..common.finite import NonFiniteResult, describe

        raise NonFiniteResult("non-finite values (NaN or infinity, written as null) in " + "; ".join(
            f"{k} ({describe(v, 2)})" for k, v in summary["non_finite"].items()))
