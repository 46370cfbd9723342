"""Features at width: the top-context pass of one wide TopK SAE (default 32 x d_model latents: 24,576
at d_model 768) over a fixed number of tokens of a large store, against the encoder alone, and its
memory against the bound the top-k structures set.

  rate     in one process, alternated, in CPU-seconds of the process: the SAE encoding the same
           tokens already in memory (the limit: `encode`, the dense code, and `encode_entries`, the
           positive entries straight from the selection, which is what the pass asks of a TopK SAE), and
           `collect_top_contexts` as `actcache features` runs it (read and decode each chunk, encode,
           keep the per-latent statistics);
  memory   in a child process of its own: resident memory before the pass (interpreter, torch, the
           SAE's weights) and the peak during it, against

             accumulators  d_sae x (12 top + 8 n_bins + 20 n_groups per_group + 24) bytes
             encode batch  B x d_sae x 4 bytes, at most 3 alive (pre-activations, the top-k, a dense
                           code; a TopK SAE's entries need only the first), B = max(128, min(8192,
                           2**26 // (4 d_sae))) rows
             chunks        3 x rows x d x 2 (the chunk in use, two read ahead) + rows x d x 4 (float32)

           (train/features/contexts.py, LatentAccumulator: the per-latent arrays; api.py: B, the read-ahead).

    python -m benchmarks.bench_features_width --store acts.zarr --tokens 65536
    python -m benchmarks.bench_features_width --store-tokens 1M     # builds a synthetic d 768 store first

Prints one JSON object (and writes it with --out)."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.progress import parse_count
from actcache.common.store import ActivationStore
from actcache.train.features.api import FeatureOptions, collect_top_contexts, sae_hook
from benchmarks.bench_features import load_range, synthetic_saes
from benchmarks.bench_scale import measure
from benchmarks.report import emit_result


def wide_sae(d: int, d_sae: int, k: int) -> dict:
    """One TopK SAE with random weights (the encoder cost of a trained one)."""
    return {n: s for n, s in synthetic_saes(d, d_sae, k).items() if n.startswith("topk")}


def batch_rows(d_sae: int) -> int:
    return max(128, min(8192, 2**26 // (4 * d_sae)))  # as collect_top_contexts chooses it


def memory_bound(d: int, d_sae: int, chunk_rows: int, opts: FeatureOptions) -> dict[str, int]:
    acc = d_sae * (12 * opts.top + 8 * opts.n_bins + 20 * opts.n_groups * opts.per_group + 24)
    enc = 3 * batch_rows(d_sae) * d_sae * 4
    chunks = 3 * chunk_rows * d * 2 + chunk_rows * d * 4
    return {"accumulators": acc, "encode_batch": enc, "chunks": chunks, "total": acc + enc + chunks}


def sequences_for(store: ActivationStore, tokens: int) -> tuple[int, int]:
    T = store.manifest.context_size
    return 0, min(store.n_committed * store.manifest.chunk_sequences, store.manifest.n_sequences, -(-tokens // T))


def rates(store_url: str, d_sae: int, k: int, tokens: int, rounds: int) -> dict:
    store = ActivationStore.open(store_url)
    d = store.manifest.hook(store.manifest.hook_names[0]).d
    saes = wide_sae(d, d_sae, k)
    hooks = {n: sae_hook(n, s, store) for n, s in saes.items()}
    a, b = sequences_for(store, tokens)
    xs, tok = load_range(store, set(hooks.values()), a, b, torch.device("cpu"))
    n, B = int(tok.numel()), batch_rows(d_sae)

    def encode_only() -> None:
        for r in range(0, n, B):
            for name, s in saes.items():
                s.encode(xs[hooks[name]][r:r + B])

    def entries_only() -> None:
        for r in range(0, n, B):
            for name, s in saes.items():
                s.encode_entries(xs[hooks[name]][r:r + B])

    def the_pass() -> None:
        collect_top_contexts(store, saes, hooks, (a, b), FeatureOptions(), "cpu")

    rows = []
    sides = (("encode", encode_only), ("entries", entries_only), ("pass", the_pass))
    with torch.no_grad():
        for _ in range(rounds):
            row = {}
            for name, fn in sides:
                w, c = time.perf_counter(), time.process_time()
                fn()
                row[name] = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
            rows.append(row)
    best = {k_: {m: min(r[k_][m] for r in rows) for m in ("wall", "cpu")} for k_, _ in sides}
    return {"tokens": n, "d": d, "d_sae": d_sae, "k": k, "batch_rows": B, "torch_threads": torch.get_num_threads(),
            "rounds": rows, "best": best,
            "encode_tokens_per_cpu_s": n / best["encode"]["cpu"], "pass_tokens_per_cpu_s": n / best["pass"]["cpu"],
            "pass_fraction_of_encode_cpu": best["encode"]["cpu"] / best["pass"]["cpu"],
            "pass_fraction_of_encode_wall": best["encode"]["wall"] / best["pass"]["wall"],
            "entries_tokens_per_cpu_s": n / best["entries"]["cpu"],
            "pass_fraction_of_entries_cpu": best["entries"]["cpu"] / best["pass"]["cpu"],
            "pass_fraction_of_entries_wall": best["entries"]["wall"] / best["pass"]["wall"]}


def child_memory(argv: list[str]) -> None:
    """In its own process: resident memory before the pass and its peak during it."""
    store_url, d_sae, k, tokens = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    store = ActivationStore.open(store_url)
    d = store.manifest.hook(store.manifest.hook_names[0]).d
    saes = wide_sae(d, d_sae, k)
    hooks = {n: sae_hook(n, s, store) for n, s in saes.items()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        collect_top_contexts(store, saes, hooks, sequences_for(store, tokens), FeatureOptions(), "cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_before_pass_bytes": before, "peak_rss_bytes": peak}))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "child-memory":
        child_memory(argv[1:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a store (default: a synthetic one of --store-tokens at --d)")
    ap.add_argument("--store-tokens", default="1M")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=parse_count, default=65_536)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    store, tmp = a.store, None
    if store is None:
        from benchmarks.synthetic import make_store

        tmp = Path(tempfile.mkdtemp(prefix="bench-features-width-"))
        store = str(tmp / "s.zarr")
        make_store(store, d=a.d, n_sequences=parse_count(a.store_tokens) // 128, context_size=128,
                   chunk_sequences=64, fast_random=True)
    st = ActivationStore.open(store)
    d = st.manifest.hook(st.manifest.hook_names[0]).d
    d_sae = a.expansion * d
    chunk_rows = st.manifest.chunk_sequences * st.manifest.context_size
    res = {"store": store, "store_tokens": st.n_committed_tokens, "command": "python -m benchmarks.bench_features_width "
           + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    res["rate"] = rates(store, d_sae, a.k, a.tokens, a.rounds)
    m = measure([sys.executable, "-m", "benchmarks.bench_features_width", "child-memory", store, str(d_sae), str(a.k),
                 str(a.tokens)], cwd=ROOT)
    if m["rc"] != 0:
        raise RuntimeError(f"the memory child failed: {m['stderr'][-2000:]}")
    mem = json.loads(m["stdout"])
    mem["pass_growth_bytes"] = mem["peak_rss_bytes"] - mem["rss_before_pass_bytes"]
    mem["bound"] = memory_bound(d, d_sae, chunk_rows, FeatureOptions())
    mem["growth_over_bound"] = mem["pass_growth_bytes"] / mem["bound"]["total"]
    res["memory"] = mem
    if tmp is not None:  # the synthetic store this run built in its own temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
    emit_result(res, a.out, indent=1)
    return res


if __name__ == "__main__":
    main()
