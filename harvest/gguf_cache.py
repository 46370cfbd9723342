"""A converted copy of each .gguf model, so that only its first load pays for reading the file.

Transformers reads a GGUF file's metadata three times per load (config, weights, tokenizer) and
dequantises every tensor: most of a load's time (about 20 s for the bundled 135M model on a 2-core
machine). The first load saves what it produced (the config, the float32 weights as safetensors,
the tokenizer files) in a folder of the cache, keyed by the file's content (SHA-256) and the
transformers version that converted it; later loads read that folder instead.

The cache is `$ACTCACHE_CACHE_DIR`, else `$XDG_CACHE_HOME/actcache`, else `~/.cache/actcache`;
`ACTCACHE_CACHE_DIR=off` turns it off. An entry is JSON and safetensors only (nothing in it can run
code), published by one rename (a reader never sees half of one), and any problem with it (a
read-only or full disk, a damaged entry) costs only the conversion: the model is then read from
the .gguf file as if there were no cache, with one warning line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger("actcache")

ENV = "ACTCACHE_CACHE_DIR"
MARKER = "actcache-gguf-conversion.json"  # written last, before the rename: an entry holds it or is not one
FORMAT = 1


def cache_root() -> Path | None:
    """The cache folder, or None when turned off."""
    given = os.environ.get(ENV)
    if given is not None:
        return None if given.strip().lower() in ("", "off", "0", "none") else Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "actcache"


def content_key(path: Path, converter_version: str) -> str:
    """What an entry is keyed by: the file's content and the version of the code that converts it."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    h.update(f"\0{converter_version}\0{FORMAT}".encode())
    return h.hexdigest()[:24]


def entry_folder(gguf: Path, converter_version: str) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    return root / "gguf" / f"{gguf.stem}-{content_key(gguf, converter_version)}"


def lookup(folder: Path | None) -> Path | None:
    """The entry when it is complete (its marker is there), else None."""
    return folder if folder is not None and (folder / MARKER).is_file() else None


def save(folder: Path, source: Path, write: Callable[[Path], None]) -> None:
    """Publish an entry: `write(tmp)` fills a temporary folder beside it, the marker goes in last, one
    rename puts it in place. Two processes converting at once both succeed (the second keeps the
    first's entry). Never raises: the cache is an optimisation, and a failure only warns."""
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": source.name, "format": FORMAT}) + "\n")
        try:
            os.rename(tmp, folder)
            tmp = None
        except OSError:
            if lookup(folder) is None:
                raise
    except Exception as e:  # noqa: BLE001: any failure here only costs the next load its conversion
        log.warning(f"could not keep a converted copy of {source.name} in {folder.parent} "
                    f"({type(e).__name__}: {e}); the next load converts it again")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def discard(folder: Path, why: BaseException) -> None:
    """Remove an entry that failed to load (only a folder that holds our marker is removed)."""
    log.warning(f"the converted copy {folder} could not be read ({type(why).__name__}: {why}); "
                "reading the .gguf file instead")
    if (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)
