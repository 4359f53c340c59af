"""Model weights as one flat float32 vector, the form a SharedWeights block publishes: a
torch state_dict flattened in its order, and copied back in place."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ezengine.rings import SharedWeights


def publish_state(block: SharedWeights, state: Mapping[str, torch.Tensor], version: int
                  ) -> None:
    """Flatten a state_dict straight into the shared block as `version` (no staging copy)."""
    with block.publishing(version) as data:
        flatten_state(state, out=data)


def state_size(state: Mapping[str, torch.Tensor]) -> int:
    """Number of values ``flatten_state`` produces for this state_dict."""
    return sum(int(t.numel()) for t in state.values())


def flatten_state(state: Mapping[str, torch.Tensor], out: np.ndarray | None = None) -> np.ndarray:
    """Concatenate every tensor of a state_dict, in its order, into float32 [state_size].

    Integer and bool buffers (BatchNorm's ``num_batches_tracked``) are stored as float32,
    exact up to 2**24; ``load_flat`` casts them back. Complex tensors are rejected.
    """
    total = state_size(state)
    if out is None:
        out = np.empty(total, np.float32)
    elif out.shape != (total,) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape ({total},), got {out.dtype} {out.shape}")
    dst = torch.from_numpy(out)
    pos = 0
    for key, tensor in state.items():
        if tensor.is_complex():
            raise ValueError(f"state entry {key!r} is complex ({tensor.dtype}); not supported")
        n = int(tensor.numel())
        # copy_ casts dtype and moves off the GPU in one step, without a temporary.
        dst[pos:pos + n].copy_(tensor.detach().reshape(-1))
        pos += n
    return out


def load_flat(module: torch.nn.Module, flat: np.ndarray) -> None:
    """Copy a ``flatten_state(module.state_dict())`` vector back into ``module`` in place.

    Parameters and buffers keep their tensors (optimizers and device placement stay valid);
    each value is cast back to its tensor's dtype.
    """
    state = module.state_dict()  # detached tensors sharing storage with the module's
    total = state_size(state)
    flat = np.asarray(flat)
    if flat.shape != (total,):
        raise ValueError(f"{type(module).__name__} has {total} state values, "
                         f"the flat vector has shape {flat.shape}")
    if flat.dtype != np.float32 or not flat.flags.writeable or not flat.flags.c_contiguous:
        # torch.from_numpy warns on read-only arrays (e.g. ring views); copy those.
        flat = np.array(flat, dtype=np.float32)
    src = torch.from_numpy(flat)
    pos = 0
    with torch.no_grad():
        for tensor in state.values():
            n = int(tensor.numel())
            tensor.copy_(src[pos:pos + n].view(tensor.shape))
            pos += n
