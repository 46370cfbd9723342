"""Evaluation speed: actcache's CE loss / KL evaluation against SAELens's run_evals called once per SAE,
on the same token windows of the bundled SmolLM2-135M, for 1 and for 8 SAEs at one hook.

actcache runs the clean model once per batch and, for the zero ablation and each SAE, only the layers
from the SAE's hook on; SAELens's get_recons_loss runs three full passes (clean, spliced, zero-ablated)
for every SAE. Both are timed without model loading; tokens/s = token positions of the windows / seconds.
SAELens runs in its own environment (transformer-lens 3) on the same weights (see eval_saelens_side.py).

    python -m benchmarks.bench_eval --saelens-python .venv-saelens/bin/python [--windows 16 --ctx 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import emit_result

ROOT = Path(__file__).resolve().parents[1]


def random_topk_saes(d: int, n: int, hook: str, d_sae: int, k: int, seed: int = 0):
    from actcache.common.sae import SAE, Metadata, SAEConfig

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w_dec = torch.randn(d_sae, d, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        meta = Metadata(hook_name=hook, hook_head_index=None, model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                        context_size=128, prepend_bos=True, dataset_path="", sae_lens_version="6.54.12",
                        sae_lens_training_version="6.54.12")
        out.append(SAE(SAEConfig("topk", d, d_sae, k=k, metadata=meta),
                       {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": w_dec,
                        "b_dec": torch.zeros(d)}))
    return out


def save_plain_hf(hf, tok, folder: Path) -> None:
    """The GGUF-loaded model's weights as a plain Hugging Face folder (save_pretrained refuses it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saelens-python", default=os.environ.get("ACTCACHE_SAELENS_PYTHON"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hook", default="blocks.4.hook_resid_post")
    ap.add_argument("--n-saes", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    args = ap.parse_args(argv)
    from actcache.harvest.evaluate import downstream_metrics
    from actcache.common.manifest import special_token_ids
    from actcache.harvest.models import DEFAULT_MODEL, load_model

    from benchmarks.data import token_windows

    model = load_model(DEFAULT_MODEL, device=args.device, dtype=args.dtype)
    tok = model.tokenizer
    windows = token_windows(args.windows * args.ctx, args.ctx, tokenizer=tok)[: args.windows]
    special = special_token_ids(tok)
    saes = random_topk_saes(model.info.d_model, args.n_saes, args.hook, 4 * model.info.d_model, 32)
    batches = [torch.from_numpy(windows[i:i + args.batch].astype(np.int64)) for i in range(0, len(windows), args.batch)]
    n_tok = int(windows.size)
    result: dict = {"model": DEFAULT_MODEL, "hook": args.hook, "tokens": n_tok, "windows": args.windows,
                    "context_size": args.ctx, "batch": args.batch, "device": args.device, "dtype": args.dtype,
                    "threads": torch.get_num_threads(), "actcache": {}}
    for n in (1, args.n_saes):
        t = time.perf_counter()
        m = downstream_metrics(model, batches, {f"s{i}": s for i, s in enumerate(saes[:n])}, special_ids=special)
        secs = time.perf_counter() - t
        result["actcache"][f"{n}_saes"] = {"seconds": secs, "tokens_per_s": n_tok / secs,
                                           "ce_loss_score_s0": m["s0"]["ce_loss_score"]}
        print(f"actcache, {n} SAE(s): {n_tok / secs:.0f} tokens/s", file=sys.stderr)
    if args.saelens_python:
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            _save_from_gguf(tok, work / "hf")
            np.save(work / "toks.npy", windows)
            dirs = []
            for i, s in enumerate(saes):
                s.save_model(work / f"s{i}")
                dirs += ["--sae", str(work / f"s{i}")]
            res = subprocess.run([args.saelens_python, str(ROOT / "benchmarks" / "eval_saelens_side.py"), "--hf-folder",
                                  str(work / "hf"), "--tokens", str(work / "toks.npy"), "--batch", str(args.batch),
                                  "--special", ",".join(map(str, special)), *dirs],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            sl = json.loads(res.stdout.strip().splitlines()[-1])
        per = [v["seconds"] for v in sl["saes"].values()]
        result["saelens"] = {"1_saes": {"seconds": per[0], "tokens_per_s": n_tok / per[0],
                                        "ce_loss_score_s0": list(sl["saes"].values())[0]["ce_loss_score"]},
                             f"{args.n_saes}_saes": {"seconds": sum(per), "tokens_per_s": n_tok / sum(per)},
                             "max_abs_logit_diff": sl["max_abs_logit_diff"]}
        result["ratio"] = {k: result["actcache"][k]["tokens_per_s"] / result["saelens"][k]["tokens_per_s"]
                           for k in ("1_saes", f"{args.n_saes}_saes")}
    emit_result(result, args.out)
    return result


def _save_from_gguf(tok, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from benchmarks.data import bundled_gguf

    gguf_folder, name = bundled_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=name, dtype=torch.float32)
    save_plain_hf(hf, tok, folder)


if __name__ == "__main__":
    main()
