"""How far a run's values sit from the returns its self-play states actually got.

For every state in the transition logs of a vector-observation run (CartPole), within a
window of env steps: the model's value (a checkpoint's value head on the state) against the
discounted return its episode actually earned from there, bootstrapped with the same
model's value where the episode was truncated or is still open. Reported for the greedy
environments (the first round(greedy_env_fraction x num_envs) of a collector) and for the
sampling ones.

    python benchmarks/value_gap.py runs/cartpole-s0 --from 6000 --to 12000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ezengine.agent import Agent
from ezengine.collector import transition_fields
from ezengine.pipeline.transition_log import TransitionLog, log_path
from ezengine.support import support_to_scalar


def model_values(agent: Agent, states: np.ndarray) -> np.ndarray:
    """float64 [N]: the value head's scalar value of each state (frame_stack 1)."""
    with torch.no_grad():
        logits = agent.model.initial_inference(torch.tensor(states, dtype=torch.float32)
                                               ).value_logits
        return support_to_scalar(logits, agent.config.model.support_size).double().numpy()


def episode_rows(agent: Agent, log: np.ndarray, env: int, gamma: float
                 ) -> list[tuple[int, float, float]]:
    """(env step, value, actual discounted return) for every state environment `env` of
    this collector's log visited."""
    rows: list[tuple[int, float, float]] = []
    done = log["terminated"][:, env] | log["truncated"][:, env]
    ends = [*(np.flatnonzero(done) + 1).tolist(), len(log)]  # the last one: still open
    start = 0
    for end in ends:
        if end <= start:
            continue
        ep = log[start:end]
        values = model_values(agent, np.asarray(ep["frames"][:, env], dtype=np.float32))
        last = ep[-1]
        g = 0.0 if last["terminated"][env] else float(
            model_values(agent, np.asarray(last["final_obs"][env:env + 1], np.float32))[0])
        returns = np.empty(len(ep))
        for i in range(len(ep) - 1, -1, -1):
            g = float(ep["rewards"][i, env]) + gamma * g
            returns[i] = g
        steps = ep["env_steps"][:, 0]
        rows += list(zip(steps.tolist(), values.tolist(), returns.tolist(), strict=True))
        start = end
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--from", dest="lo", type=int, default=0, help="first env step")
    parser.add_argument("--to", dest="hi", type=int, default=10**9, help="last env step")
    parser.add_argument("--model", default="final", choices=["final", "best"])
    args = parser.parse_args()

    agent = Agent.load(args.run, model=args.model)
    cfg = agent.config
    n = cfg.env.num_envs
    greedy = round(cfg.run.greedy_env_fraction * n)
    fields = transition_fields(n, agent.observation_shape, np.dtype(np.float32), agent.num_actions)
    halves: dict[str, list[tuple[int, float, float]]] = {"greedy": [], "sampled": []}
    c = 0
    while log_path(args.run, c).exists():
        log = TransitionLog(log_path(args.run, c), fields).read()
        for env in range(n):
            rows = episode_rows(agent, log, env, cfg.learner.discount)
            halves["greedy" if env < greedy else "sampled"] += [
                r for r in rows if args.lo <= r[0] <= args.hi]
        c += 1
    for half, rows in halves.items():
        if not rows:
            continue
        v = np.array([r[1] for r in rows])
        g = np.array([r[2] for r in rows])
        print(json.dumps({"run": str(args.run), "model": args.model, "half": half,
                          "from": args.lo, "to": args.hi, "states": len(rows),
                          "value": round(float(v.mean()), 1), "return": round(float(g.mean()), 1),
                          "return_minus_value": round(float((g - v).mean()), 1),
                          "abs_error": round(float(np.abs(g - v).mean()), 1)}))


if __name__ == "__main__":
    main()
