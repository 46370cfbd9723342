"""The offline default job: the bundled SmolLM2-135M over the Python standard library's sources."""

from __future__ import annotations

from .api import HarvestConfig, HarvestResult, harvest
from .data import STDLIB
from .models import DEFAULT_MODEL

DEMO_HOOKS = ["blocks.4.hook_resid_post", "blocks.4.hook_mlp_out"]
DEMO_TOKENS = 40_960  # 320 sequences of 128: about a minute on two CPU cores, model loading included
DEMO_OUT = "demo/acts.zarr"


def demo_config(out: str = DEMO_OUT, tokens: int = DEMO_TOKENS, overwrite: bool = True) -> HarvestConfig:
    # chunks of 32 sequences: the default held-out part (5%, whole chunks) is then one chunk of 4,096 tokens
    return HarvestConfig(out=out, hooks=list(DEMO_HOOKS), model=DEFAULT_MODEL, dataset=STDLIB, context_size=128,
                         tokens=tokens, batch_size=16, chunk_sequences=32, overwrite=overwrite)


def demo_harvest(out: str = DEMO_OUT, tokens: int = DEMO_TOKENS, overwrite: bool = True,
                 progress: bool = True) -> HarvestResult:
    """Harvest the demo store: needs nothing from the internet."""
    from pathlib import Path

    from ..common import location

    if not location.is_remote(out):
        Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return harvest(demo_config(out, tokens, overwrite), progress=progress)
