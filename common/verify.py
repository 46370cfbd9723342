"""verify(): read every committed chunk of a store, checking checksums, shapes and statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.sync import sync

from .errors import first_line
from .progress import token_bar
from .store import PARTIAL_FIELDS, ActivationStore, chunk_stats


@dataclass
class VerifyReport:
    url: str
    chunks_checked: int = 0
    n_chunks_committed: int = 0
    n_chunks: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "complete" if self.complete else f"incomplete: {self.n_chunks_committed}/{self.n_chunks} chunks committed"
        if self.ok:
            return f"{self.url}: OK, {self.chunks_checked} chunks read and checked ({state})"
        return "\n".join([f"{self.url}: DAMAGED, {len(self.problems)} problem(s) in {self.chunks_checked} chunks ({state})"]
                         + [f"  {p}" for p in self.problems])


def verify(url: str | os.PathLike, progress: bool = False) -> VerifyReport:
    """Check the store against its manifest and read (decode, crc32c-check) every committed chunk."""
    store = ActivationStore.open(url, "r")
    m = store.manifest
    rep = VerifyReport(str(url), n_chunks_committed=store.n_committed, n_chunks=m.n_chunks, complete=m.complete)
    _check_geometry(store, rep)
    if rep.problems:
        return rep
    with token_bar(min(m.n_sequences, store.n_committed * m.chunk_sequences) * m.context_size, "verify",
                   disable=not progress) as bar:
        for j in range(store.n_committed):
            _check_chunk(store, j, rep)
            rep.chunks_checked += 1
            a, b = store.chunk_sequence_range(j)
            bar.update((b - a) * m.context_size)
    return rep


def _check_geometry(store: ActivationStore, rep: VerifyReport) -> None:
    m = store.manifest
    ctx, cs = m.context_size, m.chunk_sequences
    expect = {"tokens": ((m.n_sequences, ctx), (cs, ctx), "int32")}
    for h in m.hooks:
        expect[f"activations/{h.name}"] = ((m.n_sequences * ctx, h.d), (cs * ctx, h.d), "float16")
    for path, (shape, chunks, dtype) in expect.items():
        try:
            arr = store.group[path]
        except KeyError:
            rep.problems.append(f"{path}: missing (the manifest lists it)")
            continue
        got = (tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))
        if got != (shape, chunks, dtype):
            rep.problems.append(f"{path}: shape/chunks/dtype {got} do not match the manifest {(shape, chunks, dtype)}")
    if store.n_committed > m.n_chunks:
        rep.problems.append(f"manifest: {store.n_committed} chunks committed but the store has only {m.n_chunks}")


def _chunk_present(arr: zarr.Array, j: int) -> bool:
    key = arr.metadata.encode_chunk_key((j, 0))
    prefix = arr.store_path.path
    return bool(sync(arr.store_path.store.exists(f"{prefix}/{key}" if prefix else key)))


def _check_chunk(store: ActivationStore, j: int, rep: VerifyReport) -> None:
    m = store.manifest
    arrays = [("tokens", store.tokens, store.read_tokens)]
    arrays += [(f"activations/{h}", store.activations(h), lambda j, h=h: store.read_chunk(h, j)) for h in m.hook_names]
    for path, arr, read in arrays:
        if not _chunk_present(arr, j):
            rep.problems.append(f"{path} chunk {j}: missing")
            continue
        try:
            data = read(j)
        except Exception as e:  # noqa: BLE001  (a crc32c mismatch or a broken compressed stream)
            rep.problems.append(f"{path} chunk {j}: unreadable ({first_line(e, 120)})")
            continue
        if path == "tokens":
            vocab = m.tokenizer.vocab_size
            if data.size and (data.min() < 0 or (vocab and data.max() >= vocab)):
                rep.problems.append(f"tokens chunk {j}: token ids outside 0..{vocab - 1}")
        else:
            _check_stats(store, path.split("/", 1)[1], j, data, rep)


def _check_stats(store: ActivationStore, hook: str, j: int, data: np.ndarray, rep: VerifyReport) -> None:
    """The stored partial statistics of chunk j must be those of the stored activations."""
    part = store.group["stats"][hook]["chunks"]
    s = chunk_stats(data)
    for f in PARTIAL_FIELDS:
        try:
            stored = part[f][j]
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"stats/{hook}/chunks/{f} chunk {j}: unreadable ({first_line(e, 120)})")
            return
        if not np.allclose(stored, getattr(s, f), rtol=1e-9, atol=0.0, equal_nan=True):
            rep.problems.append(f"stats/{hook} chunk {j}: {f} does not match the stored activations")
            return
