"""Export trained SAEs as SAELens folders, evaluate them, and write the sweep summary.

Each SAE folder gets cfg.json and sae_weights.safetensors (normalisation folded into the weights, so
normalize_activations is "none" and the SAE runs on raw activations; a transcoder's input and output
normalisations both), sparsity.safetensors (log10
feature density over the evaluation tokens, key "sparsity" as SAELens writes it), and keeps the
trainer's metrics.jsonl. The sweep gets summary.json, summary.md (a markdown table) and frontier.png
(L0 against fraction of variance unexplained)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..common import __version__, finite
from ..common.metrics import Metrics
from ..common.progress import log, token_bar
from ..common.store import ActivationStore

from ..common.outputs import SUMMARY_FILES, remove_derived
from .architectures import TrainingSAE
from .config import SweepConfig
from .flags import flags_of, short
from .loader import ActivationLoader, held_out_ranges
from .threads import each_on_cores
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
    batch = min(cfg.batch_tokens, cfg.eval_tokens)
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
        trained_k=getattr(sae.cfg, "k", None),
        training_tokens=cfg.n_steps * cfg.batch_tokens,
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
def evaluate(saes: dict[str, SAE], store: ActivationStore, cfg: SweepConfig, device: torch.device,
             progress: bool = False) -> dict:
    """L0, FVU, MSE and feature density of exported SAEs on raw activations of the training stream
    (the sequences training reads, in a separately seeded order); FVU and MSE of what each reconstructs
    (a transcoder's output hook). progress: a bar of tokens on stderr. Definitions: common/metrics.py."""
    batch = min(cfg.batch_tokens, cfg.eval_tokens)
    n_batches = max(1, cfg.eval_tokens // batch)
    hooks = {name: _hooks_of(s, cfg) for name, s in saes.items()}
    loader = ActivationLoader(store, list(dict.fromkeys(h for pair in hooks.values() for h in pair)), batch,
                              seed=cfg.seed + 1, window_chunks=cfg.window_chunks,
                              threads=cfg.loader_threads, device=device, normalize=False,
                              skip_special_tokens=cfg.skip_special_tokens, repeat=True, held_out=cfg.held_out)
    acc = {name: Metrics(s.cfg.d_sae) for name, s in saes.items()}
    bar = token_bar(n_batches * batch, "final evaluation (training stream)", disable=not progress)
    try:
        for _ in range(n_batches):
            xs = loader.next_batches()

            def one(name: str) -> None:
                s = saes[name].to(device)
                hook, hook_out = hooks[name]
                if s.sparse_code:  # the TopK forms: no dense code, the output summed over the active rows
                    out, (_, cols, _) = s.forward_entries(xs[hook])
                    acc[name].update(xs[hook_out], out, active=cols)
                else:
                    out, f = s.forward_with_activations(xs[hook])
                    acc[name].update(xs[hook_out], out, f)
                s.to("cpu")

            # on a CPU the SAEs are spread over its cores, each with torch at one thread (train/threads.py)
            each_on_cores(one, list(saes), device, cost=lambda name: saes[name].cfg.d_in * saes[name].cfg.d_sae)
            bar.update(loader.batch_size)
    finally:
        bar.close()
        loader.close()
    results = {}
    for name, a in acc.items():
        m = a.result()
        nan = float("nan")  # undefined (no variance in the target): NaN here, null and named in summary.json
        results[name] = {"l0": m["l0"], "fvu": nan if m["fvu"] is None else m["fvu"],
                         "explained_variance": nan if m["explained_variance"] is None else m["explained_variance"],
                         "mse": m["mse"], "dead_fraction_eval": m["dead_fraction"],
                         "dense_fraction_eval": m["dense_fraction"], "eval_tokens": a.n,
                         "log10_density": m["log10_density"]}
    return results


def write_sae_folder(sae: SAE, folder: Path, log10_density: torch.Tensor) -> None:
    remove_derived(folder)  # results measured on weights these replace
    sae.save_model(folder)
    write_safetensors({"sparsity": log10_density.contiguous()}, Path(folder) / SPARSITY_FILENAME)


# what each set of numbers is measured on (the labels of the table and the key in summary.json)
TRAINING_STREAM = "training stream"
HELD_OUT = "held-out"


def metric_tokens(cfg_eval_tokens: int | None = None, seed: int | None = None) -> dict[str, str]:
    """summary.json's `metric_tokens`: which tokens each group of numbers was measured on."""
    n = f"{cfg_eval_tokens:,} tokens" if cfg_eval_tokens else "tokens"
    return {
        "l0, fvu, explained_variance, mse, dead_fraction_eval, dense_fraction_eval":
            f"{TRAINING_STREAM}: {n} drawn from the sequences training reads (a stream seeded apart from "
            "training's, after training), exported weights on raw activations",
        "dead_fraction_train": f"{TRAINING_STREAM}: latents that did not fire in the last dead_window_tokens "
                               "tokens of training",
        "eval.*": f"{HELD_OUT}: the sequences `actcache eval` scored (eval.held_out, eval.sequences_scored), "
                  "which training never reads",
    }


def add_flags(summary: dict[str, Any]) -> None:
    """Each row's degenerate-SAE flags (train/flags.py) in row["flags"], from its held-out metrics
    when it has them, else from its training-stream ones."""
    for r in summary.get("saes", []):
        e = r.get("eval") or {}
        r["flags"] = flags_of(e if e.get("l0") is not None else r, r.get("d_in"))


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json, summary.md and frontier.png in the sweep folder."""
    out = Path(out)
    add_flags(summary)
    for line in k_mismatches(summary):
        log.warning(f"warning: {line}")
    for r in summary["saes"]:
        if r.get("flags"):
            log.warning(f"warning: SAE {r['name']!r} looks degenerate ({'; '.join(r['flags'])}); see docs/flags.md")
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
    return k is not None and row.get("l0") is not None and abs(row["l0"] - k) > K_MISMATCH * k


def k_mismatches(summary: dict[str, Any]) -> list[str]:
    """The SAEs whose exported L0 is not near their k, one line each."""
    out = []
    for r in summary["saes"]:
        k = r.get("k")
        if _l0_contradicts_k(r):
            out.append(f"SAE {r['name']!r} was trained with k = {k} but its exported {r.get('exported_as', '')} "
                       f"form gives L0 = {r['l0']:.1f} on the evaluation tokens")
    return out


def architecture_label(row: dict[str, Any]) -> str:
    """The architecture as trained, with the SAELens form it exports as where that differs:
    'batchtopk (exported as jumprelu)'."""
    arch = row.get("architecture") or ""
    exported = row.get("exported_as")
    return f"{arch} (exported as {exported})" if exported and exported != arch else str(arch)


def _f(spec: str):
    return lambda v: "" if v is None else format(v, spec)


def _ce_triple(e: dict[str, Any]) -> str | None:
    keys = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")
    if all(e.get(k) is None for k in keys):
        return None
    return " / ".join("" if e.get(k) is None else f"{e[k]:.3f}" for k in keys)


# (header, value of a row, format): the columns of the one summary table. "(train)" columns are measured
# on the training stream at export, "(held-out)" ones by `actcache eval` (row["eval"]); see metric_tokens
COLUMNS = [
    ("L0 (train)", lambda r: r.get("l0"), _f(".1f")),
    ("FVU (train)", lambda r: r.get("fvu"), _f(".4f")),
    ("explained var. (train)", lambda r: r.get("explained_variance"), _f(".4f")),
    ("dead (train)", lambda r: r.get("dead_fraction_eval"), _f(".3f")),
    ("dense (train)", lambda r: r.get("dense_fraction_eval"), _f(".3f")),
    ("L0 (held-out)", lambda r: (r.get("eval") or {}).get("l0"), _f(".1f")),
    ("FVU (held-out)", lambda r: (r.get("eval") or {}).get("fvu"), _f(".4f")),
    ("CE loss score (held-out)", lambda r: (r.get("eval") or {}).get("ce_loss_score"), _f(".4f")),
    ("KL div. (held-out)", lambda r: (r.get("eval") or {}).get("kl_div_with_sae"), _f(".4f")),
    ("KL score (held-out)", lambda r: (r.get("eval") or {}).get("kl_div_score"), _f(".4f")),
    ("CE loss clean / SAE / zero (held-out)", lambda r: _ce_triple(r.get("eval") or {}), str),
    ("dead (held-out)", lambda r: (r.get("eval") or {}).get("dead_fraction"), _f(".3f")),
    ("dense (held-out)", lambda r: (r.get("eval") or {}).get("dense_fraction"), _f(".3f")),
]


def summary_table(summary: dict[str, Any]) -> str:
    """The one markdown table of a sweep's SAEs, in sweep order: the architecture and k as trained,
    the metrics of the training stream at export and, once `actcache eval` has run, the held-out ones
    beside them (a column appears when some row has a value), and the degenerate-SAE flags. A column of
    hooks (input -> output for a transcoder) when they are not all on one hook. FVU is of what each
    reconstructs."""
    rows = summary["saes"]
    by_hook = any(r.get("hook_out") for r in rows) or len({r.get("hook") for r in rows}) > 1
    flagged = {r["name"] for r in rows if _l0_contradicts_k(r)}
    cols: list[tuple[str, Any]] = [("SAE", lambda r: r["name"])]
    if by_hook:
        cols.append(("hook", lambda r: f"{r.get('hook')} → {r['hook_out']}" if r.get("hook_out") else r.get("hook")))
    cols.append(("architecture", architecture_label))
    cols.append(("d_sae", lambda r: "" if r.get("d_sae") is None else str(r["d_sae"])))
    cols.append(("k", lambda r: "" if r.get("k") is None else f"{r['k']} (≠ L0)" if r["name"] in flagged
                 else str(r["k"])))
    for head, get, fmt in COLUMNS:
        if any(get(r) is not None for r in rows):
            cols.append((head, lambda r, get=get, fmt=fmt: fmt(get(r)) if get(r) is not None else ""))
    flags = {r["name"]: r.get("flags") if r.get("flags") is not None else
             flags_of((r.get("eval") or {}) if (r.get("eval") or {}).get("l0") is not None else r, r.get("d_in"))
             for r in rows}
    if any(flags.values()):
        cols.append(("flags", lambda r: short(flags[r["name"]])))
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(get(r)) for _, get in cols) + " |" for r in rows]
    notes = []
    if any(h.endswith("(train)") for h, _ in cols):
        notes.append(f"(train): measured at export on a {TRAINING_STREAM} of tokens from the sequences training "
                     "reads, with the exported weights.")
    if any(h.endswith("(held-out)") for h, _ in cols):
        e = next((r["eval"] for r in rows if r.get("eval")), {})
        rng = e.get("sequences_scored") or e.get("held_out") or {}
        where = (f" (sequences {rng['start_sequence']}:{rng['stop_sequence']}"
                 f"{', store ' + str(e['store_fingerprint']) if e.get('store_fingerprint') else ''})") if rng else ""
        notes.append(f"(held-out): measured by `actcache eval` on sequences training never read{where}.")
    if flagged:
        notes.append(f"(≠ L0): the exported SAE's L0 is more than {K_MISMATCH:.0%} away from the k it was "
                     "trained with.")
    if any(flags.values()):
        notes.append("flags: " + "; ".join(f"{n}: {', '.join(f)}" for n, f in flags.items() if f)
                     + " (the rule: docs/flags.md).")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def style_log_axes(ax: Any) -> None:
    """Readable log axes: labels only at powers of ten when two or more are in view (no crowded minor
    labels), else a few plain numbers."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    for axis, get_lim in ((ax.xaxis, ax.get_xlim), (ax.yaxis, ax.get_ylim)):
        if axis.get_scale() != "log":
            continue
        lo, hi = get_lim()
        decades = math.floor(math.log10(hi)) - math.ceil(math.log10(max(lo, 1e-30))) + 1 if hi > 0 else 0
        if decades >= 2:  # two or more powers of ten in view: label those only
            axis.set_major_locator(LogLocator(base=10))
            axis.set_major_formatter(LogFormatterSciNotation(base=10))
            axis.set_minor_formatter(NullFormatter())
        else:  # fewer: a few plain numbers at 1-2-5 steps (finer if needed to show two), none per minor tick
            from matplotlib.ticker import ScalarFormatter

            for subs in ((1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), tuple(float(i) for i in range(1, 10))):
                loc = LogLocator(base=10, subs=subs)
                if sum(lo <= t <= hi for t in loc.tick_values(lo, hi)) >= 2:
                    break
            axis.set_major_locator(loc)
            fmt = ScalarFormatter()
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)
            axis.set_minor_formatter(NullFormatter())


def save_figure(fig: Any, path: Path) -> None:
    """Save with every label inside the picture (bbox_inches="tight"), written beside and renamed in."""
    import os

    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    os.replace(tmp, path)


def scatter_frontier(ax: Any, points: list[tuple[str, str, float, float]]) -> None:
    """(series, label, x, y) points: one colour per series, each point labelled; the axes made
    readable (style_log_axes) and the margins wide enough for the labels."""
    series: dict[str, list] = {}
    for s, label, x, y in points:
        series.setdefault(s, []).append((label, x, y))
    for s, items in series.items():
        ax.scatter([x for _, x, _ in items], [y for _, _, y in items], label=s)
        for label, x, y in items:
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", annotation_clip=False)
    ax.margins(x=0.15, y=0.12)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def frontier_figure(summary: dict[str, Any]) -> Any:
    """The matplotlib figure of frontier.png: L0 against FVU (training stream), one colour per
    architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    rows = [r for r in summary["saes"] if ok(r.get("l0")) and ok(r.get("fvu"))]  # a non-finite one is not drawn
    scatter_frontier(ax, [(architecture_label(r), r["name"], max(r["l0"], 1e-3), r["fvu"]) for r in rows])
    ax.set_xscale("log")
    if rows and all(r["fvu"] > 0 for r in rows):
        ax.set_yscale("log")
    style_log_axes(ax)
    ax.set_xlabel(f"L0 (active latents per token, {TRAINING_STREAM})")
    ax.set_ylabel(f"fraction of variance unexplained ({TRAINING_STREAM})")
    ax.set_title(f"{summary.get('hook') or ', '.join(summary.get('hooks', []))}: sparsity / reconstruction "
                 "frontier", fontsize=9)
    return fig


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    save_figure(frontier_figure(summary), path)
