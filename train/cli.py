"""`actcache train STORE --config sweep.toml --out DIR`: parse the arguments, call train_sweep."""

from __future__ import annotations

import click

from ..common.commands import storage_option
from ..common.distributed import env_rank
from ..common.progress import quiet_option

from .export import summary_table
from .sweep import train_sweep

__all__ = ["train_command", "train_sweep"]


@click.command("train")
@click.argument("store")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False),
              help="Sweep TOML: hook, batch_size, tokens, seed, [defaults], [[sae]], [grid].")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: one SAELens folder per SAE, summary.json/.md, frontier.png, checkpoints.")
@click.option("--resume", is_flag=True, help="Continue the run already in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete the run already in --out (a finished one, or one a crash left) "
              "and start again.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu).")
@click.option("--allow-repeat", is_flag=True, help="Allow more training tokens than the store holds (repeat epochs).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@quiet_option
@storage_option
def train_command(store: str, config: str, out: str, resume: bool, overwrite: bool, device: str | None,
                  allow_repeat: bool, no_progress: bool, storage_options: tuple[str, ...]) -> None:
    """Train the SAEs of a sweep in lockstep on one store and export them in the SAELens format."""
    summary = train_sweep(store, config, out, resume=resume, device=device, allow_repeat=allow_repeat,
                          progress=not no_progress, overwrite=overwrite, storage_options=list(storage_options))
    if env_rank() == 0:  # under torchrun, rank 0 speaks for the job
        click.echo(summary_table(summary))
        click.echo(f"\n{len(summary['saes'])} SAEs in {out}; summary.json, summary.md and frontier.png beside them")
