"""Look inside trained SAEs using the store alone: top-activating contexts of every latent from one
pass over the activations, and a static feature browser built from them."""

from .api import FeatureOptions, collect_top_contexts, find_saes, load_features, write_features
from .contexts import LatentAccumulator, LatentStats, logit_effects

__all__ = ["FeatureOptions", "LatentAccumulator", "LatentStats", "collect_top_contexts", "find_saes",
           "load_features", "logit_effects", "write_features"]
