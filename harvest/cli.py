"""`actcache harvest`: options generated from HarvestConfig's fields; parse, call harvest(), print the summary."""

from __future__ import annotations

from typing import Any

import click

from ..common.distributed import env_rank
from ..common.options import command_options, from_click
from ..common.progress import quiet_option

from .api import harvest
from .config import HarvestConfig


@click.command("harvest")
@command_options(HarvestConfig)
@quiet_option
def harvest_command(**given: Any) -> None:
    """Run a model once over a dataset; write the activations of its hooks to a compressed Zarr store."""
    result = harvest(HarvestConfig(**from_click(HarvestConfig, given)))
    if env_rank() == 0:  # under torchrun, rank 0 speaks for the job
        click.echo(result.summary())
