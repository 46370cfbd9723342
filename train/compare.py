"""compare: one table and one frontier plot across runs and single SAE folders, from what the folders
hold (summary.json, cfg.json, eval.json; no model, no store).

    from actcache.train.compare import compare, compare_table
    result = compare(["runs/a", "runs/b", "saes/one"])       # UserError if they measure different data
    print(compare_table(result))

Two numbers compare only when they were measured on the same tokens. Every SAE's row is put in a group
keyed by the store's fingerprint and the tokens measured:
  held-out        the SAE has an evaluation of the weights now in its folder (`actcache eval`: eval.json,
                  or the run summary's `eval`, with a matching digest): its L0, FVU and CE loss score of
                  the sequences it scored (sequences_scored); a stale evaluation is marked, not used;
  training stream no evaluation: the L0 and FVU measured at export on the training stream of that
                  store (the run's held-out range named, since that is what it left out).
More than one group is refused, unless allow_mixed, which shows each group apart (own table block,
own colour in the plot)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..common import outputs
from ..common.errors import UserError
from ..common.outputs import CFG_FILENAME, EVAL_FILE, SUMMARY_FILE
from .export import HELD_OUT, TRAINING_STREAM as TRAINING
from .flags import flags_of

STALE = "stale eval"  # an evaluation of weights no longer in the folder: shown, not used


@dataclass
class Row:
    """One SAE as compare shows it."""

    name: str
    source: str  # the run folder, or the SAE folder
    architecture: str
    exported_as: str | None
    k: int | None
    d_in: int | None
    d_sae: int | None
    hook: str | None
    store_fingerprint: str | None
    measured_on: str  # HELD_OUT or TRAINING
    sequences: tuple[int, int] | None  # held-out: the sequences scored; training: the range left out
    l0: float | None
    fvu: float | None
    ce_loss_score: float | None = None
    kl_div_score: float | None = None
    flags: list[str] = field(default_factory=list)
    stale_eval: bool = False  # the folder's eval.json measured other weights (outputs.is_current); not used

    def group_key(self) -> tuple[str, str, str]:
        return (self.store_fingerprint or "unknown store", self.measured_on, _range_text(self.sequences))


@dataclass
class Group:
    store_fingerprint: str
    measured_on: str
    sequences: str
    rows: list[Row]

    @property
    def label(self) -> str:
        what = (f"held-out sequences {self.sequences}" if self.measured_on == HELD_OUT else
                f"training stream (held-out {self.sequences} left out)" if self.sequences != "none" else
                "training stream")
        return f"store {self.store_fingerprint}, {what}"


def _range_text(r: tuple[int, int] | None) -> str:
    return "none" if r is None else f"{r[0]}:{r[1]}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None


def _range(value: Any) -> tuple[int, int] | None:
    """A sequence range as the folders record it: {"start_sequence", "stop_sequence"}, [a, b], or a
    list of those (the first)."""
    if isinstance(value, dict) and "start_sequence" in value:
        return int(value["start_sequence"]), int(value["stop_sequence"])
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, (list, tuple)) and value:
        return _range(value[0])
    return None


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _row(name: str, source: Path, info: dict[str, Any], ev: dict[str, Any] | None, fingerprint: str | None,
         training_held_out: Any, stale: bool = False) -> Row:
    """A Row from a summary row (or what an SAE folder says of itself) and its evaluation, if any."""
    if ev and ev.get("l0") is not None:
        measured, rng = HELD_OUT, _range(ev.get("sequences_scored") or ev.get("held_out"))
        fingerprint = ev.get("store_fingerprint") or fingerprint
        metrics = ev
    else:
        measured, rng, metrics = TRAINING, _range(training_held_out), info
    return Row(name=name, source=str(source), architecture=str(info.get("architecture") or ""),
               exported_as=info.get("exported_as"), k=info.get("k"), d_in=info.get("d_in"), d_sae=info.get("d_sae"),
               hook=info.get("hook"), store_fingerprint=fingerprint, measured_on=measured, sequences=rng,
               l0=_finite(metrics.get("l0")), fvu=_finite(metrics.get("fvu")),
               ce_loss_score=_finite((ev or {}).get("ce_loss_score")) if measured == HELD_OUT else None,
               kl_div_score=_finite((ev or {}).get("kl_div_score")) if measured == HELD_OUT else None,
               flags=flags_of(metrics, info.get("d_in")), stale_eval=stale)


def _sae_info(folder: Path) -> dict[str, Any]:
    """What an SAE folder's cfg.json says of how it was trained."""
    cfg = _read_json(folder / CFG_FILENAME)
    meta = cfg.get("metadata") or {}
    return {"architecture": meta.get("trained_architecture") or cfg.get("architecture"),
            "exported_as": cfg.get("architecture"), "k": meta.get("trained_k", cfg.get("k")),
            "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "hook": meta.get("hook_name"),
            "store_fingerprint": meta.get("store_fingerprint"), "held_out": meta.get("held_out")}


def _eval_of(folder: Path, summary_eval: Any = None) -> tuple[dict[str, Any] | None, bool]:
    """(the evaluation of the weights now in an SAE folder, or None; whether one was found stale): its
    eval.json, else the copy in its run's summary, each only when its digest matches the weights."""
    stale = False
    for ev in ((_read_json(folder / EVAL_FILE) if (folder / EVAL_FILE).is_file() else None), summary_eval):
        if isinstance(ev, dict):
            if outputs.is_current(ev, folder):
                return ev, False
            stale = True
    return None, stale


def rows_of(path: str | Path) -> list[Row]:
    """The rows of a run folder (its summary, in sweep order; each SAE's eval.json where it has one) or
    of a single SAE folder (its cfg.json and eval.json; its run's summary row when it sits in a run)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} is not a folder: give run folders (from `actcache train`) or SAE folders")
    if (p / CFG_FILENAME).is_file():
        info = _sae_info(p)
        parent = p.parent / SUMMARY_FILE
        summary = _read_json(parent) if parent.is_file() else {}
        row = next((r for r in summary.get("saes", []) if isinstance(r, dict) and r.get("name") == p.name), {})
        info = {**info, **{k: v for k, v in row.items() if v is not None}}
        ev, stale = _eval_of(p, row.get("eval"))
        fp = info.get("store_fingerprint") or summary.get("store_fingerprint")
        return [_row(p.name, p, info, ev, fp, summary.get("held_out", info.get("held_out")), stale)]
    if not (p / SUMMARY_FILE).is_file():
        raise UserError(f"{p} is neither a run folder (no {SUMMARY_FILE}) nor an SAE folder (no {CFG_FILENAME})")
    summary = _read_json(p / SUMMARY_FILE)
    out = []
    for r in summary.get("saes", []):
        folder = p / str(r.get("name"))
        ev, stale = _eval_of(folder, r.get("eval")) if folder.is_dir() else (None, r.get("eval") is not None)
        out.append(_row(str(r.get("name")), p, r, ev, summary.get("store_fingerprint"), summary.get("held_out"),
                        stale))
    if not out:
        raise UserError(f"{p}/{SUMMARY_FILE} lists no SAE")
    return out


def compare(paths: Sequence[str | Path], allow_mixed: bool = False) -> list[Group]:
    """The rows of every folder, in groups of the same data (store fingerprint, held-out or training
    stream, sequence range), in the order given. More than one group raises UserError unless
    allow_mixed."""
    if not paths:
        raise UserError("nothing to compare: give run folders or SAE folders")
    groups: dict[tuple[str, str, str], Group] = {}
    for path in paths:
        for row in rows_of(path):
            key = row.group_key()
            if key not in groups:
                groups[key] = Group(key[0], key[1], key[2], [])
            groups[key].rows.append(row)
    result = list(groups.values())
    if len(result) > 1 and not allow_mixed:
        raise UserError(f"these folders measure different data ({len(result)} groups: "
                        + "; ".join(g.label for g in result)
                        + "): compare within one group (`actcache eval` them on the same store and held-out "
                          "range), or pass --allow-mixed to show the groups apart")
    return result


def to_json(groups: Sequence[Group]) -> dict[str, Any]:
    return {"groups": [{"store_fingerprint": g.store_fingerprint, "measured_on": g.measured_on,
                        "sequences": g.sequences, "label": g.label,
                        "rows": [{**asdict(r), "sequences": list(r.sequences) if r.sequences else None}
                                 for r in g.rows]} for g in groups]}


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def compare_table(groups: Sequence[Group]) -> str:
    """A markdown table per group, headed by what the group measured."""
    from .export import architecture_label
    from .flags import short

    out = []
    for g in groups:
        held = g.measured_on == HELD_OUT
        head = ["SAE", "from", "architecture", "k", "d_sae", f"L0 ({g.measured_on})", f"FVU ({g.measured_on})"]
        head += ["CE loss score (held-out)", "KL score (held-out)"] if held else []
        head += ["flags"]
        lines = [f"{g.label}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in g.rows:
            cells = [r.name, r.source, architecture_label(asdict(r)), "" if r.k is None else str(r.k),
                     "" if r.d_sae is None else str(r.d_sae), _fmt(r.l0, ".1f"), _fmt(r.fvu, ".4f")]
            cells += [_fmt(r.ce_loss_score, ".4f"), _fmt(r.kl_div_score, ".4f")] if held else []
            cells += [", ".join(x for x in (short(r.flags), STALE if r.stale_eval else "") if x)]
            lines.append("| " + " | ".join(cells) + " |")
        flagged = [f"{r.name} ({r.source}): {', '.join(r.flags)}" for r in g.rows if r.flags]
        if flagged:
            lines += ["", "flags (docs/flags.md): " + "; ".join(flagged)]
        stale = [f"{r.name} ({r.source})" for r in g.rows if r.stale_eval]
        if stale:
            lines += ["", f"{STALE}: {', '.join(stale)} have an evaluation of other weights than those now in "
                          "the folder; their training-stream numbers are shown (rerun `actcache eval`)."]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot_compare(groups: Sequence[Group], path: str | Path) -> None:
    """One figure, two panels sharing the L0 axis: CE loss score against L0 (held-out rows) and FVU
    against L0; one colour per group and source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .export import save_figure, scatter_frontier, style_log_axes

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    multi = len(groups) > 1
    for ax, metric, label in ((axes[0], "ce_loss_score", "CE loss score (held-out; 1 = no loss increase)"),
                              (axes[1], "fvu", "fraction of variance unexplained")):
        pts = []
        for gi, g in enumerate(groups):
            for r in g.rows:
                y = getattr(r, metric)
                if y is None or r.l0 is None:
                    continue
                series = f"{Path(r.source).name}" + (f" [group {gi + 1}]" if multi else "")
                pts.append((series, r.name, max(r.l0, 1e-3), y))
        scatter_frontier(ax, pts)
        if pts:
            ax.set_xscale("log")
            if metric == "fvu" and all(p[3] > 0 for p in pts):
                ax.set_yscale("log")
            style_log_axes(ax)
        else:
            ax.text(0.5, 0.5, "no SAE has this metric" + (" (run `actcache eval`)" if metric == "ce_loss_score" else ""),
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
    title = "; ".join(f"group {i + 1}: {g.label}" if multi else g.label for i, g in enumerate(groups))
    fig.suptitle(title, fontsize=8, wrap=True)
    save_figure(fig, Path(path))
