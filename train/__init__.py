"""Train many sparse autoencoders in lockstep from an actcache store and export them for SAELens.

    from actcache import train_sweep, SAE
    summary = train_sweep("acts.zarr", "sweep.toml", "runs/sweep1")
    sae = SAE.load_from_disk("runs/sweep1/topk-k32")
"""

from ..common.sae import SAE
from .sweep import train_sweep

__all__ = ["SAE", "train_sweep"]
