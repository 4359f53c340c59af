"""The pipeline on a Ray cluster (``ezengine train CONFIG --backend ray``): the same roles,
run as Ray actors, talking through `RayTransport` to one `Hub` actor on the node that
starts the run.

The hub holds what the shared-memory blocks hold on one machine: a bounded queue of
transition records per collector (it appends each record to the collector's transition log
in the run directory before queueing it), the published weights (the last HISTORY_SLOTS
self-play and target publishes under their training steps, the latest evaluation weights),
the counters, and the role actors' handles. Its methods never block the actor: waits are
awaited conditions, so every role's calls go on while one waits.

What every training step sends (batches, priorities, reanalysis jobs and results) goes
straight to the actor of the role that takes it, into that actor's `Inbox`: one call per
item, and a take is a wait on a local queue. Records, batches and weights travel as numpy
arrays through Ray's object store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.config import Config, config_to_dict
from ezengine.device import configure_torch, resolve_device
from ezengine.envs import EnvDescription
from ezengine.pipeline.layouts import transition_layout
from ezengine.pipeline.learner_role import reanalyse_in_learner
from ezengine.pipeline.spec import (
    FLOAT_COUNTERS,
    INT_COUNTERS,
    RING_SLOTS,
    PipelineSpec,
    role_name,
)
from ezengine.pipeline.supervisor import PipelineTrainer
from ezengine.pipeline.transition_log import TransitionLog, log_path
from ezengine.pipeline.transport import Closed, Stopped, Timeout
from ezengine.pipeline.weights import HISTORY_SLOTS, flatten_state, load_flat
from ezengine.recipe import published_step
from ezengine.search import SearchResult


def import_ray() -> Any:
    """The ray module, or a one-line ValueError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install -e \".[ray]\" in the ezengine "
                         "checkout (or pip install 'ray>=2.40')") from None
    return ray


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A ConnectionError at once if `address` (HOST:PORT) takes no connection: Ray itself
    retries an unreachable head for minutes. 'auto' and ray:// addresses are Ray's."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc})") from None


class Hub:
    """The exchange every role's RayTransport calls (a Ray actor; see the module doc)."""

    WAIT_S = 1.0  # how often a waiting put looks at the stop flag

    def __init__(self, spec: PipelineSpec, start: Mapping[str, int]) -> None:
        cfg = spec.cfg()
        layout = transition_layout(cfg, spec.env)
        self.logs = [TransitionLog(log_path(spec.run_dir, i), layout)
                     for i in range(spec.num_collectors)]
        self.records: list[deque] = [deque() for _ in range(spec.num_collectors)]
        self.record_seq = [0] * spec.num_collectors  # the next record each queue takes
        self.ended = [False] * spec.num_collectors
        self.peers: dict[str, Any] = {}  # role name -> its actor
        self.weights: dict[str, dict[int, np.ndarray]] = {"selfplay": {}, "target": {}}
        self.eval: tuple[int, np.ndarray] | None = None
        self.counters: dict[str, float] = {name: 0 for name in INT_COUNTERS}
        self.counters.update({name: 0.0 for name in FLOAT_COUNTERS})
        self.counters.update(start)
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait(self, ready: Any, timeout: float) -> bool:
        """Wait until ready() (or the run stops); whether it is ready."""
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: ready() or self.counters["stop"]), timeout)
            except TimeoutError:
                return False
        return bool(ready())

    # -------------------------------------------------------------- records

    def logged_env_steps(self, collector: int) -> int:
        return self.logs[collector].last_env_steps()

    async def put_record(self, collector: int, seq: int, record: dict) -> bool:
        """Log and queue the collector's `seq`-th record (numbered from this run's start),
        once it is next in order and its queue has room. The collector stepped its
        environments for it before sending it, so once the run stops room no longer
        counts: the record is logged, not dropped (False if its turn does not come within
        WAIT_S of the stop: an earlier record never arrived)."""
        queue = self.records[collector]

        def turn() -> bool:
            return self.record_seq[collector] == seq

        while not await self._wait(lambda: turn() and len(queue) < RING_SLOTS["transitions"],
                                   self.WAIT_S):
            if self.counters["stop"]:
                async with self.changed:
                    try:
                        await asyncio.wait_for(self.changed.wait_for(turn), self.WAIT_S)
                    except TimeoutError:
                        return False
                break
        self.logs[collector].append(record)
        queue.append(record)
        self.record_seq[collector] += 1
        await self._notify()
        return True

    async def end_records(self, collector: int) -> None:
        self.ended[collector] = True
        await self._notify()

    async def take_records(self, collector: int, timeout: float) -> list[dict] | str | None:
        """Every record queued (at least one), "ended" once the collector ended and its
        queue is empty, or None after `timeout`."""
        queue = self.records[collector]
        if not await self._wait(lambda: queue or self.ended[collector], timeout):
            return None
        if not queue:
            return "ended"
        records = list(queue)
        queue.clear()
        await self._notify()
        return records

    # -------------------------------------------------------------- role actors

    async def register(self, name: str, actor: Any) -> None:
        self.peers[name] = actor
        await self._notify()

    async def peer(self, name: str, timeout: float) -> Any:
        """The actor of role `name`, once the launcher has registered it (None: not
        within `timeout`)."""
        if not await self._wait(lambda: name in self.peers, timeout):
            return None
        return self.peers[name]

    # -------------------------------------------------------------- weights, counters

    async def publish(self, kind: str, flat: np.ndarray, step: int) -> None:
        """Hold `flat` as the `kind` weights of training `step`, which the learner has
        trained: the waits for it end here (its own write of train_steps comes later)."""
        if kind == "eval":
            self.eval = (step, flat)
        else:
            held = self.weights[kind]
            held[step] = flat
            while len(held) > HISTORY_SLOTS:
                del held[min(held)]
        if self.counters["train_steps"] < step:
            self.counters["train_steps"] = step
            await self._notify()

    def choose(self, kind: str, step: int) -> int | None:
        """The training step of the publish a reader of `step` takes (None: none yet)."""
        if kind == "eval":
            return None if self.eval is None else self.eval[0]
        held = list(self.weights[kind])
        return published_step(held, step) if held else None

    def weights_of(self, kind: str, step: int) -> np.ndarray:
        return self.eval[1] if kind == "eval" else self.weights[kind][step]

    async def add_counters(self, deltas: Mapping[str, float], values: Mapping[str, float]
                           ) -> None:
        """Add `deltas` and write `values` (in this order, one caller's calls in the order
        sent: the updates happen before the first await), then wake the waits."""
        for name, delta in deltas.items():
            self.counters[name] += delta
        self.counters.update(values)
        await self._notify()

    def counter(self, name: str) -> float:
        return self.counters[name]

    def flags(self, names: tuple[str, ...]) -> list[float]:
        return [self.counters[name] for name in names]

    def snapshot(self) -> dict[str, float]:
        return dict(self.counters)

    async def wait_for_training(self, step: int, timeout: float
                                ) -> tuple[bool, int, dict[str, list[int]]]:
        """Whether the learner has trained `step` (or finished) within `timeout`, the
        training steps it has done, and the steps of the publishes held (a reader picks
        its publish from them without another call)."""
        done = await self._wait(lambda: (self.counters["train_steps"] >= step
                                         or self.counters["learner_done"]), timeout)
        return (done, int(self.counters["train_steps"]),
                {kind: list(held) for kind, held in self.weights.items()})


def writable(item: Any) -> Any:
    """`item` with every numpy array in it writable, as the local rings hand them out:
    arrays from Ray's object store are read-only views, which torch.from_numpy warns about
    (a copy only where an array is read-only)."""
    if isinstance(item, np.ndarray):
        return item if item.flags.writeable else item.copy()
    if isinstance(item, tuple):
        return tuple(writable(x) for x in item)
    if isinstance(item, TrainingBatch):
        return dataclasses.replace(item, **{f.name: writable(getattr(item, f.name))
                                            for f in dataclasses.fields(item)})
    return item


def direct_queues(spec: PipelineSpec) -> dict[str, tuple[str, int]]:
    """The queues that go straight between role actors: for each, the role (role_name)
    that takes it and how many items it holds, as the local rings. The learner takes the
    batches, helper p its jobs (one slot), and the replay's owner the priorities and the
    helpers' results (one slot each)."""
    cfg = spec.cfg()
    owner = "learner" if reanalyse_in_learner(cfg) else role_name("reanalyse", 0)
    queues = {"batches": ("learner", RING_SLOTS["batches"]),
              "priorities": (owner, RING_SLOTS["priorities"])}
    for p in range(1, cfg.run.reanalysers):
        queues[f"jobs-{p}"] = (role_name("reanalyse", p), 1)
        queues[f"results-{p}"] = (owner, 1)
    return queues


class Inbox:
    """A role actor's bounded queues of items sent straight to it (`direct_queues`). An
    item is queued in the order its producer numbered it (calls to a threaded actor may
    run in any order), once there is room; a delivery waits for both, which is the
    producer's backpressure. Closed when the role ends: waiting deliveries return False."""

    def __init__(self, slots: Mapping[str, int]) -> None:
        self.slots = dict(slots)
        self.items: dict[str, deque] = {name: deque() for name in slots}
        self.next_seq = {name: 0 for name in slots}
        self.closed = False
        self.changed = threading.Condition()

    def deliver(self, name: str, seq: int, item: Any) -> bool:
        queue = self.items[name]
        with self.changed:
            self.changed.wait_for(lambda: self.closed or (
                self.next_seq[name] == seq and len(queue) < self.slots[name]))
            if self.closed:
                return False
            queue.append(item)
            self.next_seq[name] += 1
            self.changed.notify_all()
        return True

    def take(self, name: str, timeout: float) -> Any:
        queue = self.items[name]
        with self.changed:
            if not self.changed.wait_for(lambda: queue or self.closed, timeout) or not queue:
                raise Timeout(f"nothing in {name}")
            item = queue.popleft()
            self.changed.notify_all()
        return item

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


class HubCounters:
    """The hub's counters behind the Counters interface, with few round trips and no wait
    but for a read: additions, and writes of the counters only progress rows read (SHOWN;
    the learner's train_steps too, which each publish of weights brings the hub at once),
    are gathered here and sent together at most every FLUSH_S (and before any read); any
    other write goes at once, with them, in one call sent without waiting (a write that
    must follow another call is made after that call returned: see RayTransport). The two
    flags every loop reads, "stop" and "learner_done", are asked for at most every FLUSH_S
    and read as last answered (they only ever go from 0 to 1)."""

    FLUSH_S = 0.25  # each role actor: at most 4 counter calls and 4 flag reads a second
    FLAGS = ("stop", "learner_done")
    SHOWN = ("learner_wait_s", "replay_env_steps", "replay_positions", "recent_return",
             "target_version", "train_steps")

    def __init__(self, hub: Any, ray: Any) -> None:
        self.hub = hub
        self.ray = ray
        self.pending: dict[str, float] = {}
        self.pending_writes: dict[str, float] = {}
        self.flushed = time.monotonic()
        self.flags = dict.fromkeys(self.FLAGS, 0)  # as last read from the hub
        self.flags_asked: Any = None  # the read of the flags under way
        self.flags_at = -1.0  # when the last read was asked for

    def flush(self) -> None:
        if self.pending or self.pending_writes:
            self.hub.add_counters.remote(self.pending, self.pending_writes)
            self.pending, self.pending_writes = {}, {}
        self.flushed = time.monotonic()

    def __getitem__(self, name: str) -> Any:
        if name in self.FLAGS:
            return self._flag(name)
        self.flush()
        return self.ray.get(self.hub.counter.remote(name))

    def _flag(self, name: str) -> Any:
        """A flag as of the last read of the hub that has come back, without waiting: a
        loop sees a flag go to 1 one round trip late, and reading it costs no wait."""
        if self.flags_asked is not None:
            ready, _ = self.ray.wait([self.flags_asked], timeout=0)
            if ready:
                for flag, value in zip(self.FLAGS, self.ray.get(self.flags_asked), strict=True):
                    self.flags[flag] = max(self.flags[flag], value)
                self.flags_asked = None
        now = time.monotonic()
        if self.flags_asked is None and now - self.flags_at >= self.FLUSH_S:
            self.flush()
            self.flags_asked = self.hub.flags.remote(self.FLAGS)
            self.flags_at = now
        return self.flags[name]

    def __setitem__(self, name: str, value: float) -> None:
        if name in self.FLAGS:
            self.flags[name] = value
        self.pending_writes[name] = value
        if name in self.SHOWN:
            self._flush_due()
        else:
            self.flush()  # with the additions gathered so far: one call

    def add(self, name: str, delta: float = 1) -> None:
        self.pending[name] = self.pending.get(name, 0) + delta
        self._flush_due()

    def _flush_due(self) -> None:
        if time.monotonic() - self.flushed >= self.FLUSH_S:
            self.flush()

    def snapshot(self) -> dict[str, Any]:
        self.flush()
        return self.ray.get(self.hub.snapshot.remote())


class RayTransport:
    """Transport through the hub actor (see the module doc)."""

    HUB_WAIT_S = 1.0  # how long a wait at the hub lasts before it is asked again
    EVAL_POLL_S = 0.25  # how often the evaluator asks for new evaluation weights

    def __init__(self, hub: Any, spec: PipelineSpec) -> None:
        self.ray = import_ray()
        self.hub = hub
        self.spec = spec
        self.counters = HubCounters(hub, self.ray)
        self.layout = transition_layout(spec.cfg(), spec.env)
        self.trained = -1  # training steps done, as last learnt (a wait, priorities, a job)
        self.held: dict[str, list[int]] = {}  # publishes held then, by kind
        self.published: dict[str, list[int]] = {}  # the learner's: its publishes held, by kind
        queues = direct_queues(spec)
        self.inbox = Inbox({name: slots for name, (_, slots) in queues.items()})
        self.takers = {name: taker for name, (taker, _) in queues.items()}
        self.peers: dict[str, Any] = {}  # role name -> its actor, as asked of the hub
        self.last_put: dict[str, Any] = {}  # by queue: the put not yet confirmed
        self.put_count: dict[str, int] = {}  # by queue: puts sent
        self.records_sent: dict[int, deque] = {}  # by collector: puts not yet seen queued
        self.record_count: dict[int, int] = {}  # by collector: records sent
        self.records_taken: dict[int, deque] = {}  # by collector: taken, not yet handed out
        self.records_asked: dict[int, Any] = {}  # by collector: the take under way
        self.eval_asked = -math.inf  # when the evaluator last asked for new weights

    def _call(self, method: Any, *args: Any) -> Any:
        return self.ray.get(method.remote(*args))

    def logged_env_steps(self, collector: int) -> int:
        return self._call(self.hub.logged_env_steps, collector)

    # A collector's records go one call each, without waiting for the hub's answer: a
    # slot is handed out once every record but the last one sent is queued (the hub
    # queues them in their numbered order). The replay's owner takes all that is queued
    # in one call, and asks for the next ones as soon as those came.
    @contextmanager
    def record_slot(self, collector: int, timeout: float) -> Iterator[Mapping[str, np.ndarray]]:
        sent = self.records_sent.setdefault(collector, deque())
        while len(sent) > 1:
            ready, _ = self.ray.wait([sent[0]], timeout=timeout)
            if not ready:
                raise Timeout(f"collector {collector}'s queue stayed full")
            if not self.ray.get(sent.popleft()):
                sent.clear()
                raise Timeout("the run stopped")
        record = {name: np.zeros(shape, dtype) for name, shape, dtype in self.layout}
        yield record
        seq = self.record_count.get(collector, 0)
        self.record_count[collector] = seq + 1
        sent.append(self.hub.put_record.remote(collector, seq, record))

    def end_records(self, collector: int) -> None:
        self.ray.get(list(self.records_sent.pop(collector, ())))
        self._call(self.hub.end_records, collector)

    @contextmanager
    def take_record(self, collector: int, timeout: float) -> Iterator[Mapping[str, np.ndarray]]:
        taken = self.records_taken.setdefault(collector, deque())
        if not taken:
            ref = self.records_asked.pop(collector, None)
            if ref is None:
                ref = self.hub.take_records.remote(collector, self.HUB_WAIT_S)
            ready, _ = self.ray.wait([ref], timeout=timeout)
            if not ready:
                self.records_asked[collector] = ref
                raise Timeout(f"no record from collector {collector}")
            records = self.ray.get(ref)
            if records is None:
                raise Timeout(f"no record from collector {collector}")
            if isinstance(records, str):
                raise Closed(f"collector {collector} ended")
            taken.extend(records)
            self.records_asked[collector] = self.hub.take_records.remote(
                collector, self.HUB_WAIT_S)
        yield taken.popleft()

    # Round trips, not compute, are what a busy machine makes slow (a few ms each, tens of
    # ms with every core busy). An item of the per-step exchanges is one call, from its
    # producer to its taker's inbox, and the producer waits only for its previous put to
    # that queue: the taker's inbox queues the puts in their numbered order.
    def _take(self, name: str, timeout: float) -> Any:
        return writable(self.inbox.take(name, timeout))

    def _peer(self, name: str) -> Any:
        while name not in self.peers:
            actor = self._call(self.hub.peer, name, self.HUB_WAIT_S)
            if actor is not None:
                self.peers[name] = actor
            elif self.counters["stop"]:
                raise Stopped(f"the run stopped before {name} started")
        return self.peers[name]

    def _put(self, name: str, item: Any) -> bool:
        previous = self.last_put.get(name)
        try:
            if previous is not None and not self.ray.get(previous):
                return False  # the taker ended
            actor = self._peer(self.takers[name])
        except self.ray.exceptions.RayActorError:
            return False  # the taker died: the supervisor stops the run and names it
        seq = self.put_count.get(name, 0)
        self.put_count[name] = seq + 1
        self.last_put[name] = actor.deliver.remote(name, seq, item)
        return True

    def put_batch(self, batch: TrainingBatch) -> bool:
        return self._put("batches", batch)

    def take_batch(self, timeout: float) -> TrainingBatch:
        return self._take("batches", timeout)

    # What a reader needs to know of training (the steps trained, the publishes held) also
    # travels with the priorities and the reanalysis jobs: the learner publishes before it
    # sends a step's priorities, so their taker needs no call to the hub for it.
    def _learned(self, trained: int, held: Mapping[str, list[int]]) -> None:
        if trained > self.trained:
            self.trained, self.held = trained, dict(held)

    def put_priorities(self, step: int, positions: np.ndarray, priorities: np.ndarray
                       ) -> bool:
        return self._put("priorities", (step, positions, priorities, self.published))

    def take_priorities(self, timeout: float) -> tuple[int, np.ndarray, np.ndarray]:
        step, positions, priorities, held = self._take("priorities", timeout)
        self._learned(step, held)
        return step, positions, priorities

    def put_reanalysis_job(self, part: int, target_step: int, obs: np.ndarray) -> bool:
        return self._put(f"jobs-{part}", (target_step, obs, self.trained, self.held))

    def take_reanalysis_job(self, part: int, timeout: float) -> tuple[int, np.ndarray]:
        target_step, obs, trained, held = self._take(f"jobs-{part}", timeout)
        self._learned(trained, held)
        return target_step, obs

    def put_reanalysis_result(self, part: int, visit_counts: np.ndarray) -> bool:
        return self._put(f"results-{part}", visit_counts)

    def take_reanalysis_result(self, part: int, timeout: float) -> np.ndarray:
        return self._take(f"results-{part}", timeout)

    def publish(self, kind: str, state: Mapping[str, torch.Tensor], step: int) -> None:
        self._call(self.hub.publish, kind, flatten_state(state), step)
        if kind != "eval":  # as the hub holds them
            self.published[kind] = sorted({*self.published.get(kind, []), step}
                                          )[-HISTORY_SLOTS:]

    def load(self, kind: str, model: torch.nn.Module, step: int, loaded: int | None
             ) -> int | None:
        if kind == "eval" and loaded is not None and not self.counters.flags["learner_done"]:
            # The evaluator polls: ask the hub at most every EVAL_POLL_S (once the learner
            # is seen done, every time: its last publish is then at the hub).
            now = time.monotonic()
            if now - self.eval_asked < self.EVAL_POLL_S:
                return loaded
            self.eval_asked = now
        # The publishes seen by the last wait for `step` are all there are up to it.
        held = self.held.get(kind) if kind != "eval" and step <= self.trained else None
        chosen = (published_step(held, step) if held
                  else self._call(self.hub.choose, kind, step))
        if chosen is None or chosen == loaded:
            return loaded if chosen is None else chosen
        load_flat(model, self._call(self.hub.weights_of, kind, chosen))
        return chosen

    def wait_for_training(self, step: int) -> None:
        while step > self.trained:
            done, trained, held = self._call(self.hub.wait_for_training, step, self.HUB_WAIT_S)
            self._learned(trained, held)
            if done or self.counters["stop"]:
                return

    def search(self, collector: int, obs: np.ndarray) -> SearchResult:
        raise RuntimeError("run.collector_inference 'learner' is for the local backend")

    def serve_searches(self, run: Any) -> bool:
        return False


class RoleActor:
    """One role of the run, in its own Ray worker process (see pipeline/child.py for the
    local backend's counterpart)."""

    SWITCH_INTERVAL_S = 0.001

    def __init__(self, role: str, index: int, spec: PipelineSpec, hub: Any) -> None:
        configure_torch(threads=1)
        # Items arrive on another thread (deliver) while run() computes: let that thread
        # have the interpreter within a millisecond, not Python's default 5 ms.
        sys.setswitchinterval(self.SWITCH_INTERVAL_S)
        self.role, self.index, self.spec = role, index, spec
        self.transport = RayTransport(hub, spec)

    def where(self) -> str:
        """"pid P on NODE": where this role runs (the launcher prints it)."""
        import socket

        return f"pid {os.getpid()} on {socket.gethostname()}"

    def deliver(self, name: str, seq: int, item: Any) -> bool:
        """Another role's `seq`-th item of queue `name` (see Inbox); False once this role
        has ended."""
        return self.transport.inbox.deliver(name, seq, item)

    def run(self) -> None:
        from ezengine.pipeline.child import run_role

        try:
            with suppress(Stopped):
                run_role(self.role, self.index, self.spec, self.transport)
        finally:
            self.transport.inbox.close()
            self.transport.counters.flush()  # its last additions and progress writes


def actor_death(message: str) -> str:
    """How an actor's process ended, from a RayActorError's text: its pid and Ray's exit
    type and detail (Ray cannot tell a kill signal from the out-of-memory killer)."""
    pid = re.search(r"pid: (\d+)", message)
    kind = re.search(r"exit type: (\w+)", message)
    detail = re.search(r"exit detail: ([^.]*)", message)
    said = ", ".join(m[1].strip() for m in (kind, detail) if m)
    return ((f"pid {pid[1]}; " if pid else "") + (f"Ray: {said}" if said else
            message.strip().splitlines()[0]) + "): a kill signal, the out-of-memory killer "
            "or a lost node")


class ActorProcess:
    """A role's actor seen as a process (exitcode, join, is_alive, kill) by the
    supervisor's watch loop; a failure's traceback goes to `errors`."""

    def __init__(self, ray: Any, actor: Any, name: str, errors: list) -> None:
        self.ray, self.actor, self.name, self.errors = ray, actor, name, errors
        self.ref = actor.run.remote()
        self._code: int | None = None

    @property
    def exitcode(self) -> int | None:
        if self._code is None:
            ready, _ = self.ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self.ray.get(self.ref)
                    self._code = 0
                except self.ray.exceptions.RayActorError as exc:
                    # The actor's process died (a kill signal, out of memory, a lost node):
                    # no exit code to report, so Ray's account of it goes to the errors.
                    self.errors.append((self.name, f"{self.name}'s Ray actor died ("
                                        + actor_death(str(exc))))
                    self._code = -9
                except self.ray.exceptions.RayTaskError as exc:
                    self.errors.append((self.name, str(exc)))
                    self._code = 1
        return self._code

    def join(self, timeout: float) -> None:
        self.ray.wait([self.ref], timeout=timeout)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        self.ray.kill(self.actor)


class ErrorList(list):
    """The failures ActorProcess records, read like the local backend's error queue."""

    def empty(self) -> bool:
        return not self

    def get_nowait(self) -> Any:
        return self.pop(0)


def actor_config(cfg: Config) -> dict:
    """The run's config as the actors get it, with where reanalysis runs decided here, on
    the node that holds the learner: with 'auto' it follows the learner's device, and an
    actor on a CPU-only node must not resolve run.device for itself ('cuda' fails there)."""
    config = config_to_dict(cfg)
    config["run"]["reanalyse_placement"] = "learner" if reanalyse_in_learner(cfg) else "worker"
    return config


def is_remote_role(role: str, index: int) -> bool:
    """Collectors and reanalyse helpers only exchange arrays: they may run on any node."""
    return role == "collector" or (role == "reanalyse" and index > 0)


def actor_options(cfg: Config, role: str, index: int, here: Any, on_cuda: bool
                  ) -> dict[str, Any]:
    """What a role's actor asks Ray for: run.ray_actor_cpus CPUs; the head node (`here`)
    for the roles that write the run directory or own the replay; for the others any node,
    or only nodes that offer run.ray_remote_resource (one unit each); and the GPU for a
    learner on CUDA (Ray hides the GPUs from an actor that did not ask for one)."""
    options: dict[str, Any] = {"num_cpus": cfg.run.ray_actor_cpus,
                               "num_gpus": 1 if role == "learner" and on_cuda else 0}
    if not is_remote_role(role, index):
        options["scheduling_strategy"] = here
    elif cfg.run.ray_remote_resource:
        options["resources"] = {cfg.run.ray_remote_resource: 1}
    return options


class RayTrainer(PipelineTrainer):
    """The pipeline's launcher on Ray: the hub and one actor per role (`roles()`), watched
    by the same loop as the local processes."""

    PLACE_WAIT_S = 60.0  # after this, a run whose actors are not all up says why

    def _launch(self, env: EnvDescription, size: int, resume_from: tuple[int, int]) -> int:
        ray = import_ray()
        address = self.cfg.run.ray_address or None
        started = not ray.is_initialized()
        cpus = self.cfg.run.ray_actor_cpus
        needed = len(self.roles()) * cpus
        if started:
            # No dashboard and no extra logging setup: a local run needs neither. A local
            # instance holds every actor, as the local backend starts every process.
            if not address:
                # Ray starts its workers at niceness 15, below every ordinary process: on a
                # shared machine the run's actors would starve where the local backend's
                # processes get their share. A local instance's workers run at 0, as they do.
                os.environ.setdefault("RAY_worker_niceness", "0")
            try:
                check_reachable(address)
                ray.init(address=address, include_dashboard=False, configure_logging=False,
                         **({} if address else {"num_cpus": max(os.cpu_count() or 1,
                                                                math.ceil(needed))}))
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                self.echo(f"could not start or join {where}: {str(exc).strip().splitlines()[0]}"
                          + (" (is `ray start --head` running there? Without --address a "
                             "run starts its own instance)" if address else ""))
                return 1
        have = ray.cluster_resources().get("CPU", 0)
        if have < needed:
            self.echo(f"the Ray cluster has {have:g} CPUs; this run's {len(self.roles())} "
                      f"actors reserve {cpus:g} each ({needed:g}): add nodes, or lower "
                      "run.ray_actor_cpus, --collectors or run.reanalysers")
            if started:
                ray.shutdown()
            return 1
        remote = self.cfg.run.ray_remote_resource
        wanted = sum(is_remote_role(role, index) for role, index in self.roles())
        offered = ray.cluster_resources().get(remote, 0) if remote else wanted
        if offered < wanted:
            self.echo(f"run.ray_remote_resource is {remote!r}: this run's {wanted} collectors "
                      f"and reanalyse helpers take one unit each and the Ray cluster offers "
                      f"{offered:g}: start nodes with `ray start --resources "
                      f"'{{\"{remote}\": N}}'`, or leave the setting empty")
            if started:
                ray.shutdown()
            return 1
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ezengine.metrics import MetricsWriter

        on_cuda = resolve_device(self.cfg.run.device).type == "cuda"
        spec = PipelineSpec(
            config=actor_config(self.cfg), run_dir=str(self.run_dir.resolve()), env=env,
            num_collectors=self.num_collectors, resume=self.resume, transitions=[],
            batches=None, priorities=None, counters=None, selfplay_weights=[],
            target_weights=[], eval_weights=None, search_requests=[], search_results=[],
            reanalysis_jobs=[], reanalysis_results=[], prefix="", supervisor_pid=os.getpid())
        # The hub, the learner and the evaluator write the run directory, and the replay's
        # owner (reanalyse) rebuilds from its transition logs on resume: this node's.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=False)
        # Task events (Ray's per-call tracing for its dashboard) off: the run makes about a
        # hundred calls a second, each otherwise recorded and reported to Ray's GCS.
        hub = ray.remote(Hub).options(num_cpus=0, max_concurrency=1000,
                                      scheduling_strategy=here,
                                      enable_task_events=False).remote(
            spec, {"train_steps": resume_from[0], "replay_env_steps": resume_from[1]})
        errors = ErrorList()
        actors: list[Any] = []

        # A role actor is threaded: its role runs in one thread while deliveries into its
        # inbox (at most one waiting per queue) and `where` run in others.
        threads = 2 + len(direct_queues(spec))

        def start(role: str, index: int, name: str) -> ActorProcess:
            actor = ray.remote(RoleActor).options(
                max_concurrency=threads, enable_task_events=False,
                **actor_options(self.cfg, role, index, here, on_cuda)).remote(
                role, index, spec, hub)
            hub.register.remote(name, actor)
            actors.append(actor)
            # Not waited for: the actors start (each a fresh process importing torch) side
            # by side, and each says where it runs once it is up.
            def up(done: Any) -> None:
                if not done.exception():
                    placed.add(name)
                    self.echo(f"{name}: Ray actor, {done.result()}")

            actor.where.remote().future().add_done_callback(up)
            return ActorProcess(ray, actor, name, errors)

        # Ray holds an actor it has no room for until room comes: say so once, or a busy
        # cluster looks like a run that hangs.
        placed: set[str] = set()

        def still_waiting() -> None:
            missing = len(self.roles()) - len(placed)
            if missing:
                free = ray.available_resources().get("CPU", 0)
                self.echo(f"{missing} of the run's {len(self.roles())} Ray actors are not up "
                          f"after {self.PLACE_WAIT_S:.0f}s: the cluster has {free:g} of "
                          f"{have:g} CPUs free and each actor reserves {cpus:g} "
                          "(`ray status` shows what holds them); waiting for room")

        waiting = threading.Timer(self.PLACE_WAIT_S, still_waiting)
        waiting.daemon = True
        self.metrics = MetricsWriter(self.run_dir)
        try:
            waiting.start()
            return self._watch_children(start, HubCounters(hub, ray), errors)
        except Exception:
            self.echo(traceback.format_exc())
            return 1
        finally:
            waiting.cancel()
            self.metrics.close()
            for actor in [*actors, hub]:
                ray.kill(actor)
            if started:
                ray.shutdown()
