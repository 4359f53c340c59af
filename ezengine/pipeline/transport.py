"""How the roles exchange data: the `Transport` every role talks to, and the waits built on
it. The shared-memory rings implement it (`shared_memory.py`); another transport (many
machines) is another implementation of these methods, with the roles unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.rings import SLEEP_MIN, backoff
from ezengine.rings import RingClosed as Closed
from ezengine.rings import RingTimeout as Timeout
from ezengine.search import SearchResult

POLL_S = 0.001

__all__ = ["POLL_S", "Closed", "Counters", "CpuClock", "Stopped", "Timeout", "Transport",
           "poll_for_training", "retry_until_stopped"]


class Stopped(Exception):
    """This role was told to stop at a point where it has nothing to save."""


class Counters(Protocol):
    """Named numbers every role reads and writes (pipeline/spec.py lists them)."""

    def __getitem__(self, name: str) -> int | float: ...

    def __setitem__(self, name: str, value: float) -> None: ...

    def add(self, name: str, delta: float = 1) -> int | float: ...

    def snapshot(self) -> dict[str, int | float]: ...


class Transport(Protocol):
    """What the roles send each other. Waits end with `Timeout` after `timeout` seconds;
    a put that cannot complete because the run stops returns False."""

    counters: Counters

    # collector i -> the replay's owner: one transition record per vector step, in order.
    # Every record is appended to the collector's transition log where the run directory
    # is before the replay's owner can take it: nothing sent is lost to a crash.
    def logged_env_steps(self, collector: int) -> int:
        """The collector's env steps in its transition log (a resumed run goes on there)."""
        ...

    def record_slot(self, collector: int, timeout: float
                    ) -> AbstractContextManager[Mapping[str, np.ndarray]]:
        """A record to fill in place; it is logged and sent when the block ends without
        error."""
        ...

    def end_records(self, collector: int) -> None:
        """This collector has sent its last record."""
        ...

    def take_record(self, collector: int, timeout: float
                    ) -> AbstractContextManager[Mapping[str, np.ndarray]]:
        """The collector's next record, valid inside the block; `Closed` once it ended."""
        ...

    # the replay's owner -> the learner
    def put_batch(self, batch: TrainingBatch) -> bool: ...

    def take_batch(self, timeout: float) -> TrainingBatch: ...

    # the learner -> the replay's owner, in training-step order
    def put_priorities(self, step: int, positions: np.ndarray, priorities: np.ndarray
                       ) -> bool: ...

    def take_priorities(self, timeout: float) -> tuple[int, np.ndarray, np.ndarray]: ...

    # the learner -> every role: "selfplay" and "target" under their training step (a
    # reader takes the publish the timetable names), "eval" the latest only.
    def publish(self, kind: str, state: Mapping[str, torch.Tensor], step: int) -> None: ...

    def load(self, kind: str, model: torch.nn.Module, step: int, loaded: int | None
             ) -> int | None:
        """Load into `model` the `kind` publish a reader of training `step` takes (for
        "eval": the latest), unless it is the one `loaded`; returns its training step,
        None while nothing is published."""
        ...

    def wait_for_training(self, step: int) -> None:
        """Block until the learner has trained, and published the weights of, `step` (or
        has finished, or the run stops)."""
        ...

    # the replay's owner -> reanalyse helper p (p >= 1) and back: part p of a batch's
    # re-searched roots (run.reanalysers)
    def put_reanalysis_job(self, part: int, target_step: int, obs: np.ndarray) -> bool: ...

    def take_reanalysis_job(self, part: int, timeout: float) -> tuple[int, np.ndarray]:
        """(target_step, stacked observations) of helper `part`'s next job."""
        ...

    def put_reanalysis_result(self, part: int, visit_counts: np.ndarray) -> bool: ...

    def take_reanalysis_result(self, part: int, timeout: float) -> np.ndarray: ...

    # collector i's searches run by the model owner (run.collector_inference: learner)
    def search(self, collector: int, obs: np.ndarray) -> SearchResult:
        """Send stacked observations, wait for the result; `Stopped` if the run stops."""
        ...

    def serve_searches(self, run: Callable[[int, np.ndarray], SearchResult]) -> bool:
        """Answer each waiting request with run(collector, obs); whether there was any."""
        ...


class CpuClock:
    """Adds the CPU seconds this process used since the last tick to ``cpu_<role>_s``."""

    def __init__(self, counters: Counters, role: str) -> None:
        self.counters = counters
        self.name = f"cpu_{role}_s"
        self.last = time.process_time()

    def tick(self) -> None:
        now = time.process_time()
        self.counters.add(self.name, now - self.last)
        self.last = now


# A collector waits here for the weights of a step one self-play interval behind the
# pacing (recipe.selfplay_weights_step), so it is seconds ahead of need and can poll slowly:
# a 20 ms cap instead of the rings' 2 ms cut its wake-ups 7x and a one-core CartPole run's
# CPU by 3% (docs/cartpole_study.md section 31).
TRAINING_POLL_MAX = 0.02


def poll_for_training(counters: Counters, step: int) -> None:
    """Transport.wait_for_training by polling shared counters, backing off to
    TRAINING_POLL_MAX: a collector spends most of its time here, and each wake-up takes the
    CPU from a busy role."""
    sleep = SLEEP_MIN
    while (counters["train_steps"] < step and not counters["learner_done"]
           and not counters["stop"]):
        sleep = backoff(sleep, TRAINING_POLL_MAX)


def retry_until_stopped(put: Callable[[], Any], counters: Counters) -> bool:
    """Call `put` until it does not time out; False if the run stops first."""
    while True:
        try:
            put()
            return True
        except Timeout:
            if counters["stop"]:
                return False
