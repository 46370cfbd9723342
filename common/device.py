"""Which torch device to run on: one rule for the harvest (the model) and training (the SAEs)."""

from __future__ import annotations

import torch

from .errors import UserError


def pick_device(device: str | None = None) -> torch.device:
    """The device named, or CUDA when there is one, else the CPU. Naming a CUDA device on a
    machine without CUDA is the user's error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use e.g. cpu, cuda or cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev
