"""`actcache train STORE --config sweep.toml --out DIR`: parse the arguments (TrainOptions' fields,
common/options.py), call train_sweep."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import click

from ..common.distributed import env_rank
from ..common.options import command_options, configurable, from_click, option, storage_options_option
from ..common.progress import quiet_option

from .export import summary_table
from .sweep import train_sweep

__all__ = ["TrainOptions", "train_command", "train_sweep"]


@configurable
@dataclass
class TrainOptions:
    """The options of `actcache train` (train_sweep takes the same names as keywords)."""

    config: str = option(help="Sweep TOML: hook, batch_tokens, tokens, seed, [defaults], [[sae]], [grid] "
                              "(keys: docs/options.md).")
    out: str = option(help="Output folder: one SAELens folder per SAE, summary.json/.md, frontier.png, checkpoints.")
    resume: bool = option(False, "Continue the run already in --out from its last checkpoint.")
    overwrite: bool = option(False, "Delete the run already in --out (a finished one, or one a crash left) and "
                                    "start again.")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu).", kind="str")
    repeat_epochs: bool = option(False, "Allow more training tokens than the store holds (the data repeats, "
                                        "reshuffled); the config key repeat_epochs = true does the same.",
                                 old_names=("allow_repeat",))
    progress: bool = option(True, "Show a progress bar (--no-progress: none).")
    storage_options: tuple[str, ...] = storage_options_option()


@click.command("train")
@click.argument("store")
@command_options(TrainOptions)
@quiet_option
def train_command(store: str, **given: Any) -> None:
    """Train the SAEs of a sweep in lockstep on one store and export them in the SAELens format."""
    opts = TrainOptions(**from_click(TrainOptions, given))
    kw = asdict(opts)
    kw["storage_options"] = list(opts.storage_options)
    summary = train_sweep(store, kw.pop("config"), kw.pop("out"), **kw)
    if env_rank() == 0:  # under torchrun, rank 0 speaks for the job
        click.echo(summary_table(summary))
        click.echo(f"\n{len(summary['saes'])} SAEs in {opts.out}; summary.json, summary.md and frontier.png beside them")
