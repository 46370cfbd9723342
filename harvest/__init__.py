"""Harvest: run a model once and write the activations of its hooks to a compressed Zarr store."""

from .api import HarvestConfig, HarvestResult, harvest
from .info import info
from .verify import VerifyReport, verify

__all__ = ["HarvestConfig", "HarvestResult", "harvest", "info", "verify", "VerifyReport"]
