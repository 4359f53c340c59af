"""The search driver (search.py): each root's search is its own.

The driver keeps every root's latent and LSTM states in shared [S + 1, B, ...] stores and
gathers them by the (slot, root) pairs the tree hands back; a gather that mixed roots up, or
an LSTM state carried across a value-prefix reset of another root, would make a root's
search depend on the other roots of its batch. So changing some roots' observations must
leave the others' searches exactly as they were (same batch size and root positions: the
same arithmetic and the same tie-breaking streams).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ezengine.config import Config
from ezengine.model import build_model
from ezengine.search import BatchedSearch

A = 3


def make_cfg(horizon: int) -> Config:
    model = dict(kind="mlp", latent_dim=8, hidden_dim=16, lstm_hidden=8, head_hidden=(8,),
                 support_size=5, projection_hidden=16, projection_dim=16,
                 projection_head_hidden=8, norm="layer")
    return Config().replace(env={"kind": "gym"}, model=model,
                            search={"num_simulations": 30},
                            learner={"discount": 0.97, "value_prefix_horizon": horizon})


@pytest.mark.parametrize("horizon", [2, 5])
def test_a_roots_search_does_not_depend_on_the_other_roots(horizon: int) -> None:
    cfg = make_cfg(horizon)
    torch.manual_seed(3)
    model = build_model(cfg.model, (4,), A, 1).eval()
    with torch.no_grad():  # the heads start at zero: give every output some shape
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    obs = torch.randn(8, 4)
    changed = obs.clone()
    changed[::2] = torch.randn(4, 4)
    first = BatchedSearch.for_config(cfg, A, seed=0).run(model, obs, add_noise=False)
    second = BatchedSearch.for_config(cfg, A, seed=0).run(model, changed, add_noise=False)
    np.testing.assert_array_equal(first.visit_counts[1::2], second.visit_counts[1::2])
    np.testing.assert_array_equal(first.root_values[1::2], second.root_values[1::2])
    # The changed roots searched differently, and the searches went deep (several visits
    # to more than one child), past the value-prefix resets.
    assert not np.array_equal(first.visit_counts[::2], second.visit_counts[::2])
    assert (np.sort(first.visit_counts, axis=1)[:, -2] >= 3).any()


def test_roots_left_out_of_the_noise_search_as_evaluation_does() -> None:
    """noise_roots: the roots it leaves out search exactly as a noise-free search of the same
    observations; the others take the noise (the collectors' greedy environments with
    run.greedy_env_noise off)."""
    cfg = make_cfg(5)
    torch.manual_seed(4)
    model = build_model(cfg.model, (4,), A, 1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    obs = torch.randn(8, 4)
    roots = np.array([False] * 4 + [True] * 4)
    quiet = BatchedSearch.for_config(cfg, A, seed=0).run(model, obs, add_noise=False)
    noisy = BatchedSearch.for_config(cfg, A, seed=0).run(model, obs, add_noise=True)
    mixed = BatchedSearch.for_config(cfg, A, seed=0).run(model, obs, add_noise=True,
                                                         noise_roots=roots)
    np.testing.assert_array_equal(mixed.visit_counts[:4], quiet.visit_counts[:4])
    np.testing.assert_array_equal(mixed.visit_counts[4:], noisy.visit_counts[4:])
    assert not np.array_equal(quiet.visit_counts[4:], noisy.visit_counts[4:])
