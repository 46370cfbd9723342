"""`actcache compare RUN_OR_SAE...`: parse the arguments, call train/compare.py."""

from __future__ import annotations

import json

import click

from .compare import compare, compare_table, plot_compare, to_json


@click.command("compare")
@click.argument("runs_or_saes", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--allow-mixed", is_flag=True,
              help="Show folders that measure different data (another store, another held-out range, or "
                   "held-out beside training-stream numbers) as separate groups instead of refusing.")
@click.option("--plot", "plot", default=None, type=click.Path(dir_okay=False),
              help="Also write the frontier plot (L0 against CE loss score and against FVU) to this PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups and rows as JSON.")
def compare_command(runs_or_saes: tuple[str, ...], allow_mixed: bool, plot: str | None, as_json: bool) -> None:
    """One table (and with --plot one frontier plot) of the SAEs of RUNS_OR_SAES (run folders or SAE
    folders), from what the folders hold: refused when they measure different data (store fingerprint,
    held-out range) unless --allow-mixed."""
    groups = compare(runs_or_saes, allow_mixed=allow_mixed)
    if plot:
        plot_compare(groups, plot)
    if as_json:
        click.echo(json.dumps(to_json(groups), indent=2))
        return
    click.echo(compare_table(groups))
    if plot:
        click.echo(f"\nfrontier plot in {plot}")
