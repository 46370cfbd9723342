"""The offline default job: harvest the bundled SmolLM2-135M over the Python standard library, train a
small sweep on the store, evaluate every SAE with the model on the store's held-out sequences, and
report. Needs nothing from the internet.

It joins the stages, so it lives at the top of the package (neither stage imports the other)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common.progress import log

DEMO_SWEEP: dict[str, Any] = {
    "hook": "blocks.4.hook_resid_post",
    "batch_tokens": 1024,
    "seed": 0,
    "log_every_steps": 10,
    "eval_tokens": 8192,
    "defaults": {"lr": 1e-3, "expansion": 4},
    "sae": [
        {"name": "relu-l1", "architecture": "standard", "l1_coefficient": 2.0},
    ],
    "grid": {"architecture": ["topk"], "k": [16, 32]},
}
HELD_OUT_FRACTION = 8  # without a held-out part in the store, the last 1/8 of its sequences are left out
EVAL_TOKENS = 4096  # tokens of the held-out part the model is run on


def demo_held_out(store: Any) -> tuple[tuple[int, int] | None, bool]:
    """(held-out range, whether the sweep config must name it): the store's own part, else the end of it."""
    own = store.held_out_range()
    if own is not None:
        return (int(own[0]), int(own[1])), False
    n = store.n_committed_sequences
    return (n - max(1, n // HELD_OUT_FRACTION), n), True


def run_demo(out_dir: str = "demo", tokens: int = 40_960, train_tokens: int | None = None,
             progress: bool = True, eval_tokens: int = EVAL_TOKENS) -> dict[str, Any]:
    """Harvest `tokens` tokens into out_dir/acts.zarr, train DEMO_SWEEP into out_dir/sweep, evaluate it.

    Returns {"harvest": HarvestResult, "summary": the sweep summary, "eval": evaluation records or None}."""
    from .common.store import ActivationStore
    from .evaluate import evaluate
    from .harvest.demo import demo_harvest
    from .train import train_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_url = str(out / "acts.zarr")
    result = demo_harvest(store_url, tokens=tokens, overwrite=True, progress=progress)
    store = ActivationStore.open(store_url)
    held, name_it = demo_held_out(store)
    ctx = store.manifest.context_size
    n_train = result.n_tokens - (0 if held is None else (held[1] - held[0]) * ctx)
    sweep = dict(DEMO_SWEEP, tokens=min(train_tokens or n_train, n_train))
    if name_it:
        sweep["held_out"] = list(held)
    runs = out / "sweep"
    summary = train_sweep(store_url, sweep, runs, progress=progress, overwrite=True)
    records = None
    if held is None:
        log.warning("this build cannot leave tokens out of training, so the demo does not evaluate with the model")
    else:
        records = evaluate([str(runs)], store=store_url, tokens=eval_tokens,
                           held_out=None if not name_it else held, write=True, progress=progress)
    return {"harvest": result, "summary": summary, "eval": records}
