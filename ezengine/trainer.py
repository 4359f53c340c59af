"""The serial trainer: the pipeline's roles run in one process, in the order of the
timetable (recipe.py), so that a serial run is the pipeline's run, step for step.

This is the debugging and profiling mode (``ezengine train --serial``): the collectors,
the replay's owner (`ReplayOwner`, as in the reanalyse process) and the learner are the
pipeline's own pieces; only the transport is gone. Batches wait in a queue instead of the
batch ring, priorities until the timetable applies them instead of in their ring, and
published weights in `LocalHistory` instead of shared memory.

The run directory holds ``config.yaml`` (the resolved config), ``checkpoints/latest.pt``,
``metrics.jsonl`` (one row per log interval), ``eval.jsonl`` (one row per evaluation) and
TensorBoard scalars in ``tb/``.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.checkpoint import save_checkpoint
from ezengine.collector import Collector
from ezengine.config import Config, save_config
from ezengine.device import configure_torch_for, resolve_device
from ezengine.envs import VectorEnv
from ezengine.evaluate import describe_evaluation, evaluate
from ezengine.learner import Learner
from ezengine.metrics import Eta, MetricsWriter
from ezengine.pipeline.replay_role import ReplayOwner
from ezengine.pipeline.weights import LocalHistory
from ezengine.recipe import (
    batch_env_steps,
    build_network,
    checkpoint_state,
    collector_budget,
    collector_options,
    collector_seed,
    evaluation_episodes,
    evaluation_seed,
    model_seed,
    progress_line,
    record_env_steps,
    selfplay_weights_step,
    solved_at,
    solved_line,
    stop_rule,
    total_training_steps,
    visit_temperature,
)
from ezengine.rundir import claim_run_dir, stopped_line
from ezengine.search import BatchedSearch


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


class SerialTrainer:
    """Everything of one run in one process.

    Args:
        cfg: the resolved config.
        run_dir: where config, checkpoints, metrics and evaluations are written.
        echo: receives the human-readable progress lines.
        num_collectors: collectors stepped in turn (as the pipeline's processes would be).
    """

    def __init__(self, cfg: Config, run_dir: Path, echo: Callable[[str], None] = print,
                 num_collectors: int = 1) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.device = resolve_device(cfg.run.device)
        configure_torch_for(self.device)
        self.collectors: list[Collector] = []
        for i in range(num_collectors):
            seed = collector_seed(cfg, i)
            envs = VectorEnv(cfg.env, seed=seed, train=True)
            search = BatchedSearch.for_config(cfg, envs.num_actions, seed)
            self.collectors.append(Collector(envs, search, clip_rewards=cfg.env.clip_rewards,
                                             frame_stack=cfg.env.frame_stack, seed=seed,
                                             **collector_options(cfg, envs.num_envs)))
        self.env = self.collectors[0].envs.description
        # The copies the collectors and the reanalyser load published weights into, built
        # before torch is seeded for the learner's initial weights, as in the pipeline.
        self.selfplay = build_network(self.cfg, self.env).to(self.device)
        self.target = build_network(self.cfg, self.env).to(self.device)
        torch.manual_seed(model_seed(cfg))
        self.learner = Learner(cfg, build_network(cfg, self.env).train(), self.device)
        self.owner = ReplayOwner(cfg, self.env, num_collectors)
        self.budget, self.warmup = collector_budget(cfg, num_collectors)
        self.selfplay_weights, self.target_weights = LocalHistory(), LocalHistory()
        self.selfplay_loaded: int | None = None
        self.target_loaded: int | None = None
        self.queue: deque[TrainingBatch] = deque()  # the batch ring
        self.priorities: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the priority ring
        self.total_train_steps = total_training_steps(cfg)
        self.solved_at = 0  # the evaluation that ended the run early (recipe.solved_at)
        self.evaluations: list[dict[str, Any]] = []
        self.window_metrics: list[dict[str, float]] = []
        self.eta = Eta()

    @property
    def env_steps(self) -> int:
        return self.owner.total_env_steps

    # ------------------------------------------------------------------ the roles

    def collect(self) -> None:
        """The next record in turn, acting with the weights the timetable names."""
        index = self.owner.next_collector()
        collector = self.collectors[index]
        replay_steps = record_env_steps(collector.env_steps, index, len(self.collectors),
                                        self.cfg.env.num_envs)
        policy = None
        if collector.env_steps >= self.warmup:
            step = selfplay_weights_step(self.cfg, replay_steps)
            self.train_until(step)
            self.selfplay_loaded = self.selfplay_weights.load(self.selfplay, step,
                                                              self.selfplay_loaded)
            policy = self.selfplay
        record = collector.step(policy, visit_temperature(self.cfg, replay_steps))
        self.owner.ingest(record, index)

    def build_batch(self) -> None:
        """Reanalyse the next batch, with the priorities and target of its lead step."""
        lead = self.owner.lead_step
        self.train_until(lead)
        for step in sorted(s for s in self.priorities if s <= lead):
            self.owner.apply_priorities(step, *self.priorities.pop(step))
        self.target_loaded = self.target_weights.load(self.target, max(lead, 0),
                                                      self.target_loaded)
        self.queue.append(self.owner.build(self.target, self.target_loaded))

    def train_until(self, step: int) -> None:
        """Train queued batches until the learner has done `step` training steps."""
        while self.learner.steps < step:
            if not self.queue:
                raise RuntimeError(f"training step {step} is due before its batch exists")
            self.train_step()

    def train_step(self) -> None:
        """Learn from the next queued batch; publish, evaluate and checkpoint on schedule."""
        cfg = self.cfg
        target_before = self.learner.target_version
        batch = self.queue.popleft()
        metrics, priorities = self.learner.train_step(batch)
        steps = self.learner.steps
        self.priorities[steps] = (batch.positions, priorities)
        self.window_metrics.append(metrics)
        if steps % cfg.run.selfplay_update_interval == 0:
            self.selfplay_weights.publish(self.learner.model.state_dict(), steps)
        if self.learner.target_version != target_before:
            self.target_weights.publish(self.learner.target.state_dict(), steps)
        if steps % cfg.run.eval_interval == 0 or steps == self.total_train_steps:
            self.evaluate()
        if steps % cfg.run.checkpoint_interval == 0:
            self.checkpoint()

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the online model; append the record to eval.jsonl."""
        with torch.random.fork_rng(devices=[]):  # the learner's draws stay the pipeline's
            model = build_network(self.cfg, self.env).to(self.device)
            model.load_state_dict(self.learner.model.state_dict())
            result = evaluate(model, self.cfg, evaluation_episodes(self.cfg, self.evaluations),
                              seed=evaluation_seed(self.cfg, self.learner.steps))
        row = {"train_steps": self.learner.steps,
               "env_steps": batch_env_steps(self.cfg, self.learner.steps, len(self.collectors)),
               "wall_s": round(time.perf_counter() - self.start_time, 1), **result.record()}
        self.metrics.evaluation(row)
        self.evaluations.append(row)
        self.echo(describe_evaluation(row))
        self.solved_at = solved_at(self.cfg, self.evaluations)
        return row

    def checkpoint(self) -> None:
        """Atomically write checkpoints/latest.pt."""
        state = checkpoint_state(self.cfg, self.learner.state_dict(),
                                 self.learner.model.state_dict(), self.env_steps)
        save_checkpoint(state, self.run_dir / "checkpoints" / "latest.pt")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to the end of the budget; returns the final evaluation record.
        RunDirError, before anything starts, when the run directory cannot be used (see
        `claim_run_dir`)."""
        # Ctrl-C and SIGTERM stop the run with a final checkpoint, also when the process
        # started with SIGINT ignored (a background job), which disables KeyboardInterrupt.
        old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with claim_run_dir(self.run_dir, resume=False):
                return self._run()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def step(self) -> bool:
        """The next piece of work in the timetable; False once the run is done."""
        if self.solved_at:
            return False
        if self.owner.batch_due():
            self.build_batch()
        elif self.collectors[self.owner.next_collector()].env_steps < self.budget:
            self.collect()
        elif self.queue:
            self.train_step()
        else:
            return False
        return True

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir)
        self.echo(f"run dir {self.run_dir} | device {self.device} | {cfg.env.id} | "
                  f"{cfg.run.env_steps:,} env steps, {self.total_train_steps:,} training steps"
                  + stop_rule(cfg))
        self.start_time = time.perf_counter()
        self.selfplay_weights.publish(self.learner.model.state_dict(), 0)
        self.target_weights.publish(self.learner.target.state_dict(), 0)
        window = (self.start_time, 0, 0)
        try:
            while self.step():
                now = time.perf_counter()
                if now - window[0] >= cfg.run.log_interval_s:
                    self._log_window(now - window[0], self.env_steps - window[1],
                                     self.learner.steps - window[2])
                    window = (now, self.env_steps, self.learner.steps)
        except KeyboardInterrupt:
            self.checkpoint()
            self._close()
            self.echo(stopped_line(self.run_dir, resumable=False))
            return self.evaluations[-1] if self.evaluations else {}
        if self.solved_at:
            self.echo(solved_line(self.cfg, self.solved_at))
        self.checkpoint()
        final = self.evaluations[-1] if (
            self.evaluations and self.evaluations[-1]["train_steps"] == self.learner.steps
        ) else self.evaluate()
        self._close()
        self.echo(f"done in {time.perf_counter() - self.start_time:.0f}s: "
                  f"final mean return {final['mean_return']:.1f}")
        return final

    def _close(self) -> None:
        for collector in self.collectors:
            collector.envs.close()
        self.metrics.close()

    def _log_window(self, seconds: float, env_steps: int, train_steps: int) -> None:
        recent = self.owner.recent
        row: dict[str, Any] = {
            "wall_s": round(time.perf_counter() - self.start_time, 1),
            "env_steps": self.env_steps, "train_steps": self.learner.steps,
            "env_steps_per_s": round(env_steps / seconds, 2),
            "train_steps_per_s": round(train_steps / seconds, 2),
            "recent_return": float(np.mean(recent)) if recent else None,
            "replay_positions": self.owner.replay.size,
        }
        if self.window_metrics:
            for key in self.window_metrics[0]:
                row[key] = float(np.mean([m[key] for m in self.window_metrics]))
            self.window_metrics = []
        self.metrics.progress(row)
        self.echo(progress_line(self.cfg, row, self.eta))
