"""Print what a CartPole agent expects to earn across the track: the search's root value at
a grid of cart positions and velocities, with the pole upright and still.

    python examples/cartpole_values.py runs/cartpole-20250101-120000

A well-trained agent values the centre highest; values lower at the centre than off it mean
the agent has no reason to bring a drifting cart back (see README, CartPole results).
"""

from __future__ import annotations

import argparse

import numpy as np

from ezengine.agent import Agent, latest_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=None,
                        help="run directory or checkpoint [default: newest run under runs/]")
    parser.add_argument("--positions", type=int, default=9,
                        help="grid points from x = -2 to x = 2")
    args = parser.parse_args()

    agent = Agent.load(args.run if args.run is not None else latest_run("runs"))
    if agent.input_shape != (4,):
        raise SystemExit(f"{agent.checkpoint} is a {agent.config.env.id} agent with inputs "
                         f"{agent.input_shape}; this probe needs CartPole's 4 numbers")
    xs = np.linspace(-2.0, 2.0, args.positions)
    print(f"{agent.label} model, {agent.train_steps} training steps; root value by cart "
          f"position x (rows: cart velocity v)")
    print("v \\ x " + "".join(f"{x:>8.1f}" for x in xs))
    for v in (-0.5, 0.0, 0.5):
        obs = np.array([[x, v, 0.0, 0.0] for x in xs], dtype=np.float32)
        values = agent.search(obs).root_values
        print(f"{v:>5.1f} " + "".join(f"{value:>8.1f}" for value in values))


if __name__ == "__main__":
    main()
