"""`actcache info` and `actcache verify`: commands that read only a store."""

from __future__ import annotations

import json
import sys

import click

from .info import format_info, info
from .verify import verify


@click.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def info_command(store: str, as_json: bool) -> None:
    """What a store holds: manifest, hooks, tokens, size on disk, compression ratio, statistics."""
    d = info(store)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))


@click.command("verify")
@click.argument("store")
def verify_command(store: str) -> None:
    """Read every committed chunk, check checksums and the manifest; exit 1 on damage."""
    report = verify(store, progress=sys.stderr.isatty())
    click.echo(report.summary())
    if not report.ok:
        sys.exit(1)

