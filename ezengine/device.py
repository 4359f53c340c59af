"""Where the model runs, and per-process torch settings."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device is 'cuda' but torch sees no CUDA GPU here; use --device cpu "
                         "or --device auto")
    return torch.device(name)


def configure_torch(threads: int | None = None) -> None:
    """Per-process torch settings: flush denormals (a 10-100x CPU slowdown otherwise) and
    an explicit intra-op thread count (oversubscription stalls small ops)."""
    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)
