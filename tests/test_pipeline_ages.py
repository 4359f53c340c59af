"""Sample ages in the pipeline with several collectors: the replay's owner stamps what it
ingests on the clock ages are measured with (the env steps of all collectors together),
live and when a resumed run rebuilds its replay from the collectors' logs."""

from __future__ import annotations

import numpy as np

from ezengine.config import Config
from ezengine.envs import EnvDescription
from ezengine.pipeline.layouts import transition_layout
from ezengine.pipeline.replay_role import ReplayOwner
from ezengine.pipeline.transition_log import TransitionLog, log_path
from ezengine.reanalyse import td_horizon

N = 4  # environments per collector
OBS = EnvDescription((4,), np.dtype(np.float32).str, 2)



def make_cfg() -> Config:
    # 30 env steps of age shorten the TD horizon by one.
    return Config().replace(env={"kind": "gym", "num_envs": N, "frame_stack": 1},
                            replay={"capacity": 1000},
                            learner={"td_steps": 5, "off_policy_fraction": 0.3},
                            run={"env_steps": 100})


def record(cfg: Config, collector: int, j: int) -> dict[str, np.ndarray]:
    """Collector `collector`'s j-th record (1-based); every 4th one truncates the episode
    of environment `collector`, which finishes a game scored 100 * collector + j."""
    rec = {name: np.zeros(shape, dtype) for name, shape, dtype in transition_layout(cfg, OBS)}
    rec["frames"][...] = 1000 * collector + 10 * j + np.arange(N)[:, None]
    rec["final_obs"][...] = rec["frames"] + 0.5
    rec["actions"][...] = np.arange(N) % 2
    rec["rewards"][...] = 1.0
    rec["policies"][...] = 0.5
    if j % 4 == 0:
        rec["truncated"][collector] = rec["game_over"][collector] = True
        rec["game_scores"][collector] = 100 * collector + j
        rec["game_lengths"][collector] = 4
    rec["env_steps"][0] = N * j
    return rec


def test_the_newest_data_of_two_collectors_has_age_zero_and_the_full_td_horizon():
    cfg = make_cfg()
    owner = ReplayOwner(cfg, OBS, num_collectors=2)
    for j in range(1, 11):
        for c in (0, 1):
            assert owner.next_collector() == c  # records enter in turn
            owner.ingest(record(cfg, c, j), c)
    rp = owner.replay
    assert owner.total_env_steps == 2 * 10 * N
    # The last round (no episode ended in it) wrote the newest 2N positions. Their age, as
    # Reanalyser.build computes it, is at most one record's worth of steps; a collector's
    # own count (40) would make them look 40 steps old: one step off the TD horizon.
    newest = np.arange(rp.head - 2 * N, rp.head)
    age = owner.total_env_steps - rp.collected_at[rp.slot(newest)]
    assert age.max() <= N
    lc = cfg.learner
    horizon = td_horizon(age, lc.td_steps, lc.off_policy_fraction, cfg.run.env_steps)
    np.testing.assert_array_equal(horizon, lc.td_steps)
    # Each position carries the total env steps at its ingestion: one clock for all.
    stamps = rp.collected_at[:rp.head]
    assert (np.diff(stamps) >= 0).all() and stamps[-1] == owner.total_env_steps


def test_a_rebuild_from_two_collectors_logs_stamps_positions_like_live_ingestion(tmp_path):
    cfg = make_cfg()
    live = ReplayOwner(cfg, OBS, num_collectors=2)
    (tmp_path / "replay").mkdir()
    logs = [TransitionLog(log_path(tmp_path, c), transition_layout(cfg, OBS)) for c in (0, 1)]
    for j in range(1, 11):
        for c in (0, 1):
            rec = record(cfg, c, j)
            logs[c].append(rec)  # as run_collector: logged, then published
            live.ingest(rec, c)
    resumed = ReplayOwner(cfg, OBS, num_collectors=2)
    resumed.rebuild(tmp_path)
    h = live.replay.head
    assert resumed.env_steps == live.env_steps == [10 * N, 10 * N]
    assert list(resumed.recent) == list(live.recent) == [4, 104, 8, 108]
    # The same positions in the same order, with the same stamps.
    np.testing.assert_array_equal(resumed.replay.frames[:h], live.replay.frames[:h])
    np.testing.assert_array_equal(resumed.replay.collected_at[:h], live.replay.collected_at[:h])
    # Every environment's trajectory was open at the stop: closed as cut, stamped now.
    assert resumed.replay.head == h + 2 * N
    cut = np.arange(h, h + 2 * N)
    np.testing.assert_array_equal(resumed.replay.collected_at[cut], live.total_env_steps)
    assert not resumed.replay.terminal[cut].any()


def test_progress_rows_average_the_learners_metrics_over_their_window():
    from ezengine.learner import METRICS
    from ezengine.pipeline.supervisor import window_means

    before = {"train_steps": 10, **{f"{m}_sum": 5.0 for m in METRICS}}
    # Three steps with losses 1.0, 2.0 and 6.0: the row shows 3.0, not the last value 6.0.
    now = {"train_steps": 13, **{f"{m}_sum": 5.0 for m in METRICS}, "loss_sum": 14.0}
    means = window_means(now, before)
    assert means["loss"] == 3.0 and means["value_mean"] == 0.0
    assert set(means) == set(METRICS)
    assert window_means(before, before) == {}  # no training in the window: no means
