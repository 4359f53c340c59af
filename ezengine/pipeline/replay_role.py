"""The reanalyse process: owns the replay, ingests the collectors' records, applies the
learner's priorities and builds training batches with the target model."""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

import numpy as np

from ezengine.batch import TrainingBatch
from ezengine.collector import finished_games
from ezengine.config import Config
from ezengine.model import EfficientZeroNet
from ezengine.pipeline.layouts import transition_layout
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transition_log import (
    ingest_record,
    log_path,
    rebuild_from_logs,
)
from ezengine.pipeline.transport import (
    POLL_S,
    attach,
    refresh,
    wait_for_version,
    write_unless_stopped,
)
from ezengine.reanalyse import Reanalyser
from ezengine.recipe import (
    build_network,
    build_replay,
    paced_training_steps,
    reanalyse_seed,
    recent_returns,
    sample_batch_positions,
    sampling_seed,
    total_training_steps,
)
from ezengine.rings import (
    Ring,
    RingClosed,
    SharedCounters,
    SharedWeights,
)


class ReplayWorker:
    """The replay and its reanalyser, fed by the collectors' transition rings.

    Runs in the reanalyse process (CPU target copy), or inside the learner process when
    the learner trains on CUDA, so that reanalysis inference runs on the GPU model.
    """

    def __init__(self, spec: PipelineSpec, cfg: Config, counters: SharedCounters) -> None:
        self.cfg = cfg
        self.counters = counters
        self.rings = [attach(Ring, s) for s in spec.transitions]
        self.open_rings = set(range(len(self.rings)))
        n = cfg.env.num_envs
        self.n = n
        self.replay = build_replay(cfg, spec.env, writers=spec.num_collectors * n)
        self.env_steps = [0] * spec.num_collectors
        self.recent = recent_returns()
        if spec.resume:
            self.env_steps = rebuild_from_logs(
                self.replay, [log_path(spec.run_dir, i) for i in range(spec.num_collectors)],
                transition_layout(cfg, spec.env), n, self.recent)
        self._publish_counts()
        self.reanalyser = Reanalyser(cfg, self.replay, spec.env.num_actions,
                                     seed=reanalyse_seed(cfg))
        self.rng = np.random.default_rng(sampling_seed(cfg))
        self.total_train = total_training_steps(cfg)

    @property
    def total_env_steps(self) -> int:
        return sum(self.env_steps)

    def _publish_counts(self) -> None:
        self.counters["replay_env_steps"] = self.total_env_steps
        self.counters["replay_positions"] = self.replay.size

    def ingest(self) -> bool:
        """Store at most one waiting record from each collector; whether any came."""
        busy = False
        for i in list(self.open_rings):
            try:
                with self.rings[i].try_read() as rec:
                    if rec is None:
                        continue
                    ingest_record(self.replay, rec, i, self.env_steps, self.n)
                    games = finished_games(rec)
            except RingClosed:
                self.open_rings.discard(i)
                continue
            busy = True
            self._publish_counts()
            if games:
                self.recent.extend(games)
                self.counters.add("games", len(games))
                self.counters["recent_return"] = float(np.mean(self.recent))
        return busy

    def batches_allowed(self) -> int:
        """Training batches the replay ratio allows at the current environment steps."""
        if self.replay.num_sampleable == 0:
            return 0
        return paced_training_steps(self.cfg, self.total_env_steps)

    def build(self, target: EfficientZeroNet, target_version: int) -> TrainingBatch:
        """Sample (beta annealed over training) and reanalyse one training batch."""
        sample = sample_batch_positions(self.cfg, self.replay, self.counters["train_steps"],
                                        self.rng)
        return self.reanalyser.build(target, sample, self.total_env_steps, target_version)


def run_reanalyse(spec: PipelineSpec) -> None:
    """Own the replay: store transitions, apply priorities, build training batches."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    worker = ReplayWorker(spec, cfg, counters)
    batches = attach(Ring, spec.batches)
    priorities = attach(Ring, spec.priorities)
    target_weights = attach(SharedWeights, spec.target_weights)
    target = build_network(cfg, spec.env)
    flat = np.empty(target_weights.spec.size, dtype=np.float32)
    loaded = 0
    slots = batches.spec.num_slots
    while not counters["stop"] and not counters["learner_done"]:
        busy = worker.ingest()
        with priorities.try_read() as upd:
            if upd is not None:
                worker.replay.update_priorities(np.array(upd["positions"]),
                                                np.array(upd["priorities"]))
                busy = True
        built, allowed = counters["batches"], worker.batches_allowed()
        # Build ahead of the learner by at most the ring's slots, never before data exists.
        if (allowed > 0 and built < min(allowed + slots, worker.total_train)
                and batches.fill() < slots):
            wait_for_version(target_weights, counters)
            loaded = refresh(target, target_weights, flat, loaded)
            batch = worker.build(target, counters["target_version"])

            def fill(slot: Any, batch: TrainingBatch = batch) -> None:
                for f in fields(batch):
                    slot[f.name][...] = getattr(batch, f.name)
            if not write_unless_stopped(batches, counters, fill):
                return
            counters.add("batches")
            busy = True
        if not busy:
            time.sleep(POLL_S)
