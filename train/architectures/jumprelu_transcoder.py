"""JumpReLU transcoders (as in Gemma Scope's transcoders), with and without a linear skip."""

from __future__ import annotations

from ...common.sae import INFERENCE_FORMS
from .base import register
from .jumprelu import JumpReLUSAE


@register
class JumpReLUTranscoder(JumpReLUSAE):
    """A JumpReLU SAE's latents and L0 penalty, reading `hook` and reconstructing `hook_out`.
    Exported as SAELens's `jumprelu_transcoder`."""

    architecture = "jumprelu_transcoder"
    help = "reads `hook`, reconstructs `hook_out`; learned thresholds, L0 penalty"
    transcoder = True
    saelens_architecture = "jumprelu_transcoder"
    inference_form = INFERENCE_FORMS["jumprelu_transcoder"]


@register
class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    """A JumpReLU transcoder plus a learned linear skip from input to output (W_skip, started at zero).
    Exported as SAELens's `jumprelu_skip_transcoder`."""

    architecture = "jumprelu_skip_transcoder"
    help = "a JumpReLU transcoder plus a learned linear skip from `hook` to `hook_out`"
    skip = True
    saelens_architecture = "jumprelu_skip_transcoder"
    inference_form = INFERENCE_FORMS["jumprelu_skip_transcoder"]
