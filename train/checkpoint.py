"""Checkpoints of a sweep and the rules for an output folder.

A checkpoint holds, for every SAE, its weights and buffers, its Adam state, its dead-latent counters
and its AuxK switch; plus the loader position, the step, and the RNG state. The learning-rate and
sparsity schedules are pure functions of the step, so the step is their state.

The file is `checkpoint.safetensors`: every tensor is a safetensors entry, and everything else (the
nesting of the state, numbers, flags, optimiser settings) is JSON in the file's metadata, where each
tensor appears as a reference to its entry. Reading it parses a JSON header and copies raw bytes;
nothing in it can run code, unlike a pickle (`torch.load`), which this package never loads: a run
folder is the kind of thing people share. It is written to `checkpoint.safetensors.tmp`, flushed to
disk, and renamed over the previous one, so a kill or a full disk at any moment leaves the last
complete checkpoint in place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..common import location, outputs
from ..common.errors import UserError, first_line
from ..common.manifest import first_difference
from ..common.outputs import CHECKPOINT, PICKLE_CHECKPOINT, RUN_FILE

FORMAT = "actcache-checkpoint"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------- writing files
def write_error(e: OSError, path: Path | str) -> UserError:
    """One line for a failed write (the same words as a harvest's, so a full disk reads the same)."""
    return location.storage_error(e, path, "writing")


def atomic_write(path: Path, data: bytes, before_replace: Callable[[], None] | None = None) -> None:
    """Write `data` to path.tmp, flush it to disk, then rename it over `path`; on any failure remove
    path.tmp and leave `path` as it was. `before_replace` runs just before the rename (a lease check)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as e:
        raise write_error(e, path) from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- state <-> tensors + JSON
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-able copy of a nested state with each tensor replaced by {"tensor": key}."""
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _flatten(v, tensors, f"{path}/{k}") for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):  # an optimiser's per-parameter state
            return {"int_dict": [[k, _flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
        raise TypeError(f"checkpoint state at {path!r} has keys of mixed types")
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else {"list": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"checkpoint state at {path!r} holds a {type(obj).__name__}, which a checkpoint cannot store")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError("malformed state")
    (kind, v), = node.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {str(k): _unflatten(x, tensors) for k, x in v.items()}
    if kind == "int_dict":
        return {int(k): _unflatten(x, tensors) for k, x in v}
    if kind == "list":
        return [_unflatten(x, tensors) for x in v]
    if kind == "tuple":
        return tuple(_unflatten(x, tensors) for x in v)
    if kind == "value":
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ValueError("malformed value")
        return v
    raise ValueError(f"unknown entry kind {kind!r}")


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file: safetensors with the non-tensor state as JSON metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "")
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(tree)}
    return save(tensors, metadata=meta)


def decode_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint file back into the nested state (no code from the file runs)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("not an actcache checkpoint")
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(f"checkpoint format version {meta.get('format_version')}, this actcache reads "
                                 f"{FORMAT_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = _unflatten(json.loads(meta["state"]), tensors)
    except Exception as e:  # noqa: BLE001  (a damaged or foreign file, whatever the parser says)
        raise UserError(f"the checkpoint {path} cannot be read ({first_line(e)}); rerun with --overwrite "
                        "to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"the checkpoint {path} cannot be read (it holds no step); rerun with --overwrite to start over")
    return state


def save_checkpoint(out: Path, state: "dict[str, Any] | bytes", before_replace: Callable[[], None] | None = None
                    ) -> Path:
    """Atomically replace out/checkpoint.safetensors with `state` (or the bytes encode_checkpoint made of it)."""
    path = Path(out) / CHECKPOINT
    atomic_write(path, state if isinstance(state, bytes) else encode_checkpoint(state), before_replace)
    return path


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The state saved in `out`, or None when there is no checkpoint. A pickle checkpoint is refused."""
    out = Path(out)
    legacy = out / PICKLE_CHECKPOINT
    if legacy.exists():
        raise UserError(f"{legacy} is a pickle file, which actcache does not load (unpickling can run code from "
                        f"the file); actcache checkpoints are {CHECKPOINT}: delete it, or rerun with --overwrite "
                        "to start over")
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    return decode_checkpoint(path)


# ---------------------------------------------------------------------- the output folder
def check_output(out: Path, resume: bool, overwrite: bool, inputs: tuple = ()) -> None:
    """Refusals that need no lease (so a refused run creates nothing)."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    outputs.check_destination(out, outputs.RUN, inputs=inputs, replace=overwrite)
    if out.is_dir() and not outputs.is_run(out) and _has_entries(out):
        raise UserError(f"{out} is not empty and holds no actcache run; choose an empty or new --out folder")


def _current_form(run: dict) -> dict:
    """A run record as this release writes it: records of the release before name the sweep's batch
    `batch_size` (now `batch_tokens`) and keep --allow-repeat beside the config (now its
    `repeat_epochs`)."""
    cfg = run.get("config")
    if isinstance(cfg, dict) and "batch_size" in cfg:
        cfg["batch_tokens"] = cfg.pop("batch_size")
    if run.pop("allow_repeat", False) and isinstance(cfg, dict):
        cfg["repeat_epochs"] = True
    return run


def prepare_output(out: Path, run: dict[str, Any], resume: bool, overwrite: bool = False) -> bool:
    """Make the output folder ready (call with the folder's lease held). Returns True when there is a
    run to continue.

    A folder that holds another run is refused unless resume is set and the run is the same one
    (same config and store), or overwrite is set (the old run, and every result derived from it, is
    deleted; a file the project did not write refuses that); a non-empty folder that is not a run is
    always refused."""
    out = Path(out)
    check_output(out, resume, overwrite)
    run_file = out / RUN_FILE
    if run_file.is_file():
        if overwrite:
            outputs.remove_output(out, outputs.RUN)
        else:
            try:
                previous = json.loads(run_file.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{run_file} is damaged; rerun with --overwrite to start over") from None
            if not resume:
                raise UserError(f"{out} already holds a training run; pass --resume to continue it, "
                                "--overwrite to start it again, or choose another --out")
            previous = _current_form(previous)
            was_world, now_world = previous.get("world_size", 1), run.get("world_size", 1)
            if was_world != now_world and {**previous, "world_size": 1} == {**run, "world_size": 1}:
                how = (f"torchrun --nproc-per-node {was_world} (or as many ranks over several nodes)" if was_world > 1
                       else "one process, without torchrun")
                raise UserError(f"{out} was trained on {was_world} rank{'s' if was_world > 1 else ''} and this run has "
                                f"{now_world}: each rank's checkpoint holds its own share of the SAEs; rerun with "
                                f"{was_world} rank{'s' if was_world > 1 else ''} ({how}) to resume it")
            if previous != run:
                where, was, now = first_difference(previous, run)
                if where == "world_size":
                    raise UserError(f"{out} was trained by {was or 1} ranks (world_size {was or 1}, now {now or 1}): "
                                    f"rerun with {was or 1} ranks to resume it, or --overwrite it")
                diff = f"{where or 'run'}: was {was!r}, now {now!r}"
                raise UserError(f"{out} holds a different run ({diff}); resume it with its own config and store, "
                                "--overwrite it, or choose another --out")
            return True
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out) from None
    atomic_write(run_file, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())
    return False


def _has_entries(folder: Path) -> bool:
    """Whether a folder holds anything besides a lease and the run.json that a run starting there
    is writing (its lease, taken next, says who that is)."""
    return any(not p.name.endswith(outputs.LOCK_SUFFIX) and p.name != RUN_FILE + ".tmp" for p in folder.iterdir())
