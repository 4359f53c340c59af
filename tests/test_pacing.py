"""The training budget and its pacing against collection."""

from __future__ import annotations

from ezengine.config import Config
from ezengine.recipe import paced_training_steps, total_training_steps


def test_the_papers_budget_is_100k_paced_plus_20k_extra_training_steps():
    # 100,000 training steps with collection (the 2,000 random warm-up steps' share
    # included), then 20,000 without new data: 120,000, not (100k - 2k) + 20k.
    assert total_training_steps(Config()) == 120_000


def test_pacing_by_hand():
    cfg = Config().replace(run={"env_steps": 1000, "start_transitions": 100,
                                "replay_ratio": 0.5, "extra_training_steps": 30})
    assert paced_training_steps(cfg, 0) == 0
    assert paced_training_steps(cfg, 99) == 0  # random warm-up: no training yet
    # At the end of the warm-up its share is due at once: 0.5 * 100.
    assert paced_training_steps(cfg, 100) == 50
    assert paced_training_steps(cfg, 601) == 300
    assert paced_training_steps(cfg, 999) == 499
    assert paced_training_steps(cfg, 1000) == 530  # the extra steps once collection ends
    assert paced_training_steps(cfg, 1008) == 530  # a last vector step past the budget
    assert total_training_steps(cfg) == 530
