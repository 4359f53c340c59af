"""The search driver: connects the compiled batched MCTS to the model.

The tree (``ezengine_core.mcts.Forest``) never sees torch. This driver runs initial inference
for all roots, then once per simulation asks the tree which stored latent state to step from,
runs one batched recurrent inference on the model's device, and hands the scalar outputs
back. Latent states and LSTM states stay on the model's device in [S + 1, B, ...] tensors,
indexed by the slot numbers the tree returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ezengine.config import Config, SearchConfig
from ezengine.model import EfficientZeroNet
from ezengine.support import support_to_scalar
from ezengine_core.mcts import Forest


@dataclass
class SearchResult:
    """Outcome of one batched search over B roots.

    visit_counts: int32 [B, A], visits of each root child.
    root_values: float32 [B], mean backed-up value of each root (the stored root value).
    predicted_values: float32 [B], the model's value at each root before searching.
    """

    visit_counts: np.ndarray
    root_values: np.ndarray
    predicted_values: np.ndarray

    @staticmethod
    def layout(num_roots: int, num_actions: int) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(name, shape, dtype) of every field (the shared-memory layout of a result)."""
        return [("visit_counts", (num_roots, num_actions), np.dtype(np.int32)),
                ("root_values", (num_roots,), np.dtype(np.float32)),
                ("predicted_values", (num_roots,), np.dtype(np.float32))]

    def policies(self) -> np.ndarray:
        """float32 [B, A]: visit distributions N(a) / sum N, the policy targets."""
        return visit_distribution(self.visit_counts)


def visit_distribution(visit_counts: np.ndarray) -> np.ndarray:
    """float32 [B, A]: N(a) / sum N of visit counts [B, A] (all zero for an unvisited row)."""
    counts = visit_counts.astype(np.float32)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def select_actions(visit_counts: np.ndarray, temperature: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Actions int64 [B] from visit counts [B, A].

    temperature 0 takes the most visited action (the first on ties); otherwise samples
    a ~ N(a)^(1/temperature).
    """
    counts = np.asarray(visit_counts, dtype=np.float64)
    if temperature == 0:
        return counts.argmax(axis=1)
    # Power of counts scaled to max 1, so N^(1/T) cannot overflow for small T.
    p = (counts / counts.max(axis=1, keepdims=True)) ** (1.0 / temperature)
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    actions = (np.cumsum(p, axis=1) < u).sum(axis=1)
    return np.minimum(actions, p.shape[1] - 1)


def dirichlet_noise(rng: np.random.Generator, alpha: float, legal: np.ndarray) -> np.ndarray:
    """float32 [B, A]: Dirichlet(alpha) over each row's legal actions, 0 elsewhere."""
    g = rng.gamma(alpha, size=legal.shape) * legal
    # A row whose draws all underflowed to 0 (tiny alpha) falls back to uniform.
    sums = g.sum(axis=1, keepdims=True)
    g = np.where(sums > 0, g / np.where(sums > 0, sums, 1.0), legal / legal.sum(1, keepdims=True))
    return g.astype(np.float32)


class BatchedSearch:
    """MCTS over batches of observations with one model.

    Args:
        cfg: the search settings.
        num_actions: A.
        discount: per-step discount.
        value_prefix_horizon: the LSTM reset horizon (5 in the paper).
        seed: seeds the Dirichlet noise and the tree's tie-breaking.
    """

    def __init__(self, cfg: SearchConfig, num_actions: int, discount: float,
                 value_prefix_horizon: int, seed: int = 0) -> None:
        self.cfg = cfg
        self.num_actions = num_actions
        self.discount = discount
        self.horizon = value_prefix_horizon
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._forest: Forest | None = None
        self._forest_capacity = 0

    @classmethod
    def for_config(cls, cfg: Config, num_actions: int, seed: int) -> BatchedSearch:
        """The search a run's config describes: its search section, the learner's discount
        and value-prefix horizon. Every search of a run is built here."""
        return cls(cfg.search, num_actions, cfg.learner.discount,
                   cfg.learner.value_prefix_horizon, seed=seed)

    def _forest_for(self, batch: int) -> Forest:
        if self._forest is None or self._forest_capacity < batch:
            self._forest = Forest(
                batch, self.num_actions, self.cfg.num_simulations, discount=self.discount,
                c_init=self.cfg.c_init, c_base=self.cfg.c_base,
                value_delta_floor=self.cfg.value_delta_floor, horizon=self.horizon,
                seed=int(self.rng.integers(2**63)))
            self._forest_capacity = batch
        return self._forest

    @torch.inference_mode()
    def run(self, model: EfficientZeroNet, obs: Tensor, *, add_noise: bool,
            legal_actions: np.ndarray | None = None,
            noise_roots: np.ndarray | None = None) -> SearchResult:
        """Search from a batch of observations.

        Args:
            model: the network, in eval mode, on its device.
            obs: [B, ...] model input (stacked frames), already on the model's device.
            add_noise: mix Dirichlet noise into the root priors (self-play and reanalyse).
            legal_actions: bool [B, A] or None for all legal.
            noise_roots: with add_noise, bool [B]: the roots that take the noise (the others
                search as evaluation does); None for all. Noise is drawn for every root
                either way, so the random stream does not depend on it.
        """
        batch = obs.shape[0]
        device = obs.device
        support = model.support_size
        root = model.initial_inference(obs)
        predicted = support_to_scalar(root.value_logits, support)
        forest = self._forest_for(batch)
        legal = (np.ones((batch, self.num_actions), dtype=bool) if legal_actions is None
                 else np.asarray(legal_actions, dtype=bool))
        noise = (dirichlet_noise(self.rng, self.cfg.dirichlet_alpha, legal) if add_noise
                 else None)
        fraction = self.cfg.exploration_fraction if add_noise else 0.0
        if add_noise and noise_roots is not None:
            fraction = np.where(np.asarray(noise_roots, dtype=bool), fraction, 0.0)
        forest.reset_roots(root.policy_logits.float().cpu().numpy(), legal, noise,
                           noise_fraction=fraction)
        sims = self.cfg.num_simulations
        # [S + 1, B, ...] stores viewed as [(S + 1) * B, ...]: the tree's (slot, root) pairs
        # become flat row numbers for index_select, a cheaper gather than fancy indexing.
        latents = torch.empty((sims + 1, *root.latent.shape), dtype=root.latent.dtype,
                              device=device)
        latents[0] = root.latent
        hidden = torch.empty((sims + 1, batch, model.lstm_hidden), device=device)
        cell = torch.empty_like(hidden)
        hidden[0] = 0.0
        cell[0] = 0.0
        flat_latents = latents.view((sims + 1) * batch, *root.latent.shape[1:])
        flat_hidden = hidden.view((sims + 1) * batch, model.lstm_hidden)
        flat_cell = cell.view((sims + 1) * batch, model.lstm_hidden)
        rows = np.arange(batch, dtype=np.int64)
        for s in range(sims):
            slot, action, reset = forest.select()
            flat = torch.from_numpy(slot.astype(np.int64) * batch + rows).to(device,
                                                                             non_blocking=True)
            h = flat_hidden.index_select(0, flat)
            c = flat_cell.index_select(0, flat)
            if reset.any():
                # At a horizon reset point the value-prefix LSTM starts again from zeros.
                keep = torch.from_numpy(~reset).to(device, non_blocking=True).unsqueeze(1)
                h = h * keep
                c = c * keep
            out = model.recurrent_inference(
                flat_latents.index_select(0, flat), (h.unsqueeze(0), c.unsqueeze(0)),
                torch.from_numpy(action).to(device, torch.long, non_blocking=True))
            latents[s + 1] = out.latent
            hidden[s + 1] = out.lstm_state[0][0]
            cell[s + 1] = out.lstm_state[1][0]
            scalars = support_to_scalar(
                torch.stack([out.value_prefix_logits, out.value_logits]), support).cpu().numpy()
            forest.expand(scalars[0], scalars[1], out.policy_logits.float().cpu().numpy())
        return SearchResult(forest.visit_counts(), forest.root_values(),
                            predicted.float().cpu().numpy())
