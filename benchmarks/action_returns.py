"""What a CartPole run's model believes about each action, against what each action earns.

Plays one greedy episode of a run's checkpoint (the evaluation policy: the most visited
action of a noise-free search) and, every `--every` steps, prints the state, the prior,
the search's visits and root value, the model's one-step action values (value prefix +
discount x value of the next latent) and the true discounted return of forcing each action
and then playing greedily, read by copying CartPole's physical state.

    python benchmarks/action_returns.py runs/cartpole-s16 --every 15 --reset-seed 100
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch

from ezengine.agent import Agent
from ezengine.support import support_to_scalar

MAX_STEPS = 500  # CartPole-v1's time limit


def greedy_return(agent: Agent, env: gym.Env, first: int, t: int) -> tuple[float, int]:
    """(discounted return, step the episode ends at) from the env's current state at step
    t: `first`, then the agent's greedy actions."""
    gamma = agent.config.learner.discount
    ret, disc, action = 0.0, 1.0, first
    while True:
        obs, reward, terminated, _, _ = env.step(action)
        ret += disc * reward
        disc *= gamma
        t += 1
        if terminated or t >= MAX_STEPS:
            return ret, t
        action = int(agent.act(np.asarray(obs, np.float32)[None])[0])


@torch.no_grad()
def model_action_values(agent: Agent, obs: torch.Tensor) -> tuple[float, list[float]]:
    """(prior of action 0, [Q(0), Q(1)]) from the model's one-step unroll at `obs` [1, 4]."""
    net, gamma = agent.model, agent.config.learner.discount
    root = net.initial_inference(obs)
    out = net.recurrent_inference(root.latent.repeat(2, 1), net.initial_lstm_state(2),
                                  torch.tensor([0, 1]))
    prefix = support_to_scalar(out.value_prefix_logits, net.support_size)
    value = support_to_scalar(out.value_logits, net.support_size)
    prior = torch.softmax(root.policy_logits, -1)[0, 0].item()
    return prior, (prefix + gamma * value).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a CartPole run directory or checkpoint file")
    parser.add_argument("--model", default="final", help="final, best, or a checkpoint stem")
    parser.add_argument("--every", type=int, default=20, help="print every N steps")
    parser.add_argument("--reset-seed", type=int, default=100)
    args = parser.parse_args()
    agent = Agent.load(args.run, model=args.model)
    # The forced-action games get their own copy: the search breaks ties at random, so
    # sharing one would make the printed episode depend on --every.
    prober = Agent.load(args.run, model=args.model)
    env = gym.make("CartPole-v1").unwrapped
    obs, _ = env.reset(seed=args.reset_seed)
    print("  t      x   x_dot  theta th_dot | prior0 visits  root_v | model Q(0) Q(1) "
          "| true G(0) G(1) (ends at)")
    t = 0
    while True:
        model_input = torch.tensor(np.asarray(obs, np.float32)[None])
        actions, result = agent.step(model_input)
        action = int(actions[0])
        if t % args.every == 0:
            prior, q = model_action_values(agent, model_input)
            state = env.state.copy()
            forced = []
            for first in (0, 1):
                env.state = state.copy()
                env.steps_beyond_terminated = None
                forced.append(greedy_return(prober, env, first, t))
            env.state = state.copy()
            env.steps_beyond_terminated = None
            x, x_dot, theta, th_dot = state
            print(f"{t:3d} {x:+6.2f} {x_dot:+6.3f} {theta:+6.3f} {th_dot:+6.3f} | {prior:.2f}  "
                  f"{result.visit_counts[0].tolist()} {result.root_values[0]:6.1f} | "
                  f"{q[0]:6.1f} {q[1]:6.1f} | {forced[0][0]:6.1f} {forced[1][0]:6.1f} "
                  f"({forced[0][1]}/{forced[1][1]})")
        obs, _, terminated, _, _ = env.step(action)
        t += 1
        if terminated or t >= MAX_STEPS:
            print(f"episode ends at step {t}, x = {float(obs[0]):+.2f}")
            return


if __name__ == "__main__":
    main()
