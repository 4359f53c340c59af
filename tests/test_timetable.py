"""The timetable (recipe.py): which published weights a reader takes, the order in which
the replay's owner takes records and priorities, and the shared weight history."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from ezengine.config import Config, load_config
from ezengine.envs import EnvDescription
from ezengine.pipeline.replay_role import ReplayOwner
from ezengine.pipeline.weights import HISTORY_SLOTS, LocalHistory, WeightHistory
from ezengine.recipe import (
    BATCH_LEAD,
    batch_env_steps,
    build_network,
    collector_budget,
    published_step,
    record_env_steps,
    selfplay_weights_step,
)
from ezengine.rings import SharedWeights, unlink_segments

ROOT = Path(__file__).resolve().parents[1]
OBS = EnvDescription((4,), np.dtype(np.float32).str, 2)


def test_a_reader_takes_the_newest_publish_at_or_before_its_step():
    assert published_step([0, 50, 100], 99) == 50
    assert published_step([0, 50, 100], 100) == 100
    assert published_step([50, 100, 150], 149) == 100
    assert published_step([520, 550], 400) == 520  # a resumed run's first publish


def test_selfplay_runs_one_interval_behind_the_pacing():
    cfg = Config().replace(run={"replay_ratio": 0.5, "start_transitions": 1000,
                                "selfplay_update_interval": 50, "env_steps": 12000})
    assert selfplay_weights_step(cfg, 999) == 0  # warm-up
    assert selfplay_weights_step(cfg, 1000) == 450  # 500 allowed, 450 published at or before
    assert selfplay_weights_step(cfg, 3000) == 1450


def test_records_of_two_collectors_enter_in_turn():
    # Collector 1's record after 8 of its steps (4 envs) enters after collector 0's.
    assert record_env_steps(8, 0, 2, 4) == 16
    assert record_env_steps(8, 1, 2, 4) == 20
    cfg = Config().replace(env={"num_envs": 8}, run={"env_steps": 1000,
                                                     "start_transitions": 100})
    assert collector_budget(cfg, 2) == (504, 56)  # whole vector steps, evenly shared


def owner_with_records(records: int, start_transitions: int = 16) -> ReplayOwner:
    cfg = load_config(ROOT / "configs" / "cartpole.yaml").replace(
                           env={"num_envs": 4},
                           search={"num_simulations": 2},
                           learner={"batch_size": 8, "td_steps": 3, "unroll_steps": 2},
                           run={"env_steps": 400, "start_transitions": start_transitions,
                                "replay_ratio": 0.5})
    owner = ReplayOwner(cfg, OBS, num_collectors=1)
    rng = np.random.default_rng(0)
    for j in range(1, records + 1):
        owner.ingest(a_record(rng, j), 0)
    return owner


def a_record(rng: np.random.Generator, j: int) -> dict:
    """The j-th record of a collector of 4 CartPole environments."""
    return {"frames": rng.normal(size=(4, 4)).astype(np.float32),
            "final_obs": np.zeros((4, 4), np.float32),
            "actions": np.ones(4, np.int64), "rewards": np.ones(4, np.float32),
            "policies": np.full((4, 2), 0.5, np.float32),
            "root_values": np.zeros(4, np.float32), "terminated": np.zeros(4, bool),
            "truncated": np.zeros(4, bool), "game_over": np.zeros(4, bool),
            "game_scores": np.zeros(4, np.float32), "game_lengths": np.zeros(4, np.int64),
            "env_steps": np.full(1, 4 * j, np.int64)}


def test_batches_are_due_by_the_pacing_and_need_their_lead_steps_priorities():
    owner = owner_with_records(10)  # 40 env steps: 20 training steps allowed
    assert owner.batch_due() and owner.lead_step == 1 - BATCH_LEAD
    net = build_network(owner.cfg, OBS)
    for _ in range(BATCH_LEAD):  # the first batches need no priorities
        owner.build(net, 0)
    with pytest.raises(RuntimeError, match="needs the priorities of training step 1"):
        owner.build(net, 0)
    with pytest.raises(RuntimeError, match="step 2 arrived after those of step 0"):
        owner.apply_priorities(2, np.zeros(1, np.int64), np.ones(1))
    owner.apply_priorities(1, np.zeros(1, np.int64), np.ones(1))
    owner.build(net, 0)
    while owner.batch_due():
        owner.apply_priorities(owner.lead_step, np.zeros(1, np.int64), np.ones(1))
        owner.build(net, 0)
    assert owner.next_batch == 21


def test_an_evaluation_is_reported_at_the_env_steps_its_batch_was_built_at():
    # The replay's owner, fed one record at a time, builds each batch as soon as the pacing
    # allows it: batch_env_steps names that point, whatever the replay holds when the
    # evaluation runs (before, an evaluation took the replay's count of that moment: 1,008
    # or 1,000 env steps for CartPole's step 500 by the machine's timing).
    owner = owner_with_records(0, start_transitions=24)  # 6 steps an env: past the lookahead
    cfg, rng, built = owner.cfg, np.random.default_rng(0), {}
    net = build_network(cfg, OBS)
    for j in range(1, 101):  # the budget: 400 env steps
        owner.ingest(a_record(rng, j), 0)
        while owner.batch_due():
            if owner.lead_step >= 1:
                owner.apply_priorities(owner.lead_step, np.zeros(1, np.int64), np.ones(1))
            built[owner.next_batch] = owner.total_env_steps
            owner.build(net, 0)
    assert len(built) == 200
    assert all(batch_env_steps(cfg, s) == e for s, e in built.items())
    assert [batch_env_steps(cfg, s) for s in (1, 12, 13, 14, 15, 200)] == [24, 24, 28, 28, 32,
                                                                         400]
    cartpole = load_config(ROOT / "configs" / "cartpole.yaml")  # 8 envs, warm-up 1,000
    assert [batch_env_steps(cartpole, s) for s in (500, 501, 10_000)] == [1000, 1008, 20_000]


def test_the_weight_history_keeps_the_last_publishes_under_their_steps():
    prefix = f"ezt-{os.getpid()}-{uuid.uuid4().hex[:6]}-"
    blocks = [SharedWeights.create(prefix, 3, name=f"w{i}") for i in range(HISTORY_SLOTS)]
    try:
        history = WeightHistory(blocks)
        out = np.empty(3, np.float32)
        assert history.read(10, out) is None  # nothing published yet
        for step in (0, 50, 100, 150):
            history.publish({"w": torch.full((3,), float(step))}, step)
        assert sorted(history.steps()) == [50, 100, 150]  # the oldest went
        assert history.read(149, out) == 100 and (out == 100).all()
        assert history.read(1000, out) == 150 and (out == 150).all()
        local = LocalHistory()
        module = torch.nn.Linear(1, 1)
        for step in (0, 50, 100, 150):
            local.publish({"weight": torch.full((1, 1), float(step)),
                           "bias": torch.zeros(1)}, step)
        assert sorted(local.states) == [50, 100, 150]
        assert local.load(module, 149, None) == 100 and module.weight.item() == 100
    finally:
        for block in blocks:
            block.unlink()
        unlink_segments(prefix)
