"""Run metrics: one JSON row per line (metrics.jsonl, eval.jsonl) and TensorBoard scalars."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON row and flush it to disk (a crash loses at most the current row)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
