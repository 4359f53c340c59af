"""Evaluate a trained agent with the public API and print the evaluation record.

    python examples/evaluate_checkpoint.py runs/cartpole-20250101-120000 --episodes 8

The argument is a run directory (its final model, checkpoints/latest.pt, is used) or a
checkpoint file. The record is the same JSON that `ezengine eval` writes.
"""

from __future__ import annotations

import argparse
import json

from ezengine.agent import Agent, latest_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=None,
                        help="run directory or checkpoint [default: newest run under runs/]")
    parser.add_argument("--episodes", type=int, default=8, help="episodes to play")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    args = parser.parse_args()

    agent = Agent.load(args.run if args.run is not None else latest_run("runs"))
    print(f"{agent.config.env.id}: {agent.label} model from {agent.checkpoint}, "
          f"{agent.train_steps} training steps")
    record = agent.evaluate(episodes=args.episodes, seed=args.seed)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
