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


def reanalysis_part_size(cfg: Config) -> int:
    """The most roots one part of a batch's re-searched roots can hold (np.array_split's
    largest part of every position of a batch)."""
    roots = cfg.learner.batch_size * (cfg.learner.unroll_steps + 1)
    return -(-roots // cfg.run.reanalysers)


def reanalysis_job_layout(cfg: Config, env: EnvDescription) -> Layout:
    """The replay owner's job for a reanalyse helper: the target weights' training step and
    up to reanalysis_part_size stacked observations (`count` of them used)."""
    shape = stacked_shape(env.frame_shape, cfg.env.frame_stack)
    return [("target_step", (1,), np.dtype(np.int64)), ("count", (1,), np.dtype(np.int64)),
            ("obs", (reanalysis_part_size(cfg), *shape), np.dtype(env.frame_dtype))]


def reanalysis_result_layout(cfg: Config, env: EnvDescription) -> Layout:
    """A helper's answer: the visit counts of its job's roots (the job's `count` rows)."""
    return [("count", (1,), np.dtype(np.int64)),
            ("visit_counts", (reanalysis_part_size(cfg), env.num_actions), np.dtype(np.int32))]
