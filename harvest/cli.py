"""`actcache harvest`: options generated from HarvestConfig's fields; parse, call harvest(), print the summary."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import click

from ..common.distributed import env_rank
from ..common.progress import parse_count, quiet_option

from .api import harvest
from .config import HarvestConfig, cli_name, fields_with_options


def _count(ctx: click.Context, param: click.Parameter, value: Any) -> int:
    if isinstance(value, int):
        return value
    try:
        return parse_count(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a count (write e.g. 100M, 2k, 50000)") from None


def click_option(f: dataclasses.Field) -> Callable:
    """The click option of one HarvestConfig field, from its type, default and metadata."""
    meta = f.metadata
    name = cli_name(f)
    kw: dict[str, Any] = {"help": meta["help"]}
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
        kw["show_default"] = f.default is not None and f.default is not False
    if meta.get("multiple"):
        kw["multiple"] = True
    if f.type in ("bool", bool):
        if f.default is True:
            name = f"{name}/--no-{name[2:]}"
        else:
            kw["is_flag"] = True
    elif meta.get("choices"):
        kw["type"] = click.Choice(list(meta["choices"]))
    elif meta.get("count"):
        kw["type"], kw["callback"] = str, _count
    elif f.type in ("int", "int | None", int):
        kw["type"] = int
    return click.option(name, f.name, **kw)


def _command(fn: Callable) -> click.Command:
    for f in reversed(fields_with_options()):
        fn = click_option(f)(fn)
    return click.command("harvest")(quiet_option(fn))


@_command
def harvest_command(**options: Any) -> None:
    """Run a model once over a dataset; write the activations of its hooks to a compressed Zarr store."""
    options["hooks"] = list(options["hooks"])
    result = harvest(HarvestConfig(**options))
    if env_rank() == 0:  # under torchrun, rank 0 speaks for the job
        click.echo(result.summary())
