"""The training batch: what reanalysis hands the learner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

Layout = list[tuple[str, tuple[int, ...], np.dtype]]


@dataclass
class TrainingBatch:
    """One learner batch, all numpy (it crosses process boundaries as is).

    frames: [B, stack+K, C, ...] observations o_{t-stack+1} .. o_{t+K}; the model input
    at t+k stacks frames k .. k+stack-1 (`model_inputs`): the one at t starts the unroll,
    those at t+1..t+K are the targets of the consistency loss. actions: int64 [B, K].
    value_targets: float32 [B, K+1]. value_prefix_targets: float32 [B, K]. policy_targets:
    float32 [B, K+1, A]. masks: float32 [B, K+1], masks[:, 0] = 1. weights: float32 [B]
    PER importance weights. positions: int64 [B] replay positions (for priority updates).
    target_version: training step of the target model that made the targets.
    """

    frames: np.ndarray
    actions: np.ndarray
    value_targets: np.ndarray
    value_prefix_targets: np.ndarray
    policy_targets: np.ndarray
    masks: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    target_version: int

    @staticmethod
    def layout(batch_size: int, unroll_steps: int, frame_stack: int,
               frame_shape: tuple[int, ...], frame_dtype: np.dtype | str, num_actions: int
               ) -> Layout:
        """(name, shape, dtype) of every field, in declaration order (the shared-memory
        layout of a batch)."""
        b, k, a = batch_size, unroll_steps, num_actions
        shapes = {
            "frames": ((b, frame_stack + k, *frame_shape), np.dtype(frame_dtype)),
            "actions": ((b, k), np.dtype(np.int64)),
            "value_targets": ((b, k + 1), np.dtype(np.float32)),
            "value_prefix_targets": ((b, k), np.dtype(np.float32)),
            "policy_targets": ((b, k + 1, a), np.dtype(np.float32)),
            "masks": ((b, k + 1), np.dtype(np.float32)),
            "weights": ((b,), np.dtype(np.float32)),
            "positions": ((b,), np.dtype(np.int64)),
            "target_version": ((), np.dtype(np.int64)),
        }
        return [(f.name, *shapes[f.name]) for f in fields(TrainingBatch)]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TrainingBatch:
        """A batch holding copies of `arrays` (e.g. a shared-memory slot's views)."""
        values = {f.name: np.array(arrays[f.name]) for f in fields(cls)}
        values["target_version"] = int(values["target_version"])
        return cls(**values)

    def write_into(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Copy every field into `arrays` (e.g. a shared-memory slot's views)."""
        for f in fields(self):
            arrays[f.name][...] = getattr(self, f.name)
