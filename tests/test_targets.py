"""Reanalyse target maths with numbers by hand.

Most tests replace the target model's value estimate with v(o_g) = 100 + g for global
position g, so every value target is an exact number; gamma = 0.5 keeps them exact in
binary floating point.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ezengine.config import Config
from ezengine.frames import model_inputs
from ezengine.model import build_model
from ezengine.reanalyse import Reanalyser, td_horizon, value_prefix_targets
from ezengine.replay import ReplayBuffer, SampledPositions
from ezengine.search import BatchedSearch
from ezengine.support import support_to_scalar

A = 3
GAMMA = 0.5


def make_cfg(**learner) -> Config:
    model = dict(kind="mlp", latent_dim=8, hidden_dim=16, lstm_hidden=8, head_hidden=(8,),
                 support_size=5, projection_hidden=16, projection_dim=16,
                 projection_head_hidden=8)
    return Config().replace(
        env={"kind": "gym"}, model=model, search={"num_simulations": 4},
        learner={"discount": GAMMA, "unroll_steps": 5, "td_steps": 5,
                 "value_prefix_horizon": 5, "off_policy_fraction": 0.3,
                 "reanalyse_fraction": 0.0, **learner},
        run={"env_steps": 1000})


class KnownValues(Reanalyser):
    """Reanalyser whose bootstrap value at global position g is 100 + g."""

    def bootstrap_values(self, model, positions):
        self.asked = [*getattr(self, "asked", []), positions.copy()]
        return (100.0 + positions).astype(np.float32)


def policy_of(g: int) -> np.ndarray:
    p = np.array([g + 1.0, 2.0, 1.0], dtype=np.float32)
    return p / p.sum()


def put(rb, g_expected, reward, env_step, writer=0):
    g = rb.head
    assert g == g_expected
    rb.append(writer, np.array([g, -g], np.float32), g % A, reward, 0.0, policy_of(g), env_step)


def standard_buffer(stack: int = 1) -> ReplayBuffer:
    """Three trajectories, one writer, capacity 64 (no wrap):

    C: g0..g11 with r_g = g + 1, final g12 TERMINATED; collected at env step 20.
    A: g13, g14, g15 with r = 1, 2, 4, final g16 TERMINATED; collected at env step 900.
    B: g17, g18, g19 with r = 1, 2, 4, final g20 TRUNCATED; collected at env step 650.
    """
    rb = ReplayBuffer(64, (2,), np.float32, A, num_writers=1, alpha=1.0, frame_stack=stack,
                      lookahead=10)
    for g in range(12):
        put(rb, g, g + 1.0, 20)
    rb.close(0, np.array([12, -12], np.float32), True, 20)
    for g, r in zip((13, 14, 15), (1.0, 2.0, 4.0), strict=True):
        put(rb, g, r, 900)
    rb.close(0, np.array([16, -16], np.float32), True, 900)
    for g, r in zip((17, 18, 19), (1.0, 2.0, 4.0), strict=True):
        put(rb, g, r, 650)
    rb.close(0, np.array([20, -20], np.float32), False, 650)
    return rb


def targets(rb, starts, horizons, cfg=None):
    cfg = cfg or make_cfg()
    re = KnownValues(cfg, rb, A, seed=0)
    pos = rb.unroll_positions(np.array(starts), cfg.learner.unroll_steps)
    return re.value_targets(None, pos, np.array(horizons)), re


# --------------------------------------------------------------------------- 2.5


def test_td_horizon_boundaries():
    # l = clip(5 - floor(age / (0.3 * 100k)), 1, 5): 30k steps of age per unit of horizon.
    ages = np.array([0, 29_999, 30_000, 59_999, 60_000, 89_999, 90_000, 119_999, 120_000,
                     10**6])
    expected = [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    np.testing.assert_array_equal(td_horizon(ages, 5, 0.3, 100_000), expected)
    # Configurable horizon and fraction: td 3, 0.5 * 1000 = 500 steps per unit.
    np.testing.assert_array_equal(
        td_horizon(np.array([0, 499, 500, 999, 1000, 5000]), 3, 0.5, 1000), [3, 3, 2, 2, 1, 1])


# --------------------------------------------------------------------------- value prefix


def test_value_prefix_targets_resets_and_masks():
    r = np.array([[1, 2, 3, 4, 5], [10, 20, 30, 40, 50]], dtype=np.float32)
    full = np.ones_like(r, dtype=bool)
    # Horizon 5 with K = 5: plain cumulative sums.
    np.testing.assert_array_equal(value_prefix_targets(r, full, 5),
                                  [[1, 3, 6, 10, 15], [10, 30, 60, 100, 150]])
    # Horizon 2: resets at k = 0, 2, 4 -> r0, r0+r1, r2, r2+r3, r4.
    np.testing.assert_array_equal(value_prefix_targets(r, full, 2),
                                  [[1, 3, 3, 7, 5], [10, 30, 30, 70, 50]])
    # No action past the end: those rewards count 0 (their terms are masked anyway).
    has = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(value_prefix_targets(r, has, 5),
                                  [[1, 3, 6, 6, 6], [10, 10, 10, 10, 10]])
    np.testing.assert_array_equal(value_prefix_targets(r, has, 2),
                                  [[1, 3, 3, 3, 0], [10, 10, 0, 0, 0]])


# --------------------------------------------------------------------------- value targets


def test_value_targets_terminated_trajectory():
    rb = standard_buffer()
    z, _ = targets(rb, [13, 13], [5, 2])
    # Horizon 5 from g13 (A: r = 1, 2, 4, then terminated at g16), gamma 0.5:
    #   z13 = 1 + .5*2 + .25*4 = 3   (no bootstrap: the episode terminated)
    #   z14 = 2 + .5*4 = 4;  z15 = 4;  z16 (terminal final obs) = 0;  past the end 0, 0.
    # Horizon 2:
    #   z13 = 1 + .5*2 + .25*v(g15) = 2 + .25*115 = 30.75   (bootstrap mid-trajectory)
    #   z14 = 2 + .5*4 = 4 (reaches the terminal g16 after 2 steps: nothing to add)
    np.testing.assert_array_equal(z, [[3, 4, 4, 0, 0, 0], [30.75, 4, 4, 0, 0, 0]])


def test_value_targets_truncated_trajectory_bootstraps_from_final_observation():
    rb = standard_buffer()
    z, _ = targets(rb, [17], [4])
    # B: r = 1, 2, 4, final g20 truncated, v(g20) = 120; horizon 4:
    #   z17 = 1 + .5*2 + .25*4 + .125*120 = 3 + 15 = 18
    #   z18 = 2 + .5*4 + .25*120 = 34
    #   z19 = 4 + .5*120 = 64
    #   z20 = v(g20) = 120 (the final observation's own bootstrap value); past the end 0
    np.testing.assert_array_equal(z, [[18, 34, 64, 120, 0, 0]])


def test_value_targets_full_and_shortened_horizons_mid_trajectory():
    rb = standard_buffer()
    z, _ = targets(rb, [0, 0, 0, 8], [5, 3, 1, 5])
    # C: r_g = g + 1, v(g) = 100 + g.
    # l = 5: z0 = 1 + .5*2 + .25*3 + .125*4 + .0625*5 + .5^5 * v(g5)
    #           = 3.5625 + 105 / 32 = 3.5625 + 3.28125 = 6.84375; each later c adds 1.96875
    #           (every reward +1: sum_{i<5} .5^i = 1.9375, v +1: 1/32 = .03125)
    # l = 3: z0 = 1 + 1 + .75 + .125 * 103 = 15.625; later c: + 1.75 + .125 = + 1.875
    # l = 1: z0 = 1 + .5 * 101 = 51.5; later c: + 1.5
    np.testing.assert_array_equal(z[0], [6.84375, 8.8125, 10.78125, 12.75, 14.71875, 16.6875])
    np.testing.assert_array_equal(z[1], [15.625, 17.5, 19.375, 21.25, 23.125, 25.0])
    np.testing.assert_array_equal(z[2], [51.5, 53.0, 54.5, 56.0, 57.5, 59.0])
    # From g8, l = 5 runs into the termination at g12:
    #   z8 = 9 + .5*10 + .25*11 + .125*12 = 18.25; z9 = 10 + 5.5 + 3 = 18.5;
    #   z10 = 11 + 6 = 17; z11 = 12; z12 (terminal) = 0; past the end 0.
    np.testing.assert_array_equal(z[3], [18.25, 18.5, 17, 12, 0, 0])


def test_value_targets_bootstrap_across_the_physical_wraparound():
    # Capacity 8. Filler g0..g4 closed at g5; then g6..g12 with r_g = g - 5 (1..7) in
    # slots 6, 7, 0, 1, 2, 3, 4, closed (TRUNCATED) at g13 in slot 5. The arrays' end
    # between slots 7 and 0 is not an episode end.
    rb = ReplayBuffer(8, (2,), np.float32, A, num_writers=1, alpha=1.0, frame_stack=1,
                      lookahead=5)
    for g in range(5):
        put(rb, g, 50.0, 0)
    rb.close(0, np.array([5, -5], np.float32), True, 0)
    for g in range(6, 13):
        put(rb, g, g - 5.0, 0)
    rb.close(0, np.array([13, -13], np.float32), False, 0)
    z, re = targets(rb, [6], [5])
    # z6  = 1 + .5*2 + .25*3 + .125*4 + .0625*5 + .03125 * v(g11) = 3.5625 + 111/32 = 7.03125
    # z7  = 2 + 1.5 + 1 + .625 + .375 + 112/32 = 5.5 + 3.5 = 9.0
    # z8  = 3 + 2 + 1.25 + .75 + .4375 + 113/32 = 7.4375 + 3.53125 = 10.96875
    # z9  = 4 + 2.5 + 1.5 + .875 + .0625 * v(g13) = 8.875 + 7.0625 = 15.9375  (truncated)
    # z10 = 5 + 3 + 1.75 + .125 * 113 = 23.875;  z11 = 6 + 3.5 + .25 * 113 = 37.75
    np.testing.assert_array_equal(z, [[7.03125, 9.0, 10.96875, 15.9375, 23.875, 37.75]])
    # The bootstrap is asked for global positions (not array slots).
    np.testing.assert_array_equal(np.concatenate(re.asked), [11, 12, 13])


def test_value_targets_with_the_real_target_model_bootstrap():
    torch.manual_seed(0)
    cfg = make_cfg()
    rb = standard_buffer(stack=2)
    model = build_model(cfg.model, (2,), A, frame_stack=2)
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-initialised heads: non-zero values
            p.add_(0.5 * torch.randn_like(p))
    model.eval()
    re = Reanalyser(cfg, rb, A, seed=0)
    pos = rb.unroll_positions(np.array([13, 2]), 5)
    z = re.value_targets(model, pos, np.array([2, 2]))

    def v(g: int) -> float:
        obs = torch.from_numpy(rb.stacked_frames(np.array([g])))
        with torch.no_grad():
            return float(support_to_scalar(model.initial_inference(obs).value_logits, 5)[0])

    assert abs(v(15)) > 0.1  # the check below is not vacuous
    # A (g13: r 1, 2, 4, terminated at g16), l = 2: z13 = 1 + .5*2 + .25 v(g15), z14 = 4, ...
    np.testing.assert_allclose(z[0], [2 + 0.25 * v(15), 4, 4, 0, 0, 0], rtol=1e-5)
    # C, l = 2: z_c = r_c + .5 r_{c+1} + .25 v(g_{c+2}) with r_g = g + 1.
    np.testing.assert_allclose(
        z[1], [c + 1 + 0.5 * (c + 2) + 0.25 * v(c + 2) for c in range(2, 8)], rtol=1e-5)


# --------------------------------------------------------------------------- whole batch


def test_build_masks_horizons_and_stored_policies():
    cfg = make_cfg(reanalyse_fraction=0.0)
    rb = standard_buffer()
    re = KnownValues(cfg, rb, A, seed=3)
    sample = SampledPositions(np.array([13, 2, 17]), np.array([1.0, 0.5, 0.25], np.float32))
    batch = re.build(None, sample, env_steps=1000, target_version=7)
    # Ages 1000 - collected_at: A 100, C 980, B 350; 0.3 * 1000 = 300 per unit:
    # l = 5 - floor(100/300) = 5;  5 - floor(980/300) = 2;  5 - floor(350/300) = 4.
    np.testing.assert_array_equal(batch.value_targets, [
        [3, 4, 4, 0, 0, 0],                        # A, l = 5 (see the terminated test)
        [31.0, 32.75, 34.5, 36.25, 38.0, 39.75],   # C, l = 2: r_c + .5 r_{c+1} + .25 v(c+2)
        [18, 34, 64, 120, 0, 0],                   # B, l = 4 (see the truncated test)
    ])
    # z2 = 3 + .5*4 + .25*104 = 31, and each later c adds 1 + .5 + .25 = 1.75.
    # m_0 = 1; m_k = 1 while step t+k-1 is inside: A has steps 13..15, so m_1..m_3 = 1 and
    # m_4 (step 16 is the final observation) = m_5 = 0.
    np.testing.assert_array_equal(batch.masks, [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0]])
    assert batch.masks.dtype == np.float32
    # Value prefixes, horizon 5 from t: A r = 1, 2, 4 then nothing; C r = 3..7.
    np.testing.assert_array_equal(batch.value_prefix_targets,
                                  [[1, 3, 7, 7, 7], [3, 7, 12, 18, 25], [1, 3, 7, 7, 7]])
    # Policies: stored ones (fraction 0) where there is an action, zero elsewhere.
    for row, t in enumerate([13, 2, 17]):
        for k in range(6):
            g = t + k
            inside = rb.actions[g] >= 0 and (row == 1 or k < 3)
            want = policy_of(g) if inside else np.zeros(A, np.float32)
            np.testing.assert_array_equal(batch.policy_targets[row, k], want)
    # Stored actions inside; padding actions are legal action indices.
    np.testing.assert_array_equal(batch.actions[1], [g % A for g in range(2, 7)])
    np.testing.assert_array_equal(batch.actions[0, :3], [13 % A, 14 % A, 15 % A])
    assert ((batch.actions >= 0) & (batch.actions < A)).all()
    # Frames (stack 1): t, t+1..t+K; past the end repeats the final observation.
    np.testing.assert_array_equal(batch.frames[:, :, 0], [[13, 14, 15, 16, 16, 16],
                                                          [2, 3, 4, 5, 6, 7],
                                                          [17, 18, 19, 20, 20, 20]])
    np.testing.assert_array_equal(batch.positions, [13, 2, 17])
    np.testing.assert_array_equal(batch.weights, [1.0, 0.5, 0.25])
    assert batch.target_version == 7
    assert batch.policy_targets.shape == (3, 6, A)
    assert batch.value_targets.dtype == np.float32


def test_frame_windows_carry_every_stacked_model_input():
    cfg = make_cfg(reanalyse_fraction=0.0)
    rb = standard_buffer(stack=3)
    re = KnownValues(cfg, rb, A, seed=3)
    starts = np.array([13, 1, 5, 18])
    batch = re.build(None, SampledPositions(starts, np.ones(4, np.float32)), env_steps=1000,
                     target_version=0)
    # Frame g is (g, -g). Stack 3 + K 5 frames: two before t (padded with the
    # trajectory's first frame), then t..t+5 (past the end the final observation repeats).
    assert batch.frames.shape == (4, 8, 2)
    np.testing.assert_array_equal(batch.frames[:, :, 0], [[13, 13, 13, 14, 15, 16, 16, 16],
                                                          [0, 0, 1, 2, 3, 4, 5, 6],
                                                          [3, 4, 5, 6, 7, 8, 9, 10],
                                                          [17, 17, 18, 19, 20, 20, 20, 20]])
    # The learner's inputs from the window equal the replay's own stacks wherever the
    # unroll is inside the trajectory.
    inputs = model_inputs(torch.from_numpy(batch.frames), 3).numpy()
    assert inputs.shape == (4, 6, 6)
    pos = rb.unroll_positions(starts, 5)
    for row, k in zip(*np.nonzero(pos >= 0), strict=True):
        np.testing.assert_array_equal(inputs[row, k], rb.stacked_frames(pos[row, k:k + 1])[0])
    np.testing.assert_array_equal(inputs[0, 1], [13, -13, 13, -13, 14, -14])
    np.testing.assert_array_equal(inputs[3, 4], [20, -20, 20, -20, 20, -20])  # masked


def test_build_research_fraction_with_a_real_model():
    torch.manual_seed(1)
    cfg = make_cfg(reanalyse_fraction=0.5)
    rb = standard_buffer()
    stored = np.array([0.7, 0.2, 0.1], np.float32)  # not a visit distribution of 4 visits
    rb.policies[:] = stored
    model = build_model(cfg.model, (2,), A, frame_stack=1).eval()
    re = Reanalyser(cfg, rb, A, seed=0)
    sample = SampledPositions(np.array([13, 2]), np.ones(2, np.float32))
    batch = re.build(model, sample, env_steps=1000, target_version=0)
    assert batch.policy_targets.shape == (2, 6, A)
    # round(0.5 * 2) = 1 row re-searched, chosen at random; the other keeps stored policies.
    # Row 0 (position 13) has actions at k = 0..2 only; row 1 (position 2) at every k.
    has_action = [3, 6]
    is_stored = [np.allclose(batch.policy_targets[r, :has_action[r]], stored) for r in (0, 1)]
    assert sorted(is_stored) == [False, True]
    r = is_stored.index(False)
    fresh = batch.policy_targets[r, :has_action[r]]
    np.testing.assert_allclose(fresh.sum(-1), 1.0, rtol=1e-6)
    visits = fresh * cfg.search.num_simulations
    np.testing.assert_allclose(visits, np.round(visits), atol=1e-5)  # counts / 4
    np.testing.assert_array_equal(batch.policy_targets[0, 3:], 0.0)
    np.testing.assert_array_equal(batch.policy_targets[1 - r, :has_action[1 - r]],
                                  np.tile(stored, (has_action[1 - r], 1)))
    assert np.isfinite(batch.value_targets).all()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_policy_targets_all_stored_or_all_searched(fraction):
    cfg = make_cfg(reanalyse_fraction=fraction)
    rb = standard_buffer()
    rb.policies[:] = np.array([0.7, 0.2, 0.1], np.float32)
    model = build_model(cfg.model, (2,), A, frame_stack=1).eval()
    re = Reanalyser(cfg, rb, A, seed=0)
    pos = rb.unroll_positions(np.array([0, 13]), 5)
    has = (pos >= 0) & (rb.actions[np.maximum(pos, 0)] >= 0)
    pt = re.policy_targets(model, pos, has)
    is_stored = np.isclose(pt, [0.7, 0.2, 0.1]).all(-1)
    assert (is_stored == (has & (fraction == 0.0))).all()
    np.testing.assert_array_equal(pt[~has], 0.0)


def test_reanalysis_parts_are_searched_by_their_own_seeded_search_here_or_by_helpers():
    # Roots split with np.array_split into 1 + len(part_seeds) parts; part p always uses
    # the search seeded for it, whether run here or by a helper process.
    torch.manual_seed(2)
    cfg = make_cfg(reanalyse_fraction=1.0).replace(search={"num_simulations": 32})
    rb = standard_buffer()
    model = build_model(cfg.model, (2,), A, frame_stack=1).eval()
    positions = np.array([0, 1, 2, 3, 4, 13, 14])
    frames = torch.from_numpy(rb.stacked_frames(positions))
    expected = np.concatenate([
        BatchedSearch.for_config(cfg, A, seed).run(model, part, add_noise=True).visit_counts
        for seed, part in zip([5, 11, 12], torch.tensor_split(frames, 3), strict=True)])

    here = Reanalyser(cfg, rb, A, seed=5, part_seeds=[11, 12])
    np.testing.assert_array_equal(here.search_visits(model, positions, target_step=0), expected)

    class Helpers:
        """Helper processes' searches, stood in by searches in this process."""

        def __init__(self) -> None:
            self.searches = {p: BatchedSearch.for_config(cfg, A, seed)
                             for p, seed in [(1, 11), (2, 12)]}
            self.sent: dict[int, tuple[int, np.ndarray]] = {}

        def send(self, part: int, target_step: int, obs: np.ndarray) -> None:
            self.sent[part] = (target_step, obs)

        def receive(self, part: int) -> np.ndarray:
            obs = torch.from_numpy(self.sent[part][1])
            return self.searches[part].run(model, obs, add_noise=True).visit_counts

    helpers = Helpers()
    away = Reanalyser(cfg, rb, A, seed=5, part_seeds=[11, 12], helpers=helpers)
    np.testing.assert_array_equal(away.search_visits(model, positions, target_step=40),
                                  expected)
    assert [(p, step, len(obs)) for p, (step, obs) in sorted(helpers.sent.items())] == [
        (1, 40, 2), (2, 40, 2)]  # 7 roots: parts of 3, 2 and 2
    # A different seed for a part gives different noise: the parts' seeds matter.
    other = Reanalyser(cfg, rb, A, seed=5, part_seeds=[11, 99])
    assert not np.array_equal(other.search_visits(model, positions, target_step=0), expected)
