"""Datasets -> fixed-size token windows, through Hugging Face `datasets`.

A dataset is a hub name, local files (text, json/jsonl, parquet, csv; a path, a folder or a glob),
or the alias `stdlib` (this Python's standard-library sources: a corpus every machine has).

A document is one row of a dataset, or one whole local text file; it is never split or
interleaved with another. The documents (not their parts) are shuffled with the seed, tokenised
(or taken from a pre-tokenised `input_ids` column), concatenated in that order with the EOS
token between documents, and cut into windows of context_size tokens, each starting with BOS
when prepend_bos is on. So a window holds the tokens of one document in their order, or the end
of one document, EOS, and the start of the next. Window i is a pure function of the arguments,
which is what lets an interrupted harvest resume and produce the same bytes."""

from __future__ import annotations

import glob as globlib
import hashlib
import queue
import re
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np

from ..common.errors import UserError, first_line
from ..common.manifest import DatasetInfo


STDLIB = "stdlib"
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".rst": "text",
             ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_ROWS_PER_BATCH = 64
_CHARS_PER_CALL = 2**16  # text tokenised per tokenizer call: tokenise about as far as the harvest reads
_SHUFFLE_BUFFER = 10_000  # rows, for streaming datasets
_WHOLE_FILES = {"sample_by": "document"}  # a text file is one document (one row), never split at lines or paragraphs


@dataclass
class DataSource:
    """Where the rows come from, resolved and checked without reading the data."""

    path: str
    name: str | None = None
    split: str = "train"
    streaming: bool = False
    builder: str | None = None  # a packaged datasets builder for local files; None for a hub dataset
    files: list[str] = field(default_factory=list)
    builder_kwargs: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str | None:
        """A hash of the local files: names, sizes and their first and last MiB."""
        return files_fingerprint(self.files) if self.files else None


def files_fingerprint(files: list[str] | list[Path]) -> str:
    """16 hex characters identifying the content of files: their names, sizes and first and last
    MiB (cheap on files of many GB, and any edit of a header, a tail or a length shows)."""
    h = hashlib.sha256()
    for f in files:
        p = Path(f)
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as fh:
            h.update(fh.read(2**20))
            if size > 2**20:
                fh.seek(max(2**20, size - 2**20))
                h.update(fh.read())
    return h.hexdigest()[:16]


_COMMIT = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")


def hub_revision(rows: Any) -> str | None:
    """The commit of a hub dataset that `datasets` loaded, as it names it in its cache paths or
    download URLs (e.g. hf://datasets/org/name@<sha>/...); None when it names none."""
    places = [c.get("filename", "") for c in (getattr(rows, "cache_files", None) or [])]
    info = getattr(rows, "info", None)
    places += list(getattr(info, "download_checksums", None) or {})
    for place in places:
        m = _COMMIT.search(str(place))
        if m:
            return m.group(0)
    return None


def stdlib_files() -> list[str]:
    """The top-level .py files of this Python's standard library."""
    return sorted(globlib.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))


def resolve_source(path: str, name: str | None = None, split: str = "train", streaming: bool = False) -> DataSource:
    """Turn the --dataset argument into a DataSource; a local path that does not exist is an error."""
    if path == STDLIB:
        return DataSource(path, name, split, streaming, "text", stdlib_files(), dict(_WHOLE_FILES))
    has_glob = any(c in path for c in "*?[")
    p = Path(path).expanduser()
    if has_glob:
        files = sorted(f for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"no files match the dataset pattern {path}")
    elif p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _suffix(f) in _BUILDERS)
        if not files:
            raise UserError(f"dataset folder {path} holds no {', '.join(sorted(set(_BUILDERS)))} files")
    elif p.is_file():
        files = [str(p)]
    elif path.startswith(("/", ".", "~")) or _suffix(p) in _BUILDERS:
        raise UserError(f"dataset path {path} does not exist")
    else:
        return DataSource(path, name, split, streaming)  # a hub dataset
    kinds = {_BUILDERS.get(_suffix(Path(f))) for f in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(f"dataset {path}: cannot mix or read these file kinds ({', '.join(sorted({_suffix(Path(f)) for f in files}))}); "
                        f"use one of {', '.join(sorted(_BUILDERS))}")
    if all(Path(f).stat().st_size == 0 for f in files):
        raise UserError(f"dataset {path} is empty: its files hold no data")
    builder = kinds.pop()
    kwargs = dict(_WHOLE_FILES) if builder == "text" else {}
    return DataSource(path, name, split, streaming, builder, [str(Path(f).resolve()) for f in files], kwargs)


def _suffix(p: Path) -> str:
    return p.suffix.lower()


def load_rows(src: DataSource, seed: int) -> Any:
    """The rows (documents) of the source as a datasets Dataset or IterableDataset, whole documents
    shuffled by the seed."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if src.builder:
            ds = datasets.load_dataset(src.builder, data_files={src.split: src.files}, split=src.split,
                                       streaming=src.streaming, **src.builder_kwargs)
        else:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=src.streaming)
    except Exception as e:  # datasets raises many kinds: not found, offline, bad split, bad file
        raise UserError(f"cannot load dataset {src.path}: {first_line(e)}") from None
    if src.streaming:
        return ds.shuffle(seed=seed, buffer_size=_SHUFFLE_BUFFER)
    return ds.shuffle(seed=seed)


class TokenWindows:
    """Fixed-size token windows from a dataset; iterate with windows(skip)."""

    def __init__(self, src: DataSource, context_size: int, tokenizer: Any = None, vocab_size: int | None = None,
                 text_column: str | None = "text", prepend_bos: bool = True, seed: int = 0):
        self.src = src
        self.context_size = context_size
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.seed = seed
        self.rows = load_rows(src, seed)
        self.column = self._pick_column(text_column)
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.bos = bos if prepend_bos else None
        self.separator = eos if eos is not None else bos
        if self.column != "input_ids" and tokenizer is None:
            raise UserError("this model has no tokenizer, so the dataset needs an input_ids column, "
                            "or pass --tokenizer NAME_OR_FOLDER")

    @property
    def prepend_bos(self) -> bool:
        return self.bos is not None

    def info(self) -> DatasetInfo:
        """The manifest's dataset entry; its revision is the hub commit, or for local files their fingerprint."""
        fingerprint = self.src.fingerprint()
        return DatasetInfo(
            path=self.src.path, name=self.src.name, split=self.src.split,
            text_column=None if self.column == "input_ids" else self.column,
            revision=fingerprint if self.src.files else hub_revision(self.rows),
            fingerprint=fingerprint, streaming=self.src.streaming,
            data_files=list(self.src.files) or None,
        )

    def _pick_column(self, text_column: str | None) -> str:
        cols = self.rows.column_names
        if cols is None:  # a streaming dataset that does not declare its features
            first = next(iter(self.rows), None)
            if first is None:
                raise UserError(f"dataset {self.src.path} is empty")
            cols = list(first)
        if text_column and text_column in cols:
            return text_column
        if "input_ids" in cols:
            return "input_ids"
        raise UserError(f"dataset {self.src.path} has no column {text_column!r} (columns: {', '.join(cols)}); "
                        "pass --text-column NAME")

    def _documents(self) -> Iterator[list[int]]:
        for batch in self.rows.iter(batch_size=_ROWS_PER_BATCH):
            col = batch[self.column]
            if self.column == "input_ids":
                yield from (list(r) for r in col)
                continue
            texts = [t for t in col if t]
            while texts:
                n, size = 0, 0
                while n < len(texts) and size < _CHARS_PER_CALL:
                    size += len(texts[n])
                    n += 1
                for ids in self.tokenizer(texts[:n], add_special_tokens=False)["input_ids"]:
                    yield ids + [self.separator] if self.separator is not None else ids
                texts = texts[n:]

    def windows(self, skip: int = 0) -> Iterator[np.ndarray]:
        """Windows [context_size] int32, in order, from window number `skip` on."""
        body = self.context_size - (1 if self.bos is not None else 0)
        pending: list[np.ndarray] = []
        n_pending = 0
        index = 0
        for ids in self._documents():
            if not ids:
                continue
            pending.append(np.asarray(ids, dtype=np.int64))
            n_pending += len(ids)
            if n_pending < body:
                continue
            flat = np.concatenate(pending)
            n_full = len(flat) // body
            for k in range(n_full):
                if index >= skip:
                    yield self._window(flat[k * body:(k + 1) * body])
                index += 1
            rest = flat[n_full * body:]
            pending, n_pending = [rest], len(rest)

    def _window(self, body: np.ndarray) -> np.ndarray:
        if self.vocab_size is not None and body.size and (body.max() >= self.vocab_size or body.min() < 0):
            bad = int(body.max() if body.max() >= self.vocab_size else body.min())
            raise UserError(f"dataset {self.src.path} has token id {bad}, outside the model's vocabulary "
                            f"(0..{self.vocab_size - 1}); use data tokenised for this model")
        if self.bos is not None:
            body = np.concatenate([[self.bos], body])
        return body.astype(np.int32)


T = TypeVar("T")
_END = object()


def prefetch(items: Iterator[T], depth: int = 256) -> Iterator[T]:
    """Run an iterator on a background thread, up to `depth` items ahead, so that reading and
    tokenising overlap the forward pass. Its exceptions are raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            q.put(e)

    threading.Thread(target=produce, name="actcache-data", daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
