"""SAE architectures, one file each, and their registry (see base.py for what a registration states).

    from actcache.train.architectures import Option, TrainingSAE, register

    @register
    class MySAE(TrainingSAE):
        architecture = "mine"
        keys = (Option("my_coefficient", "float", 1.0, "what it weighs", low=0),)
        def step_loss(self, x, coefficient, dead, aux_on): ...

A registered architecture can be named in a sweep config at once."""

from .base import (ARCHITECTURES, AUXK_KEYS, COMMON_KEYS, K_KEY, SPARSITY_WARMUP_KEY, TRANSCODER_KEYS, Key,
                   Option,
                   SAEConfig, StepOut, TrainingSAE, all_sae_keys, build_sae, geometric_median, get_architecture, mse, register,
                   unregister)
from .standard import StandardSAE
from .topk import TopKSAE
from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .gated import GatedSAE
from .matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from .transcoder import SkipTranscoder, Transcoder
from .topk_transcoder import TopKTranscoder
from .jumprelu_transcoder import JumpReLUSkipTranscoder, JumpReLUTranscoder

__all__ = ["ARCHITECTURES", "AUXK_KEYS", "COMMON_KEYS", "K_KEY", "SPARSITY_WARMUP_KEY", "TRANSCODER_KEYS", "Key", "Option",
           "SAEConfig",
           "StepOut", "TrainingSAE", "all_sae_keys", "build_sae", "geometric_median", "get_architecture", "mse",
           "register", "unregister", "StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE",
           "MatryoshkaBatchTopKSAE", "Transcoder", "SkipTranscoder", "TopKTranscoder", "JumpReLUTranscoder",
           "JumpReLUSkipTranscoder"]
