"""info(): what a store holds (manifest, hooks, tokens, size, compression, statistics), as a dict."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .progress import human_bytes
from .store import ActivationStore


def info(url: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of the store at url (committed chunks only)."""
    store = ActivationStore.open(url, "r")
    m = store.manifest
    n_seq = store.n_committed_sequences
    n_tokens = store.n_committed_tokens
    act_bytes = store.nbytes_stored("activations")
    raw = n_tokens * sum(h.d for h in m.hooks) * 2
    hooks = {}
    for h in m.hooks:
        s = store.summary(h.name)
        hooks[h.name] = {
            "d": h.d,
            "count": int(s["count"]),
            "mean_norm": float(s["mean_norm"]),
            "max_abs": float(s["max_abs"]),
            "n_nonfinite": int(s["n_nonfinite"]),
            "mean_of_mean": float(np.mean(s["mean"])),
            "mean_of_var": float(np.mean(s["var"])),
        }
    return {
        "url": str(url),
        "complete": m.complete,
        "n_chunks_committed": store.n_committed,
        "n_chunks": m.n_chunks,
        "n_sequences": n_seq,
        "n_tokens": n_tokens,
        "bytes_on_disk": store.nbytes_stored(),
        "activation_bytes": act_bytes,
        "raw_float16_bytes": raw,
        "compression_ratio": raw / act_bytes if act_bytes else None,
        "fingerprint": m.fingerprint,
        "held_out": m.held_out,
        "hooks": hooks,
        "manifest": m.to_dict(),
    }


def format_info(d: dict[str, Any]) -> str:
    """The info dict as a few lines for people."""
    m = d["manifest"]
    state = "complete" if d["complete"] else f"incomplete ({d['n_chunks_committed']}/{d['n_chunks']} chunks; --resume continues it)"
    ratio = f"{d['compression_ratio']:.2f}x" if d["compression_ratio"] else "n/a"
    lines = [
        f"store      {d['url']}  (format {m['format_version']}, actcache {m['package_version']}, {state})",
        f"model      {m['model']['name']}  ({m['model']['n_layers']} layers, d_model {m['model']['d_model']}, "
        f"compute {m['model']['dtype']})",
        f"dataset    {m['dataset']['path']}  split {m['dataset']['split']}, column {m['dataset']['text_column']}, "
        f"seed {m['seed']}",
        f"tokens     {d['n_tokens']:,}  ({d['n_sequences']:,} sequences of {m['context_size']}, "
        f"prepend_bos {m['prepend_bos']}, {m['chunk_sequences']} sequences per chunk)",
        f"size       {human_bytes(d['bytes_on_disk'])} on disk; activations {human_bytes(d['activation_bytes'])} "
        f"vs {human_bytes(d['raw_float16_bytes'])} raw float16 = {ratio} (codec {m['codec']}, overflow {m['overflow']})",
        f"held out   {_held_out(d, m)}",
        f"fingerprint {d['fingerprint'] or _no_fingerprint(d, m)}",
        "hooks",
    ]
    for name, h in d["hooks"].items():
        lines.append(f"  {name}  d={h['d']}  mean norm {h['mean_norm']:.4g}  max |x| {h['max_abs']:.4g}  "
                     f"mean var {h['mean_of_var']:.4g}  non-finite {h['n_nonfinite']}")
    return "\n".join(lines)


def _held_out(d: dict[str, Any], m: dict[str, Any]) -> str:
    h = d["held_out"]
    if not h:
        return "none (format 1 store, or harvested with --held-out 0): name a range to leave out of training"
    a, b = h["start_sequence"], h["stop_sequence"]
    return (f"sequences {a:,}..{b:,} ({(b - a) * m['context_size']:,} tokens, the last "
            f"{-(-(b - a) // m['chunk_sequences'])} chunk(s)): for evaluation, never trained on")


def _no_fingerprint(d: dict[str, Any], m: dict[str, Any]) -> str:
    return "none (format 1 store)" if m["format_version"] < 2 else "none yet (written when the harvest completes)"
