"""`actcache features RUN --out DIR`: parse the arguments (FeaturesCommandOptions' fields,
common/options.py), call write_features.

The command reads only the store and the SAEs. Logit effects and token strings need the model's
unembedding and tokenizer, which the model side loads: the top-level command hands a loader over in
click's context object (key "load_unembedding"); without one they are left out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..common import location, outputs
from ..common.errors import UserError
from ..common.options import command_options, configurable, from_click, option, storage_options_option
from ..common.progress import quiet_option
from .features import write_features
from .features.api import describe_ranges

__all__ = ["FeaturesCommandOptions", "features_command", "write_features"]


@configurable
@dataclass
class FeaturesCommandOptions:
    """The options of `actcache features`."""

    out: str = option(help="Output folder: features.json, per-SAE data files and the browser (index.html).")
    store: str | None = option(None, "The store to read (default: the one the run was trained on).", kind="str")
    saes: list[str] = option([], "Only this SAE of the run (repeatable; default: all).", kind="str_list", flag="--sae")
    tokens: int | None = option(None, "Read at most this many tokens, e.g. 1M (whole sequences, sampled evenly "
                                "across the store).", kind="count", unit="tokens", low=1)
    top: int = option(20, "Top-activating examples kept per latent.", unit="examples", low=1)
    held_out_only: bool = option(False, "Read only the store's held-out sequences (default: the whole store, "
                                        "training and held-out).")
    whole_store: bool = option(False, "The default: the whole store.", flag="--all", hidden=True)
    overwrite: bool = option(False, "Replace --out if it exists.")
    logits: bool = option(True, "Load the model the store names for logit effects and token strings.")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu).", kind="str")
    progress: bool = option(True, "Show a progress bar (--no-progress: none).")
    storage_options: tuple[str, ...] = storage_options_option()


@click.command("features")
@click.argument("run", type=click.Path(file_okay=False))
@command_options(FeaturesCommandOptions)
@quiet_option
@click.pass_context
def features_command(ctx: click.Context, run: str, **given: Any) -> None:
    """Top-activating contexts of every latent of a run's SAEs, from one pass over the store (no
    model), and a static feature browser: open OUT/index.html. Reads the whole store (the tokens the
    SAEs trained on and the held-out ones, special tokens left out) unless --held-out-only."""
    o = FeaturesCommandOptions(**from_click(FeaturesCommandOptions, given))
    if o.held_out_only and o.whole_store:
        raise UserError("--held-out-only and --all contradict each other; give one")
    root = ctx.find_root().obj or {}
    loader = root.get("load_unembedding") if o.logits else None
    with location.storage_options(list(o.storage_options)):
        summary = write_features(run, o.out, store=o.store, saes=o.saes or None, tokens=o.tokens, top=o.top,
                                 held_out_only=o.held_out_only, overwrite=o.overwrite, model_loader=loader,
                                 device=o.device, progress=o.progress)
    click.echo(f"{summary['n_tokens']} tokens of {summary['n_sequences']} sequences ({summary['range']}: "
               f"{describe_ranges(summary['sequences'])}; {summary['training_sequences']} training, "
               f"{summary['held_out_sequences']} held-out) at {summary['tokens_per_s']:.0f} tokens/s")
    for s in summary["saes"]:
        click.echo(f"  {s['name']}: d_sae {s['d_sae']}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.3f}"
                   f"{', logit effects' if s['logit_effects'] else ''}")
    click.echo(f"open {Path(o.out) / outputs.FEATURES_INDEX}")
    if summary.get("non_finite"):
        from ..common.finite import NonFiniteResult, describe

        raise NonFiniteResult("non-finite values (NaN or infinity, written as null) in " + "; ".join(
            f"{k} ({describe(v, 2)})" for k, v in summary["non_finite"].items()))
