"""Harvest: run a model once and write the activations of its hooks to a compressed Zarr store.

`actcache.harvest` is this package, and calling it runs a harvest, so both read naturally:

    from actcache import harvest, HarvestConfig
    result = harvest(HarvestConfig(out="acts.zarr", hooks=["blocks.4.hook_resid_post"]))
"""

import sys
import types

from .api import HarvestConfig, HarvestResult, harvest

__all__ = ["HarvestConfig", "HarvestResult", "harvest"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return harvest(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
