"""The pipeline on Ray (`--backend ray`), run for real through the CLI on a local Ray
instance: a short run, Ctrl-C with a final checkpoint, a resume, and a killed actor."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ezengine.checkpoint import load_checkpoint

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["configs/cartpole.yaml", "--backend", "ray", "--device", "cpu", "--seed", "3",
        "--set", "search.num_simulations=4", "--set", "learner.batch_size=16",
        "--set", "run.start_transitions=200", "--set", "run.eval_episodes=1",
        "--set", "run.eval_interval=100000", "--set", "run.log_interval_s=1",
        "--set", "run.checkpoint_interval=20", "--set", "model.lstm_hidden=16"]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def stop_leftover_runs():
    """A run a failed test left behind stops the orderly way (SIGTERM: its Ray instance
    shuts down with it), so it does not load the machine for the tests after it."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    STARTED.append(proc)
    return proc


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 240.0) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail("run ended early:\n" + "".join(seen))
        seen.append(line)
        if re.search(pattern, line):
            return line
    pytest.fail(f"no line matching {pattern!r}:\n" + "".join(seen))


def records(run: Path) -> int:
    path = run / "replay" / "collector-0.bin"
    return path.stat().st_size if path.exists() else 0


def test_ctrl_c_checkpoints_and_a_resume_finishes_on_ray(tmp_path):
    run = tmp_path / "run"
    proc = start([*TINY, "--env-steps", "800", "--run-dir", str(run)])
    wait_for_line(proc, r"train (\d{2,}),?\d*/")  # training is under way
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "continue with `ezengine train --resume" in out
    stopped = load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"]
    logged = records(run)
    assert 0 < stopped < 400 and logged > 0
    before = (run / "replay" / "collector-0.bin").read_bytes()

    proc = start(["--resume", str(run), "--backend", "ray"])
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"] == 400
    # Nothing collected before the stop is lost: the log goes on from it.
    assert (run / "replay" / "collector-0.bin").read_bytes()[:len(before)] == before
    evals = (run / "eval.jsonl").read_text().splitlines()
    assert evals and np.isfinite(float(re.search(r'"mean_return": ([\d.]+)', evals[-1])[1]))


def test_a_killed_actor_stops_the_run_naming_it(tmp_path):
    run = tmp_path / "run"
    proc = start([*TINY, "--env-steps", "100000", "--run-dir", str(run)])
    line = wait_for_line(proc, r"collector-0: Ray actor, pid \d+")
    pid = int(re.search(r"pid (\d+)", line)[1])
    wait_for_line(proc, r"train (\d{2,}),?\d*/")
    logged = records(run)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "run failed in collector-0" in out and "SIGKILL" in out
    assert records(run) >= logged  # what was logged stays
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"] > 0


def test_a_ray_run_is_the_local_run(tmp_path):
    # The timetable holds across backends: the same seed gives the same weights, bit for
    # bit, through Ray actors and through the local processes (with a reanalyse helper,
    # a Ray actor of its own, searching half of each batch's roots).
    def trained(name: str, backend: str) -> dict:
        args = [a if a != "ray" else backend for a in TINY]
        proc = start([*args, "--env-steps", "600", "--run-dir", str(tmp_path / name),
                      "--set", "run.reanalysers=2"])
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        return load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt")["learner"]["model"]

    local, ray = trained("local", "local"), trained("ray", "ray")
    assert all(torch.equal(local[k], ray[k]) for k in local)


def test_the_hub_queues_puts_in_their_order_whatever_order_they_run_in(tmp_path):
    # RayTransport sends a put without waiting for the one before it, and an async actor
    # may run one caller's calls out of order: the numbers the puts carry keep the queue
    # in the order they were sent (priorities out of order would stop the run).
    import asyncio

    from ezengine.config import config_to_dict, load_config
    from ezengine.envs import EnvDescription
    from ezengine.pipeline.ray_backend import Hub
    from ezengine.pipeline.spec import PipelineSpec

    spec = PipelineSpec(
        config=config_to_dict(load_config(ROOT / "configs/cartpole.yaml")),
        run_dir=str(tmp_path), env=EnvDescription((4,), "float32", 2), num_collectors=1,
        resume=False, transitions=[], batches=None, priorities=None, counters=None,
        selfplay_weights=[], target_weights=[], eval_weights=None, search_requests=[],
        search_results=[], reanalysis_jobs=[], reanalysis_results=[], prefix="",
        supervisor_pid=os.getpid())

    async def scenario() -> list:
        hub = Hub(spec, {})
        later = [asyncio.create_task(hub.put("priorities", seq, f"step {seq + 1}"))
                 for seq in (2, 1)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in later)  # waiting for put 0
        assert await hub.put("priorities", 0, "step 1")
        assert all(await asyncio.gather(*later))
        return [await hub.take("priorities", 0.1) for _ in range(3)]

    assert asyncio.run(scenario()) == ["step 1", "step 2", "step 3"]
