"""The side-by-side benchmark against SAELens, in one command (`make bench`, `make bench-quick`).

Runs our side in this process (benchmarks.bench_harvest, benchmarks.bench_train, harvest, train)
and SAELens's side in its own environment (benchmarks/saelens_side.py, a subprocess), on the same
model shape, the same token windows and the same SAE configurations; computes the ratios against
the goals of the issue and writes benchmarks/results/<date>-<host>.json and .md, and latest.md
(--quick: a smoke test at small sizes, written under benchmarks/results/quick/, never latest.md).
A part whose code is not installed is recorded as missing, with the reason; the rest still runs.

    python -m benchmarks.run [--quick] [--saelens-python PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = [(k, x) for x in (8, 16) for k in (16, 32, 64, 128)]  # TopK: k x expansion


@dataclass
class Plan:
    """Sizes of one benchmark run; --quick shrinks tokens and uses shallow hooks, same model shape."""

    hook: str
    hooks4: list[str]
    harvest_tokens: int
    sweep_tokens: int
    eval_tokens: int
    # SAE training batch (tokens) and lr, both tools: at batch 1024 / lr 2e-4, 32 steps left every
    # SAELens SAE below zero explained variance, so parity could not be judged; 128 steps at 1e-3 can
    batch_size: int = 256
    loader_batch_size: int = 4096
    lr: float = 1e-3
    model_batch: int = 8  # sequences per forward pass, both tools
    context_size: int = 128
    configs: list = field(default_factory=lambda: list(CONFIGS))
    model: str = "smollm2-135m-instruct-q4"  # what our harvest runs
    tokenizer: str | None = None  # for a random: model
    saelens_shape: dict | None = None  # the model SAELens gets; None: a random one of SmolLM2-135M's shape
    sweep_only: bool = False  # no harvest or loader benchmarks: the store, the sweeps and their quality
    saelens_parts: str = "harvest,loader,sweep,onthefly,eval"

    @property
    def configs_text(self) -> str:
        return ",".join(f"{k}x{x}" for k, x in self.configs)


QUICK = Plan(hook="blocks.3.hook_resid_post",
             hooks4=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post",
                     "blocks.3.hook_mlp_out"],
             harvest_tokens=2048, sweep_tokens=4096, eval_tokens=4096)
FULL = Plan(hook="blocks.12.hook_resid_post",
            hooks4=["blocks.6.hook_resid_post", "blocks.12.hook_resid_post", "blocks.18.hook_resid_post",
                    "blocks.12.hook_mlp_out"],
            harvest_tokens=8192, sweep_tokens=32768, eval_tokens=16384)

# Researchers' batch on 2 CPU cores: batch 4096 and 64 steps (262,144 tokens per SAE, each step
# seconds long), so the steady state dominates start-up. The SAE products cost d_model^2 * expansion per token: at
# SmolLM2's d_model 576 one lockstep step of the 8 SAEs takes over 10 s on 2 cores, so both tools
# get the same small random model (d_model 128, 4 layers, SmolLM2's vocabulary and tokens).
SWEEP4096_MODEL = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_head": 32, "d_mlp": 512, "d_vocab": 49152,
                   "n_ctx": 128, "act_fn": "gelu"}
SWEEP4096 = Plan(hook="blocks.2.hook_resid_post", hooks4=[], harvest_tokens=0, sweep_tokens=64 * 4096,
                 eval_tokens=16384, batch_size=4096, model_batch=32,
                 model="random:" + ",".join(f"{k}={v}" for k, v in SWEEP4096_MODEL.items()) + ",seed=0",
                 tokenizer="smollm2-135m-instruct-q4", saelens_shape=SWEEP4096_MODEL, sweep_only=True,
                 saelens_parts="sweep,onthefly,multi,eval")

GOALS = {
    "harvest_vs_bare": 0.9,
    "harvest_vs_saelens": 1.4,
    "bytes_vs_saelens": 1.0,  # ours / theirs, at most
    "loader_vs_raw": 0.9,
    "loader_vs_saelens": 2.0,
    "sweep_vs_saelens_cached": 2.0,
    "sweep_vs_saelens_cached_gpu": 4.0,
    "sweep_vs_saelens_onthefly": 8.0,
    "ev_gap": -0.01,  # ours - theirs, at least
}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _missing(e: BaseException) -> dict:
    return {"status": "missing" if isinstance(e, ImportError) else "failed",
            "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def _call(fn, **kwargs):
    """Call fn with the keyword arguments it accepts (our modules' optional extras)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


# ----------------------------------------------------------------------------- our side
def ours_harvest(plan: Plan, tokens_file: Path) -> dict:
    """benchmarks.bench_harvest for one hook and for four hooks in one pass."""
    try:
        from benchmarks import bench_harvest
    except ImportError as e:
        return _missing(e)
    out = {}
    for key, hooks in (("1hook", [plan.hook]), ("4hooks", plan.hooks4)):
        log(f"our harvest vs bare forward, {key}")
        try:
            out[key] = _call(bench_harvest.run, hooks=hooks, n_tokens=plan.harvest_tokens,
                             context_size=plan.context_size, batch_size=plan.model_batch, device=None,
                             tokens_file=str(tokens_file))
        except Exception as e:  # one failing part must not lose the others
            traceback.print_exc()
            out[key] = _missing(e)
    return out


def write_tokens_jsonl(windows, path: Path) -> Path:
    with open(path, "w") as f:
        for row in windows:
            f.write(json.dumps({"input_ids": [int(t) for t in row]}) + "\n")
    return path


def build_store(url: str, windows, plan: Plan, work: Path, name: str) -> dict:
    """The store the loader and sweep read: `harvest.harvest` on exactly these windows."""
    from actcache import harvest

    t0 = time.perf_counter()
    data = write_tokens_jsonl(windows, work / f"{name}-tokens.jsonl")
    cfg = harvest.HarvestConfig(model=plan.model, tokenizer=plan.tokenizer, hooks=[plan.hook], dataset=str(data),
                                context_size=plan.context_size, tokens=int(windows.size), batch_size=plan.model_batch,
                                out=url, prepend_bos=False, overwrite=True)
    res = harvest.harvest(cfg)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": float(getattr(res, "tokens_per_s", windows.size / dt)),
            "bytes_on_disk": int(getattr(res, "bytes_on_disk", 0)), "writer": "harvest.harvest"}


def ours_loader(store: str, plan: Plan) -> dict:
    try:
        from benchmarks import bench_train
    except ImportError as e:
        return _missing(e)
    log("our loader vs raw read+decode")
    try:
        return bench_train.run_loader(store, plan.hook, batch_size=plan.loader_batch_size)
    except Exception as e:
        traceback.print_exc()
        return _missing(e)


def sweep_toml(plan: Plan) -> str:
    ks = ", ".join(str(k) for k in sorted({k for k, _ in plan.configs}))
    xs = ", ".join(str(x) for x in sorted({x for _, x in plan.configs}))
    return (f'hook = "{plan.hook}"\ntokens = {plan.sweep_tokens}\nbatch_tokens = {plan.batch_size}\nseed = 0\n'
            f"skip_special_tokens = true\nrepeat_epochs = true\nnormalize = true\neval_tokens = {plan.eval_tokens}\n\n"
            f"[defaults]\narchitecture = \"topk\"\nlr = {plan.lr}\naux_loss_coefficient = {1 / 32}\n"
            f"lr_decay_steps = {max(1, plan.sweep_tokens // plan.batch_size // 5)}\n\n"
            f"[grid]\nk = [{ks}]\nexpansion = [{xs}]\n")


def ours_sweep(store: str, plan: Plan, work: Path) -> dict:
    """train.train_sweep: the 8 TopK SAEs in lockstep; wall time and the exported folders."""
    try:
        from actcache import train
    except ImportError as e:
        return _missing(e)
    cfg = work / "sweep.toml"
    cfg.write_text(sweep_toml(plan))
    out = work / "ours_saes"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log(f"our lockstep sweep: {len(plan.configs)} TopK SAEs on {plan.sweep_tokens} tokens")
    try:
        t0 = time.perf_counter()
        summary = train.train_sweep(store, str(cfg), str(out))
        dt = time.perf_counter() - t0
    except Exception as e:
        traceback.print_exc()
        return _missing(e)
    dirs = sorted(str(p.parent) for p in out.rglob("cfg.json"))
    return {"seconds": dt, "summary": summary, "dirs": dirs, "config": cfg.read_text()}


# ----------------------------------------------------------------------------- SAELens side
def export_random_model(plan: Plan, path: Path) -> Path:
    """The weights of the random: model our harvest ran, under HookedTransformer's parameter names,
    for saelens_side.py --weights. The same spec builds different weights in TransformerLens 3 (SAELens's
    environment) and 4 (ours): same embeddings, other block weights (v4 scales W_O and W_out by
    1/sqrt(2 n_layers), and draws the other weights differently). Without this, SAELens's on-the-fly and multi runs
    would train on another model's activations than the store holds, and be scored on ours."""
    import torch
    from safetensors.torch import save_file

    from actcache.harvest.models import load_model

    tl = load_model(plan.model, device="cpu").tl
    sd = tl.state_dict()

    def ln(name: str, which: str) -> torch.Tensor:  # v3: ln1.w / ln1.b; v4: ln1.weight / ln1.bias
        short = sd.get(f"{name}.{which}")
        return short if short is not None else sd[f"{name}.{'weight' if which == 'w' else 'bias'}"]

    out = {"embed.W_E": tl.W_E, "pos_embed.W_pos": tl.W_pos, "unembed.W_U": tl.W_U, "unembed.b_U": tl.b_U,
           "ln_final.w": ln("ln_final", "w"), "ln_final.b": ln("ln_final", "b")}
    for i in range(tl.cfg.n_layers):
        b = f"blocks.{i}"
        for n in ("ln1", "ln2"):
            out[f"{b}.{n}.w"], out[f"{b}.{n}.b"] = ln(f"{b}.{n}", "w"), ln(f"{b}.{n}", "b")
        for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            out[f"{b}.attn.{n}"] = getattr(tl, n)[i]
        for n in ("W_in", "b_in", "W_out", "b_out"):
            out[f"{b}.mlp.{n}"] = getattr(tl, n)[i]
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}, str(path))
    return path


def saelens_python(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("ACTCACHE_SAELENS_PYTHON"), str(ROOT / ".venv-saelens" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    return None


def run_saelens(py: str, plan: Plan, tokens_file: Path, store: str, eval_store: str, eval_dirs: list[str],
                work: Path, threads: int = 0) -> dict:
    out_json = work / "saelens.json"
    cmd = [py, str(ROOT / "benchmarks" / "saelens_side.py"), "--tokens", str(tokens_file),
           "--parts", plan.saelens_parts, "--hook", plan.hook, "--hooks4", ",".join(plan.hooks4) or plan.hook,
           "--model-batch", str(plan.model_batch), "--loader-batch-size", str(plan.loader_batch_size),
           "--harvest-tokens", str(plan.harvest_tokens),
           "--store", store, "--eval-store", eval_store, "--eval-tokens", str(plan.eval_tokens),
           "--eval-dirs", ",".join(eval_dirs), "--configs", plan.configs_text,
           "--sweep-tokens", str(plan.sweep_tokens), "--batch-size", str(plan.batch_size), "--lr", str(plan.lr),
           "--work", str(work / "saelens"), "--json", str(out_json)]
    if plan.saelens_shape:
        cmd += ["--shape", json.dumps(plan.saelens_shape), "--shape-from-scratch",
                "--weights", str(export_random_model(plan, work / "saelens-model.safetensors"))]
    if threads:
        cmd += ["--threads", str(threads)]
    log("SAELens side: " + " ".join(cmd[1:3]) + " ...")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=None)
    if p.returncode != 0 or not out_json.exists():
        return {"status": "failed", "error": f"saelens_side.py exited {p.returncode}"}
    return json.loads(out_json.read_text())


# ----------------------------------------------------------------------------- ratios
def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def ratios(r: dict) -> list[dict]:
    """One row per goal of the issue: measured value, goal, met or not (None: not measured)."""
    oh, sl = r.get("ours", {}), r.get("saelens", {})
    slh = sl.get("harvest", {})
    rows = []

    def add(name, value, goal, higher=True, note=""):
        met = None if value is None or goal is None else (value >= goal if higher else value <= goal)
        rows.append({"benchmark": name, "value": value, "goal": goal, "higher_is_better": higher, "met": met,
                     "note": note})

    if "harvest" not in oh:  # a sweep-only run: the sweeps and their quality
        _sweep_ratios(r, add)
        return rows
    for key, sl_rate in (("1hook", slh.get("cache_1hook_tokens_per_s")), ("4hooks", slh.get("cache_4hooks_tokens_per_s"))):
        h = _get(oh, "harvest", key) or {}
        add(f"harvest {key}: ours / bare forward", h.get("ratio_vs_bare"), GOALS["harvest_vs_bare"])
        add(f"harvest {key}: ours / SAELens CacheActivationsRunner", _ratio(h.get("harvest_tokens_per_s"), sl_rate),
            GOALS["harvest_vs_saelens"], note="different model implementations of one shape; see the bare rates")
        sl_vs_bare = slh.get("cache_vs_bare_" + key)
        add(f"harvest {key}: (ours / our bare) / (SAELens / its bare)", _ratio(h.get("ratio_vs_bare"), sl_vs_bare),
            GOALS["harvest_vs_saelens"], note="each tool against the bare forward of its own model: cancels the "
            "model implementations")
    h1 = _get(oh, "harvest", "1hook") or {}
    add("bytes per token: ours / SAELens float16 cache", _ratio(h1.get("bytes_per_token"), slh.get("cache_bytes_per_token")),
        GOALS["bytes_vs_saelens"], higher=False)
    ld = oh.get("loader") or {}
    add("loader: ours / raw read+decode", ld.get("ratio"), GOALS["loader_vs_raw"])
    add("loader: ours / SAELens ActivationsStore (cached)",
        _ratio(ld.get("loader_tokens_per_s"), _get(sl, "loader", "tokens_per_s")), GOALS["loader_vs_saelens"])
    sw = oh.get("sweep") or {}
    _sweep_ratios(r, add)
    return rows


def _sweep_ratios(r: dict, add) -> None:
    oh, sl = r.get("ours", {}), r.get("saelens", {})
    sw = oh.get("sweep") or {}
    add("sweep (8 TopK): SAELens from cache, one by one / ours lockstep",
        _ratio(_get(sl, "sweep_cached", "seconds"), sw.get("seconds")), GOALS["sweep_vs_saelens_cached"])
    ours_total = (sw.get("seconds") or 0) + (_get(oh, "store", "seconds") or 0) if sw.get("seconds") else None
    add("sweep (8 TopK): SAELens on the fly / ours (harvest + lockstep)",
        _ratio(_get(sl, "sweep_onthefly", "seconds"), ours_total), GOALS["sweep_vs_saelens_onthefly"],
        note="ours counts harvesting the training tokens once")
    if _get(sl, "sweep_multi"):
        add("sweep (8 TopK): SAELens MultiSAETrainingRunner (on the fly, one forward for all) / ours (harvest + lockstep)",
            _ratio(_get(sl, "sweep_multi", "seconds"), ours_total), None,
            note="no goal in the issue for the CPU; ours counts harvesting the training tokens once")
        add("sweep (8 TopK): SAELens MultiSAETrainingRunner / ours lockstep (a second sweep on the same store)",
            _ratio(_get(sl, "sweep_multi", "seconds"), sw.get("seconds")), None,
            note="the store exists: only the sweep is paid again")
    for p in r.get("parity", []):
        add(f"quality {p['name']}: EV ours - SAELens", p.get("ev_gap"), GOALS["ev_gap"])


def parity(r: dict) -> list[dict]:
    """Pair each of our SAEs with SAELens's of the same k and expansion, both evaluated by the same
    code (sae_lens.SAE on held-out activations)."""
    ev = _get(r, "saelens", "eval") or {}
    ours, theirs, multi = {}, {}, {}
    for key, m in ev.items():
        name, where = key.split("@", 1)
        k, x = _kx(name, where)
        if k is None:
            continue
        group = theirs if where.endswith("saes_cached") else multi if where.endswith("saes_multi") else ours
        group[(k, x)] = dict(m, name=name)
    rows = []
    for kx in sorted(set(ours) | set(theirs)):
        o, t = ours.get(kx), theirs.get(kx)
        row = {"name": f"topk-k{kx[0]}-x{kx[1]}"}
        for tag, m in (("ours", o), ("saelens", t), ("saelens_multi", multi.get(kx))):
            for f in ("explained_variance", "l0", "dead_fraction"):
                # an SAE trained on another model's activations than the store's has no quality to report here
                row[f"{tag}_{f}"] = m.get(f) if m and not m.get("other_model") else None
        row["ev_gap"] = (o["explained_variance"] - t["explained_variance"]) if o and t else None
        rows.append(row)
    return rows


def _kx(name: str, where: str) -> tuple[int | None, int | None]:
    import re

    m = re.search(r"k(\d+)[-_]x(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


# ----------------------------------------------------------------------------- report
def _fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown(r: dict) -> str:
    m = r["meta"]
    sweep_only = r["plan"].get("sweep_only")
    what = "sweeps at batch " + str(r["plan"]["batch_size"]) if sweep_only else "full"
    title = (f"# Smoke test (small sizes; not the full run docs/performance.md quotes): actcache vs "
             f"SAELens ({what}) — {m['date']} on {m['host']}" if m["quick"] else
             f"# actcache vs SAELens — {m['date']} on {m['host']} ({what})")
    plan = r["plan"]
    steps = plan["sweep_tokens"] // plan["batch_size"]
    model = (f"model `{plan['model']}` (ours; SAELens: a HookedTransformer of that shape with its weights)"
             if plan.get("saelens_shape") else f"model `{plan.get('model')}`")
    lines = [title, "",
             f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}; sae-lens {_get(r, 'saelens', 'sae_lens_version')}; "
             f"{model}; hook `{plan['hook']}`; {plan['sweep_tokens']:,} training tokens per SAE = {steps} steps of "
             f"batch {plan['batch_size']}, lr {plan['lr']}; codec {m['codec']}.", "",
             f"Command: `{m['command']}`", "",
             "| benchmark | measured | goal | met |", "|---|---:|---:|:---:|"]
    for row in r["ratios"]:
        goal = "—" if row["goal"] is None else ("≥ " if row["higher_is_better"] else "≤ ") + _fmt(row["goal"], 2)
        met = "—" if row["goal"] is None else {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['benchmark']} | {_fmt(row['value'])} | {goal} | {met} |")
    oh, sl = r.get("ours", {}), r.get("saelens", {})
    if not sweep_only:
        lines += rates_table(oh, sl)
    n_tok = 8 * plan["sweep_tokens"]
    lines += ["", "Sweep wall time (s), and SAE training tokens per second (8 SAEs x tokens / wall time):", "",
              "| | seconds | SAE tokens/s |", "|---|---:|---:|"]
    for label, sec in (("ours, lockstep from the store", _get(oh, "sweep", "seconds")),
                       (f"ours, writing the training store ({_get(oh, 'store', 'writer')})", _get(oh, "store", "seconds")),
                       ("ours, store + lockstep", (_get(oh, "sweep", "seconds") or 0) + (_get(oh, "store", "seconds") or 0)
                        if _get(oh, "sweep", "seconds") else None),
                       ("SAELens from cache, one after another", _get(sl, "sweep_cached", "seconds")),
                       ("SAELens on the fly, one after another", _get(sl, "sweep_onthefly", "seconds")),
                       ("SAELens MultiSAETrainingRunner (on the fly, one forward pass for all 8)",
                        _get(sl, "sweep_multi", "seconds"))):
        if sec is None and "Multi" in label and "multi" not in plan.get("saelens_parts", ""):
            continue
        rate = n_tok / sec if sec and "writing" not in label else None
        lines.append(f"| {label} | {_fmt(sec, 1)} | {_fmt(rate)} |")
    if r.get("parity"):
        multi = "multi" in plan.get("saelens_parts", "")
        lines += ["", "Quality on held-out tokens (same evaluator, sae_lens.SAE, for both):", "",
                  "| SAE | EV ours | EV SAELens | L0 ours | L0 SAELens | dead ours | dead SAELens |"
                  + (" EV SAELens multi | dead SAELens multi |" if multi else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if multi else "")]
        for p in r["parity"]:
            lines.append(f"| {p['name']} | {_fmt_ev(p['ours_explained_variance'])} | "
                         f"{_fmt_ev(p['saelens_explained_variance'])} | "
                         f"{_fmt(p['ours_l0'], 1)} | {_fmt(p['saelens_l0'], 1)} | {_fmt(p['ours_dead_fraction'])} | "
                         f"{_fmt(p['saelens_dead_fraction'])} |"
                         + (f" {_fmt_ev(p['saelens_multi_explained_variance'])} | {_fmt(p['saelens_multi_dead_fraction'])} |"
                            if multi else ""))
    return _notes(r, lines)


def _fmt_ev(v) -> str:
    """An explained variance, marked when below zero (worse than predicting the mean): see the notes."""
    return _fmt(v) + (" (< 0)" if v is not None and v < 0 else "")


def quality_notes(r: dict) -> list[str]:
    """What the quality table cannot be trusted for: SAEs that learnt another model's activations
    than the store's, and any explained variance below zero (an SAE that has not learnt the data it
    is scored on)."""
    notes = []
    check = _get(r, "saelens", "model_check")
    if check and not check.get("same_model") and "multi" in r["plan"].get("saelens_parts", ""):
        notes.append(f"SAELens's model does not reproduce the store's activations (relative error "
                     f"{check['relative_error']:.2g}): its MultiSAETrainingRunner SAEs learnt another model's "
                     "activations than the ones they would be scored on, so their quality is not reported")
    below = [f"{p['name']} ({who})" for p in r.get("parity", [])
             for who, key in (("ours", "ours"), ("SAELens", "saelens"), ("SAELens multi", "saelens_multi"))
             if (p.get(f"{key}_explained_variance") is not None and p[f"{key}_explained_variance"] < 0)]
    if below:
        notes.append("explained variance below zero (worse than predicting the mean: the SAE has not learnt the "
                     "data it is scored on, from too few steps or other data; not a quality to quote): "
                     + ", ".join(below))
    return notes


def rates_table(oh: dict, sl: dict) -> list[str]:
    lines = ["", "Rates (tokens/s):", "", "| | ours | SAELens |", "|---|---:|---:|"]
    for key in ("1hook", "4hooks"):
        lines.append(f"| bare forward, {key} | {_fmt(_get(oh, 'harvest', key, 'bare_tokens_per_s'))} | "
                     f"{_fmt(_get(sl, 'harvest', 'bare_' + key + '_tokens_per_s'))} |")
        lines.append(f"| harvest / cache, {key} | {_fmt(_get(oh, 'harvest', key, 'harvest_tokens_per_s'))} | "
                     f"{_fmt(_get(sl, 'harvest', 'cache_' + key + '_tokens_per_s'))} |")
    lines.append(f"| bytes on disk per token | {_fmt(_get(oh, 'harvest', '1hook', 'bytes_per_token'), 1)} | "
                 f"{_fmt(_get(sl, 'harvest', 'cache_bytes_per_token'), 1)} |")
    lines.append(f"| loader (training batches) | {_fmt(_get(oh, 'loader', 'loader_tokens_per_s'))} | "
                 f"{_fmt(_get(sl, 'loader', 'tokens_per_s'))} |")
    lines.append(f"| raw read+decode (our store) | {_fmt(_get(oh, 'loader', 'raw_in_order_tokens_per_s'))} | |")
    return lines


def _notes(r: dict, lines: list[str]) -> str:
    oh, sl = r.get("ours", {}), r.get("saelens", {})
    lines += ["", f"GPU: {r['gpu'].get('note') or r['gpu'].get('device')}", ""]
    notes = [_get(sl, "model_note")]
    for part in ("harvest", "loader", "sweep", "store"):
        v = oh.get(part)
        if isinstance(v, dict) and v.get("status"):
            notes.append(f"ours/{part}: {v['status']} ({v.get('error')})")
        for sub in ("1hook", "4hooks"):
            w = _get(oh, part, sub)
            if isinstance(w, dict) and w.get("status"):
                notes.append(f"ours/{part}/{sub}: {w['status']} ({w.get('error')})")
    if _get(oh, "store", "writer") and _get(oh, "store", "writer") != "harvest.harvest":
        notes.append(f"training store written by {_get(oh, 'store', 'writer')}")
    if isinstance(sl, dict) and sl.get("status"):
        notes.append(f"SAELens side: {sl['status']} ({sl.get('error')})")
    notes += quality_notes(r)
    notes += _get(r, "meta", "notes") or []
    lines += ["Notes:", ""] + [f"- {n}" for n in notes if n]
    return "\n".join(lines) + "\n"


def anonymise(obj, paths: dict[str, str]):
    """The result with this machine's folders replaced by placeholders, so it can be published."""
    if isinstance(obj, dict):
        return {anonymise(k, paths): anonymise(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [anonymise(v, paths) for v in obj]
    if isinstance(obj, str):
        for p, tag in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            obj = obj.replace(p, tag)
    return obj


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no GPU available (torch.cuda.is_available() is False); CPU numbers only"}
    return {"available": True, "device": torch.cuda.get_device_name(0),
            "note": "a GPU is present; the GPU section of the issue is not measured by this runner yet"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    ap.add_argument("--saelens-python", help="python of an environment with sae-lens (default: .venv-saelens)")
    ap.add_argument("--work", help="folder for stores, caches and SAEs (default: a temporary one)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--sweep-tokens", type=int, help="override the plan's training tokens")
    ap.add_argument("--sweep4096", action="store_true",
                    help="the sweeps only, at researchers' settings (batch 4096, 64 steps, a d_model-128 model); "
                         "with --quick, 8 steps")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes of the report")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both tools (default: torch's); 1 on a machine shared with other work, "
                         "where two threads' barriers wait on busy cores")
    a = ap.parse_args(argv)
    plan = SWEEP4096 if a.sweep4096 else QUICK if a.quick else FULL
    if a.sweep4096 and a.quick:
        plan.sweep_tokens, plan.eval_tokens = 8 * plan.batch_size, 4096
    if a.sweep_tokens:
        plan.sweep_tokens = a.sweep_tokens
    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from benchmarks.data import token_windows
    from actcache.common.codecs import DEFAULT_CODEC

    work = Path(a.work or tempfile.mkdtemp(prefix="actcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now()
    host = socket.gethostname().split(".")[0] or "host"
    r: dict = {"meta": {"date": now.strftime("%Y-%m-%d %H:%M"), "host": host, "quick": a.quick,
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "codec": DEFAULT_CODEC,
                        "command": _command(a), "python": sys.version.split()[0], "notes": a.note},
               "plan": asdict(plan), "goals": GOALS, "ours": {}, "gpu": gpu_info()}
    t_start = time.perf_counter()

    # the same token windows for both tools: training store (its first windows also serve the
    # harvest benchmark) and held-out evaluation
    n_s, n_e, ctx = plan.sweep_tokens, plan.eval_tokens, plan.context_size
    windows = token_windows(n_s + n_e, ctx)
    train_w, eval_w = windows[: n_s // ctx], windows[n_s // ctx:]
    tokens_file = work / "tokens.npy"
    np.save(tokens_file, train_w)

    if not plan.sweep_only:
        r["ours"]["harvest"] = ours_harvest(plan, tokens_file)
    store, eval_store = str(work / "train.zarr"), str(work / "eval.zarr")
    try:
        r["ours"]["store"] = build_store(store, train_w, plan, work, "train")
        r["ours"]["eval_store"] = build_store(eval_store, eval_w, plan, work, "eval")
    except Exception as e:
        traceback.print_exc()
        r["ours"]["store"] = _missing(e)
    if not plan.sweep_only:
        r["ours"]["loader"] = ours_loader(store, plan)
    r["ours"]["sweep"] = ours_sweep(store, plan, work)

    py = saelens_python(a.saelens_python)
    if py is None:
        r["saelens"] = {"status": "missing", "error": "no sae-lens environment: run `make setup-saelens`"}
    else:
        r["saelens"] = run_saelens(py, plan, tokens_file, store, eval_store,
                                   _get(r, "ours", "sweep", "dirs") or [], work, threads=a.threads)
    r["parity"] = parity(r)
    r["ratios"] = ratios(r)
    r["meta"]["seconds"] = time.perf_counter() - t_start
    r["meta"]["work"] = str(work)

    paths = results_paths(Path(a.results), now.strftime("%Y-%m-%d"), host, a.quick, "sweep4096" if a.sweep4096 else "")
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    r = anonymise(r, {str(work): "<work>", str(ROOT): "<repo>", str(Path.home()): "~"})
    paths["json"].write_text(json.dumps(r, indent=1, default=str))
    md = markdown(r)
    paths["md"].write_text(md)
    if paths["latest"] is not None:
        paths["latest"].write_text(md)
    print(md)
    log(f"wrote {paths['json']} and {paths['md']} in {r['meta']['seconds']:.0f}s")
    return r


def results_paths(results: Path, date: str, host: str, quick: bool, kind: str = "") -> dict[str, Path | None]:
    """Where a run's results go. A quick run is a smoke test: it goes under results/quick/ and never
    replaces latest.md (the full run docs/performance.md quotes) or latest-<kind>.md (a full run of a kind of
    benchmark, e.g. the sweeps at batch 4096). A full run never replaces the report of an earlier one: a second
    run the same day is `<stem>-run2`, then -run3 and so on (the docs quote reports by name)."""
    folder = results / "quick" if quick else results
    stem = f"{date}-{host}" + (f"-{kind}" if kind else "")
    latest = None if quick else results / (f"latest-{kind}.md" if kind else "latest.md")
    name, n = stem, 1
    while not quick and ((folder / f"{name}.json").exists() or (folder / f"{name}.md").exists()):
        n += 1
        name = f"{stem}-run{n}"
    return {"json": folder / f"{name}.json", "md": folder / f"{name}.md", "latest": latest}


def _command(a) -> str:
    """The command that reproduces this run."""
    if not a.sweep_tokens and not a.threads and not (a.sweep4096 and a.quick):
        return "make bench-sweep4096" if a.sweep4096 else "make bench-quick" if a.quick else "make bench"
    flags = [f for f, on in (("--sweep4096", a.sweep4096), ("--quick", a.quick)) if on]
    if a.sweep_tokens:
        flags.append(f"--sweep-tokens {a.sweep_tokens}")
    if a.threads:
        flags.append(f"--threads {a.threads}")
    return "python -m benchmarks.run " + " ".join(flags)


if __name__ == "__main__":
    main()
