"""The compiled batched MCTS: hand-computed searches, the pure-Python reference, bad input."""
import math

import numpy as np
import pytest
from reference_search import reference_search

from ezengine_core.mcts import Forest

PB_BASE = 19652.0


def pb(n_p: float) -> float:
    """The pUCT exploration factor before the prior and 1/(1+N) terms."""
    return (1.25 + math.log((n_p + PB_BASE + 1.0) / PB_BASE)) * math.sqrt(n_p)


def run_core(root_logits, legal, noise, fraction, leaf_vp, leaf_v, leaf_logits, *,
             discount, horizon=5, seed=0, floor=0.01):
    S, B = leaf_v.shape
    A = root_logits.shape[1]
    forest = Forest(B, A, S, discount=discount, horizon=horizon, seed=seed,
                    value_delta_floor=floor)
    forest.reset_roots(root_logits, legal, noise, noise_fraction=fraction)
    for s in range(S):
        slot, _action, _reset = forest.select()
        assert (slot <= s).all()
        forest.expand(leaf_vp[s], leaf_v[s], leaf_logits[s])
    return forest.visit_counts(), forest.root_values(), forest.node_depths()


def random_workload(rng, B, A, S, *, legal_p=1.0, noise=True, quantize=False):
    root_logits = rng.standard_normal((B, A)).astype(np.float32)
    legal = None
    if legal_p < 1.0:
        legal = rng.random((B, A)) < legal_p
        legal[np.arange(B), rng.integers(0, A, B)] = True
    noise_arr = rng.dirichlet([0.3] * A, size=B).astype(np.float32) if noise else None
    leaf_vp = rng.uniform(-1, 1, (S, B)).astype(np.float32)
    leaf_v = rng.uniform(-1, 1, (S, B)).astype(np.float32)
    leaf_logits = rng.standard_normal((S, B, A)).astype(np.float32)
    if quantize:
        # Coarse values create many exact ties in Q and prior, exercising tie-breaking.
        root_logits = np.round(root_logits).astype(np.float32)
        leaf_vp = np.round(leaf_vp * 2) / 2
        leaf_v = np.round(leaf_v * 2) / 2
        leaf_logits = np.zeros_like(leaf_logits)
    return root_logits, legal, noise_arr, leaf_vp, leaf_v, leaf_logits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B,A", [(1, 2), (7, 2), (16, 18), (64, 18), (3, 5)])
@pytest.mark.parametrize("variant", ["plain", "illegal", "ties", "horizon2"])
def test_core_matches_reference(seed, B, A, variant):
    rng = np.random.default_rng(1000 * seed + 10 * B + A)
    S = 30 if B <= 16 else 12
    work = random_workload(rng, B, A, S, legal_p=0.6 if variant == "illegal" else 1.0,
                           quantize=variant == "ties")
    root_logits, legal, noise, vp, v, lg = work
    kwargs = {"discount": 0.97, "horizon": 2 if variant == "horizon2" else 5, "seed": seed}
    counts, values, depths = run_core(root_logits, legal, noise, 0.25, vp, v, lg, **kwargs)
    ref_counts, ref_values, ref_depths = reference_search(
        root_logits, legal, noise, 0.25, vp, v, lg, **kwargs)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(depths, ref_depths)
    np.testing.assert_allclose(values, ref_values, rtol=1e-6, atol=1e-6)
    assert (counts.sum(axis=1) == S).all()
    if legal is not None:
        assert (counts[~legal] == 0).all()


def test_chain_value_prefix_rewards_with_horizon_resets():
    """One action: the tree is a chain, so every number can be written down by hand."""
    gamma = 0.5
    forest = Forest(1, 1, 3, discount=gamma, horizon=2)
    forest.reset_roots(np.zeros((1, 1), np.float32))
    vp = [1.0, 3.0, 0.5]
    v = [2.0, -1.0, 4.0]
    expected_slots = [0, 1, 2]
    expected_reset = [True, False, True]  # depth 0 and depth 2 are reset points (horizon 2)
    for s in range(3):
        slot, action, reset = forest.select()
        assert slot[0] == expected_slots[s] and action[0] == 0 and reset[0] == expected_reset[s]
        forest.expand(np.array([vp[s]], np.float32), np.array([v[s]], np.float32),
                      np.zeros((1, 1), np.float32))
    # Edge rewards: root->d1 = 1 (root resets); d1->d2 = 3 - 1 = 2; d2->d3 = 0.5 (d2 resets).
    g1 = 1 + gamma * 2.0
    g2 = 1 + gamma * (2 + gamma * -1.0)
    g3 = 1 + gamma * (2 + gamma * (0.5 + gamma * 4.0))
    assert forest.root_values()[0] == pytest.approx((g1 + g2 + g3) / 3)
    assert forest.visit_counts()[0, 0] == 3
    np.testing.assert_array_equal(forest.node_depths(), [[1, 2, 3]])


def test_puct_min_max_and_mean_q_by_hand():
    """Two equal-prior actions; every selection after the first tie is computed by hand."""
    gamma = 0.9
    forest = Forest(1, 2, 4, discount=gamma, horizon=5)
    forest.reset_roots(np.zeros((1, 2), np.float32))

    def step(vp, v):
        forest.expand(np.array([vp], np.float32), np.array([v], np.float32),
                      np.zeros((1, 2), np.float32))

    slot, action, _ = forest.select()  # all scores tie at 0: a random pick
    a = int(action[0])
    o = 1 - a
    step(1.0, 2.0)  # Q_a = 1 + 0.9 * 2 = 2.8; stats [2.8, 2.8]
    # Sim 2: score_a = norm(2.8) + 0.5 pb(1) / 2 = 0 + 0.3125; score_o = norm(mean 2.8) + 0.5 pb(1).
    slot, action, _ = forest.select()
    assert (slot[0], action[0]) == (0, o)
    step(0.5, -1.0)  # Q_o = 0.5 - 0.9 = -0.4; stats [-0.4, 2.8]
    assert forest.root_values()[0] == pytest.approx((2.8 - 0.4) / 2)
    # Sim 3: score_a = 1 + 0.5 pb(2) / 2 beats score_o = 0 + 0.5 pb(2) / 2: descend into a,
    # whose children are all unvisited (another tie).
    slot, action, reset = forest.select()
    assert slot[0] == 1 and not reset[0]
    c = int(action[0])
    step(1.5, 1.0)  # r = 1.5 - 1.0 = 0.5; Q_c = 0.5 + 0.9 = 1.4; node a: V = (2 + 1.4) / 2
    q_a = 1.0 + gamma * 1.7
    assert forest.root_values()[0] == pytest.approx((2.8 - 0.4 + (1 + gamma * 1.4)) / 3)
    # Sim 4 at the root: min/max are the values seen so far (-0.4, 2.8), not the current ones.
    score_a = (q_a + 0.4) / 3.2 + 0.5 * pb(3) / 3
    score_o = 0.0 + 0.5 * pb(3) / 2
    assert score_a > score_o
    # At node a: mean Q = (root mean Q + Q_c) / 2, with root mean Q = (Q_a + Q_o) / 2.
    mean_q_a = ((q_a - 0.4) / 2 + 1.4) / 2
    score_c = (1.4 + 0.4) / 3.2 + 0.5 * pb(1) / 2
    score_d = (mean_q_a + 0.4) / 3.2 + 0.5 * pb(1)
    assert score_d > score_c  # would flip if unvisited children scored 0 below the root
    slot, action, _ = forest.select()
    assert (slot[0], action[0]) == (1, 1 - c)


def test_noise_of_one_root_never_reaches_another():
    rng = np.random.default_rng(5)
    root_logits, _, noise, vp, v, lg = random_workload(rng, 6, 18, 25)
    counts, values, _ = run_core(root_logits, None, noise, 0.25, vp, v, lg, discount=0.99)
    # Change everything about roots 1..5 (logits, noise, leaf outputs); root 0 must not notice.
    other = random_workload(np.random.default_rng(6), 6, 18, 25)
    root_logits2, noise2, vp2, v2, lg2 = (x.copy() for x in (other[0], other[2], *other[3:]))
    root_logits2[0], noise2[0], vp2[:, 0], v2[:, 0], lg2[:, 0] = (
        root_logits[0], noise[0], vp[:, 0], v[:, 0], lg[:, 0])
    counts2, values2, _ = run_core(root_logits2, None, noise2, 0.25, vp2, v2, lg2, discount=0.99)
    np.testing.assert_array_equal(counts[0], counts2[0])
    assert values[0] == values2[0]
    assert not np.array_equal(counts[1:], counts2[1:])


def test_noise_changes_the_search_and_illegal_actions_are_never_visited():
    rng = np.random.default_rng(7)
    root_logits, _, noise, vp, v, lg = random_workload(rng, 32, 18, 40)
    legal = np.ones((32, 18), bool)
    legal[:, ::3] = False
    noise[~legal] = 0
    plain, _, _ = run_core(root_logits, legal, None, 0.0, vp, v, lg, discount=0.99)
    noisy, _, _ = run_core(root_logits, legal, noise, 0.25, vp, v, lg, discount=0.99)
    assert not np.array_equal(plain, noisy)
    assert (plain[:, ::3] == 0).all() and (noisy[:, ::3] == 0).all()


def test_a_per_root_noise_fraction_of_zero_leaves_that_roots_search_noise_free():
    """noise_fraction as float [B]: a root at 0 searches exactly as without noise, a root at
    f exactly as with the scalar f, and both as the pure-Python reference does."""
    rng = np.random.default_rng(9)
    root_logits, _, noise, vp, v, lg = random_workload(rng, 8, 3, 16)
    fractions = np.array([0.0, 0.25] * 4)
    mixed, mixed_values, _ = run_core(root_logits, None, noise, fractions, vp, v, lg,
                                      discount=0.99)
    plain, _, _ = run_core(root_logits, None, None, 0.0, vp, v, lg, discount=0.99)
    noisy, _, _ = run_core(root_logits, None, noise, 0.25, vp, v, lg, discount=0.99)
    np.testing.assert_array_equal(mixed[::2], plain[::2])
    np.testing.assert_array_equal(mixed[1::2], noisy[1::2])
    assert not np.array_equal(plain[1::2], noisy[1::2])  # the noise did change those roots
    ref_counts, ref_values, _ = reference_search(root_logits, None, noise, fractions, vp, v, lg,
                                                 discount=0.99)
    np.testing.assert_array_equal(mixed, ref_counts)
    np.testing.assert_allclose(mixed_values, ref_values, rtol=1e-6, atol=1e-6)


def test_same_seed_same_search_different_seed_different_ties():
    rng = np.random.default_rng(8)
    work = random_workload(rng, 32, 18, 30, quantize=True)
    a = run_core(*work[:3], 0.25, *work[3:], discount=0.99, seed=1)[0]
    b = run_core(*work[:3], 0.25, *work[3:], discount=0.99, seed=1)[0]
    c = run_core(*work[:3], 0.25, *work[3:], discount=0.99, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def ready_forest(B=4, A=3):
    forest = Forest(B, A, 5, discount=0.99)
    forest.reset_roots(np.zeros((B, A), np.float32))
    return forest


@pytest.mark.parametrize("call,match", [
    (lambda f: f.reset_roots(np.zeros((4, 2), np.float32)), "root_logits"),
    (lambda f: f.reset_roots(np.zeros((9, 3), np.float32)), "root_logits batch"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.int64)), "root_logits"),
    (lambda f: f.reset_roots(np.full((4, 3), np.nan, np.float32)), "root_logits"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.float32), np.zeros((4, 3), bool)),
     "legal_actions"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.float32), np.ones((4, 2), bool)),
     "legal_actions"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.float32), None, -np.ones((4, 3), np.float32),
                             0.25), "noise"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.float32), None, np.ones((4, 3), np.float32),
                             1.5), "noise_fraction"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.float32), None, np.ones((4, 3), np.float32),
                             np.full(3, 0.25)), "noise_fraction"),
    (lambda f: f.reset_roots(np.zeros((4, 3), np.float32), None, np.ones((4, 3), np.float32),
                             np.array([0.25, 0.25, -0.1, 0.25])), "noise_fraction"),
    (lambda f: f.expand(np.zeros(4, np.float32), np.zeros(4, np.float32),
                        np.zeros((4, 3), np.float32)), "without a preceding select"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(ready_forest())


@pytest.mark.parametrize("args,match", [
    ((np.zeros(3, np.float32), np.zeros(4, np.float32), np.zeros((4, 3), np.float32)),
     "value_prefix"),
    ((np.zeros(4, np.float32), np.array([0, 0, np.inf, 0], np.float32),
      np.zeros((4, 3), np.float32)), "value"),
    ((np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros((4, 4), np.float32)),
     "policy_logits"),
])
def test_bad_expand_input_raises_and_leaves_the_tree_usable(args, match):
    forest = ready_forest()
    forest.select()
    with pytest.raises(ValueError, match=match):
        forest.expand(*args)
    forest.expand(np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros((4, 3), np.float32))
    assert (forest.visit_counts().sum(axis=1) == 1).all()


def test_select_protocol_errors():
    forest = ready_forest()
    forest.select()
    with pytest.raises(ValueError, match="twice"):
        forest.select()
    with pytest.raises(ValueError, match="before reset_roots"):
        Forest(2, 2, 2, discount=0.9).select()
    with pytest.raises(ValueError, match="discount"):
        Forest(2, 2, 2, discount=1.5)
    one = Forest(1, 2, 1, discount=0.9)
    one.reset_roots(np.zeros((1, 2), np.float32))
    one.select()
    one.expand(np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="simulations"):
        one.select()
