"""Run directories cannot be lost, and bad inputs end in one clear line (issue 12): the
claim on a run directory, the checks before anything is created, a full disk, the commands'
help. The pipeline's lock and resume checks run for real in test_pipeline.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ezengine.atomic import DiskFullError, atomic_write
from ezengine.cli import main
from ezengine.metrics import append_jsonl
from ezengine.pipeline.transition_log import TransitionLog
from ezengine.rundir import RunDirError, checkpoint_mismatch, claim_run_dir

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "configs" / "cartpole.yaml")
TINY_SERIAL = ["--serial", "--device", "cpu", "--env-steps", "300",
               "--set", "run.start_transitions=200", "--set", "search.num_simulations=2",
               "--set", "learner.batch_size=8", "--set", "run.eval_episodes=1",
               "--set", "env.eval_max_episode_steps=20", "--set", "run.checkpoint_interval=10"]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# ------------------------------------------------------------------ the claim


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("kept: true\n")
    with pytest.raises(RunDirError, match="already holds a run; continue it with "
                                          "`ezengine train --resume"), \
            claim_run_dir(run, resume=False):
        pass
    assert (run / "config.yaml").read_text() == "kept: true\n"
    assert not (run / ".lock").exists()


def test_a_second_claim_on_a_held_directory_refuses_at_once(tmp_path):
    with claim_run_dir(tmp_path / "run", resume=False):
        (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
        with pytest.raises(RunDirError, match=rf"in use by another ezengine process "
                                              rf"\(pid {os.getpid()}\)"), \
                claim_run_dir(tmp_path / "run", resume=True):
            pass
    # Released when the block ends: a resume may claim it now.
    with claim_run_dir(tmp_path / "run", resume=True):
        pass


def test_a_failed_start_leaves_no_half_made_run_directory(tmp_path):
    # A directory the claim created is removed; in one that existed, only what the start
    # made goes: a user's own files stay.
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for run in (tmp_path / "new", empty, tmp_path / "mine"):
        with pytest.raises(RuntimeError), claim_run_dir(run, resume=False):
            (run / "replay").mkdir()
            (run / "replay" / "collector-0.bin").write_bytes(b"")
            (run / "config.yaml").write_text("x: 1\n")
            raise RuntimeError("start-up failed")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in empty.iterdir() if p.name != ".lock"] == []
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [".lock", "notes.txt"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    # A failure reported without raising (a pipeline's exit code) is undone as well.
    with claim_run_dir(tmp_path / "coded", resume=False) as claim:
        (tmp_path / "coded" / "config.yaml").write_text("x: 1\n")
        claim.failed = True
    assert not (tmp_path / "coded").exists()


def test_a_run_with_progress_is_never_removed(tmp_path):
    for progress in ("checkpoints/latest.pt", "replay/collector-0.bin"):
        run = tmp_path / progress.split("/")[0]
        with pytest.raises(RuntimeError), claim_run_dir(run, resume=False):
            (run / progress).parent.mkdir(parents=True)
            (run / progress).write_bytes(b"data")
            raise RuntimeError("crashed later")
        assert (run / progress).read_bytes() == b"data"


def test_a_resume_names_the_field_the_checkpoint_disagrees_with():
    stored = {"model": {"hidden_dim": 128, "latent_dim": 64}, "run": {"env_steps": 1000}}
    current = {"model": {"hidden_dim": 96, "latent_dim": 64}, "run": {"env_steps": 5000}}
    # The budget may grow on a resume; the network may not change.
    assert checkpoint_mismatch(stored, current) == [
        "model.hidden_dim: checkpoint 128, config 96"]


# ------------------------------------------------------------------ bad inputs, one line


def test_an_unknown_environment_id_is_one_line_and_creates_nothing(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"extends: {CARTPOLE}\nenv:\n  id: CartPoleX-v9\n")
    code, out = cli("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert code == 1
    assert out.strip() == (f"Error: {config}: env.id 'CartPoleX-v9': Environment `CartPoleX` "
                           "doesn't exist. Did you mean: `CartPole`?")
    assert not (tmp_path / "run").exists()


def test_an_unknown_atari_game_is_one_line_and_creates_nothing(tmp_path):
    code, out = cli("train", str(ROOT / "configs" / "breakout.yaml"), "--set",
                    "env.id=NotAGameNoFrameskip-v4", "--run-dir", str(tmp_path / "run"))
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert "env.id 'NotAGameNoFrameskip-v4'" in out and "doesn't exist" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--address", "auto"], "--address joins a Ray cluster: add --backend ray"),
    (["--serial", "--backend", "ray"], "--serial runs every role in this process: leave out "
                                       "--backend ray"),
])
def test_ray_options_a_run_would_ignore_are_refused(tmp_path, args, message):
    # Before: --address without --backend ray trained locally, and --serial trained in one
    # process, each ignoring the Ray option without a word.
    small = [a for a in TINY_SERIAL if a != "--serial"]
    code, out = cli("train", CARTPOLE, *small, *args, "--run-dir", str(tmp_path / "r"))
    assert code == 2 and message in out, out
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_and_creates_nothing(tmp_path):
    code, out = cli("train", CARTPOLE, "--device", "cuda", "--run-dir", str(tmp_path / "r"))
    assert code == 1
    assert out.strip() == (f"Error: {CARTPOLE}: run.device is 'cuda' but torch sees no CUDA "
                           "GPU here; use --device cpu or --device auto")
    assert not (tmp_path / "r").exists()


def test_a_serial_run_refuses_to_overwrite_a_trained_run(tmp_path):
    run = tmp_path / "run"
    code, out = cli("train", CARTPOLE, "--run-dir", str(run), *TINY_SERIAL)
    assert code == 0, out
    trained = (run / "checkpoints" / "latest.pt").read_bytes()
    code, out = cli("train", CARTPOLE, "--run-dir", str(run), *TINY_SERIAL)
    assert code == 1
    assert out.strip() == (f"Error: {run} already holds a run; continue it with `ezengine "
                           f"train --resume {run}` or give a new --run-dir")
    assert (run / "checkpoints" / "latest.pt").read_bytes() == trained


# ------------------------------------------------------------------ a full disk


def full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"previous")
    with pytest.raises(DiskFullError, match=f"disk full while writing {path}: the previous "
                                            "latest.pt is kept unchanged"):
        atomic_write(path, full_disk)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary left


def test_a_full_disk_while_logging_names_the_file():
    # /dev/full fails every write with ENOSPC, as a full disk does.
    log = TransitionLog(Path("/dev/full"), [("x", (4,), np.dtype(np.float32))])
    with pytest.raises(DiskFullError, match="disk full while writing /dev/full: every record "
                                            "before this one is kept"):
        log.append({"x": np.zeros(4, np.float32)})
    with pytest.raises(DiskFullError, match="the rows before this one are kept"):
        append_jsonl(Path("/dev/full"), {"a": 1})


def test_a_full_disk_during_training_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    code, out = cli("train", CARTPOLE, "--run-dir", str(run), *TINY_SERIAL)
    assert code == 1
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith(
        f"Error: disk full while writing {run}/checkpoints/latest.pt: no part of it was "
        "written. Free some space")
    # The first checkpoint failed before anything else was kept: no half-made run is left.
    assert not run.exists()


# ------------------------------------------------------------------ commands fit together


@pytest.mark.parametrize("command", ["train", "eval", "play", "plot", "config"])
def test_every_help_shows_an_example(command):
    code, out = cli(command, "--help")
    assert code == 0
    examples = out.split("Examples:", 1)[1]
    assert f"ezengine {command} " in examples



def test_ctrl_c_in_a_serial_run_says_what_is_saved(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from ezengine.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = [*TINY_SERIAL, "--env-steps", "100000"]  # the last --env-steps wins
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ezengine.cli import main; main()", "train", CARTPOLE,
         "--run-dir", str(run), *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    ckpt = run / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    steps = load_checkpoint(ckpt)["learner"]["steps"]
    assert out.rstrip().splitlines()[-1] == (
        f"stopped: training step {steps:,} is saved in {ckpt} (a --serial run keeps no replay "
        f"logs, so it cannot be resumed; evaluate it with `ezengine eval {run}`)")
