"""Self-play collection: N environments stepped together with one batched search.

One vector step produces a *transition record*: a dict of fixed-shape arrays (the layout is
``transition_fields``) that the serial trainer stores straight into its replay, and that the
pipeline's collectors write into a shared-memory ring and an append-only log on disk.
``store_transition`` turns a record into replay positions, so both paths store data the
same way, and a replay can be rebuilt from the logs after a crash.

The collector keeps a frame stack per environment, padded with the first frame at a reset,
exactly as the replay pads when it rebuilds stacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from ezengine.envs import VectorEnv, clip_reward
from ezengine.frames import FrameStacks
from ezengine.model import EfficientZeroNet
from ezengine.replay import ReplayBuffer
from ezengine.search import BatchedSearch, SearchResult, select_actions


def transition_fields(num_envs: int, frame_shape: tuple[int, ...], frame_dtype: np.dtype,
                      num_actions: int) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every array of a transition record for N environments.

    frames: the observation each action was taken at; final_obs: the observation the step
    produced (before any auto-reset); rewards: training rewards (clipped when configured);
    env_steps: the collector's environment steps after this step; game_*: finished games.
    """
    n = num_envs
    return [
        ("frames", (n, *frame_shape), np.dtype(frame_dtype)),
        ("final_obs", (n, *frame_shape), np.dtype(frame_dtype)),
        ("actions", (n,), np.dtype(np.int64)),
        ("rewards", (n,), np.dtype(np.float32)),
        ("root_values", (n,), np.dtype(np.float32)),
        ("policies", (n, num_actions), np.dtype(np.float32)),
        ("terminated", (n,), np.dtype(bool)),
        ("truncated", (n,), np.dtype(bool)),
        ("game_over", (n,), np.dtype(bool)),
        ("game_scores", (n,), np.dtype(np.float64)),
        ("game_lengths", (n,), np.dtype(np.int64)),
        ("env_steps", (1,), np.dtype(np.int64)),
    ]


def store_transition(replay: ReplayBuffer, record: Mapping[str, np.ndarray],
                     writer_offset: int = 0, collected_at: int | None = None) -> None:
    """Append one transition record to the replay; environment i writes as writer
    `writer_offset + i`, and a finished episode is closed with its final observation.

    collected_at: the env-step stamp of the positions, on the clock their age (which
    shortens the TD horizon) is measured with: the environment steps of all collectors
    together. It defaults to the record's own env_steps, right when one collector feeds
    the replay (the serial trainer).
    """
    env_steps = int(record["env_steps"][0]) if collected_at is None else collected_at
    done = record["terminated"] | record["truncated"]
    for i in range(record["actions"].shape[0]):
        w = writer_offset + i
        replay.append(w, record["frames"][i], int(record["actions"][i]),
                      float(record["rewards"][i]), float(record["root_values"][i]),
                      record["policies"][i], env_steps)
        if done[i]:
            replay.close(w, record["final_obs"][i], bool(record["terminated"][i]), env_steps)


def finished_games(record: Mapping[str, np.ndarray]) -> list[float]:
    """Raw scores of the games that finished in this record."""
    return [float(s) for s in record["game_scores"][record["game_over"]]]


class RemoteSearch(Protocol):
    """Searches run elsewhere (by the model owner) for a collector's environments."""

    def search(self, obs: np.ndarray) -> SearchResult:
        """Search from stacked observations [N, ...] with root noise where the run's
        config puts it (recipe.selfplay_noise_roots)."""
        ...


class Collector:
    """Steps `envs` with the search's policy.

    Args:
        envs: the training environments.
        search: the batched search (with root noise) used to act.
        clip_rewards: store sign-clipped rewards as training rewards.
        frame_stack: frames per model input.
        seed: seeds action sampling and random play.
        env_steps: environment steps already collected (when resuming).
        greedy_envs: the first this many environments take the most visited action of
            their search whatever the temperature, as evaluation chooses.
        noise_roots: bool [N], the environments whose searches take root noise (None:
            all of them).
        repeat_prob: per step, the chance that a sampling environment (not greedy) that
            is not repeating starts to repeat a uniformly random action; 0: never.
        repeat_mu: a repeat lasts n steps with P(n) ~ n^-repeat_mu, n <= MAX_REPEAT.
            Repeats end with their game, and are not kept across a resume.
    """

    MAX_REPEAT = 10_000

    def __init__(self, envs: VectorEnv, search: BatchedSearch, *, clip_rewards: bool,
                 frame_stack: int, seed: int, env_steps: int = 0, greedy_envs: int = 0,
                 noise_roots: np.ndarray | None = None, repeat_prob: float = 0.0,
                 repeat_mu: float = 2.0) -> None:
        self.envs = envs
        self.greedy_envs = greedy_envs
        self.noise_roots = noise_roots
        self.repeat_prob = repeat_prob
        self.repeat_mu = repeat_mu
        self.repeat_left = np.zeros(envs.num_envs, dtype=np.int64)  # steps still to repeat
        self.repeat_action = np.zeros(envs.num_envs, dtype=np.int64)
        self.search = search
        self.clip_rewards = clip_rewards
        self.rng = np.random.default_rng(seed)
        self.stacks = FrameStacks(envs.reset(), frame_stack)
        self.env_steps = env_steps
        self.fields = transition_fields(envs.num_envs, envs.observation_shape,
                                        envs.observation_dtype, envs.num_actions)

    def new_record(self) -> dict[str, np.ndarray]:
        """Zeroed arrays for one transition record."""
        return {name: np.zeros(shape, dtype) for name, shape, dtype in self.fields}

    def step(self, model: EfficientZeroNet | RemoteSearch | None, temperature: float,
             out: Mapping[str, np.ndarray] | None = None) -> Mapping[str, np.ndarray]:
        """One step of every environment, written into `out` (for example a ring slot's
        views) or a new record. With model None, act uniformly at random (the warm-up);
        with a RemoteSearch, the search runs wherever that sends it."""
        rec = self.new_record() if out is None else out
        n, a = self.envs.num_envs, self.envs.num_actions
        if model is None:
            actions = self.rng.integers(0, a, size=n)
            rec["policies"][...] = 1.0 / a
            rec["root_values"][...] = 0.0
        else:
            if isinstance(model, EfficientZeroNet):
                device = next(model.parameters()).device
                obs = torch.from_numpy(self.stacks.model_input()).to(device)
                result = self.search.run(model, obs, add_noise=True,
                                         noise_roots=self.noise_roots)
            else:
                result = model.search(self.stacks.model_input())
            actions = select_actions(result.visit_counts, temperature, self.rng)
            if self.greedy_envs:
                g = self.greedy_envs
                actions[:g] = select_actions(result.visit_counts[:g], 0.0, self.rng)
            rec["policies"][...] = result.policies()
            rec["root_values"][...] = result.root_values
        if self.repeat_prob > 0:
            self._follow_repeats(actions)
        rec["frames"][...] = self.stacks.frames[:, -1]
        rec["actions"][...] = actions
        step = self.envs.step(actions)
        self.repeat_left[step.terminated | step.truncated] = 0
        rec["final_obs"][...] = step.final_obs
        rec["rewards"][...] = clip_reward(step.reward) if self.clip_rewards else step.reward
        rec["terminated"][...] = step.terminated
        rec["truncated"][...] = step.truncated
        rec["game_over"][...] = False
        rec["game_scores"][...] = 0.0
        rec["game_lengths"][...] = 0
        for i, score, length in step.completed_games:
            rec["game_over"][i] = True
            rec["game_scores"][i] = score
            rec["game_lengths"][i] = length
        self.env_steps += n
        rec["env_steps"][0] = self.env_steps
        self.stacks.advance(step.obs, step.terminated | step.truncated)
        return rec

    def _follow_repeats(self, actions: np.ndarray) -> None:
        """Overwrite, in place, the actions of the sampling environments that repeat: each
        one not repeating starts a repeat of a random action with probability repeat_prob."""
        g, n = self.greedy_envs, len(actions)
        starts = g + np.flatnonzero((self.repeat_left[g:] == 0)
                                    & (self.rng.random(n - g) < self.repeat_prob))
        self.repeat_action[starts] = self.rng.integers(0, self.envs.num_actions, len(starts))
        lengths = self.rng.zipf(self.repeat_mu, len(starts))
        self.repeat_left[starts] = np.minimum(lengths, self.MAX_REPEAT)
        repeating = self.repeat_left > 0
        actions[repeating] = self.repeat_action[repeating]
        self.repeat_left[repeating] -= 1
