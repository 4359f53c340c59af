"""Shared-memory layouts of what the rings carry, each derived from the dataclass it carries
(TrainingBatch, SearchResult, a collector's transition record)."""

from __future__ import annotations

import numpy as np

from ezengine.batch import TrainingBatch
from ezengine.collector import transition_fields
from ezengine.config import Config
from ezengine.envs import EnvDescription
from ezengine.frames import stacked_shape
from ezengine.search import SearchResult

Layout = list[tuple[str, tuple[int, ...], np.dtype]]


def search_request_layout(cfg: Config, env: EnvDescription) -> Layout:
    """A collector's search request to the model owner: its N stacked observations."""
    shape = stacked_shape(env.frame_shape, cfg.env.frame_stack)
    return [("obs", (cfg.env.num_envs, *shape), np.dtype(env.frame_dtype))]


def search_result_layout(cfg: Config, env: EnvDescription) -> Layout:
    """The model owner's answer: a SearchResult for N roots."""
    return SearchResult.layout(cfg.env.num_envs, env.num_actions)


def batch_layout(cfg: Config, env: EnvDescription) -> Layout:
    """A TrainingBatch of this config."""
    return TrainingBatch.layout(cfg.learner.batch_size, cfg.learner.unroll_steps,
                                cfg.env.frame_stack, env.frame_shape, env.frame_dtype,
                                env.num_actions)


def transition_layout(cfg: Config, env: EnvDescription) -> Layout:
    """One collector's transition record (its N environments' step)."""
    return transition_fields(cfg.env.num_envs, env.frame_shape, np.dtype(env.frame_dtype),
                             env.num_actions)


def priority_layout(cfg: Config) -> Layout:
    """New priorities of a trained batch's positions and the training step that made them,
    learner -> reanalyse."""
    b = cfg.learner.batch_size
    return [("step", (1,), np.dtype(np.int64)), ("positions", (b,), np.dtype(np.int64)),
            ("priorities", (b,), np.dtype(np.float64))]
