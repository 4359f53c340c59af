"""A model-free peer on MinAtar at ezengine's budget: Stable-Baselines3's DQN, 100,000 agent
steps per game, on the same machine, scored like ezengine's runs (20 greedy episodes).

    python -m venv /tmp/sb3 && /tmp/sb3/bin/pip install torch==2.13.0 stable-baselines3 minatar
    /tmp/sb3/bin/python benchmarks/minatar_dqn.py --games breakout --seeds 0 1 2 \
        --out docs/minatar_dqn.jsonl

The network is the MinAtar paper's DQN network (one 3x3 conv of 16 filters, a 128-unit
hidden layer); the settings are the paper's (replay 100,000, batch 32, a gradient step per
agent step, target update every 1,000 steps, discount 0.99, replay start 5,000) except that
epsilon falls from 1 to 0.1 over the first 10% of the budget instead of the first 100,000
frames, which here would be the whole run. Appends one JSON line per (game, seed); a pair
already in the output file is skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium
import numpy as np
import torch
from torch import nn

GAMES = {"asterix": "Asterix", "breakout": "Breakout", "freeway": "Freeway",
         "seaquest": "Seaquest", "space_invaders": "SpaceInvaders"}


class ChannelsFirst(gymnasium.ObservationWrapper):
    """MinAtar's bool HWC board as float32 CHW, as SB3's image extractors expect."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        h, w, c = env.observation_space.shape
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (c, h, w), np.float32)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(obs.transpose(2, 0, 1), dtype=np.float32)


def make(game: str, seed: int) -> gymnasium.Env:
    import minatar.gym

    if "MinAtar/Breakout-v1" not in gymnasium.registry:
        minatar.gym.register_envs()
    env = ChannelsFirst(gymnasium.make(f"MinAtar/{GAMES[game]}-v1"))
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def extractor_class() -> type:
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class MinAtarNet(BaseFeaturesExtractor):
        """Conv 3x3 x16, ReLU, flatten, Linear 128, ReLU (Young & Tian 2019)."""

        def __init__(self, space: gymnasium.spaces.Box) -> None:
            super().__init__(space, features_dim=128)
            c, h, w = space.shape
            self.net = nn.Sequential(nn.Conv2d(c, 16, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(16 * (h - 2) * (w - 2), 128), nn.ReLU())

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.net(obs)

    return MinAtarNet


def evaluate(model, game: str, seed: int, episodes: int) -> list[float]:
    """Greedy returns of `episodes` episodes (sticky actions stay on, as in training)."""
    env = make(game, seed + 10_000)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + 10_000 + i)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def one_run(game: str, seed: int, steps: int, episodes: int) -> dict:
    from stable_baselines3 import DQN

    torch.set_num_threads(1)
    model = DQN("CnnPolicy", make(game, seed), learning_rate=2.5e-4, buffer_size=100_000,
                learning_starts=5_000, batch_size=32, gamma=0.99, train_freq=1,
                gradient_steps=1, target_update_interval=1_000, exploration_fraction=0.1,
                exploration_initial_eps=1.0, exploration_final_eps=0.1, seed=seed,
                policy_kwargs={"features_extractor_class": extractor_class(),
                               "normalize_images": False},
                verbose=0, device="cpu")
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    train_s = time.perf_counter() - t0
    returns = evaluate(model, game, seed, episodes)
    return {"game": game, "seed": seed, "agent_steps": steps, "train_s": round(train_s, 1),
            "episodes": episodes, "mean_return": float(np.mean(returns)),
            "std_return": float(np.std(returns)), "returns": returns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", default=list(GAMES), choices=list(GAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    done = set()
    if args.out.exists():
        done = {(r["game"], r["seed"]) for r in
                (json.loads(line) for line in args.out.read_text().splitlines() if line)}
    for game in args.games:
        for seed in args.seeds:
            if (game, seed) in done:
                continue
            row = one_run(game, seed, args.steps, args.episodes)
            print(json.dumps({k: v for k, v in row.items() if k != "returns"}), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
