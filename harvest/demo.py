"""The offline default job: the bundled SmolLM2-135M over the Python standard library's sources."""

from __future__ import annotations

import click

from ..common.progress import parse_count

from .api import HarvestConfig, HarvestResult, harvest
from .data import STDLIB
from .models import DEFAULT_MODEL

DEMO_HOOKS = ["blocks.4.hook_resid_post", "blocks.4.hook_mlp_out"]
DEMO_TOKENS = 40_960  # 320 sequences of 128: about a minute on two CPU cores, model loading included
DEMO_OUT = "demo/acts.zarr"


def demo_config(out: str = DEMO_OUT, tokens: int = DEMO_TOKENS, overwrite: bool = True) -> HarvestConfig:
    return HarvestConfig(out=out, hooks=list(DEMO_HOOKS), model=DEFAULT_MODEL, dataset=STDLIB, context_size=128,
                         tokens=tokens, batch_size=16, overwrite=overwrite)


def demo_harvest(out: str = DEMO_OUT, tokens: int = DEMO_TOKENS, overwrite: bool = True,
                 progress: bool = True) -> HarvestResult:
    """Harvest the demo store: needs nothing from the internet."""
    from pathlib import Path

    from ..common import location

    if not location.is_remote(out):
        Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return harvest(demo_config(out, tokens, overwrite), progress=progress)


@click.command("demo")
@click.option("--out", default=DEMO_OUT, show_default=True, help="Where to write the demo store.")
@click.option("--tokens", default=str(DEMO_TOKENS), show_default=True, help="Tokens to harvest (e.g. 100k).")
def demo_command(out: str, tokens: str) -> None:
    """Harvest the bundled SmolLM2-135M over the Python standard library, offline, and report."""
    click.echo(demo_harvest(out, parse_count(tokens)).summary())
