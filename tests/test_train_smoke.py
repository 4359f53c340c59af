"""End to end: the real `ezengine train` CLI on CartPole, tiny settings, in a subprocess."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ezengine.checkpoint import load_checkpoint
from ezengine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV_STEPS = 1200
START = 400
RATIO = 0.5
TRAIN_STEPS = int(RATIO * ENV_STEPS)  # paced steps (the warm-up's share included), no extra: 600


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # A tiny model gains nothing from intra-op threads, and on a busy machine they stall.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", "from ezengine.cli import main; main()", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_cli(
        "train", "configs/cartpole.yaml", "--serial", "--run-dir", str(out),
        "--env-steps", str(ENV_STEPS),
        "--set", f"run.start_transitions={START}",
        "--set", "run.eval_episodes=2",
        "--set", "run.eval_interval=1000000",
        "--set", "run.log_interval_s=1",
        "--set", "search.num_simulations=8",
        "--set", "learner.batch_size=32",
        "--set", f"run.replay_ratio={RATIO}",
        "--device", "cpu")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "final mean return" in proc.stdout
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_directory_contents(run_dir):
    assert (run_dir / "config.yaml").is_file()
    cfg = load_config(run_dir / "config.yaml")  # the resolved config loads back
    assert cfg.run.env_steps == ENV_STEPS
    assert cfg.learner.batch_size == 32 and cfg.search.num_simulations == 8
    assert cfg.run.start_transitions == START and cfg.run.device == "cpu"
    assert cfg.env.id == "CartPole-v1"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "checkpoints", "config.yaml", "eval.jsonl", "metrics.jsonl", "tb"]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars


def test_checkpoint_loads_safely_and_is_final(run_dir):
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")  # weights_only
    assert state["env_steps"] == ENV_STEPS
    assert state["learner"]["steps"] == TRAIN_STEPS
    assert state["config"]["learner"]["batch_size"] == 32
    assert set(state["learner"]["model"]) == set(state["selfplay"])
    # No stray temporary files from the atomic writes.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["latest.pt"]


def test_final_evaluation_row(run_dir):
    rows = read_jsonl(run_dir / "eval.jsonl")
    assert len(rows) == 1  # eval_interval is huge: only the final evaluation
    final = rows[-1]
    assert final["episodes"] == 2 and len(final["returns"]) == 2
    assert final["train_steps"] == TRAIN_STEPS and final["env_steps"] == ENV_STEPS
    # CartPole returns are episode lengths, 1..500.
    assert all(1 <= r <= 500 for r in final["returns"])
    assert final["mean_return"] == pytest.approx(sum(final["returns"]) / 2)


def test_metrics_show_the_loss_falling(run_dir):
    rows = read_jsonl(run_dir / "metrics.jsonl")
    with_loss = [r for r in rows if "loss" in r]
    assert len(with_loss) >= 4, rows
    for r in with_loss:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_value", "loss_policy",
                                                  "loss_value_prefix", "loss_consistency",
                                                  "grad_norm", "lr"))
    first = with_loss[0]["loss"]
    last = sum(r["loss"] for r in with_loss[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert rows[-1]["train_steps"] <= TRAIN_STEPS
    assert all(a["env_steps"] <= b["env_steps"] for a, b in itertools.pairwise(rows))


def test_bad_override_names_the_key(tmp_path):
    proc = run_cli("train", "configs/cartpole.yaml", "--serial", "--run-dir",
                   str(tmp_path / "run"), "--set", "learner.lr=-1", timeout=120)
    assert proc.returncode != 0
    assert "learner.lr" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started
