"""harvest(): run a model once over a dataset and write the activations of its hooks to a store."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

from ..common import location, outputs
from ..common.distributed import Ranks, ranks_from_env
from ..common.errors import UserError
from ..common.lease import Lease
from ..common.manifest import Manifest
from ..common.progress import human_bytes, log
from ..common.store import ActivationStore

from . import plan
from .config import HarvestConfig
from .data import TokenWindows, prefetch, resolve_source
from .models import HookedModel, load_model, precheck_hooks
from .rounds import write_chunks


class DataRanOut(UserError):
    """The dataset held fewer tokens than asked for (the store is complete with what there was)."""


@dataclass
class HarvestResult:
    out: str
    n_tokens: int  # in the finished store
    hooks: dict[str, int]  # name -> d
    bytes_on_disk: int  # the whole store
    raw_bytes: int  # the activations as plain float16
    activation_bytes: int  # the activations as stored
    seconds: float  # wall time of this call, model loading included
    tokens_this_run: int
    loop_seconds: float  # forward passes and writes of this call
    resumed_from_chunk: int = 0
    model: str = ""
    dataset: str = ""
    codec: str = ""

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.activation_bytes if self.activation_bytes else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_this_run / self.loop_seconds if self.loop_seconds > 0 else float("nan")

    def summary(self) -> str:
        """One paragraph for people."""
        hooks = ", ".join(f"{h} [{d}]" for h, d in self.hooks.items())
        resumed = f" (resumed at chunk {self.resumed_from_chunk})" if self.resumed_from_chunk else ""
        return (
            f"Harvested {self.n_tokens:,} tokens of {self.dataset} through {self.model}{resumed} into {self.out}: "
            f"{len(self.hooks)} hook{'s' if len(self.hooks) != 1 else ''} ({hooks}). "
            f"{human_bytes(self.bytes_on_disk)} on disk; the activations take {human_bytes(self.activation_bytes)}, "
            f"{self.compression_ratio:.2f}x smaller than raw float16 ({human_bytes(self.raw_bytes)}, codec {self.codec}). "
            f"{self.tokens_this_run:,} tokens this run at {self.tokens_per_s:,.0f} tokens/s "
            f"({self.seconds:.1f} s in all, model loading included)."
        )


# ---------------------------------------------------------------------------------------------- harvest
def harvest(cfg: HarvestConfig, progress: bool = True, model: HookedModel | None = None) -> HarvestResult:
    """Harvest activations into cfg.out (see HarvestConfig). Resumable: rerun with resume=True.
    `model`: the result of load_model(cfg.model, ...) when the caller has it loaded already.
    cfg.storage_options (key=value strings, or a dict): fsspec options for an s3:// store
    (endpoint_url, key, secret, profile ...), beside the standard AWS chain; never written anywhere.
    Under torchrun every rank runs this same call and the ranks share the chunks (harvest/rounds.py);
    one process is a world of one, and the store is the same, byte for byte, for any number of ranks."""
    t_start = time.time()
    with location.storage_options(cfg.storage_options, resumable=True), ranks_from_env() as ranks:
        ranks.check_same_arguments(dataclasses.astuple(cfg))

        def checks() -> tuple[int, tuple[str, float]]:  # everything cheap, before any model loads
            n = plan.validate(cfg)
            held_out = plan.held_out_spec(cfg.held_out, n)
            location.check_reachable(cfg.out)  # an unreachable endpoint, a missing bucket, refused keys
            return n, held_out

        n_tokens, held_out = ranks.agree(checks)
        lease = ranks.agree(lambda: Lease.acquire(cfg.out, "harvest", takeover=cfg.resume or cfg.overwrite),
                            only_root=True)  # no other writer touches cfg.out meanwhile
        try:
            return _harvest_leased(cfg, ranks, progress and ranks.is_root, model, t_start, n_tokens, held_out, lease)
        finally:
            if lease is not None:
                lease.release()


def _harvest_leased(cfg: HarvestConfig, ranks: Ranks, progress: bool, model: HookedModel | None, t_start: float,
                    n_tokens: int, held_out: tuple[str, float], lease: Lease | None) -> HarvestResult:
    """harvest() once rank 0 holds the store's lease: set up, compute the chunks, finish."""
    def load() -> tuple[tuple[ActivationStore | None, bool], TokenWindows, Manifest]:
        nonlocal model
        src = resolve_source(cfg.dataset, cfg.name, cfg.split, cfg.streaming)
        found = plan.existing_store(cfg) if ranks.is_root else (None, False)
        if model is None:
            precheck_hooks(cfg.model, cfg.hooks)  # a misspelt hook is reported before the weights load
            log.debug(f"loading {cfg.model}")
            model = load_model(cfg.model, device=ranks.device(cfg.device), dtype=cfg.dtype, tokenizer=cfg.tokenizer)
        plan.check_model(cfg, model)
        data = TokenWindows(src, cfg.context_size, model.tokenizer, model.vocab_size, cfg.text_column,
                            cfg.prepend_bos, cfg.seed)
        return found, data, plan.build_manifest(cfg, model, data, model.hook_dims(cfg.hooks), n_tokens, held_out)

    (existing, replace), data, manifest = ranks.agree(load)
    assert model is not None
    point = ranks.agree(lambda: plan.resume_point(existing, manifest, cfg.out), only_root=True)
    start, complete = ranks.broadcast(list(point or (0, False)))
    if complete:
        if ranks.is_root:
            log.info(f"{cfg.out} is already complete")
        store = ranks.agree(lambda: ActivationStore.open(cfg.out, "r"))
        ranks.agree(lambda: _check_ran_out(store, cfg), only_root=True)
        return _result(store, cfg, t_start, 0, 0.0, start)

    windows = prefetch(data.windows(skip=start * manifest.chunk_sequences))
    first = next(windows, None)

    def nonempty() -> None:
        if first is None and start == 0:
            raise UserError(f"dataset {cfg.dataset} gave no token window: it is empty, or its text is shorter "
                            f"than one window of {cfg.context_size} tokens")

    ranks.agree(nonempty)
    windows = itertools.chain([first] if first is not None else [], windows)

    def create() -> ActivationStore:  # rank 0: a new store, or the one to resume
        if start == 0:
            lease.check()
            with location.storage_errors(cfg.out, "creating"):
                if (replace or existing is not None) and location.exists(cfg.out):
                    outputs.remove_output(cfg.out, outputs.STORE)
                store = ActivationStore.create(cfg.out, manifest)
        else:
            store = ActivationStore.open(cfg.out, "r+")
            plan.remove_partial_files(cfg.out)
            ranks_note = f" on {ranks.world} ranks" if ranks.distributed else ""
            log.info(f"resuming {cfg.out} at chunk {start} of {store.n_chunks}{ranks_note}")
        store.before_commit = lease.check
        with location.storage_errors(cfg.out, "writing"):
            store.commit(start, device=str(model.device))
        return store

    store = ranks.agree(create, only_root=True)
    opened = ranks.agree(lambda: None if ranks.is_root else ActivationStore.open(cfg.out, "r+"))
    store = store if ranks.is_root else opened

    t_loop = time.time()
    done = write_chunks(store, model, windows, ranks, start, progress)

    def finish() -> None:  # rank 0: the summary statistics, the fingerprint, the store marked complete
        with location.storage_errors(cfg.out, "finishing"):
            store.finalize()
        _check_ran_out(store, cfg)

    ranks.agree(finish, only_root=True)
    final = store if ranks.is_root else ActivationStore.open(cfg.out, "r")
    return _result(final, cfg, t_start, done, time.time() - t_loop, start)


def _check_ran_out(store: ActivationStore, cfg: HarvestConfig) -> None:
    """A store shorter than asked for is complete and valid, but the harvest does not pass as a success
    unless the user accepts it (allow_short): the exit status says the data ran out."""
    m = store.manifest
    if m.planned_n_sequences is None:
        return
    asked = m.planned_n_sequences * m.context_size
    msg = (f"the dataset ran out: {cfg.out} holds {m.n_tokens:,} of the {asked:,} tokens asked for "
           f"({m.n_sequences:,} of {m.planned_n_sequences:,} sequences)")
    if cfg.allow_short:
        log.warning(msg)
        return
    raise DataRanOut(f"{msg}; the store is complete and usable as it is: pass --allow-short to accept a "
                     f"shorter store, or give more data or --tokens {m.n_tokens} or less")


def _result(store: ActivationStore, cfg: HarvestConfig, t_start: float, done: int, loop_s: float,
            start: int) -> HarvestResult:
    m = store.manifest
    return HarvestResult(
        out=str(cfg.out), n_tokens=m.n_tokens, hooks={h.name: h.d for h in m.hooks},
        bytes_on_disk=store.nbytes_stored(), raw_bytes=m.n_tokens * sum(h.d for h in m.hooks) * 2,
        activation_bytes=store.nbytes_stored("activations"), seconds=time.time() - t_start,
        tokens_this_run=done, loop_seconds=loop_s, resumed_from_chunk=start, model=m.model.name,
        dataset=m.dataset.path, codec=m.codec,
    )
