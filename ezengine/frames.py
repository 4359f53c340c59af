"""Frame stacking, in one place: a model input is the last `frame_stack` frames of an
environment stacked on the first feature axis, oldest first; a new episode's stack repeats
its first frame."""

from __future__ import annotations

import numpy as np
import torch


def stacked_shape(frame_shape: tuple[int, ...], frame_stack: int) -> tuple[int, ...]:
    """Shape of one model input: `frame_stack` frames of `frame_shape` on the first axis."""
    return (frame_shape[0] * frame_stack, *frame_shape[1:])


class FrameStacks:
    """The last `stack` frames of N environments: [N, stack, *frame_shape]."""

    def __init__(self, first_frames: np.ndarray, stack: int) -> None:
        self.frames = np.repeat(first_frames[:, None], stack, axis=1)

    def advance(self, frames: np.ndarray, restarted: np.ndarray) -> None:
        """Append each environment's newest frame [N, ...]; where `restarted` (bool [N]) a
        new episode began, its whole stack becomes that first frame."""
        self.frames[:, :-1] = self.frames[:, 1:]
        self.frames[:, -1] = frames
        self.frames[restarted] = frames[restarted][:, None]

    def model_input(self) -> np.ndarray:
        """[N, stack * C, ...]: frames stacked on the first feature axis."""
        n, s, *shape = self.frames.shape
        return self.frames.reshape(n, s * shape[0], *shape[1:])


def model_inputs(frames: torch.Tensor, frame_stack: int) -> torch.Tensor:
    """[B, n - stack + 1, stack*C, ...]: every model input of a batch's frame windows
    [B, n, C, ...]; input j stacks frames j .. j+stack-1, oldest first."""
    b, n = frames.shape[:2]
    windows = frames.unfold(1, frame_stack, 1).movedim(-1, 2)  # [B, n-stack+1, stack, C, ...]
    return windows.reshape(b, n - frame_stack + 1, -1, *frames.shape[3:])
