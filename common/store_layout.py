"""Where each part of a store lives, for each format version: the one description that the writer
(create, write a chunk, finalize, truncate) and every reader (open, verify, info, the statistics,
resume) derive the store's array names, shapes and statistics layout from.

Versions 1 and 2 keep six per-chunk statistics arrays per hook (`stats/<hook>/chunks/<field>`) and six
summary arrays per hook; version 3 packs every hook's per-chunk statistics into one array,
`stats/chunks` (one object per chunk for all hooks), and keeps of the summary only `mean` and `var`
as arrays, with the scalars in the attributes of the group `stats/<hook>`. docs/store-format.md
describes both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# the entries at the top of a store (besides its zarr.json): the same in every version
TOP_ENTRIES = ("tokens", "activations", "stats", "digests")
DIGEST_BYTES = 16

# the per-chunk partial statistics of one hook, as the writer computes them (ChunkStats's fields)
PARTIAL_FIELDS = ("count", "sum", "sumsq", "norm_sum", "max_abs", "n_nonfinite")
VECTOR_FIELDS = ("sum", "sumsq")  # one value per dimension; the others are one number per chunk
# the summary of one hook, built from its per-chunk partial sums when the harvest completes
SUMMARY_FIELDS = ("count", "mean", "var", "mean_norm", "max_abs", "n_nonfinite")
# version 3: each hook's block of columns in `stats/chunks`, in this order (vectors d wide)
PACKED_ORDER = ("count", "norm_sum", "max_abs", "n_nonfinite", "sum", "sumsq")
PACKED_PATH = "stats/chunks"


@dataclass(frozen=True)
class ArraySpec:
    """One array of the format: its shape, chunk shape, dtype, dimension names, and whether it holds
    data (the store's compressor, then crc32c) or bookkeeping (crc32c only)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    compressed: bool = False
    attrs: Any = None  # the array's attributes, or None


@dataclass(frozen=True)
class StoreLayout:
    """The arrays of a store of one format version and one geometry (from its manifest)."""

    version: int
    hooks: tuple[tuple[str, int], ...]  # (name, d) in manifest order
    n_sequences: int
    context_size: int
    chunk_sequences: int

    @classmethod
    def of(cls, manifest: Any) -> "StoreLayout":
        return cls(int(manifest.format_version), tuple((h.name, int(h.d)) for h in manifest.hooks),
                   int(manifest.n_sequences), int(manifest.context_size), int(manifest.chunk_sequences))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_sequences // self.chunk_sequences)

    @property
    def has_digests(self) -> bool:
        return self.version >= 2

    @property
    def packed_stats(self) -> bool:
        """Version 3: one per-chunk statistics array for every hook, summary scalars in attributes."""
        return self.version >= 3

    # ------------------------------------------------------------------ arrays
    def data_arrays(self) -> dict[str, ArraySpec]:
        """tokens, every hook's activations and (version 2 on) the digests: the arrays open() checks."""
        T, C = self.context_size, self.chunk_sequences
        out = {"tokens": ArraySpec((self.n_sequences, T), (C, T), "int32", ("sequence", "position"), True)}
        for name, d in self.hooks:
            out[f"activations/{name}"] = ArraySpec((self.n_sequences * T, d), (C * T, d), "float16",
                                                   ("token", hook_dim(name)), True)
        if self.has_digests:
            out["digests"] = ArraySpec((self.n_chunks, DIGEST_BYTES), (1, DIGEST_BYTES), "uint8", ("chunk", "digest_byte"))
        return out

    def partial_arrays(self) -> dict[str, ArraySpec]:
        """The per-chunk statistics arrays (one row per chunk), written with each chunk."""
        n = self.n_chunks
        if self.packed_stats:
            w = self.packed_width
            return {PACKED_PATH: ArraySpec((n, w), (1, w), "float64", ("chunk", "stat"),
                                           attrs={"columns": self.column_attrs()})}
        out = {}
        for name, d in self.hooks:
            for f in PARTIAL_FIELDS:
                vec = f in VECTOR_FIELDS
                out[partial_path(name, f)] = ArraySpec((n, d) if vec else (n,), (1, d) if vec else (1,), "float64",
                                                       ("chunk", "d") if vec else ("chunk",))
        return out

    def arrays(self) -> dict[str, ArraySpec]:
        """Every array create() makes (the summary arrays come when the harvest completes)."""
        return {**self.data_arrays(), **self.partial_arrays()}

    def groups(self) -> list[str]:
        """The groups create() makes, parents first."""
        out = ["activations", "stats"]
        if not self.packed_stats:
            for name, _ in self.hooks:
                out += [f"stats/{name}", f"stats/{name}/chunks"]
        return out

    def partial_arrays_of(self, hook: str) -> list[str]:
        """The per-chunk statistics arrays that hold a hook's partial sums."""
        return [PACKED_PATH] if self.packed_stats else [partial_path(hook, f) for f in PARTIAL_FIELDS]

    def partial_array_of(self, hook: str, field: str) -> str:
        return PACKED_PATH if self.packed_stats else partial_path(hook, field)

    # ------------------------------------------------------------------ version 3: the packed columns
    @property
    def packed_width(self) -> int:
        return sum(hook_width(d) for _, d in self.hooks)

    def columns(self, hook: str) -> dict[str, slice]:
        """field -> its columns in a row of `stats/chunks` (version 3)."""
        start = 0
        for name, d in self.hooks:
            if name == hook:
                out, at = {}, start
                for f in PACKED_ORDER:
                    width = d if f in VECTOR_FIELDS else 1
                    out[f] = slice(at, at + width)
                    at += width
                return out
            start += hook_width(d)
        raise KeyError(hook)

    def column_attrs(self) -> list[list]:
        """The packed columns as [hook, field, start, stop] rows: the attributes of `stats/chunks`, so a
        reader without this package finds them without the rule."""
        return [[name, f, s.start, s.stop] for name, _ in self.hooks for f, s in self.columns(name).items()]

    # ------------------------------------------------------------------ rows in, rows out
    def partial_values(self, stats: dict[str, Any]) -> dict[str, np.ndarray]:
        """What one chunk's statistics (hook -> ChunkStats) write into each per-chunk array: path -> row."""
        if self.packed_stats:
            row = np.zeros(self.packed_width, dtype=np.float64)
            for name, _ in self.hooks:
                for f, s in self.columns(name).items():
                    row[s] = getattr(stats[name], f)
            return {PACKED_PATH: row}
        return {partial_path(name, f): np.asarray(getattr(stats[name], f), dtype=np.float64)
                for name, _ in self.hooks for f in PARTIAL_FIELDS}

    def partial_field(self, rows: dict[str, np.ndarray], hook: str, field: str) -> np.ndarray:
        """A hook's partial statistic `field`, one entry (or row of d) per chunk, from the rows read of
        its per-chunk arrays (path -> [chunks, ...])."""
        path = self.partial_array_of(hook, field)
        r = rows[path]
        if not self.packed_stats:
            return r
        s = self.columns(hook)[field]
        return r[:, s] if field in VECTOR_FIELDS else r[:, s.start]

    # ------------------------------------------------------------------ the summary
    def summary_arrays(self) -> tuple[str, ...]:
        """The summary fields stored as arrays under stats/<hook>/ (the others: attributes of that group)."""
        return ("mean", "var") if self.packed_stats else SUMMARY_FIELDS

    def summary_attrs(self) -> tuple[str, ...]:
        return tuple(f for f in SUMMARY_FIELDS if f not in self.summary_arrays())


def hook_dim(hook: str) -> str:
    """The name of a hook's width dimension (dimension_names; distinct per hook so xarray can open
    the activations group as one dataset)."""
    return f"d_{hook}"


def hook_width(d: int) -> int:
    """Columns of one hook of width d in `stats/chunks`: count, norm_sum, max_abs, n_nonfinite, sum, sumsq."""
    return 2 * d + 4


def partial_path(hook: str, field: str) -> str:
    """Versions 1 and 2: the per-chunk array of one partial statistic of one hook."""
    return f"stats/{hook}/chunks/{field}"
