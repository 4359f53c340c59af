"""The learner role: owns the model; trains on batches, sends priorities back,
publishes self-play, target and evaluation weights, checkpoints."""

from __future__ import annotations

import copy
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
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transport import (
    POLL_S,
    CpuClock,
    Timeout,
    Transport,
)
from ezengine.recipe import (
    build_network,
    checkpoint_state,
    collector_seed,
    model_seed,
    selfplay_noise_roots,
    solved_at,
    total_training_steps,
)
from ezengine.scores import read_evaluations
from ezengine.search import BatchedSearch, SearchResult

# How often a learner whose run may end early reads whether the last evaluation ended it
# (a read may be a round trip to another machine).
SOLVED_POLL_S = 0.5


def reanalyse_in_learner(cfg: Config) -> bool:
    """Whether reanalysis runs inside the learner process (see run.reanalyse_placement)."""
    placement = cfg.run.reanalyse_placement
    if placement == "auto":
        return resolve_device(cfg.run.device).type == "cuda"
    return placement == "learner"


class SentBatches:
    """Training batches from the reanalyse role; priorities go back the same way."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.waited_s = 0.0

    def next(self, timeout: float) -> TrainingBatch | None:
        """The next batch, or None after timeout."""
        t0 = time.perf_counter()
        try:
            return self.transport.take_batch(timeout)
        except Timeout:
            return None
        finally:
            self.waited_s += time.perf_counter() - t0

    def send_priorities(self, step: int, positions: np.ndarray, priorities: np.ndarray
                        ) -> None:
        """The priorities training `step` computed, to the replay's owner."""
        self.transport.put_priorities(step, positions, priorities)


class LocalBatches(SentBatches):
    """Training batches reanalysed in this (the learner's) process on the training device:
    the reanalysis inference, most of the compute, runs on the GPU. The timetable is the
    reanalyse role's: priorities still go through the transport (to this process), and
    the target comes from the published target weights."""

    def __init__(self, spec: PipelineSpec, cfg: Config, transport: Transport,
                 device: torch.device) -> None:
        super().__init__(transport)
        self.worker = ReplayWorker(spec, cfg, transport, device)

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
    """The model owner's side of OwnerSearches: runs every collector's pending search on
    the training device with a copy of the latest published self-play weights."""

    def __init__(self, spec: PipelineSpec, cfg: Config, learner: Learner,
                 transport: Transport) -> None:
        self.transport = transport
        self.learner = learner
        self.device = learner.device
        self.model = build_network(cfg, spec.env).to(self.device)
        # Seeded like the collectors' own searches, by the steps so far: a resumed run does
        # not repeat its root noise.
        start = transport.counters["replay_env_steps"]
        self.searches = [BatchedSearch.for_config(cfg, spec.env.num_actions,
                                                  collector_seed(cfg, i, start))
                         for i in range(spec.num_collectors)]
        self.noise_roots = selfplay_noise_roots(cfg, cfg.env.num_envs)
        self.refresh()

    def refresh(self) -> None:
        """Act with the learner's current weights (called when self-play weights publish)."""
        self.model.load_state_dict(self.learner.model.state_dict())

    def serve(self) -> bool:
        """Answer every waiting request (one per collector); whether there was any."""
        def run(collector: int, obs: np.ndarray) -> SearchResult:
            return self.searches[collector].run(
                self.model, torch.from_numpy(obs).to(self.device), add_noise=True,
                noise_roots=self.noise_roots)
        return self.transport.serve_searches(run)


def run_learner(spec: PipelineSpec, transport: Transport) -> None:
    """Own the model: train on batches, send priorities, publish weights, checkpoint."""
    cfg = spec.cfg()
    counters = transport.counters
    device = resolve_device(cfg.run.device)
    torch.manual_seed(model_seed(cfg))  # the initial weights (a resumed run loads its own)
    learner = Learner(cfg, build_network(cfg, spec.env).train(), device)
    run_dir = Path(spec.run_dir)
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    if spec.resume and ckpt_path.exists():
        learner.load_state_dict(load_checkpoint(ckpt_path, map_location=device)["learner"])
    # The weights of the training step it resumes at (or the initial ones), first.
    transport.publish("selfplay", learner.model.state_dict(), learner.steps)
    transport.publish("target", learner.target.state_dict(), learner.steps)
    source = (LocalBatches(spec, cfg, transport, device) if reanalyse_in_learner(cfg)
              else SentBatches(transport))
    server = (SearchServer(spec, cfg, learner, transport)
              if cfg.run.collector_inference == "learner" else None)

    def checkpoint() -> None:
        save_checkpoint(checkpoint_state(cfg, learner.state_dict(), learner.model.state_dict(),
                                         counters["replay_env_steps"]), ckpt_path)

    counters["train_steps"] = learner.steps
    counters["target_version"] = learner.target_version
    run = cfg.run
    total_train = total_training_steps(cfg)
    clock = CpuClock(counters, "learner")  # with reanalysis inside, its CPU counts here
    # Ending early (run.stop_evaluations): the learner keeps its state at each evaluation
    # and, before publishing the next, waits for that evaluation; when it ended the run,
    # the learner goes back to that state (the steps trained since are dropped), so the
    # final weights are the evaluated ones whatever the evaluator's speed. It also looks
    # between steps, so a run stops about when its evaluation ends it.
    ends_early = run.stop_evaluations > 0
    held: dict[str, Any] | None = None
    held_step = 0
    if ends_early and spec.resume and solved_at(cfg, [
            row for row in read_evaluations(run_dir) if row["train_steps"] <= learner.steps]):
        total_train = learner.steps  # it ended early before: nothing left to train

    def ended_at(step: int) -> bool:
        """Wait for the evaluation of training step `step`; whether it ends the run."""
        t0 = time.perf_counter()
        while counters["eval_done"] < step and not counters["stop"]:
            clock.tick()
            time.sleep(0.05)  # an evaluation takes seconds; each read may be a round trip
        source.waited_s += time.perf_counter() - t0
        return counters["solved_at"] == step

    def go_back_to_held() -> None:
        """The run ended at the held evaluation: its state becomes the learner's."""
        learner.load_state_dict(held)
        counters["train_steps"] = learner.steps
    checked_at = time.perf_counter()
    while learner.steps < total_train and not counters["stop"]:
        clock.tick()
        if held is not None and time.perf_counter() - checked_at > SOLVED_POLL_S:
            # The evaluation may have ended the run already: stop now rather than at the
            # next evaluation, on the same kept state.
            checked_at = time.perf_counter()
            if counters["solved_at"] == held_step:
                go_back_to_held()
                break
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
        for name in METRICS:
            counters.add(f"{name}_sum", metrics[name])
        if steps % run.selfplay_update_interval == 0:
            transport.publish("selfplay", learner.model.state_dict(), steps)
            if server is not None:
                server.refresh()
        if learner.target_version != target_before:
            transport.publish("target", learner.target.state_dict(), steps)
            counters["target_version"] = learner.target_version
        if steps % run.eval_interval == 0 or steps == total_train:
            if ends_early:
                if held is not None and ended_at(held_step):
                    go_back_to_held()
                    break
                held, held_step = copy.deepcopy(learner.state_dict()), steps
            transport.publish("eval", learner.model.state_dict(), steps)
        # After the publishes: whoever has this step's priorities or sees this step trained
        # finds its weights published.
        source.send_priorities(steps, batch.positions, prio)
        counters["train_steps"] = steps
        if steps % run.checkpoint_interval == 0:
            checkpoint()
    checkpoint()
    counters["final_step"] = learner.steps
    counters["learner_done"] = 1
