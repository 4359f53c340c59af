"""The pipeline on Ray (`--backend ray`), run for real through the CLI on a local Ray
instance: a short run, Ctrl-C with a final checkpoint, a resume, and a killed actor."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ezengine.checkpoint import load_checkpoint
from ezengine.pipeline.transport import Timeout

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["configs/cartpole.yaml", "--backend", "ray", "--device", "cpu", "--seed", "3",
        "--set", "search.num_simulations=4", "--set", "learner.batch_size=16",
        "--set", "run.start_transitions=200", "--set", "run.eval_episodes=1",
        "--set", "run.eval_interval=100000", "--set", "run.log_interval_s=1",
        "--set", "run.checkpoint_interval=20", "--set", "model.lstm_hidden=16"]


# How long a run may print nothing before a test calls it stuck. Tests wait on progress,
# not on the clock: a run on a loaded machine is slow, but it keeps printing its progress
# (every run.log_interval_s, 1 s here).
QUIET_S = 180.0


class Run:
    """A training run in a subprocess, its output read line by line as it comes."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next_line(self) -> str | None:
        try:
            line = self._lines.get(timeout=QUIET_S)
        except queue.Empty:
            pytest.fail(f"the run printed nothing for {QUIET_S:.0f}s:\n" + "".join(self.seen))
        if line is not None:
            self.seen.append(line)
        return line

    def wait_for_line(self, pattern: str) -> str:
        """The first line from now on that matches `pattern`."""
        while (line := self._next_line()) is not None:
            if re.search(pattern, line):
                return line
        pytest.fail(f"run ended before a line matching {pattern!r}:\n" + "".join(self.seen))

    def finish(self) -> tuple[int, str]:
        """Wait for the run to end while it keeps printing: (exit code, all its output)."""
        while self._next_line() is not None:
            pass
        return self.proc.wait(), "".join(self.seen)


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


def start(args: list[str]) -> Run:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # a process group of its own, as a terminal gives a command
    STARTED.append(proc)
    return Run(proc)


def records(run: Path) -> int:
    path = run / "replay" / "collector-0.bin"
    return path.stat().st_size if path.exists() else 0


@pytest.mark.parametrize("resume_backend", ["ray", "local"])
def test_ctrl_c_checkpoints_and_a_resume_finishes_with_either_backend(tmp_path, resume_backend):
    run = tmp_path / "run"
    train = start([*TINY, "--env-steps", "800", "--run-dir", str(run)])
    train.wait_for_line(r"train (\d{2,}),?\d*/")  # training is under way
    os.killpg(train.proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole group
    code, out = train.finish()
    assert code == 0, out
    assert "continue with `ezengine train --resume" in out
    stopped = load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"]
    logged = records(run)
    assert 0 < stopped < 400 and logged > 0
    before = (run / "replay" / "collector-0.bin").read_bytes()

    code, out = start(["--resume", str(run), "--backend", resume_backend]).finish()
    assert code == 0, out
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"] == 400
    # Nothing collected before the stop is lost: the log goes on from it.
    assert (run / "replay" / "collector-0.bin").read_bytes()[:len(before)] == before
    evals = (run / "eval.jsonl").read_text().splitlines()
    assert evals and np.isfinite(float(re.search(r'"mean_return": ([\d.]+)', evals[-1])[1]))


def test_a_killed_actor_stops_the_run_naming_it(tmp_path):
    run = tmp_path / "run"
    train = start([*TINY, "--env-steps", "100000", "--run-dir", str(run)])
    line = train.wait_for_line(r"collector-0: Ray actor, pid \d+")
    pid = int(re.search(r"pid (\d+)", line)[1])
    assert os.getpriority(os.PRIO_PROCESS, pid) == 0  # not Ray's default of 15
    train.wait_for_line(r"train (\d{2,}),?\d*/")
    logged = records(run)
    os.kill(pid, signal.SIGKILL)
    code, out = train.finish()
    assert code == 1, out
    assert f"run failed in collector-0: collector-0's Ray actor died (pid {pid}; Ray: " in out
    assert records(run) >= logged  # what was logged stays
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["learner"]["steps"] > 0


def test_an_address_where_nothing_answers_is_one_line_at_once(tmp_path):
    # Before: Ray retried the address for minutes, printing its own warnings.
    run = tmp_path / "run"
    code, out = start([*TINY, "--address", "127.0.0.1:1", "--run-dir", str(run)]).finish()
    assert code == 1, out
    assert "could not start or join the Ray cluster at '127.0.0.1:1': nothing answers" in out
    assert "Traceback" not in out and not run.exists()


def test_a_remote_resource_no_node_offers_is_one_line_at_once(tmp_path):
    run = tmp_path / "run"
    code, out = start([*TINY, "--set", "run.ray_remote_resource=ezworker",
                       "--run-dir", str(run)]).finish()
    assert code == 1, out
    assert ("run.ray_remote_resource is 'ezworker': this run's 1 collectors and reanalyse "
            "helpers take one unit each and the Ray cluster offers 0") in out, out
    assert not run.exists()


def test_each_role_asks_ray_for_what_it_needs():
    from ezengine.config import load_config
    from ezengine.pipeline.ray_backend import actor_options

    head = object()  # the head node's scheduling strategy
    cfg = load_config(ROOT / "configs/cartpole.yaml", ["run.ray_actor_cpus=0.25"])
    assert actor_options(cfg, "learner", 0, head, on_cuda=True) == {
        "num_cpus": 0.25, "num_gpus": 1, "scheduling_strategy": head}
    assert actor_options(cfg, "reanalyse", 0, head, on_cuda=True) == {
        "num_cpus": 0.25, "num_gpus": 0, "scheduling_strategy": head}  # owns the replay
    assert actor_options(cfg, "collector", 3, head, on_cuda=False) == {
        "num_cpus": 0.25, "num_gpus": 0}  # any node
    pinned = cfg.replace(run={"ray_remote_resource": "ezworker"})
    for role, index in (("collector", 0), ("reanalyse", 1)):
        assert actor_options(pinned, role, index, head, on_cuda=False) == {
            "num_cpus": 0.25, "num_gpus": 0, "resources": {"ezworker": 1}}
    assert actor_options(pinned, "evaluator", 0, head, on_cuda=False)[
        "scheduling_strategy"] is head


def test_a_ray_run_is_the_local_run(tmp_path):
    # The timetable holds across backends: the same seed gives the same weights, bit for
    # bit, through Ray actors and through the local processes (with a reanalyse helper,
    # a Ray actor of its own, searching half of each batch's roots). Both end early at the
    # second evaluation (step 200 of 300), on its weights.
    def trained(name: str, backend: str) -> dict:
        args = [a if a != "ray" else backend for a in TINY]
        code, out = start([*args, "--env-steps", "600", "--run-dir", str(tmp_path / name),
                           "--set", "run.reanalysers=2", "--set", "run.eval_interval=100",
                           "--set", "run.stop_evaluations=2", "--set", "run.stop_return=1"]
                          ).finish()
        assert code == 0, out
        assert "the run ends at training step 200" in out
        return load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt")["learner"]

    local, ray = trained("local", "local"), trained("ray", "ray")
    assert local["steps"] == ray["steps"] == 200
    assert all(torch.equal(local["model"][k], ray["model"][k]) for k in local["model"])


def test_an_inbox_queues_deliveries_in_their_order_and_holds_back_a_full_queue():
    # A producer sends an item without waiting for the one before it, and a threaded
    # actor may run the deliveries in any order: the numbers they carry keep the queue in
    # the order they were sent (priorities out of order would stop the run). A full queue
    # holds a delivery back until its taker takes, and the taker's end releases it.
    import threading

    from ezengine.pipeline.ray_backend import Inbox

    inbox = Inbox({"priorities": 2})
    results: dict[int, bool] = {}

    def deliver(seq: int) -> None:
        results[seq] = inbox.deliver("priorities", seq, f"step {seq + 1}")

    later = [threading.Thread(target=deliver, args=(seq,)) for seq in (2, 1)]
    for thread in later:
        thread.start()
    time.sleep(0.05)
    assert not results  # waiting for delivery 0
    deliver(0)
    later[1].join(timeout=5)  # delivery 1 went in, delivery 2 waits for room
    time.sleep(0.05)
    assert results == {0: True, 1: True} and later[0].is_alive()
    assert inbox.take("priorities", 0.1) == "step 1"
    later[0].join(timeout=5)
    assert results[2] is True
    assert [inbox.take("priorities", 0.1) for _ in range(2)] == ["step 2", "step 3"]
    with pytest.raises(Timeout):
        inbox.take("priorities", 0.05)

    blocked = threading.Thread(target=deliver, args=(4,))  # never its turn
    blocked.start()
    inbox.close()
    blocked.join(timeout=5)
    assert results[4] is False


def test_the_hub_queues_records_in_their_order_logs_them_and_hands_out_all_queued(tmp_path):
    # A collector sends its next record before the hub has answered the last one, and
    # calls may start in any order: each record carries its number, and the hub logs and
    # queues them in that order. The replay's owner takes everything queued in one call.
    import asyncio

    from ezengine.config import config_to_dict, load_config
    from ezengine.envs import EnvDescription
    from ezengine.pipeline.layouts import transition_layout
    from ezengine.pipeline.ray_backend import Hub
    from ezengine.pipeline.spec import PipelineSpec
    from ezengine.pipeline.transition_log import TransitionLog, log_path

    cfg = load_config(ROOT / "configs/cartpole.yaml")
    env = EnvDescription((4,), np.dtype(np.float32).str, 2)
    spec = PipelineSpec(
        config=config_to_dict(cfg), run_dir=str(tmp_path), env=env, num_collectors=1,
        resume=False, transitions=[], batches=None, priorities=None, counters=None,
        selfplay_weights=[], target_weights=[], eval_weights=None, search_requests=[],
        search_results=[], reanalysis_jobs=[], reanalysis_results=[], prefix="",
        supervisor_pid=os.getpid())
    layout = transition_layout(cfg, env)

    def record(env_steps: int) -> dict:
        rec = {name: np.zeros(shape, dtype) for name, shape, dtype in layout}
        rec["env_steps"][...] = env_steps
        return rec

    async def exchange() -> tuple[list, list, object]:
        (tmp_path / "replay").mkdir()
        hub = Hub(spec, {})
        later = asyncio.ensure_future(hub.put_record(0, 1, record(16)))
        await asyncio.sleep(0.01)
        assert not later.done()  # waits for record 0
        assert await hub.take_records(0, 0.01) is None
        assert await hub.put_record(0, 0, record(8))
        assert await later
        first = await hub.take_records(0, 0.01)
        assert await hub.put_record(0, 2, record(24))
        await hub.end_records(0)
        second = await hub.take_records(0, 0.01)
        return first, second, await hub.take_records(0, 0.01)

    first, second, last = asyncio.run(exchange())
    assert [int(r["env_steps"][0]) for r in first] == [8, 16]
    assert [int(r["env_steps"][0]) for r in second] == [24]
    assert last == "ended"
    logged = TransitionLog(log_path(tmp_path, 0), layout).read()
    assert [int(v[0]) for v in logged["env_steps"]] == [8, 16, 24]


def tiny_spec(tmp_path: Path, reanalysers: int = 1):
    from ezengine.config import config_to_dict, load_config
    from ezengine.envs import EnvDescription
    from ezengine.pipeline.spec import PipelineSpec

    config = config_to_dict(load_config(ROOT / "configs/cartpole.yaml"))
    config["run"]["reanalysers"] = reanalysers
    return PipelineSpec(
        config=config, run_dir=str(tmp_path),
        env=EnvDescription((4,), np.dtype(np.float32).str, 2), num_collectors=1,
        resume=False, transitions=[], batches=None, priorities=None, counters=None,
        selfplay_weights=[], target_weights=[], eval_weights=None, search_requests=[],
        search_results=[], reanalysis_jobs=[], reanalysis_results=[], prefix="",
        supervisor_pid=os.getpid())


def test_records_sent_when_the_run_stops_are_logged_not_dropped(tmp_path):
    # A Ray collector steps its environments before it sends the record, so a record that
    # waits for room when the run stops is collected data. Before, the hub dropped it.
    import asyncio

    from ezengine.config import load_config
    from ezengine.pipeline.layouts import transition_layout
    from ezengine.pipeline.ray_backend import Hub
    from ezengine.pipeline.spec import RING_SLOTS
    from ezengine.pipeline.transition_log import TransitionLog, log_path

    spec = tiny_spec(tmp_path)
    layout = transition_layout(load_config(ROOT / "configs/cartpole.yaml"), spec.env)
    room = RING_SLOTS["transitions"]

    def record(seq: int) -> dict:
        rec = {name: np.zeros(shape, dtype) for name, shape, dtype in layout}
        rec["env_steps"][...] = seq
        return rec

    async def stop_while_full() -> tuple[bool, bool]:
        (tmp_path / "replay").mkdir()
        hub = Hub(spec, {})
        hub.WAIT_S = 0.05
        for seq in range(room):
            assert await hub.put_record(0, seq, record(seq))
        waiting = asyncio.ensure_future(hub.put_record(0, room, record(room)))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the queue is full
        hub.counters["stop"] = 1
        await hub._notify()
        # Record room + 1 never arrives: the one after it gives up once stopped.
        return await waiting, await hub.put_record(0, room + 2, record(room + 2))

    logged_at_stop, orphan = asyncio.run(stop_while_full())
    assert logged_at_stop and not orphan
    logged = TransitionLog(log_path(tmp_path, 0), layout).read()
    assert [int(v[0]) for v in logged["env_steps"]] == list(range(room + 1))


def test_actors_take_the_drivers_reanalysis_placement_not_their_own_device(monkeypatch):
    # A run with --device cuda: its driver (the GPU node) puts reanalysis in the learner;
    # a helper or collector on a CPU-only node must route by that decision, not resolve
    # 'cuda' itself (before, it failed there: "torch sees no CUDA GPU here").
    from ezengine.config import load_config
    from ezengine.pipeline import learner_role
    from ezengine.pipeline.ray_backend import actor_config, direct_queues

    cfg = load_config(ROOT / "configs/cartpole.yaml", ["run.device=cuda",
                                                       "run.reanalysers=2"])
    with monkeypatch.context() as gpu_node:
        gpu_node.setattr(learner_role, "resolve_device", lambda name: torch.device("cuda"))
        config = actor_config(cfg)
    assert config["run"]["reanalyse_placement"] == "learner"
    spec = dataclasses.replace(tiny_spec(Path("/nonexistent")), config=config)
    queues = direct_queues(spec)  # on this CPU-only machine
    assert queues["priorities"][0] == "learner" and queues["results-1"][0] == "learner"
    assert actor_config(load_config(ROOT / "configs/cartpole.yaml", ["run.device=cpu"])
                        )["run"]["reanalyse_placement"] == "worker"


def test_a_publish_ends_the_waits_for_its_training_step(tmp_path):
    # The learner's own write of train_steps goes to the hub only every FLUSH_S; a reader
    # waiting for the step of a publish is answered by the publish itself.
    import asyncio

    from ezengine.pipeline.ray_backend import Hub

    async def exchange() -> tuple:
        (tmp_path / "replay").mkdir()
        hub = Hub(tiny_spec(tmp_path), {})
        waiting = asyncio.ensure_future(hub.wait_for_training(50, 5.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await hub.publish("selfplay", np.zeros(3, np.float32), 50)
        return await asyncio.wait_for(waiting, 1.0)

    done, trained, held = asyncio.run(exchange())
    assert (done, trained, held["selfplay"]) == (True, 50, [50])


def test_priorities_and_reanalysis_jobs_carry_what_their_taker_would_ask_the_hub(tmp_path):
    # The replay's owner builds a batch for a step it has the priorities of, and a
    # reanalyse helper searches with the target its job names: neither asks the hub
    # which weights those are (a call per training step each, before).
    from ezengine.pipeline.ray_backend import RayTransport

    class NoHub:
        def __getattr__(self, name: str):
            raise AssertionError(f"asked the hub: {name}")

    owner = RayTransport(NoHub(), tiny_spec(tmp_path, reanalysers=2))
    held = {"selfplay": [50, 100], "target": [0, 100]}
    owner.inbox.deliver("priorities", 0, (120, np.arange(4), np.ones(4), held))
    step, positions, priorities = owner.take_priorities(1.0)
    assert step == 120 and list(positions) == [0, 1, 2, 3] and list(priorities) == [1] * 4
    owner.wait_for_training(120)
    model = torch.nn.Linear(2, 2)
    assert owner.load("target", model, 120, loaded=100) == 100

    helper = RayTransport(NoHub(), tiny_spec(tmp_path, reanalysers=2))
    sent = []
    owner._put = lambda name, item: sent.append((name, item)) or True
    owner.put_reanalysis_job(1, 100, np.zeros((2, 4), np.float32))
    name, item = sent[0]
    helper.inbox.deliver(name, 0, item)
    target_step, obs = helper.take_reanalysis_job(1, 1.0)
    assert target_step == 100 and obs.shape == (2, 4)
    assert helper.load("target", model, target_step, loaded=100) == 100
