"""harvest(): run a model once over a dataset and write the activations of its hooks to a store."""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import zarr

from ..common import codecs, location, outputs
from ..common.distributed import under_torchrun
from ..common.errors import OverflowError16, UserError
from ..common.lease import Lease
from ..common.manifest import HookInfo, Manifest
from ..common.progress import human_bytes, log, parse_count, token_bar
from ..common.store import ATTR as STORE_ATTR
from ..common.store import ActivationStore, chunk_sequences_for, held_out_after_truncation, held_out_for

from .config import OVERFLOW_MODES, HarvestConfig
from .data import TokenWindows, prefetch, resolve_source
from .models import DTYPES, HookedModel, load_model, precheck_hooks
from .writer import ChunkWriter

FLOAT16_MAX = 65504.0


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
    (endpoint_url, key, secret, profile ...), beside the standard AWS chain; never written anywhere."""
    with location.storage_options(cfg.storage_options, resumable=True):
        return _harvest(cfg, progress, model)


def _harvest(cfg: HarvestConfig, progress: bool, model: HookedModel | None) -> HarvestResult:
    t_start = time.time()
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun: this rank's share of one harvest
        from .distributed import harvest_ranks

        return harvest_ranks(cfg, progress, model, t_start)
    n_tokens = _validate(cfg)
    held_out = _held_out_spec(cfg.held_out, n_tokens)
    location.check_reachable(cfg.out)  # an unreachable endpoint, a missing bucket, refused keys: before any model
    with Lease.acquire(cfg.out, "harvest", takeover=cfg.resume or cfg.overwrite) as lease:
        return _harvest_leased(cfg, progress, model, t_start, n_tokens, held_out, lease)


def _harvest_leased(cfg: HarvestConfig, progress: bool, model: HookedModel | None, t_start: float, n_tokens: int,
                    held_out: tuple[str, float], lease: Lease) -> HarvestResult:
    """harvest() while holding the store's lease: no other writer touches cfg.out meanwhile."""
    src = resolve_source(cfg.dataset, cfg.name, cfg.split, cfg.streaming)
    existing, replace = _existing_store(cfg)

    if model is None:
        precheck_hooks(cfg.model, cfg.hooks)  # a misspelt hook is reported before the weights load
        log.debug(f"loading {cfg.model}")
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, tokenizer=cfg.tokenizer)
    elif (model.info.name, model.info.dtype) != (cfg.model, cfg.dtype):
        raise UserError(f"the loaded model is {model.info.name} ({model.info.dtype}) but the config asks for "
                        f"{cfg.model} ({cfg.dtype})")
    if cfg.context_size > model.info.n_ctx:
        raise UserError(f"context size {cfg.context_size} is larger than the model's n_ctx ({model.info.n_ctx}): "
                        f"use --context-size {model.info.n_ctx} or less")
    dims = model.hook_dims(cfg.hooks)
    data = TokenWindows(src, cfg.context_size, model.tokenizer, model.vocab_size, cfg.text_column,
                        cfg.prepend_bos, cfg.seed)
    manifest = _manifest(cfg, model, data, dims, n_tokens, held_out)

    start = 0
    if existing is not None:
        _check_same_arguments(existing.manifest, manifest, cfg.out)
        if existing.n_committed == 0 and not existing.manifest.complete:
            existing, replace = None, True  # nothing committed yet: start afresh
    if existing is not None:
        store = ActivationStore.open(cfg.out, "r+")
        store.before_commit = lease.check
        start = store.n_committed
        if store.manifest.complete:
            log.info(f"{cfg.out} is already complete")
            _check_ran_out(store, cfg)
            return _result(store, cfg, t_start, 0, 0.0, start)
        _remove_partial_files(cfg.out)
        log.info(f"resuming {cfg.out} at chunk {start} of {store.n_chunks}")

    windows = prefetch(data.windows(skip=start * manifest.chunk_sequences))
    first = next(windows, None)
    if first is None and start == 0:
        raise UserError(f"dataset {cfg.dataset} gave no token window: it is empty, or its text is shorter "
                        f"than one window of {cfg.context_size} tokens")
    windows = itertools.chain([first] if first is not None else [], windows)

    lease.check()
    if existing is None:
        with location.storage_errors(cfg.out, "creating"):
            if replace and location.exists(cfg.out):
                outputs.remove_output(cfg.out, outputs.STORE)
            store = ActivationStore.create(cfg.out, manifest)
        store.before_commit = lease.check
    with location.storage_errors(cfg.out, "writing"):
        store.commit(start, device=str(model.device))

    t_loop = time.time()
    done = _harvest_chunks(store, model, windows, cfg, start, progress)
    with location.storage_errors(cfg.out, "finishing"):
        store.finalize()
    _check_ran_out(store, cfg)
    return _result(store, cfg, t_start, done, time.time() - t_loop, start)


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


def _harvest_chunks(store: ActivationStore, model: HookedModel, windows: Iterator[np.ndarray],
                    cfg: HarvestConfig, start: int, progress: bool) -> int:
    """The forward passes, chunk by chunk, handing each finished chunk to the writer. Returns tokens done."""
    m = store.manifest
    ctx = m.context_size
    clamped = {h: int(n) for h, n in m.n_clamped.items()}
    done = 0
    with ChunkWriter(store) as writer, \
            token_bar(m.n_tokens, "harvest", initial=start * m.chunk_sequences * ctx, disable=not progress) as bar:
        for j in range(start, m.n_chunks):
            a, b = store.chunk_sequence_range(j)
            rows = list(itertools.islice(windows, b - a))
            if len(rows) < b - a:  # the dataset ran out: keep what there is
                log.info(f"the dataset ran out after {a + len(rows)} of {m.n_sequences} sequences")
                writer.truncate(a + len(rows))
                if not rows:
                    break
            tokens = np.stack(rows)
            acts = compute_chunk(model, tokens, m, clamped, writer, bar)
            done += tokens.size
            fields = {"n_clamped": ordered_counts(clamped, m)} if m.overflow == "clamp" else {}
            writer.submit(j, tokens, acts, **fields)
            if len(rows) < b - a:
                break
    return done


def compute_chunk(model: HookedModel, tokens: np.ndarray, m: Manifest, clamped: dict[str, int],
                  writer: ChunkWriter, bar) -> dict[str, np.ndarray]:
    """The float16 activations {hook: [rows * ctx, d]} of one chunk's token windows, in batches of
    m.batch_size that never straddle chunks (so a resumed run, or another rank, repeats them exactly);
    values clamped to float16's range are counted into `clamped`."""
    ctx, bs = m.context_size, m.batch_size
    acts = {h.name: np.empty((len(tokens) * ctx, h.d), dtype=np.float16) for h in m.hooks}
    for s in range(0, len(tokens), bs):
        batch = torch.from_numpy(tokens[s:s + bs]).to(model.device, torch.long)
        for h, x in model.run(batch, m.hook_names).items():
            x16 = to_float16(x, h, m.overflow, clamped)
            acts[h][s * ctx:s * ctx + x16.shape[0] * ctx] = x16.reshape(-1, x16.shape[-1]).numpy()
        writer.check()
        bar.update(batch.numel())
    return acts


def ordered_counts(counts: dict[str, int], m: Manifest) -> dict[str, int]:
    """Per-hook counts in the manifest's hook order (the manifest's bytes do not depend on which hook
    was clamped first, or on which process counted it)."""
    return {h: int(counts[h]) for h in m.hook_names if counts.get(h)}


def to_float16(x: torch.Tensor, hook: str, overflow: str, clamped: dict[str, int]) -> torch.Tensor:
    """x as float16 on the CPU; values beyond float16's range stop the harvest or are clamped and counted."""
    peak = x.abs().amax()
    if not bool(peak <= FLOAT16_MAX):  # also true for NaN: then look closer
        over = torch.isfinite(x) & (x.abs() > FLOAT16_MAX)
        n = int(over.sum())
        if n:
            if overflow != "clamp":
                big = float(x[over].abs().max())
                raise OverflowError16(
                    f"{n} activations of {hook} are beyond the float16 range (largest magnitude {big:.4g} > "
                    f"{FLOAT16_MAX:.0f}): rerun with --overwrite --overflow clamp to clamp them (recorded in the "
                    "manifest), or harvest another hook")
            x = torch.where(over, x.clamp(-FLOAT16_MAX, FLOAT16_MAX), x)  # infinities stay (counted as non-finite)
            clamped[hook] = clamped.get(hook, 0) + n
    return x.to(torch.float16).cpu()  # convert where x is: half the bytes to copy


# ---------------------------------------------------------------------------------------------- helpers
def _validate(cfg: HarvestConfig) -> int:
    """Every cheap check, before any model is loaded; returns the number of tokens asked for."""
    codecs.validate(cfg.codec)
    if cfg.overflow not in OVERFLOW_MODES:
        raise UserError(f"invalid overflow mode {cfg.overflow!r}; choose error or clamp")
    if cfg.dtype not in DTYPES:
        raise UserError(f"invalid dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if not cfg.hooks:
        raise UserError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post)")
    try:
        n_tokens = parse_count(cfg.tokens)
    except ValueError:
        raise UserError(f"invalid token count {cfg.tokens!r}; write e.g. 100M, 2k or 50000") from None
    for what, v, lo in (("context size", cfg.context_size, 2), ("token count", n_tokens, 1),
                        ("batch size", cfg.batch_size, 1), ("chunk size", cfg.chunk_sequences or 1, 1)):
        if v < lo:
            raise UserError(f"the {what} must be at least {lo} (got {v})")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    outputs.check_destination(cfg.out, outputs.STORE, inputs=_local_inputs(cfg), replace=cfg.overwrite)
    if not location.is_remote(cfg.out):
        parent = location.local_path(cfg.out).parent
        if not parent.is_dir():
            raise UserError(f"cannot write {cfg.out}: the folder {parent} does not exist")
    return n_tokens


def _local_inputs(cfg: HarvestConfig) -> list[str]:
    """The local files a harvest reads (its dataset, a model folder): never its output's place."""
    return [p for p in (cfg.dataset, cfg.model, cfg.tokenizer) if p and os.path.exists(str(p))]


def _existing_store(cfg: HarvestConfig) -> tuple[ActivationStore | None, bool]:
    """The store to resume (if any), and whether what is at cfg.out is to be replaced.
    An existing output is never touched without resume or overwrite."""
    if not location.exists(cfg.out):
        return None, False
    if cfg.overwrite:
        outputs.check_destination(cfg.out, outputs.STORE, inputs=_local_inputs(cfg), replace=True)
        return None, True
    if not cfg.resume:
        raise UserError(f"{cfg.out} already exists: pass --resume to continue that harvest, "
                        "or --overwrite to replace it")
    if _unfinished_create(cfg.out):
        return None, True
    return ActivationStore.open(cfg.out, "r"), False


def _unfinished_create(url: str) -> bool:
    """A store whose creation was interrupted: our arrays' group, but no manifest written yet."""
    try:
        group = zarr.open_group(store=location.open_store(url, read_only=True), mode="r", zarr_format=3)
        return STORE_ATTR not in group.attrs and set(group.keys()) <= {"tokens", "activations", "stats"}
    except Exception:  # noqa: BLE001  (not a zarr group at all: ActivationStore.open says so)
        return False


def _held_out_spec(spec: str | int | float | None, n_tokens: int) -> tuple[str, float]:
    """The held-out option: ("fraction", f) for "5%", ("tokens", n) for a count such as 4096 or 10k;
    0 (or None) disables it. Checked before any model loads."""
    text = "0" if spec is None else str(spec).strip()
    try:
        if text.endswith("%"):
            f = float(text[:-1]) / 100
            if not 0 <= f < 1:
                raise ValueError
            return "fraction", f
        n = parse_count(text)
        if n < 0:
            raise ValueError
    except ValueError:
        raise UserError(f"invalid held-out size {spec!r}: give a percentage below 100% (e.g. 5%), a token "
                        "count (e.g. 8192 or 10k), or 0 for none") from None
    if n >= n_tokens:
        raise UserError(f"the held-out part ({n:,} tokens) must be smaller than the harvest ({n_tokens:,} tokens)")
    return "tokens", float(n)


def held_out_chunks(spec: tuple[str, float], n_sequences: int, chunk_sequences: int, context_size: int) -> int:
    """Whole chunks at the end of the store to hold out: a fraction is rounded to the nearest whole
    number of chunks but at least one, a token count up to whole chunks; at least one chunk stays for
    training (a one-chunk store holds nothing out)."""
    kind, v = spec
    n_chunks = -(-n_sequences // chunk_sequences)
    if v <= 0:
        return 0
    if kind == "fraction":
        n = max(1, round(v * n_chunks))
    else:
        n = -(-math.ceil(v / context_size) // chunk_sequences)
    return max(0, min(n, n_chunks - 1))


def _manifest(cfg: HarvestConfig, model: HookedModel, data: TokenWindows, dims: dict[str, int],
              n_tokens: int, held_out: tuple[str, float]) -> Manifest:
    n_sequences = math.ceil(n_tokens / cfg.context_size)
    cs = cfg.chunk_sequences or chunk_sequences_for(cfg.context_size, max(dims.values()))
    if cs > cfg.batch_size:
        cs -= cs % cfg.batch_size  # whole batches per chunk
    cs = min(cs, n_sequences)
    n_held = held_out_chunks(held_out, n_sequences, cs, cfg.context_size)
    if held_out[1] > 0 and n_held == 0:
        log.info("the store has a single chunk: nothing is held out for evaluation")
    return Manifest(
        model=model.info, tokenizer=model.tokenizer_info(), dataset=data.info(),
        hooks=[HookInfo(h, d) for h, d in dims.items()], context_size=cfg.context_size,
        prepend_bos=data.prepend_bos, seed=cfg.seed, n_sequences=n_sequences, chunk_sequences=cs,
        codec=codecs.validate(cfg.codec), batch_size=cfg.batch_size, overflow=cfg.overflow,
        held_out=held_out_for(n_sequences, cs, n_held),
    )


def _check_same_arguments(stored: Manifest, new: Manifest, url: str) -> None:
    if stored.planned_n_sequences == new.n_sequences:  # the dataset ran out before the planned size
        new.held_out = held_out_after_truncation(new.held_out, new.n_sequences, stored.n_sequences,
                                                 new.chunk_sequences)
        new.n_sequences = stored.n_sequences
    diff = stored.first_difference(new)
    if diff:
        raise UserError(f"cannot resume {url}: it was harvested with other arguments, first difference: {diff}; "
                        "rerun with the same arguments, or pass --overwrite to start again")


def _remove_partial_files(url: str) -> None:
    """Temporary files that a killed process left behind in a local store."""
    if not location.is_remote(url):
        for f in location.local_path(url).rglob("*.partial"):
            f.unlink(missing_ok=True)


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
