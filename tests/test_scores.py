"""Atari 100k score table, HNS arithmetic, suite aggregation and the suite report/plot
commands on a synthetic runs directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import ale_py
import cv2
import gymnasium
import pytest
from click.testing import CliRunner

from ezengine.cli import main
from ezengine.config import load_config, save_config
from ezengine.scores import (
    aggregate_suite,
    final_evaluation,
    find_runs,
    game_scores,
    human_normalized_score,
    is_atari100k,
    score_table,
)

REPO = Path(__file__).resolve().parents[1]


def _snake(game: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower()
                   for i, c in enumerate(game))


def test_table_is_the_26_games() -> None:
    table = score_table()
    assert len(table) == 26
    assert table["Breakout"].env_id == "ALE/Breakout-v5"
    assert table["Breakout"].efficientzero == 414.1


def test_configs_for_every_game() -> None:
    gymnasium.register_envs(ale_py)
    for game, row in score_table().items():
        path = REPO / "configs" / f"{_snake(game)}.yaml"
        cfg = load_config(path)
        assert cfg.env.id == row.env_id, path
        assert cfg.env.kind == "atari" and cfg.model.kind == "conv"
        assert gymnasium.spec(cfg.env.id) is not None  # raises if ALE does not know it
    # Making one env proves the ROM is there, not only the registration.
    env = gymnasium.make(load_config(REPO / "configs" / "up_n_down.yaml").env.id)
    assert env.action_space.n > 1
    env.close()


def test_hns_arithmetic() -> None:
    assert human_normalized_score("ALE/Breakout-v5", 1.7) == 0.0
    assert human_normalized_score("Breakout", 30.5) == pytest.approx(1.0)
    assert human_normalized_score("BreakoutNoFrameskip-v4", 16.1) == pytest.approx(0.5)
    # Pong: random -20.7, human 14.6.
    assert human_normalized_score("pong", 20.1) == pytest.approx(40.8 / 35.3)
    assert game_scores("ms_pacman").game == "MsPacman"
    assert game_scores("ALE/UpNDown-v5").game == "UpNDown"
    assert not is_atari100k("CartPole-v1")
    with pytest.raises(KeyError, match="not one of the 26"):
        human_normalized_score("CartPole-v1", 1.0)


def test_paper_aggregates() -> None:
    # The paper's own EfficientZero column: mean HNS 1.943, median 1.090.
    paper = {g: row.efficientzero for g, row in score_table().items()}
    agg = aggregate_suite(paper)
    assert agg["games"] == 26
    assert round(agg["mean_hns"], 3) == 1.943
    assert round(agg["median_hns"], 3) == 1.090
    assert agg["games_above_human"] == 14
    assert agg["paper_mean_hns"] == agg["mean_hns"]
    breakout = next(r for r in agg["rows"] if r["game"] == "Breakout")
    assert breakout["hns"] == pytest.approx((414.1 - 1.7) / (30.5 - 1.7))


def test_aggregate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="twice"):
        aggregate_suite({"Breakout": 1.0, "ALE/Breakout-v5": 2.0})
    with pytest.raises(ValueError, match="at least one"):
        aggregate_suite({})


def _fake_run(root: Path, name: str, config: str, seed: int, finals: list[float],
              env_steps: int = 100_000) -> Path:
    """A run directory with config.yaml and eval.jsonl rows of the given mean returns."""
    run = root / name
    run.mkdir(parents=True)
    save_config(load_config(REPO / "configs" / config, [f"run.seed={seed}"]),
                run / "config.yaml")
    with open(run / "eval.jsonl", "w") as f:
        for i, score in enumerate(finals):
            steps = env_steps * (i + 1) // len(finals)
            f.write(json.dumps({"train_steps": steps, "env_steps": steps, "wall_s": 1.0,
                                "episodes": 32, "mean_return": score, "std_return": 1.0,
                                "returns": [score], "lengths": [10]}) + "\n")
    return run


@pytest.fixture()
def suite_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # Earlier rows score higher: only the LAST row (the final evaluation) may count.
    _fake_run(root, "breakout-s0", "breakout.yaml", 0, [50.0, 10.0])
    _fake_run(root, "breakout-s1", "breakout.yaml", 1, [20.0])
    _fake_run(root, "nested/pong-s0", "pong.yaml", 0, [5.0, -10.0])
    _fake_run(root, "nested/pong-s1", "pong.yaml", 1, [0.0])
    _fake_run(root, "cartpole", "cartpole.yaml", 0, [200.0])  # not Atari 100k: skipped
    (root / "no-eval" / "checkpoints").mkdir(parents=True)  # no evaluation yet: skipped
    save_config(load_config(REPO / "configs" / "alien.yaml"), root / "no-eval" / "config.yaml")
    return root


def test_final_evaluation_is_last_row(suite_root: Path) -> None:
    assert len(find_runs(suite_root)) == 6
    assert final_evaluation(suite_root / "breakout-s0")["mean_return"] == 10.0
    assert final_evaluation(suite_root / "no-eval") is None


def test_suite_report_by_hand(suite_root: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "out" / "suite"
    result = CliRunner().invoke(main, ["eval", "--suite", "atari100k", str(suite_root),
                                       "--out-prefix", str(prefix)])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output
    assert "CartPole-v1 is not in the Atari 100k suite" in result.output

    text = prefix.with_suffix(".csv").read_text()
    rows = {r["game"]: r for r in csv.DictReader(text.splitlines())}
    # Breakout: finals 10 and 20 -> 15.0; HNS (15 - 1.7) / (30.5 - 1.7) = 0.4618;
    # paper 414.1 -> 412.4 / 28.8 = 14.3194.
    assert rows["Breakout"] == {"game": "Breakout", "env_id": "ALE/Breakout-v5", "seeds": "2",
                                "seed_scores": "10.0;20.0", "score": "15.0", "hns": "0.462",
                                "paper_score": "414.1", "paper_hns": "14.319"}
    # Pong: finals -10 and 0 -> -5.0; HNS (-5 + 20.7) / 35.3 = 0.4448; paper 40.8 / 35.3.
    assert rows["Pong"]["score"] == "-5.0" and rows["Pong"]["seeds"] == "2"
    assert rows["Pong"]["hns"] == "0.445" and rows["Pong"]["paper_hns"] == "1.156"
    # Mean and median of two games coincide: ours (0.4618 + 0.4448) / 2 = 0.4533,
    # the paper's (14.3194 + 1.1558) / 2 = 7.7376.
    assert (rows["(mean HNS)"]["hns"], rows["(mean HNS)"]["paper_hns"]) == ("0.453", "7.738")
    assert (rows["(median HNS)"]["hns"], rows["(median HNS)"]["paper_hns"]) == ("0.453", "7.738")
    above = rows["(games >= human)"]
    assert (above["hns"], above["paper_hns"]) == ("0", "2")
    assert set(rows) == {"Breakout", "Pong", "(mean HNS)", "(median HNS)", "(games >= human)"}

    md = prefix.with_suffix(".md").read_text()
    assert "| Breakout | ALE/Breakout-v5 | 2 | 15.0 | 0.462 | 414.1 | 14.319 |" in md
    assert "| mean HNS | 0.453 | 7.738 |" in md
    assert "| games >= human | 0 | 2 |" in md


def test_minatar_suite_by_hand(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _fake_run(root, "breakout-s0", "minatar/breakout.yaml", 0, [30.0, 12.0])
    _fake_run(root, "breakout-s1", "minatar/breakout.yaml", 1, [6.0])
    _fake_run(root, "seaquest-s3", "minatar/seaquest.yaml", 3, [25.5])
    _fake_run(root, "pong", "pong.yaml", 0, [5.0])  # not MinAtar: skipped
    prefix = tmp_path / "out" / "minatar"
    result = CliRunner().invoke(main, ["eval", "--suite", "minatar", str(root),
                                       "--out-prefix", str(prefix)])
    assert result.exit_code == 0, result.output
    assert "ALE/Pong-v5 is not in the MinAtar suite" in result.output
    assert "2 games, 3 runs: 1 beat DQN" in result.output
    rows = {r["game"]: r for r in csv.DictReader(prefix.with_suffix(".csv").read_text()
                                                 .splitlines())}
    # Breakout: finals 12 and 6 -> 9.0 +- 3.0 (population std), below DQN's 10 at 5M frames.
    assert rows["breakout"] == {"game": "breakout", "seeds": "0;1", "seed_scores": "12.00;6.00",
                                "score": "9.00", "std": "3.00", "dqn_5m": "10",
                                "random": "0.38", "beats_dqn": "no"}
    # Seaquest: one seed at 25.5 against DQN's 20.
    assert (rows["seaquest"]["score"], rows["seaquest"]["beats_dqn"]) == ("25.50", "yes")
    md = prefix.with_suffix(".md").read_text()
    assert "| breakout | 0;1 | 9.00 +- 3.00 | 12.00, 6.00 | 10 | 0.38 | no |" in md
    assert "1 of 2 games beat DQN's 5M-frame return." in md


def test_suite_report_without_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", "--suite", "atari100k", str(tmp_path)])
    assert result.exit_code != 0
    assert "no evaluated Atari 100k runs" in result.output


def test_plot_learning_curves(suite_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    result = CliRunner().invoke(main, ["plot", str(suite_root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    # A single run directory works too.
    result = CliRunner().invoke(main, ["plot", str(suite_root / "breakout-s0"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
