"""actcache: harvest language-model activations once into a Zarr store; train many SAEs from it.

    from actcache import harvest, HarvestConfig, train_sweep, SAE

The package is three stages under one name: actcache.common (the store format and what both
sides read), actcache.harvest (everything that runs the language model) and actcache.train
(everything that needs only stores and SAEs). The names below are imported on first use, so
`import actcache` stays cheap and importing one stage never imports the other."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "HarvestConfig": "actcache.harvest.api",
    "HarvestResult": "actcache.harvest.api",
    "train_sweep": "actcache.train.sweep",
    "SAE": "actcache.common.sae",
    "ActivationStore": "actcache.common.store",
    "info": "actcache.common.info",
    "verify": "actcache.common.verify",
    "UserError": "actcache.common.errors",
}
__all__ = sorted(_EXPORTS) + ["harvest", "__version__"]


def __getattr__(name: str):
    if name == "harvest":  # the stage, which is also callable: harvest(HarvestConfig(...))
        return importlib.import_module("actcache.harvest")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'actcache' has no attribute {name!r}")
