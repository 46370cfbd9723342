"""The folders actcache writes, and the one place that knows them.

Every output is of one kind: a store (`actcache harvest`), a run (`actcache train`: run.json, its
checkpoint, summaries and one SAE folder per SAE), an SAE folder (SAELens's cfg.json and
sae_weights.safetensors, plus our sparsity, metrics and eval.json), or a features output
(`actcache features`: features.json and the browser's pages). This module owns, for each kind, the
marker that recognises it and its file names; how to find the SAE folders of a run; what
`--overwrite` may delete; the lease of an output (on the resolved path); and the one way to publish
a folder (written beside the destination, renamed into place at the end).

The rules for replacing an output, whatever the command:
- only an output of the same kind is replaced: a run only where a run is, a store where a store is;
- never the current directory or one of its parents, never the command's own input (or a folder
  holding it), never through a symbolic link (what it points to may be anything);
- a second writer is refused at once by the lease, which is taken on the real path.

Derived results (eval.json, the evaluation columns of a summary, a features output) record the
digest of the weights they measured (`sae_digest`); `is_current` tells a reader whether the weights
in the folder are still those."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import location
from .errors import UserError
from .store_layout import TOP_ENTRIES

# ------------------------------------------------------------------------------------ file names
# an SAE folder (SAELens's layout, plus ours)
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
SAE_FILES = (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME, METRICS_FILE, EVAL_FILE)
# a run folder
RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.safetensors"
PICKLE_CHECKPOINT = "checkpoint.pt"  # what older versions wrote; refused, never unpickled
SUMMARY_FILES = ("summary.json", "summary.md", "frontier.png")  # the training summary: data, table, plot
SUMMARY_FILE, SUMMARY_TABLE, FRONTIER_PLOT = SUMMARY_FILES
CE_FRONTIER_PLOT = "frontier_ce.png"  # written by evaluation
RANK_DIR_PREFIX = "rank-"  # rank-R-of-W: one rank's checkpoint of a torchrun run
RUN_FILES = (CHECKPOINT, CHECKPOINT + ".tmp", RUN_FILE, METRICS_FILE, CE_FRONTIER_PLOT) + SUMMARY_FILES
# a store: the entries at its top (the manifest's group and its arrays); nothing else is ours
STORE_ENTRIES = frozenset({"zarr.json", *TOP_ENTRIES})
# a features output: its data, the browser's pages (one sae-NAME.html per SAE) and their assets
FEATURES_FILE = "features.json"
FEATURES_FORMAT = "actcache-features"
FEATURES_INDEX = "index.html"
FEATURES_VOCAB = "vocab.json"
FEATURES_ASSETS = "assets"
FEATURES_SAES = "saes"
FEATURES_ENTRIES = frozenset({FEATURES_FILE, "features.js", FEATURES_VOCAB, "vocab.js", FEATURES_INDEX,
                              FEATURES_ASSETS, FEATURES_SAES})


FEATURES_PAGE = ("sae-", ".html")  # sae-NAME.html: the browser's page of one SAE


def features_page(folder: str) -> str:
    """The browser's page of one SAE, by the name of its data folder under saes/."""
    return FEATURES_PAGE[0] + folder + FEATURES_PAGE[1]
# the lease's hidden file beside an output (common/lease.py)
LOCK_SUFFIX = ".actcache-lock"
# what publish() leaves only while it runs (a killed process may leave one: never an output)
TEMP_MARK = ".actcache-tmp-"
PROBE_MARK = f"{TEMP_MARK}probe-"  # the empty file a command creates and removes to see that it may write a folder


def rank_dir(out: str | Path, rank: int, world: int) -> Path:
    """The folder of one rank's checkpoint in a run trained by `world` ranks."""
    return Path(out) / f"{RANK_DIR_PREFIX}{rank}-of-{world}"


# ------------------------------------------------------------------------------------ recognising
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_sae_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / CFG_FILENAME).is_file() and (p / WEIGHTS_FILENAME).is_file()


def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def is_features(path: str | Path) -> bool:
    data = _read_json(Path(path) / FEATURES_FILE)
    return isinstance(data, dict) and data.get("format") == FEATURES_FORMAT


def is_store(url: str | os.PathLike) -> bool:
    """An actcache store: a zarr group whose attributes hold our manifest, or one whose creation was
    interrupted before the manifest was written (our three arrays' group and nothing else)."""
    from .store import ATTR

    if not location.is_remote(url):
        meta = _read_json(location.local_path(url) / "zarr.json")
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            return False
        if ATTR in (meta.get("attributes") or {}):
            return True
        names = {p.name for p in location.local_path(url).iterdir()}
        return names <= STORE_ENTRIES
    import zarr

    try:
        group = zarr.open_group(store=location.open_store(url, read_only=True), mode="r", zarr_format=3)
        return ATTR in group.attrs or set(group.keys()) <= STORE_ENTRIES
    except Exception:  # noqa: BLE001  (nothing there, or not a zarr group: not a store)
        return False


@dataclass(frozen=True)
class Kind:
    """A kind of output folder: its name in messages, the test that recognises it, and the command
    that writes it (for the one-line refusals)."""

    name: str
    recognise: Callable[[Any], bool]
    command: str


STORE = Kind("store", is_store, "actcache harvest")
RUN = Kind("run", is_run, "actcache train")
SAE_FOLDER = Kind("SAE folder", is_sae_folder, "actcache train")
FEATURES = Kind("features output", is_features, "actcache features")
KINDS = (STORE, RUN, SAE_FOLDER, FEATURES)


def kind_of(url: str | os.PathLike) -> Kind | None:
    """The kind of output at a location, or None when it is none of ours (or nothing is there)."""
    if location.is_remote(url):
        return STORE if is_store(url) else None
    p = location.local_path(url)
    if not p.is_dir():
        return None
    return next((k for k in (RUN, FEATURES, SAE_FOLDER, STORE) if k.recognise(p)), None)


# ------------------------------------------------------------------------------------ SAE folders of a run
def sae_folders(path: str | Path) -> list[Path]:
    """The SAE folders at `path`: the folder itself when it is one, else its sub-folders that are
    (a run's SAEs), in the order of the run's summary (the sweep's order), others after in name
    order. Empty when there is none."""
    p = Path(path)
    if is_sae_folder(p):
        return [p]
    if not p.is_dir():
        return []
    subs = [q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".") and is_sae_folder(q)]
    summary = _read_json(p / SUMMARY_FILE)
    rows = summary.get("saes") if isinstance(summary, dict) else None
    rank = {r.get("name"): i for i, r in enumerate(rows or []) if isinstance(r, dict)}
    return sorted(subs, key=lambda q: (rank.get(q.name, len(rank)), q.name))


def run_of(sae_folder: str | Path) -> Path | None:
    """The run folder an SAE folder belongs to, or None for a single SAE."""
    parent = Path(sae_folder).parent
    return parent if (parent / RUN_FILE).is_file() or (parent / SUMMARY_FILE).is_file() else None


def run_meta(run: str | Path) -> dict[str, Any]:
    """What a run folder says of itself: run.json over summary.json (either may be missing)."""
    meta: dict[str, Any] = {}
    for name in (RUN_FILE, SUMMARY_FILE):
        data = _read_json(Path(run) / name)
        if isinstance(data, dict):
            meta = {**data, **meta}
    return meta


# ------------------------------------------------------------------------------------ digests
def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def sae_digest(folder: str | Path) -> dict[str, str]:
    """The content digests of an SAE folder's weights and cfg.json: what a derived result measured."""
    folder = Path(folder)
    try:
        return {"weights": file_digest(folder / WEIGHTS_FILENAME), "cfg": file_digest(folder / CFG_FILENAME)}
    except OSError as e:
        raise UserError(f"cannot read the SAE folder {folder} ({e.strerror or e}); is it complete?") from None


def is_current(result: dict[str, Any], folder: str | Path) -> bool:
    """Whether a result (with its "sae_digest") measured the weights now in `folder`. A result that
    records no digest (written by an older version) cannot be vouched for: not current."""
    recorded = result.get("sae_digest") if isinstance(result, dict) else None
    if not isinstance(recorded, dict):
        return False
    try:
        return recorded == sae_digest(folder)
    except UserError:
        return False


def read_eval(folder: str | Path) -> dict[str, Any] | None:
    """The eval.json of an SAE folder when it measured the weights now there; None when there is none
    or it is stale (another training replaced the weights since)."""
    data = _read_json(Path(folder) / EVAL_FILE)
    if not isinstance(data, dict):
        return None
    return data if is_current(data, folder) else None


def remove_derived(folder: str | Path) -> None:
    """Delete the results derived from an SAE folder's weights (called when they are replaced)."""
    (Path(folder) / EVAL_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ where outputs may go
def _resolved(p: str | Path) -> Path:
    return Path(os.path.realpath(location.local_path(p)))


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_destination(out: str | os.PathLike, kind: Kind, *, inputs: Sequence[str | os.PathLike | None] = (),
                      replace: bool = False, flag: str = "--out") -> None:
    """Refuse, before any work, an output location that this command must not write or replace.

    Always refused: the current directory or one of its parents, the command's input or a folder
    holding it, a file. With `replace` (--overwrite), something that is there must be an output of
    `kind`, and not reached through a symbolic link. Nothing is touched."""
    if location.is_remote(out):
        if replace and location.exists(out):
            if not kind.recognise(out):
                raise UserError(f"{out} holds something that is not an actcache {kind.name}; --overwrite replaces "
                                f"only a {kind.name}: nothing was deleted; choose another {flag}")
            _refuse_foreign(out, kind)
        return
    given = location.local_path(out)
    real = _resolved(out)
    if given.exists() and not given.is_dir():
        raise UserError(f"{flag} {out} is a file; give a folder")
    cwd = Path(os.path.realpath(os.getcwd()))
    if _contains(real, cwd):
        raise UserError(f"{flag} {out} is the current folder or one of its parents; give a folder of its own")
    home = Path(os.path.realpath(Path.home()))
    if real == home or real == Path(real.anchor):
        raise UserError(f"{flag} {out} is {'your home folder' if real == home else 'the root folder'}; "
                        "give a folder of its own")
    for raw in inputs:
        if raw is None or location.is_remote(raw):
            continue
        src = _resolved(raw)
        if _contains(real, src):
            raise UserError(f"{flag} {out} is {'the input' if real == src else 'a folder holding the input'} "
                            f"{raw} of this command; choose another {flag}")
    if replace and _has_entries(given):
        if given.is_symlink():
            raise UserError(f"{flag} {out} is a symbolic link to {real}; --overwrite does not replace through a "
                            "link: give the real path if that is what you mean")
        if not kind.recognise(given):
            what = kind_of(given)
            held = f"an actcache {what.name}" if what else "other files"
            raise UserError(f"{out} holds no actcache {kind.name} (it holds {held}); --overwrite replaces only a "
                            f"{kind.name}: nothing was deleted; choose another {flag}")
        _refuse_foreign(out, kind)


def _refuse_foreign(out: str | os.PathLike, kind: Kind) -> None:
    """Refuse to replace an output that also holds entries the project did not write there."""
    others = foreign_entries(out, kind)
    if others:
        names = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"the {kind.name} {out} also holds {names}, which actcache did not write; move them "
                        "elsewhere, then rerun with --overwrite (nothing was deleted)")


def _has_entries(folder: Path) -> bool:
    try:
        return any(not p.name.endswith(LOCK_SUFFIX) for p in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def owned_entries(out: str | Path, kind: Kind) -> tuple[list[Path], list[Path]]:
    """(ours, others): the entries at the top of an output folder of `kind` that the project wrote
    there, and the ones it did not (a user's file, a symbolic link to elsewhere)."""
    out = Path(out)
    ours, others = [], []
    config = run_meta(out).get("config") if kind is RUN else None
    sae_names = {s.get("name") for s in (config or {}).get("saes", []) if isinstance(s, dict)}
    for p in sorted(out.iterdir()):
        if p.name.endswith(LOCK_SUFFIX):
            continue
        if kind is RUN:  # its SAE folders and features output hold only what actcache writes there, too
            mine = (p.is_file() and p.name in RUN_FILES) or _is_probe(p) or (p.is_dir() and not p.is_symlink() and (
                ((p.name in sae_names or is_sae_folder(p)) and not _foreign_in_sae(p))
                or (is_features(p) and not foreign_entries(p, FEATURES))
                or p.name.startswith(RANK_DIR_PREFIX) or p.name.startswith(TEMP_MARK)))
        else:
            mine = _own_name(p.name, kind) and not p.is_symlink()
        (ours if mine else others).append(p)
    return ours, others


def _foreign_in_sae(folder: Path) -> bool:
    """Whether an SAE folder of a run holds anything besides the files actcache writes in it (a README
    a user added before sharing it, say)."""
    return any(not (q.is_file() and not q.is_symlink() and q.name.removesuffix(".tmp") in SAE_FILES) and not _is_probe(q)
               for q in folder.iterdir())


def _is_probe(p: Path) -> bool:
    """A probe file of probe_writable: there for an instant while another command starts (an eval that
    was paused right then, say), and actcache's own."""
    return p.name.startswith(PROBE_MARK) and p.is_file() and not p.is_symlink()


def _inside(q: Path, kind: Kind) -> list[str]:
    """How to name an entry of a run that is not all ours: the files a user added to one of its SAE
    folders or its features output (q/name), else the entry itself."""
    if kind is RUN and q.is_dir() and not q.is_symlink():
        if is_features(q):
            return [f"{q.name}/{n}" for n in foreign_entries(q, FEATURES)]
        if is_sae_folder(q):
            return [f"{q.name}/{r.name}" for r in sorted(q.iterdir())
                    if not (r.is_file() and not r.is_symlink() and r.name.removesuffix(".tmp") in SAE_FILES)]
    return [q.name]


def _own_name(name: str, kind: Kind) -> bool:
    """Whether an entry of this name at the top of a store or features output is one the project writes."""
    if kind is STORE:
        return name in STORE_ENTRIES
    if kind is FEATURES:
        return name in FEATURES_ENTRIES or (name.startswith(FEATURES_PAGE[0]) and name.endswith(FEATURES_PAGE[1]))
    return True  # an SAE folder is never replaced on its own


def foreign_entries(url: str | os.PathLike, kind: Kind) -> list[str]:
    """The names of the entries of an output of `kind` that the project did not write (local or S3)."""
    if not location.is_remote(url):
        p = location.local_path(url)
        return [n for q in owned_entries(p, kind)[1] for n in _inside(q, kind)] if p.is_dir() else []
    with location.storage_errors(url, "listing"):
        fs, path = location.remote_fs(url)
        try:
            names = {Path(e.rstrip("/")).name for e in fs.ls(path, detail=False, refresh=True)}
        except FileNotFoundError:
            return []
    return sorted(n for n in names if not n.endswith(LOCK_SUFFIX) and not _own_name(n, kind))


def remove_output(url: str | os.PathLike, kind: Kind) -> None:
    """Delete the output of `kind` at a location (--overwrite), after checking it is one. A run keeps
    run.json to the last, so a kill midway still leaves a recognisable run; files of a run that the
    project did not write refuse the whole deletion."""
    if location.is_remote(url):
        if location.exists(url) and not kind.recognise(url):
            raise UserError(f"{url} is not an actcache {kind.name}; nothing was deleted")
        _refuse_foreign(url, kind)
        with location.storage_errors(url, "removing"):
            fs, path = location.remote_fs(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        return
    p = location.local_path(url)
    if not _has_entries(p):
        return
    if p.is_symlink() or not kind.recognise(p):
        raise UserError(f"{url} is not an actcache {kind.name} (or is reached through a symbolic link); "
                        "nothing was deleted")
    _refuse_foreign(p, kind)
    ours, _ = owned_entries(p, kind)
    for q in sorted(ours, key=lambda q: q.name in (RUN_FILE, "zarr.json")):  # the marker last: a kill midway
        _delete(q)                                                          # still leaves a recognisable output


def _delete(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError as e:
        raise location.storage_error(e, p, "removing") from None


# ------------------------------------------------------------------------------------ publishing
@contextlib.contextmanager
def publish(out: str | Path, kind: Kind, replace: bool = False) -> Iterator[Path]:
    """Write an output into a temporary folder beside `out` (made first, so an unwritable place is
    reported before any work) and rename it into place when the block ends without error. An
    output of the same kind already there is replaced only with `replace`; anything else there is
    never touched. Hold the lease of `out` around this."""
    out = location.local_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_MARK}{out.name}.", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private (0700); an output is a folder like any other
    except OSError as e:
        raise UserError(f"cannot write in {out.parent} ({e.strerror}): check that the folder exists and is "
                        "writable, or choose another --out") from None
    try:
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            if _has_entries(out) or out.is_symlink():
                if not replace:
                    raise UserError(f"{out} appeared while this command ran; nothing was replaced: pass "
                                    "--overwrite, or choose another --out")
                check_destination(out, kind, replace=True)
                old = out.with_name(f"{TEMP_MARK}{out.name}.old-{os.getpid()}")
                os.rename(out, old)
            else:
                out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UserError(f"{out} appeared while this command ran; nothing was replaced") from None
        raise location.storage_error(e, out, "writing") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(out: Path) -> None:
    """Delete the temporary folders of `out` that a killed writer left beside it (the caller holds the
    lease of `out`, so no live writer owns one). Only publish()'s own temporary folders, never the
    previous output set aside while it is being replaced (`.old-PID`)."""
    pattern = re.compile(re.escape(f"{TEMP_MARK}{out.name}.") + r"[a-z0-9_]{8}")
    for p in out.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lock_path(out: str | os.PathLike) -> str:
    """Where the lease of an output lives (beside its real path)."""
    from .lease import lock_url

    return lock_url(out if location.is_remote(out) else os.path.realpath(location.local_path(out)))


def lease(out: str | os.PathLike, what: str, takeover: bool = False):
    """The exclusive lease of an output, taken on its real path (so a symlink, `./x` and `x` share one)."""
    from .lease import Lease

    return Lease.acquire(out, what, takeover=takeover)


def probe_writable(folder: str | os.PathLike, what: str) -> None:
    """That a command can write `what` in an existing folder (eval.json in an SAE folder, a run's
    summary), asked before the work by creating and removing a probe file: one line at the start, not
    an error after minutes of work."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=PROBE_MARK, dir=folder)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder} ({e.strerror or e}); make the folder writable or "
                        "copy it somewhere that is") from None
    os.close(fd)
    os.unlink(name)


__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "SPARSITY_FILENAME", "METRICS_FILE", "EVAL_FILE", "SAE_FILES", "RUN_FILE",
           "CHECKPOINT", "SUMMARY_FILES", "SUMMARY_FILE", "SUMMARY_TABLE", "FRONTIER_PLOT", "CE_FRONTIER_PLOT",
           "RUN_FILES", "STORE_ENTRIES", "FEATURES_FILE", "FEATURES_FORMAT", "FEATURES_ENTRIES", "FEATURES_INDEX", "FEATURES_VOCAB",
           "features_page",
           "foreign_entries", "Kind", "STORE", "RUN", "SAE_FOLDER", "FEATURES",
           "kind_of", "sae_folders", "run_of", "run_meta", "sae_digest", "is_current", "read_eval",
           "check_destination", "remove_output", "publish", "lease", "rank_dir", "probe_writable"]
