"""The collector's action choice: sampled visit counts, greedy environments, repeats."""

from __future__ import annotations

import numpy as np
import torch

from ezengine.collector import Collector
from ezengine.config import load_config
from ezengine.envs import VectorEnv
from ezengine.recipe import (
    build_network,
    collector_options,
    greedy_envs,
    selfplay_noise_roots,
)
from ezengine.search import BatchedSearch, SearchResult, select_actions


class FixedVisits:
    """A search whose every root has the same visit counts (action 1 the most visited)."""

    def search(self, obs: np.ndarray) -> SearchResult:
        n = obs.shape[0]
        return SearchResult(visit_counts=np.tile(np.array([[10, 15]], np.int32), (n, 1)),
                            root_values=np.zeros(n, np.float32),
                            predicted_values=np.zeros(n, np.float32))


def test_greedy_envs_take_the_most_visited_action_and_the_others_sample():
    cfg = load_config("configs/cartpole.yaml", ["run.greedy_env_fraction=0.25"])
    envs = VectorEnv(cfg.env, seed=0, train=True)
    k = greedy_envs(cfg, envs.num_envs)
    assert (envs.num_envs, k) == (8, 2)
    collector = Collector(envs, search=None, clip_rewards=False, frame_stack=1, seed=0,
                          greedy_envs=k)
    actions = np.stack([collector.step(FixedVisits(), 1.0)["actions"].copy()
                        for _ in range(200)])
    envs.close()
    assert (actions[:, :k] == 1).all()
    # At temperature 1 the others take action 0 with probability 10/25.
    share = (actions[:, k:] == 0).mean()
    assert 0.35 < share < 0.45, share


def test_greedy_env_count_rounds_the_fraction_of_a_collectors_envs():
    for fraction, n, want in [(0.0, 8, 0), (0.25, 8, 2), (0.5, 8, 4), (0.3, 16, 5),
                              (1.0, 3, 3)]:
        cfg = load_config("configs/cartpole.yaml", [f"run.greedy_env_fraction={fraction}"])
        assert greedy_envs(cfg, n) == want


def test_greedy_envs_search_without_root_noise_only_when_configured():
    on = load_config("configs/minatar/breakout.yaml", ["run.greedy_env_fraction=0.5"])
    off = load_config("configs/minatar/breakout.yaml", ["run.greedy_env_fraction=0.5",
                                                        "run.greedy_env_noise=false"])
    np.testing.assert_array_equal(selfplay_noise_roots(on, 8), [True] * 8)
    np.testing.assert_array_equal(selfplay_noise_roots(off, 8), [False] * 4 + [True] * 4)


def test_a_collector_hands_its_noise_roots_to_the_search():
    """With the greedy environments left out of the noise, their recorded search policies
    are a noise-free search's, and the others' are not."""
    cfg = load_config("configs/cartpole.yaml", ["run.greedy_env_fraction=0.5",
                                                "run.greedy_env_noise=false",
                                                "search.exploration_fraction=0.9"])
    envs = VectorEnv(cfg.env, seed=0, train=True)
    torch.manual_seed(0)
    model = build_network(cfg, envs.description).eval()
    with torch.no_grad():  # the heads start at zero: give the priors some shape
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    collector = Collector(envs, BatchedSearch.for_config(cfg, envs.num_actions, seed=1),
                          clip_rewards=False, frame_stack=1, seed=0,
                          greedy_envs=greedy_envs(cfg, 8),
                          noise_roots=selfplay_noise_roots(cfg, 8))
    obs = torch.from_numpy(collector.stacks.model_input())
    quiet = BatchedSearch.for_config(cfg, envs.num_actions, seed=1).run(model, obs,
                                                                        add_noise=False)
    record = collector.step(model, 1.0)
    envs.close()
    np.testing.assert_allclose(record["policies"][:4], quiet.policies()[:4])
    assert not np.allclose(record["policies"][4:], quiet.policies()[4:])


def test_sampling_envs_hold_a_repeated_action_until_its_length_or_their_game_ends():
    """Every sampling environment starts a repeat at once (probability 1) and takes its
    action until the drawn length runs out or its game ends; greedy ones never repeat."""
    cfg = load_config("configs/cartpole.yaml", ["run.greedy_env_fraction=0.25",
                                                "run.repeat_explore_prob=1.0",
                                                "run.repeat_explore_mu=1.5"])
    envs = VectorEnv(cfg.env, seed=0, train=True)
    k = greedy_envs(cfg, envs.num_envs)
    collector = Collector(envs, search=None, clip_rewards=False, frame_stack=1, seed=0,
                          **collector_options(cfg, envs.num_envs))
    lengths, held_steps = [], 0
    for _ in range(300):
        left, action = collector.repeat_left.copy(), collector.repeat_action.copy()
        rec = collector.step(FixedVisits(), 1.0)
        ended = rec["terminated"] | rec["truncated"]
        assert (rec["actions"][:k] == 1).all() and (collector.repeat_left[:k] == 0).all()
        held = left > 0
        np.testing.assert_array_equal(rec["actions"][held], action[held])
        held_steps += held.sum()
        started = ~held
        started[:k] = False
        # A repeat starts on this step: its action is taken now and length - 1 remain.
        np.testing.assert_array_equal(rec["actions"][started],
                                      collector.repeat_action[started])
        lengths += list(collector.repeat_left[started & ~ended] + 1)
        assert (collector.repeat_left[ended] == 0).all()
        assert (collector.repeat_left[~ended & held] == left[~ended & held] - 1).all()
    envs.close()
    assert held_steps > 300 * (envs.num_envs - k) // 2
    # Zeta(1.5): P(n = 1) = 1 / zeta(1.5) = 0.38, and lengths have a long tail.
    lengths = np.array(lengths)
    assert 0.3 < (lengths == 1).mean() < 0.46, (lengths == 1).mean()
    assert lengths.max() > 50


def test_without_repeats_a_collector_draws_what_it_always_drew():
    """With repeats off the collector's random stream is the sampling alone: its actions
    are select_actions at temperature 1 on a fresh generator of its seed, one draw per
    step, with the greedy environments on the most visited action (earlier runs of
    every seed stay as they were)."""
    cfg = load_config("configs/cartpole.yaml", ["run.greedy_env_fraction=0.25"])
    envs = VectorEnv(cfg.env, seed=0, train=True)
    collector = Collector(envs, search=None, clip_rewards=False, frame_stack=1, seed=0,
                          **collector_options(cfg, envs.num_envs))
    rng = np.random.default_rng(0)
    counts = np.tile(np.array([[10, 15]]), (envs.num_envs, 1))
    for _ in range(50):
        want = select_actions(counts, 1.0, rng)
        want[:2] = 1
        np.testing.assert_array_equal(collector.step(FixedVisits(), 1.0)["actions"], want)
    envs.close()
