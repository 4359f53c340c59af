"""Model weights as one flat float32 vector, the form a SharedWeights block publishes: a
torch state_dict flattened in its order, and copied back in place."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ezengine.recipe import published_step
from ezengine.rings import SharedWeights

# Publishes a WeightHistory keeps: the timetable's readers need the newest publish at or
# before a step at most one publish behind the writer's latest (recipe.py), one more spare.
HISTORY_SLOTS = 3


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


class WeightHistory:
    """The last HISTORY_SLOTS publishes of one kind of weights (self-play or target), each
    in its own SharedWeights block under the training step it was published at (stored as
    version step + 1; 0 is an empty block). One writer, many readers."""

    def __init__(self, blocks: list[SharedWeights]) -> None:
        self.blocks = blocks
        self.size = blocks[0].size

    def publish(self, state: Mapping[str, torch.Tensor], step: int) -> None:
        """Publish `state` as the weights of training `step` over the oldest publish."""
        oldest = min(self.blocks, key=lambda b: b.version)
        publish_state(oldest, state, step + 1)

    def steps(self) -> list[int]:
        """Training steps of the publishes held now."""
        return [b.version - 1 for b in self.blocks if b.version]

    def read(self, step: int, out: np.ndarray) -> int | None:
        """Copy the publish a reader of training `step` takes (recipe.published_step) into
        `out`; returns its training step, or None while nothing is published."""
        while True:
            held = self.steps()
            if not held:
                return None
            want = published_step(held, step)
            for block in self.blocks:
                if block.version == want + 1 and block.read_into(out) == want + 1:
                    return want
            # The writer replaced it between the look and the copy: look again.


class LocalHistory:
    """WeightHistory's rule in one process (the serial runner): copies of the last
    HISTORY_SLOTS publishes, each under its training step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def publish(self, state: Mapping[str, torch.Tensor], step: int) -> None:
        self.states[step] = {k: v.detach().clone() for k, v in state.items()}
        while len(self.states) > HISTORY_SLOTS:
            del self.states[min(self.states)]

    def load(self, module: torch.nn.Module, step: int, loaded: int | None) -> int:
        """Load the publish a reader of training `step` takes into `module`, unless it is
        the one already `loaded`; returns its training step."""
        want = published_step(list(self.states), step)
        if want != loaded:
            module.load_state_dict(self.states[want])
        return want
