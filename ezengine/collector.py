"""Self-play collection: N environments stepped together with one batched search.

The collector keeps a frame stack per environment (padded with the first frame at a reset,
exactly as the replay pads when it rebuilds stacks) and writes every step of every
environment to the replay, closing trajectories with their final observation.
"""

from __future__ import annotations

import numpy as np
import torch

from ezengine.envs import VectorEnv, clip_reward
from ezengine.model import EfficientZeroNet
from ezengine.replay import ReplayBuffer
from ezengine.search import BatchedSearch, select_actions


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


class Collector:
    """Steps `envs` with the search's policy and stores everything in `replay`.

    Args:
        envs: the training environments (one replay writer each).
        replay: where trajectories go.
        search: the batched search (with root noise) used to act.
        clip_rewards: store sign-clipped rewards as training rewards.
        frame_stack: frames per model input.
        seed: seeds action sampling and random play.
    """

    def __init__(self, envs: VectorEnv, replay: ReplayBuffer, search: BatchedSearch, *,
                 clip_rewards: bool, frame_stack: int, seed: int) -> None:
        self.envs = envs
        self.replay = replay
        self.search = search
        self.clip_rewards = clip_rewards
        self.rng = np.random.default_rng(seed)
        self.stacks = FrameStacks(envs.reset(), frame_stack)
        self.env_steps = 0

    def step(self, model: EfficientZeroNet | None, temperature: float
             ) -> list[tuple[int, float, int]]:
        """One step of every environment. With model None, act uniformly at random (the
        warm-up play). Returns the games that finished: (env index, raw score, length)."""
        n, a = self.envs.num_envs, self.envs.num_actions
        if model is None:
            actions = self.rng.integers(0, a, size=n)
            policies = np.full((n, a), 1.0 / a, dtype=np.float32)
            root_values = np.zeros(n, dtype=np.float32)
        else:
            device = next(model.parameters()).device
            obs = torch.from_numpy(self.stacks.model_input()).to(device)
            result = self.search.run(model, obs, add_noise=True)
            actions = select_actions(result.visit_counts, temperature, self.rng)
            policies = result.policies()
            root_values = result.root_values
        newest = self.stacks.frames[:, -1]
        out = self.envs.step(actions)
        rewards = clip_reward(out.reward) if self.clip_rewards else out.reward
        self.env_steps += n
        for i in range(n):
            self.replay.append(i, newest[i], int(actions[i]), float(rewards[i]),
                               float(root_values[i]), policies[i], self.env_steps)
            if out.terminated[i] or out.truncated[i]:
                self.replay.close(i, out.final_obs[i], bool(out.terminated[i]), self.env_steps)
        self.stacks.advance(out.obs, out.terminated | out.truncated)
        return out.completed_games
