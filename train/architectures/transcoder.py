"""Transcoder (Dunefsky et al. 2024) and skip transcoder (Paulo et al. 2025): ReLU latents with an L1
penalty, reading one hook and reconstructing another of the same forward pass."""

from __future__ import annotations

from ...common.sae import INFERENCE_FORMS
from .base import register
from .standard import StandardSAE


@register
class Transcoder(StandardSAE):
    """A transcoder: encodes the input hook (`hook`), decodes to the output hook (`hook_out`), e.g.
    the MLP's input to its output; ReLU latents with the decoder-norm-weighted L1 penalty. Exported as
    SAELens's `transcoder`."""

    architecture = "transcoder"
    help = "reads `hook`, reconstructs `hook_out`; ReLU latents, L1 penalty"
    transcoder = True
    saelens_architecture = "transcoder"
    inference_form = INFERENCE_FORMS["transcoder"]


@register
class SkipTranscoder(Transcoder):
    """A transcoder plus a learned linear skip connection from input to output (W_skip, started at
    zero): the latents explain what the linear map does not. Exported as SAELens's `skip_transcoder`."""

    architecture = "skip_transcoder"
    help = "a transcoder plus a learned linear skip from `hook` to `hook_out`"
    skip = True
    saelens_architecture = "skip_transcoder"
    inference_form = INFERENCE_FORMS["skip_transcoder"]
