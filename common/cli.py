"""The `actcache` command: one click group whose subcommands live beside the code they call.

Subcommands are loaded lazily so that `actcache --help` does not import torch."""

from __future__ import annotations

import importlib
import os
import sys

import click

from .errors import UserError
from .progress import setup_logging

SUBCOMMANDS = {
    "harvest": "harvest.cli:harvest_command",
    "info": "harvest.cli:info_command",
    "verify": "harvest.cli:verify_command",
    "train": "train.cli:train_command",
    "demo": "harvest.demo:demo_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="More log lines on stderr (and tracebacks on error).")
@click.version_option(package_name="actcache")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Harvest language-model activations once; train many sparse autoencoders from them."""
    setup_logging(verbose)
    ctx.obj = {"verbose": verbose}


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, no traceback."""
    try:
        cli.main(standalone_mode=False)
    except UserError as e:
        if "-v" in sys.argv or "--verbose" in sys.argv or os.environ.get("ACTCACHE_DEBUG"):
            raise
        click.echo(f"actcache: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("actcache: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("actcache: interrupted; rerun with --resume to continue", err=True)
        sys.exit(130)
    except OSError as e:
        import errno

        if e.errno == errno.ENOSPC:
            click.echo("actcache: error: no space left on the device; free some space and rerun with --resume", err=True)
            sys.exit(3)
        raise


if __name__ == "__main__":
    main()
