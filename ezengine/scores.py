"""Reference scores and suite reports: Atari 100k (human-normalised scores, HNS) and
MinAtar (beside DQN's published returns).

The table ``ezengine/data/atari100k_scores.csv`` (carried in the package) gives, per game,
the random and human scores that define HNS = (score - random) / (human - random), and the
scores the EfficientZero paper reports for SPR, MuZero and EfficientZero.

A suite report reads runs that already finished; it evaluates nothing. Each run's score is
its FINAL evaluation: the last row of its ``eval.jsonl``, which the trainer writes for the
online model at the end of training (the model saved as ``checkpoints/latest.pt``). Runs of
one game (grouped by ``env.id``) are averaged over seeds, and the aggregates (mean and
median HNS, games at or above human) are computed over the games present, for our runs and
for the paper's EfficientZero scores of the same games.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ezengine.config import ConfigError, load_config

__all__ = [
    "GameScores",
    "RunResult",
    "SuiteReport",
    "aggregate_suite",
    "final_evaluation",
    "find_runs",
    "game_scores",
    "human_normalized_score",
    "is_atari100k",
    "read_evaluations",
    "score_table",
    "suite_report",
    "write_suite_report",
]


@dataclass(frozen=True)
class GameScores:
    """One row of the Atari 100k table: reference scores of one game."""

    game: str  # CamelCase name, e.g. "MsPacman"
    env_id: str  # e.g. "ALE/MsPacman-v5"
    random: float
    human: float
    spr: float
    muzero: float
    efficientzero: float  # the paper's reported score (3 runs x 32 episodes)

    def hns(self, score: float) -> float:
        """Human-normalised score: 0 plays like random, 1 like the human reference."""
        return (score - self.random) / (self.human - self.random)


@functools.cache
def score_table() -> dict[str, GameScores]:
    """The packaged table, keyed by game name, in the CSV's (alphabetical) order."""
    text = resources.files("ezengine").joinpath("data/atari100k_scores.csv").read_text()
    table = {}
    for row in csv.DictReader(io.StringIO(text)):
        numbers = {k: float(row[k]) for k in ("random", "human", "spr", "muzero",
                                              "efficientzero")}
        table[row["game"]] = GameScores(row["game"], row["ale_id"], **numbers)
    return table


def _key(name: str) -> str:
    """Normalise a game name or env id: "ALE/MsPacman-v5", "MsPacmanNoFrameskip-v4",
    "ms_pacman" and "MsPacman" all become "mspacman"."""
    name = name.rsplit("/", 1)[-1]
    name = re.sub(r"-v\d+$", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def _index() -> dict[str, GameScores]:
    return {_key(g.game): g for g in score_table().values()}


def game_scores(game_or_env_id: str) -> GameScores:
    """The table row of a game given by name ("Breakout", "breakout") or env id
    ("ALE/Breakout-v5", "BreakoutNoFrameskip-v4"). KeyError if it is not in the suite."""
    try:
        return _index()[_key(game_or_env_id)]
    except KeyError:
        raise KeyError(f"{game_or_env_id!r} is not one of the 26 Atari 100k games "
                       f"({', '.join(score_table())})") from None


def is_atari100k(game_or_env_id: str) -> bool:
    """Whether the game or env id is one of the 26 Atari 100k games."""
    return _key(game_or_env_id) in _index()


def human_normalized_score(game_or_env_id: str, score: float) -> float:
    """HNS of a raw game score: (score - random) / (human - random)."""
    return game_scores(game_or_env_id).hns(score)


def _summary(hns: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(hns), statistics.median(hns), sum(h >= 1.0 for h in hns)


def aggregate_suite(per_game_scores: Mapping[str, float]) -> dict[str, Any]:
    """Suite aggregates of one score per game (keys: game names or env ids).

    Returns ``games`` (count), ``mean_hns``, ``median_hns``, ``games_above_human``
    (HNS >= 1), the same three for the paper's EfficientZero scores of the same games
    (``paper_mean_hns``, ...), and ``rows``: per game, in table order, ``game``,
    ``env_id``, ``score``, ``hns``, ``paper_score`` and ``paper_hns``.
    """
    if not per_game_scores:
        raise ValueError("aggregate_suite needs at least one game")
    by_game: dict[str, float] = {}
    for name, score in per_game_scores.items():
        game = game_scores(name).game
        if game in by_game:
            raise ValueError(f"{game} appears twice in the scores ({name!r})")
        by_game[game] = float(score)
    rows = []
    for game, ref in score_table().items():
        if game in by_game:
            score = by_game[game]
            rows.append({"game": game, "env_id": ref.env_id, "score": score,
                         "hns": ref.hns(score), "paper_score": ref.efficientzero,
                         "paper_hns": ref.hns(ref.efficientzero)})
    mean, median, above = _summary([r["hns"] for r in rows])
    p_mean, p_median, p_above = _summary([r["paper_hns"] for r in rows])
    return {"games": len(rows), "mean_hns": mean, "median_hns": median,
            "games_above_human": above, "paper_mean_hns": p_mean,
            "paper_median_hns": p_median, "paper_games_above_human": p_above, "rows": rows}


# ---------------------------------------------------------------------------------------
# Runs on disk


def find_runs(root: str | Path) -> list[Path]:
    """Run directories at or below ``root``: directories holding ``config.yaml`` and an
    ``eval.jsonl`` or a ``checkpoints/`` folder. Sorted by path."""
    root = Path(root)
    runs = {p.parent for p in root.rglob("config.yaml")}
    if (root / "config.yaml").is_file():
        runs.add(root)
    return sorted(r for r in runs
                  if (r / "eval.jsonl").is_file() or (r / "checkpoints").is_dir())


def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``eval.jsonl`` in order (empty if it has none). A torn last
    line, left by a crash mid-write, is skipped."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def final_evaluation(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's final evaluation: the last row of ``eval.jsonl`` (None if there is none)."""
    rows = read_evaluations(run_dir)
    return rows[-1] if rows else None


@dataclass(frozen=True)
class RunResult:
    """The final evaluation of one run."""

    run_dir: Path
    env_id: str
    seed: int
    score: float  # mean return of the final evaluation
    episodes: int
    train_steps: int
    env_steps: int
    env_step_budget: int  # run.env_steps; below it the run had not finished collecting

    @property
    def complete(self) -> bool:
        return self.env_steps >= self.env_step_budget


@dataclass
class SuiteReport:
    """Runs of a suite grouped by game, the skipped runs, and the aggregates."""

    root: Path
    runs: dict[str, list[RunResult]]  # game name -> its runs (seeds)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (run dir, why)
    aggregate: dict[str, Any] = field(default_factory=dict)  # see aggregate_suite

    @property
    def incomplete(self) -> list[RunResult]:
        """Runs whose last evaluation came before the end of their env-step budget."""
        return [r for runs in self.runs.values() for r in runs if not r.complete]


def collect_runs(runs_root: str | Path, suite: str, game_of: Any) -> SuiteReport:
    """The final evaluation of every run under ``runs_root`` whose ``env.id`` names a game
    of `suite` (``game_of(env_id)``: the game's name, or None for another environment),
    grouped by game. Other runs, runs without an evaluation or with an unreadable config
    are listed in ``skipped``."""
    root = Path(runs_root)
    if not root.is_dir():
        raise FileNotFoundError(f"no runs directory at {root}")
    report = SuiteReport(root, {})
    for run in find_runs(root):
        try:
            cfg = load_config(run / "config.yaml")
        except ConfigError as exc:
            report.skipped.append((run, f"unreadable config: {exc}"))
            continue
        game = game_of(cfg.env.id)
        if game is None:
            report.skipped.append((run, f"{cfg.env.id} is not in the {suite} suite"))
            continue
        final = final_evaluation(run)
        if final is None:
            report.skipped.append((run, "no evaluation in eval.jsonl"))
            continue
        result = RunResult(run, cfg.env.id, cfg.run.seed, float(final["mean_return"]),
                           int(final["episodes"]), int(final["train_steps"]),
                           int(final["env_steps"]), cfg.run.env_steps)
        report.runs.setdefault(game, []).append(result)
    if not report.runs:
        why = "".join(f"\n  {p}: {reason}" for p, reason in report.skipped)
        raise FileNotFoundError(f"no evaluated {suite} runs under {root}{why}")
    return report


def suite_report(runs_root: str | Path) -> SuiteReport:
    """Collect the final evaluation of every Atari 100k run under ``runs_root``, grouped by
    game, and aggregate the per-game means over seeds. Runs that are not Atari 100k games,
    have no evaluation or an unreadable config are listed in ``skipped``."""
    report = collect_runs(runs_root, "Atari 100k",
                          lambda env_id: game_scores(env_id).game if is_atari100k(env_id)
                          else None)
    means = {g: statistics.fmean(r.score for r in runs) for g, runs in report.runs.items()}
    report.aggregate = aggregate_suite(means)
    return report


def _write_markdown(report: SuiteReport, lines: list[str], prefix: Path) -> Path:
    """Write PREFIX.md: `lines`, then the runs that had not reached their budget."""
    if report.incomplete:
        lines = [*lines, "", "Runs that had not reached their env-step budget (their latest "
                 "evaluation is used):"]
        lines += [f"- {r.run_dir} ({r.env_steps:,} of {r.env_step_budget:,} env steps)"
                  for r in report.incomplete]
    md_path = prefix.with_name(prefix.name + ".md")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


_CSV_COLUMNS = ["game", "env_id", "seeds", "seed_scores", "score", "hns", "paper_score",
                "paper_hns"]


def write_suite_report(report: SuiteReport, prefix: str | Path) -> tuple[Path, Path]:
    """Write ``PREFIX.csv`` and ``PREFIX.md``; returns their paths.

    The CSV has one row per game (``score`` is the mean over seeds, ``seed_scores`` the
    per-seed final scores joined by ';') followed by three summary rows whose ``game`` is
    ``(mean HNS)``, ``(median HNS)`` and ``(games >= human)``, with our value in ``hns`` and the
    paper's in ``paper_hns``. Scores are rounded to 0.1 and HNS to 0.001.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    agg = report.aggregate
    rows = []
    for row in agg["rows"]:
        runs = report.runs[row["game"]]
        rows.append({"game": row["game"], "env_id": row["env_id"], "seeds": len(runs),
                     "seed_scores": ";".join(f"{r.score:.1f}" for r in runs),
                     "score": f"{row['score']:.1f}", "hns": f"{row['hns']:.3f}",
                     "paper_score": f"{row['paper_score']:.1f}",
                     "paper_hns": f"{row['paper_hns']:.3f}"})
    summary = [("mean HNS", f"{agg['mean_hns']:.3f}", f"{agg['paper_mean_hns']:.3f}"),
               ("median HNS", f"{agg['median_hns']:.3f}", f"{agg['paper_median_hns']:.3f}"),
               ("games >= human", str(agg["games_above_human"]),
                str(agg["paper_games_above_human"]))]
    csv_path = prefix.with_name(prefix.name + ".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        for name, ours, paper in summary:
            writer.writerow({"game": f"({name})", "hns": ours, "paper_hns": paper})

    lines = [
        f"# Atari 100k: {report.root}",
        "",
        "Score: each run's final evaluation (last row of its eval.jsonl, the final model), "
        "averaged over the runs (seeds) of a game. Paper: EfficientZero as reported by Ye "
        "et al. (2021), 3 runs x 32 episodes. HNS = (score - random) / (human - random).",
        "",
        "| game | env id | seeds | score | HNS | EfficientZero (paper) | paper HNS |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['game']} | {r['env_id']} | {r['seeds']} | {r['score']} | {r['hns']} "
              f"| {r['paper_score']} | {r['paper_hns']} |" for r in rows]
    lines += ["", f"| over {agg['games']} games | ours | paper |", "|---|---:|---:|"]
    lines += [f"| {name} | {ours} | {paper} |" for name, ours, paper in summary]
    return csv_path, _write_markdown(report, lines, prefix)


# ---------------------------------------------------------------------------------------
# MinAtar


@functools.cache
def minatar_baselines() -> dict[str, dict[str, float]]:
    """``ezengine/data/minatar_baselines.csv`` keyed by game ("breakout"): DQN's returns at
    0.5M, 1M and 5M frames and AC(lambda)'s at 5M read off the MinAtar README's curves,
    and random play on the -v1 ids."""
    text = resources.files("ezengine").joinpath("data/minatar_baselines.csv").read_text()
    rows = csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#"))
    return {row["game"]: {k: float(v) for k, v in row.items() if k != "game"} for row in rows}


def minatar_game(env_id: str) -> str | None:
    """"breakout" for "MinAtar/Breakout-v1" (None for anything else)."""
    if not env_id.startswith("MinAtar/"):
        return None
    game = re.sub(r"(?<!^)(?=[A-Z])", "_", re.sub(r"-v\d+$", "", env_id.split("/", 1)[1]))
    return game.lower() if game.lower() in minatar_baselines() else None


def minatar_report(runs_root: str | Path) -> SuiteReport:
    """Every MinAtar run's final evaluation under ``runs_root``, grouped by game; the
    aggregate counts the games whose mean over seeds beats DQN at 5M frames."""
    report = collect_runs(runs_root, "MinAtar", minatar_game)
    rows = []
    for game, ref in minatar_baselines().items():
        if game in report.runs:
            scores = [r.score for r in report.runs[game]]
            mean = statistics.fmean(scores)
            rows.append({"game": game, "seeds": len(scores), "score": mean,
                         "std": statistics.pstdev(scores), "dqn_5m": ref["dqn_5m"],
                         "random": ref["random_v1"], "beats_dqn": mean > ref["dqn_5m"]})
    report.aggregate = {"games": len(rows), "beats_dqn": sum(r["beats_dqn"] for r in rows),
                        "rows": rows}
    return report


def write_minatar_report(report: SuiteReport, prefix: str | Path) -> tuple[Path, Path]:
    """Write ``PREFIX.csv`` and ``PREFIX.md``: per game the mean +- std over seeds (and
    each seed's score) beside DQN's published return at 5M frames and random play."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in report.aggregate["rows"]:
        runs = report.runs[row["game"]]
        rows.append({"game": row["game"], "seeds": ";".join(str(r.seed) for r in runs),
                     "seed_scores": ";".join(f"{r.score:.2f}" for r in runs),
                     "score": f"{row['score']:.2f}", "std": f"{row['std']:.2f}",
                     "dqn_5m": f"{row['dqn_5m']:g}", "random": f"{row['random']:g}",
                     "beats_dqn": "yes" if row["beats_dqn"] else "no"})
    csv_path = prefix.with_name(prefix.name + ".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    agg = report.aggregate
    lines = [
        f"# MinAtar: {report.root}",
        "",
        "Score: each run's final evaluation (last row of its eval.jsonl), mean +- std over "
        "the runs (seeds) of a game. DQN at 5M frames and random play: "
        "ezengine/data/minatar_baselines.csv (read off the MinAtar README's curves; "
        "approximate).",
        "",
        "| game | seeds | score | per seed | DQN (5M frames) | random | beats DQN |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    lines += [f"| {r['game']} | {r['seeds']} | {r['score']} +- {r['std']} | "
              f"{r['seed_scores'].replace(';', ', ')} | {r['dqn_5m']} | {r['random']} | "
              f"{r['beats_dqn']} |" for r in rows]
    lines += ["", f"{agg['beats_dqn']} of {agg['games']} games beat DQN's 5M-frame return."]
    return csv_path, _write_markdown(report, lines, prefix)
