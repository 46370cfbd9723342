"""`actcache compare RUN_OR_SAE...`: parse the arguments (CompareOptions' fields, common/options.py),
call train/compare.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from ..common.options import command_options, configurable, from_click, option
from .compare import compare, compare_table, plot_compare, to_json


@configurable
@dataclass
class CompareOptions:
    """The options of `actcache compare`."""

    allow_mixed: bool = option(False, "Show folders that measure different data (another store, another held-out "
                                      "range, or held-out beside training-stream numbers) as separate groups "
                                      "instead of refusing.")
    plot: str | None = option(None, "Also write the frontier plot (L0 against CE loss score and against FVU) to "
                                    "this PNG file.", kind="str")
    as_json: bool = option(False, "Print the groups and rows as JSON.", flag="--json")


@click.command("compare")
@click.argument("runs_or_saes", nargs=-1, required=True, type=click.Path(file_okay=False))
@command_options(CompareOptions)
def compare_command(runs_or_saes: tuple[str, ...], **given: Any) -> None:
    """One table (and with --plot one frontier plot) of the SAEs of RUNS_OR_SAES (run folders or SAE
    folders), from what the folders hold: refused when they measure different data (store fingerprint,
    held-out range) unless --allow-mixed."""
    o = CompareOptions(**from_click(CompareOptions, given))
    groups = compare(runs_or_saes, allow_mixed=o.allow_mixed)
    if o.plot:
        plot_compare(groups, o.plot)
    if o.as_json:
        click.echo(json.dumps(to_json(groups), indent=2))
        return
    click.echo(compare_table(groups))
    if o.plot:
        click.echo(f"\nfrontier plot in {o.plot}")
