"""The bundled SmolLM2-135M run through plain transformers forward hooks, with classic
TransformerLens hook names (blocks.L.hook_resid_post, blocks.L.hook_mlp_out): real activations for
the codec measurement, independent of the code whose store format it chooses a codec for."""

from __future__ import annotations

import re
import sys
import time
from typing import Iterator

import numpy as np

_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out)$")


def load_smollm2(last_layer: int | None = None):
    """The bundled model in float32 on the CPU, cut after last_layer (nothing deeper is needed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.data import bundled_gguf

    folder, name = bundled_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.config.architectures = ["LlamaForCausalLM"]
    model.eval()
    if last_layer is not None:
        model.model.layers = model.model.layers[: last_layer + 1]
    return model


def activations(model, windows: np.ndarray, hooks: list[str], batch: int = 8) -> Iterator[tuple[np.ndarray, dict]]:
    """For each batch of token windows: (tokens, {hook: float16 [batch*context, d]})."""
    import torch

    grabbed: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            grabbed[key] = t.detach().reshape(-1, t.shape[-1]).to(torch.float16)
        return hook

    handles = []
    for h in hooks:
        m = _HOOK.match(h)
        if not m:
            raise ValueError(f"unsupported hook {h!r}: use blocks.L.hook_resid_post or blocks.L.hook_mlp_out")
        layer = model.model.layers[int(m.group(1))]
        handles.append((layer if m.group(2) == "hook_resid_post" else layer.mlp).register_forward_hook(keep(h)))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                tok = windows[i:i + batch]
                model.model(input_ids=torch.as_tensor(tok, dtype=torch.long))
                yield tok, {h: grabbed[h].numpy() for h in hooks}
                print(f"forward: {min(i + batch, len(windows)) * windows.shape[1]}/{windows.size} tokens "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, end="\r")
        print(file=sys.stderr)
    finally:
        for hd in handles:
            hd.remove()
