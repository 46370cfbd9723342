"""Which compressor should a store use? Measures every codec name that common/codecs.py accepts on
real activations of the bundled SmolLM2-135M over standard-library source: compression ratio,
encode MB/s and decode MB/s through the real zarr codec chain (a chunk-sized array written to a
local store and read back from a warm page cache). Decode speed ranks first (it bounds the training
loader), then ratio (disk and network), then encode speed (the harvest writes in a background thread).

    python -m benchmarks.codecs [--tokens 14464] [--acts cache.npz] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CODECS = ["none", "zstd-1", "zstd-3", "zstd-5", "lz4", "blosc-zstd-1", "blosc-zstd-5", "blosc-lz4-5"]
RESID_LAYERS = (6, 15)
MLP_LAYER = 15
CONTEXT = 128


def real_activations(n_tokens: int, resid_layers=RESID_LAYERS, mlp_layer: int = MLP_LAYER,
                     batch: int = 8) -> dict[str, np.ndarray]:
    """float16 activations [n_tokens, 576] of the bundled model on stdlib text, keyed by classic
    TransformerLens hook names. Plain transformers hooks: this needs the numbers, not the harvest."""
    from benchmarks.data import token_windows
    from benchmarks.hf_model import activations, load_smollm2

    hooks = [f"blocks.{L}.hook_resid_post" for L in resid_layers] + [f"blocks.{mlp_layer}.hook_mlp_out"]
    model = load_smollm2(max(max(resid_layers), mlp_layer))
    got: dict[str, list] = {h: [] for h in hooks}
    for _tok, acts in activations(model, token_windows(n_tokens, CONTEXT), hooks, batch):
        for h in hooks:
            got[h].append(acts[h])
    return {h: np.concatenate(v) for h, v in got.items()}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


def _once(x: np.ndarray, codec: str, path: Path) -> tuple[float, float, int]:
    """Write x as one chunk with this codec, read it back: (encode s, decode s, stored bytes)."""
    import zarr

    from actcache.common.codecs import compressors

    arr = zarr.create_array(store=str(path), shape=x.shape, chunks=x.shape, dtype="float16",
                            compressors=compressors(codec), fill_value=0, zarr_format=3)
    t0 = time.perf_counter()
    arr[...] = x
    enc = time.perf_counter() - t0
    back = zarr.open_array(str(path), mode="r")
    back[...]  # the first read pays for opening files; time the warm one
    t0 = time.perf_counter()
    y = back[...]
    dec = time.perf_counter() - t0
    if not np.array_equal(y.view(np.uint16), x.view(np.uint16)):
        raise AssertionError(f"{codec} did not round-trip")
    stored = _dir_bytes(path)
    shutil.rmtree(path)
    return enc, dec, stored


def measure(x: np.ndarray, codecs: list[str] = None, repeats: int = 5) -> list[dict]:
    """Ratio, encode and decode MB/s (of uncompressed float16 bytes) of each codec on one chunk.
    Codecs take turns within each repeat and the best time counts, so that bursts of load on a
    shared machine hit every codec alike and then drop out."""
    codecs = codecs or CODECS
    root = Path(tempfile.mkdtemp(prefix="codec-"))
    best = {c: [float("inf"), float("inf"), 0] for c in codecs}
    try:
        _once(x, codecs[0], root / "warmup")
        for r in range(repeats):
            for c in codecs:
                enc, dec, stored = _once(x, c, root / f"{c}-{r}")
                b = best[c]
                b[0], b[1], b[2] = min(b[0], enc), min(b[1], dec), stored
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = x.nbytes / 1e6
    return [{"codec": c, "ratio": x.nbytes / best[c][2], "encode_MB_s": mb / best[c][0],
             "decode_MB_s": mb / best[c][1], "stored_bytes": best[c][2], "raw_bytes": x.nbytes} for c in codecs]


def run(acts: dict[str, np.ndarray], codecs: list[str] = CODECS, repeats: int = 5) -> dict:
    """Every codec on every hook's activations, and a per-codec summary over the hooks."""
    import numcodecs.blosc

    # per core: the loader decodes several chunks at once in a thread pool, so blosc's own
    # threads would only compete with it
    numcodecs.blosc.set_nthreads(1)
    rows = []
    for hook, x in acts.items():
        for r in measure(x, codecs, repeats):
            r["hook"] = hook
            rows.append(r)
            print(f"codecs: {hook:28s} {r['codec']:13s} ratio {r['ratio']:.3f} enc {r['encode_MB_s']:7.0f} MB/s "
                  f"dec {r['decode_MB_s']:7.0f} MB/s", file=sys.stderr)
    summary = summarise(rows)
    return {"rows": rows, "summary": summary, "choice": choose(summary), "rule": RULE,
            "shape": {k: list(v.shape) for k, v in acts.items()}, "blosc_threads": 1}


def summarise(rows: list[dict]) -> list[dict]:
    """Per codec over the hooks measured: the ratio of all bytes, the median encode and decode rates."""
    summary = []
    for c in dict.fromkeys(r["codec"] for r in rows):
        rs = [r for r in rows if r["codec"] == c]
        summary.append({
            "codec": c,
            "ratio": sum(r["raw_bytes"] for r in rs) / sum(r["stored_bytes"] for r in rs),
            "encode_MB_s": statistics.median(r["encode_MB_s"] for r in rs),
            "decode_MB_s": statistics.median(r["decode_MB_s"] for r in rs),
        })
    return summary


RULE = ("codecs that save under 2% are dropped ('none' does that job without the extra pass); of the rest, "
        "those decoding at >= 0.8x the fastest; of those, the best ratio (within 1%: the faster decoder)")


def choose(summary: list[dict], min_saving: float = 0.02, decode_share: float = 0.8, tie: float = 0.01) -> str:
    """The default codec by RULE: decode speed first, then ratio."""
    comp = [s for s in summary if s["codec"] != "none" and s["ratio"] >= 1 / (1 - min_saving)]
    if not comp:
        return "none"
    fastest = max(s["decode_MB_s"] for s in comp)
    ok = [s for s in comp if s["decode_MB_s"] >= decode_share * fastest]
    best_ratio = max(s["ratio"] for s in ok)
    near = [s for s in ok if s["ratio"] >= best_ratio * (1 - tie)]
    return max(near, key=lambda s: s["decode_MB_s"])["codec"]


def markdown(result: dict) -> str:
    lines = ["| codec | ratio | encode MB/s | decode MB/s |", "|---|---:|---:|---:|"]
    for s in result["summary"]:
        mark = " (default)" if s["codec"] == result["choice"] else ""
        lines.append(f"| {s['codec']}{mark} | {s['ratio']:.3f} | {s['encode_MB_s']:.0f} | {s['decode_MB_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=113 * CONTEXT, help="tokens of activations (default: one 16 MiB chunk)")
    ap.add_argument("--acts", help="an .npz of activations to reuse (written there when missing)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the JSON result here")
    a = ap.parse_args(argv)
    if a.acts and os.path.exists(a.acts):
        with np.load(a.acts) as z:
            acts = {k: z[k] for k in z.files}
    else:
        acts = real_activations(a.tokens)
        if a.acts:
            np.savez(a.acts, **acts)
    result = run(acts, repeats=a.repeats)
    print(markdown(result))
    print(f"default by rule: {result['choice']} ({RULE})")
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
