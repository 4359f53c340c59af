"""Does a MinAtar Freeway agent see a collision coming?

Plays greedy games with a run's checkpoint. At every step where the chicken can move
(its move timer at 0) and is not at the bottom, a copy of the game (without sticky actions)
says whether pressing "up" now puts it under a car while "noop" does not (a danger state)
or whether "up" is safe. For both kinds of state the script counts how often the agent
pressed "up" and prints the model's one-step Q(up) - Q(noop): the predicted value prefix
plus the discounted value after each action, from the root's latent.

    python benchmarks/freeway_probe.py runs/freeway-s2 --episodes 2
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from ezengine.agent import Agent
from ezengine.envs import make_env
from ezengine.frames import FrameStacks
from ezengine.support import support_to_scalar

NOOP, UP = 0, 1  # the minimal action set of MinAtar/Freeway-v1: noop, up, down


def hit_by(game, full_action: int) -> bool:
    """Whether one deterministic step with `full_action` sends the chicken back to the
    bottom without a crossing."""
    after = copy.deepcopy(game)
    before = after.pos
    reward, _ = after.act(full_action)
    return after.pos == 9 and before != 9 and reward == 0


def one_step_q(agent: Agent, model_input: np.ndarray) -> np.ndarray:
    """float [A]: value prefix + discount x value after each action, one model step."""
    model = agent.model
    discount = agent.config.learner.discount
    obs = torch.from_numpy(model_input[None])
    with torch.inference_mode():
        root = model.initial_inference(obs)
        h = torch.zeros(1, agent.num_actions, model.lstm_hidden)
        latent = root.latent.expand(agent.num_actions, *root.latent.shape[1:])
        out = model.recurrent_inference(latent, (h, torch.zeros_like(h)),
                                        torch.arange(agent.num_actions))
        prefix = support_to_scalar(out.value_prefix_logits, model.support_size)
        value = support_to_scalar(out.value_logits, model.support_size)
    return (prefix + discount * value).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    agent = Agent.load(args.run)
    cfg = agent.config
    found = {"danger": [], "safe": []}  # (pressed up, Q(up) - Q(noop)) per state
    returns = []
    for episode in range(args.episodes):
        env = make_env(cfg.env, seed=args.seed + episode, train=False)
        obs, _ = env.reset()
        stacks = FrameStacks(np.asarray(obs)[None], cfg.env.frame_stack)
        game, action_set = env.unwrapped.game.env, env.unwrapped.action_set
        total, done = 0.0, False
        while not done:
            model_input = stacks.model_input()[0]
            action = int(agent.act(model_input[None])[0])
            if game.move_timer == 0 and game.pos != 9:
                up_hit, noop_hit = hit_by(game, action_set[UP]), hit_by(game, action_set[NOOP])
                kind = "danger" if up_hit and not noop_hit else "safe" if not up_hit else None
                if kind:
                    q = one_step_q(agent, model_input)
                    found[kind].append((action == UP, q[UP] - q[NOOP]))
            obs, reward, terminated, truncated, _ = env.step(action)
            stacks.advance(np.asarray(obs)[None], np.array([False]))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        print(f"game {episode}: return {total:.0f}", flush=True)
    print(f"{agent.describe()['checkpoint']}: mean return {np.mean(returns):.1f} over "
          f"{len(returns)} games")
    for kind, rows in found.items():
        if not rows:
            continue
        up = np.array([r[0] for r in rows])
        gap = np.array([r[1] for r in rows])
        print(f"{kind} states: {len(rows)}, agent pressed up in {int(up.sum())}; "
              f"Q(up) - Q(noop) mean {gap.mean():+.4f}, positive in {(gap > 0).mean():.0%}")


if __name__ == "__main__":
    main()
