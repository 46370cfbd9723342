"""The actcache store (format version 1): create, open, write a chunk, commit, read.

Layout (a Zarr v3 group; see the README for the full description):
  tokens                  int32   [n_sequences, context_size]
  activations/<hook>      float16 [n_sequences * context_size, d]
  stats/<hook>/...        float64 summary statistics, plus per-chunk partial sums under chunks/
Chunk j of every array covers the sequences of tokens chunk j. A chunk is valid only once the
manifest's n_chunks_committed counter has passed it; the counter is always written last."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from . import codecs, location
from .errors import StoreError
from .manifest import FORMAT_VERSION, Manifest

ATTR = "actcache"
TARGET_CHUNK_BYTES = 16 * 2**20  # uncompressed bytes of the widest hook's activation chunk
PARTIAL_FIELDS = ("count", "sum", "sumsq", "norm_sum", "max_abs", "n_nonfinite")


def chunk_sequences_for(context_size: int, max_d: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Sequences per chunk so that the widest hook's float16 chunk is about target_bytes."""
    per_seq = context_size * max_d * 2
    return max(1, int(target_bytes // per_seq))


def _array_config() -> dict:
    # an all-zero chunk must still be written, or verify could not tell it from a missing one
    return {"write_empty_chunks": True}


@dataclass
class ChunkStats:
    """Partial statistics of one chunk of one hook, computed in float64 on the stored values."""

    count: float
    sum: np.ndarray
    sumsq: np.ndarray
    norm_sum: float
    max_abs: float
    n_nonfinite: float


class ActivationStore:
    """A handle on an actcache store. Use create() or open(), not the constructor."""

    def __init__(self, url: str, group: zarr.Group, manifest: Manifest):
        self.url = str(url)
        self.group = group
        self.manifest = manifest

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, url: str | os.PathLike, manifest: Manifest) -> "ActivationStore":
        """Make a new, empty store with every array at its final shape and no chunk committed."""
        store = location.open_store(url)
        root = zarr.open_group(store=store, mode="w", zarr_format=3)
        m = manifest
        comp = codecs.compressors(m.codec)
        cs = m.chunk_sequences
        root.create_array(
            "tokens", shape=(m.n_sequences, m.context_size), chunks=(cs, m.context_size),
            dtype="int32", compressors=comp, fill_value=0, config=_array_config(),
        )
        acts = root.create_group("activations")
        stats = root.create_group("stats")
        for h in m.hooks:
            acts.create_array(
                h.name, shape=(m.n_sequences * m.context_size, h.d), chunks=(cs * m.context_size, h.d),
                dtype="float16", compressors=comp, fill_value=0, config=_array_config(),
            )
            hs = stats.create_group(h.name)
            part = hs.create_group("chunks")
            for f in PARTIAL_FIELDS:
                shape = (m.n_chunks, h.d) if f in ("sum", "sumsq") else (m.n_chunks,)
                chunks = (1, h.d) if f in ("sum", "sumsq") else (1,)
                part.create_array(f, shape=shape, chunks=chunks, dtype="float64", fill_value=0.0,
                                  compressors=[codecs.Crc32cCodec()], config=_array_config())
        m.n_chunks_committed = 0
        m.complete = False
        root.attrs[ATTR] = m.to_dict()
        return cls(str(url), root, m)

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "r") -> "ActivationStore":
        """Open an existing store ('r' to read, 'r+' to resume writing); checks the format version."""
        if not location.exists(url):
            raise StoreError(f"no store at {url}: check the path (harvest one with `actcache harvest --out {url}`)")
        store = location.open_store(url, read_only=(mode == "r"))
        try:
            root = zarr.open_group(store=store, mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several kinds for "not a group"
            raise StoreError(f"{url} is not an actcache store (not a Zarr v3 group: {type(e).__name__})") from None
        raw = root.attrs.get(ATTR)
        if not isinstance(raw, dict):
            raise StoreError(f"{url} is a Zarr group but not an actcache store (no attrs['{ATTR}'] manifest)")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{url} has store format version {version}; this actcache reads version {FORMAT_VERSION}: "
                "use the actcache release that wrote it, or harvest again"
            )
        try:
            manifest = Manifest.from_dict(raw)
        except (TypeError, KeyError) as e:
            raise StoreError(f"{url} has a damaged manifest ({e}); harvest again") from None
        return cls(str(url), root, manifest)

    # ---------------------------------------------------------------- geometry
    @property
    def n_chunks(self) -> int:
        return self.manifest.n_chunks

    @property
    def n_committed(self) -> int:
        return self.manifest.n_chunks_committed

    def chunk_sequence_range(self, j: int) -> tuple[int, int]:
        cs = self.manifest.chunk_sequences
        return j * cs, min((j + 1) * cs, self.manifest.n_sequences)

    def chunk_row_range(self, j: int) -> tuple[int, int]:
        a, b = self.chunk_sequence_range(j)
        c = self.manifest.context_size
        return a * c, b * c

    @property
    def tokens(self) -> zarr.Array:
        return self.group["tokens"]

    def activations(self, hook: str) -> zarr.Array:
        if hook not in self.manifest.hook_names:
            raise StoreError(f"hook {hook!r} is not in {self.url}; it has: {', '.join(self.manifest.hook_names)}")
        return self.group["activations"][hook]

    # ---------------------------------------------------------------- writing
    def write_chunk(self, j: int, tokens: np.ndarray, acts: dict[str, np.ndarray],
                    stats: dict[str, ChunkStats]) -> None:
        """Write every array's chunk j (not yet committed). Rewriting a chunk is allowed."""
        a, b = self.chunk_sequence_range(j)
        r0, r1 = self.chunk_row_range(j)
        self.tokens[a:b] = tokens
        for name, x in acts.items():
            self.group["activations"][name][r0:r1] = x
            part = self.group["stats"][name]["chunks"]
            s = stats[name]
            part["count"][j] = s.count
            part["sum"][j] = s.sum
            part["sumsq"][j] = s.sumsq
            part["norm_sum"][j] = s.norm_sum
            part["max_abs"][j] = s.max_abs
            part["n_nonfinite"][j] = s.n_nonfinite

    def commit(self, n_chunks_committed: int, complete: bool = False, **extra: Any) -> None:
        """Advance the counter: the last write of a chunk. Written as one object (atomic)."""
        self.manifest.n_chunks_committed = n_chunks_committed
        self.manifest.complete = complete
        self.manifest.extra.update(extra)
        self.group.attrs[ATTR] = self.manifest.to_dict()

    def truncate(self, n_sequences: int) -> None:
        """Shrink every array to n_sequences (a dataset that ran out early); call before finalize."""
        m = self.manifest
        n_chunks = -(-n_sequences // m.chunk_sequences)
        self.tokens.resize((n_sequences, m.context_size))
        for h in m.hooks:
            self.group["activations"][h.name].resize((n_sequences * m.context_size, h.d))
            part = self.group["stats"][h.name]["chunks"]
            for f in PARTIAL_FIELDS:
                arr = part[f]
                arr.resize((n_chunks,) + arr.shape[1:])
        m.n_sequences = n_sequences

    def finalize(self) -> None:
        """Write the summary statistics and mark the store complete."""
        for h in self.manifest.hooks:
            s = self.stats(h.name)
            g = self.group["stats"][h.name]
            for key, val in s.items():
                arr = np.asarray(val, dtype="float64")
                if key in g:
                    del g[key]
                g.create_array(key, shape=arr.shape, dtype="float64", fill_value=0.0)[...] = arr
        self.commit(self.n_chunks, complete=True)

    # ---------------------------------------------------------------- reading
    def stats(self, hook: str, upto: int | None = None) -> dict[str, Any]:
        """Summary statistics of a hook over the committed chunks (or the first `upto`)."""
        n = self.n_committed if upto is None else upto
        self.activations(hook)
        part = self.group["stats"][hook]["chunks"]
        count = float(part["count"][:n].sum()) if n else 0.0
        d = self.manifest.hook(hook).d
        if count == 0:
            z = np.zeros(d)
            return {"count": 0.0, "mean": z, "var": z, "mean_norm": 0.0, "max_abs": 0.0, "n_nonfinite": 0.0}
        total = part["sum"][:n].sum(axis=0)
        totsq = part["sumsq"][:n].sum(axis=0)
        mean = total / count
        var = np.maximum(totsq / count - mean**2, 0.0)
        return {
            "count": count,
            "mean": mean,
            "var": var,
            "mean_norm": float(part["norm_sum"][:n].sum() / count),
            "max_abs": float(part["max_abs"][:n].max()),
            "n_nonfinite": float(part["n_nonfinite"][:n].sum()),
        }

    def read_tokens(self, j: int) -> np.ndarray:
        a, b = self.chunk_sequence_range(j)
        return self.tokens[a:b]

    def read_chunk(self, hook: str, j: int) -> np.ndarray:
        """The float16 activations of chunk j of a hook, [rows, d]."""
        r0, r1 = self.chunk_row_range(j)
        return self.activations(hook)[r0:r1]

    def nbytes_stored(self, prefix: str = "") -> int:
        return location.disk_usage(self.url, prefix)


def chunk_stats(x: "np.ndarray | Any") -> ChunkStats:
    """Partial statistics of float16 activations [rows, d] (a numpy array or a torch tensor).

    Computed in float64 with numpy, one float64 copy and no other large temporaries: this runs
    on the harvest's writer thread beside the forward pass, so it must cost little CPU."""
    if not isinstance(x, np.ndarray):  # a torch tensor
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    a = np.asarray(x, dtype=np.float64)
    sq_rows = np.einsum("ij,ij->i", a, a)
    n_nonfinite = 0.0
    if not np.isfinite(sq_rows).all():  # a NaN or an infinity somewhere: count them, leave them out
        finite = np.isfinite(a)
        n_nonfinite = float(a.size - np.count_nonzero(finite))
        a = np.where(finite, a, 0.0)
        sq_rows = np.einsum("ij,ij->i", a, a)
    return ChunkStats(
        count=float(a.shape[0]),
        sum=a.sum(0),
        sumsq=np.einsum("ij,ij->j", a, a),
        norm_sum=float(np.sqrt(sq_rows).sum()),
        max_abs=float(max(a.max(), -a.min())) if a.size else 0.0,
        n_nonfinite=n_nonfinite,
    )
