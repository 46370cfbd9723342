"""`actcache info` and `actcache verify`: commands that read only a store."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from . import location
from .info import format_info, info
from .options import command_options, configurable, storage_options_option
from .progress import quiet_option
from .verify import verify


@configurable
@dataclass
class StoreAccess:
    """The option every command that opens a store takes (info and verify take only this one)."""

    storage_options: tuple[str, ...] = storage_options_option()


# as a click decorator: the command receives `storage_options`, a tuple of key=value
storage_option = command_options(StoreAccess)


@click.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@storage_option
def info_command(store: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """What a store holds: manifest, hooks, tokens, size on disk, compression ratio, statistics."""
    with location.storage_options(list(storage_options)):
        d = info(store)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))


@click.command("verify")
@click.argument("store")
@storage_option
@quiet_option
def verify_command(store: str, storage_options: tuple[str, ...]) -> None:
    """Read every committed chunk, check checksums and the manifest; exit 1 on damage."""
    with location.storage_options(list(storage_options)):
        report = verify(store, progress=True)  # whole lines where stderr is not a terminal
    click.echo(report.summary())
    if not report.ok:
        sys.exit(1)

