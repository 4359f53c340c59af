"""Run metrics: one JSON row per line (metrics.jsonl, eval.jsonl) and TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ezengine.atomic import raise_if_disk_full


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON row and flush it to disk (a crash loses at most the current row)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise_if_disk_full(exc, path, "the rows before this one are kept")
        raise


def drop_torn_rows(run_dir: Path) -> None:
    """Cut a last row left unfinished by a killed process off ``metrics.jsonl`` and
    ``eval.jsonl``, so that a resumed run appends whole lines (call before writing)."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        path = Path(run_dir) / name
        if not path.is_file() or path.stat().st_size == 0:
            continue
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
    """Writes progress rows to ``metrics.jsonl`` and evaluation rows to ``eval.jsonl`` in a
    run directory, and every numeric value as a TensorBoard scalar under ``tb/``
    (``tensorboard --logdir RUN_DIR/tb``), indexed by environment steps."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def _scalars(self, prefix: str, row: dict[str, Any]) -> None:
        step = int(row.get("env_steps") or 0)
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.tb.flush()

    def progress(self, row: dict[str, Any]) -> None:
        """One progress row (throughput, losses, returns)."""
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        self._scalars("train", row)

    def evaluation(self, row: dict[str, Any]) -> None:
        """One evaluation row (returns of the evaluation episodes)."""
        append_jsonl(self.run_dir / "eval.jsonl", row)
        self._scalars("eval", {k: v for k, v in row.items() if k not in ("returns", "lengths")})

    def close(self) -> None:
        self.tb.close()


def eta_text(env_left: int, env_rate: float, train_left: int, train_rate: float,
             at_most: bool = False) -> str:
    """'ETA 1h05m' for the rest of a run at the current rates ('ETA ?' while unknown);
    'ETA <= 1h05m' with `at_most`, for a run that may end early.

    Collection and training advance together (paced by the replay ratio), so the run ends
    when the slower of the two finishes.
    """
    parts = []
    if env_left > 0:
        parts.append(env_left / env_rate if env_rate > 0 else float("inf"))
    if train_left > 0:
        parts.append(train_left / train_rate if train_rate > 0 else float("inf"))
    seconds = max(parts, default=0.0)
    if seconds == float("inf"):
        return "ETA ?"
    minutes = int(seconds // 60)
    left = f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
    return f"ETA <= {left}" if at_most else f"ETA {left}"


class Eta:
    """Time left at the average rates since paced training began: steadier than one log
    window, and meaningful when a single training step takes longer than the window.

    The training steps the warm-up data pays for (`train_from`) run while collection
    waits; rates measured over them would put the end hours away, so the clock starts
    after them."""

    def __init__(self) -> None:
        self.base: tuple[float, int, int] | None = None

    def text(self, env_done: int, env_total: int, train_done: int, train_total: int,
             train_from: int = 0, at_most: bool = False) -> str:
        now = time.perf_counter()
        if self.base is None:
            if train_done > train_from:
                self.base = (now, env_done, train_done)
            return "ETA ?"
        t0, env0, train0 = self.base
        seconds = max(now - t0, 1e-9)
        return eta_text(env_total - env_done, (env_done - env0) / seconds,
                        train_total - train_done, (train_done - train0) / seconds, at_most)
