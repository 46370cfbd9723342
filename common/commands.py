"""`actcache info` and `actcache verify`: commands that read only a store."""

from __future__ import annotations

import json
import sys

import click

from . import location
from .info import format_info, info
from .progress import quiet_option
from .verify import verify

# the option every command that opens a store takes (as `storage_options`, a tuple of key=value)
storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help=location.STORAGE_OPTION_HELP)


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

