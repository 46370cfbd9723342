"""`actcache explore` against the commands that load the model for every question.

Set-up (not timed): a small store of the bundled SmolLM2-135M (demo_harvest), a run holding one TopK SAE
at blocks.4.hook_resid_post (random weights: the cost of a question does not depend on them) and its
features output. Then, each in a fresh process as a user runs it:
  explore:   `actcache explore RUN --port 0`: seconds until it serves (model and SAE loaded), then the
             seconds to answer a prompt (top latents of every token with their top contexts) and a
             steering request (steered and plain continuation of --new-tokens tokens), twice each
  analyse:   `actcache analyse SAE --prompt P`: the whole command (load, encode, print)
  steer:     `actcache steer SAE --feature L --prompt P --max-new-tokens N`: the whole command

    python -m benchmarks.bench_explore                              # 8k tokens harvested, 20 new tokens
    python -m benchmarks.bench_explore --threads 1 --out benchmarks/results/explore-cpu.json

Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.harvest.demo import demo_harvest
from actcache.harvest.models import DEFAULT_MODEL, load_model
from actcache.train.features import write_features
from benchmarks.report import emit_result

HOOK = "blocks.4.hook_resid_post"
PROMPT = "def read_config(path):\n    with open(path) as f:"
STEER_PROMPT = "The weather today is"
LATENT = 3


def env(threads: int | None) -> dict[str, str]:
    """The environment of a measured process: offline, and with `threads` torch threads when given."""
    e = dict(os.environ)
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return e


def build(work: Path, tokens: int) -> Path:
    """The store, a run of one TopK SAE naming the bundled model, and the run's features output."""
    store = work / "acts.zarr"
    demo_harvest(str(store), tokens=tokens, overwrite=True, progress=False)
    model = load_model(DEFAULT_MODEL, device="cpu")
    d = int(model.info.d_model)
    g = torch.Generator().manual_seed(0)
    meta = Metadata(hook_name=HOOK, model_spec=DEFAULT_MODEL, prepend_bos=True)
    run = work / "run"
    SAE(SAEConfig("topk", d, 4 * d, k=32, metadata=meta),
        {"W_enc": torch.randn(d, 4 * d, generator=g) / d ** 0.5, "b_enc": torch.zeros(4 * d),
         "W_dec": torch.randn(4 * d, d, generator=g) / d ** 0.5, "b_dec": torch.zeros(d)}).save_model(run / "topk")
    (run / "summary.json").write_text(json.dumps({"store": str(store), "saes": [{"name": "topk"}]}))
    write_features(run, run / "features", held_out=False, unembedding=model.tl.W_U.detach().float(),
                   tokenizer=model.tokenizer, progress=False)
    return run


def post(url: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def explore(run: Path, new_tokens: int, threads: int | None) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "actcache", "explore", str(run), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(threads), cwd=ROOT)
    try:
        line = p.stdout.readline()
        if not line.startswith("explore: http://"):
            raise SystemExit(f"explore did not start: {line!r} {p.stderr.read()[-2000:]}")
        ready = time.perf_counter() - t
        url = line.split()[1]
        out = {"startup_s": round(ready, 2), "prompt_s": [], "steer_s": []}
        for _ in range(2):
            s, top = post(url + "api/top_features", {"text": PROMPT, "k": 5})
            out["prompt_s"].append(round(s, 3))
            s, st = post(url + "api/steer", {"prompt": STEER_PROMPT, "latent": LATENT, "strength": 8,
                                             "tokens": new_tokens})
            out["steer_s"].append(round(s, 3))
        out["prompt_tokens"] = len(top["tokens"])
        out["contexts_per_latent"] = len(top["tokens"][-1]["latents"][0]["contexts"]) if top["tokens"][-1]["latents"] else 0
        out["steered_text"] = st["steered_text"]
        return out
    finally:
        p.terminate()
        p.wait(60)


def command(args: list[str], threads: int | None) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True, env=env(threads),
                       cwd=ROOT, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"actcache {' '.join(args)} failed: {r.stderr[-2000:]}")
    return round(time.perf_counter() - t, 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens harvested for the features output")
    ap.add_argument("--new-tokens", type=int, default=20, help="tokens each steering request generates")
    ap.add_argument("--work", default=None, help="folder for the store and run (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every process (1 on a machine that other work keeps busy)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        t = time.perf_counter()
        run = build(work, args.tokens)
        setup = time.perf_counter() - t
        result = {"benchmark": "explore", "model": DEFAULT_MODEL, "hook": HOOK, "new_tokens": args.new_tokens,
                  "setup_s": round(setup, 1), "explore": explore(run, args.new_tokens, args.threads),
                  "analyse_command_s": command(["analyse", str(run / "topk"), "--prompt", PROMPT], args.threads),
                  "steer_command_s": command(["steer", str(run / "topk"), "--feature", str(LATENT), "--prompt",
                                              STEER_PROMPT, "--max-new-tokens", str(args.new_tokens)], args.threads),
                  "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": args.threads}
    e = result["explore"]
    result["prompt_speedup"] = round(result["analyse_command_s"] / min(e["prompt_s"]), 1)
    result["steer_speedup"] = round(result["steer_command_s"] / min(e["steer_s"]), 1)
    emit_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
