"""Replay: trajectories stored position by position, each frame once, sampled by priority.

A *position* is one observation of a trajectory together with what happened there: the
action taken, the (training) reward received, the search's root value and visit
distribution, and the environment step at which it was collected. A trajectory of T actions
occupies T + 1 positions; the last holds the final observation and no action (action -1),
and records whether the episode really terminated there (else it was truncated or cut, and
values bootstrap from it).

Positions are numbered globally in write order and live in slot ``g % capacity`` of flat
arrays. By default every position is kept (the paper's budget fits in memory, so nothing
is thrown away): the arrays grow when full, so ``capacity`` never falls behind the
positions written and slot ``g`` is ``g``. With a fixed capacity the buffer wraps
instead, overwriting the oldest positions.
Several environments write interleaved, so a trajectory's positions are linked by
``pred``/``succ`` global indices rather than being contiguous. A position becomes
sampleable once ``lookahead`` successors exist (every target it needs is stored) or its
trajectory has ended; it then enters the sum-tree at the highest priority currently stored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ezengine_core.sumtree import SumTree


@dataclass
class SampledPositions:
    """A prioritized sample. positions: int64 [B] global indices; weights: float32 [B]
    importance weights (N P(i))^-beta / max w, the max over this sample."""

    positions: np.ndarray
    weights: np.ndarray


# Every per-position array of a ReplayBuffer, with the value of a slot not yet written.
_PER_POSITION = {"frames": 0, "actions": -1, "rewards": 0, "root_values": 0, "policies": 0,
                 "collected_at": 0, "terminal": 0, "global_index": -1, "pred": -1, "succ": -1}


def initial_allocation(env_steps: int, num_writers: int) -> int:
    """Positions to allocate up front for a run of `env_steps` environment steps, so that
    a typical run never regrows: one per transition, an eighth more for the final
    observations (trajectories of 8 steps or more on average), and one per writer for the
    collectors' last, rounded-up steps."""
    return env_steps + env_steps // 8 + num_writers


class ReplayBuffer:
    """Trajectory storage with a priority sum-tree; keeps every position, or a window.

    Args:
        capacity: 0 or None keeps every position (the arrays grow as needed); a positive
            value keeps only the newest `capacity` positions (transitions plus one final
            observation per trajectory), overwriting the oldest.
        initial_capacity: positions allocated up front when growing (see
            `initial_allocation`); each growth enlarges the arrays by half.
        frame_shape, frame_dtype: one observation frame, e.g. (3, 96, 96) uint8 or (4,) float32.
        num_actions: A, the width of stored visit distributions.
        num_writers: independent streams (environments) that append interleaved.
        alpha: priority exponent.
        frame_stack: frames per model input.
        lookahead: successors a position needs before it is sampleable (unroll + TD steps).
    """

    GROWTH = 1.5  # factor by which a growing buffer enlarges its arrays

    def __init__(self, capacity: int | None, frame_shape: tuple[int, ...],
                 frame_dtype: np.dtype, num_actions: int, *, num_writers: int, alpha: float,
                 frame_stack: int, lookahead: int, initial_capacity: int = 1024) -> None:
        self.grows = not capacity
        if self.grows:
            if initial_capacity < 2:
                raise ValueError(
                    f"initial replay capacity must be >= 2, got {initial_capacity}")
            capacity = initial_capacity
        elif capacity < 2:
            raise ValueError(f"replay capacity must be >= 2, got {capacity}")
        self.capacity = capacity  # slots allocated (grows with the buffer when growing)
        self.frame_shape = tuple(frame_shape)
        self.num_actions = num_actions
        self.frame_stack = frame_stack
        self.lookahead = lookahead
        self.frames = np.zeros((capacity, *frame_shape), dtype=frame_dtype)
        self.actions = np.full(capacity, -1, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.root_values = np.zeros(capacity, dtype=np.float32)
        self.policies = np.zeros((capacity, num_actions), dtype=np.float32)
        self.collected_at = np.zeros(capacity, dtype=np.int64)
        self.terminal = np.zeros(capacity, dtype=bool)
        self.global_index = np.full(capacity, -1, dtype=np.int64)
        self.pred = np.full(capacity, -1, dtype=np.int64)
        self.succ = np.full(capacity, -1, dtype=np.int64)
        self.tree = SumTree(capacity, alpha=alpha)
        self.head = 0  # positions ever written; the next global index
        self.num_sampleable = 0
        self._last = [-1] * num_writers  # last position of each writer's open trajectory
        self._pending: list[deque[int]] = [deque() for _ in range(num_writers)]

    # ------------------------------------------------------------------ writing

    def _grow(self) -> None:
        """Enlarge every per-position array and the sum-tree by GROWTH. Slots, contents and
        stored priorities stay as they are; the new slots are empty."""
        old, new = self.capacity, int(self.capacity * self.GROWTH)
        for name, empty in _PER_POSITION.items():
            a = getattr(self, name)
            grown = np.zeros((new, *a.shape[1:]), dtype=a.dtype)  # untouched pages stay free
            grown[:old] = a
            if empty:
                grown[old:] = empty
            setattr(self, name, grown)
        self.tree.grow(new)
        self.capacity = new

    def _write(self, writer: int, frame: np.ndarray, action: int, reward: float,
               root_value: float, policy: np.ndarray | None, env_step: int) -> int:
        g = self.head
        if g == self.capacity and self.grows:  # full: grow, or (fixed capacity) wrap
            self._grow()
        slot = g % self.capacity
        # Overwriting the oldest position: it must never be sampled again.
        if g >= self.capacity and self.tree.get(np.array([slot]))[0] > 0:
            self.tree.clear(np.array([slot]))
            self.num_sampleable -= 1
        self.global_index[slot] = g
        self.frames[slot] = frame
        self.actions[slot] = action
        self.rewards[slot] = reward
        self.root_values[slot] = root_value
        if policy is None:
            self.policies[slot] = 0.0
        else:
            self.policies[slot] = policy
        self.collected_at[slot] = env_step
        self.terminal[slot] = False
        self.succ[slot] = -1
        prev = self._last[writer]
        self.pred[slot] = prev
        # prev must not be the position this write just overwrote (prev == g - capacity).
        if prev >= 0 and prev > g - self.capacity:
            self.succ[prev % self.capacity] = g
        self.head += 1
        return g

    def append(self, writer: int, frame: np.ndarray, action: int, reward: float,
               root_value: float, policy: np.ndarray, env_step: int) -> None:
        """Store one step of `writer`'s open trajectory (starting one if none is open).

        frame: the observation at which `action` was taken; reward: the training reward
        it earned; policy: float [A] visit distribution; env_step: environment steps
        collected so far (the age reference for off-policy correction).
        """
        g = self._write(writer, frame, action, reward, root_value, policy, env_step)
        self._last[writer] = g
        pending = self._pending[writer]
        pending.append(g)
        if len(pending) > self.lookahead:
            self._make_sampleable([pending.popleft()])

    def close(self, writer: int, final_frame: np.ndarray, terminated: bool, env_step: int) -> None:
        """End `writer`'s trajectory with its final observation.

        terminated: the episode really ended (no bootstrap past it); False for a truncation
        or a cut, where values bootstrap from `final_frame`.
        """
        if self._last[writer] < 0:
            raise ValueError(f"writer {writer} has no open trajectory to close")
        g = self._write(writer, final_frame, -1, 0.0, 0.0, None, env_step)
        self.terminal[g % self.capacity] = terminated
        self._last[writer] = -1
        pending = self._pending[writer]
        self._make_sampleable(list(pending))
        pending.clear()

    def _make_sampleable(self, positions: list[int]) -> None:
        live = np.array([g for g in positions if self.alive(g)], dtype=np.int64)
        if live.size:
            # New data enters at the highest priority currently stored (1 when empty).
            top = self.tree.max_priority or 1.0
            self.tree.update(live % self.capacity, np.full(live.size, top))
            self.num_sampleable += live.size

    # ------------------------------------------------------------------ reading

    @property
    def size(self) -> int:
        """Positions stored now: every one written when growing, else at most the capacity."""
        return min(self.head, self.capacity)

    def alive(self, g: int | np.ndarray) -> bool | np.ndarray:
        """Whether global position(s) `g` are still stored."""
        return (g >= 0) & (g >= self.head - self.capacity) & (g < self.head)

    def slot(self, g: np.ndarray) -> np.ndarray:
        """Array slots of global positions."""
        return g % self.capacity

    def sample(self, batch_size: int, beta: float, rng: np.random.Generator) -> SampledPositions:
        """Stratified prioritized sample of sampleable positions with importance weights."""
        if self.num_sampleable == 0:
            raise ValueError("the replay buffer has no sampleable position yet")
        slots, p_alpha = self.tree.sample(rng.random(batch_size))
        # w_i = (N P(i))^-beta / max_j w_j over the sample, as the reference does: the max
        # belongs to the sample's smallest priority. (A buffer-wide max, set by the smallest
        # priority anywhere, only drifts down and shrinks every weight with the run's age.)
        weights = (p_alpha / p_alpha.min()) ** (-beta)
        return SampledPositions(self.global_index[slots], weights.astype(np.float32))

    def update_priorities(self, positions: np.ndarray, priorities: np.ndarray) -> None:
        """Set new priorities (before alpha) for positions that are still stored."""
        keep = self.alive(positions)
        if keep.any():
            pr = np.asarray(priorities, dtype=np.float64)[keep]
            self.tree.update(self.slot(positions[keep]), pr)

    def successors(self, g: np.ndarray) -> np.ndarray:
        """Next position of each position in its trajectory, -1 where there is none."""
        ok = self.alive(g)
        out = np.full(g.shape, -1, dtype=np.int64)
        out[ok] = self.succ[self.slot(g[ok])]
        return out

    def unroll_positions(self, start: np.ndarray, steps: int) -> np.ndarray:
        """int64 [B, steps + 1]: start, its successor, ... (-1 past the trajectory's end)."""
        out = np.empty((start.shape[0], steps + 1), dtype=np.int64)
        out[:, 0] = start
        for k in range(steps):
            out[:, k + 1] = self.successors(out[:, k])
        return out

    def _frame_stacks(self, g: np.ndarray) -> np.ndarray:
        """[n, frame_stack, C, ...]: the frame at g and its predecessors, oldest first,
        padded with the trajectory's first stored frame (as the collector pads at a reset)."""
        n = g.shape[0]
        stack = np.empty((n, self.frame_stack, *self.frame_shape), dtype=self.frames.dtype)
        cur = g.copy()
        for j in range(self.frame_stack - 1, -1, -1):
            stack[:, j] = self.frames[self.slot(cur)]
            prev = self.pred[self.slot(cur)]
            cur = np.where(self.alive(prev), prev, cur)
        return stack

    def stacked_frames(self, g: np.ndarray) -> np.ndarray:
        """[n, frame_stack * C, ...] model inputs at positions g (all alive): the frame at g
        and its predecessors, oldest first, padded with the trajectory's first stored
        frame (as the collector pads at a reset)."""
        return self._frame_stacks(g).reshape(g.shape[0], self.frame_stack * self.frame_shape[0],
                                             *self.frame_shape[1:])

    def frame_windows(self, g: np.ndarray) -> np.ndarray:
        """[n, frame_stack + k, C, ...] for rows g [n, k + 1] of consecutive positions of
        one trajectory each (all alive): the frame stack at g[:, 0] followed by the frames
        at g[:, 1:]. Frames j .. j + frame_stack - 1 of a row are the model input at
        g[:, j], so a window carries k + 1 model inputs at about 1 / frame_stack of
        their size."""
        later = self.frames[self.slot(g[:, 1:])]
        return np.concatenate([self._frame_stacks(g[:, 0]), later], axis=1)
