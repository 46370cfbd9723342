"""Checkpoints of a sweep and the rules for an output folder.

A checkpoint holds, for every SAE, its weights and buffers, its Adam state, its dead-latent counters
and its AuxK switch; plus the loader position, the step, and the RNG state. The learning-rate and
sparsity schedules are pure functions of the step, so the step is their state. A checkpoint is
written to a temporary file and renamed over the previous one, so a kill at any moment leaves the
last complete checkpoint in place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..common.errors import UserError

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Atomically replace out/checkpoint.pt with `state`."""
    path = Path(out) / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file: say so rather than crash with a pickle traceback
        raise UserError(f"the checkpoint {path} cannot be read ({type(e).__name__}); delete it to start over") from None


def prepare_output(out: Path, run: dict[str, Any], resume: bool) -> bool:
    """Make the output folder ready. Returns True when there is a run to continue.

    A folder that holds another run is refused unless resume is set and the run is the same one
    (same config and store); a non-empty folder that is not a run is always refused."""
    out = Path(out)
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if not resume:
            raise UserError(f"{out} already holds a training run; pass --resume to continue it, "
                            "or choose another --out")
        if previous != run:
            diff = _first_difference(previous, run)
            raise UserError(f"{out} holds a different run ({diff}); resume it with its own config and store, "
                            "or choose another --out")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no actcache run; choose an empty or new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    return False


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or 'run'}: was {a!r}, now {b!r}"
