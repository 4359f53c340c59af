"""The compiled sum-tree against numpy brute force."""
import numpy as np
import pytest

from ezengine_core.sumtree import SumTree


def brute_force_sample(p_alpha: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Stratified inverse-CDF sampling over p**alpha with numpy."""
    cdf = np.cumsum(p_alpha)
    targets = (np.arange(len(uniforms)) + uniforms) * (cdf[-1] / len(uniforms))
    return np.searchsorted(cdf, targets, side="right")


@pytest.mark.parametrize("capacity", [1, 5, 64, 1000])
def test_totals_min_and_sampling_match_brute_force(capacity):
    rng = np.random.default_rng(capacity)
    tree = SumTree(capacity, alpha=0.6)
    p = np.zeros(capacity)
    for _ in range(5):
        idx = rng.integers(0, capacity, size=rng.integers(1, 40))
        pri = rng.uniform(0.01, 5.0, size=idx.size)
        tree.update(idx, pri)
        for i, v in zip(idx, pri, strict=False):  # with repeats the last value wins
            p[i] = v
        p_alpha = np.where(p > 0, p ** 0.6, 0.0)
        assert tree.total == pytest.approx(p_alpha.sum(), rel=1e-12)
        assert tree.min == pytest.approx(p_alpha[p > 0].min(), rel=1e-12)
        assert tree.max_priority == pytest.approx(p.max(), rel=1e-9)
        np.testing.assert_allclose(tree.get(np.arange(capacity)), p_alpha, rtol=1e-12)
        u = rng.random(256)
        got, got_p = tree.sample(u)
        expected = brute_force_sample(p_alpha, u)
        # Rounding may move a draw sitting exactly on a boundary; never onto an empty item.
        assert (got == expected).mean() > 0.99
        assert (p[got] > 0).all()
        np.testing.assert_allclose(got_p, p_alpha[got])


def test_sampling_frequencies_follow_priorities():
    tree = SumTree(4, alpha=1.0)
    tree.update(np.array([0, 1, 3]), np.array([1.0, 2.0, 7.0]))
    rng = np.random.default_rng(0)
    idx, _ = tree.sample(rng.random(100_000))
    freq = np.bincount(idx, minlength=4) / idx.size
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.0, 0.7], atol=0.005)


def test_stratified_draws_cover_each_stratum():
    tree = SumTree(8, alpha=1.0)
    tree.update(np.arange(8), np.ones(8))
    idx, _ = tree.sample(np.full(8, 0.5))
    np.testing.assert_array_equal(idx, np.arange(8))


def test_cleared_items_leave_min_and_max():
    tree = SumTree(8, alpha=0.5)
    tree.update(np.array([1, 2, 5]), np.array([4.0, 9.0, 1.0]))
    tree.clear(np.array([2, 5]))
    assert tree.total == pytest.approx(2.0)  # 4 ** 0.5
    assert tree.min == pytest.approx(2.0) and tree.max_priority == pytest.approx(4.0)
    tree.clear(np.array([1]))
    assert tree.total == 0.0 and tree.min == np.inf and tree.max_priority == 0.0


def test_edges_of_the_mass_never_land_on_empty_items():
    tree = SumTree(1000, alpha=1.0)
    tree.update(np.array([3, 500]), np.array([1e-6, 1e6]))
    idx, _ = tree.sample(np.array([0.0, 1.0 - 1e-16]))
    assert set(idx.tolist()) <= {3, 500}


@pytest.mark.parametrize("call,match", [
    (lambda t: t.update(np.array([10]), np.array([1.0])), "capacity is 10"),
    (lambda t: t.update(np.array([-1]), np.array([1.0])), "indices"),
    (lambda t: t.update(np.array([1.5]), np.array([1.0])), "integer"),
    (lambda t: t.update(np.array([1]), np.array([np.nan])), "priorities"),
    (lambda t: t.update(np.array([1]), np.array([0.0])), "priorities"),
    (lambda t: t.update(np.array([1, 2]), np.array([1.0])), "shape"),
    (lambda t: t.sample(np.array([0.5])), "no item"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(SumTree(10))


def test_uniforms_out_of_range():
    tree = SumTree(10)
    tree.update(np.array([1]), np.array([1.0]))
    with pytest.raises(ValueError, match="uniforms"):
        tree.sample(np.array([1.0]))


def test_grow_carries_every_stored_value_over_exactly():
    tree, fresh = SumTree(5, alpha=0.6), SumTree(100, alpha=0.6)
    for t in (tree, fresh):
        t.update(np.array([0, 1, 2, 4]), np.array([3.0, 1e-3, 7.0, 0.5]))
        t.clear(np.array([2]))
    before = tree.get(np.arange(5))
    tree.grow(13)
    tree.grow(100)
    assert tree.capacity == 100
    # p**alpha is copied, not recomputed from p, so nothing moves by a rounding step.
    np.testing.assert_array_equal(tree.get(np.arange(5)), before)
    np.testing.assert_array_equal(tree.get(np.arange(100)), fresh.get(np.arange(100)))
    assert (tree.total, tree.min, tree.max_priority) == (
        fresh.total, fresh.min, fresh.max_priority)
    tree.update(np.array([99]), np.array([5.0]))  # the new items work like the old ones
    fresh.update(np.array([99]), np.array([5.0]))
    assert tree.total == fresh.total
    u = np.random.default_rng(0).random(64)
    np.testing.assert_array_equal(tree.sample(u)[0], fresh.sample(u)[0])
    with pytest.raises(ValueError, match="shrink"):
        tree.grow(50)
