"""train_sweep: the whole train stage as one call (config -> trained, exported, summarised SAEs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..common import location
from ..common.device import pick_device  # noqa: F401  (also imported from here)
from ..common.distributed import Ranks, ranks_from_env
from ..common.errors import StoreError, UserError, first_line
from ..common.lease import Lease
from ..common.options import warn_deprecated
from ..common.progress import log
from ..common.store import ActivationStore

from .checkpoint import check_output, prepare_output, write_error
from .distributed import checkpoint_dir, merge_rows, share
from .config import SweepConfig, load_config, resolve
from .export import calibrate, evaluate, metric_tokens, to_inference_sae, write_sae_folder, write_summary
from .loader import ActivationLoader
from .trainer import Trainer, output_hook


def open_store(url: str) -> ActivationStore:
    """Open the store for reading, before any work: a location that cannot be read is one line."""
    try:
        return ActivationStore.open(url)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (S3: no such bucket, refused credentials, endpoint down ...)
        raise StoreError(f"cannot read the store {url} ({type(e).__name__}: {first_line(e)}); check the location, "
                         "the credentials and the endpoint (AWS_ENDPOINT_URL or --storage-option "
                         "endpoint_url=...)") from None


def train_sweep(store_url: str, config: str | Path | dict | SweepConfig, out: str | Path, resume: bool = False,
                device: str | None = None, repeat_epochs: bool = False, progress: bool = True,
                overwrite: bool = False, storage_options: dict | list[str] | None = None,
                allow_repeat: bool | None = None) -> dict[str, Any]:
    """Train every SAE of the config in lockstep (each on its own hook of the store, transcoders from
    `hook` to `hook_out`, one read of each chunk for all of them), export them under `out`, and
    return the summary (also written to out/summary.json).

    One process at a time writes a run folder (a lease on it; a second one stops at once naming the
    first). `resume` continues the run in `out` from its last checkpoint; `overwrite` deletes the run
    in `out` and starts again. Training never reads held-out sequences: the store's own held-out part
    and the config's `held_out = "START:STOP"` range. `repeat_epochs`: allow more training tokens than the
    store holds, as the config's key of that name does (`allow_repeat`: its old name). `storage_options`: fsspec options for an s3://
    store (endpoint_url, key, secret, profile ...), beside the standard AWS chain; never written anywhere.

    Under torchrun the SAEs are shared out over the ranks (train/distributed.py): each rank trains
    and exports its share, rank 0 holds the lease and writes run.json and the one summary."""
    if allow_repeat is not None:
        warn_deprecated("train_sweep(allow_repeat=...)", "repeat_epochs=")
        repeat_epochs = repeat_epochs or allow_repeat
    with location.storage_options(storage_options, resumable=True), ranks_from_env() as ranks:
        return _train_sweep(ranks, store_url, config, out, resume, device, repeat_epochs, progress, overwrite)


def _train_sweep(ranks: Ranks, store_url: str, config: str | Path | dict | SweepConfig, out: str | Path,
                 resume: bool, device: str | None, repeat_epochs: bool, progress: bool,
                 overwrite: bool) -> dict[str, Any]:
    out = Path(out)

    def setup() -> tuple[SweepConfig, ActivationStore, torch.device]:
        cfg = config if isinstance(config, SweepConfig) else load_config(config)
        if repeat_epochs:
            cfg.repeat_epochs = True
        store = open_store(store_url)
        cfg = resolve(cfg, store)
        if not store.manifest.complete and ranks.is_root:
            log.warning(f"the store {store_url} is not complete; training on its {store.n_committed} committed chunks")
        dev = pick_device(ranks.device(device))
        check_output(out, resume, overwrite, inputs=(str(store_url),))
        return cfg, store, dev

    cfg, store, dev = ranks.agree(setup)
    ranks.check_same_arguments((str(store_url), cfg.to_dict(), str(out), resume, overwrite, device))
    full = cfg
    if ranks.distributed:
        cfg = share(full, ranks.rank, ranks.world)

    loader = ranks.agree(lambda: ActivationLoader(
        store, full.hooks, cfg.batch_tokens, seed=cfg.seed, window_chunks=cfg.window_chunks, threads=cfg.loader_threads,
        device=dev, skip_special_tokens=cfg.skip_special_tokens, normalize=cfg.normalize,
        repeat=cfg.repeat_epochs, held_out=cfg.held_out))
    lease = None
    try:
        held_out = [{"start_sequence": a, "stop_sequence": b} for a, b in loader.held_out]

        def check_budget() -> None:
            if held_out and cfg.tokens > loader.n_rows and not cfg.repeat_epochs:
                raise UserError(f"the config asks for {cfg.tokens:,} training tokens but the store holds "
                                f"{loader.n_rows:,} outside its held-out part; lower tokens, or allow repeated epochs "
                                "with repeat_epochs = true or --repeat-epochs")

        ranks.agree(check_budget)
        fingerprint = store.fingerprint
        run = {"store": str(store_url), "config": full.to_dict(),
               "store_chunks": store.n_committed, "model": store.manifest.model.name,
               "store_fingerprint": fingerprint, "held_out": held_out}
        if ranks.distributed:
            run["world_size"] = ranks.world  # each rank's checkpoint holds its own share of the SAEs

        def take_folder() -> tuple[Lease, bool]:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(e, out.parent) from None
            lease = Lease.acquire(out, "train", takeover=True)
            try:
                return lease, prepare_output(out, run, resume, overwrite)
            except BaseException:
                lease.release()
                raise

        lease, continuing = ranks.agree(take_folder, only_root=True) or (None, False)
        continuing = bool(ranks.broadcast([int(continuing)])[0])

        def work() -> tuple[list[dict[str, Any]], float, float]:
            if not cfg.saes:  # more ranks than SAEs: this one has nothing to train
                return [], 0.0, 0.0
            ckpt = checkpoint_dir(out, ranks.rank, ranks.world) if ranks.distributed else None
            trainer = Trainer(cfg, loader, out, dev, progress=progress and ranks.is_root, checkpoint_dir=ckpt)
            trainer.lease = lease
            if continuing:
                trainer.resume()
            if ranks.is_root:
                log.info(f"training {len(full.saes)} SAEs on {', '.join(full.hooks)} for {cfg.n_steps} steps of "
                         f"{cfg.batch_tokens} tokens on {dev}"
                         + (f", shared over {ranks.world} ranks" if ranks.distributed else ""))
            t = time.perf_counter()
            try:
                trainer.train()
            except UserError as e:
                if not loader.read_failed:
                    raise
                kept = (f"the checkpoint of step {trainer.last_checkpoint_step} in {out} is kept: rerun with --resume "
                        "once the store reads again" if trainer.last_checkpoint_step is not None
                        else "no checkpoint had been written yet")
                raise type(e)(f"{e}; training stopped at step {trainer.step} and {kept}") from None
            wall = time.perf_counter() - t
            loader.close()

            calibrate([m.sae for m in trainer.members], store, cfg, dev)
            exported = {m.cfg.name: to_inference_sae(m.sae, loader.scales[m.cfg.hook], store, cfg,
                                                     scale_out=loader.scales[output_hook(m.cfg)])
                        for m in trainer.members}
            results = evaluate(exported, store, cfg, dev, progress=progress and ranks.is_root)
            if lease is not None:
                lease.check()
            rows = []
            try:
                for m in trainer.members:
                    r = results[m.cfg.name]
                    write_sae_folder(exported[m.cfg.name], out / m.cfg.name, r.pop("log10_density"))
                    rows.append({"name": m.cfg.name, "architecture": m.cfg.architecture,
                                 "exported_as": exported[m.cfg.name].cfg.architecture, "d_in": m.cfg.d_in,
                                 "d_sae": m.cfg.d_sae, "k": m.cfg.k, "lr": m.cfg.lr, "hook": m.cfg.hook,
                                 **({"hook_out": m.cfg.hook_out, "d_out": m.cfg.d_out} if m.cfg.hook_out else {}), **r,
                                 "dead_fraction_train": float((m.since_fired >= cfg.dead_window_tokens).float().mean()),
                                 "path": str(out / m.cfg.name)})
            except OSError as e:
                raise write_error(e, e.filename or out) from None
            return rows, wall, trainer.train_seconds

        rows, wall, train_seconds = ranks.agree(work)
        gathered = ranks.gather_json({"rows": rows, "wall": wall, "train_seconds": train_seconds})
        wall = max(g["wall"] for g in gathered)
        train_seconds = max(g["train_seconds"] for g in gathered)
        summary = {"store": str(store_url), "store_fingerprint": fingerprint, "held_out": held_out,
                   "hook": full.hook, "hooks": full.hooks, "steps": cfg.n_steps, "batch_tokens": cfg.batch_tokens,
                   "tokens": cfg.n_steps * cfg.batch_tokens, "seed": cfg.seed, "device": str(dev),
                   "normalization_scale": loader.scales.get(full.hook, loader.scale),
                   "normalization_scales": loader.scales, "train_seconds_this_session": wall,
                   "train_seconds": train_seconds,
                   "tokens_per_s": (cfg.n_steps * cfg.batch_tokens / train_seconds if train_seconds else None),
                   "metric_tokens": metric_tokens(cfg.eval_tokens),
                   "saes": merge_rows(full, [g["rows"] for g in gathered])}
        if ranks.distributed:
            summary["ranks"] = ranks.world

        def finish() -> None:
            try:
                write_summary(out, summary)
            except OSError as e:
                raise write_error(e, e.filename or out) from None

        ranks.agree(finish, only_root=True)
    finally:
        loader.close()
        if lease is not None:
            lease.release()
    return summary
