"""The serial trainer: collection, reanalyse and learning interleaved in one process.

This is the debugging and profiling mode (``ezengine train --serial``); the multiprocessing
pipeline runs the same pieces (Collector, Reanalyser, Learner) in separate processes.

Pacing: after `run.start_transitions` steps of uniformly random play, training steps are
interleaved with collection so that training steps = replay_ratio * env steps (the first
replay_ratio * start_transitions of them train on the random play, as in the reference);
after the environment-step budget, `run.extra_training_steps` more training steps run
without new data.

The run directory holds ``config.yaml`` (the resolved config), ``checkpoints/latest.pt``,
``metrics.jsonl`` (one row per log interval), ``eval.jsonl`` (one row per evaluation) and
TensorBoard scalars in ``tb/``.
"""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ezengine.checkpoint import save_checkpoint
from ezengine.collector import Collector, finished_games, store_transition
from ezengine.config import Config, save_config
from ezengine.device import configure_torch, resolve_device
from ezengine.envs import VectorEnv
from ezengine.evaluate import describe_evaluation, evaluate
from ezengine.learner import Learner
from ezengine.metrics import Eta, MetricsWriter
from ezengine.reanalyse import Reanalyser
from ezengine.recipe import (
    build_network,
    build_replay,
    checkpoint_state,
    collector_seed,
    evaluation_seed,
    model_seed,
    paced_training_steps,
    progress_line,
    reanalyse_seed,
    recent_returns,
    sample_batch_positions,
    sampling_seed,
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
    """

    def __init__(self, cfg: Config, run_dir: Path, echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.device = resolve_device(cfg.run.device)
        # One intra-op thread on CPU: this model's ops are small, and with other processes
        # on the machine extra threads only wait for busy cores and stall.
        configure_torch(threads=1 if self.device.type == "cpu" else None)
        # The seed streams of the pipeline's learner, collector 0 and replay worker.
        torch.manual_seed(model_seed(cfg))
        seed = collector_seed(cfg, 0)
        self.envs = VectorEnv(cfg.env, seed=seed, train=True)
        env = self.envs.description
        self.learner = Learner(cfg, build_network(cfg, env).train(), self.device)
        self.selfplay = copy.deepcopy(self.learner.model).eval()
        self.replay = build_replay(cfg, env, writers=self.envs.num_envs)
        search = BatchedSearch.for_config(cfg, env.num_actions, seed)
        self.collector = Collector(self.envs, search, clip_rewards=cfg.env.clip_rewards,
                                   frame_stack=cfg.env.frame_stack, seed=seed)
        self.reanalyser = Reanalyser(cfg, self.replay, env.num_actions,
                                     seed=reanalyse_seed(cfg))
        self.sample_rng = np.random.default_rng(sampling_seed(cfg))
        self.total_train_steps = total_training_steps(cfg)
        self.recent_returns = recent_returns()
        self.evaluations: list[dict[str, Any]] = []
        self.eta = Eta()

    # ------------------------------------------------------------------ pieces

    def training_due(self) -> bool:
        """Whether the pacing rule asks for a training step before more collection."""
        if self.replay.num_sampleable == 0:
            return False
        return self.learner.steps < paced_training_steps(self.cfg, self.collector.env_steps)

    def collect(self) -> None:
        """One step of every training environment."""
        warmup = self.collector.env_steps < self.cfg.run.start_transitions
        temperature = visit_temperature(self.cfg, self.collector.env_steps)
        record = self.collector.step(None if warmup else self.selfplay, temperature)
        store_transition(self.replay, record)
        self.recent_returns.extend(finished_games(record))

    def train_step(self) -> dict[str, float]:
        """Sample, reanalyse, learn, update priorities and the self-play weights."""
        cfg = self.cfg
        sample = sample_batch_positions(cfg, self.replay, self.learner.steps, self.sample_rng)
        batch = self.reanalyser.build(self.learner.target, sample, self.collector.env_steps,
                                      self.learner.target_version)
        metrics, priorities = self.learner.train_step(batch)
        self.replay.update_priorities(sample.positions, priorities)
        if self.learner.steps % cfg.run.selfplay_update_interval == 0:
            self.selfplay.load_state_dict(self.learner.model.state_dict())
        return metrics

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the online model; append the record to eval.jsonl."""
        result = evaluate(copy.deepcopy(self.learner.model), self.cfg,
                          self.cfg.run.eval_episodes, seed=evaluation_seed(self.cfg))
        row = {"train_steps": self.learner.steps, "env_steps": self.collector.env_steps,
               "wall_s": round(time.perf_counter() - self.start_time, 1), **result.record()}
        self.metrics.evaluation(row)
        self.evaluations.append(row)
        self.echo(describe_evaluation(row))
        return row

    def checkpoint(self) -> None:
        """Atomically write checkpoints/latest.pt."""
        state = checkpoint_state(self.cfg, self.learner.state_dict(),
                                 self.selfplay.state_dict(), self.collector.env_steps)
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

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir)
        self.echo(f"run dir {self.run_dir} | device {self.device} | {cfg.env.id} | "
                  f"{cfg.run.env_steps:,} env steps, {self.total_train_steps:,} training steps")
        self.start_time = time.perf_counter()
        window_start, window_env, window_train = self.start_time, 0, 0
        window_metrics: list[dict[str, float]] = []
        try:
            while True:
                if self.training_due():
                    window_metrics.append(self.train_step())
                    steps = self.learner.steps
                    if steps % cfg.run.eval_interval == 0:
                        self.evaluate()
                    if steps % cfg.run.checkpoint_interval == 0:
                        self.checkpoint()
                elif self.collector.env_steps < cfg.run.env_steps:
                    self.collect()
                else:
                    break
                now = time.perf_counter()
                if now - window_start >= cfg.run.log_interval_s:
                    self._log_window(now - window_start, self.collector.env_steps - window_env,
                                     self.learner.steps - window_train, window_metrics)
                    window_start, window_env, window_train = now, self.collector.env_steps, \
                        self.learner.steps
                    window_metrics = []
        except KeyboardInterrupt:
            self.checkpoint()
            self.envs.close()
            self.metrics.close()
            self.echo(stopped_line(self.run_dir, resumable=False))
            return self.evaluations[-1] if self.evaluations else {}
        self.checkpoint()
        final = self.evaluations[-1] if (
            self.evaluations and self.evaluations[-1]["train_steps"] == self.learner.steps
        ) else self.evaluate()
        self.envs.close()
        self.metrics.close()
        self.echo(f"done in {time.perf_counter() - self.start_time:.0f}s: "
                  f"final mean return {final['mean_return']:.1f}")
        return final

    def _log_window(self, seconds: float, env_steps: int, train_steps: int,
                    metrics: list[dict[str, float]]) -> None:
        row: dict[str, Any] = {
            "wall_s": round(time.perf_counter() - self.start_time, 1),
            "env_steps": self.collector.env_steps, "train_steps": self.learner.steps,
            "env_steps_per_s": round(env_steps / seconds, 2),
            "train_steps_per_s": round(train_steps / seconds, 2),
            "recent_return": (float(np.mean(self.recent_returns)) if self.recent_returns
                              else None),
            "replay_positions": self.replay.size,
        }
        if metrics:
            for key in metrics[0]:
                row[key] = float(np.mean([m[key] for m in metrics]))
        self.metrics.progress(row)
        self.echo(progress_line(self.cfg, row, self.eta))
