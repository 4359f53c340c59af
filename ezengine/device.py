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


def configure_torch_for(device: torch.device) -> None:
    """The settings of a process whose model runs on `device`: one intra-op thread on CPU,
    as in every pipeline process. This model's ops are small: a second thread gains little
    alone and, beside another busy process, makes each op wait for a thread that has no
    core (`ezengine eval` of a CartPole run next to a training run went from 10 s to over
    8 minutes); and the same thread count computes as the training run's own evaluations."""
    configure_torch(threads=1 if device.type == "cpu" else None)
