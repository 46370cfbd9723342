"""Export trained SAEs as SAELens folders, evaluate them, and write the sweep summary.

Each SAE folder gets cfg.json and sae_weights.safetensors (normalisation folded into the weights, so
normalize_activations is "none" and the SAE runs on raw activations; a transcoder's input and output
normalisations both), sparsity.safetensors (log10
feature density over the evaluation tokens, key "sparsity" as SAELens writes it), and keeps the
trainer's metrics.jsonl. The sweep gets summary.json, summary.md (a markdown table) and frontier.png
(L0 against fraction of variance unexplained)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..common import __version__, finite
from ..common.metrics import Metrics
from ..common.progress import log
from ..common.store import ActivationStore

from ..common.outputs import SUMMARY_FILES, remove_derived
from .architectures import TrainingSAE
from .config import SweepConfig
from .loader import ActivationLoader, held_out_ranges
from ..common.sae import SAE, SAELENS_FORMAT_VERSION, SPARSITY_FILENAME, Metadata, SAEConfig, write_safetensors

# model specs this package loads that other tools know by another name: spec -> (hub name, GGUF file)
MODEL_NAMES = {"smollm2-135m-instruct-q4": ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# an exported SAE whose L0 is further than this from its k is flagged in the summary
K_MISMATCH = 0.1


def model_metadata(spec: str) -> dict[str, str]:
    """cfg.json's model fields: model_name loadable by other tools (the hub name where the spec is
    an alias), model_gguf where the weights are a GGUF file, model_spec as actcache loads it."""
    if spec in MODEL_NAMES:
        hub, gguf = MODEL_NAMES[spec]
        return {"model_name": hub, "model_gguf": gguf, "model_spec": spec}
    out = {"model_name": spec, "model_spec": spec}
    if spec.endswith(".gguf"):
        out["model_gguf"] = Path(spec).name
    return out


@torch.no_grad()
def calibrate(saes: list[TrainingSAE], store: ActivationStore, cfg: SweepConfig, device: torch.device) -> list[str]:
    """Let every SAE that needs it (needs_calibration, e.g. BatchTopK's threshold) set its inference
    values on eval_tokens fresh tokens in the training scale (a separately seeded stream). Returns
    and logs warnings."""
    todo = [s for s in saes if s.needs_calibration]
    if not todo:
        return []
    batch = min(cfg.batch_size, cfg.eval_tokens)
    hooks = list(dict.fromkeys(s.cfg.hook for s in todo))
    loader = ActivationLoader(store, hooks, batch, seed=cfg.seed + 2, window_chunks=cfg.window_chunks,
                              threads=cfg.loader_threads, device=device, normalize=cfg.normalize,
                              skip_special_tokens=cfg.skip_special_tokens, repeat=True, held_out=cfg.held_out)
    try:
        batches = [loader.next_batches() for _ in range(max(1, cfg.eval_tokens // batch))]
    finally:
        loader.close()
    warnings = [w for s in todo for w in s.calibrate([b[s.cfg.hook] for b in batches])]
    for w in warnings:
        log.warning(f"warning: {w}")
    return warnings


def to_inference_sae(sae: TrainingSAE, scale: float, store: ActivationStore, cfg: SweepConfig,
                     scale_out: float | None = None) -> SAE:
    """The exported form of a trained SAE: SAELens architecture, weights with the scale folded in
    (a transcoder's: `scale` of its input hook, `scale_out` of its output hook)."""
    hook = sae.cfg.hook or cfg.hook
    if sae.transcoder:
        arch, extra, weights = sae.export_state(scale, scale if scale_out is None else scale_out)
        outputs = {"hook_name_out": sae.cfg.hook_out, "hook_head_index_out": None,
                   "normalization_scale_out_folded": scale if scale_out is None else scale_out}
    else:
        arch, extra, weights = sae.export_state(scale)
        outputs = {}
    m = store.manifest
    metadata = Metadata(
        sae_lens_version=SAELENS_FORMAT_VERSION,
        sae_lens_training_version=SAELENS_FORMAT_VERSION,
        **model_metadata(m.model.name),
        hook_name=hook,
        hook_head_index=None,
        **outputs,
        context_size=m.context_size,
        prepend_bos=m.prepend_bos,
        dataset_path=m.dataset.path,
        exclude_special_tokens=cfg.skip_special_tokens,
        trained_with="actcache",
        actcache_version=__version__,
        trained_architecture=sae.architecture,
        training_tokens=cfg.n_steps * cfg.batch_size,
        normalization_scale_folded=scale,
        store_fingerprint=m.fingerprint,
        # every sequence range this SAE never trained on: the store's held-out part and the config's own
        held_out=[{"start_sequence": a, "stop_sequence": b} for a, b in held_out_ranges(store, cfg.held_out)],
    )
    scfg = SAEConfig(architecture=arch, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, metadata=metadata, **extra)
    return SAE(scfg, {k: v.detach().float().cpu() for k, v in weights.items()})


def _hooks_of(sae: SAE, cfg: SweepConfig) -> tuple[str, str]:
    """(the hook an exported SAE reads, the hook it reconstructs) from its metadata."""
    hook = sae.cfg.metadata.hook_name or cfg.hook
    return hook, sae.cfg.metadata.hook_name_out or hook


@torch.no_grad()
def evaluate(saes: dict[str, SAE], store: ActivationStore, cfg: SweepConfig, device: torch.device) -> dict:
    """L0, FVU, MSE and feature density of exported SAEs on raw activations (a separately seeded
    stream); FVU and MSE of what each reconstructs (a transcoder's output hook). Definitions:
    common/metrics.py."""
    batch = min(cfg.batch_size, cfg.eval_tokens)
    n_batches = max(1, cfg.eval_tokens // batch)
    hooks = {name: _hooks_of(s, cfg) for name, s in saes.items()}
    loader = ActivationLoader(store, list(dict.fromkeys(h for pair in hooks.values() for h in pair)), batch,
                              seed=cfg.seed + 1, window_chunks=cfg.window_chunks,
                              threads=cfg.loader_threads, device=device, normalize=False,
                              skip_special_tokens=cfg.skip_special_tokens, repeat=True, held_out=cfg.held_out)
    acc = {name: Metrics(s.cfg.d_sae) for name, s in saes.items()}
    try:
        for _ in range(n_batches):
            xs = loader.next_batches()
            for name, s in saes.items():
                s.to(device)
                hook, hook_out = hooks[name]
                out, f = s.forward_with_activations(xs[hook])
                acc[name].update(xs[hook_out], out, f)
                s.to("cpu")
    finally:
        loader.close()
    results = {}
    for name, a in acc.items():
        m = a.result()
        nan = float("nan")  # undefined (no variance in the target): NaN here, null and named in summary.json
        results[name] = {"l0": m["l0"], "fvu": nan if m["fvu"] is None else m["fvu"],
                         "explained_variance": nan if m["explained_variance"] is None else m["explained_variance"],
                         "mse": m["mse"], "dead_fraction_eval": m["dead_fraction"], "eval_tokens": a.n,
                         "log10_density": m["log10_density"]}
    return results


def write_sae_folder(sae: SAE, folder: Path, log10_density: torch.Tensor) -> None:
    remove_derived(folder)  # results measured on weights these replace
    sae.save_model(folder)
    write_safetensors({"sparsity": log10_density.contiguous()}, Path(folder) / SPARSITY_FILENAME)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json, summary.md and frontier.png in the sweep folder."""
    out = Path(out)
    for line in k_mismatches(summary):
        log.warning(f"warning: {line}")
    json_name, table_name, plot_name = SUMMARY_FILES
    text, bad = finite.dumps(summary, indent=2)
    if bad:  # JSON has no NaN: null, and named (e.g. the FVU of an output hook without variance)
        log.warning(f"warning: non-finite values in the summary, written as null: {finite.describe(bad)}")
        text, _ = finite.dumps({**summary, "non_finite": bad}, indent=2)
    (out / json_name).write_text(text + "\n")
    (out / table_name).write_text(summary_table(summary) + "\n")
    plot_frontier(summary, out / plot_name)


def _l0_contradicts_k(row: dict[str, Any]) -> bool:
    k = row.get("k")
    return k is not None and abs(row["l0"] - k) > K_MISMATCH * k


def k_mismatches(summary: dict[str, Any]) -> list[str]:
    """The SAEs whose exported L0 is not near their k, one line each."""
    out = []
    for r in summary["saes"]:
        k = r.get("k")
        if _l0_contradicts_k(r):
            out.append(f"SAE {r['name']!r} was trained with k = {k} but its exported {r.get('exported_as', '')} "
                       f"form gives L0 = {r['l0']:.1f} on the evaluation tokens")
    return out


def summary_table(summary: dict[str, Any]) -> str:
    """The markdown table of a sweep's SAEs; a column of hooks (input -> output for a transcoder) when
    they are not all on one hook. FVU is of what each reconstructs."""
    rows = summary["saes"]
    by_hook = any(r.get("hook_out") for r in rows) or len({r.get("hook") for r in rows}) > 1
    head = "| SAE | " + ("hook | " if by_hook else "") + "architecture | d_sae | k | L0 | FVU | explained var. | dead (eval) |"
    lines = [head, "|" + "---|" * (9 if by_hook else 8)]
    flagged = {r["name"] for r in rows if _l0_contradicts_k(r)}
    for r in rows:
        k = r.get("k")
        k_text = "" if k is None else f"{k} (≠ L0)" if r["name"] in flagged else str(k)
        hook = (f"{r.get('hook')} → {r['hook_out']} | " if r.get("hook_out") else f"{r.get('hook')} | ") if by_hook else ""
        lines.append(f"| {r['name']} | {hook}{r['architecture']} | {r['d_sae']} | {k_text} "
                     f"| {r['l0']:.1f} | {r['fvu']:.4f} | {r['explained_variance']:.4f} | {r['dead_fraction_eval']:.3f} |")
    if flagged:
        lines.append("")
        lines.append(f"(≠ L0): the exported SAE's L0 is more than {K_MISMATCH:.0%} away from the k it was "
                     "trained with.")
    return "\n".join(lines)


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    by_arch: dict[str, list] = {}
    for r in summary["saes"]:
        by_arch.setdefault(r["architecture"], []).append(r)
    for arch, rows in sorted(by_arch.items()):
        xs = [max(r["l0"], 1e-3) for r in rows]
        ys = [r["fvu"] for r in rows]
        ax.scatter(xs, ys, label=arch)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    if all(r["fvu"] > 0 and math.isfinite(r["fvu"]) for r in summary["saes"]):
        ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("fraction of variance unexplained")
    ax.set_title(f"{summary.get('hook') or ', '.join(summary.get('hooks', []))}: sparsity / reconstruction "
                 "frontier", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
