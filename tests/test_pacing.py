"""The training budget and its pacing against collection."""

from __future__ import annotations

from pathlib import Path

from ezengine.config import Config, load_config
from ezengine.metrics import Eta, eta_text
from ezengine.recipe import (
    evaluation_episodes,
    evaluation_seed,
    paced_training_steps,
    progress_line,
    solved_at,
    total_training_steps,
)


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


def test_a_run_ends_early_at_the_evaluation_that_completes_the_streak():
    cfg = Config().replace(run={"stop_evaluations": 3, "stop_return": 475.0})

    def rows(*returns: float) -> list[dict]:
        return [{"train_steps": 500 * (i + 1), "mean_return": r} for i, r in enumerate(returns)]

    # 490 / 500 / 300 breaks the first streak; 475 (the threshold itself counts), 500, 480
    # is three in a row, ending at the sixth evaluation (step 3,000), not the seventh.
    assert solved_at(cfg, rows(490, 500, 300, 475, 500, 480, 500)) == 3000
    assert solved_at(cfg, rows(490, 500, 300, 474.9, 500, 480)) == 0
    assert solved_at(cfg, rows(500, 500)) == 0
    assert solved_at(cfg, []) == 0
    # Off (the default): the whole budget, whatever the returns.
    assert solved_at(Config(), rows(500, 500, 500, 500)) == 0


def test_the_evaluation_that_can_end_the_run_plays_more_episodes():
    # Two in a row at 500, the second over 60 episodes: an evaluation after one at 500 (or
    # more) is the one that can end the run. CartPole seed 20 ended on 20 + 20 games at 500
    # with a policy that failed 8 of 100 other starts (held out: 450.2).
    cfg = Config().replace(run={"stop_evaluations": 2, "stop_return": 500.0,
                                "eval_episodes": 20, "stop_eval_episodes": 60})

    def rows(*returns: float) -> list[dict]:
        return [{"train_steps": 500 * (i + 1), "mean_return": r} for i, r in enumerate(returns)]

    assert evaluation_episodes(cfg, []) == 20
    assert evaluation_episodes(cfg, rows(490)) == 20
    assert evaluation_episodes(cfg, rows(300, 500)) == 60
    assert evaluation_episodes(cfg, rows(500, 478.5)) == 20  # the long one failed: start again
    three = cfg.replace(run={"stop_evaluations": 3})
    assert evaluation_episodes(three, rows(500)) == 20
    assert evaluation_episodes(three, rows(499, 500, 500)) == 60
    assert evaluation_episodes(cfg.replace(run={"stop_evaluations": 1}), []) == 60
    # Unset, or no early stop: every evaluation plays run.eval_episodes.
    assert evaluation_episodes(cfg.replace(run={"stop_eval_episodes": 0}), rows(500)) == 20
    assert evaluation_episodes(cfg.replace(run={"stop_evaluations": 0}), rows(500)) == 20


def test_every_evaluation_plays_new_episodes():
    # Episode seeds of the evaluation at step s: evaluation_seed(s) .. + eval_episodes - 1.
    # No two evaluations of a run share one (an early stop on the same episodes each time
    # trusted a policy that only handled those), nor with `ezengine eval --seed 7`.
    cfg = Config().replace(run={"seed": 3, "eval_episodes": 20, "eval_interval": 500})
    blocks = [set(range(evaluation_seed(cfg, s), evaluation_seed(cfg, s) + 20))
              for s in (500, 1000, 1500, 1737, 10_000)]
    assert sum(map(len, blocks)) == len(set().union(*blocks))
    assert min(map(min, blocks)) >= 10_000 + 3
    assert evaluation_seed(cfg, 500) == 3 + 10_000 + 500 * 20


def test_the_eta_ignores_the_training_the_warm_up_pays_for(monkeypatch):
    # CartPole's default (at a 20,000-step budget) as printed: training steps 0-500 run on
    # the 1,000 warm-up steps while collection waits, so the first window shows 16 env
    # steps in 15 s. Timed from there the run would end hours away ("ETA 4h58m" was
    # printed for an 11-minute run).
    cfg = load_config(Path(__file__).parents[1] / "configs" / "cartpole.yaml",
                      ["run.env_steps=20000"])
    clock = iter([15.0, 30.0, 80.0, 95.0])  # the printed lines' times
    monkeypatch.setattr("ezengine.metrics.time.perf_counter", lambda: next(clock))
    eta = Eta()
    rows = [(1_000, 192), (1_016, 503), (2_536, 1_264), (3_048, 1_522)]
    texts = [progress_line(cfg, {"env_steps": e, "train_steps": t, "recent_return": None,
                                 "env_steps_per_s": 0.0, "train_steps_per_s": 0.0}, eta)
             for e, t in rows]
    assert texts[0].endswith("ETA ?") and texts[1].endswith("ETA ?")
    # From (1,016, 503) at 30 s: 1,520 env steps and 761 training steps in 50 s leave
    # 17,464 env steps at 30.4/s and 8,736 training steps at 15.2/s: 574 s either way.
    # The run ends early once solved, so that is at most the time left.
    assert texts[2].endswith("ETA <= 9m")
    # 65 s: 16,952 env steps at 31.3/s (542 s), 8,478 training steps at 15.7/s (541 s).
    assert texts[3].endswith("ETA <= 9m")


def test_the_eta_is_exact_only_for_a_run_that_trains_its_whole_budget():
    assert eta_text(600, 10.0, 300, 5.0) == "ETA 1m"
    assert eta_text(600, 10.0, 300, 5.0, at_most=True) == "ETA <= 1m"
    assert eta_text(36_000, 10.0, 0, 0.0, at_most=True) == "ETA <= 1h00m"
    assert eta_text(600, 0.0, 300, 5.0, at_most=True) == "ETA ?"
