"""The multiprocessing pipeline: collectors, a replay + reanalyse worker and the learner
around one model, exchanging data through shared-memory rings (design.md, "The pipeline").

    collector-i --transitions ring--> reanalyse (owns the replay) --batches ring--> learner
         ^                                  ^                                          |
         |                                  +-------------- priorities ring -----------+
         +------------ self-play weights (versioned, shared memory) <------------------+
                       target weights -> reanalyse;  evaluation weights -> evaluator

The same pieces as the serial trainer (Collector, ReplayBuffer, Reanalyser, Learner) run in
separate processes. Only the learner touches the training device; collectors, the
reanalyser and the evaluator run CPU copies of versioned weights published by the learner.
The supervisor (the ``ezengine train`` process) creates every shared-memory block, starts
and watches the children, prints progress and writes metrics; on Ctrl-C or SIGTERM it stops
them (the learner writes a final checkpoint), and on a child's crash it stops the run with
the child's traceback and a non-zero exit. Every segment is unlinked at exit.

Nothing collected is lost: each collector appends every transition record to
``replay/collector-<i>.bin`` before publishing it, and a resumed run rebuilds its replay
from those logs (trajectories open at the stop are closed as cut, so they bootstrap).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ezengine.atomic import DiskFullError, raise_if_disk_full
from ezengine.checkpoint import load_checkpoint, save_checkpoint
from ezengine.collector import Collector, finished_games, store_transition, transition_fields
from ezengine.config import Config, config_from_dict, config_to_dict, save_config
from ezengine.envs import VectorEnv, make_env
from ezengine.evaluate import describe_evaluation, evaluate
from ezengine.learner import Learner
from ezengine.metrics import Eta, MetricsWriter, drop_torn_rows
from ezengine.model import EfficientZeroNet, build_model
from ezengine.reanalyse import Reanalyser, TrainingBatch
from ezengine.replay import ReplayBuffer, initial_allocation
from ezengine.rings import (
    CountersSpec,
    Ring,
    RingClosed,
    RingSpec,
    RingTimeout,
    SharedCounters,
    SharedWeights,
    SlotLayout,
    WeightsSpec,
    load_flat,
    run_prefix,
    state_size,
    unlink_orphaned_segments,
    unlink_segments,
)
from ezengine.rundir import claim_run_dir, resume_point, stopped_line
from ezengine.scores import read_evaluations
from ezengine.search import BatchedSearch, SearchResult
from ezengine.trainer import (
    configure_torch,
    paced_training_steps,
    resolve_device,
    total_training_steps,
    visit_temperature,
)

POLL_S = 0.001
# Blocks this (child) process attached; detached before it exits so no view outlives them.
_ATTACHED: list[Any] = []


def attach(kind: type, spec: Any) -> Any:
    """Attach a shared-memory block (Ring, SharedCounters or SharedWeights) in a child."""
    block = kind.attach(spec)
    _ATTACHED.append(block)
    return block
INT_COUNTERS = ("stop", "replay_env_steps", "replay_positions", "train_steps",
                "target_version", "batches", "games", "learner_done", "eval_done",
                "eval_request")
# Learner metrics copied into every progress row of metrics.jsonl.
LEARNER_METRICS = ("target_lag", "is_weight_mean", "value_mean", "value_target_mean",
                   "priority_mean")
FLOAT_COUNTERS = ("recent_return", "loss", "loss_value", "loss_policy", "loss_value_prefix",
                  "loss_consistency", "learner_wait_s", *LEARNER_METRICS)


@dataclass
class Observation:
    """What the environments look like: one frame's shape and dtype, and |A|."""

    shape: tuple[int, ...]
    dtype: str
    num_actions: int


@dataclass
class PipelineSpec:
    """Everything a child process needs (picklable)."""

    config: dict[str, Any]
    run_dir: str
    obs: Observation
    num_collectors: int
    resume: bool
    transitions: list[RingSpec]
    batches: RingSpec
    priorities: RingSpec
    counters: CountersSpec
    selfplay_weights: WeightsSpec
    target_weights: WeightsSpec
    eval_weights: WeightsSpec
    search_requests: list[RingSpec]  # per collector; empty unless collector_inference=learner
    search_results: list[RingSpec]
    prefix: str  # every segment's name starts with it
    supervisor_pid: int

    def cfg(self) -> Config:
        return config_from_dict(self.config, source=f"{self.run_dir}/config.yaml")


# ---------------------------------------------------------------------- layouts and logs


def model_input_shape(cfg: Config, obs: Observation) -> tuple[int, ...]:
    """Shape of one model input: frame_stack frames stacked on the first axis."""
    return (obs.shape[0] * cfg.env.frame_stack, *obs.shape[1:])


def search_request_fields(cfg: Config, obs: Observation) -> list[tuple[str, tuple[int, ...],
                                                                      np.dtype]]:
    """A collector's search request to the model owner: its N stacked observations."""
    return [("obs", (cfg.env.num_envs, *model_input_shape(cfg, obs)), np.dtype(obs.dtype))]


def search_result_fields(cfg: Config, obs: Observation) -> list[tuple[str, tuple[int, ...],
                                                                     np.dtype]]:
    """The model owner's answer: a SearchResult for N roots."""
    n = cfg.env.num_envs
    return [("visit_counts", (n, obs.num_actions), np.dtype(np.int32)),
            ("root_values", (n,), np.dtype(np.float32)),
            ("predicted_values", (n,), np.dtype(np.float32))]


def batch_fields(cfg: Config, obs: Observation) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of a TrainingBatch in the batches ring."""
    b, k, a = cfg.learner.batch_size, cfg.learner.unroll_steps, obs.num_actions
    return [
        ("frames", (b, cfg.env.frame_stack + k, *obs.shape), np.dtype(obs.dtype)),
        ("actions", (b, k), np.dtype(np.int64)),
        ("value_targets", (b, k + 1), np.dtype(np.float32)),
        ("value_prefix_targets", (b, k), np.dtype(np.float32)),
        ("policy_targets", (b, k + 1, a), np.dtype(np.float32)),
        ("masks", (b, k + 1), np.dtype(np.float32)),
        ("weights", (b,), np.dtype(np.float32)),
        ("positions", (b,), np.dtype(np.int64)),
        ("target_version", (1,), np.dtype(np.int64)),
    ]


def transition_layout(cfg: Config, obs: Observation) -> list[tuple[str, tuple[int, ...],
                                                                   np.dtype]]:
    """Fields of one collector's transition records."""
    return transition_fields(cfg.env.num_envs, obs.shape, np.dtype(obs.dtype), obs.num_actions)


class TransitionLog:
    """Append-only file of fixed-size transition records (one collector's, in order).

    A record is the concatenation of its fields' bytes; a record cut short by a crash is
    ignored when reading.
    """

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], np.dtype]]) -> None:
        self.path = path
        self.dtype = np.dtype([(name, dt, shape) for name, shape, dt in layout])

    def append(self, record: Any) -> None:
        """Write one record (a mapping of arrays) and hand it to the OS: a killed process
        loses nothing it has appended."""
        try:
            with open(self.path, "ab") as f:
                f.write(b"".join(np.ascontiguousarray(record[name]).tobytes()
                                 for name in self.dtype.names))
        except OSError as exc:
            raise_if_disk_full(exc, self.path, "every record before this one is kept (a "
                               "resume drops the partial one)")
            raise

    def drop_partial_record(self) -> int:
        """Cut a record left half-written by a killed collector off the end of the file, so
        that appending goes on at a record boundary; returns the bytes removed."""
        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        extra = size % self.dtype.itemsize
        if extra:
            os.truncate(self.path, size - extra)
        return extra

    def count(self) -> int:
        """Number of complete records."""
        return self.path.stat().st_size // self.dtype.itemsize if self.path.exists() else 0

    def read(self) -> np.ndarray:
        """All complete records, as a read-only structured array mapped from the file (an
        Atari run's log is gigabytes: it is paged in as it is read, never copied whole)."""
        n = self.count()
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n,))

    def last_env_steps(self) -> int:
        """The collector's environment steps at its last complete record (0 if none)."""
        n = self.count()
        return int(self.read()[n - 1]["env_steps"][0]) if n else 0


def log_path(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / "replay" / f"collector-{index}.bin"


def cpu_model(cfg: Config, obs: Observation) -> EfficientZeroNet:
    """A CPU copy of the network for acting or reanalysing (eval mode)."""
    return build_model(cfg.model, obs.shape, obs.num_actions, cfg.env.frame_stack).eval()


def refresh(model: EfficientZeroNet, weights: SharedWeights, flat: np.ndarray,
            loaded: int) -> int:
    """Load newer published weights into `model`; returns the version now loaded."""
    if weights.version != loaded:
        loaded = weights.read_into(flat)
        load_flat(model, flat)
    return loaded


def write_unless_stopped(ring: Ring, counters: SharedCounters, fill: Any) -> bool:
    """Write one slot with `fill(slot)`, waiting while the ring is full; gives up (returns
    False) once the run is stopping, so a producer never hangs on a consumer that quit."""
    while True:
        try:
            with ring.write(timeout=1.0) as slot:
                fill(slot)
            return True
        except RingTimeout:
            if counters["stop"]:
                return False


def wait_for_version(weights: SharedWeights, counters: SharedCounters) -> None:
    """Block until the learner has published the first weights (or the run stops)."""
    while weights.version == 0 and not counters["stop"]:
        time.sleep(0.01)


# ---------------------------------------------------------------------- roles


def run_collector(spec: PipelineSpec, index: int) -> None:
    """Step this collector's environments and publish every transition record."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    ring = attach(Ring, spec.transitions[index])
    weights = attach(SharedWeights, spec.selfplay_weights)
    log = TransitionLog(log_path(spec.run_dir, index), transition_layout(cfg, spec.obs))
    start_steps = log.last_env_steps()
    n = cfg.env.num_envs
    # A fresh seed stream after a resume, so resumed episodes do not repeat old ones.
    seed = cfg.run.seed + 1000 * (index + 1) + start_steps
    envs = VectorEnv(cfg.env, seed=seed, train=True)
    search = BatchedSearch(cfg.search, spec.obs.num_actions, cfg.learner.discount,
                           cfg.learner.value_prefix_horizon, seed=seed)
    collector = Collector(envs, search, clip_rewards=cfg.env.clip_rewards,
                          frame_stack=cfg.env.frame_stack, seed=seed, env_steps=start_steps)
    remote = (SearchClient(attach(Ring, spec.search_requests[index]),
                           attach(Ring, spec.search_results[index]), counters)
              if spec.search_requests else None)
    model = cpu_model(cfg, spec.obs)
    flat = np.empty(weights.spec.size, dtype=np.float32)
    loaded = 0
    run = cfg.run
    per_collector = spec.num_collectors * n
    share = -(-run.env_steps // per_collector) * n  # this collector's budget
    # This collector's part of the random warm-up, counted at the collector: a count of what
    # the replay has ingested would lag by the ring's contents at start-up.
    warmup_share = -(-run.start_transitions // per_collector) * n
    while not counters["stop"] and collector.env_steps < share:
        total = counters["replay_env_steps"]
        warmup = collector.env_steps < warmup_share
        if not warmup:
            # Pacing: stay within one vector step of the replay ratio.
            allowed = (counters["train_steps"] + 1) / run.replay_ratio
            if total >= allowed + n * spec.num_collectors:
                time.sleep(POLL_S)
                continue
            if remote is None:
                wait_for_version(weights, counters)
                loaded = refresh(model, weights, flat, loaded)
        temperature = visit_temperature(cfg, total)
        policy = None if warmup else (remote or model)
        try:
            with ring.write(timeout=1.0) as slot:
                collector.step(policy, temperature, out=slot)
                log.append(slot)
        except RingTimeout:
            continue
    envs.close()
    ring.close()


class SearchClient:
    """A collector's searches run by the model owner (run.collector_inference: learner): the
    stacked observations go out through a request ring, the visit counts come back."""

    def __init__(self, requests: Ring, results: Ring, counters: SharedCounters) -> None:
        self.requests = requests
        self.results = results
        self.counters = counters

    def search(self, obs: np.ndarray) -> SearchResult:
        """Search from stacked observations [N, ...]; raises Stopped if the run stops."""
        def fill(slot: Any) -> None:
            slot["obs"][...] = obs
        if not write_unless_stopped(self.requests, self.counters, fill):
            raise Stopped("the run stopped while a search was pending")
        while True:
            try:
                with self.results.read(timeout=1.0) as slot:
                    return SearchResult(np.array(slot["visit_counts"]),
                                        np.array(slot["root_values"]),
                                        np.array(slot["predicted_values"]))
            except RingTimeout:
                if self.counters["stop"]:
                    raise Stopped("the run stopped while a search was pending") from None


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
        self.model = cpu_model(cfg, spec.obs).to(self.device)
        # Seeded like the collectors' own searches, by the steps so far: a resumed run does
        # not repeat its root noise.
        start = counters["replay_env_steps"]
        self.searches = [BatchedSearch(cfg.search, spec.obs.num_actions, cfg.learner.discount,
                                       cfg.learner.value_prefix_horizon,
                                       seed=cfg.run.seed + 1000 * (i + 1) + start)
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
        n, lc = cfg.env.num_envs, cfg.learner
        self.n = n
        self.replay = ReplayBuffer(
            cfg.replay.capacity, spec.obs.shape, np.dtype(spec.obs.dtype),
            spec.obs.num_actions, num_writers=spec.num_collectors * n, alpha=cfg.replay.alpha,
            frame_stack=cfg.env.frame_stack, lookahead=lc.unroll_steps + lc.td_steps,
            initial_capacity=initial_allocation(cfg.run.env_steps, spec.num_collectors * n))
        self.env_steps = [0] * spec.num_collectors
        self.recent: deque[float] = deque(maxlen=20)
        if spec.resume:
            self.env_steps = rebuild_from_logs(
                self.replay, [log_path(spec.run_dir, i) for i in range(spec.num_collectors)],
                transition_layout(cfg, spec.obs), n, self.recent)
        self._publish_counts()
        self.reanalyser = Reanalyser(cfg, self.replay, spec.obs.num_actions,
                                     seed=cfg.run.seed + 1)
        self.rng = np.random.default_rng(cfg.run.seed + 2)
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
        cfg = self.cfg
        progress = min(self.counters["train_steps"] / max(self.total_train, 1), 1.0)
        beta = cfg.replay.beta_start + (cfg.replay.beta_end - cfg.replay.beta_start) * progress
        sample = self.replay.sample(cfg.learner.batch_size, beta, self.rng)
        return self.reanalyser.build(target, sample, self.total_env_steps, target_version)


def run_reanalyse(spec: PipelineSpec) -> None:
    """Own the replay: store transitions, apply priorities, build training batches."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    worker = ReplayWorker(spec, cfg, counters)
    batches = attach(Ring, spec.batches)
    priorities = attach(Ring, spec.priorities)
    target_weights = attach(SharedWeights, spec.target_weights)
    target = cpu_model(cfg, spec.obs)
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


def ingest_record(replay: ReplayBuffer, record: Any, collector: int, env_steps: list[int],
                  num_envs: int) -> None:
    """Store one record of collector `collector` (its environments write as writers
    collector * num_envs + e) and count its steps in `env_steps` (per collector). The
    positions are stamped with the total over all collectors, this record included: ages
    are measured against that total (spec 2.5), so a collector's own count would make new
    data look old."""
    env_steps[collector] = int(record["env_steps"][0])
    store_transition(replay, record, collector * num_envs, sum(env_steps))


def rebuild_from_logs(replay: ReplayBuffer, paths: list[Path], layout: list, num_envs: int,
                      recent: deque[float]) -> list[int]:
    """Replay the collectors' logs into `replay` together, stamped as live ingestion
    stamps them, so a resumed run's ages match the original run's within the rings' lag.

    Records are merged in the order they were most likely ingested: by their own
    collector's env steps (collectors step at about the same rate), ties by collector
    index. Trajectories left open are closed as cut (they bootstrap from the last
    observation). Returns each collector's environment steps.
    """
    logs = [TransitionLog(path, layout).read() for path in paths]
    who = np.concatenate([np.full(len(log), i) for i, log in enumerate(logs)])
    index = np.concatenate([np.arange(len(log)) for log in logs])
    steps = np.concatenate([log["env_steps"][:, 0] for log in logs])
    env_steps = [0] * len(logs)
    for k in np.lexsort((who, steps)):  # stable: each log stays in its own order
        rec = logs[who[k]][index[k]]
        ingest_record(replay, rec, int(who[k]), env_steps, num_envs)
        recent.extend(finished_games(rec))
    total = sum(env_steps)
    for c, log in enumerate(logs):
        if len(log):
            last = log[-1]
            for i in np.flatnonzero(~(last["terminated"] | last["truncated"])):
                replay.close(c * num_envs + int(i), last["final_obs"][i], False, total)
    return env_steps


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
                return TrainingBatch(
                    **{f.name: np.array(slot[f.name]) for f in fields(TrainingBatch)
                       if f.name != "target_version"},
                    target_version=int(slot["target_version"][0]))
        except RingTimeout:
            return None
        finally:
            self.waited_s += time.perf_counter() - t0

    def send_priorities(self, positions: np.ndarray, priorities: np.ndarray) -> None:
        def fill(slot: Any) -> None:
            slot["positions"][...] = positions
            slot["priorities"][...] = priorities
        write_unless_stopped(self.priorities, self.counters, fill)


class LocalBatches:
    """Training batches reanalysed in this (the learner's) process with its target model on
    the training device: the reanalysis inference, most of the compute, runs on the GPU."""

    def __init__(self, spec: PipelineSpec, cfg: Config, counters: SharedCounters,
                 learner: Learner) -> None:
        self.worker = ReplayWorker(spec, cfg, counters)
        self.learner = learner
        self.waited_s = 0.0

    def next(self, timeout: float) -> TrainingBatch | None:
        """Reanalyse a batch as soon as the replay ratio allows one; None after timeout."""
        deadline = time.perf_counter() + timeout
        while True:
            while self.worker.ingest():
                pass
            if self.learner.steps < self.worker.batches_allowed():
                return self.worker.build(self.learner.target, self.learner.target_version)
            if time.perf_counter() >= deadline:
                return None
            time.sleep(POLL_S)
            self.waited_s += POLL_S

    def send_priorities(self, positions: np.ndarray, priorities: np.ndarray) -> None:
        self.worker.replay.update_priorities(positions, priorities)


def run_learner(spec: PipelineSpec) -> None:
    """Own the model: train on batches, send priorities, publish weights, checkpoint."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    selfplay = attach(SharedWeights, spec.selfplay_weights)
    target_w = attach(SharedWeights, spec.target_weights)
    eval_w = attach(SharedWeights, spec.eval_weights)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)  # the initial weights (a resumed run loads its own)
    learner = Learner(cfg, cpu_model(cfg, spec.obs).train(), device)
    run_dir = Path(spec.run_dir)
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    if spec.resume and ckpt_path.exists():
        learner.load_state_dict(load_checkpoint(ckpt_path, map_location=device)["learner"])
    source: RingBatches | LocalBatches = (
        LocalBatches(spec, cfg, counters, learner) if reanalyse_in_learner(cfg)
        else RingBatches(spec, counters))
    server = SearchServer(spec, cfg, learner, counters) if spec.search_requests else None
    published = {"selfplay": 0, "target": 0, "eval": 0}

    def publish(name: str, block: SharedWeights, module: torch.nn.Module) -> None:
        published[name] += 1
        block.publish_state(module.state_dict(), published[name])

    def checkpoint() -> None:
        save_checkpoint({"learner": learner.state_dict(),
                         "selfplay": learner.model.state_dict(),
                         "env_steps": counters["replay_env_steps"],
                         "config": spec.config}, ckpt_path)

    counters["train_steps"] = learner.steps
    counters["target_version"] = learner.target_version
    publish("selfplay", selfplay, learner.model)
    publish("target", target_w, learner.target)
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
        source.send_priorities(batch.positions, prio)
        steps = learner.steps
        counters["train_steps"] = steps
        for name in FLOAT_COUNTERS:
            if name in metrics:
                counters[name] = metrics[name]
        if steps % run.selfplay_update_interval == 0:
            publish("selfplay", selfplay, learner.model)
            if server is not None:
                server.refresh()
        if learner.target_version != target_before:
            publish("target", target_w, learner.target)
            counters["target_version"] = learner.target_version
        if steps % run.eval_interval == 0 or steps == total_train:
            counters["eval_request"] = steps
            publish("eval", eval_w, learner.model)
        if steps % run.checkpoint_interval == 0:
            checkpoint()
    checkpoint()
    counters["learner_done"] = 1


def run_evaluator(spec: PipelineSpec) -> None:
    """Evaluate each model the learner publishes for evaluation; append to eval.jsonl."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    weights = attach(SharedWeights, spec.eval_weights)
    model = cpu_model(cfg, spec.obs)
    flat = np.empty(weights.spec.size, dtype=np.float32)
    loaded = 0
    start = time.perf_counter()
    metrics = MetricsWriter(Path(spec.run_dir))
    while not counters["stop"]:
        learner_done = counters["learner_done"]  # read before the version: no lost final eval
        if weights.version == loaded:
            if learner_done:
                break
            time.sleep(0.05)
            continue
        loaded = refresh(model, weights, flat, loaded)
        steps = counters["eval_request"]
        env_steps = counters["replay_env_steps"]
        result = evaluate(model, cfg, cfg.run.eval_episodes, seed=cfg.run.seed + 10_000)
        row = {"train_steps": steps, "env_steps": env_steps,
               "wall_s": round(time.perf_counter() - start, 1), **result.record()}
        metrics.evaluation(row)
        counters["eval_done"] = steps


ROLES = {"learner": run_learner, "reanalyse": run_reanalyse, "evaluator": run_evaluator}


def set_process_name(name: str) -> None:
    """Show `name` in ps/top (Linux; a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _stop_run(signum: int, _frame: Any) -> None:
    """SIGTERM in a child (sent by a user, or by the kernel when the supervisor died): stop
    the whole run the orderly way, through the shared stop flag (the learner writes its
    final checkpoint); before the counters are attached there is nothing to save."""
    counters = [b for b in _ATTACHED if isinstance(b, SharedCounters)]
    if counters:
        counters[0]["stop"] = 1
    if not counters or _INTERRUPTIBLE:
        raise Stopped(signal.Signals(signum).name)


class Stopped(Exception):
    """This child was told to stop at a point where it has nothing to save."""


# Whether SIGTERM may end this child at once (the evaluator: an evaluation in progress is
# worth nothing to a stopped run) instead of at its next check of the stop flag.
_INTERRUPTIBLE = False


def follow_supervisor(supervisor_pid: int) -> None:
    """Have the kernel send this child SIGTERM when the supervisor dies (Linux's
    PR_SET_PDEATHSIG), so a killed ``ezengine train`` leaves no orphans."""
    signal.signal(signal.SIGTERM, _stop_run)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor_pid:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(role: str, index: int, spec: PipelineSpec, errors: Any) -> None:
    """Entry point of every child: quiet Ctrl-C (the supervisor handles it), stop with the
    supervisor, one torch thread, flushed denormals; a crash sends its traceback to the
    supervisor. The last act of a child that outlived the supervisor is to unlink the run's
    shared memory (the supervisor would have)."""
    global _INTERRUPTIBLE
    _INTERRUPTIBLE = role == "evaluator"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follow_supervisor(spec.supervisor_pid)
    name = f"{role}-{index}" if role == "collector" else role
    set_process_name(f"ez-{name}")
    configure_torch(threads=1)
    try:
        if role == "collector":
            run_collector(spec, index)
        else:
            ROLES[role](spec)
    except Stopped:
        pass
    except DiskFullError as exc:  # the user's to fix: one line, no traceback
        errors.put((name, str(exc)))
        sys.exit(1)
    except BaseException:
        errors.put((name, traceback.format_exc()))
        sys.exit(1)
    finally:
        for block in _ATTACHED:
            block.detach()
        if os.getppid() != spec.supervisor_pid:
            unlink_segments(spec.prefix)


# ---------------------------------------------------------------------- supervisor


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


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

    def _observation(self) -> Observation:
        env = make_env(self.cfg.env, seed=0, train=True)
        shape, dtype = env.observation_space.shape, np.dtype(env.observation_space.dtype)
        obs = Observation(tuple(shape), dtype.str, int(env.action_space.n))
        env.close()
        return obs

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
        obs = self._observation()
        size = state_size(cpu_model(cfg, obs).state_dict())
        if self.resume:
            # Every collector that wrote a log must be rebuilt (and continues collecting).
            logs = len(list((self.run_dir / "replay").glob("collector-*.bin")))
            self.num_collectors = max(self.num_collectors, logs)
            resume_from = self._replay_point(obs, trained)
            drop_torn_rows(self.run_dir)
        leftovers = unlink_orphaned_segments("ez")
        if leftovers:
            self.echo(f"removed {len(leftovers)} shared-memory segments left in /dev/shm by "
                      "runs that were killed whole")
        prefix = run_prefix("ez")
        blocks: list[Any] = []
        self.metrics = MetricsWriter(self.run_dir)
        try:
            def per_collector(fields: list, slots: int, name: str, count: int) -> list[Ring]:
                """One ring per collector; `name` has a {} for the collector index."""
                return [Ring.create(prefix, SlotLayout(fields), slots, name=name.format(i))
                        for i in range(count)]

            transitions = per_collector(transition_layout(cfg, obs), 64,
                                        "transitions: collector-{} -> reanalyse",
                                        self.num_collectors)
            batches = Ring.create(prefix, SlotLayout(batch_fields(cfg, obs)), 2,
                                  name="batches: reanalyse -> learner")
            b = cfg.learner.batch_size
            priorities = Ring.create(prefix, SlotLayout([
                ("positions", (b,), np.int64), ("priorities", (b,), np.float64)]), 16,
                name="priorities: learner -> reanalyse")
            counters = SharedCounters.create(
                prefix, ints=INT_COUNTERS,
                floats=FLOAT_COUNTERS)
            weights = {name: SharedWeights.create(prefix, size, name=f"{name} weights")
                       for name in ("selfplay", "target", "eval")}
            remote_collectors = (self.num_collectors
                                 if cfg.run.collector_inference == "learner" else 0)
            requests = per_collector(search_request_fields(cfg, obs), 1,
                                     "search requests: collector-{} -> learner", remote_collectors)
            results = per_collector(search_result_fields(cfg, obs), 1,
                                    "search results: learner -> collector-{}", remote_collectors)
            blocks = [*transitions, batches, priorities, counters, *weights.values(),
                      *requests, *results]
            self.rings = [*transitions, batches]
            if self.resume:
                counters["train_steps"], counters["replay_env_steps"] = resume_from
            spec = PipelineSpec(config_to_dict(cfg), str(self.run_dir), obs,
                                self.num_collectors, self.resume,
                                [r.spec for r in transitions], batches.spec, priorities.spec,
                                counters.spec, weights["selfplay"].spec,
                                weights["target"].spec, weights["eval"].spec,
                                [r.spec for r in requests], [r.spec for r in results], prefix,
                                os.getpid())
            return self._supervise(spec, counters)
        finally:
            for block in blocks:
                block.unlink()
            unlink_segments(prefix)
            self.metrics.close()

    def _replay_point(self, obs: Observation, steps: int) -> tuple[int, int]:
        """(training steps of the latest checkpoint, env steps in the replay logs); says
        where the run resumes from."""
        layout = transition_layout(self.cfg, obs)
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

    def _supervise(self, spec: PipelineSpec, counters: SharedCounters) -> int:
        ctx = mp.get_context("spawn")
        errors = ctx.Queue()
        procs: dict[str, mp.process.BaseProcess] = {}
        roles = [("learner", 0), ("evaluator", 0)]
        if not reanalyse_in_learner(self.cfg):
            roles.append(("reanalyse", 0))
        roles += [("collector", i) for i in range(self.num_collectors)]
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for role, index in roles:
                name = f"{role}-{index}" if role == "collector" else role
                procs[name] = ctx.Process(target=child_main, args=(role, index, spec, errors),
                                          name=f"ezengine-{name}", daemon=True)
                procs[name].start()
            self.echo(f"run dir {self.run_dir} | {self.cfg.env.id} | processes: "
                      f"{', '.join(procs)} | {self.cfg.run.env_steps:,} env steps, "
                      f"{total_training_steps(self.cfg):,} training steps")
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

    def _watch(self, procs: dict[str, mp.process.BaseProcess], counters: SharedCounters,
               errors: Any) -> None:
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
            if learner_finished and (counters["eval_done"] >= total_train
                                     or procs["evaluator"].exitcode is not None):
                self._progress(counters, last_snap, time.perf_counter() - last, start)
                final = self._show_evaluations()
                self.echo(f"done in {time.perf_counter() - start:.0f}s" + (
                    f": final mean return {final['mean_return']:.1f}"
                    if final and final["train_steps"] >= total_train else ""))
                return
            now = time.perf_counter()
            if now - last >= cfg.run.log_interval_s:
                self._show_evaluations()
                if not learner_finished:
                    self._progress(counters, last_snap, now - last, start)
                elif not waiting_announced:
                    self.echo(f"training done; the final evaluation ({cfg.run.eval_episodes} "
                              "episodes) is running")
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
        fills = {ring.spec.name.split(":")[0]: 0 for ring in self.rings}
        slots = dict(fills)
        for ring in self.rings:
            key = ring.spec.name.split(":")[0]
            fills[key] += ring.fill()
            slots[key] += ring.spec.num_slots
        snap_fill = " ".join(f"{k} {fills[k]}/{slots[k]}" for k in fills)
        row = {"wall_s": round(time.perf_counter() - start, 1),
               "env_steps": snap["replay_env_steps"], "train_steps": snap["train_steps"],
               "env_steps_per_s": round(env_rate, 2), "train_steps_per_s": round(train_rate, 2),
               "learner_wait_fraction": round(min(waited, 1.0), 3),
               **{f"ring_fill_{k}": fills[k] / slots[k] for k in fills},
               "recent_return": snap["recent_return"] if snap["games"] else None,
               "target_version": snap["target_version"],
               "replay_positions": snap["replay_positions"],
               **{k: snap[k] for k in FLOAT_COUNTERS if k.startswith("loss")},
               **{k: snap[k] for k in LEARNER_METRICS}}
        self.metrics.progress(row)
        ret = "-" if row["recent_return"] is None else f"{row['recent_return']:.1f}"
        self.echo(f"env {row['env_steps']:,}/{self.cfg.run.env_steps:,} | train "
                  f"{row['train_steps']:,}/{total_training_steps(self.cfg):,} | return {ret} | "
                  f"loss {row['loss']:.3f} | {env_rate:.0f} env/s {train_rate:.1f} train/s | "
                  f"learner waits {100 * row['learner_wait_fraction']:.0f}% | "
                  f"rings {snap_fill} | " + self.eta.text(
                      row["env_steps"], self.cfg.run.env_steps, row["train_steps"],
                      total_training_steps(self.cfg)))
