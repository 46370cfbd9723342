"""TopK transcoder: the k largest latents of each token, reading one hook and reconstructing another."""

from __future__ import annotations

from ...common.sae import INFERENCE_FORMS
from .base import register
from .topk import TopKSAE

# SAELens 6.54 has no TopK transcoder class. Its TopK SAE with apply_b_dec_to_input = false computes
# exactly a TopK transcoder's map when the output is as wide as the input (W_dec must be [d_sae, d_in]
# there), so that is the form exported then; otherwise the form is this package's own (common/sae.py).
OWN_FORM = INFERENCE_FORMS["topk_transcoder"]


@register
class TopKTranscoder(TopKSAE):
    """TopK latents (with AuxK) reading `hook` and reconstructing `hook_out`. Exported as SAELens's
    `topk` SAE with apply_b_dec_to_input = false and metadata.hook_name_out (SAELens has no TopK
    transcoder; its TopK SAE runs the same map when d_out = d_in)."""

    architecture = "topk_transcoder"
    help = ("reads `hook`, reconstructs `hook_out`; the k largest latents of each token (SAELens loads it as "
            "a TopK SAE, which needs d_out = d_in)")
    transcoder = True
    saelens_architecture = "topk"
    inference_form = OWN_FORM

    @classmethod
    def resolve(cls, cfg, d_in, d_out, n_steps):
        warnings = super().resolve(cfg, d_in, d_out, n_steps)
        if d_out != d_in:
            warnings.append(f"SAE {cfg.name!r}: {cfg.hook_out!r} (d = {d_out}) is not as wide as {cfg.hook!r} "
                            f"(d = {d_in}); SAELens has no TopK transcoder and its TopK SAE needs equal widths, so "
                            "the exported folder loads in actcache only")
        return warnings

    def export_state(self, scale, scale_out=None):
        arch, extra, st = super().export_state(scale, scale_out)
        return ("topk" if self.cfg.d_out == self.cfg.d_in else OWN_FORM.name), extra, st
