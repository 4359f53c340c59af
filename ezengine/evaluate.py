"""Evaluation: episodes played with the search's greedy policy, no exploration noise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ezengine.config import Config
from ezengine.envs import VectorEnv
from ezengine.frames import FrameStacks
from ezengine.model import EfficientZeroNet
from ezengine.search import BatchedSearch, select_actions


@dataclass
class EvalResult:
    """Raw game scores and lengths (agent steps) of the evaluation episodes."""

    returns: list[float]
    lengths: list[int]
    wall_s: float = 0.0

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))

    def record(self) -> dict:
        """A JSON-ready summary."""
        return {"episodes": len(self.returns), "mean_return": self.mean,
                "std_return": self.std, "returns": self.returns, "lengths": self.lengths,
                "eval_s": round(self.wall_s, 2)}


def describe_evaluation(row: dict) -> str:
    """The console line for one eval.jsonl row."""
    return (f"eval @ {row['train_steps']} training steps / {row['env_steps']} env steps: "
            f"mean return {row['mean_return']:.1f} +- {row['std_return']:.1f} over "
            f"{row['episodes']} episodes ({row['eval_s']:.1f}s)")


@torch.no_grad()
def evaluate(model: EfficientZeroNet, cfg: Config, episodes: int, seed: int,
             on_step: Callable[[], None] | None = None) -> EvalResult:
    """Play `episodes` games in parallel (one environment each) with argmax-of-visits
    actions and no root noise; evaluation episode cap and raw (unclipped) scores.
    `on_step` is called after every step of the games (the pipeline's CPU accounting)."""
    start = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    envs = VectorEnv(cfg.env, seed=seed, train=False, num_envs=episodes)
    search = BatchedSearch.for_config(cfg, envs.num_actions, seed)
    stacks = FrameStacks(envs.reset(), cfg.env.frame_stack)
    returns = np.full(episodes, np.nan)
    lengths = np.zeros(episodes, dtype=np.int64)
    rng = np.random.default_rng(seed)
    actions = np.zeros(episodes, dtype=np.int64)
    while np.isnan(returns).any():
        playing = np.flatnonzero(np.isnan(returns))
        obs = torch.from_numpy(stacks.model_input()[playing]).to(device)
        result = search.run(model, obs, add_noise=False)
        actions[:] = 0
        actions[playing] = select_actions(result.visit_counts, 0.0, rng)
        out = envs.step(actions)
        for i, score, length in out.completed_games:
            if np.isnan(returns[i]):
                returns[i], lengths[i] = score, length
        stacks.advance(out.obs, out.terminated | out.truncated)
        if on_step is not None:
            on_step()
    envs.close()
    return EvalResult([float(r) for r in returns], [int(n) for n in lengths],
                      time.perf_counter() - start)
