"""Learning curves: evaluation mean return against environment steps, from eval.jsonl.

One panel per game (env id), one line per run (seed) with a band of +-1 standard
deviation over the evaluation episodes; for Atari 100k games a dashed line at the
paper's EfficientZero score. Drawn with matplotlib (non-interactive Agg backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ezengine.config import ConfigError, load_config
from ezengine.scores import find_runs, game_scores, is_atari100k, read_evaluations

__all__ = ["Curve", "learning_curves", "plot_learning_curves"]


@dataclass(frozen=True)
class Curve:
    """The evaluations of one run, in the order they were made."""

    run_dir: Path
    env_id: str
    seed: int
    env_steps: list[int]
    mean_return: list[float]
    std_return: list[float]


def learning_curves(target: str | Path) -> dict[str, list[Curve]]:
    """Curves of the run ``target`` or of every run under it, grouped by env id.
    FileNotFoundError if no run there has an evaluation."""
    target = Path(target)
    curves: dict[str, list[Curve]] = {}
    for run in find_runs(target):
        rows = read_evaluations(run)
        if not rows:
            continue
        try:
            cfg = load_config(run / "config.yaml")
        except ConfigError:
            continue
        curve = Curve(run, cfg.env.id, cfg.run.seed, [int(r["env_steps"]) for r in rows],
                      [float(r["mean_return"]) for r in rows],
                      [float(r.get("std_return", 0.0)) for r in rows])
        curves.setdefault(cfg.env.id, []).append(curve)
    if not curves:
        raise FileNotFoundError(f"no run with evaluations (config.yaml + eval.jsonl) at or "
                                f"under {target}")
    return curves


def plot_learning_curves(target: str | Path, out: str | Path) -> Path:
    """Draw the learning curves of ``target`` (a run directory or a runs root) to the PNG
    ``out``; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    curves = learning_curves(target)
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (env_id, runs) in zip(axes.flat, sorted(curves.items()), strict=False):
        for c in sorted(runs, key=lambda c: (c.seed, str(c.run_dir))):
            line, = ax.plot(c.env_steps, c.mean_return, marker="o", markersize=3,
                            label=f"{c.run_dir.name} (seed {c.seed})")
            low = [m - s for m, s in zip(c.mean_return, c.std_return, strict=True)]
            high = [m + s for m, s in zip(c.mean_return, c.std_return, strict=True)]
            ax.fill_between(c.env_steps, low, high, color=line.get_color(), alpha=0.15)
        if is_atari100k(env_id):
            paper = game_scores(env_id).efficientzero
            ax.axhline(paper, color="black", linestyle="--", linewidth=1,
                       label=f"EfficientZero, paper ({paper:g})")
        ax.set_title(env_id)
        ax.set_xlim(left=0)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation mean return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
