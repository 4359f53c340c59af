"""The learner process: owns the model; trains on batches, sends priorities back,
publishes self-play, target and evaluation weights, checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.checkpoint import load_checkpoint, save_checkpoint
from ezengine.config import Config
from ezengine.device import resolve_device
from ezengine.learner import METRICS, Learner
from ezengine.pipeline.replay_role import ReplayWorker
from ezengine.pipeline.spec import (
    PipelineSpec,
)
from ezengine.pipeline.transport import (
    POLL_S,
    attach,
    write_unless_stopped,
)
from ezengine.pipeline.weights import WeightHistory, publish_state
from ezengine.recipe import (
    build_network,
    checkpoint_state,
    collector_seed,
    model_seed,
    total_training_steps,
)
from ezengine.rings import (
    Ring,
    RingTimeout,
    SharedCounters,
    SharedWeights,
)
from ezengine.search import BatchedSearch, SearchResult


def reanalyse_in_learner(cfg: Config) -> bool:
    """Whether reanalysis runs inside the learner process (see run.reanalyse_placement)."""
    placement = cfg.run.reanalyse_placement
    if placement == "auto":
        return resolve_device(cfg.run.device).type == "cuda"
    return placement == "learner"


class RingBatches:
    """Training batches from the reanalyse process; priorities go back the same way."""

    def __init__(self, spec: PipelineSpec, counters: SharedCounters) -> None:
        self.counters = counters
        self.batches = attach(Ring, spec.batches)
        self.priorities = attach(Ring, spec.priorities)
        self.waited_s = 0.0

    def next(self, timeout: float) -> TrainingBatch | None:
        """The next batch, copied out of its slot (freed at once), or None after timeout."""
        t0 = time.perf_counter()
        try:
            with self.batches.read(timeout=timeout) as slot:
                return TrainingBatch.from_arrays(slot)
        except RingTimeout:
            return None
        finally:
            self.waited_s += time.perf_counter() - t0

    def send_priorities(self, step: int, positions: np.ndarray, priorities: np.ndarray
                        ) -> None:
        """The priorities training `step` computed, to the replay's owner."""
        def fill(slot: Any) -> None:
            slot["step"][0] = step
            slot["positions"][...] = positions
            slot["priorities"][...] = priorities
        write_unless_stopped(self.priorities, self.counters, fill)


class LocalBatches(RingBatches):
    """Training batches reanalysed in this (the learner's) process on the training device:
    the reanalysis inference, most of the compute, runs on the GPU. The timetable is the
    reanalyse process's: priorities still go through their ring (to this process), and
    the target comes from the published target weights."""

    def __init__(self, spec: PipelineSpec, cfg: Config, counters: SharedCounters,
                 device: torch.device) -> None:
        super().__init__(spec, counters)
        self.worker = ReplayWorker(spec, cfg, counters, device)

    def next(self, timeout: float) -> TrainingBatch | None:
        """The next batch, ingesting records until the timetable allows it; None after
        timeout."""
        deadline = time.perf_counter() + timeout
        while True:
            t0 = time.perf_counter()
            batch = self.worker.next_batch(timeout=max(deadline - t0, 0.0))
            if batch is not None:
                return batch
            self.waited_s += time.perf_counter() - t0
            if time.perf_counter() >= deadline:
                return None


class SearchServer:
    """The model owner's side of SearchClient: runs every collector's pending search on
    the training device with a copy of the latest published self-play weights."""

    def __init__(self, spec: PipelineSpec, cfg: Config, learner: Learner,
                 counters: SharedCounters) -> None:
        self.requests = [attach(Ring, s) for s in spec.search_requests]
        self.results = [attach(Ring, s) for s in spec.search_results]
        self.counters = counters
        self.learner = learner
        self.device = learner.device
        self.model = build_network(cfg, spec.env).to(self.device)
        # Seeded like the collectors' own searches, by the steps so far: a resumed run does
        # not repeat its root noise.
        start = counters["replay_env_steps"]
        self.searches = [BatchedSearch.for_config(cfg, spec.env.num_actions,
                                                  collector_seed(cfg, i, start))
                         for i in range(len(self.requests))]
        self.refresh()

    def refresh(self) -> None:
        """Act with the learner's current weights (called when self-play weights publish)."""
        self.model.load_state_dict(self.learner.model.state_dict())

    def serve(self) -> bool:
        """Answer every waiting request (one per collector); whether there was any."""
        busy = False
        for i, requests in enumerate(self.requests):
            with requests.try_read() as slot:
                if slot is None:
                    continue
                obs = torch.from_numpy(np.array(slot["obs"])).to(self.device)
            result = self.searches[i].run(self.model, obs, add_noise=True)

            def fill(out: Any, result: SearchResult = result) -> None:
                out["visit_counts"][...] = result.visit_counts
                out["root_values"][...] = result.root_values
                out["predicted_values"][...] = result.predicted_values
            write_unless_stopped(self.results[i], self.counters, fill)
            busy = True
        return busy


def run_learner(spec: PipelineSpec) -> None:
    """Own the model: train on batches, send priorities, publish weights, checkpoint."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    selfplay = WeightHistory([attach(SharedWeights, s) for s in spec.selfplay_weights])
    target_w = WeightHistory([attach(SharedWeights, s) for s in spec.target_weights])
    eval_w = attach(SharedWeights, spec.eval_weights)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(model_seed(cfg))  # the initial weights (a resumed run loads its own)
    learner = Learner(cfg, build_network(cfg, spec.env).train(), device)
    run_dir = Path(spec.run_dir)
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    if spec.resume and ckpt_path.exists():
        learner.load_state_dict(load_checkpoint(ckpt_path, map_location=device)["learner"])
    # The weights of the training step it resumes at (or the initial ones), first.
    selfplay.publish(learner.model.state_dict(), learner.steps)
    target_w.publish(learner.target.state_dict(), learner.steps)
    source = (LocalBatches(spec, cfg, counters, device) if reanalyse_in_learner(cfg)
              else RingBatches(spec, counters))
    server = SearchServer(spec, cfg, learner, counters) if spec.search_requests else None

    def checkpoint() -> None:
        save_checkpoint(checkpoint_state(cfg, learner.state_dict(), learner.model.state_dict(),
                                         counters["replay_env_steps"]), ckpt_path)

    counters["train_steps"] = learner.steps
    counters["target_version"] = learner.target_version
    run = cfg.run
    total_train = total_training_steps(cfg)
    while learner.steps < total_train and not counters["stop"]:
        if server is None:
            batch = source.next(timeout=0.5)
        else:  # between training steps, and while no batch is ready, answer searches
            # Time spent answering searches while no batch is ready counts as waiting for
            # data too: the learner could not have trained in it.
            t0, waited_before = time.perf_counter(), source.waited_s
            served = server.serve()
            batch = source.next(timeout=0.0)
            if batch is None:
                if not served:
                    time.sleep(POLL_S)
                source.waited_s = waited_before + time.perf_counter() - t0
        counters["learner_wait_s"] = source.waited_s
        if batch is None:
            continue
        target_before = learner.target_version
        metrics, prio = learner.train_step(batch)
        steps = learner.steps
        source.send_priorities(steps, batch.positions, prio)
        for name in METRICS:
            counters.add(f"{name}_sum", metrics[name])
        if steps % run.selfplay_update_interval == 0:
            selfplay.publish(learner.model.state_dict(), steps)
            if server is not None:
                server.refresh()
        if learner.target_version != target_before:
            target_w.publish(learner.target.state_dict(), steps)
            counters["target_version"] = learner.target_version
        if steps % run.eval_interval == 0 or steps == total_train:
            publish_state(eval_w, learner.model.state_dict(), steps)
        # Last: readers waiting for this step's weights find them published.
        counters["train_steps"] = steps
        if steps % run.checkpoint_interval == 0:
            checkpoint()
    checkpoint()
    counters["learner_done"] = 1
