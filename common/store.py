"""The actcache store (format version 3; versions 1 and 2 are still read, version 2 resumed): create,
open, write a chunk, commit, read.

Layout (a Zarr v3 group; docs/store-format.md has the full description, common/store_layout.py the
arrays of each version, which everything here derives from):
  tokens                  int32   [n_sequences, context_size]
  activations/<hook>      float16 [n_sequences * context_size, d]
  digests                 uint8   [n_chunks, 16]  per-chunk content digests (version 2 on)
  stats/chunks            float64 [n_chunks, sum of 2d+4 over hooks]  per-chunk partial sums (version 3)
  stats/<hook>/mean, var  float64 [d]  the summary (its scalars: attributes of stats/<hook>, version 3)
Chunk j of every array covers the sequences of tokens chunk j. A chunk is valid only once the
manifest's n_chunks_committed counter has passed it; the counter is always written last.

Readers trust nothing they did not check: open() compares the manifest with the arrays' metadata,
and reading a committed chunk that is absent, truncated or fails its checksum is a StoreError.
On local disk, chunks of uncompressed arrays (`--codec none`: bytes + crc32c) are read by memory-mapping
their files (MappedChunks) instead of decoding them, and chunks compressed by blosc or zstd are read
into a reused buffer and decompressed by that library straight into the caller's array (CodedChunks),
skipping zarr's pipeline and its intermediate copies; the crc32c is checked either way."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import google_crc32c
import numpy as np
import zarr

from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.sync import sync
from zarr.errors import BaseZarrError
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import AsyncGroup
from zarr.storage import LocalStore, MemoryStore, StorePath, WrapperStore

from . import codecs, location
from .errors import StoreError, UserError, first_line
from .manifest import FORMAT_VERSION, READABLE_VERSIONS, Manifest
from .store_layout import DIGEST_BYTES, PARTIAL_FIELDS, ArraySpec, StoreLayout

ATTR = "actcache"
TARGET_CHUNK_BYTES = 16 * 2**20  # uncompressed bytes of the widest hook's activation chunk


def chunk_digest(tokens: np.ndarray, acts: dict[str, np.ndarray], hooks: list[str]) -> bytes:
    """The content digest of one chunk: its tokens (int32) and every hook's float16 rows, in manifest order."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    for name in hooks:
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(acts[name], dtype="<f2").data)
    return h.digest()


def chunk_sequences_for(context_size: int, max_d: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Sequences per chunk so that the widest hook's float16 chunk is about target_bytes."""
    per_seq = context_size * max_d * 2
    return max(1, int(target_bytes // per_seq))


def _array_config() -> dict:
    # an all-zero chunk must still be written, or verify could not tell it from a missing one
    return {"write_empty_chunks": True}


def _create_array(root: zarr.Group, path: str, spec: ArraySpec, codec: str) -> zarr.Array:
    """One array of the layout in a group being built: data arrays take the store's compressor, the
    others crc32c alone; each followed by crc32c, so a damaged chunk fails loudly."""
    parent, _, name = path.rpartition("/")
    group = root[parent] if parent else root
    arr = group.create_array(
        name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
        compressors=codecs.compressors(codec) if spec.compressed else [codecs.Crc32cCodec()],
        fill_value=0.0 if spec.dtype.startswith("float") else 0, config=_array_config(),
        dimension_names=spec.dims,
    )
    if spec.attrs:
        arr.attrs.update(spec.attrs)
    return arr


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
        # called before every commit (a writer's Lease.check): raises when this writer lost the store
        self.before_commit: Callable[[], None] | None = None
        # read uncompressed local chunks by memory-mapping their files (False: always through zarr's codecs)
        self.mmap_reads = True
        # decode blosc/zstd local chunks with that library into the caller's memory (False: through zarr)
        self.direct_decode = True
        self._mapped: dict[str, MappedChunks | None] = {}
        self._coded: dict[str, CodedChunks | None] = {}
        self._arrays: dict[str, zarr.Array] = {}
        # what this handle wrote of each chunk's partial statistics and digest (finalize needs no reads)
        self._written: dict[str, dict[int, Any]] = {}

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, url: str | os.PathLike, manifest: Manifest) -> "ActivationStore":
        """Make a new, empty store with every array at its final shape and no chunk committed (retried
        across a brief storage outage: creating replaces whatever an earlier attempt left)."""
        return location.retrying(lambda: cls._create(url, manifest), url, "creating")

    @classmethod
    def _create(cls, url: str | os.PathLike, manifest: Manifest) -> "ActivationStore":
        # zarr builds the hierarchy in memory (it asks a store about every name it creates: hundreds of
        # requests on S3), then each object is written once: the bytes are zarr's own
        memory = MemoryStore()
        root = zarr.open_group(store=memory, mode="w", zarr_format=3)
        m = manifest
        m.format_version = FORMAT_VERSION
        layout = StoreLayout.of(m)
        for g in layout.groups():
            root.require_group(g)
        for path, spec in layout.arrays().items():
            _create_array(root, path, spec, m.codec)
        store = location.open_store(url)
        # what zarr's mode="w" does: replace whatever is there; then the group without its manifest
        # first (an interrupted creation is recognised by that), its arrays, and the manifest last
        sync(StorePath(store).delete_dir())
        _copy_objects(memory, store, [k for k in _memory_keys(memory) if k != "zarr.json"], first=["zarr.json"])
        m.n_chunks_committed = 0
        m.complete = False
        m.fingerprint = None
        root.attrs[ATTR] = m.to_dict()
        _copy_objects(memory, store, ["zarr.json"])
        out = cls(str(url), _rebind(root, store), m)
        for path in layout.arrays():  # their metadata is known: opening them would cost requests
            out._arrays[path] = _rebind(root[path], store).with_config(_array_config())
        return out

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "r", check: bool = True) -> "ActivationStore":
        """Open an existing store ('r' to read, 'r+' to resume writing). Checks the format version and
        (check=True) the manifest against the arrays' metadata: names, shapes, chunk grids, dtypes and
        that the last committed chunk of every array exists. Reads no chunk data. Not retried: a server
        that is down when a command starts is reported at once (each request times out, see
        location.REQUEST_TIMEOUT)."""
        with location.storage_errors(url, "opening"):
            if not location.exists(url):
                raise StoreError(f"no store at {url}: check the path (harvest one with `actcache harvest --out {url}`)")
            store = location.open_store(url, read_only=(mode == "r"))
            try:
                root = zarr.open_group(store=store, mode=mode, zarr_format=3)
            except Exception as e:  # zarr raises several kinds for "not a group"
                if location.storage_failure(e) and not isinstance(e, BaseZarrError):
                    raise
                raise StoreError(f"{url} is not an actcache store (not a Zarr v3 group: {type(e).__name__})") from None
            raw = root.attrs.get(ATTR)
            if not isinstance(raw, dict):
                raise StoreError(f"{url} is a Zarr group but not an actcache store (no attrs['{ATTR}'] manifest)")
            version = raw.get("format_version")
            if version not in READABLE_VERSIONS:
                raise StoreError(
                    f"{url} has store format version {version}; this actcache reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))}: use the actcache release that wrote it, or harvest again"
                )
            try:
                manifest = Manifest.from_dict(raw)
            except (TypeError, KeyError, ValueError) as e:
                raise StoreError(f"{url} has a damaged manifest ({e}); harvest again") from None
            out = cls(str(url), root, manifest)
            if check:
                problems = out.check_layout(deep=True)
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise StoreError(f"{url} does not match its manifest: {problems[0]}{more}; "
                                     f"run `actcache verify {url}` for the full list")
        return out

    @property
    def layout(self) -> StoreLayout:
        """The arrays of this store's format version and geometry (common/store_layout.py)."""
        return StoreLayout.of(self.manifest)

    def check_layout(self, deep: bool = False) -> list[str]:
        """Problems of the manifest against the arrays' metadata (no chunk data is read). deep: also
        that the last committed chunk of every array exists (a store whose tail never arrived)."""
        m = self.manifest
        problems = []
        if not 0 <= m.n_chunks_committed <= m.n_chunks:
            problems.append(f"manifest: {m.n_chunks_committed} chunks committed but the store has {m.n_chunks}")
        if m.complete and m.n_chunks_committed != m.n_chunks:
            problems.append(f"manifest: marked complete with {m.n_chunks_committed} of {m.n_chunks} chunks committed")
        ho = m.held_out_range
        if ho is not None and not 0 <= ho[0] < ho[1] <= m.n_sequences:
            problems.append(f"manifest: held-out range {list(ho)} is outside the store's {m.n_sequences} sequences")
        layout = self.layout
        data = layout.data_arrays()
        for path, spec in layout.arrays().items():
            shape, chunks, dtype = spec.shape, spec.chunks, spec.dtype
            try:
                arr = self.array(path)  # opened once: reading its chunks later costs no request for it
            except KeyError:
                problems.append(f"{path}: missing (the manifest lists it)")
                continue
            if not isinstance(arr, zarr.Array):
                problems.append(f"{path}: a group where the manifest expects an array")
                continue
            got = (tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))
            if got != (shape, chunks, dtype):
                problems.append(f"{path}: shape/chunks/dtype {got} do not match the manifest {(shape, chunks, dtype)}")
            elif (deep and path in data and 0 < m.n_chunks_committed <= m.n_chunks
                  and not chunk_present(arr, m.n_chunks_committed - 1)):
                problems.append(f"{path}: chunk {m.n_chunks_committed - 1} is committed but missing")
        return problems

    # ---------------------------------------------------------------- geometry
    @property
    def n_chunks(self) -> int:
        return self.manifest.n_chunks

    @property
    def n_committed(self) -> int:
        return self.manifest.n_chunks_committed

    @property
    def n_committed_sequences(self) -> int:
        """Sequences in the committed chunks (the last chunk may be partial)."""
        return min(self.manifest.n_sequences, self.n_committed * self.manifest.chunk_sequences)

    @property
    def n_committed_tokens(self) -> int:
        return self.n_committed_sequences * self.manifest.context_size

    def held_out_range(self) -> tuple[int, int] | None:
        """Sequences [a, b) held out for evaluation (whole chunks at the end), or None (version 1 stores,
        or a harvest with --held-out 0)."""
        return self.manifest.held_out_range

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.fingerprint

    def chunk_sequence_range(self, j: int) -> tuple[int, int]:
        cs = self.manifest.chunk_sequences
        return j * cs, min((j + 1) * cs, self.manifest.n_sequences)

    def chunk_row_range(self, j: int) -> tuple[int, int]:
        a, b = self.chunk_sequence_range(j)
        c = self.manifest.context_size
        return a * c, b * c

    def array(self, path: str) -> zarr.Array:
        """The array at `path` ("tokens", "activations/<hook>", "stats/<hook>/chunks/sum" ...), opened once
        per handle: opening reads its metadata, two requests on S3, which every chunk written or read
        would otherwise repeat for each of its arrays. (Only truncate() changes a shape, through these.)
        An all-zero chunk is written too, as create() asks, so that it is never taken for a missing one."""
        arr = self._arrays.get(path)
        if arr is None:
            arr = self.group[path]
            if isinstance(arr, zarr.Array):  # write_empty_chunks is no part of the stored metadata: say it again
                arr = arr.with_config(_array_config())
            self._arrays[path] = arr
        return arr

    @property
    def tokens(self) -> zarr.Array:
        return self.array("tokens")

    def activations(self, hook: str) -> zarr.Array:
        if hook not in self.manifest.hook_names:
            raise StoreError(f"hook {hook!r} is not in {self.url}; it has: {', '.join(self.manifest.hook_names)}")
        return self.array(f"activations/{hook}")

    # ---------------------------------------------------------------- writing
    def write_chunk(self, j: int, tokens: np.ndarray, acts: dict[str, np.ndarray],
                    stats: dict[str, ChunkStats]) -> None:
        """Write every array's chunk j (not yet committed). Rewriting a chunk is allowed, so a brief
        storage outage is retried (location.retrying)."""
        location.retrying(lambda: self._write_chunk(j, tokens, acts, stats), self.url, f"writing chunk {j} of")

    def _write_chunk(self, j: int, tokens: np.ndarray, acts: dict[str, np.ndarray],
                     stats: dict[str, ChunkStats]) -> None:
        a, b = self.chunk_sequence_range(j)
        r0, r1 = self.chunk_row_range(j)
        layout = self.layout
        writes: list[tuple[zarr.Array, Any, Any]] = [(self.tokens, slice(a, b), tokens)]
        for name, x in acts.items():
            writes.append((self.activations(name), slice(r0, r1), x))
        for path, row in layout.partial_values(stats).items():
            writes.append((self.array(path), j, row))
            self._written.setdefault(path, {})[j] = row
        if layout.has_digests:
            digest = np.frombuffer(chunk_digest(tokens, acts, self.manifest.hook_names), dtype=np.uint8)
            writes.append((self.array("digests"), j, digest))
            self._written.setdefault("digests", {})[j] = digest
        _write_all(writes)

    def commit(self, n_chunks_committed: int, complete: bool = False, **fields: Any) -> None:
        """Advance the counter: the last write of a chunk. Written as one object (atomic). `fields`:
        manifest fields updated with it (e.g. n_clamped, device). Retried across a brief storage outage,
        each attempt asking `before_commit` (the lease) again first."""
        for k in fields:
            if not hasattr(self.manifest, k):
                raise TypeError(f"the manifest has no field {k!r}")
        location.retrying(lambda: self._commit(n_chunks_committed, complete, fields), self.url, "committing")

    def _commit(self, n_chunks_committed: int, complete: bool, fields: dict[str, Any]) -> None:
        if self.before_commit is not None:
            self.before_commit()
        for k, v in fields.items():
            setattr(self.manifest, k, v)
        self.manifest.n_chunks_committed = n_chunks_committed
        self.manifest.complete = complete
        self.group.attrs[ATTR] = self.manifest.to_dict()

    def truncate(self, n_sequences: int) -> None:
        """Shrink every array to n_sequences (a dataset that ran out early); call before finalize.
        Retried across a brief storage outage (resizing to the same shape again changes nothing)."""
        location.retrying(lambda: self._truncate(n_sequences), self.url, "truncating")

    def _truncate(self, n_sequences: int) -> None:
        m = self.manifest
        n_chunks = -(-n_sequences // m.chunk_sequences)
        self.tokens.resize((n_sequences, m.context_size))
        for h in m.hooks:
            self.activations(h.name).resize((n_sequences * m.context_size, h.d))
        layout = self.layout
        for path in list(layout.partial_arrays()) + (["digests"] if layout.has_digests else []):
            arr = self.array(path)
            arr.resize((n_chunks,) + arr.shape[1:])
        if m.planned_n_sequences is None:
            m.planned_n_sequences = m.n_sequences
        m.n_sequences = n_sequences
        m.held_out = held_out_after_truncation(m.held_out, m.planned_n_sequences, n_sequences, m.chunk_sequences)

    def finalize(self) -> None:
        """Write the summary statistics and mark the store complete (each step retried across a brief
        storage outage)."""
        for h in self.manifest.hooks:
            location.retrying(lambda: self._write_summary(h.name), self.url, f"writing the statistics of {h.name} in")
        fp = self.compute_fingerprint(self._written_rows("digests", self.n_chunks)) \
            if self.layout.has_digests else None
        self.commit(self.n_chunks, complete=True, fingerprint=fp)

    def _write_summary(self, hook: str) -> None:
        s = self.stats(hook)
        layout = self.layout
        # built by zarr in memory, then one PUT per object (no existence checks against the store);
        # an object written before is replaced
        memory = MemoryStore()
        g = zarr.open_group(store=memory, mode="w", zarr_format=3)
        for key in layout.summary_arrays():
            arr = np.asarray(s[key], dtype="float64")
            dims = ("d",) if arr.ndim == 1 else ()
            # every chunk written, zeros too (config): an absent one then always means damage
            g.create_array(key, shape=arr.shape, dtype="float64", fill_value=0.0, dimension_names=dims,
                           config=_array_config())[...] = arr
        keys = [k for k in _memory_keys(memory) if k != "zarr.json"]
        if layout.summary_attrs():  # version 3: the scalars in the group's own metadata, one object
            g.attrs.update({key: float(s[key]) for key in layout.summary_attrs()})
            keys.append("zarr.json")
        root = self.group.store_path.path
        prefix = f"{root}/stats/{hook}" if root else f"stats/{hook}"
        _copy_objects(memory, self.group.store_path.store, keys, prefix=prefix)

    def _written_rows(self, path: str, n: int) -> np.ndarray | None:
        """Rows 0..n-1 of a per-chunk array as this handle wrote them, or None when it did not write them all."""
        rows = self._written.get(path, {})
        if n == 0 or any(j not in rows for j in range(n)):
            return None
        return np.stack([np.asarray(rows[j]) for j in range(n)])

    def stored_digests(self, upto: int | None = None) -> np.ndarray:
        """The per-chunk digests written with the chunks, uint8 [n, 16] (version 2 on); a digest that is
        absent (zarr would give zeros) is a StoreError naming it."""
        n = self.n_chunks if upto is None else upto
        self.require_chunks("digests", range(n))
        return self.read_array_chunk("digests", lambda: self.array("digests")[:n], f"0..{n - 1}")

    def require_chunks(self, path: str, chunks: "range | list[int] | np.ndarray") -> None:
        """StoreError naming the first of these chunks (along the first axis) of the array at `path` that
        is absent from the store: zarr reads an absent chunk as its fill value (zeros), which no reader
        may take for data. One listing of the array's chunk keys."""
        wanted = [int(j) for j in chunks]
        if not wanted:
            return
        arr = self.array(path)
        present = location.retrying(lambda: chunk_keys(arr), self.url, f"listing the chunks of {path} in")
        for j in wanted:
            if chunk_key(arr, j) not in present:
                raise StoreError(f"chunk {j} of {path} in {self.url} is committed but missing: the store is "
                                 f"damaged; run `actcache verify {self.url}`")

    def partial_rows(self, hook: str, field: str, chunks: "list[int] | range | None" = None) -> np.ndarray:
        """The per-chunk partial statistic `field` of a hook for these chunks (default: the committed
        ones), one row per chunk, each checked to be in the store first."""
        return self.partial_table(hook, chunks, (field,))[field]

    def partial_table(self, hook: str, chunks: "list[int] | range | None" = None,
                      fields: tuple[str, ...] = PARTIAL_FIELDS) -> dict[str, np.ndarray]:
        """field -> the per-chunk partial statistic of a hook for these chunks (default: the committed
        ones), each array read once (version 3: one array for every field and hook), every chunk checked
        to be in the store first. The rows this handle wrote (a harvest finalizing) are not read back."""
        self.activations(hook)
        chunks = range(self.n_committed) if chunks is None else chunks
        layout = self.layout
        rows: dict[str, np.ndarray] = {}
        for path in dict.fromkeys(layout.partial_array_of(hook, f) for f in fields):
            if isinstance(chunks, range) and chunks.start == 0 and chunks.step == 1:
                written = self._written_rows(path, chunks.stop)
                if written is not None:
                    rows[path] = written
                    continue
            rows[path] = self._read_rows(path, chunks)
        return {f: layout.partial_field(rows, hook, f) for f in fields}

    def _read_rows(self, path: str, chunks: "list[int] | range") -> np.ndarray:
        """Rows of these chunks of a per-chunk array, each checked to be in the store first."""
        self.require_chunks(path, chunks)
        arr = self.array(path)
        if isinstance(chunks, range) and chunks.step == 1:
            return self.read_array_chunk(path, lambda: arr[chunks.start:chunks.stop], f"{chunks.start}..")
        idx = np.asarray(list(chunks), dtype=np.int64)
        sel = (idx,) + ((slice(None),) if arr.ndim > 1 else ())
        return self.read_array_chunk(path, lambda: arr.get_orthogonal_selection(sel), "of the training range")

    def compute_fingerprint(self, digests: np.ndarray | None = None) -> str:
        """The fingerprint from the manifest's identity fields and the per-chunk digests (the stored ones
        unless given): no chunk data is read."""
        d = self.stored_digests() if digests is None else digests
        return self.manifest.fingerprint_of(np.ascontiguousarray(d, dtype=np.uint8).tobytes())

    # ---------------------------------------------------------------- reading
    def stats(self, hook: str, upto: int | None = None) -> dict[str, Any]:
        """Summary statistics of a hook over the committed chunks (or the first `upto`)."""
        n = self.n_committed if upto is None else upto
        rows: dict[str, np.ndarray] = {}
        if n:
            rows = self.partial_table(hook, range(n))
        count = float(rows["count"].sum()) if n else 0.0
        d = self.manifest.hook(hook).d
        if count == 0:
            z = np.zeros(d)
            return {"count": 0.0, "mean": z, "var": z, "mean_norm": 0.0, "max_abs": 0.0, "n_nonfinite": 0.0}
        mean = rows["sum"].sum(axis=0) / count
        var = np.maximum(rows["sumsq"].sum(axis=0) / count - mean**2, 0.0)
        return {
            "count": count,
            "mean": mean,
            "var": var,
            "mean_norm": float(rows["norm_sum"].sum() / count),
            "max_abs": float(rows["max_abs"].max()),
            "n_nonfinite": float(rows["n_nonfinite"].sum()),
        }

    def summary(self, hook: str) -> dict[str, Any]:
        """The summary statistics of a hook: for a complete store, the ones finalize wrote (a few
        objects, however many chunks: `verify` checks them against the per-chunk sums, whose presence
        is checked here by one listing); for one still being harvested, stats() over its committed
        chunks."""
        if not self.manifest.complete:
            return self.stats(hook)
        layout = self.layout
        for path in dict.fromkeys(layout.partial_array_of(hook, f) for f in PARTIAL_FIELDS):
            self.require_chunks(path, range(self.n_committed))
        group = self.group["stats"][hook]

        def read() -> dict[str, Any]:
            out: dict[str, Any] = {key: float(group.attrs[key]) for key in layout.summary_attrs()}
            for key in layout.summary_arrays():
                arr = np.asarray(group[key][...], dtype=np.float64)
                out[key] = arr if arr.ndim else float(arr)
            return out

        return self.read_array_chunk(f"stats/{hook}", read, "summary")

    def read_tokens(self, j: int) -> np.ndarray:
        """The int32 tokens of committed chunk j, [sequences, context_size]."""
        a, b = self._committed_range(j, self.chunk_sequence_range)
        return self._read_first_axis_chunk("tokens", lambda: self.tokens, j, a, b)

    def read_token_rows(self, a: int, b: int) -> np.ndarray:
        """The int32 tokens of sequences [a, b) (committed), chunk by chunk, each chunk checked present."""
        cs = self.manifest.chunk_sequences
        parts = []
        for j in range(a // cs, -(-b // cs)):
            s0, s1 = self.chunk_sequence_range(j)
            parts.append(self.read_tokens(j)[max(a, s0) - s0:min(b, s1) - s0])
        if not parts:
            return np.zeros((0, self.manifest.context_size), dtype=np.int32)
        return np.concatenate(parts)

    def read_chunk(self, hook: str, j: int) -> np.ndarray:
        """The float16 activations of committed chunk j of a hook, [rows, d].

        From a local store written with `--codec none` this is a read-only view of the memory-mapped
        chunk file (its crc32c checked first): no decode and no copy; a local blosc or zstd chunk is
        decompressed by numcodecs straight into a new array (CodedChunks); otherwise zarr decodes it."""
        r0, r1 = self._committed_range(j, self.chunk_row_range)
        if hook not in self.manifest.hook_names:
            self.activations(hook)  # the StoreError naming the hooks there are
        return self._read_first_axis_chunk(f"activations/{hook}", lambda: self.activations(hook), j, r0, r1)

    def read_chunk_into(self, hook: str, j: int, out: np.ndarray) -> np.ndarray:
        """Committed chunk j of a hook decoded into `out` (float16, [rows of chunk j, d], writable), the
        same values as read_chunk. A compressed local chunk is decompressed straight into `out`, with no
        array of its own in between; otherwise read_chunk's result is copied there. Returns `out`."""
        r0, r1 = self._committed_range(j, self.chunk_row_range)
        if hook not in self.manifest.hook_names:
            self.activations(hook)  # the StoreError naming the hooks there are
        path = f"activations/{hook}"
        coded = self.coded_chunks(path, lambda: self.activations(hook)) if self.direct_decode else None
        if coded is not None:
            if out.shape != (r1 - r0,) + coded.chunk_shape[1:] or out.dtype != coded.dtype:
                raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; chunk {j} of {path} is "
                                 f"{(r1 - r0,) + coded.chunk_shape[1:]} {coded.dtype}")
            self.read_array_chunk(path, lambda: coded.read_into(j, out), str(j))
            return out
        np.copyto(out, self._read_first_axis_chunk(path, lambda: self.activations(hook), j, r0, r1))
        return out

    def _read_first_axis_chunk(self, path: str, array: Callable[[], zarr.Array], j: int, a: int, b: int) -> np.ndarray:
        """Rows [a, b) = chunk j of an array chunked along its first axis only: mapped or decoded directly
        when it can be, else decoded by zarr. Opening the array (its metadata) is skipped once its way of
        reading is known."""
        mapped = self.mapped_chunks(path, array) if self.mmap_reads else None
        if mapped is not None:
            return self.read_array_chunk(path, lambda: mapped.read(j, b - a), str(j))
        coded = self.coded_chunks(path, array) if self.direct_decode else None
        if coded is not None:
            return self.read_array_chunk(
                path, lambda: coded.read_into(j, np.empty((b - a,) + coded.chunk_shape[1:], coded.dtype)), str(j))
        arr = array()
        return self.read_array_chunk(path, lambda: _read_present(arr, j, a, b), str(j))

    def coded_chunks(self, path: str, array: Callable[[], zarr.Array] | None = None) -> "CodedChunks | None":
        """How chunks of the array at `path` are decoded without zarr (CodedChunks), or None when they go
        through zarr's codecs (a remote store, another codec chain or chunk layout). Decided once per array."""
        if path not in self._coded:
            self._coded[path] = CodedChunks.of(self.group[path] if array is None else array())
        return self._coded[path]

    def mapped_chunks(self, path: str, array: Callable[[], zarr.Array] | None = None) -> "MappedChunks | None":
        """How chunks of the array at `path` are memory-mapped, or None when they go through zarr's
        codecs (a remote store, a compressor in the chain, another chunk layout). Decided once per array."""
        if path not in self._mapped:
            self._mapped[path] = MappedChunks.of(self.group[path] if array is None else array())
        return self._mapped[path]

    def _committed_range(self, j: int, rng) -> tuple[int, int]:
        if not 0 <= j < self.n_committed:
            raise StoreError(f"chunk {j} of {self.url} is not committed (the store has {self.n_committed} "
                             f"committed chunks of {self.n_chunks})")
        return rng(j)

    def read_array_chunk(self, path: str, read, chunk: str) -> np.ndarray:
        """Run read(), again after a transient storage failure (location.retrying); an absent, truncated
        or corrupt chunk becomes one StoreError line naming it, a failing storage one UserError line."""
        try:
            return location.retrying(read, self.url, f"reading chunk {chunk} of {path} in")
        except _MissingChunk:
            raise StoreError(f"chunk {chunk} of {path} in {self.url} is committed but missing: the store is "
                             f"damaged; run `actcache verify {self.url}`") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (a crc32c mismatch, a broken compressed stream, a network error)
            if location.storage_failure(e):
                raise location.storage_error(e, self.url, f"reading chunk {chunk} of {path} in") from None
            raise StoreError(f"chunk {chunk} of {path} in {self.url} is damaged ({first_line(e, 120)}); "
                             f"run `actcache verify {self.url}`") from None

    def nbytes_stored(self, prefix: str = "") -> int:
        return location.disk_usage(self.url, prefix)


def held_out_for(n_sequences: int, chunk_sequences: int, n_chunks: int) -> dict[str, int] | None:
    """The held-out range of the last n_chunks whole chunks of a store (at least one chunk stays for
    training), or None."""
    total = -(-n_sequences // chunk_sequences)
    n_chunks = min(n_chunks, total - 1)
    if n_chunks <= 0:
        return None
    start = max(0, total - n_chunks) * chunk_sequences
    return {"start_sequence": start, "stop_sequence": n_sequences}


def held_out_after_truncation(held_out: dict[str, int] | None, planned: int, n_sequences: int,
                              chunk_sequences: int) -> dict[str, int] | None:
    """The held-out range of a store cut short (the data ran out): the same share of its chunks as
    planned (at least one), at the new end."""
    if not held_out:
        return None
    n_held = -(-(held_out["stop_sequence"] - held_out["start_sequence"]) // chunk_sequences)
    old, new = -(-planned // chunk_sequences), -(-n_sequences // chunk_sequences)
    return held_out_for(n_sequences, chunk_sequences, max(1, round(n_held * new / old)))


class _MissingChunk(Exception):
    pass


def chunk_key(arr: zarr.Array, j: int) -> str:
    """The store key of chunk j along the first axis of an array (the one chunk of a 0-d array)."""
    key = arr.metadata.encode_chunk_key((j,) + (0,) * (arr.ndim - 1) if arr.ndim else ())
    prefix = arr.store_path.path
    return f"{prefix}/{key}" if prefix else key


def chunk_present(arr: zarr.Array, j: int) -> bool:
    """Whether chunk j (along the first axis) of an array exists in the store: zarr returns the fill
    value for an absent chunk, so every reader asks first."""
    return bool(sync(arr.store_path.store.exists(chunk_key(arr, j))))


def chunk_keys(arr: zarr.Array) -> set[str]:
    """The keys of every chunk of an array that is in the store (one listing of its folder)."""
    prefix = arr.store_path.path
    store = arr.store_path.store

    async def collect() -> set[str]:
        return {k async for k in store.list_prefix(f"{prefix}/" if prefix else "") if not k.endswith("zarr.json")}

    return sync(collect())


def _local_chunk_files(arr: zarr.Array) -> tuple[Path, tuple[int, ...], np.dtype, tuple[Any, ...]] | None:
    """(folder, chunk shape, little-endian dtype, codecs) of an array whose chunks this module may read
    as files itself: a zarr v3 array on local disk, default chunk keys, a regular grid of whole rows,
    codecs `bytes` (little-endian) first and `crc32c` last. Anything else: None (zarr reads it)."""
    store, md = arr.store_path.store, arr.metadata
    if not isinstance(store, LocalStore) or getattr(md, "zarr_format", None) != 3:
        return None
    if not isinstance(md.chunk_key_encoding, DefaultChunkKeyEncoding) or not isinstance(md.chunk_grid, RegularChunkGrid):
        return None
    chain = tuple(md.codecs)
    if len(chain) < 2 or not isinstance(chain[0], BytesCodec) or not isinstance(chain[-1], Crc32cCodec):
        return None
    dtype = np.dtype(arr.dtype)
    endian = getattr(chain[0].endian, "value", chain[0].endian)
    if dtype.itemsize > 1 and endian != "little":
        return None
    chunks = tuple(md.chunk_grid.chunk_shape)
    if not chunks or chunks[1:] != tuple(arr.shape[1:]):
        return None
    prefix = arr.store_path.path
    return (Path(store.root) / prefix if prefix else Path(store.root)), chunks, dtype.newbyteorder("<"), chain


@dataclass(frozen=True)
class MappedChunks:
    """Chunk files of an uncompressed array on local disk, read by memory-mapping them.

    Applies when the array is in a LocalStore, is Zarr v3 with a regular grid whose chunks span every
    axis but the first, the default chunk key encoding, and the codec chain `bytes` (little-endian)
    then `crc32c` (what `--codec none` writes). A chunk file is then the chunk's raw C-order bytes
    (the last chunk of an array is stored at full size too, padded with the fill value) followed by
    the crc32c of those bytes, 4 bytes little-endian. The file name comes from the array metadata's
    own chunk key encoding."""

    folder: Path
    metadata: Any
    chunk_shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, arr: zarr.Array) -> "MappedChunks | None":
        found = _local_chunk_files(arr)
        if found is None or len(found[3]) != 2:  # bytes, crc32c: no compressor
            return None
        folder, chunks, dtype, _ = found
        return cls(folder, arr.metadata, chunks, dtype)

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def file(self, j: int) -> Path:
        return self.folder / self.metadata.encode_chunk_key((j,) + (0,) * (len(self.chunk_shape) - 1))

    def read(self, j: int, n: int) -> np.ndarray:
        """The first n rows of chunk j as a read-only view of its mapped file, after checking its size
        and crc32c. Absent: _MissingChunk; truncated or failing its checksum: ValueError."""
        try:
            f = open(self.file(j), "rb")
        except FileNotFoundError:
            raise _MissingChunk() from None
        with f:
            size, want = os.fstat(f.fileno()).st_size, self.chunk_bytes + 4
            if size != want:
                raise ValueError(f"the chunk file holds {size} bytes where {want} were written (truncated or replaced)")
            # the mapping outlives the descriptor; a writer replaces chunk files by renaming, never in place
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(m, dtype=np.uint8)
        stored = bytes(raw[-4:])
        computed = google_crc32c.value(raw[:-4]).to_bytes(4, "little")
        if computed != stored:
            raise ValueError(f"crc32c checksum mismatch: stored {stored.hex()}, computed {computed.hex()}")
        row = int(np.prod(self.chunk_shape[1:]))
        return np.frombuffer(m, dtype=self.dtype, count=n * row).reshape((n,) + self.chunk_shape[1:])


_read_buffers = threading.local()  # per reading thread: one bytearray the chunk files are read into, reused


def _chunk_file_bytes(f: Any) -> np.ndarray:
    """The whole of an open chunk file (uint8), read into this thread's reused buffer (no fresh
    allocation per chunk)."""
    size = os.fstat(f.fileno()).st_size
    buf = getattr(_read_buffers, "buf", None)
    if buf is None or buf.shape[0] < size:
        buf = _read_buffers.buf = np.empty(size, np.uint8)
    view = buf[:size]
    got = f.readinto(memoryview(view))
    if got != size:
        raise ValueError(f"the chunk file gave {got} of its {size} bytes (changed while read)")
    return view


@dataclass
class CodedChunks:
    """Chunk files of a compressed array on local disk, decoded without zarr's pipeline.

    Applies when the array is in a LocalStore, is Zarr v3 with a regular grid whose chunks span every
    axis but the first, the default chunk key encoding, and the codec chain `bytes` (little-endian),
    one `blosc` or `zstd` compressor, then `crc32c` (what the blosc-* and zstd codecs write). A chunk
    file is then the compressed bytes of the full-size chunk (the last one padded with the fill value)
    followed by their crc32c, 4 bytes little-endian. It is read into a per-thread reused buffer, its
    crc32c checked, and decompressed by numcodecs (the library zarr's codecs call) into the caller's
    array: the same bytes as zarr's decode, one copy fewer and no fresh buffers per chunk."""

    folder: Path
    metadata: Any
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    decompress: Callable[[Any, Any], Any]

    @classmethod
    def of(cls, arr: zarr.Array) -> "CodedChunks | None":
        found = _local_chunk_files(arr)
        if found is None or len(found[3]) != 3:  # bytes, a compressor, crc32c
            return None
        folder, chunks, dtype, chain = found
        if isinstance(chain[1], BloscCodec):
            from numcodecs import blosc

            decompress = blosc.decompress
        elif isinstance(chain[1], ZstdCodec):
            from numcodecs import zstd

            decompress = zstd.decompress
        else:
            return None
        return cls(folder, arr.metadata, chunks, dtype, decompress)

    def file(self, j: int) -> Path:
        return self.folder / self.metadata.encode_chunk_key((j,) + (0,) * (len(self.chunk_shape) - 1))

    def read_into(self, j: int, out: np.ndarray) -> np.ndarray:
        """Decode chunk j into `out` (its first out.shape[0] rows; C-contiguous and writable) after checking
        the crc32c. Absent: _MissingChunk; truncated or failing its checksum: ValueError. Returns `out`."""
        try:
            f = open(self.file(j), "rb")
        except FileNotFoundError:
            raise _MissingChunk() from None
        with f:
            raw = _chunk_file_bytes(f)
        if len(raw) < 4:
            raise ValueError(f"the chunk file holds {len(raw)} bytes, too few for its checksum")
        body, stored = raw[:-4], raw[-4:].tobytes()
        computed = google_crc32c.value(body).to_bytes(4, "little")
        if computed != stored:
            raise ValueError(f"crc32c checksum mismatch: stored {stored.hex()}, computed {computed.hex()}")
        if out.shape[0] == self.chunk_shape[0] and out.flags.c_contiguous:
            self.decompress(body, out)
        else:  # a partial last chunk is stored at full size: decode it whole, keep its first rows
            full = np.empty(self.chunk_shape, self.dtype)
            self.decompress(body, full)
            out[...] = full[:out.shape[0]]
        return out


def _read_present(arr: zarr.Array, j: int, a: int, b: int) -> np.ndarray:
    """Rows [a, b) = chunk j, read with one request: an absent chunk raises _MissingChunk (zarr alone
    would give its fill value)."""
    a_arr = arr._async_array
    strict = zarr.Array(AsyncArray(a_arr.metadata, StorePath(_StrictChunks(arr.store_path.store), arr.store_path.path),
                                   a_arr.config))
    return strict[a:b]


class _StrictChunks(WrapperStore):
    """A store whose get() of an absent object raises _MissingChunk instead of returning None."""

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None:
            raise _MissingChunk()
        return buf


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


# ------------------------------------------------------------------------------------------ requests
# On S3 every object is a request: the store's metadata is built with zarr in memory and written one
# object at a time, arrays created here keep their metadata instead of reading it back, and a chunk is
# read with one GET that tells an absent chunk from a present one.
def _memory_keys(memory: MemoryStore) -> list[str]:
    async def collect() -> list[str]:
        return sorted([k async for k in memory.list()])

    return sync(collect())


def _copy_objects(memory: MemoryStore, store: Any, keys: list[str], first: list[str] | None = None,
                  prefix: str = "") -> None:
    """Write these objects of an in-memory zarr hierarchy to `store` under `prefix` (`first` before
    the others, which go concurrently)."""
    import asyncio

    proto = default_buffer_prototype()

    async def put(k: str) -> None:
        buf = await memory.get(k, prototype=proto)
        await store.set(f"{prefix}/{k}" if prefix else k, buf)

    async def run() -> None:
        for k in first or []:
            await put(k)
        await asyncio.gather(*(put(k) for k in keys))

    sync(run())


def _write_all(writes: "list[tuple[zarr.Array, Any, Any]]") -> None:
    """arr[selection] = value for each, all at once: on S3 the requests overlap instead of queueing
    one behind the other, and compressions of several arrays run side by side."""
    import asyncio

    async def run() -> list:
        # every write finishes (or fails) before this returns: a retry never races a write still in flight
        return await asyncio.gather(*(arr._async_array.setitem(sel, val) for arr, sel, val in writes),
                                    return_exceptions=True)

    for r in sync(run()):
        if isinstance(r, BaseException):
            raise r


def _rebind(node: "zarr.Array | zarr.Group", store: Any, prefix: str = "") -> Any:
    """The same array or group (metadata as built) on another store: no request to open it."""
    path = f"{prefix}/{node.path}" if prefix and node.path else (prefix or node.path)
    if isinstance(node, zarr.Array):
        a = node._async_array
        return zarr.Array(AsyncArray(a.metadata, StorePath(store, path), a.config))
    return zarr.Group(AsyncGroup(node.metadata, StorePath(store, path)))
