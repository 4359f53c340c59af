"""Checkpoints: written atomically, loaded safely.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists,
dicts), saved with ``torch.save`` to a temporary file in the same directory and renamed
over the target, so a crash never leaves a half-written file. Loading always uses
``torch.load(weights_only=True)``: a shared checkpoint can never run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ezengine.atomic import atomic_write


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write `state` to `path` (temp file + fsync + rename)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # unpickling errors come in many types
        # torch's own message suggests turning safe loading off: never pass that on.
        raise ValueError(
            f"{path} is corrupt or not an ezengine checkpoint: it cannot be read as weights "
            f"and plain values (ezengine loads nothing else)") from None
