"""Reading a features output folder (what `actcache features` writes) latent by latent.

train/features writes it; the model side (the explorer, the session) reads it here. The kind, its
marker and its summary's name are common/outputs.py's; this module adds where each latent's record is.

  <out>/features.json                     the summary: format, store, model, one entry per SAE
  <out>/vocab.json                        token id -> token string (absent without a tokenizer)
  <out>/saes/<folder>/latents.json        per-SAE index (density, max_act, ... of every latent)
  <out>/saes/<folder>/blocks/NNNNN.json   the records of latents [N * block, (N + 1) * block)
  <out>/index.html, sae-<folder>.html     the static browser (each .json has a .js twin for file://)

A latent's record: id, n_fired, density, mean_act, max_act, histogram, top (examples: seq, pos, act,
tokens, at = index of the activating token in tokens), quantiles, top_tokens, logits."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from . import outputs
from .errors import UserError

FORMAT = outputs.FEATURES_FORMAT
SUMMARY_FILE = outputs.FEATURES_FILE
VOCAB_FILE = outputs.FEATURES_VOCAB
INDEX_PAGE = outputs.FEATURES_INDEX
DEFAULT_FOLDER = "features"  # where readers look for a run's features output unless told


def block_path(sae_folder: str, block: int) -> str:
    """The data file of a block of latents, relative to the output folder (without its suffix)."""
    return f"{sae_folder}/blocks/{block:05d}"


def build_command(run: str | Path, overwrite: bool = False) -> str:
    """The command that writes a run's features output where readers look for it by default."""
    return f"actcache features {run} --out {Path(run) / DEFAULT_FOLDER}" + (" --overwrite" if overwrite else "")


is_features_output = outputs.is_features


class FeaturesOutput:
    """A features output folder: its summary, and latent records read block by block on demand (the
    last `cache_blocks` blocks kept in memory). Safe to share between threads."""

    def __init__(self, folder: str | Path, cache_blocks: int = 64):
        self.folder = Path(folder)
        p = self.folder / SUMMARY_FILE
        if not p.is_file():
            raise UserError(f"{self.folder} holds no {SUMMARY_FILE}; build it with `actcache features RUN --out "
                            f"{self.folder}`")
        try:
            self.summary: dict[str, Any] = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{p} cannot be read as JSON ({e}); rebuild it with `actcache features`") from None
        if self.summary.get("format") != FORMAT:
            raise UserError(f"{p} is not the summary of a features output (format {self.summary.get('format')!r})")
        self.block = int(self.summary.get("block") or 256)
        self.entries = {e["name"]: e for e in self.summary.get("saes", [])}
        self._vocab: dict[str, str] | None = None
        self._blocks: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._lock = threading.Lock()

    def has(self, sae: str) -> bool:
        return sae in self.entries

    def entry_for(self, folder: str | Path) -> dict[str, Any] | None:
        """The entry for the SAE folder `folder`: the one that recorded its path, else the one of its name
        (a run that was moved or copied); whether it measured these weights is is_current's to say."""
        real = Path(folder).resolve()
        for e in self.entries.values():
            if e.get("sae_path") and Path(e["sae_path"]).resolve() == real:
                return e
        return self.entries.get(Path(folder).name)

    def is_current(self, entry: dict[str, Any], folder: str | Path) -> bool:
        """Whether an entry measured the weights now in `folder` (see outputs.is_current)."""
        return outputs.is_current(entry, folder)

    @property
    def vocab(self) -> dict[str, str]:
        if self._vocab is None:
            p = self.folder / VOCAB_FILE
            self._vocab = json.loads(p.read_text()) if p.is_file() else {}
        return self._vocab

    def token_string(self, token_id: int) -> str:
        return self.vocab.get(str(int(token_id)), f"#{int(token_id)}")

    def latent(self, sae: str, latent: int) -> dict[str, Any]:
        """The record of one latent of an SAE (see the module docstring for its fields)."""
        entry = self.entries.get(sae)
        if entry is None:
            raise UserError(f"{self.folder} has no SAE named {sae!r}; it has: {', '.join(self.entries)}")
        d_sae = int(entry["d_sae"])
        if not 0 <= int(latent) < d_sae:
            raise UserError(f"latent {latent} is out of range: {sae} has {d_sae} latents (0 .. {d_sae - 1})")
        b = int(latent) // self.block
        records = self._read_block(entry["folder"], b)
        rec = records[int(latent) - b * self.block]
        if int(rec["id"]) != int(latent):
            raise UserError(f"{self.folder}: block {b} of {sae} does not hold latent {latent}; rebuild the output")
        return rec

    def _read_block(self, folder: str, b: int) -> list[dict[str, Any]]:
        key = (folder, b)
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        p = self.folder / (block_path(folder, b) + ".json")
        try:
            records = json.loads(p.read_text())["latents"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read {p} ({e}); rebuild the features output with `actcache features`") from None
        with self._lock:
            self._blocks[key] = records
            while len(self._blocks) > self._cache_blocks:
                self._blocks.popitem(last=False)
        return records
