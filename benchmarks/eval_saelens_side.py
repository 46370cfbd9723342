"""SAELens's side of the evaluation comparison, run in an environment with sae-lens (transformer-lens 3):
sae_lens.evals.run_evals (CE loss and KL, nothing else) called once per SAE folder on given token windows,
with the bundled model rebuilt as a HookedTransformer from a Hugging Face folder saved from it. Prints
one JSON object on stdout.

TransformerLens 3 cannot load the GGUF file and does not list SmolLM2, so the model is a
HookedTransformer of SmolLM2-135M's shape whose weights come from the saved folder through
TransformerLens's own Llama weight conversion; "max_abs_logit_diff" reports how far its logits are
from the Hugging Face model's on the first window (a check that the two are the same model).

    python benchmarks/eval_saelens_side.py --hf-folder /tmp/smollm2 --tokens toks.npy --sae runs/s1/topk-k32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch


def build_model(folder: str):
    """The Hugging Face model in `folder` as a TransformerLens 3 HookedTransformer (no weight processing)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        d_head=c.hidden_size // c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=min(c.max_position_embeddings, 2048),
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads, rotary_base=_rope_theta(c), gated_mlp=True,
        final_rms=True, eps=c.rms_norm_eps, original_architecture="LlamaForCausalLM", device="cpu",
        dtype=torch.float32,
    )
    tok = AutoTokenizer.from_pretrained(folder)
    model = HookedTransformer(cfg, tokenizer=tok)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    return model, hf


def _rope_theta(c) -> float:
    theta = getattr(c, "rope_theta", None)
    if theta is None:
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


class Windows:
    """The few ActivationsStore methods run_evals's CE/KL path calls, over fixed token windows."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.i = 0
        self.store_batch_size_prompts = 8
        self.context_size = int(tokens.shape[1])

    def get_batch_tokens(self, batch_size: int | None = None, **_):
        n = batch_size or self.store_batch_size_prompts
        out = self.tokens[self.i:self.i + n]
        self.i += n
        return out

    def reset_input_dataset(self) -> None:
        self.i = 0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-folder", required=True)
    ap.add_argument("--tokens", required=True, help=".npy of int token windows [n, context]")
    ap.add_argument("--sae", action="append", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--special", default="", help="comma-separated token ids left out (SAELens's ignore tokens)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    toks = np.load(args.tokens)
    special = [int(s) for s in args.special.split(",") if s.strip()]
    t = time.perf_counter()
    model, hf = build_model(args.hf_folder)
    load_s = time.perf_counter() - t
    with torch.no_grad():
        first = torch.from_numpy(toks[:1].astype(np.int64))
        diff = float((model(first) - hf(first).logits).abs().max())
    n_batches = -(-len(toks) // args.batch)
    if len(toks) % args.batch:
        raise SystemExit("--tokens must hold a multiple of --batch windows")
    cfg = EvalConfig(batch_size_prompts=args.batch, n_eval_reconstruction_batches=n_batches, compute_kl=True,
                     compute_ce_loss=True)
    out = {"max_abs_logit_diff": diff, "model_load_s": load_s, "tokens": int(toks.size), "saes": {}}
    total = 0.0
    for d in args.sae:
        sae = SAE.load_from_disk(d, device="cpu")
        t = time.perf_counter()
        metrics, _ = run_evals(sae, Windows(toks), model, ActivationScaler(), eval_config=cfg,
                               exclude_special_tokens=special or False)
        secs = time.perf_counter() - t
        total += secs
        flat = {**metrics["model_behavior_preservation"], **metrics["model_performance_preservation"]}
        out["saes"][d] = {**{k: float(v) for k, v in flat.items()}, "seconds": secs}
    out["seconds"] = total
    out["tokens_per_s"] = toks.size / total if total else None
    json.dump(out, sys.stdout)
    print()
    return out


if __name__ == "__main__":
    main()
