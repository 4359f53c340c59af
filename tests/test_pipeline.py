"""The multiprocessing pipeline, run for real through the CLI in a subprocess: Ctrl-C, a
killed child, a crashing child, and resume without losing collected transitions."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ezengine.atomic import atomic_write, remove_leftover_temporaries
from ezengine.checkpoint import load_checkpoint
from ezengine.config import load_config
from ezengine.envs import EnvDescription
from ezengine.metrics import drop_torn_rows
from ezengine.pipeline.layouts import transition_layout
from ezengine.pipeline.transition_log import TransitionLog, log_path
from ezengine.recipe import batch_env_steps

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "search.num_simulations=4", "--set", "learner.batch_size=16",
        "--set", "run.start_transitions=200", "--set", "run.eval_episodes=1",
        "--set", "run.eval_interval=100000", "--set", "run.log_interval_s=0.5",
        "--set", "run.checkpoint_interval=20", "--set", "model.lstm_hidden=16",
        "--device", "cpu"]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_training(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 120.0,
                      env_steps: int = 0) -> None:
    """Wait for a progress row with at least `steps` training and `env_steps` env steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics(run)
        if rows and rows[-1]["train_steps"] >= steps and rows[-1]["env_steps"] >= env_steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no training progress within {timeout}s:\n{proc.stdout.read()}")


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the pipeline's child processes of `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "spawn_main" in cmd:
            out.append((int(entry.name), cmd))
    return out


def shm_entries(pid: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"ez-{pid}-*")]


def log_records(run: Path) -> np.ndarray:
    cfg = load_config(run / "config.yaml")
    obs = EnvDescription((4,), np.dtype(np.float32).str, 2)
    return TransitionLog(log_path(run, 0), transition_layout(cfg, obs)).read()


def test_sigint_stops_everything_with_a_final_checkpoint_then_resume_keeps_the_replay(tmp_path):
    run = tmp_path / "run"
    proc = start(["configs/cartpole.yaml", "--run-dir", str(run), *TINY])
    wait_for_training(run, proc, 30)
    kids = [pid for pid, _ in children(proc.pid)]
    assert len(kids) == 4  # learner, reanalyse, evaluator, collector-0
    # A second process on the same run directory refuses at once (the run holds a lock).
    second = start(["--resume", str(run)])
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 1, out
    assert f"{run} is in use by another ezengine process (pid {proc.pid})" in out, out
    assert "resumed from" not in out and "Traceback" not in out, out
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "SIGINT: stopping" in out
    assert shm_entries(proc.pid) == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in kids), "orphan processes"
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    steps_before = ckpt["learner"]["steps"]
    # The last line says what is saved and how to go on.
    assert out.rstrip().endswith(
        f"stopped: training step {steps_before:,} is saved in {run}/checkpoints/latest.pt; "
        f"continue with `ezengine train --resume {run}`"), out
    # A new run into that directory refuses, and so does a resume whose config no longer
    # fits the checkpoint; neither touches the run.
    saved = {p: p.read_bytes() for p in run.rglob("*")
             if p.is_file() and "tb" not in p.parts and p.name != ".lock"}
    for args, says in [
            (["configs/cartpole.yaml", "--run-dir", str(run)],
             f"{run} already holds a run; continue it with `ezengine train --resume {run}`"),
            (["--resume", str(run), "--set", "model.hidden_dim=96"],
             "the config no longer matches the checkpoint (model.hidden_dim: checkpoint 128, "
             "config 96)")]:
        refused = start(args)
        out, _ = refused.communicate(timeout=60)
        assert refused.returncode == 1 and says in out and "Traceback" not in out, out
        assert {p: p.read_bytes() for p in saved} == saved
    assert steps_before >= metrics(run)[-1]["train_steps"] - 1  # the final checkpoint
    records_before = log_records(run)
    env_steps_before = int(records_before["env_steps"][-1, 0])
    # Every published transition is in the log: 8 environment steps per record, in order.
    np.testing.assert_array_equal(records_before["env_steps"][:, 0],
                                  8 * np.arange(1, len(records_before) + 1))

    proc = start(["--resume", str(run)])
    out_rows = len(metrics(run))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = metrics(run)[out_rows:]
        if (rows and rows[-1]["train_steps"] > steps_before + 10
                and rows[-1]["env_steps"] > env_steps_before + 16):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert f"resumed from training step {steps_before}" in out
    assert f"{len(records_before)} transition records" in out
    resumed = metrics(run)[out_rows:]
    # Counters continue: env steps never restart from 0 and training goes on from the checkpoint.
    assert resumed[0]["env_steps"] >= env_steps_before
    assert resumed[0]["train_steps"] >= steps_before
    assert resumed[-1]["replay_positions"] >= env_steps_before
    assert resumed[-1]["train_steps"] > steps_before
    records_after = log_records(run)
    assert len(records_after) > len(records_before)
    np.testing.assert_array_equal(records_after[:len(records_before)], records_before)
    assert shm_entries(proc.pid) == []


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper that may never come does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the children and the resource tracker)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def test_a_half_written_record_is_cut_off_so_appending_stays_aligned(tmp_path):
    layout = [("x", (3,), np.dtype(np.float32)), ("env_steps", (1,), np.dtype(np.int64))]
    log = TransitionLog(tmp_path / "collector-0.bin", layout)
    for i in range(3):
        log.append({"x": np.full(3, i, np.float32), "env_steps": np.array([8 * (i + 1)])})
    with open(log.path, "ab") as f:  # a collector killed in the middle of a write
        f.write(b"\x01" * 7)
    assert log.count() == 3
    assert log.drop_partial_record() == 7
    assert log.drop_partial_record() == 0
    log.append({"x": np.full(3, 3, np.float32), "env_steps": np.array([32])})
    records = log.read()
    np.testing.assert_array_equal(records["x"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(records["env_steps"][:, 0], [8, 16, 24, 32])


@pytest.mark.parametrize("victim", ["supervisor", "ez-learner", "ez-reanalyse",
                                    "ez-collector-0"])
def test_killing_any_process_then_resuming_loses_no_transition(tmp_path, victim):
    run = tmp_path / "run"
    rng = random.Random(victim)  # a different, reproducible moment for each victim
    proc = start(["configs/cartpole.yaml", "--run-dir", str(run), *TINY])
    wait_for_training(run, proc, rng.randint(5, 40))
    time.sleep(rng.uniform(0.0, 0.5))
    kids = descendants(proc.pid)
    names = {Path(f"/proc/{pid}/comm").read_text().strip(): pid for pid, _ in
             children(proc.pid)}
    assert set(names) == {"ez-learner", "ez-reanalyse", "ez-evaluator", "ez-collector-0"}
    if victim == "supervisor":
        proc.kill()
        proc.wait(timeout=10)
    else:
        os.kill(names[victim], signal.SIGKILL)
        proc.wait(timeout=90)
    # Without a supervisor the children stop the orderly way and remove the run's shared
    # memory; the resource tracker exits when the last of them has.
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    out = proc.stdout.read()
    if victim != "supervisor":
        assert proc.returncode == 1, out
        assert f"{victim[3:]} died (killed by signal SIGKILL)" in out
    assert [pid for pid in kids if alive(pid)] == [], f"orphan processes:\n{out}"
    assert shm_entries(proc.pid) == [], out
    records_before = log_records(run)
    assert len(records_before) > 0

    proc = start(["--resume", str(run)])
    steps_before = load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"]
    wait_for_training(run, proc, steps_before + 10,
                      env_steps=int(records_before["env_steps"][-1, 0]) + 16)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert f"with {len(records_before)} transition records" in out
    records_after = log_records(run)
    assert len(records_after) > len(records_before)
    np.testing.assert_array_equal(records_after[:len(records_before)], records_before)
    np.testing.assert_array_equal(records_after["env_steps"][:, 0],
                                  8 * np.arange(1, len(records_after) + 1))
    assert shm_entries(proc.pid) == []


def test_a_crashing_child_reports_its_traceback(tmp_path):
    run = tmp_path / "run"
    # A whole short run with the model owner doing all inference: reanalysis inside the
    # learner (the CUDA placement) and the collector's searches answered by the learner.
    proc = start(["configs/cartpole.yaml", "--run-dir", str(run), "--env-steps", "400", *TINY,
                  "--set", "run.reanalyse_placement=learner",
                  "--set", "run.collector_inference=learner",
                  "--set", "run.selfplay_update_interval=10", "--set", "run.replay_ratio=0.25"])
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "processes: learner, evaluator, collector-0 |" in out
    # The evaluator's rows reach the console, and the last line names the final return.
    final = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert re.search(r"eval @ 100 training steps / \d+ env steps: mean return "
                     rf"{final['mean_return']:.1f} \+- ", out), out
    assert out.rstrip().endswith(f"final mean return {final['mean_return']:.1f}"), out
    # 0.25 training steps per env step, the 200 warm-up steps' share included.
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"] == 100
    records = log_records(run)
    assert int(records["env_steps"][-1, 0]) == 400
    # After the 200 random warm-up steps the learner searched for the collector (which
    # loads no weights itself in this mode): 4-simulation visit distributions (multiples of
    # 1/4) and, once trained weights were published, non-zero root values.
    searched = records["env_steps"][:, 0] > 200
    assert searched.sum() == 25
    assert (records["root_values"][~searched] == 0).all()
    assert (records["root_values"][searched][-10:] != 0).all()
    policies = records["policies"][searched]
    np.testing.assert_allclose(policies * 4, np.round(policies * 4), atol=1e-6)
    # A corrupt checkpoint stops the resume before anything starts: one line, no traceback,
    # nothing changed in the run.
    (run / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    logs_before = {p.name: p.read_bytes() for p in (run / "replay").iterdir()}
    proc = start(["--resume", str(run)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "Traceback" not in out and "weights_only" not in out, out
    assert "latest.pt is corrupt or not an ezengine checkpoint" in out, out
    assert "resumed from" not in out, out
    assert {p.name: p.read_bytes() for p in (run / "replay").iterdir()} == logs_before


def test_an_atari_run_trains_on_stacked_image_frames_through_the_rings(tmp_path):
    # Real ALE frames (3 x 48 x 48 here, stack 4) through every ring: the batches carry
    # frame windows that the learner stacks into model inputs.
    run = tmp_path / "run"
    small = ["model.channels=16", "model.reduced_channels=4", "model.lstm_hidden=16",
             "model.projection_hidden=32", "model.projection_dim=32",
             "model.projection_head_hidden=16", "model.support_size=10", "env.frame_size=48",
             "env.num_envs=2", "learner.batch_size=4", "search.num_simulations=2",
             "run.start_transitions=80", "run.eval_episodes=1", "env.eval_max_episode_steps=50",
             "run.extra_training_steps=0", "run.log_interval_s=0.5"]
    proc = start(["configs/ms_pacman.yaml", "--run-dir", str(run), "--env-steps", "160",
                  "--device", "cpu", *[a for item in small for a in ("--set", item)]])
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"] == 160
    # Rows of windows with training carry the learner's means over the window.
    trained = [r for r in metrics(run) if "loss" in r]
    assert trained and all(np.isfinite(r["loss"]) for r in trained)
    assert trained[-1]["loss_value"] < trained[0]["loss_value"]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["train_steps"] == 160 and evals[-1]["episodes"] == 1
    assert shm_entries(proc.pid) == []


def test_initial_weights_and_warm_up_data_follow_the_seed(tmp_path):
    # Runs that end before training starts: their checkpoint holds the initial weights.
    def run_with(seed: int, name: str) -> tuple[dict, np.ndarray]:
        run = tmp_path / name
        proc = start(["configs/cartpole.yaml", "--run-dir", str(run), "--env-steps", "200",
                      "--seed", str(seed), *TINY, "--set", "run.extra_training_steps=0",
                      "--set", "run.start_transitions=208"])  # the budget is all warm-up
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        state = load_checkpoint(run / "checkpoints" / "latest.pt")
        assert state["learner"]["steps"] == 0
        return state["selfplay"], log_records(run)

    weights_a, log_a = run_with(0, "a")
    weights_b, log_b = run_with(0, "b")
    weights_c, log_c = run_with(1, "c")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    np.testing.assert_array_equal(log_a, log_b)
    assert not np.array_equal(log_a["frames"], log_c["frames"])


def test_a_torn_last_metrics_row_is_cut_before_resuming(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"env_steps": 8}\n{"env_steps": 1')
    (tmp_path / "eval.jsonl").write_text('{"mean_return": 20.0}\n')
    drop_torn_rows(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"env_steps": 8}\n'
    assert (tmp_path / "eval.jsonl").read_text() == '{"mean_return": 20.0}\n'


def test_temporaries_of_a_checkpoint_write_cut_short_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoints" / "latest.pt"
    atomic_write(ckpt, lambda f: f.write(b"whole"))
    stray = ckpt.parent / ".latest.pt.k2j4x9.tmp"  # what a SIGKILL mid-write leaves
    stray.write_bytes(b"half")
    other = ckpt.parent / ".best.pt.abc.tmp"  # another file's: not ours to remove
    other.write_bytes(b"x")
    assert remove_leftover_temporaries(ckpt) == [stray]
    assert not stray.exists() and other.exists()
    assert ckpt.read_bytes() == b"whole"


def test_a_run_is_the_same_on_any_machine_and_in_serial(tmp_path):
    # The timetable fixes what every piece of work sees: the pipeline alone, the pipeline
    # squeezed onto one core beside a busy process, and the serial runner give the same
    # weights, bit for bit (two collectors, so records from both enter in turn), and the
    # same evaluation records: each at the env steps of its batch, not at the replay's
    # count when the evaluator got to it.
    args = ["configs/cartpole.yaml", "--env-steps", "1200", "--seed", "3", "--collectors", "2",
            *TINY, "--set", "run.checkpoint_interval=100", "--set", "run.eval_interval=100"]
    evaluations = []

    def trained(name: str, *extra: str, one_core: bool = False) -> dict:
        run = tmp_path / name
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        core = sorted(os.sched_getaffinity(0))[:1]
        proc = subprocess.run(
            [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *args,
             "--run-dir", str(run), *extra], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=300,
            preexec_fn=(lambda: os.sched_setaffinity(0, core)) if one_core else None)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        evaluations.append([(r["train_steps"], r["env_steps"], r["returns"]) for r in map(
            json.loads, (run / "eval.jsonl").read_text().splitlines())])
        return load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["model"]

    alone = trained("alone")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(
                                0, sorted(os.sched_getaffinity(0))[:1]))
    try:
        squeezed = trained("one-core", one_core=True)
    finally:
        busy.kill()
        busy.wait()
    serial = trained("serial", "--serial")
    for other in (squeezed, serial):
        assert all(torch.equal(alone[k], other[k]) for k in alone)
    cfg = load_config(ROOT / "configs" / "cartpole.yaml").replace(
        run={"env_steps": 1200, "start_transitions": 200})
    assert [(s, e) for s, e, _ in evaluations[0]] == [
        (s, batch_env_steps(cfg, s, 2)) for s in (100, 200, 300, 400, 500, 600)]
    assert evaluations[1] == evaluations[0] and evaluations[2] == evaluations[0]


def test_a_run_that_ends_early_ends_on_the_evaluated_weights_in_any_runner(tmp_path):
    # Two evaluations in a row at a return every episode reaches end the run at the second
    # (training step 200 of 600), which plays run.stop_eval_episodes episodes. The
    # pipeline's learner trains on while that evaluation runs, learns the outcome before
    # publishing the next (step 300) and goes back to the evaluated weights: its checkpoint
    # is the serial run's, bit for bit. A resume of the ended run trains no further.
    args = ["configs/cartpole.yaml", "--env-steps", "1200", "--seed", "2", *TINY,
            "--set", "run.eval_interval=100", "--set", "run.stop_evaluations=2",
            "--set", "run.stop_return=1", "--set", "run.stop_eval_episodes=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(*extra: str) -> tuple[str, dict, list]:
        proc = subprocess.run(
            [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = Path(extra[extra.index("--run-dir") + 1] if "--run-dir" in extra
                   else extra[extra.index("--resume") + 1])
        rows = [(r["train_steps"], r["returns"]) for r in map(
            json.loads, (run / "eval.jsonl").read_text().splitlines())]
        return proc.stdout, load_checkpoint(run / "checkpoints" / "latest.pt")["learner"], rows

    out, pipeline, rows = train(*args, "--run-dir", str(tmp_path / "pipeline"))
    serial_out, serial, serial_rows = train(*args, "--serial", "--run-dir",
                                            str(tmp_path / "serial"))
    assert pipeline["steps"] == serial["steps"] == 200
    assert all(torch.equal(pipeline["model"][k], serial["model"][k]) for k in serial["model"])
    assert [(s, len(r)) for s, r in rows] == [(100, 1), (200, 3)] and rows == serial_rows
    for text in (out, serial_out):
        assert "the run ends at training step 200" in text and "final mean return" in text
    again, resumed, resumed_rows = train("--resume", str(tmp_path / "pipeline"))
    assert resumed["steps"] == 200 and resumed_rows == rows
    assert "final mean return" in again


def test_reanalyse_helpers_search_parts_of_each_batch_and_change_no_result(tmp_path):
    # run.reanalysers 3: the replay's owner and two helper processes share each batch's
    # re-searches, part p always by helper p; the serial runner searches the same parts one
    # after the other and gives the same weights, bit for bit.
    args = ["configs/cartpole.yaml", "--env-steps", "800", "--seed", "4", *TINY,
            "--set", "run.reanalysers=3", "--set", "learner.reanalyse_fraction=1.0"]

    def trained(name: str, *extra: str) -> tuple[dict, str]:
        run = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *args,
             "--run-dir", str(run), *extra], cwd=ROOT, capture_output=True, text=True,
            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["model"], proc.stdout

    pipeline, out = trained("pipeline")
    assert "processes: learner, evaluator, reanalyse, reanalyse-1, reanalyse-2, collector-0" in out
    serial, _ = trained("serial", "--serial")
    assert all(torch.equal(pipeline[k], serial[k]) for k in pipeline)
