"""The inference SAE and its SAELens folder format live in actcache.common.sae (both stages read
them); this name stays for code written against earlier versions."""

from ..common.sae import *  # noqa: F401,F403
from ..common.sae import SAE, SAEConfig, Metadata  # noqa: F401
