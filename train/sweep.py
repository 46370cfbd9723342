"""train_sweep: the whole train stage as one call (config -> trained, exported, summarised SAEs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..common.device import pick_device  # noqa: F401  (also imported from here)
from ..common.errors import UserError
from ..common.progress import log
from ..common.store import ActivationStore

from .checkpoint import prepare_output
from .config import SweepConfig, load_config, resolve
from .export import calibrate, evaluate, to_inference_sae, write_sae_folder, write_summary
from .loader import ActivationLoader
from .trainer import Trainer


def train_sweep(store_url: str, config: str | Path | dict | SweepConfig, out: str | Path, resume: bool = False,
                device: str | None = None, allow_repeat: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train every SAE of the config in lockstep on the store's hook, export them under `out`, and
    return the summary (also written to out/summary.json)."""
    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    store = ActivationStore.open(store_url)
    cfg = resolve(cfg, store, allow_repeat=allow_repeat)
    if not store.manifest.complete:
        log.warning(f"the store {store_url} is not complete; training on its {store.n_committed} committed chunks")
    dev = pick_device(device)
    out = Path(out)
    run = {"store": str(store_url), "config": cfg.to_dict(), "allow_repeat": allow_repeat,
           "store_chunks": store.n_committed, "model": store.manifest.model.name}
    continuing = prepare_output(out, run, resume)

    loader = ActivationLoader(store, cfg.hook, cfg.batch_size, seed=cfg.seed, window_chunks=cfg.window_chunks,
                              threads=cfg.loader_threads, device=dev, skip_special_tokens=cfg.skip_special_tokens,
                              normalize=cfg.normalize, repeat=cfg.repeat_epochs or allow_repeat)
    try:
        trainer = Trainer(cfg, loader, out, dev, progress=progress)
        if continuing:
            trainer.resume()
        log.info(f"training {len(cfg.saes)} SAEs on {cfg.hook} for {cfg.n_steps} steps of {cfg.batch_size} tokens "
                 f"on {dev}")
        t = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t
    finally:
        loader.close()

    calibrate([m.sae for m in trainer.members], store, cfg, dev)
    exported = {m.cfg.name: to_inference_sae(m.sae, loader.scale, store, cfg) for m in trainer.members}
    results = evaluate(exported, store, cfg, dev)
    rows = []
    for m in trainer.members:
        r = results[m.cfg.name]
        write_sae_folder(exported[m.cfg.name], out / m.cfg.name, r.pop("log10_density"))
        rows.append({"name": m.cfg.name, "architecture": m.cfg.architecture,
                     "exported_as": exported[m.cfg.name].cfg.architecture, "d_in": m.cfg.d_in, "d_sae": m.cfg.d_sae,
                     "k": m.cfg.k, "lr": m.cfg.lr, **r,
                     "dead_fraction_train": float((m.since_fired >= cfg.dead_window_tokens).float().mean()),
                     "path": str(out / m.cfg.name)})
    summary = {"store": str(store_url), "hook": cfg.hook, "steps": cfg.n_steps, "batch_size": cfg.batch_size,
               "tokens": cfg.n_steps * cfg.batch_size, "seed": cfg.seed, "device": str(dev),
               "normalization_scale": loader.scale, "train_seconds_this_session": wall,
               "train_seconds": trainer.train_seconds,
               "tokens_per_s": cfg.n_steps * cfg.batch_size / trainer.train_seconds if trainer.train_seconds else None,
               "saes": rows}
    write_summary(out, summary)
    return summary
