"""The bundled SmolLM2-135M run through plain transformers forward hooks, with classic
TransformerLens hook names (blocks.L.hook_resid_post, blocks.L.hook_mlp_out). The benchmarks use
it where they need real activations without the harvest package: the codec measurement, and a
store for the training benchmarks when harvest is not installed."""

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


def write_store(url: str, windows: np.ndarray, hooks: list[str], codec: str | None = None, batch: int = 8) -> dict:
    """An actcache store (format 1, via common.store) of the bundled model's activations on these
    token windows. A stand-in for `actcache harvest` where the harvest package is not installed."""
    from common import codecs, location
    from common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
    from common.store import ActivationStore, chunk_stats, chunk_sequences_for

    from benchmarks.data import GGUF_NAME

    last = max(int(_HOOK.match(h).group(1)) for h in hooks)
    model = load_smollm2(last)
    n_seq, ctx = windows.shape
    d = model.config.hidden_size
    cs = chunk_sequences_for(ctx, d)
    cs = max(batch, cs // batch * batch)
    man = Manifest(
        model=ModelInfo(name=GGUF_NAME, d_model=d, n_layers=model.config.num_hidden_layers, n_ctx=2048,
                        architecture="LlamaForCausalLM"),
        tokenizer=TokenizerInfo(name=GGUF_NAME, vocab_size=model.config.vocab_size, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2),
        dataset=DatasetInfo(path="stdlib", text_column=None),
        hooks=[HookInfo(h, d) for h in hooks], context_size=ctx, prepend_bos=True, seed=0, n_sequences=n_seq,
        chunk_sequences=cs, codec=codec or codecs.DEFAULT_CODEC, batch_size=batch,
    )
    if location.exists(url):
        location.remove(url)
    store = ActivationStore.create(url, man)
    t0 = time.perf_counter()
    pend_tok, pend = [], {h: [] for h in hooks}
    j = 0
    for tok, acts in activations(model, windows, hooks, batch):
        pend_tok.append(tok)
        for h in hooks:
            pend[h].append(acts[h])
        if sum(len(t) for t in pend_tok) >= cs:
            x = {h: np.concatenate(v) for h, v in pend.items()}
            store.write_chunk(j, np.concatenate(pend_tok), x, {h: chunk_stats(v) for h, v in x.items()})
            j += 1
            store.commit(j)
            pend_tok, pend = [], {h: [] for h in hooks}
    if pend_tok:
        x = {h: np.concatenate(v) for h, v in pend.items()}
        store.write_chunk(j, np.concatenate(pend_tok), x, {h: chunk_stats(v) for h, v in x.items()})
        store.commit(j + 1)
    store.finalize()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": windows.size / dt, "bytes_on_disk": store.nbytes_stored(),
            "writer": "benchmarks.hf_model.write_store (harvest package absent)"}
