"""Hand-computed checks of the scalar transform and the two-hot support."""

from __future__ import annotations

import pytest
import torch

from ezengine.support import (
    inverse_scalar_transform,
    scalar_to_support,
    scalar_transform,
    support_to_scalar,
)


def _old_wrong_h(x: torch.Tensor, eps: float = 0.001) -> torch.Tensor:
    # The paper-era formula: eps * x inside the sign product, i.e. +eps*|x| for x < 0.
    return torch.sign(x) * (torch.sqrt(x.abs() + 1) - 1 + eps * x)


def test_scalar_transform_hand_values() -> None:
    x = torch.tensor([3.0, -3.0, 0.0, 8.0, -8.0], dtype=torch.float64)
    # h(3)  =  (sqrt(4) - 1) + 0.001 * 3    =  1 + 0.003 =  1.003
    # h(-3) = -(sqrt(4) - 1) + 0.001 * (-3) = -1 - 0.003 = -1.003
    # h(0)  = 0
    # h(8)  =  (sqrt(9) - 1) + 0.008 =  2.008;  h(-8) = -2.008
    expected = torch.tensor([1.003, -1.003, 0.0, 2.008, -2.008], dtype=torch.float64)
    torch.testing.assert_close(scalar_transform(x), expected, rtol=0, atol=1e-12)


def test_scalar_transform_negative_differs_from_old_wrong_sign() -> None:
    x = torch.tensor([-3.0], dtype=torch.float64)
    # Old formula: -1 * (2 - 1 + 0.001 * (-3)) = -(1 - 0.003) = -0.997, the wrong answer.
    torch.testing.assert_close(_old_wrong_h(x), torch.tensor([-0.997], dtype=torch.float64))
    # Ours is -1.003; this line fails for the old formula.
    assert scalar_transform(x).item() == pytest.approx(-1.003, abs=1e-12)
    # h is odd: h(-x) == -h(x) for every x.
    xs = torch.linspace(-500, 500, 1001, dtype=torch.float64)
    torch.testing.assert_close(scalar_transform(-xs), -scalar_transform(xs))


def test_inverse_round_trip_float64() -> None:
    x = torch.tensor(
        [-1e6, -54321.5, -1000.0, -300.0, -3.0, -1.0, -0.01, 0.0, 0.01, 1.0, 3.0, 17.5, 1e4, 1e6],
        dtype=torch.float64,
    )
    torch.testing.assert_close(inverse_scalar_transform(scalar_transform(x)), x,
                               rtol=1e-10, atol=1e-10)
    y = torch.linspace(-300, 300, 6001, dtype=torch.float64)
    torch.testing.assert_close(scalar_transform(inverse_scalar_transform(y)), y,
                               rtol=1e-10, atol=1e-10)


def test_inverse_round_trip_float32_small_and_large() -> None:
    x = torch.tensor([-20000.0, -250.0, -1.0, -0.001, 0.0, 0.001, 0.5, 1.0, 250.0, 20000.0])
    back = inverse_scalar_transform(scalar_transform(x))
    assert back.dtype == torch.float32
    # float32 keeps ~7 digits; the stable rewrite of the inverse keeps small values exact
    # to ~1e-6 absolute instead of ~1e-4.
    torch.testing.assert_close(back, x, rtol=2e-5, atol=2e-6)


def test_inverse_of_old_wrong_forward_does_not_round_trip() -> None:
    # Guard that the inverse really is the inverse of the corrected h: feeding it the
    # old h(-1000) = -(sqrt(1001) - 1 - 1) = -29.64 does not give back -1000.
    x = torch.tensor([-1000.0], dtype=torch.float64)
    assert abs(inverse_scalar_transform(_old_wrong_h(x)).item() - (-1000.0)) > 50.0
    assert inverse_scalar_transform(scalar_transform(x)).item() == pytest.approx(-1000.0)


def test_two_hot_fractional_bin() -> None:
    # With eps = 0: h(10.56) = sqrt(11.56) - 1 = 3.4 - 1 = 2.4
    # -> floor 2, frac 0.4 -> 0.6 on bin 2 and 0.4 on bin 3.
    s = 5
    p = scalar_to_support(torch.tensor([10.56], dtype=torch.float64), s, eps=0.0)
    assert p.shape == (1, 2 * s + 1)
    expected = torch.zeros(2 * s + 1, dtype=torch.float64)
    expected[2 + s] = 0.6
    expected[3 + s] = 0.4
    torch.testing.assert_close(p[0], expected, rtol=0, atol=1e-12)
    # Same position via the default eps: the x whose h is 2.4 is found with the inverse.
    x = inverse_scalar_transform(torch.tensor([2.4], dtype=torch.float64))
    torch.testing.assert_close(scalar_to_support(x, s)[0], expected, rtol=0, atol=1e-9)


def test_two_hot_default_eps_positive_and_negative() -> None:
    s = 5
    p = scalar_to_support(torch.tensor([8.0, -8.0], dtype=torch.float64), s)
    # h(8) = 2.008: floor 2, frac 0.008 -> bin 2: 0.992, bin 3: 0.008.
    assert p[0, 2 + s].item() == pytest.approx(0.992, abs=1e-12)
    assert p[0, 3 + s].item() == pytest.approx(0.008, abs=1e-12)
    # h(-8) = -2.008: floor -3, frac -2.008 - (-3) = 0.992 -> bin -3: 0.008, bin -2: 0.992.
    # (The old wrong sign gives -1.992: bin -2: 0.992, bin -1: 0.008; bin -3 would be 0.)
    assert p[1, -3 + s].item() == pytest.approx(0.008, abs=1e-12)
    assert p[1, -2 + s].item() == pytest.approx(0.992, abs=1e-12)
    assert p[1, -1 + s].item() == 0.0
    torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))


def test_two_hot_integer_lands_on_one_bin() -> None:
    s = 5
    # eps = 0: h(3) = 1, h(-3) = -1, h(0) = 0, h(15) = sqrt(16) - 1 = 3: all integers.
    p = scalar_to_support(torch.tensor([3.0, -3.0, 0.0, 15.0]), s, eps=0.0)
    for row, bin_ in zip(p, [1, -1, 0, 3], strict=False):
        expected = torch.zeros(2 * s + 1)
        expected[bin_ + s] = 1.0
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-6)


def test_two_hot_clamps_at_support_edges() -> None:
    s = 5
    # h(1000) = sqrt(1001) - 1 + 1 = 31.64 > 5 -> clamp to 5 -> all weight on the last bin;
    # h(-1000) = -31.64 -> -5 -> first bin. h(24) = 4 + 0.024 = 4.024 stays inside.
    p = scalar_to_support(torch.tensor([1000.0, -1000.0, 24.0]), s)
    assert p[0, -1].item() == 1.0 and p[0].sum().item() == pytest.approx(1.0)
    assert p[1, 0].item() == 1.0 and p[1].sum().item() == pytest.approx(1.0)
    assert p[2, 4 + s].item() == pytest.approx(0.976, abs=1e-5)
    assert p[2, 5 + s].item() == pytest.approx(0.024, abs=1e-5)


def test_two_hot_batch_shape_and_integer_input() -> None:
    x = torch.tensor([[0, 1, -1], [5, -5, 300]], dtype=torch.int64)
    p = scalar_to_support(x, 300)
    assert p.shape == (2, 3, 601) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3))


def test_support_to_scalar_recovers_two_hot_value() -> None:
    s = 300
    x = torch.tensor([-12345.0, -250.0, -8.0, -1.0, 0.0, 0.3, 1.0, 8.0, 77.7, 4000.0],
                     dtype=torch.float64)
    probs = scalar_to_support(x, s)
    # The log of two-hot probabilities with a floor is a valid logit vector whose softmax
    # is the two-hot plus 1e-12 per bin (601e-12 total), and the expectation over the
    # support of a two-hot is exactly clamp(h(x)), so the inverse gives x back.
    logits = torch.log(probs.clamp_min(1e-12))
    torch.testing.assert_close(support_to_scalar(logits, s), x, rtol=1e-6, atol=1e-6)
    # float32 path.
    out32 = support_to_scalar(logits.float(), s)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, x.float(), rtol=1e-4, atol=1e-3)


def test_support_to_scalar_uniform_and_zero_logits_is_zero() -> None:
    # Zero logits (a zero-initialised head) -> uniform over a symmetric support -> 0.
    assert support_to_scalar(torch.zeros(3, 21), 10).abs().max().item() < 1e-6


def test_support_to_scalar_is_differentiable_and_checks_width() -> None:
    logits = torch.randn(4, 21, requires_grad=True)
    support_to_scalar(logits, 10).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        support_to_scalar(torch.zeros(2, 20), 10)
