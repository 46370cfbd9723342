"""Steered generation with and without the key/value cache, in one process on one loaded model.

A Session.steer call generates the steered and the plain continuation as one batch of two sequences.
  whole:  every step runs the whole sequence so far through the model (the code before the cache)
  cached: the prompt runs once, then each new token alone against the cached keys and values
Both must produce the same tokens (checked here too); tokens/s counts the new tokens of one
continuation per second of the call (generation stops early when both continuations reach EOS: the
steps actually run are counted). Runs alternate (whole, cached, whole, ...) so both
see the same machine load; the median is reported.

    python -m benchmarks.bench_generation                          # the bundled SmolLM2-135M, 20 tokens
    python -m benchmarks.bench_generation --tokens 20 --repeats 3 --out benchmarks/results/generation.json

Prints one JSON object."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.harvest.models import DEFAULT_MODEL, load_model
from actcache.harvest.session import Session
from benchmarks.report import emit_result

PROMPT = "The weather today is"


def random_sae(folder: Path, model: str, hook: str, d: int, d_sae: int) -> Path:
    """A random SAE naming the model: generation's cost does not depend on the decoder row's values."""
    g = torch.Generator().manual_seed(0)
    meta = Metadata(hook_name=hook, model_spec=model, prepend_bos=True)
    SAE(SAEConfig("standard", d, d_sae, metadata=meta),
        {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5, "b_enc": torch.zeros(d_sae),
         "W_dec": torch.randn(d_sae, d, generator=g) / d ** 0.5, "b_dec": torch.zeros(d)}).save_model(folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--hook", default="blocks.4.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per continuation")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    d = int(model.info.d_model)
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(random_sae(Path(tmp) / "sae", args.model, args.hook, d, 4 * d), model=model)
        session.steer(args.prompt, 3, 4.0, 2)  # warm-up: first-call costs are no one's
        runs: dict[str, list[float]] = {"whole": [], "cached": []}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for mode in ("whole", "cached"):
                s = session.steer(args.prompt, 3, 4.0, args.tokens, use_cache=mode == "cached")
                runs[mode].append(s.seconds)
                tokens[mode] = s.steered_tokens + s.plain_tokens
                steps = max(len(s.steered_tokens), len(s.plain_tokens))
    same = tokens["whole"] == tokens["cached"]
    result = {
        "benchmark": "generation", "model": args.model, "hook": args.hook, "prompt": args.prompt,
        "new_tokens": args.tokens, "steps": steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "model_load_s": round(load_s, 2), "same_tokens": same,
        **{f"{m}_s": [round(x, 3) for x in v] for m, v in runs.items()},
        **{f"{m}_tokens_per_s": round(steps / statistics.median(v), 2) for m, v in runs.items()},
        "speedup": round(statistics.median(runs["whole"]) / statistics.median(runs["cached"]), 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    emit_result(result, args.out)
    if not same:
        raise SystemExit("the cached generation differs from the whole-sequence one")
    return result


if __name__ == "__main__":
    main()
