"""Everything SAELens does in the side-by-side benchmark, run in an environment with sae-lens
(transformer-lens < 4); prints one JSON object on stdout. benchmarks/run.py calls it in a subprocess.

Parts (--parts, comma-separated):
  harvest   bare forward pass (run_with_cache with the hooks and stop layer, copied to CPU float16)
            and CacheActivationsRunner (float16): tokens/s and bytes on disk per token, for one
            hook and for four hooks (four runs: SAELens caches one hook per run)
  loader    ActivationsStore reading the cache it wrote: tokens/s delivered as training batches
  sweep     the TopK configurations trained one after another from a SAELens cache of the SAME
            activations as the actcache store (converted to SAELens's cache format here)
  onthefly  the same configurations trained one after another with the model in the loop
  multi     the same configurations trained together by MultiSAETrainingRunner: one forward pass of
            the model per batch feeds every SAE (on the fly, no cache)
  eval      explained variance, L0 and dead fraction on held-out activations of every SAE folder
            given (SAELens's from the sweep and any --eval-dirs), all through sae_lens.SAE

SAELens's runners load models by name. No hub is reachable, so this script builds a randomly
initialised HookedTransformer of the bundled model's shape (SmolLM2-135M: Llama, 30 layers,
d_model 576) and hands it over: CacheActivationsRunner's module-level load_model is patched to
return it, and the training runner gets it as override_model. The output says so ("model_note").
With --weights the model holds the weights of the model actcache harvested (benchmarks/run.py
exports them for a random: model: TransformerLens 3 and 4 build different weights from the same
random spec and seed), so that the SAEs trained with the model in the loop (onthefly, multi) learn
the activations the store holds and are scored on; "model_check" says whether SAELens's model
reproduces the store's activations.

    python benchmarks/saelens_side.py --tokens toks.npy --parts harvest,loader --work /tmp/sl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

# SmolLM2-135M (read from its GGUF config): the shape of the random model handed to SAELens
SMOLLM2_SHAPE = dict(
    n_layers=30, d_model=576, d_head=64, n_heads=9, n_key_value_heads=3, d_mlp=1536, d_vocab=49152,
    n_ctx=2048, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
    rotary_dim=64, rotary_base=100000, gated_mlp=True, final_rms=True, eps=1e-5,
    original_architecture="LlamaForCausalLM",
)
SPECIAL_TOKENS = [1, 2]  # SmolLM2's <|im_start|> (BOS) and <|im_end|> (EOS, pad): left out of training
MODEL_NOTE = ("SAELens loads models by name and no hub is reachable: a randomly initialised HookedTransformer of "
              "SmolLM2-135M's shape (seed 0) was handed to it (CacheActivationsRunner: its load_model patched to "
              "return that model; training runner: override_model).")


def log(msg: str) -> None:
    print(f"saelens_side: {msg}", file=sys.stderr, flush=True)


def layer_of(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        raise ValueError(f"expected a blocks.L.* hook name, got {hook}")
    return int(m.group(1))


def build_model(shape: dict, seed: int = 0):
    """A randomly initialised HookedTransformer with this shape (same seed => same weights)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**shape, seed=seed, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.eval()
    return model


def load_weights(model, path: str) -> None:
    """Load a HookedTransformer state dict (safetensors) into the model; every parameter must be in it."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise SystemExit(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]} (of {len(missing)}, "
                         f"{len(unexpected)})")


@torch.no_grad()
def model_check(model, store: str, hook: str, n_seq: int = 4) -> dict:
    """Does this model produce the store's activations? Run it on the store's first windows and
    compare with what the store holds (float16): the relative error ||x - y|| / ||x||. SAEs trained
    with the model in the loop (on the fly, MultiSAETrainingRunner) are comparable with the store's
    only when it does."""
    import zarr

    root = zarr.open_group(store, mode="r")
    ctx = root.attrs["actcache"]["context_size"]
    toks = torch.from_numpy(np.asarray(root["tokens"][:n_seq]).astype(np.int64))
    x = torch.from_numpy(np.asarray(root["activations"][hook][:len(toks) * ctx]).astype(np.float32))
    y = model.run_with_cache(toks, names_filter=[hook], stop_at_layer=layer_of(hook) + 1)[1][hook]
    rel = float((x - y.reshape(x.shape)).norm() / x.norm())
    return {"relative_error": rel, "same_model": rel < 0.01, "sequences": int(len(toks))}


def token_dataset(tokens: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": tokens.astype(np.int64).tolist()})


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- harvest
@torch.no_grad()
def bare_forward_rate(model, tokens: np.ndarray, hooks: list[str], batch: int) -> float:
    """tokens/s of run_with_cache with the hooks and their stop layer, copied to CPU float16."""
    stop = max(layer_of(h) for h in hooks) + 1
    t = torch.as_tensor(tokens, dtype=torch.long)
    best = 0.0
    for _ in range(2):  # the better of two passes: the bound should not carry first-call costs
        t0 = time.perf_counter()
        for i in range(0, len(t), batch):
            _, cache = model.run_with_cache(t[i:i + batch], names_filter=hooks, stop_at_layer=stop)
            for h in hooks:
                cache[h].to("cpu", torch.float16)
        best = max(best, t.numel() / (time.perf_counter() - t0))
    return best


def cache_run(model, tokens: np.ndarray, hook: str, batch: int, out: Path) -> dict:
    """One CacheActivationsRunner run (float16) over exactly these tokens."""
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    n_tok = tokens.size
    ctx = tokens.shape[1]
    d = model.cfg.d_model
    # one buffer holding exactly the run's tokens (the runner fills whole buffers)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="benchmark-tokens", model_name="random-smollm2-shape", model_batch_size=batch,
        hook_name=hook, d_in=d, training_tokens=n_tok, context_size=ctx, new_cached_activations_path=str(out),
        dtype="float16", device="cpu", buffer_size_gb=n_tok * d * 2 / 1e9, prepend_bos=False,
        shuffle=True, seed=0,
    )
    if out.exists():
        shutil.rmtree(out)
    real_loader = car.load_model
    car.load_model = lambda *a, **k: model  # see MODEL_NOTE
    try:
        t0 = time.perf_counter()
        runner = car.CacheActivationsRunner(cfg, override_dataset=token_dataset(tokens))
        runner.run()
        dt = time.perf_counter() - t0
    finally:
        car.load_model = real_loader
    return {"hook": hook, "seconds": dt, "tokens": n_tok, "tokens_per_s": n_tok / dt,
            "bytes_on_disk": dir_bytes(out), "bytes_per_token": dir_bytes(out) / n_tok}


def part_harvest(model, tokens, hook, hooks4, batch, work: Path) -> dict:
    res: dict = {"hook": hook, "hooks4": hooks4, "tokens": int(tokens.size), "batch_sequences": batch}
    with torch.no_grad():  # warm-up, so that no timed run pays for first calls
        model(torch.as_tensor(tokens[:batch], dtype=torch.long), stop_at_layer=1 + max(map(layer_of, hooks4 + [hook])))
    log(f"bare forward, 1 hook ({tokens.size} tokens)")
    res["bare_1hook_tokens_per_s"] = bare_forward_rate(model, tokens, [hook], batch)
    log("CacheActivationsRunner, 1 hook")
    one = cache_run(model, tokens, hook, batch, work / "cache" / hook)
    res["cache_1hook"] = one
    res["cache_1hook_tokens_per_s"] = one["tokens_per_s"]
    res["cache_bytes_per_token"] = one["bytes_per_token"]
    res["cache_vs_bare_1hook"] = one["tokens_per_s"] / res["bare_1hook_tokens_per_s"]
    log(f"bare forward, {len(hooks4)} hooks")
    res["bare_4hooks_tokens_per_s"] = bare_forward_rate(model, tokens, hooks4, batch)
    runs, total = [], 0.0
    for h in hooks4:
        log(f"CacheActivationsRunner, hook {h}")
        r = one if h == hook else cache_run(model, tokens, h, batch, work / "cache" / h)
        runs.append(r)
        total += r["seconds"]
    res["cache_4hooks_runs"] = runs
    res["cache_4hooks_seconds"] = total
    res["cache_4hooks_tokens_per_s"] = tokens.size / total
    res["cache_vs_bare_4hooks"] = res["cache_4hooks_tokens_per_s"] / res["bare_4hooks_tokens_per_s"]
    res["cache_dir"] = str(work / "cache" / hook)
    return res


# ----------------------------------------------------------------------------- loader
def runner_config(hook: str, d: int, ctx: int, n_tokens: int, k: int, expansion: int, *, batch_size: int, lr: float,
                  seq_batch: int, cached: str | None, seed: int = 0):
    """The LanguageModelSAERunnerConfig of one TopK SAE, set to match actcache's sweep: same lr,
    batch, tokens, linear decay over the last fifth, AuxK coefficient 1/32, inputs scaled to
    E||x|| = sqrt(d_in), special tokens left out; no W&B, no checkpoints, no saved output."""
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    n_steps = n_tokens // batch_size
    sae = TopKTrainingSAEConfig(d_in=d, d_sae=d * expansion, k=k, aux_loss_coefficient=1 / 32,
                                normalize_activations="expected_average_only_in", dtype="float32", device="cpu")
    return LanguageModelSAERunnerConfig(
        sae=sae, model_name="random-smollm2-shape", hook_name=hook, dataset_path="benchmark-tokens",
        is_dataset_tokenized=True, streaming=False, context_size=ctx, use_cached_activations=cached is not None,
        cached_activations_path=cached, training_tokens=n_steps * batch_size, train_batch_size_tokens=batch_size,
        store_batch_size_prompts=seq_batch, n_batches_in_buffer=max(2, 2 * batch_size // ctx),
        prepend_bos=False, lr=lr, lr_warm_up_steps=0, lr_decay_steps=max(1, n_steps // 5), device="cpu",
        seed=seed, dtype="float32", exclude_special_tokens=list(SPECIAL_TOKENS),
        n_batches_for_norm_estimate=max(1, n_steps // 16),  # its default, 1000, would outweigh short runs
        dead_feature_window=max(1, n_steps),
        feature_sampling_window=max(1, n_steps), logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None, output_path=None, verbose=False,
    )


def part_loader(model, tokens, hook, cache_dir: str, batch_size: int, n_batches: int, seq_batch: int = 32) -> dict:
    """tokens/s of ActivationsStore serving training batches from its cache (warm page cache)."""
    from sae_lens.training.activations_store import ActivationsStore

    seq_batch = min(seq_batch, len(tokens))  # it cannot read more rows at once than the cache holds
    cfg = runner_config(hook, model.cfg.d_model, tokens.shape[1], tokens.size, 32, 8, batch_size=batch_size, lr=2e-4,
                        seq_batch=seq_batch, cached=cache_dir)
    cfg.exclude_special_tokens = False  # the plain loader, as a user starts it
    # read the whole cache once so that both timed passes find it in the page cache
    for p in Path(cache_dir).rglob("*.arrow"):
        p.read_bytes()
    store = ActivationsStore.from_config(model, cfg, override_dataset=token_dataset(tokens[:1]))
    next(store)
    t0 = time.perf_counter()
    served = 0
    for _ in range(n_batches):
        served += next(store).shape[0]
    dt = time.perf_counter() - t0
    return {"tokens_per_s": served / dt, "batches": n_batches, "batch_size": batch_size,
            "store_batch_size_prompts": seq_batch, "cache_dir": cache_dir,
            "note": "ActivationsStore over its own CacheActivationsRunner output (float16 on disk, float32 batches, "
                "store_batch_size_prompts 32 = its default); the cache is re-read when it runs out"}


# ----------------------------------------------------------------------------- sweep
def store_to_cache(store: str, hook: str, out: Path, max_tokens: int | None = None) -> int:
    """Write an actcache store's activations of one hook (read with plain zarr, the public format)
    as a SAELens activation cache (float16 Array2D [context, d] per sequence, with token_ids)."""
    import zarr
    from datasets import Array2D, Dataset, Features, Sequence, Value, concatenate_datasets

    root = zarr.open_group(store, mode="r")
    man = root.attrs["actcache"]
    ctx = man["context_size"]
    n_seq = man["n_chunks_committed"] * man["chunk_sequences"]
    n_seq = min(n_seq, man["n_sequences"])
    if max_tokens:
        n_seq = min(n_seq, -(-max_tokens // ctx))
    acts = root["activations"][hook]
    d = acts.shape[1]
    feats = Features({hook: Array2D(shape=(ctx, d), dtype="float16"),
                      "token_ids": Sequence(Value("int32"), length=ctx)})
    parts = []
    step = 64
    for a in range(0, n_seq, step):
        b = min(n_seq, a + step)
        x = np.asarray(acts[a * ctx:b * ctx]).reshape(b - a, ctx, d)
        t = np.asarray(root["tokens"][a:b]).astype(np.int32)
        parts.append(Dataset.from_dict({hook: x, "token_ids": t}, features=feats))
    if out.exists():
        shutil.rmtree(out)
    concatenate_datasets(parts).shuffle(seed=0).flatten_indices().save_to_disk(str(out))
    return n_seq * ctx


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'16x8,32x8' -> [(16, 8), (32, 8)]: k x expansion."""
    out = []
    for part in text.split(","):
        k, x = part.lower().split("x")
        out.append((int(k), int(x)))
    return out


def train_one(model, tokens, hook, k, x, n_tokens, batch_size, lr, seq_batch, cached, out_dir: Path) -> dict:
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

    cfg = runner_config(hook, model.cfg.d_model, tokens.shape[1], n_tokens, k, x, batch_size=batch_size, lr=lr,
                        seq_batch=seq_batch, cached=cached)
    t0 = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset(tokens), override_model=model)
    sae = runner.run()
    dt = time.perf_counter() - t0
    name = f"topk-k{k}-x{x}"
    path = out_dir / name
    if path.exists():
        shutil.rmtree(path)
    sae.save_inference_model(str(path))
    return {"name": name, "k": k, "expansion": x, "seconds": dt, "dir": str(path),
            "train_l0_window": sae.cfg.metadata.l0, "train_dead": sae.cfg.metadata.num_dead_features}


def part_sweep(model, tokens, hook, configs, n_tokens, batch_size, lr, seq_batch, cached, out_dir: Path,
               label: str) -> dict:
    runs = []
    t0 = time.perf_counter()
    for k, x in configs:
        log(f"{label}: training topk k={k} x{x} on {n_tokens} tokens")
        runs.append(train_one(model, tokens, hook, k, x, n_tokens, batch_size, lr, seq_batch, cached, out_dir))
    return {"seconds": time.perf_counter() - t0, "runs": runs, "tokens": n_tokens, "batch_size": batch_size,
            "lr": lr, "cache": cached}


def part_multi(model, tokens, hook, configs, n_tokens, batch_size, lr, seq_batch, out_dir: Path) -> dict:
    """The configurations trained together by MultiSAETrainingRunner (one forward pass per batch feeds
    them all), with each SAE set exactly as runner_config sets it for the one-by-one runs."""
    from sae_lens import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    ref = runner_config(hook, model.cfg.d_model, tokens.shape[1], n_tokens, configs[0][0], configs[0][1],
                        batch_size=batch_size, lr=lr, seq_batch=seq_batch, cached=None)
    saes = {}
    for k, x in configs:
        one = runner_config(hook, model.cfg.d_model, tokens.shape[1], n_tokens, k, x, batch_size=batch_size, lr=lr,
                            seq_batch=seq_batch, cached=None)
        saes[f"topk-k{k}-x{x}"] = one.sae
    shared = {f: getattr(ref, f) for f in (
        "context_size", "training_tokens", "train_batch_size_tokens", "store_batch_size_prompts",
        "n_batches_in_buffer", "prepend_bos", "lr", "lr_warm_up_steps", "lr_decay_steps", "device", "seed",
        "dtype", "exclude_special_tokens", "n_batches_for_norm_estimate", "dead_feature_window",
        "feature_sampling_window", "logger")}
    cfg = MultiSAETrainingRunnerConfig(saes=saes, hook_names=hook, model_name="random-smollm2-shape",
                                       dataset_path="benchmark-tokens", streaming=False, checkpoint_path=None,
                                       output_path=None, **shared)
    log(f"MultiSAETrainingRunner: {len(saes)} SAEs on {n_tokens} tokens, one forward pass per batch")
    t0 = time.perf_counter()
    trained = MultiSAETrainingRunner(cfg, override_dataset=token_dataset(tokens), override_model=model).run()
    dt = time.perf_counter() - t0
    runs = []
    for name, sae in trained.items():
        path = out_dir / name
        if path.exists():
            shutil.rmtree(path)
        sae.save_inference_model(str(path))
        runs.append({"name": name, "dir": str(path)})
    return {"seconds": dt, "runs": runs, "tokens": n_tokens, "batch_size": batch_size, "lr": lr}


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_dirs(dirs: list[str], store: str, hook: str, max_tokens: int, skip: list[int] = SPECIAL_TOKENS) -> dict:
    """Explained variance (1 - SSE/SST over tokens), mean L0 and the fraction of latents that never
    fire, on held-out activations read from an actcache store, for SAE folders loaded with sae_lens."""
    import zarr
    from sae_lens import SAE

    root = zarr.open_group(store, mode="r")
    man = root.attrs["actcache"]
    ctx = man["context_size"]
    n = min(max_tokens, man["n_chunks_committed"] * man["chunk_sequences"] * ctx, man["n_sequences"] * ctx)
    x = torch.from_numpy(np.asarray(root["activations"][hook][:n]).astype(np.float32))
    toks = np.asarray(root["tokens"][: -(-n // ctx)]).reshape(-1)[:n]
    keep = torch.from_numpy(~np.isin(toks, skip))
    x = x[keep]
    sst = (x - x.mean(0)).pow(2).sum()
    out = {}
    for d in dirs:
        sae = SAE.load_from_disk(d, device="cpu")
        sae.eval()
        sse, l0, fired = 0.0, 0.0, None
        for i in range(0, len(x), 4096):
            xb = x[i:i + 4096]
            f = sae.encode(xb)
            xh = sae.decode(f)
            sse += float((xb - xh).pow(2).sum())
            nz = f != 0
            l0 += float(nz.sum())
            fired = nz.any(0) if fired is None else fired | nz.any(0)
        out[Path(d).name + "@" + str(Path(d).parent)] = {
            "explained_variance": 1 - sse / float(sst), "l0": l0 / len(x),
            "dead_fraction": 1 - float(fired.float().mean()), "eval_tokens": int(len(x)),
        }
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="SAELens's side of the actcache benchmark; JSON on stdout")
    ap.add_argument("--tokens", required=True, help=".npy int32 [n_seq, context] token windows")
    ap.add_argument("--parts", default="harvest,loader,sweep,onthefly,eval")
    ap.add_argument("--hook", default="blocks.12.hook_resid_post")
    ap.add_argument("--hooks4", default="blocks.6.hook_resid_post,blocks.12.hook_resid_post,"
                                        "blocks.18.hook_resid_post,blocks.12.hook_mlp_out")
    ap.add_argument("--shape", default="", help="JSON overrides of the model shape (e.g. a smaller one)")
    ap.add_argument("--shape-from-scratch", action="store_true",
                    help="--shape is the whole HookedTransformerConfig, not overrides of SmolLM2-135M's shape")
    ap.add_argument("--model-batch", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--harvest-tokens", type=int, default=0, help="tokens for the harvest part (default: all)")
    ap.add_argument("--loader-batches", type=int, default=50)
    ap.add_argument("--loader-batch-size", type=int, default=4096)
    ap.add_argument("--store", help="actcache store whose activations the sweep trains on")
    ap.add_argument("--eval-store", help="actcache store of held-out activations for eval")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--eval-dirs", default="", help="more SAE folders to evaluate (comma-separated)")
    ap.add_argument("--configs", default="16x8,32x8,64x8,128x8,16x16,32x16,64x16,128x16")
    ap.add_argument("--sweep-tokens", type=int, default=32768)
    ap.add_argument("--onthefly-tokens", type=int, default=0, help="default: --sweep-tokens")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weights", help="HookedTransformer weights (safetensors) of the model actcache harvested: "
                                      "SAELens gets the same model, not only the same shape")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--work", required=True, help="folder for caches and SAEs")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    from importlib.metadata import version

    import sae_lens

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = [p for p in a.parts.split(",") if p]
    tokens = np.load(a.tokens)
    shape = dict({} if a.shape_from_scratch else SMOLLM2_SHAPE, **(json.loads(a.shape) if a.shape else {}))
    hooks4 = [h for h in a.hooks4.split(",") if h]
    configs = parse_configs(a.configs)
    result: dict = {"sae_lens_version": sae_lens.__version__, "transformer_lens_version": version("transformer-lens"),
                    "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "model_shape": shape, "parts": parts,
                    "model_note": MODEL_NOTE if not a.shape_from_scratch else (
                        "SAELens loads models by name and no hub is reachable: a randomly initialised HookedTransformer "
                        "of the shape the benchmark names (seed 0) was handed to it (override_model)")}
    t0 = time.perf_counter()
    model = build_model(shape)
    if a.weights:
        load_weights(model, a.weights)
        result["model_note"] = ("SAELens loads models by name and no hub is reachable: a HookedTransformer of the shape "
                                "the benchmark names, holding the weights of the model actcache harvested, was handed "
                                "to it (override_model)")
    result["model_build_s"] = time.perf_counter() - t0
    if a.eval_store:
        # SAEs trained with SAELens's model in the loop are scored on the store's activations:
        # that is fair only if its model is the store's
        result["model_check"] = model_check(model, a.eval_store, a.hook)
        log(f"SAELens's model vs the store's activations: relative error {result['model_check']['relative_error']:.2g}")
    if "harvest" in parts or "loader" in parts:
        ht = tokens[: max(1, a.harvest_tokens // tokens.shape[1])] if a.harvest_tokens else tokens
        ht = ht[: len(ht) // a.model_batch * a.model_batch] if len(ht) >= a.model_batch else ht
        if "harvest" in parts:
            result["harvest"] = part_harvest(model, ht, a.hook, hooks4, a.model_batch, work)
        if "loader" in parts:
            cache = work / "cache" / a.hook
            if not (cache / "dataset_info.json").exists():
                cache_run(model, ht, a.hook, a.model_batch, cache)
            log("ActivationsStore from its cache")
            result["loader"] = part_loader(model, ht, a.hook, str(cache), a.loader_batch_size, a.loader_batches)
    sweep_dirs: list[str] = []
    if "sweep" in parts:
        if not a.store:
            raise SystemExit("--store is needed for the sweep part")
        t0 = time.perf_counter()
        n = store_to_cache(a.store, a.hook, work / "store_cache", a.sweep_tokens)
        conv = time.perf_counter() - t0
        log(f"converted {n} tokens of {a.store} to a SAELens cache in {conv:.1f}s")
        r = part_sweep(model, tokens, a.hook, configs, a.sweep_tokens, a.batch_size, a.lr, a.model_batch,
                       str(work / "store_cache"), work / "saes_cached", "from cache")
        r["conversion_s"] = conv
        r["note"] = ("trained from a SAELens activation cache holding the actcache store's activations "
                     "(identical data for both tools); conversion time not counted")
        result["sweep_cached"] = r
        sweep_dirs = [x["dir"] for x in r["runs"]]
    if "onthefly" in parts:
        n = a.onthefly_tokens or a.sweep_tokens
        result["sweep_onthefly"] = part_sweep(model, tokens, a.hook, configs, n, a.batch_size, a.lr, a.model_batch,
                                              None, work / "saes_onthefly", "on the fly")
    if "multi" in parts:
        n = a.onthefly_tokens or a.sweep_tokens
        result["sweep_multi"] = part_multi(model, tokens, a.hook, configs, n, a.batch_size, a.lr, a.model_batch,
                                           work / "saes_multi")
        sweep_dirs += [x["dir"] for x in result["sweep_multi"]["runs"]]
    if "eval" in parts and a.eval_store:
        dirs = sweep_dirs + [d for d in a.eval_dirs.split(",") if d]
        log(f"evaluating {len(dirs)} SAEs on {a.eval_store}")
        result["eval"] = evaluate_dirs(dirs, a.eval_store, a.hook, a.eval_tokens)
        if not result["model_check"]["same_model"]:
            for key, m in result["eval"].items():
                if key.endswith("saes_multi"):  # trained on SAELens's model, scored on the store's
                    m["other_model"] = True
    out = json.dumps(result, indent=1, default=float)
    if a.json:
        Path(a.json).write_text(out)
    print(out)
    return result


if __name__ == "__main__":
    main()
