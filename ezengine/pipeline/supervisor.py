"""The supervisor (the ``ezengine train`` process): creates every shared-memory block,
starts and watches the children, prints progress and writes metrics, and stops the run."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any

from ezengine.config import Config, config_to_dict, save_config
from ezengine.envs import EnvDescription, describe_env
from ezengine.evaluate import describe_evaluation
from ezengine.learner import METRICS
from ezengine.metrics import Eta, MetricsWriter, drop_torn_rows
from ezengine.pipeline.child import child_main
from ezengine.pipeline.layouts import (
    batch_layout,
    priority_layout,
    reanalysis_job_layout,
    reanalysis_result_layout,
    search_request_layout,
    search_result_layout,
    transition_layout,
)
from ezengine.pipeline.learner_role import reanalyse_in_learner
from ezengine.pipeline.spec import (
    FLOAT_COUNTERS,
    INT_COUNTERS,
    RING_SLOTS,
    ROLES,
    PipelineSpec,
    role_name,
)
from ezengine.pipeline.transition_log import TransitionLog, log_path
from ezengine.pipeline.weights import HISTORY_SLOTS, state_size
from ezengine.recipe import (
    build_network,
    progress_line,
    solved_line,
    stop_rule,
    total_training_steps,
)
from ezengine.rings import (
    Ring,
    SharedCounters,
    SharedWeights,
    SlotLayout,
    run_prefix,
    unlink_orphaned_segments,
    unlink_segments,
)
from ezengine.rundir import claim_run_dir, resume_point, stopped_line
from ezengine.scores import read_evaluations


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def window_means(now: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    """The learner's metrics averaged over the training steps between two counter
    snapshots (none when no step was trained in between)."""
    steps = now["train_steps"] - before["train_steps"]
    if steps <= 0:
        return {}
    return {name: (now[f"{name}_sum"] - before[f"{name}_sum"]) / steps for name in METRICS}


class PipelineTrainer:
    """Starts, watches and stops the pipeline's processes (the `ezengine train` process).

    Args:
        cfg: the resolved config.
        run_dir: the run directory (config, checkpoints, replay logs, metrics, evaluations).
        echo: receives progress lines.
        resume: continue the run in `run_dir` (its replay logs and latest checkpoint).
        num_collectors: collector processes.
    """

    def __init__(self, cfg: Config, run_dir: Path, echo: Any = print, *, resume: bool = False,
                 num_collectors: int = 1) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.resume = resume
        self.num_collectors = num_collectors
        self.stop_reason: str | None = None
        self.eta = Eta()
        self.failure: tuple[str, str] | None = None
        self.evaluations_shown = 0
        self.rings: dict[str, list[Ring]] = {}  # shown in the progress line

    def _handle_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(signum).name
            self.echo(f"{self.stop_reason}: stopping (final checkpoint, then exit)")

    def run(self) -> int:
        """Run to the end of the budget or a stop; returns the process exit code.
        RunDirError, before anything starts, when the run directory cannot be used (see
        `claim_run_dir`) or a resumed checkpoint does not load or fit the config."""
        with claim_run_dir(self.run_dir, resume=self.resume) as claim:
            code = self._run()
            claim.failed = code != 0
            return code

    def _run(self) -> int:
        cfg = self.cfg
        if self.resume:
            trained = resume_point(self.run_dir, cfg)  # checked before anything is touched
        (self.run_dir / "replay").mkdir(exist_ok=True)
        if not self.resume:
            save_config(cfg, self.run_dir / "config.yaml")
        env = describe_env(cfg.env)
        size = state_size(build_network(cfg, env).state_dict())
        if self.resume:
            # Every collector that wrote a log must be rebuilt (and continues collecting).
            logs = len(list((self.run_dir / "replay").glob("collector-*.bin")))
            self.num_collectors = max(self.num_collectors, logs)
            resume_from = self._replay_point(env, trained)
            drop_torn_rows(self.run_dir)
        else:
            resume_from = (0, 0)
        return self._launch(env, size, resume_from)

    def _launch(self, env: EnvDescription, size: int, resume_from: tuple[int, int]) -> int:
        """Create the shared-memory blocks, start the processes and watch them; the exit
        code. `resume_from`: (training steps, env steps) the counters start at."""
        cfg = self.cfg
        leftovers = unlink_orphaned_segments("ez")
        if leftovers:
            self.echo(f"removed {len(leftovers)} shared-memory segments left in /dev/shm by "
                      "runs that were killed whole")
        prefix = run_prefix("ez")
        blocks: list[Any] = []
        self.metrics = MetricsWriter(self.run_dir)
        try:
            def per_index(layout: list, slots: int, name: str, indices: range) -> list[Ring]:
                """One ring per collector (or helper); `name` has a {} for its index."""
                return [Ring.create(prefix, SlotLayout(layout), slots, name=name.format(i))
                        for i in indices]

            transitions = per_index(transition_layout(cfg, env), RING_SLOTS["transitions"],
                                    "transitions: collector-{} -> reanalyse",
                                    range(self.num_collectors))
            batches = Ring.create(prefix, SlotLayout(batch_layout(cfg, env)),
                                  RING_SLOTS["batches"], name="batches: reanalyse -> learner")
            priorities = Ring.create(prefix, SlotLayout(priority_layout(cfg)),
                                     RING_SLOTS["priorities"],
                                     name="priorities: learner -> reanalyse")
            counters = SharedCounters.create(prefix, ints=INT_COUNTERS, floats=FLOAT_COUNTERS)
            histories = {name: [SharedWeights.create(prefix, size, name=f"{name} weights {i}")
                                for i in range(HISTORY_SLOTS)]
                         for name in ("selfplay", "target")}
            eval_weights = SharedWeights.create(prefix, size, name="eval weights")
            remote_collectors = (self.num_collectors
                                 if cfg.run.collector_inference == "learner" else 0)
            requests = per_index(search_request_layout(cfg, env), 1,
                                 "search requests: collector-{} -> learner",
                                 range(remote_collectors))
            results = per_index(search_result_layout(cfg, env), 1,
                                "search results: learner -> collector-{}",
                                range(remote_collectors))
            # Helper p (1..) searches part p of each batch; part 0 is the replay owner's.
            helpers = range(1, cfg.run.reanalysers)
            jobs = per_index(reanalysis_job_layout(cfg, env), 1,
                             "reanalysis jobs: reanalyse -> reanalyse-{}", helpers)
            answers = per_index(reanalysis_result_layout(cfg, env), 1,
                                "reanalysis results: reanalyse-{} -> reanalyse", helpers)
            blocks = [*transitions, batches, priorities, counters, *histories["selfplay"],
                      *histories["target"], eval_weights,
                      *requests, *results, *jobs, *answers]
            self.rings = {"transitions": transitions, "batches": [batches]}
            counters["train_steps"], counters["replay_env_steps"] = resume_from
            spec = PipelineSpec(
                config=config_to_dict(cfg), run_dir=str(self.run_dir), env=env,
                num_collectors=self.num_collectors, resume=self.resume,
                transitions=[r.spec for r in transitions], batches=batches.spec,
                priorities=priorities.spec, counters=counters.spec,
                selfplay_weights=[b.spec for b in histories["selfplay"]],
                target_weights=[b.spec for b in histories["target"]],
                eval_weights=eval_weights.spec,
                search_requests=[r.spec for r in requests],
                search_results=[r.spec for r in results],
                reanalysis_jobs=[r.spec for r in jobs],
                reanalysis_results=[r.spec for r in answers], prefix=prefix,
                supervisor_pid=os.getpid())
            return self._supervise(spec, counters)
        finally:
            for block in blocks:
                block.unlink()
            unlink_segments(prefix)
            self.metrics.close()

    def _replay_point(self, env: EnvDescription, steps: int) -> tuple[int, int]:
        """(training steps of the latest checkpoint, env steps in the replay logs); says
        where the run resumes from."""
        layout = transition_layout(self.cfg, env)
        logs = [TransitionLog(log_path(self.run_dir, i), layout)
                for i in range(self.num_collectors)]
        for log in logs:
            dropped = log.drop_partial_record()
            if dropped:
                self.echo(f"{log.path}: removed a half-written last record ({dropped} bytes; "
                          "its collector was killed while writing it, before publishing it)")
        records = sum(log.count() for log in logs)
        env_steps = sum(log.last_env_steps() for log in logs)
        self.echo(f"resumed from training step {steps} with {records} transition records "
                  f"({env_steps:,} env steps) from the replay logs")
        return steps, env_steps

    def roles(self) -> list[tuple[str, int]]:
        """(role, index) of every process the run starts."""
        roles = [("learner", 0), ("evaluator", 0)]
        if not reanalyse_in_learner(self.cfg):
            roles.append(("reanalyse", 0))
        roles += [("reanalyse", p) for p in range(1, self.cfg.run.reanalysers)]
        return roles + [("collector", i) for i in range(self.num_collectors)]

    def _supervise(self, spec: PipelineSpec, counters: SharedCounters) -> int:
        ctx = mp.get_context("spawn")
        errors = ctx.Queue()

        def start(role: str, index: int, name: str) -> mp.process.BaseProcess:
            proc = ctx.Process(target=child_main, args=(role, index, spec, errors),
                               name=f"ezengine-{name}", daemon=True)
            proc.start()
            return proc
        return self._watch_children(start, counters, errors)

    def _watch_children(self, start: Any, counters: Any, errors: Any) -> int:
        """Start every role with start(role, index, name) (a process-like object: exitcode,
        join, is_alive, kill), watch them to the end or a stop, stop them; the exit code.
        `errors` holds the (name, traceback) of roles that failed."""
        procs: dict[str, Any] = {}
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for role, index in self.roles():
                name = role_name(role, index)
                procs[name] = start(role, index, name)
            self.echo(f"run dir {self.run_dir} | {self.cfg.env.id} | processes: "
                      f"{', '.join(procs)} | {self.cfg.run.env_steps:,} env steps, "
                      f"{total_training_steps(self.cfg):,} training steps"
                      + stop_rule(self.cfg))
            self._watch(procs, counters, errors)
        finally:
            counters["stop"] = 1
            deadline = time.monotonic() + 30.0
            for p in procs.values():
                p.join(timeout=max(deadline - time.monotonic(), 0.1))
            for p in procs.values():
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5.0)
            self._drain_errors(errors)
            for s, handler in old.items():
                signal.signal(s, handler)
        if self.failure is not None:
            who, why = self.failure
            self.echo(f"run failed in {who}:" + ("\n" if "\n" in why.strip() else " ") + why)
            return 1
        if self.stop_reason is not None:
            self.echo(stopped_line(self.run_dir))
        return 0

    def _drain_errors(self, errors: Any) -> None:
        with contextlib.suppress(Exception):
            while not errors.empty():
                who, tb = errors.get_nowait()
                if self.failure is None or "died" in self.failure[1]:
                    self.failure = (who, tb)

    def _watch(self, procs: dict[str, Any], counters: Any, errors: Any) -> None:
        cfg = self.cfg
        start = last = time.perf_counter()
        last_snap = counters.snapshot()
        total_train = total_training_steps(cfg)
        self.evaluations_shown = len(read_evaluations(self.run_dir))  # older ones: a resume
        waiting_announced = False
        while True:
            time.sleep(0.1)
            self._drain_errors(errors)
            if counters["stop"] and self.stop_reason is None and self.failure is None:
                self.stop_reason = "SIGTERM to a child"
                self.echo("a child process received SIGTERM: stopping the run (final "
                          "checkpoint, then exit)")
            if self.failure is not None or self.stop_reason is not None:
                counters["stop"] = 1
                # Give the learner time to write its final checkpoint.
                procs["learner"].join(timeout=30.0)
                return
            for name, p in procs.items():
                code = p.exitcode
                if code is not None and code != 0:
                    time.sleep(0.2)
                    self._drain_errors(errors)
                    if self.failure is None:
                        self.failure = (name, f"{name} died ({describe_exit(code)})")
                    break
            if self.failure is not None:
                continue
            learner_finished = procs["learner"].exitcode == 0
            final_step = counters["final_step"] if learner_finished else total_train
            if learner_finished and (counters["eval_done"] >= final_step
                                     or procs["evaluator"].exitcode is not None):
                self._progress(counters, last_snap, time.perf_counter() - last, start)
                final = self._show_evaluations()
                if final_step < total_train:
                    self.echo(solved_line(cfg, final_step))
                self.echo(f"done in {time.perf_counter() - start:.0f}s" + (
                    f": final mean return {final['mean_return']:.1f}"
                    if final and final["train_steps"] >= final_step else ""))
                return
            now = time.perf_counter()
            if now - last >= cfg.run.log_interval_s:
                self._show_evaluations()
                if not learner_finished:
                    self._progress(counters, last_snap, now - last, start)
                elif not waiting_announced:
                    self.echo("training done; the final evaluation is running")
                    waiting_announced = True
                last, last_snap = now, counters.snapshot()

    def _show_evaluations(self) -> dict[str, Any] | None:
        """Echo the evaluator's rows not shown yet; returns the newest row, if any."""
        rows = read_evaluations(self.run_dir)
        for row in rows[self.evaluations_shown:]:
            self.echo(describe_evaluation(row))
        self.evaluations_shown = len(rows)
        return rows[-1] if rows else None

    def _progress(self, counters: SharedCounters, before: dict[str, Any], seconds: float,
                  start: float) -> None:
        snap = counters.snapshot()
        env_rate = (snap["replay_env_steps"] - before["replay_env_steps"]) / max(seconds, 1e-9)
        train_rate = (snap["train_steps"] - before["train_steps"]) / max(seconds, 1e-9)
        waited = (snap["learner_wait_s"] - before["learner_wait_s"]) / max(seconds, 1e-9)
        fills = {key: sum(r.fill() for r in rings) for key, rings in self.rings.items()}
        slots = {key: sum(r.spec.num_slots for r in rings) for key, rings in self.rings.items()}
        snap_fill = " ".join(f"{k} {fills[k]}/{slots[k]}" for k in fills)
        row = {"wall_s": round(time.perf_counter() - start, 1),
               "env_steps": snap["replay_env_steps"], "train_steps": snap["train_steps"],
               "env_steps_per_s": round(env_rate, 2), "train_steps_per_s": round(train_rate, 2),
               "learner_wait_fraction": round(min(waited, 1.0), 3),
               **{f"ring_fill_{k}": fills[k] / slots[k] for k in fills},
               # Cores each role kept busy over the window (time.process_time).
               **{f"cores_{role}": round((snap[f"cpu_{role}_s"] - before[f"cpu_{role}_s"])
                                         / max(seconds, 1e-9), 2) for role in ROLES},
               "recent_return": snap["recent_return"] if snap["games"] else None,
               "target_version": snap["target_version"],
               "replay_positions": snap["replay_positions"],
               **window_means(snap, before)}
        self.metrics.progress(row)
        self.echo(progress_line(
            self.cfg, row, self.eta,
            extra=f"learner waits {100 * row['learner_wait_fraction']:.0f}% | "
                  + (f"rings {snap_fill} | " if snap_fill else "")
                  +
                  "cores " + "/".join(f"{row[f'cores_{r}']:.1f}" for r in ROLES)
                  + " (collect/reanalyse/learn/eval)"))
