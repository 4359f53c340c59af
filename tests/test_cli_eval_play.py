"""`ezengine eval` and `ezengine play` on a real (tiny) training run, an untrained Atari
checkpoint, and the failure cases users hit first; plus the Agent API behind them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ezengine.agent import Agent, checkpoint_path, latest_run
from ezengine.checkpoint import load_checkpoint, save_checkpoint
from ezengine.config import config_to_dict, load_config
from ezengine.envs import describe_env
from ezengine.evaluate import evaluate
from ezengine.model import build_model
from ezengine.play import VideoWriter
from ezengine.recipe import build_network

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from ezengine.cli import main; main()"]

RECORD_KEYS = {"env_id", "checkpoint", "model", "train_steps", "env_steps", "seed",
               "num_simulations", "max_episode_steps", "episodes", "mean_return",
               "std_return", "returns", "lengths", "eval_s", "hns"}


def ez(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a subprocess with one torch thread and no display."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CartPole run: 600 env steps, 150 training steps (0.25 per env step, the
    random warm-up's share included), one final evaluation."""
    run = tmp_path_factory.mktemp("runs") / "cartpole-tiny"
    ez(*CLI, "train", "configs/cartpole.yaml", "--serial", "--run-dir", run,
       "--env-steps", "600", "--set", "run.start_transitions=300",
       "--set", "run.eval_episodes=1", "--set", "run.eval_interval=1000000",
       "--set", "search.num_simulations=4", "--set", "learner.batch_size=16",
       "--set", "run.replay_ratio=0.25")
    assert (run / "checkpoints" / "latest.pt").is_file()
    return run


def test_eval_writes_record(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = ez(*CLI, "eval", run, "--episodes", "2", "--out", out)
    record = json.loads(out.read_text())
    assert set(record) == RECORD_KEYS
    assert record["env_id"] == "CartPole-v1"
    assert record["model"] == "final"
    assert record["checkpoint"] == str((run / "checkpoints" / "latest.pt").resolve())
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert record["train_steps"] == state["learner"]["steps"] == 150
    assert record["env_steps"] == state["env_steps"] == 600
    assert record["episodes"] == 2 and len(record["returns"]) == len(record["lengths"]) == 2
    assert record["mean_return"] == pytest.approx(np.mean(record["returns"]))
    assert record["std_return"] == pytest.approx(np.std(record["returns"]))
    assert record["returns"] == [float(n) for n in record["lengths"]]  # CartPole: +1 a step
    assert record["hns"] is None  # not an Atari 100k game
    assert "mean return" in proc.stdout and str(out) in proc.stdout


def test_agent_api(run: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        agent = Agent.load(run)
        assert agent.label == "final" and agent.input_shape == (4,)
        actions = agent.act(np.zeros((3, 4), dtype=np.float32))
        assert actions.shape == (3,) and actions.dtype == np.int64
        assert set(actions.tolist()) <= {0, 1}
        with pytest.raises(ValueError, match="shape"):
            agent.act(np.zeros((3, 5), dtype=np.float32))
        record = agent.evaluate(episodes=1, seed=3)
        assert set(record) == RECORD_KEYS and record["seed"] == 3
    finally:
        torch.set_num_threads(threads)
    assert latest_run(run.parent) == run
    with pytest.raises(FileNotFoundError, match="best"):
        checkpoint_path(run, "best")


def test_agent_on_cpu_uses_one_torch_thread(run: Path) -> None:
    """Two intra-op threads beside a busy training run made `ezengine eval` of CartPole
    take minutes instead of seconds; the agent runs with one, as the pipeline does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Agent.load(run, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_example_script(run: Path) -> None:
    proc = ez(sys.executable, "examples/evaluate_checkpoint.py", run, "--episodes", "1")
    record = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(record) == RECORD_KEYS and record["episodes"] == 1


def test_cartpole_values_example_prints_the_agents_root_values(run: Path) -> None:
    proc = ez(sys.executable, "examples/cartpole_values.py", run, "--positions", "5")
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [float(r[0]) for r in rows] == [-0.5, 0.0, 0.5]
    agent = Agent.load(run)
    obs = np.array([[x, 0.0, 0.0, 0.0] for x in np.linspace(-2, 2, 5)], dtype=np.float32)
    expected = agent.search(obs).root_values
    np.testing.assert_allclose([float(v) for v in rows[1][1:]], expected, atol=0.051)


def test_play_render_without_display_writes_video(run: Path) -> None:
    proc = ez(*CLI, "play", run, "--render", "--max-steps", "20")  # the target as for eval
    assert "no display" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("video: "))
    video = Path(line.removeprefix("video: "))
    assert video.is_file() and video.parent == run / "videos"
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[1] >= 480
    # The game itself (gymnasium's CartPole picture: a light background), not bars of the
    # observation on a dark panel.
    assert frame[60:].mean() > 150


def test_play_shows_an_untrained_minatar_agent_on_the_board(tmp_path: Path) -> None:
    pytest.importorskip("minatar")
    cfg = load_config(REPO / "configs" / "minatar" / "breakout.yaml", [
        "search.num_simulations=2", "model.channels=8", "model.lstm_hidden=16"])
    net = build_model(cfg.model, (4, 10, 10), 3, cfg.env.frame_stack)
    ckpt = tmp_path / "breakout" / "checkpoints" / "latest.pt"
    save_checkpoint({"learner": {"model": net.state_dict(), "steps": 0}, "env_steps": 0,
                     "config": config_to_dict(cfg)}, ckpt)
    proc = ez(*CLI, "play", str(ckpt), "--render", "--max-steps", "5")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("video: "))
    cap = cv2.VideoCapture(line.removeprefix("video: "))
    ok, frame = cap.read()
    cap.release()
    # MinAtar's own 10x10 RGB board, upscaled: coloured cells on black.
    board = frame[60:]
    assert ok and frame.shape[1] >= 480
    assert (board.max(axis=2) > 100).mean() > 0.02 and (board.max(axis=2) < 30).mean() > 0.5


def test_play_without_runs_explains(tmp_path: Path) -> None:
    proc = ez(*CLI, "play", cwd=tmp_path, check=False)  # default: most recent run in runs/
    assert proc.returncode != 0
    assert "no trained run" in proc.stderr and "ezengine train" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The command it suggests works from this folder too: its config path exists here.
    config = re.search(r"`ezengine train (\S+)`", proc.stderr).group(1)
    assert (tmp_path / config).is_file(), proc.stderr


def test_gif_writer(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "a.gif", fps=10, echo=lambda _: None)
    for i in range(3):
        writer.write(np.full((20, 30, 3), 60 * i, dtype=np.uint8))
    path = writer.close()
    assert path == tmp_path / "a.gif" and path.stat().st_size > 0


def test_eval_untrained_atari_checkpoint(tmp_path: Path) -> None:
    # A small untrained Breakout network saved in the trainer's checkpoint format.
    cfg = load_config(REPO / "configs" / "breakout.yaml", [
        "search.num_simulations=2", "model.channels=16", "model.reduced_channels=4",
        "model.lstm_hidden=32", "model.support_size=10", "model.projection_hidden=32",
        "model.projection_dim=32", "model.projection_head_hidden=16"])
    net = build_model(cfg.model, (3, 96, 96), 4, cfg.env.frame_stack)
    ckpt = tmp_path / "breakout" / "checkpoints" / "latest.pt"
    save_checkpoint({"learner": {"model": net.state_dict(), "steps": 0}, "env_steps": 0,
                     "config": config_to_dict(cfg)}, ckpt)
    out = tmp_path / "b.json"
    ez(*CLI, "eval", ckpt, "--episodes", "1", "--max-episode-steps", "20", "--out", out)
    record = json.loads(out.read_text())
    assert record["env_id"] == "ALE/Breakout-v5" and record["max_episode_steps"] == 20
    assert record["lengths"][0] <= 20 and record["num_simulations"] == 2
    assert record["hns"] == pytest.approx((record["mean_return"] - 1.7) / (30.5 - 1.7))


def test_checkpoint_config_mismatch_explained(run: Path, tmp_path: Path) -> None:
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    state["config"]["model"]["hidden_dim"] = 64  # the weights were trained with 128
    bad = tmp_path / "bad.pt"
    save_checkpoint(state, bad)
    proc = ez(*CLI, "eval", bad, "--episodes", "1", check=False)
    assert proc.returncode != 0
    assert "do not match the network its config describes" in proc.stderr
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_calls_on_step_once_per_step_of_the_games():
    """The evaluator ticks its CPU clock through `on_step`: once per step of the parallel
    games, so a long evaluation is accounted while it runs."""
    cfg = load_config(REPO / "configs/cartpole.yaml", ["env.eval_max_episode_steps=7"])
    model = build_network(cfg, describe_env(cfg.env))
    calls = []
    result = evaluate(model, cfg, episodes=3, seed=0, on_step=lambda: calls.append(1))
    # A pole cannot fall within 7 steps of a reset whatever the actions, so every game
    # runs to the 7-step cap.
    assert result.lengths == [7, 7, 7]
    assert len(calls) == 7
