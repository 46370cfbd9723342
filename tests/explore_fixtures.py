"""A tiny lab for the session and explore tests, built in seconds without a hub: a randomly initialised
Llama saved as a Hugging Face folder (so it loads through the same path as a real model, key/value
cache included) with a word-level tokenizer (" w17" is token 17), a synthetic store of the same
vocabulary and width, a run of two SAEs that name the model, and that run's features output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.synthetic import make_store

VOCAB = 1000
D = 64
LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
N_CTX = 64
SAE_NAMES = ("alpha", "beta")
D_SAE = {"alpha": 96, "beta": 300}  # beta spans two blocks of the features output (256 latents each)


@dataclass
class Lab:
    model_dir: Path
    store: Path
    run: Path
    features: Path
    hf: object        # the transformers model the folder was saved from (the independent reference)
    tokenizer: object


def word_tokenizer():
    """A fast tokenizer whose words are w3 .. w999 (ids 3 .. 999), with <unk> 0, <s> 1 and </s> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def random_sae(name: str, model_spec: str, seed: int):
    from actcache.common.sae import SAE, Metadata, SAEConfig

    d_sae = D_SAE[name]
    g = torch.Generator().manual_seed(seed)
    meta = Metadata(hook_name=HOOK, model_spec=model_spec, prepend_bos=True)
    return SAE(SAEConfig("standard", D, d_sae, metadata=meta),
               {"W_enc": torch.randn(D, d_sae, generator=g) / D ** 0.5, "b_enc": torch.zeros(d_sae),
                "W_dec": torch.randn(d_sae, D, generator=g) / D ** 0.5, "b_dec": torch.zeros(D)})


def build_lab(base: Path, features: bool = True) -> Lab:
    from actcache.train.features import write_features

    hf = tiny_llama()
    tok = word_tokenizer()
    model_dir = base / "tiny-llama"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    store = base / "acts.zarr"
    make_store(store, d=D, n_features=32, n_sequences=48, context_size=16, chunk_sequences=16, hooks=(HOOK,), seed=3)
    run = base / "run"
    for i, name in enumerate(SAE_NAMES):
        random_sae(name, str(model_dir), i).save_model(run / name)
    (run / "summary.json").write_text(json.dumps({"store": str(store), "saes": [{"name": n} for n in SAE_NAMES]}))
    out = run / "features"
    if features:
        write_features(run, out, held_out=False, top=6, tokenizer=tok, progress=False)
    return Lab(model_dir, store, run, out, hf, tok)


def hf_greedy(hf, ids: list[int], n: int, direction: torch.Tensor | None = None, n_prompt: int | None = None,
              layer: int = LAYER):
    """Greedy tokens and per-step last logits of the transformers model alone, the whole sequence at every
    step, with `direction` added to the output of decoder layer `layer` by a plain forward hook (at every
    position, or at positions below n_prompt): the independent reference for steering."""
    def add(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        stop = h.shape[1] if n_prompt is None else min(n_prompt, h.shape[1])
        h = h.clone()
        h[:, :stop] += direction
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = hf.model.layers[layer].register_forward_hook(add) if direction is not None else None
    seq, toks, logits = list(ids), [], []
    try:
        with torch.no_grad():
            for _ in range(n):
                last = hf(torch.tensor([seq])).logits[0, -1]
                logits.append(last)
                toks.append(int(last.argmax()))
                seq.append(toks[-1])
    finally:
        if handle is not None:
            handle.remove()
    return toks, torch.stack(logits)


def hf_hook_activation(hf, ids: list[int]) -> torch.Tensor:
    """The output of decoder layer LAYER [pos, d] from the transformers model, by a plain forward hook."""
    got = {}
    h = hf.model.layers[LAYER].register_forward_hook(
        lambda m, i, o: got.setdefault("x", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        h.remove()
    return got["x"][0]
