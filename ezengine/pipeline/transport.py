"""How the roles exchange data: shared-memory blocks attached in a child, versioned weights,
ring writes that give up when the run stops."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ezengine.model import EfficientZeroNet
from ezengine.pipeline.weights import WeightHistory, load_flat
from ezengine.recipe import published_step
from ezengine.rings import (
    Ring,
    RingTimeout,
    SharedCounters,
    SharedWeights,
)

POLL_S = 0.001


# Blocks this (child) process attached; detached before it exits so no view outlives them.
_ATTACHED: list[Any] = []


def attach(kind: type, spec: Any) -> Any:
    """Attach a shared-memory block (Ring, SharedCounters or SharedWeights) in a child."""
    block = kind.attach(spec)
    _ATTACHED.append(block)
    return block


def refresh(model: EfficientZeroNet, weights: SharedWeights, flat: np.ndarray,
            loaded: int) -> int:
    """Load newer published weights into `model`; returns the version now loaded."""
    if weights.version != loaded:
        loaded = weights.read_into(flat)
        load_flat(model, flat)
    return loaded


def write_unless_stopped(ring: Ring, counters: SharedCounters, fill: Any) -> bool:
    """Write one slot with `fill(slot)`, waiting while the ring is full; gives up (returns
    False) once the run is stopping, so a producer never hangs on a consumer that quit."""
    while True:
        try:
            with ring.write(timeout=1.0) as slot:
                fill(slot)
            return True
        except RingTimeout:
            if counters["stop"]:
                return False


def wait_for_training(counters: SharedCounters, step: int) -> None:
    """Block until the learner has trained, and published the weights of, `step` (or has
    finished, or the run stops)."""
    while (counters["train_steps"] < step and not counters["learner_done"]
           and not counters["stop"]):
        time.sleep(POLL_S)


def load_published(model: EfficientZeroNet, history: WeightHistory, step: int,
                   flat: np.ndarray, loaded: int | None) -> int | None:
    """Load the publish a reader of training `step` takes into `model`, unless it is the
    one already `loaded`; returns the training step of the weights now loaded."""
    held = history.steps()
    if held and published_step(held, step) == loaded:
        return loaded
    got = history.read(step, flat)
    if got is not None:
        load_flat(model, flat)
    return got


class Stopped(Exception):
    """This child was told to stop at a point where it has nothing to save."""
