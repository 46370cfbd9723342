"""evaluate(): score SAEs on the held-out token windows of a store, with the model (CE loss score, KL;
harvest/evaluate.py) and without it (explained variance, L0, density; train/heldout_metrics.py).

It joins the two stages (it loads SAE folders and the model), so it lives at the top of the package.

    from actcache.evaluate import evaluate
    records = evaluate(["runs/s1"], write=True)     # store and model from the run; eval.json per SAE

Every record names the store's fingerprint, its held-out range and the sequences scored: two results
compare only when those agree."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .common import outputs
from .common.errors import UserError
from .common.options import parse_range
from .common.progress import log

from .common.outputs import CE_FRONTIER_PLOT, EVAL_FILE, RUN_FILE, SUMMARY_FILE, SUMMARY_TABLE


@dataclass
class Target:
    """One SAE to evaluate: its folder, the loaded SAE, and the run folder it belongs to (if any)."""

    name: str
    folder: Path
    sae: Any
    run: Path | None = None
    digest: dict[str, str] | None = None  # of the weights and cfg.json loaded (outputs.sae_digest)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None


def result_owners(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The folders whose lease eval holds while it writes its results: the run of each SAE folder
    (or the SAE folder itself when it has none), each run folder given; paths that do not exist are
    left to find_targets to name."""
    owners = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            owners.append((outputs.run_of(p) or p) if outputs.is_sae_folder(p) else p)
    return list(dict.fromkeys(Path(os.path.realpath(p)) for p in owners))


def find_targets(paths: Sequence[str | os.PathLike], sae_dirs: Sequence[str | os.PathLike] = (),
                 device: str = "cpu") -> list[Target]:
    """SAE folders from run folders (every subfolder that is an SAE, in sweep order) and single SAE
    folders; transcoders included."""
    from .common.sae import SAE
    from .train import architectures  # noqa: F401  (registers the forms that architectures export, transcoders')

    found: list[tuple[Path, Path | None]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{p} does not exist: give a run folder (from `actcache train`) or an SAE folder")
        if outputs.is_sae_folder(p):
            found.append((p, outputs.run_of(p)))
            continue
        subs = outputs.sae_folders(p)
        if not subs:
            raise UserError(f"{p} holds no SAE: no folder with cfg.json and sae_weights.safetensors in it")
        found += [(q, p) for q in subs]
    for raw in sae_dirs:
        p = Path(raw)
        if not outputs.is_sae_folder(p):
            raise UserError(f"--sae {p} is not an SAE folder (it needs cfg.json and sae_weights.safetensors)")
        found.append((p, None))
    if not found:
        raise UserError("no SAE to evaluate: give a run folder, an SAE folder or --sae DIR")
    targets, names = [], set()
    for folder, run in dict.fromkeys(found):
        name = folder.name if folder.name not in names else f"{folder.parent.name}/{folder.name}"
        names.add(name)
        digest = outputs.sae_digest(folder)
        targets.append(Target(name, folder, SAE.load_from_disk(folder, device=device), run, digest))
    return targets


def store_fingerprint(store: Any) -> str | None:
    return store.manifest.fingerprint


def committed_sequences(store: Any) -> int:
    return store.n_committed_sequences


def held_out_range(store: Any, held_out: str | tuple[int, int] | None,
                   targets: Sequence[Target] = ()) -> tuple[int, int]:
    """The evaluation range of the store: the one named, else the store's own held-out part, else (a
    second store, when every target names the store it trained on and none is this one) all of it."""
    if held_out is not None:
        rng = parse_range(held_out, "--held-out") if isinstance(held_out, str) else (int(held_out[0]), int(held_out[1]))
        if rng[1] <= rng[0]:
            raise UserError(f"the held-out range {rng[0]}:{rng[1]} is empty")
    else:
        rng = store.held_out_range()
        sources = training_sources(targets)
        trained_here = any(_same_store(store, i.get("store"), i.get("store_fingerprint")) for _, i in sources)
        if rng is None and sources and not trained_here:
            rng = (0, committed_sequences(store))
        if rng is None:
            raise UserError(f"the store {store.url} has no held-out part: name one with --held-out START:STOP "
                            "(sequences the run did not train on) or pass a second store with --store")
        rng = (int(rng[0]), int(rng[1]))
        if rng[1] <= rng[0]:
            raise UserError(f"the held-out part of {store.url} is empty ({rng[0]}:{rng[1]}); "
                            "name a range with --held-out START:STOP or pass another --store")
    n = committed_sequences(store)
    if rng[1] > n:
        raise UserError(f"the held-out range {rng[0]}:{rng[1]} goes past the {n} committed sequences of {store.url}")
    return rng


def _same_store(store: Any, url: str | None, fingerprint: str | None) -> bool:
    fp = store_fingerprint(store)
    if fp and fingerprint:
        return fp == fingerprint
    if url is None:
        return False
    a, b = str(url).rstrip("/"), str(store.url).rstrip("/")
    if "://" in a or "://" in b:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _ranges(value: Any) -> list[tuple[int, int]]:
    """Held-out ranges as a run or an SAE records them: None, [a, b], {"start_sequence": a, ...} or a list."""
    if not value:
        return []
    if isinstance(value, dict):
        a, b = value.get("start_sequence"), value.get("stop_sequence")
        return [(int(a), int(b))] if a is not None and b is not None else []
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return [(int(value[0]), int(value[1]))]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _ranges(v)]
    return []


def training_ranges(run: dict[str, Any], store: Any) -> list[tuple[int, int]]:
    """The store sequences a run could have trained on: its committed chunks minus its held-out ranges."""
    cs = store.manifest.chunk_sequences
    chunks = run.get("store_chunks")
    n = min(int(chunks) * cs, store.manifest.n_sequences) if chunks is not None else committed_sequences(store)
    held = _ranges(run.get("held_out"))
    if isinstance(run.get("config"), dict):
        held += _ranges(run["config"].get("held_out"))
    out, pos = [], 0
    for a, b in sorted(held):
        if a > pos:
            out.append((pos, min(a, n)))
        pos = max(pos, b)
    if pos < n:
        out.append((pos, n))
    return [(a, b) for a, b in out if b > a]


def training_sources(targets: Sequence[Target]) -> list[tuple[str, dict[str, Any]]]:
    """(who, what it trained on) for each run of the targets, and for each SAE outside a run whose
    metadata names its store: {"store", "store_fingerprint", "held_out", "store_chunks"?}."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[Path] = set()
    for t in targets:
        if t.run is not None:
            if t.run in seen:
                continue
            seen.add(t.run)
            info = _read_json(t.run / RUN_FILE)
            if info is not None:
                out.append((f"run {t.run}", info))
                continue
        meta = dict(t.sae.cfg.metadata)
        if meta.get("store_fingerprint") or meta.get("store"):
            out.append((f"SAE {t.folder}", {"store": meta.get("store"), "store_fingerprint": meta.get("store_fingerprint"),
                                            "held_out": meta.get("held_out")}))
    return out


def check_overlap(targets: Sequence[Target], store: Any, rng: tuple[int, int]) -> None:
    """Refuse an evaluation range that overlaps tokens a run (or an SAE's training) read from this store."""
    for where, info in training_sources(targets):
        if not _same_store(store, info.get("store"), info.get("store_fingerprint")):
            continue
        for a, b in training_ranges(info, store):
            lo, hi = max(a, rng[0]), min(b, rng[1])
            if lo < hi:
                raise UserError(f"sequences {lo}:{hi} of {store.url} are training tokens of {where}: "
                                "evaluate on its held-out part or name a range it did not train on (--held-out)")


def _summary_row(t: Target) -> dict[str, Any]:
    """The row of the run's summary.json for this SAE, or {}."""
    if t.run is None:
        return {}
    rows = (_read_json(t.run / SUMMARY_FILE) or {}).get("saes") or []
    return next((r for r in rows if isinstance(r, dict) and r.get("name") == t.folder.name), {})


def run_info(targets: Sequence[Target]) -> dict[str, Any]:
    """What the runs of the targets say about their store and model (first one that says)."""
    out: dict[str, Any] = {}
    for t in targets:
        if t.run is not None:
            for f in (RUN_FILE, SUMMARY_FILE):
                d = _read_json(t.run / f) or {}
                for k in ("store", "model"):
                    if d.get(k) and k not in out:
                        out[k] = d[k]
    return out


def check_model(targets: Sequence[Target], store: Any, spec: str, force: bool) -> None:
    """Refuse a model other than the one the store was harvested from, or one an SAE names, unless forced."""
    if force:
        return
    stored = store.manifest.model.name
    if spec != stored:
        raise UserError(f"the store {store.url} was harvested from {stored}, not {spec}: "
                        "its tokens may mean nothing to that model (pass --force to evaluate anyway)")
    for t in targets:
        named = t.sae.cfg.metadata.get("model_spec")
        if named and named != spec:
            raise UserError(f"SAE {t.folder} was trained on activations of {named}, not of {spec} "
                            "(pass --force to evaluate it anyway)")


def windows(store: Any, rng: tuple[int, int], tokens: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The stored token windows to score: the first ceil(tokens / context) sequences of the range."""
    ctx = store.manifest.context_size
    a, b = rng
    if tokens is not None:
        b = min(b, a + max(1, -(-int(tokens) // ctx)))
    toks = store.read_token_rows(a, b)  # each chunk checked present: never zeros for a missing one
    return toks, (a, b)


def _clean(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with null for each non-finite metric, named in rec["non_finite"] (empty when all are)."""
    from .common.finite import finite_json

    clean, bad = finite_json(rec)
    clean["non_finite"] = bad
    return clean


def non_finite_error(records: Sequence[dict[str, Any]]) -> "UserError | None":
    """The error to exit with when a record holds non-finite metrics (written as null, flagged), else None."""
    from .common.finite import NonFiniteResult, describe

    bad = [f"{r['name']} ({describe(r['non_finite'])})" for r in records if r.get("non_finite")]
    if not bad:
        return None
    return NonFiniteResult(f"non-finite metrics (NaN or infinity, recorded as null) for {'; '.join(bad)}: the "
                           "SAE's output overflows or the activations hold non-finite values")


def evaluate(run_or_sae_folders: Sequence[str | os.PathLike] = (), *, sae_dirs: Sequence[str | os.PathLike] = (),
             store: str | None = None, model: str | Any | None = None, tokens: int | None = None,
             batch_size: int = 8, device: str | None = None, include_special_tokens: bool = False,
             held_out: str | tuple[int, int] | None = None, force: bool = False, dtype: str = "float32",
             write: bool = False, storage_options: "dict | list[str] | None" = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every SAE of the run folders, SAE folders and sae_dirs on held-out windows of a store.

    store: the store URL (default: the run's). model: a model spec or a loaded HookedModel (default:
    the model the store was harvested from). tokens: at most this many tokens scored.
    held_out: 'START:STOP' in sequences (default: the store's held-out part). force: accept a model
    other than the store's. write: also write eval.json per SAE and the run's summary columns.
    storage_options: fsspec options for an s3:// store (key=value strings or a dict; see --storage-option).
    progress: bars on stderr (tokens/s, ETA, the SAE being run). Transcoders are spliced from their
    input hook into their output hook (harvest/splice.TranscoderSplice).
    Returns one record per SAE (see docs/cli.md, "Evaluate", for the fields)."""
    from .common import location

    with location.storage_options(storage_options), contextlib.ExitStack() as leases:
        return _evaluate(run_or_sae_folders, sae_dirs, store, model, tokens, batch_size, device,
                         include_special_tokens, held_out, force, dtype, write, progress, leases)


def _evaluate(run_or_sae_folders, sae_dirs, store, model, tokens, batch_size, device, include_special_tokens,
              held_out, force, dtype, write, progress, leases: contextlib.ExitStack) -> list[dict[str, Any]]:
    from .common.store import ActivationStore
    from .harvest.evaluate import check_saes, downstream_metrics
    from .common.device import pick_device
    from .harvest.models import load_model
    from .common.manifest import special_token_ids
    from .train.heldout_metrics import heldout_metrics
    from .train.export import HELD_OUT
    from .train.flags import flags_of

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a positive number of sequences")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise UserError(f"--tokens {tokens}: give a positive number of tokens to score")
    device = str(pick_device(device))
    if write:  # one writer at a time: the runs it writes into are leased before their SAEs are read, so a
        # training that replaces their weights (or another eval) is refused while this one scores them
        for owner in result_owners([*run_or_sae_folders, *sae_dirs]):
            leases.enter_context(outputs.lease(owner, "eval", takeover=True))
    targets = find_targets(run_or_sae_folders, sae_dirs, device="cpu")
    if write:  # where eval.json and the run's summary go, checked before the work
        for folder in dict.fromkeys([t.folder for t in targets] + [t.run for t in targets if t.run is not None]):
            outputs.probe_writable(folder, EVAL_FILE if folder in {t.folder for t in targets} else "the run's summary")
    info = run_info(targets)
    store_url = store or info.get("store")
    if not store_url:
        raise UserError("no store to evaluate on: these SAEs come from no run that names one; pass --store URL")
    st = ActivationStore.open(store_url)
    rng = held_out_range(st, held_out, targets)
    check_overlap(targets, st, rng)
    toks, scored = windows(st, rng, tokens)

    if isinstance(model, str) or model is None:
        spec = model or st.manifest.model.name
        check_model(targets, st, spec, force)
        hm = load_model(spec, device=device, dtype=dtype)
    else:
        hm = model
        check_model(targets, st, hm.info.name, force)
    for t in targets:
        t.sae.to(device)

    saes = {t.name: t.sae for t in targets}
    sp = [] if include_special_tokens else special_token_ids(st.manifest.tokenizer)
    batches = (torch.from_numpy(toks[i:i + batch_size].astype(np.int64)) for i in range(0, len(toks), batch_size))
    check_saes(hm, saes)
    if toks.size and int(toks.max()) >= hm.vocab_size:
        raise UserError(f"the stored token id {int(toks.max())} is outside the vocabulary of {hm.info.name} "
                        f"({hm.vocab_size} tokens): the store was tokenised for another model")
    log.info(f"evaluating {len(saes)} SAEs on {toks.size:,} tokens (sequences {scored[0]}:{scored[1]}) of "
             f"{store_url} with {hm.info.name}")
    down = downstream_metrics(hm, batches, saes, special_ids=sp, include_special_tokens=include_special_tokens,
                              progress=progress, total_tokens=int(toks.size))

    by_site: dict[tuple[str, str], dict[str, Any]] = {}
    for t in targets:
        meta = t.sae.cfg.metadata
        hook = meta.get("hook_name")
        by_site.setdefault((hook, meta.get("hook_name_out") or hook), {})[t.name] = t.sae
    acts: dict[str, dict[str, Any]] = {}
    for (hook, hook_out), group in by_site.items():
        if hook in st.manifest.hook_names and hook_out in st.manifest.hook_names:
            acts.update(heldout_metrics(group, st, hook, scored, hook_out=hook_out, device=device,
                                        include_special_tokens=include_special_tokens, progress=progress))

    records = []
    for t in targets:
        a = dict(acts.get(t.name, {}))
        a.pop("log10_density", None)
        meta = t.sae.cfg.metadata
        row = _summary_row(t)
        trained = meta.get("trained_architecture") or row.get("architecture") or t.sae.cfg.architecture
        k = next((v for v in (meta.get("trained_k"), row.get("k"), t.sae.cfg.k) if v is not None), None)
        rec = {
            "name": t.name, "path": str(t.folder), "run": str(t.run) if t.run else None,
            "sae_digest": t.digest,
            "hook": meta.get("hook_name"), **({"hook_out": meta["hook_name_out"]} if meta.get("hook_name_out") and
                                               meta["hook_name_out"] != meta.get("hook_name") else {}),
            "architecture": trained, "exported_as": t.sae.cfg.architecture, "trained_architecture": trained,
            "d_in": t.sae.cfg.d_in, "d_sae": t.sae.cfg.d_sae,
            "k": k, "measured_on": HELD_OUT, "model": hm.info.name, "store": str(store_url),
            "store_fingerprint": store_fingerprint(st),
            "held_out": {"start_sequence": rng[0], "stop_sequence": rng[1]},
            "sequences_scored": {"start_sequence": scored[0], "stop_sequence": scored[1]},
            "context_size": st.manifest.context_size, "include_special_tokens": include_special_tokens,
            "special_token_ids": sp, **down[t.name], **a,
        }
        if not a:
            rec["activation_metrics_note"] = (f"the store holds no activations of "
                                               f"{' and '.join(dict.fromkeys([rec['hook'], rec.get('hook_out') or rec['hook']]))}")
        rec["flags"] = flags_of(rec)
        records.append(_clean(rec))
    if write:
        write_outputs(records)
    return records


# ------------------------------------------------------------------------------------------ writing
def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(records: Sequence[dict[str, Any]]) -> None:
    """eval.json in each SAE folder; in each run folder, the eval columns in summary.json and
    summary.md and a second frontier plot (CE loss score against L0). A record whose SAE's weights
    changed while it was measured is not written (it would describe weights no longer there)."""
    changed = [r["name"] for r in records if not outputs.is_current(r, r["path"])]
    if changed:
        raise UserError(f"the weights of {', '.join(changed)} changed while they were evaluated (a training run "
                        "replaced them?); nothing was written: rerun `actcache eval`")
    for r in records:
        _write_text(Path(r["path"]) / EVAL_FILE, json.dumps(r, indent=2) + "\n")
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("run"):
            runs.setdefault(r["run"], []).append(r)
    for run, recs in runs.items():
        write_run_summary(Path(run), recs)


SUMMARY_EVAL_KEYS = ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "ce_loss_without_sae",
                     "ce_loss_with_ablation", "kl_div_with_sae", "kl_div_with_ablation", "explained_variance",
                     "fvu", "l0", "dead_fraction", "dense_fraction", "cossim", "l2_ratio", "flags")


def write_run_summary(run: Path, records: Sequence[dict[str, Any]]) -> None:
    """Add each SAE's evaluation to the run's summary.json (rows[i]["eval"], measured on held-out
    tokens) beside the training-stream metrics it has, and rewrite summary.md as the one table of both
    (train/export.summary_table, rows in sweep order); plot CE loss score against L0 in frontier_ce.png."""
    from .train.export import add_flags, summary_table

    path = run / SUMMARY_FILE
    summary = _read_json(path) or {"saes": []}
    by_name = {Path(r["path"]).name: r for r in records}
    rows = summary.setdefault("saes", [])
    known = {row.get("name") for row in rows}
    for name, r in by_name.items():
        if name not in known:
            rows.append({"name": name, "architecture": r["architecture"], "exported_as": r.get("exported_as"),
                         "d_in": r.get("d_in"), "d_sae": r["d_sae"], "k": r["k"], "hook": r.get("hook"),
                         **({"hook_out": r["hook_out"]} if r.get("hook_out") else {})})
    for row in rows:
        r = by_name.get(row.get("name"))
        if r is not None:
            row["eval"] = {k: r.get(k) for k in SUMMARY_EVAL_KEYS}
            row["eval"].update(measured_on=r.get("measured_on"), store_fingerprint=r["store_fingerprint"],
                               held_out=r["held_out"], sequences_scored=r["sequences_scored"],
                               ce_tokens=r.get("ce_tokens"), sae_digest=r["sae_digest"])
        elif "eval" in row and not outputs.is_current(row["eval"], run / str(row.get("name"))):
            log.warning(f"dropping the evaluation of {row.get('name')} from {path}: it measured other weights than "
                        "those now in its folder (rerun `actcache eval` on it)")
            del row["eval"]
    add_flags(summary)
    _write_text(path, json.dumps(summary, indent=2) + "\n")
    _write_text(run / SUMMARY_TABLE, summary_table(summary) + "\n")
    plot_ce_frontier(rows, run / CE_FRONTIER_PLOT, summary.get("hook"))


def records_table(records: Sequence[dict[str, Any]]) -> str:
    """The table of evaluation records, in the order given: the held-out columns, beside the
    training-stream ones of each record's run summary (the same table as the run's summary.md)."""
    from .train.export import summary_table

    def training(r: dict[str, Any]) -> dict[str, Any]:
        if not r.get("run"):
            return {}
        rows = (_read_json(Path(r["run"]) / SUMMARY_FILE) or {}).get("saes") or []
        row = next((x for x in rows if isinstance(x, dict) and x.get("name") == Path(r["path"]).name), {})
        return {k: v for k, v in row.items() if k not in ("eval", "flags")}

    return summary_table({"saes": [{**training(r), "name": r["name"], "architecture": r["architecture"],
                                    "exported_as": r.get("exported_as"), "d_in": r.get("d_in"), "d_sae": r["d_sae"],
                                    "k": r["k"], "hook": r.get("hook"),
                                    **({"hook_out": r["hook_out"]} if r.get("hook_out") else {}),
                                    "flags": r.get("flags"), "eval": r} for r in records]})


def plot_ce_frontier(rows: Sequence[dict[str, Any]], path: Path, hook: str | None = None) -> None:
    """CE loss score (held-out) against L0 (held-out), one point per evaluated SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train.export import architecture_label, save_figure, scatter_frontier, style_log_axes

    pts = [(architecture_label(r), str(r.get("name")), max(r["eval"]["l0"], 1e-3), r["eval"]["ce_loss_score"])
           for r in rows if r.get("eval") and r["eval"].get("ce_loss_score") is not None
           and r["eval"].get("l0") is not None]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    scatter_frontier(ax, pts)
    ax.set_xscale("log")
    style_log_axes(ax)
    ax.set_xlabel("L0 (active latents per token, held-out)")
    ax.set_ylabel("CE loss score (held-out; 1 = no loss increase)")
    ax.set_title(f"{hook or ''}: sparsity / downstream loss frontier", fontsize=9)
    save_figure(fig, path)
