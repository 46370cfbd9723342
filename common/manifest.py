"""The manifest: everything needed to interpret (and reproduce) a store, kept in the root group's
attrs["actcache"]. Part of the public store format (docs/store-format.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # version 1: no held-out part, no fingerprint, details in a free-form `extra`
# a harvest resumes a store of these versions in its own layout (common/store_layout.py); version 1 it does not
RESUMABLE_VERSIONS = (2, 3)


@dataclass
class ModelInfo:
    name: str  # as given: a hub name, a local folder, a .gguf file, an alias or a random: spec
    revision: str | None = None
    d_model: int = 0
    n_layers: int = 0
    n_ctx: int = 0
    dtype: str = "float32"  # the compute dtype of the forward pass
    architecture: str | None = None


@dataclass
class TokenizerInfo:
    name: str | None = None
    vocab_size: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


def special_token_ids(tokenizer: Any) -> list[int]:
    """The ids of a tokenizer's BOS, EOS and pad tokens, sorted, without repeats: the positions training,
    the metrics and the top contexts leave out by default. Takes a store manifest's TokenizerInfo or a
    transformers tokenizer (anything with bos/eos/pad_token_id); None gives []."""
    if tokenizer is None:
        return []
    ids = (getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return sorted({int(i) for i in ids if i is not None})


@dataclass
class DatasetInfo:
    path: str = ""
    name: str | None = None  # the dataset config name
    split: str = "train"
    text_column: str | None = "text"  # None when the data is pre-tokenised (input_ids)
    revision: str | None = None
    fingerprint: str | None = None  # a hash of local files (path, size, mtime-free content sample)
    streaming: bool = False
    data_files: list[str] | None = None


@dataclass
class HookInfo:
    name: str
    d: int


@dataclass
class Manifest:
    model: ModelInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo
    hooks: list[HookInfo]
    context_size: int
    prepend_bos: bool
    seed: int
    n_sequences: int  # planned; the arrays have this many rows of sequences
    chunk_sequences: int  # sequences per chunk, identical in every array
    codec: str
    batch_size: int  # sequences per forward pass (affects float rounding, so part of identity)
    overflow: str = "error"  # "error" or "clamp"
    dtype: str = "float16"
    n_chunks_committed: int = 0
    complete: bool = False
    format_version: int = FORMAT_VERSION
    package_version: str = __version__
    # sequences [start_sequence, stop_sequence) held out for evaluation (whole chunks at the end), or None
    held_out: dict[str, int] | None = None
    # 16 hex chars identifying the data: written when the harvest completes (None before, and in version 1)
    fingerprint: str | None = None
    planned_n_sequences: int | None = None  # set when the dataset ran out before n_sequences were stored
    n_clamped: dict[str, int] = field(default_factory=dict)  # values clamped to float16's range, per hook
    device: str | None = None  # where the forward passes ran (the last run of a resumed harvest)

    # fields that change while a harvest runs, or that do not bear on the bytes of the arrays
    PROGRESS_FIELDS = ("n_chunks_committed", "complete", "package_version", "fingerprint", "planned_n_sequences",
                       "n_clamped", "device")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_sequences // self.chunk_sequences)

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.context_size

    @property
    def held_out_range(self) -> tuple[int, int] | None:
        h = self.held_out
        return None if not h else (int(h["start_sequence"]), int(h["stop_sequence"]))

    @property
    def hook_names(self) -> list[str]:
        return [h.name for h in self.hooks]

    def hook(self, name: str) -> HookInfo:
        for h in self.hooks:
            if h.name == name:
                return h
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        """A manifest of any readable version; version 1's `extra` keys become the typed fields."""
        d = dict(d)
        extra = d.pop("extra", None) or {}
        for k in ("planned_n_sequences", "n_clamped", "device"):
            if k in extra and k not in d:
                d[k] = extra[k]
        known = {f.name for f in fields(cls)}
        return cls(
            model=ModelInfo(**d.pop("model")),
            tokenizer=TokenizerInfo(**d.pop("tokenizer")),
            dataset=DatasetInfo(**d.pop("dataset")),
            hooks=[HookInfo(**h) for h in d.pop("hooks")],
            **{k: v for k, v in d.items() if k in known},
        )

    def identity(self) -> dict[str, Any]:
        """The fields that decide the stored bytes (and the held-out range): what a fingerprint covers."""
        d = self.to_dict()
        for k in self.PROGRESS_FIELDS:
            d.pop(k, None)
        return d

    def fingerprint_of(self, chunk_digests: bytes) -> str:
        """The store fingerprint: 16 hex chars over the identity fields and the per-chunk digests."""
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode())
        h.update(chunk_digests)
        return h.hexdigest()

    def first_difference(self, other: "Manifest") -> str | None:
        """The first field (dotted path) whose value differs, ignoring progress fields."""
        d = first_difference(self.identity(), other.identity())
        return None if d is None else f"{d[0]} (store has {d[1]!r}, now {d[2]!r})"


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first place (a dotted path into nested dicts and lists) where a and b differ, with the two
    values there; None when they are equal. Used to say why a resume is refused."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)
