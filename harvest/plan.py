"""What a harvest will write, decided before its first forward pass: the cheap checks of its config,
the held-out part, the manifest, and whether what is at the output can be resumed."""

from __future__ import annotations

import math
import os

import zarr

from ..common import codecs, location, outputs
from ..common.errors import UserError
from ..common.manifest import RESUMABLE_VERSIONS, HookInfo, Manifest
from ..common.options import check_values
from ..common.progress import log, parse_count
from ..common.store import ATTR as STORE_ATTR
from ..common.store import ActivationStore, chunk_sequences_for, held_out_after_truncation, held_out_for
from ..common.store_layout import TOP_ENTRIES

from .config import HarvestConfig
from .data import TokenWindows
from .models import HookedModel


def validate(cfg: HarvestConfig) -> int:
    """Every cheap check, before any model is loaded; returns the number of tokens asked for."""
    if not cfg.hooks:
        raise UserError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post)")
    check_values(cfg)  # each option's kind and range (common/options.py)
    codecs.validate(cfg.codec)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    outputs.check_destination(cfg.out, outputs.STORE, inputs=_local_inputs(cfg), replace=cfg.overwrite)
    if not location.is_remote(cfg.out):
        parent = location.local_path(cfg.out).parent
        if not parent.is_dir():
            raise UserError(f"cannot write {cfg.out}: the folder {parent} does not exist")
    return parse_count(cfg.tokens)


def _local_inputs(cfg: HarvestConfig) -> list[str]:
    """The local files a harvest reads (its dataset, a model folder): never its output's place."""
    return [p for p in (cfg.dataset, cfg.model, cfg.tokenizer) if p and os.path.exists(str(p))]


def held_out_spec(spec: str | int | float | None, n_tokens: int) -> tuple[str, float]:
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


def check_model(cfg: HarvestConfig, model: HookedModel) -> None:
    """A model the caller loaded must be the one the config names, and fit the context size."""
    if (model.info.name, model.info.dtype) != (cfg.model, cfg.dtype):
        raise UserError(f"the loaded model is {model.info.name} ({model.info.dtype}) but the config asks for "
                        f"{cfg.model} ({cfg.dtype})")
    if cfg.context_size > model.info.n_ctx:
        raise UserError(f"context size {cfg.context_size} is larger than the model's n_ctx ({model.info.n_ctx}): "
                        f"use --context-size {model.info.n_ctx} or less")


def build_manifest(cfg: HarvestConfig, model: HookedModel, data: TokenWindows, dims: dict[str, int],
                   n_tokens: int, held_out: tuple[str, float]) -> Manifest:
    """The manifest of the store this harvest writes (its chunk size, held-out range, model, data...)."""
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


def existing_store(cfg: HarvestConfig) -> tuple[ActivationStore | None, bool]:
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
        return STORE_ATTR not in group.attrs and set(group.keys()) <= set(TOP_ENTRIES)
    except Exception:  # noqa: BLE001  (not a zarr group at all: ActivationStore.open says so)
        return False


def resume_point(existing: ActivationStore | None, new: Manifest, url: str) -> tuple[int, bool]:
    """(first chunk to compute, whether the store is complete already) for the store found at url:
    (0, False) when there is none or nothing of it was committed; an error when it was harvested with
    other arguments."""
    if existing is None:
        return 0, False
    stored = existing.manifest
    if stored.format_version not in RESUMABLE_VERSIONS:
        raise UserError(f"cannot resume {url}: it is a format {stored.format_version} store, which this version reads "
                        "but does not write; finish it with the release that started it, or pass --overwrite to "
                        "harvest it again")
    new.format_version = stored.format_version  # an older store goes on in its own layout (and fingerprint)
    if stored.planned_n_sequences == new.n_sequences:  # the dataset ran out before the planned size
        new.held_out = held_out_after_truncation(new.held_out, new.n_sequences, stored.n_sequences,
                                                 new.chunk_sequences)
        new.n_sequences = stored.n_sequences
    diff = stored.first_difference(new)
    if diff:
        raise UserError(f"cannot resume {url}: it was harvested with other arguments, first difference: {diff}; "
                        "rerun with the same arguments, or pass --overwrite to start again")
    if existing.n_committed == 0 and not stored.complete:
        return 0, False
    return existing.n_committed, bool(stored.complete)


def remove_partial_files(url: str) -> None:
    """Temporary files that a killed process left behind in a local store."""
    if not location.is_remote(url):
        for f in location.local_path(url).rglob("*.partial"):
            f.unlink(missing_ok=True)
