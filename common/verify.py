"""verify(): read every committed chunk of a store, checking checksums, shapes and statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import first_line
from .progress import token_bar
from .store import PARTIAL_FIELDS, ActivationStore, chunk_digest, chunk_key, chunk_keys, chunk_present, chunk_stats


@dataclass
class VerifyReport:
    url: str
    chunks_checked: int = 0
    n_chunks_committed: int = 0
    n_chunks: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)
    fingerprint: str | None = None  # recomputed from the data read (format 2 on, every committed chunk readable)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "complete" if self.complete else f"incomplete: {self.n_chunks_committed}/{self.n_chunks} chunks committed"
        if self.ok:
            fp = f", fingerprint {self.fingerprint}" if self.fingerprint else ""
            return f"{self.url}: OK, {self.chunks_checked} chunks read and checked ({state}{fp})"
        return "\n".join([f"{self.url}: DAMAGED, {len(self.problems)} problem(s) in {self.chunks_checked} chunks ({state})"]
                         + [f"  {p}" for p in self.problems])


def verify(url: str | os.PathLike, progress: bool = False) -> VerifyReport:
    """Check the store against its manifest and read (decode, crc32c-check) every committed chunk; for
    format version 2 on also each chunk's digest and the store fingerprint. Never raises on damage: every
    problem found goes into the report."""
    store = ActivationStore.open(url, "r", check=False)
    m = store.manifest
    rep = VerifyReport(str(url), n_chunks_committed=store.n_committed, n_chunks=m.n_chunks, complete=m.complete)
    rep.problems += store.check_layout()
    if rep.problems:
        return rep
    v2 = m.format_version >= 2
    stored, have_digest = None, set()
    if v2:
        try:
            present = chunk_keys(store.array("digests"))
            have_digest = {j for j in range(store.n_committed) if chunk_key(store.array("digests"), j) in present}
            rep.problems += [f"digests chunk {j}: missing" for j in range(store.n_committed) if j not in have_digest]
            stored = store.read_array_chunk("digests", lambda: store.array("digests")[:store.n_committed], "all")
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"digests: unreadable ({first_line(e, 160)})")
    digests = np.zeros((store.n_committed, 16), dtype=np.uint8)
    all_read = True
    with token_bar(store.n_committed_tokens, "verify", disable=not progress) as bar:
        for j in range(store.n_committed):
            d = _check_chunk(store, j, rep, None if stored is None or j not in have_digest else bytes(stored[j]))
            if d is None:
                all_read = False
            else:
                digests[j] = np.frombuffer(d, dtype=np.uint8)
            rep.chunks_checked += 1
            a, b = store.chunk_sequence_range(j)
            bar.update((b - a) * m.context_size)
    if v2 and m.complete and all_read:
        rep.fingerprint = store.compute_fingerprint(digests)
        if rep.fingerprint != m.fingerprint:
            rep.problems.append(f"fingerprint: the data gives {rep.fingerprint} but the manifest says {m.fingerprint}")
    if m.complete:
        for h in m.hook_names:
            _check_summary(store, h, rep)
    return rep


def _check_summary(store: ActivationStore, hook: str, rep: VerifyReport) -> None:
    """The summary statistics a complete store holds for readers without this package (the arrays
    stats/<hook>/mean ..., and in version 3 the scalars in the attributes of stats/<hook>) must be there
    and be those of the per-chunk partial sums. An array that is absent reads as zeros (its fill value):
    a problem unless zero is what it is (stores of earlier releases did not write those)."""
    try:
        want = store.stats(hook)
    except Exception as e:  # noqa: BLE001  (a partial statistic missing: reported chunk by chunk already)
        if not any(f"stats/{hook}" in p or "stats/chunks" in p for p in rep.problems):
            rep.problems.append(f"stats/{hook}: unreadable ({first_line(e, 160)})")
        return
    layout = store.layout
    try:
        group = store.group["stats"][hook]
    except KeyError:
        rep.problems.append(f"stats/{hook}: missing")
        return
    for key in layout.summary_attrs():
        got = group.attrs.get(key)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            rep.problems.append(f"stats/{hook}: attribute {key!r} missing")
        elif not np.allclose(got, want[key], rtol=1e-9, atol=0.0, equal_nan=True):
            rep.problems.append(f"stats/{hook}: attribute {key!r} does not match the per-chunk statistics")
    for key in layout.summary_arrays():
        path = f"stats/{hook}/{key}"
        if key not in group:
            rep.problems.append(f"{path}: missing")
            continue
        arr = group[key]
        expected = np.asarray(want[key], dtype=np.float64)
        try:
            absent = chunk_key(arr, 0) not in chunk_keys(arr)
            got = np.asarray(arr[...], dtype=np.float64)
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"{path}: unreadable ({first_line(e, 120)})")
            continue
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-9, atol=0.0, equal_nan=True):
            what = "missing (it would read as zeros)" if absent else "does not match the per-chunk statistics"
            rep.problems.append(f"{path}: {what}")


def _check_chunk(store: ActivationStore, j: int, rep: VerifyReport, stored: bytes | None) -> bytes | None:
    """Check chunk j of every array; returns its content digest (None where a part was unreadable)."""
    m = store.manifest
    a, b = store.chunk_sequence_range(j)
    r0, r1 = store.chunk_row_range(j)
    arrays = [("tokens", store.tokens, lambda: store.tokens[a:b])]
    arrays += [(f"activations/{h}", store.activations(h), lambda h=h: store.activations(h)[r0:r1])
               for h in m.hook_names]
    got = {}
    for path, arr, read in arrays:
        if not chunk_present(arr, j):
            rep.problems.append(f"{path} chunk {j}: missing")
            continue
        try:
            data = read()
        except Exception as e:  # noqa: BLE001  (a crc32c mismatch or a broken compressed stream)
            rep.problems.append(f"{path} chunk {j}: unreadable ({first_line(e, 160)})")
            continue
        got[path] = data
        if path == "tokens":
            vocab = m.tokenizer.vocab_size
            if data.size and (data.min() < 0 or (vocab and data.max() >= vocab)):
                rep.problems.append(f"tokens chunk {j}: token ids outside 0..{vocab - 1}")
    _check_stats(store, j, {h: got[f"activations/{h}"] for h in m.hook_names if f"activations/{h}" in got}, rep)
    if len(got) != len(arrays):
        return None
    digest = chunk_digest(got["tokens"], {h: got[f"activations/{h}"] for h in m.hook_names}, m.hook_names)
    if stored is not None and stored != digest:
        rep.problems.append(f"chunk {j}: its data does not match the digest written with it "
                            "(changed after the harvest)")
    return digest


def _check_stats(store: ActivationStore, j: int, acts: dict[str, np.ndarray], rep: VerifyReport) -> None:
    """Chunk j of every per-chunk statistics array of the layout (one for all hooks in version 3, six per
    hook before) must be there, and hold the partial statistics of the activations read (hook -> rows)."""
    layout = store.layout
    rows = {}
    for path in layout.partial_arrays():
        arr = store.array(path)
        if not chunk_present(arr, j):
            rep.problems.append(f"{path} chunk {j}: missing")
            continue
        try:
            rows[path] = np.asarray(arr[j:j + 1], dtype=np.float64)
        except Exception as e:  # noqa: BLE001  (a crc32c mismatch)
            rep.problems.append(f"{path} chunk {j}: unreadable ({first_line(e, 120)})")
    for hook, x in acts.items():
        s = chunk_stats(x)
        for f in PARTIAL_FIELDS:
            if layout.partial_array_of(hook, f) not in rows:
                continue
            got = layout.partial_field(rows, hook, f)[0]
            if not np.allclose(got, getattr(s, f), rtol=1e-9, atol=0.0, equal_nan=True):
                rep.problems.append(f"stats/{hook} chunk {j}: {f} does not match the stored activations")
                break
