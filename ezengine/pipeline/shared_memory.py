"""The Transport of one machine: shared-memory rings, counters and weight blocks, attached
in each child from the PipelineSpec the supervisor created them for."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ezengine.batch import TrainingBatch
from ezengine.pipeline.layouts import transition_layout
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transition_log import TransitionLog, log_path
from ezengine.pipeline.transport import (
    Stopped,
    Timeout,
    poll_for_training,
    retry_until_stopped,
)
from ezengine.pipeline.weights import WeightHistory, load_flat, publish_state
from ezengine.recipe import published_step
from ezengine.rings import Ring, SharedCounters, SharedWeights
from ezengine.search import SearchResult

# Blocks this (child) process attached; detached before it exits so no view outlives them.
ATTACHED: list[Any] = []


def attach(kind: type, spec: Any) -> Any:
    """Attach a shared-memory block (Ring, SharedCounters or SharedWeights) in a child."""
    block = kind.attach(spec)
    ATTACHED.append(block)
    return block


class SharedMemoryTransport:
    """Transport over the blocks of `spec`, each attached on first use (a role attaches
    only what it uses)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.counters = attach(SharedCounters, spec.counters)
        self._rings: dict[Any, Ring] = {}
        self._histories: dict[str, WeightHistory] = {}
        self._eval: SharedWeights | None = None
        self._flat: dict[str, np.ndarray] = {}
        self._logs: dict[int, TransitionLog] = {}

    def _ring(self, spec: Any) -> Ring:
        key = spec.segment
        if key not in self._rings:
            self._rings[key] = attach(Ring, spec)
        return self._rings[key]

    # ------------------------------------------------------------------ records

    def _log(self, collector: int) -> TransitionLog:
        if collector not in self._logs:
            self._logs[collector] = TransitionLog(
                log_path(self.spec.run_dir, collector),
                transition_layout(self.spec.cfg(), self.spec.env))
        return self._logs[collector]

    def logged_env_steps(self, collector: int) -> int:
        return self._log(collector).last_env_steps()

    @contextmanager
    def record_slot(self, collector: int, timeout: float) -> Iterator[Mapping[str, np.ndarray]]:
        with self._ring(self.spec.transitions[collector]).write(timeout=timeout) as slot:
            yield slot
            self._log(collector).append(slot)  # this (the collector's) machine has the run

    def end_records(self, collector: int) -> None:
        self._ring(self.spec.transitions[collector]).close()

    @contextmanager
    def take_record(self, collector: int, timeout: float) -> Iterator[Mapping[str, np.ndarray]]:
        with self._ring(self.spec.transitions[collector]).read(timeout=timeout) as rec:
            yield rec

    # ------------------------------------------------------------------ batches, priorities

    def put_batch(self, batch: TrainingBatch) -> bool:
        ring = self._ring(self.spec.batches)

        def put() -> None:
            with ring.write(timeout=1.0) as slot:
                batch.write_into(slot)
        return retry_until_stopped(put, self.counters)

    def take_batch(self, timeout: float) -> TrainingBatch:
        # Copied out of its slot, which is free again at once.
        with self._ring(self.spec.batches).read(timeout=timeout) as slot:
            return TrainingBatch.from_arrays(slot)

    def put_priorities(self, step: int, positions: np.ndarray, priorities: np.ndarray
                       ) -> bool:
        ring = self._ring(self.spec.priorities)

        def put() -> None:
            with ring.write(timeout=1.0) as slot:
                slot["step"][0] = step
                slot["positions"][...] = positions
                slot["priorities"][...] = priorities
        return retry_until_stopped(put, self.counters)

    def take_priorities(self, timeout: float) -> tuple[int, np.ndarray, np.ndarray]:
        with self._ring(self.spec.priorities).read(timeout=timeout) as upd:
            return int(upd["step"][0]), np.array(upd["positions"]), np.array(upd["priorities"])

    # ------------------------------------------------------------------ weights

    def _history(self, kind: str) -> WeightHistory:
        if kind not in self._histories:
            specs = {"selfplay": self.spec.selfplay_weights,
                     "target": self.spec.target_weights}[kind]
            self._histories[kind] = WeightHistory([attach(SharedWeights, s) for s in specs])
        return self._histories[kind]

    def _eval_block(self) -> SharedWeights:
        if self._eval is None:
            self._eval = attach(SharedWeights, self.spec.eval_weights)
        return self._eval

    def publish(self, kind: str, state: Mapping[str, torch.Tensor], step: int) -> None:
        if kind == "eval":
            publish_state(self._eval_block(), state, step)
        else:
            self._history(kind).publish(state, step)

    def load(self, kind: str, model: torch.nn.Module, step: int, loaded: int | None
             ) -> int | None:
        if kind == "eval":
            block = self._eval_block()
            if block.version in (0, loaded):
                return loaded
            flat = self._flat.setdefault(kind, np.empty(block.size, dtype=np.float32))
            got = block.read_into(flat)
        else:
            history = self._history(kind)
            held = history.steps()
            if held and published_step(held, step) == loaded:
                return loaded
            flat = self._flat.setdefault(kind, np.empty(history.size, dtype=np.float32))
            got = history.read(step, flat)
            if got is None:
                return None
        load_flat(model, flat)
        return got

    def wait_for_training(self, step: int) -> None:
        poll_for_training(self.counters, step)

    # ------------------------------------------------------------------ reanalyse helpers

    def put_reanalysis_job(self, part: int, target_step: int, obs: np.ndarray) -> bool:
        ring = self._ring(self.spec.reanalysis_jobs[part - 1])

        def put() -> None:
            with ring.write(timeout=1.0) as slot:
                slot["target_step"][0] = target_step
                slot["count"][0] = len(obs)
                slot["obs"][:len(obs)] = obs
        return retry_until_stopped(put, self.counters)

    def take_reanalysis_job(self, part: int, timeout: float) -> tuple[int, np.ndarray]:
        with self._ring(self.spec.reanalysis_jobs[part - 1]).read(timeout=timeout) as slot:
            count = int(slot["count"][0])
            return int(slot["target_step"][0]), np.array(slot["obs"][:count])

    def put_reanalysis_result(self, part: int, visit_counts: np.ndarray) -> bool:
        ring = self._ring(self.spec.reanalysis_results[part - 1])

        def put() -> None:
            with ring.write(timeout=1.0) as slot:
                slot["count"][0] = len(visit_counts)
                slot["visit_counts"][:len(visit_counts)] = visit_counts
        return retry_until_stopped(put, self.counters)

    def take_reanalysis_result(self, part: int, timeout: float) -> np.ndarray:
        with self._ring(self.spec.reanalysis_results[part - 1]).read(timeout=timeout) as slot:
            return np.array(slot["visit_counts"][:int(slot["count"][0])])

    # ------------------------------------------------------------------ remote searches

    def search(self, collector: int, obs: np.ndarray) -> SearchResult:
        requests = self._ring(self.spec.search_requests[collector])
        results = self._ring(self.spec.search_results[collector])

        def put() -> None:
            with requests.write(timeout=1.0) as slot:
                slot["obs"][...] = obs
        if not retry_until_stopped(put, self.counters):
            raise Stopped("the run stopped while a search was pending")
        while True:
            try:
                with results.read(timeout=1.0) as slot:
                    return SearchResult(np.array(slot["visit_counts"]),
                                        np.array(slot["root_values"]),
                                        np.array(slot["predicted_values"]))
            except Timeout:
                if self.counters["stop"]:
                    raise Stopped("the run stopped while a search was pending") from None

    def serve_searches(self, run: Callable[[int, np.ndarray], SearchResult]) -> bool:
        busy = False
        for i, spec in enumerate(self.spec.search_requests):
            with self._ring(spec).try_read() as slot:
                if slot is None:
                    continue
                obs = np.array(slot["obs"])
            result = run(i, obs)
            results = self._ring(self.spec.search_results[i])

            def put(result: SearchResult = result, results: Ring = results) -> None:
                with results.write(timeout=1.0) as out:
                    out["visit_counts"][...] = result.visit_counts
                    out["root_values"][...] = result.root_values
                    out["predicted_values"][...] = result.predicted_values
            retry_until_stopped(put, self.counters)
            busy = True
        return busy
