"""Reanalyse: complete training batches from sampled replay positions.

For a sampled position t and every c in t..t+K this builds:

- value targets z_c = sum_{i<l} gamma^i r_{c+i} + gamma^l v_target(o_{c+l}), with the TD
  horizon l shortened for old data (off-policy correction). The bootstrap is dropped only
  when the episode really terminated before c + l; truncated and cut trajectories still
  bootstrap from their final observation, and storage boundaries do not exist here;
- value-prefix targets: undiscounted reward sums from t, restarting every `horizon` steps;
- policy targets: visit distributions of a fresh search with the target model (with root
  noise) for the re-searched fraction of the batch, the stored self-play ones otherwise,
  zero where there is no action;
- masks m_k = 1 while step t+k-1 lies inside the trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.config import Config
from ezengine.model import EfficientZeroNet
from ezengine.replay import ReplayBuffer, SampledPositions
from ezengine.search import BatchedSearch, visit_distribution
from ezengine.support import support_to_scalar


def td_horizon(age: np.ndarray, td_steps: int, fraction: float, budget: int) -> np.ndarray:
    """Off-policy-corrected TD horizon l = clip(td - floor(age / (fraction * budget)), 1, td)."""
    return np.clip(td_steps - np.floor(age / (fraction * budget)).astype(np.int64), 1, td_steps)


def value_prefix_targets(rewards: np.ndarray, has_action: np.ndarray, horizon: int) -> np.ndarray:
    """float32 [B, K]: G_k = sum of rewards r_t..r_{t+k-1} since the last reset (every
    `horizon` steps from t). rewards, has_action: [B, K] for steps t..t+K-1."""
    r = np.where(has_action, rewards, 0.0).astype(np.float32)
    out = np.empty_like(r)
    running = np.zeros(r.shape[0], dtype=np.float32)
    for k in range(r.shape[1]):
        if horizon > 0 and k % horizon == 0:
            running = np.zeros_like(running)
        running = running + r[:, k]
        out[:, k] = running
    return out


class HelperSearches(Protocol):
    """Parts 1.. of a batch's re-searched roots, searched by other processes (the pipeline's
    reanalyse helpers): each part always goes to the same helper."""

    def send(self, part: int, target_step: int, obs: np.ndarray) -> None:
        """Ask helper `part` to search `obs` (stacked frames) with the target weights
        published at training step `target_step`."""
        ...

    def receive(self, part: int) -> np.ndarray:
        """int32 [n, A]: the visit counts of the search sent to helper `part`."""
        ...


class Reanalyser:
    """Builds TrainingBatches from a replay buffer with the target model.

    The re-searched roots of a batch are split into 1 + len(part_seeds) parts, part p
    always searched by the search seeded part_seeds[p - 1] (part 0: `seed`): here, one
    after the other, or by `helpers` in other processes at the same time. Either way a
    batch comes out the same.

    Args:
        cfg: the full config.
        replay: the buffer the positions come from.
        num_actions: A.
        seed: seeds the re-search noise of part 0 and the padding actions.
        part_seeds: seeds of the other parts' searches.
        helpers: searches parts 1.. elsewhere (None: here).
    """

    def __init__(self, cfg: Config, replay: ReplayBuffer, num_actions: int, seed: int,
                 part_seeds: Sequence[int] = (), helpers: HelperSearches | None = None
                 ) -> None:
        self.cfg = cfg
        self.replay = replay
        self.num_actions = num_actions
        self.search = BatchedSearch.for_config(cfg, num_actions, seed)
        self.parts = 1 + len(part_seeds)
        self.helpers = helpers
        self.part_searches = ([] if helpers is not None else
                              [BatchedSearch.for_config(cfg, num_actions, s) for s in part_seeds])
        self.rng = np.random.default_rng(seed)

    def _model_input(self, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.replay.stacked_frames(positions)).to(device)

    @torch.no_grad()
    def bootstrap_values(self, model: EfficientZeroNet, positions: np.ndarray) -> np.ndarray:
        """float32 [n]: the target's value estimate at each position (predicted value, or
        the search's root value when learner.bootstrap_from_root_value is set)."""
        if positions.size == 0:
            return np.zeros(0, dtype=np.float32)
        device = next(model.parameters()).device
        obs = self._model_input(positions, device)
        if self.cfg.learner.bootstrap_from_root_value:
            return self.search.run(model, obs, add_noise=False).root_values
        logits = model.initial_inference(obs).value_logits
        return support_to_scalar(logits, model.support_size).float().cpu().numpy()

    def value_targets(self, model: EfficientZeroNet, pos: np.ndarray, horizon: np.ndarray
                      ) -> np.ndarray:
        """float32 [B, K+1] value targets at positions pos [B, K+1] (-1 past the end) with
        per-sample TD horizons [B]."""
        rp = self.replay
        gamma = self.cfg.learner.discount
        valid = pos >= 0
        acc = np.zeros(pos.shape, dtype=np.float64)
        disc = np.ones(pos.shape, dtype=np.float64)
        cur = pos.copy()
        for i in range(int(horizon.max())):
            step = valid & (i < horizon[:, None]) & (rp.actions[rp.slot(cur)] >= 0)
            acc += np.where(step, disc * rp.rewards[rp.slot(cur)], 0.0)
            disc = np.where(step, disc * gamma, disc)
            cur = np.where(step, rp.succ[rp.slot(cur)], cur)
        # cur is now o_{c+l}, or the final observation if the trajectory ended sooner.
        at_terminal = (rp.actions[rp.slot(cur)] < 0) & rp.terminal[rp.slot(cur)]
        boot = valid & ~at_terminal
        unique, inverse = np.unique(cur[boot], return_inverse=True)
        values = self.bootstrap_values(model, unique)
        acc[boot] += disc[boot] * values[inverse]
        return np.where(valid, acc, 0.0).astype(np.float32)

    @torch.no_grad()
    def search_visits(self, model: EfficientZeroNet, positions: np.ndarray, target_step: int
                      ) -> np.ndarray:
        """int32 [n, A]: visit counts of a search (with root noise) from each position,
        part by part (see the class doc)."""
        frames = self.replay.stacked_frames(positions)
        parts = np.array_split(frames, self.parts)
        if self.helpers is not None:
            for p in range(1, self.parts):
                if len(parts[p]):
                    self.helpers.send(p, target_step, parts[p])
        device = next(model.parameters()).device
        visits = [self.search.run(model, torch.from_numpy(parts[0]).to(device),
                                  add_noise=True).visit_counts]
        for p in range(1, self.parts):
            if not len(parts[p]):
                continue
            visits.append(self.helpers.receive(p) if self.helpers is not None else
                          self.part_searches[p - 1].run(
                              model, torch.from_numpy(parts[p]).to(device),
                              add_noise=True).visit_counts)
        return np.concatenate(visits)

    @torch.no_grad()
    def policy_targets(self, model: EfficientZeroNet, pos: np.ndarray, has_action: np.ndarray,
                       target_step: int = 0) -> np.ndarray:
        """float32 [B, K+1, A]: re-searched for a random reanalyse_fraction of the rows,
        stored visit distributions for the rest, zero where there is no action.
        `target_step`: the training step of `model`'s weights (for helpers)."""
        rp = self.replay
        out = np.where(has_action[..., None], rp.policies[rp.slot(np.maximum(pos, 0))], 0.0)
        n_fresh = round(self.cfg.learner.reanalyse_fraction * pos.shape[0])
        # A random subset: sampled positions come sorted by slot, so "the first rows"
        # would always keep the stored policies of the newest data.
        stale = self.rng.permutation(pos.shape[0])[n_fresh:]
        fresh = has_action.copy()
        fresh[stale] = False
        if fresh.any():
            out[fresh] = visit_distribution(self.search_visits(model, pos[fresh], target_step))
        return out.astype(np.float32)

    def build(self, target_model: EfficientZeroNet, sample: SampledPositions, env_steps: int,
              target_version: int, target_step: int = 0) -> TrainingBatch:
        """A complete training batch for `sample`, with targets from `target_model` (in eval
        mode; its weights published at training step `target_step`), at a moment when
        `env_steps` environment steps have been collected."""
        cfg, rp = self.cfg, self.replay
        K = cfg.learner.unroll_steps
        t = sample.positions
        pos = rp.unroll_positions(t, K)
        valid = pos >= 0
        has_action = valid & (rp.actions[rp.slot(np.maximum(pos, 0))] >= 0)
        masks = np.ones(pos.shape, dtype=np.float32)
        masks[:, 1:] = has_action[:, :-1]
        # Padding actions past the end are random, as in the reference; they are masked.
        random_actions = self.rng.integers(0, self.num_actions, size=(t.shape[0], K))
        actions = np.where(has_action[:, :K], rp.actions[rp.slot(np.maximum(pos[:, :K], 0))],
                           random_actions)
        # Frames past the end repeat the last stored one (their inputs are masked out).
        filled = pos.copy()
        for k in range(1, K + 1):
            filled[:, k] = np.where(valid[:, k], pos[:, k], filled[:, k - 1])
        age = env_steps - rp.collected_at[rp.slot(t)]
        horizon = td_horizon(age, cfg.learner.td_steps, cfg.learner.off_policy_fraction,
                             cfg.run.env_steps)
        rewards = rp.rewards[rp.slot(np.maximum(pos[:, :K], 0))]
        return TrainingBatch(
            frames=rp.frame_windows(filled),
            actions=actions.astype(np.int64),
            value_targets=self.value_targets(target_model, pos, horizon),
            value_prefix_targets=value_prefix_targets(rewards, has_action[:, :K],
                                                      cfg.learner.value_prefix_horizon),
            policy_targets=self.policy_targets(target_model, pos, has_action, target_step),
            masks=masks,
            weights=sample.weights,
            positions=t,
            target_version=target_version,
        )
