"""Nothing collected is lost: each collector appends every transition record to
``replay/collector-<i>.bin`` before publishing it; a resumed run rebuilds its replay from
those logs (trajectories open at the stop are closed as cut, so they bootstrap)."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ezengine.atomic import raise_if_disk_full
from ezengine.collector import finished_games, store_transition
from ezengine.replay import ReplayBuffer


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


def ingest_record(replay: ReplayBuffer, record: Any, collector: int, env_steps: list[int],
                  num_envs: int) -> None:
    """Store one record of collector `collector` (its environments write as writers
    collector * num_envs + e) and count its steps in `env_steps` (per collector). The
    positions are stamped with the total over all collectors, this record included: ages
    (which shorten the TD horizon of old data) are measured against that total, so a
    collector's own count would make new data look old."""
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
