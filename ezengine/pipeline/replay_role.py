"""The reanalyse role: owns the replay, ingests the collectors' records in turn, applies
the learner's priorities and builds training batches with the target model, on the
timetable of recipe.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.collector import finished_games
from ezengine.config import Config
from ezengine.envs import EnvDescription
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
    Closed,
    CpuClock,
    Stopped,
    Timeout,
    Transport,
)
from ezengine.reanalyse import HelperSearches, Reanalyser
from ezengine.recipe import (
    BATCH_LEAD,
    build_network,
    build_replay,
    paced_training_steps,
    reanalysis_part_seed,
    recent_returns,
    sample_batch_positions,
    sampling_seed,
    total_training_steps,
)
from ezengine.search import BatchedSearch


class ReplayOwner:
    """The replay, its reanalyser and the order of their work, without any transport: the
    pipeline's reanalyse process and the serial runner both drive one.

    Records enter in turn (`next_collector`); batch s is due once the records in the replay
    allow it (`batch_due`), and is built with the priorities of training steps up to
    s - BATCH_LEAD applied (`apply_priorities`) and the target weights of that step.

    Args:
        cfg: the resolved config.
        env: the environment's description.
        num_collectors: how many collectors feed the replay.
        trained: training steps already done (a resumed run's checkpoint).
        helpers: the reanalyse helpers' searches (None: every part searched here).
    """

    def __init__(self, cfg: Config, env: EnvDescription, num_collectors: int,
                 trained: int = 0, helpers: HelperSearches | None = None) -> None:
        self.cfg = cfg
        self.env = env
        self.n = cfg.env.num_envs
        self.replay = build_replay(cfg, env, writers=num_collectors * self.n)
        self.env_steps = [0] * num_collectors
        self.recent = recent_returns()
        self.reanalyser = Reanalyser(
            cfg, self.replay, env.num_actions, seed=reanalysis_part_seed(cfg, 0),
            part_seeds=[reanalysis_part_seed(cfg, p) for p in range(1, cfg.run.reanalysers)],
            helpers=helpers)
        self.rng = np.random.default_rng(sampling_seed(cfg))
        self.total_train = total_training_steps(cfg)
        self.next_batch = trained + 1
        self.priorities_through = trained

    @property
    def total_env_steps(self) -> int:
        return sum(self.env_steps)

    def rebuild(self, run_dir: str | Path) -> None:
        """Refill the replay from the collectors' logs in `run_dir` (a resumed run)."""
        self.env_steps = rebuild_from_logs(
            self.replay, [log_path(run_dir, i) for i in range(len(self.env_steps))],
            transition_layout(self.cfg, self.env), self.n, self.recent)

    def next_collector(self) -> int:
        """The collector whose record enters next: the one with the fewest env steps."""
        return int(np.argmin(self.env_steps))

    def ingest(self, record: Any, collector: int) -> list[float]:
        """Store one record of `collector`; returns the scores of the games it finished."""
        ingest_record(self.replay, record, collector, self.env_steps, self.n)
        games = finished_games(record)
        self.recent.extend(games)
        return games

    def batch_due(self) -> bool:
        """Whether the records in the replay allow the next batch."""
        return (self.replay.num_sampleable > 0 and self.next_batch <= self.total_train
                and self.next_batch <= paced_training_steps(self.cfg, self.total_env_steps))

    @property
    def lead_step(self) -> int:
        """The training step whose priorities and target weights the next batch sees."""
        return self.next_batch - BATCH_LEAD

    def apply_priorities(self, step: int, positions: np.ndarray, priorities: np.ndarray
                         ) -> None:
        """The priorities training `step` computed; steps arrive in order."""
        if step != self.priorities_through + 1:
            raise RuntimeError(f"priorities of training step {step} arrived after those of "
                               f"step {self.priorities_through}")
        self.replay.update_priorities(positions, priorities)
        self.priorities_through = step

    def build(self, target: EfficientZeroNet, target_version: int, target_step: int = 0
              ) -> TrainingBatch:
        """The next batch (beta of its training step), reanalysed with `target` (the
        weights published at training step `target_step`)."""
        if self.priorities_through < self.lead_step:
            raise RuntimeError(f"batch {self.next_batch} needs the priorities of training "
                               f"step {self.lead_step}; it has those up to "
                               f"{self.priorities_through}")
        sample = sample_batch_positions(self.cfg, self.replay, self.next_batch - 1, self.rng)
        batch = self.reanalyser.build(target, sample, self.total_env_steps, target_version,
                                      target_step)
        self.next_batch += 1
        return batch


class TransportHelpers:
    """HelperSearches through a Transport: part p goes to the reanalyse helper p."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def send(self, part: int, target_step: int, obs: np.ndarray) -> None:
        if not self.transport.put_reanalysis_job(part, target_step, obs):
            raise Stopped("the run stopped while a reanalysis job was pending")

    def receive(self, part: int) -> np.ndarray:
        while True:
            try:
                return self.transport.take_reanalysis_result(part, timeout=1.0)
            except Timeout:
                if self.transport.counters["stop"]:
                    raise Stopped("the run stopped while a reanalysis job was pending"
                                  ) from None


class ReplayWorker:
    """A ReplayOwner fed through a Transport: the collectors' records, the learner's
    priorities, and a target model loaded from the published target weights.

    Runs in the reanalyse process (a CPU target copy), or inside the learner process when
    the learner trains on CUDA, so that reanalysis inference runs on the GPU model.
    """

    def __init__(self, spec: PipelineSpec, cfg: Config, transport: Transport,
                 device: Any = "cpu") -> None:
        self.transport = transport
        self.counters = transport.counters
        helpers = TransportHelpers(transport) if cfg.run.reanalysers > 1 else None
        self.owner = ReplayOwner(cfg, spec.env, spec.num_collectors,
                                 trained=self.counters["train_steps"], helpers=helpers)
        if spec.resume:
            self.owner.rebuild(spec.run_dir)
        self.collecting = True
        self.target = build_network(cfg, spec.env).to(device)
        self.target_step: int | None = None
        self._publish_counts()

    def _publish_counts(self) -> None:
        self.counters["replay_env_steps"] = self.owner.total_env_steps
        self.counters["replay_positions"] = self.owner.replay.size

    def ingest(self, timeout: float) -> bool:
        """Store the next record in turn, waiting up to `timeout` for it; whether one came.
        A collector that ended ends collection: every collector has the same budget."""
        if not self.collecting:
            return False
        turn = self.owner.next_collector()
        try:
            with self.transport.take_record(turn, timeout) as rec:
                games = self.owner.ingest(rec, turn)
        except Timeout:
            return False
        except Closed:
            self.collecting = False
            return False
        self._publish_counts()
        if games:
            self.counters.add("games", len(games))
            self.counters["recent_return"] = float(np.mean(self.owner.recent))
        return True

    def take_priorities(self, timeout: float) -> bool:
        """Apply the priorities the next batch needs, waiting up to `timeout` for each
        message; whether it has them all."""
        while self.owner.priorities_through < self.owner.lead_step:
            try:
                self.owner.apply_priorities(*self.transport.take_priorities(timeout))
            except Timeout:
                return False
        return True

    def build(self) -> TrainingBatch:
        """The next batch, with the target weights of its lead step (waited for)."""
        step = max(self.owner.lead_step, 0)
        self.transport.wait_for_training(step)
        self.target_step = self.transport.load("target", self.target, step, self.target_step)
        return self.owner.build(self.target, self.target_step or 0, self.target_step or 0)

    def next_batch(self, timeout: float) -> TrainingBatch | None:
        """Do the next piece of work in the timetable; the batch if it was one, else None
        (a record stored, or nothing ready within `timeout`)."""
        if self.owner.batch_due():
            return self.build() if self.take_priorities(timeout) else None
        if not self.collecting:  # only the learner's extra steps are left
            time.sleep(POLL_S)
        self.ingest(timeout)
        return None


def run_reanalyse(spec: PipelineSpec, transport: Transport) -> None:
    """Own the replay: store transitions, apply priorities, build training batches."""
    worker = ReplayWorker(spec, spec.cfg(), transport)
    counters = transport.counters
    clock = CpuClock(counters, "reanalyse")
    while not counters["stop"] and not counters["learner_done"]:
        clock.tick()
        batch = worker.next_batch(timeout=0.5)
        if batch is None:
            continue
        if not transport.put_batch(batch):
            return
        counters.add("batches")


def run_reanalyse_helper(spec: PipelineSpec, part: int, transport: Transport) -> None:
    """Search part `part` of every batch's re-searched roots for the replay's owner, with
    the target weights it names and the search seed of that part."""
    cfg = spec.cfg()
    model = build_network(cfg, spec.env)
    search = BatchedSearch.for_config(cfg, spec.env.num_actions, reanalysis_part_seed(cfg, part))
    loaded: int | None = None
    counters = transport.counters
    clock = CpuClock(counters, "reanalyse")
    while not counters["stop"] and not counters["learner_done"]:
        clock.tick()
        try:
            target_step, obs = transport.take_reanalysis_job(part, timeout=0.5)
        except Timeout:
            continue
        loaded = transport.load("target", model, target_step, loaded)
        visits = search.run(model, torch.from_numpy(obs), add_noise=True).visit_counts
        if not transport.put_reanalysis_result(part, visits):
            return
