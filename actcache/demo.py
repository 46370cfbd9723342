"""The offline default job: harvest the bundled SmolLM2-135M over the Python standard library,
then train a small sweep on the store and report. Needs nothing from the internet.

It joins the two stages, so it lives at the top of the package (neither stage imports the other)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_SWEEP: dict[str, Any] = {
    "hook": "blocks.4.hook_resid_post",
    "batch_size": 1024,
    "seed": 0,
    "log_every_steps": 10,
    "eval_tokens": 8192,
    "defaults": {"lr": 1e-3, "expansion": 4},
    "sae": [
        {"name": "relu-l1", "architecture": "standard", "l1_coefficient": 2.0},
    ],
    "grid": {"architecture": ["topk"], "k": [16, 32]},
}


def run_demo(out_dir: str = "demo", tokens: int = 40_960, train_tokens: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Harvest `tokens` tokens into out_dir/acts.zarr, train DEMO_SWEEP into out_dir/sweep.

    Returns {"harvest": HarvestResult, "summary": the sweep summary}."""
    from .harvest.demo import demo_harvest
    from .train import train_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = demo_harvest(str(out / "acts.zarr"), tokens=tokens, overwrite=True, progress=progress)
    sweep = dict(DEMO_SWEEP, tokens=train_tokens or result.n_tokens)
    runs = out / "sweep"
    if runs.exists():
        import shutil

        shutil.rmtree(runs)
    summary = train_sweep(str(out / "acts.zarr"), sweep, runs, progress=progress)
    return {"harvest": result, "summary": summary}
