"""Scalar <-> categorical support conversions for value and value-prefix heads.

EfficientZero predicts values and value prefixes as logits over the integer support
-S..S on a squashed scale h(x), as in MuZero. Everything here is torch, works on any
leading batch shape, and keeps gradients where they are meaningful.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_EPS = 0.001


def _as_float(x: Tensor) -> Tensor:
    # Integer targets (e.g. clipped rewards stored as int8) and half-precision logits
    # under autocast both need at least float32: h() and its inverse lose too many
    # digits in fp16 to round-trip values in the hundreds.
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def scalar_transform(x: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """h(x) = sign(x) * (sqrt(|x| + 1) - 1) + eps * x, elementwise.

    x: any shape, any real dtype; returns float32 (float64 if x is float64), same shape.
    h is odd, so h(-x) == -h(x); the eps term is eps * x, not eps * |x|.
    """
    x = _as_float(x)
    return torch.sign(x) * (torch.sqrt(x.abs() + 1.0) - 1.0) + eps * x


def inverse_scalar_transform(y: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Exact inverse of :func:`scalar_transform`, elementwise.

    Computes sign(y) * (((sqrt(1 + 4 eps (|y| + 1 + eps)) - 1) / (2 eps))^2 - 1).
    y: any shape; returns float32 (float64 if y is float64), same shape.
    """
    y = _as_float(y)
    a = 4.0 * eps * (y.abs() + 1.0 + eps)
    # (sqrt(1 + a) - 1) / (2 eps) rewritten as a / (2 eps (sqrt(1 + a) + 1)): the same
    # number, but without the cancellation that costs float32 about four digits when
    # |y| is small (sqrt(1 + a) is then ~1.002).
    u = a / (2.0 * eps * (torch.sqrt(1.0 + a) + 1.0))
    return torch.sign(y) * (u * u - 1.0)


def scalar_to_support(x: Tensor, support_size: int, eps: float = DEFAULT_EPS) -> Tensor:
    """Two-hot projection of scalar targets onto the support -S..S.

    x: [...] any real dtype. Returns [..., 2 * support_size + 1] float32 (float64 for
    float64 input); each row sums to 1. y = clamp(h(x), -S, S) puts weight
    1 - (y - floor(y)) on bin floor(y) and y - floor(y) on bin floor(y) + 1, so an
    integer y puts all its weight on its own bin.
    """
    y = scalar_transform(x, eps).clamp(-support_size, support_size)
    low = torch.floor(y)
    frac = y - low
    low_idx = (low + support_size).long()
    # At y == S the upper bin would be 2S + 1 (off the end); its weight is exactly 0
    # there, so pointing it at the last bin and scatter-adding is harmless.
    high_idx = (low_idx + 1).clamp(max=2 * support_size)
    out = torch.zeros(*y.shape, 2 * support_size + 1, dtype=y.dtype, device=y.device)
    out.scatter_add_(-1, low_idx.unsqueeze(-1), (1.0 - frac).unsqueeze(-1))
    out.scatter_add_(-1, high_idx.unsqueeze(-1), frac.unsqueeze(-1))
    return out


def support_to_scalar(logits: Tensor, support_size: int, eps: float = DEFAULT_EPS) -> Tensor:
    """Scalar value of categorical logits: h^-1(E_softmax(logits)[support]).

    logits: [..., 2 * support_size + 1]. Returns [...] float32 (float64 for float64
    input). Differentiable in the logits.
    """
    if logits.shape[-1] != 2 * support_size + 1:
        raise ValueError(
            f"logits last dim {logits.shape[-1]} != 2 * support_size + 1 = {2 * support_size + 1}"
        )
    logits = _as_float(logits)
    probs = torch.softmax(logits, dim=-1)
    support = torch.arange(
        -support_size, support_size + 1, dtype=logits.dtype, device=logits.device
    )
    return inverse_scalar_transform((probs * support).sum(dim=-1), eps)
