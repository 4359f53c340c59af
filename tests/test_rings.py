"""Shared-memory rings, counters and weights, exercised across real (spawned) processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ezengine.pipeline.weights import flatten_state, load_flat, publish_state
from ezengine.rings import (
    ALIGN,
    CountersSpec,
    Ring,
    RingClosed,
    RingSpec,
    RingTimeout,
    SharedCounters,
    SharedWeights,
    SlotLayout,
    WeightsSpec,
    unlink_orphaned_segments,
    unlink_segments,
)

SHM = Path("/dev/shm")
JOIN_TIMEOUT = 60.0  # generous: a training job may be loading this 2-core machine
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs Linux /dev/shm")

# Odd sizes so misaligned offsets or wrong strides would show.
LAYOUT = SlotLayout([
    ("counter", (), np.int64),
    ("data", (257,), np.float32),
    ("image", (3, 7, 5), np.uint8),
    ("checksum", (), np.float64),
])
N_RECORDS = 2000


def pattern(i: int) -> tuple[np.ndarray, np.ndarray]:
    data = ((np.arange(257, dtype=np.int64) * 31 + i * 7) % 1009).astype(np.float32)
    image = ((np.arange(105, dtype=np.int64) + i) % 251).astype(np.uint8).reshape(3, 7, 5)
    return data, image


def checksum(data: np.ndarray, image: np.ndarray) -> float:
    return float(data.sum(dtype=np.float64) + image.sum(dtype=np.float64))


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique prefix per test; teardown asserts the test leaked no segment."""
    p = f"ezt-{os.getpid()}-{uuid.uuid4().hex[:6]}-"
    yield p
    leaked = unlink_segments(p)
    assert not leaked, f"leaked shared-memory segments: {leaked}"


def entries(prefix: str) -> list[str]:
    return sorted(e for e in os.listdir(SHM) if e.startswith(prefix))


def spawn(target, *args) -> mp.process.BaseProcess:
    proc = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def join(proc: mp.process.BaseProcess) -> int | None:
    proc.join(JOIN_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join(JOIN_TIMEOUT)
        pytest.fail("child process did not finish in time")
    return proc.exitcode


# --------------------------------------------------------------- child processes

def produce(spec: RingSpec, n: int) -> None:
    ring = Ring.attach(spec)
    for i in range(n):
        data, image = pattern(i)
        with ring.write(timeout=JOIN_TIMEOUT) as slot:
            slot["counter"][...] = i
            slot["data"][...] = data
            slot["image"][...] = image
            slot["checksum"][...] = checksum(data, image)
    ring.close()
    ring.detach()


def write_then_hang(spec: RingSpec) -> None:
    ring = Ring.attach(spec)
    with ring.write(timeout=JOIN_TIMEOUT) as slot:
        slot["counter"][...] = 1
    with ring.write(timeout=JOIN_TIMEOUT) as slot:
        while True:  # killed in here, mid-write
            slot["data"][...] += 1.0


def publish_versions(weights_spec: WeightsSpec, counters_spec: CountersSpec) -> None:
    weights = SharedWeights.attach(weights_spec)
    counters = SharedCounters.attach(counters_spec)
    deadline = time.monotonic() + JOIN_TIMEOUT
    while counters["go"] == 0 and time.monotonic() < deadline:
        time.sleep(1e-3)
    flat = np.empty(weights.size, np.float32)
    for version in range(1, 51):
        flat.fill(version)
        weights.publish(flat, version)
        counters.add("published")
    counters["done"] = 1
    weights.detach()
    counters.detach()


# --------------------------------------------------------------- layout and pickling

def test_layout_aligns_fields_and_pickles() -> None:
    assert all(off % ALIGN == 0 for off in LAYOUT.offsets)
    assert LAYOUT.slot_nbytes % ALIGN == 0
    assert LAYOUT.offsets == (0, 64, 64 + 1088, 64 + 1088 + 128)
    assert pickle.loads(pickle.dumps(LAYOUT)) == LAYOUT
    assert LAYOUT["data"].shape == (257,)
    with pytest.raises(ValueError, match="unique"):
        SlotLayout([("a", (), np.int64), ("a", (2,), np.float32)])
    with pytest.raises(ValueError, match="objects"):
        SlotLayout([("a", (), object)])


def test_spec_pickles_but_ring_does_not(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 2, name="batches: reanalyse-0 -> learner")
    try:
        assert pickle.loads(pickle.dumps(ring.spec)) == ring.spec
        assert ring.spec.segment.startswith(prefix)
        assert entries(prefix) == [ring.spec.segment]
        with pytest.raises(TypeError, match="spec"):
            pickle.dumps(ring)
        wrong = RingSpec(ring.spec.segment, LAYOUT, 3, "wrong")
        with pytest.raises(ValueError, match="slots"):
            Ring.attach(wrong)
    finally:
        ring.unlink()
    assert entries(prefix) == []


# --------------------------------------------------------------- ring behaviour

def test_integrity_across_processes_with_backpressure(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 4, name="test: producer -> parent")
    proc = spawn(produce, ring.spec, N_RECORDS)
    try:
        # Let the producer fill the ring before consuming: it must stop at 4 (backpressure).
        deadline = time.monotonic() + JOIN_TIMEOUT
        while ring.fill() < 4 and time.monotonic() < deadline:
            time.sleep(1e-3)
        assert ring.fill() == 4
        time.sleep(0.05)
        assert ring.fill() == 4
        for i in range(N_RECORDS):
            assert 0 <= ring.fill() <= 4
            with ring.read(timeout=JOIN_TIMEOUT) as slot:
                assert int(slot["counter"]) == i
                data, image = pattern(i)
                np.testing.assert_array_equal(slot["data"], data)
                np.testing.assert_array_equal(slot["image"], image)
                assert float(slot["checksum"]) == checksum(slot["data"], slot["image"])
        # The producer closed after its last record.
        with pytest.raises(RingClosed), ring.read(timeout=JOIN_TIMEOUT):
            pass
        assert join(proc) == 0
    finally:
        if proc.is_alive():
            proc.kill()
        ring.unlink()


def test_full_ring_blocks_then_times_out_naming_ring(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 2, name="trajectories: collector-3 -> replay")
    try:
        for i in range(2):
            with ring.write(timeout=1.0) as slot:
                slot["counter"][...] = i
        start = time.monotonic()
        expected = r"collector-3 -> replay.*consumer is not reading"
        with pytest.raises(RingTimeout, match=expected), ring.write(timeout=0.2):
            pytest.fail("a full ring handed out a slot")
        assert time.monotonic() - start >= 0.2
        assert isinstance(RingTimeout("x"), TimeoutError)
        assert ring.fill() == 2
    finally:
        ring.unlink()


def test_empty_read_times_out_and_close_drains(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 4, name="priorities: learner -> replay")
    try:
        expected = r"learner -> replay.*producer is not writing"
        with pytest.raises(RingTimeout, match=expected), ring.read(timeout=0.1):
            pass
        with ring.try_read() as slot:
            assert slot is None
        for i in range(3):
            with ring.write() as slot:
                slot["counter"][...] = i
        ring.close()
        assert ring.closed
        with pytest.raises(RingClosed), ring.write():
            pass
        with ring.try_read() as slot:
            assert slot is not None and int(slot["counter"]) == 0
        for i in (1, 2):
            with ring.read(timeout=1.0) as slot:
                assert int(slot["counter"]) == i
        assert ring.fill() == 0
        with pytest.raises(RingClosed), ring.read(timeout=1.0):
            pass
        with pytest.raises(RingClosed), ring.try_read():
            pass
    finally:
        ring.unlink()


def test_failed_write_is_not_published(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 2)
    try:
        with pytest.raises(KeyError), ring.write() as slot:
            slot["counter"][...] = 99
            raise KeyError("producer failed mid-record")
        assert ring.fill() == 0
        with ring.write() as slot:
            with pytest.raises(TypeError, match="in place"):
                slot["counter"] = np.int64(5)  # rebinding would write nothing
            slot["counter"][...] = 7
        with ring.read() as slot:
            assert int(slot["counter"]) == 7
    finally:
        ring.unlink()


def test_reads_are_zero_copy_and_read_only(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 2)
    reader = Ring.attach(ring.spec)  # a second mapping, as a consumer process would have
    seen: list[np.ndarray] = []
    try:
        for i in range(3):  # records 0 and 2 land in slot 0
            with ring.write() as slot:
                slot["counter"][...] = i
                slot["data"][...] = i
            with reader.read() as slot:
                assert int(slot["counter"]) == i
                seen.append(slot["data"])
        assert np.shares_memory(seen[0], seen[2])  # same slot, same memory: nothing copied
        assert not np.shares_memory(seen[0], seen[1])
        assert seen[0][0] == 2.0  # the old view now shows the slot's new record
        assert not seen[0].flags.writeable
        with pytest.raises(ValueError):
            seen[0][0] = 1.0
        with pytest.raises(ValueError):  # its base is a read-only buffer
            seen[0].flags.writeable = True
        # Detaching and unlinking while views are alive neither fails nor invalidates them:
        # the mapping lives until the last view is collected.
        reader.detach()
        ring.unlink()
        assert seen[1][0] == 1.0
    finally:
        seen.clear()
        reader.detach()
        ring.unlink()


# --------------------------------------------------------------- lifetime

def test_unlink_is_idempotent_and_cleans_leftovers(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 2)
    counters = SharedCounters.create(prefix, ints=("env_steps",))
    assert len(entries(prefix)) == 2
    # A crash leaves segments behind; unlink_segments removes them by prefix.
    assert sorted(unlink_segments(prefix)) == entries_before(ring, counters)
    assert entries(prefix) == []
    ring.unlink()  # already gone: no error
    ring.unlink()
    counters.unlink()
    with pytest.raises(ValueError):
        unlink_segments("")


def test_orphaned_segments_of_dead_creators_are_removed_and_live_ones_kept(
        prefix: str) -> None:
    tag = f"ezo{uuid.uuid4().hex[:6]}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited: nothing of it is alive
    leftover = SHM / f"{tag}-{dead_pid}-batches-abc123"
    live = SHM / f"{tag}-{os.getpid()}-batches-def456"
    leftover.write_bytes(b"x" * 64)
    live.write_bytes(b"x" * 64)
    try:
        assert unlink_orphaned_segments(tag) == [leftover.name]
        assert not leftover.exists()
        assert live.exists()
    finally:
        leftover.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def entries_before(*blocks) -> list[str]:
    return sorted(b.segment for b in blocks)


def test_killed_child_leaves_segment_to_owner(prefix: str) -> None:
    ring = Ring.create(prefix, LAYOUT, 4, name="test: doomed -> parent")
    proc = spawn(write_then_hang, ring.spec)
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT
        while ring.fill() < 1 and time.monotonic() < deadline:
            time.sleep(1e-3)
        assert ring.fill() == 1
        time.sleep(0.05)  # let it get well into the second write
        os.kill(proc.pid, signal.SIGKILL)
        assert join(proc) == -signal.SIGKILL
        # Still there while the owner holds it, with only the finished record published.
        assert entries(prefix) == [ring.spec.segment]
        assert ring.fill() == 1
        with ring.read(timeout=1.0) as slot:
            assert int(slot["counter"]) == 1
    finally:
        if proc.is_alive():
            proc.kill()
        ring.unlink()
    assert entries(prefix) == []


def test_unrelated_attacher_does_not_unlink_on_exit(prefix: str, tmp_path: Path) -> None:
    """A process with its own resource tracker (not a multiprocessing child) attaches and
    exits: in Python 3.11 plain SharedMemory(name=...) would get the segment unlinked."""
    ring = Ring.create(prefix, LAYOUT, 2)
    try:
        spec_file = tmp_path / "spec.pkl"
        spec_file.write_bytes(pickle.dumps(ring.spec))
        code = textwrap.dedent(f"""
            import pickle
            from ezengine.rings import Ring
            ring = Ring.attach(pickle.loads(open({str(spec_file)!r}, "rb").read()))
            with ring.write(timeout=5) as slot:
                slot["counter"][...] = 42
            ring.detach()
        """)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=JOIN_TIMEOUT, check=False)
        assert res.returncode == 0, res.stderr
        assert "resource_tracker" not in res.stderr
        assert entries(prefix) == [ring.spec.segment]
        with ring.read(timeout=1.0) as slot:
            assert int(slot["counter"]) == 42
    finally:
        ring.unlink()
    assert entries(prefix) == []


# --------------------------------------------------------------- counters and weights

def test_counters_shared_between_mappings(prefix: str) -> None:
    owner = SharedCounters.create(prefix, ints=("env_steps", "stop"), floats=("loss",))
    child = SharedCounters.attach(pickle.loads(pickle.dumps(owner.spec)))
    try:
        child.add("env_steps", 5)
        child["loss"] = 0.25
        owner["stop"] = 1
        assert owner["env_steps"] == 5 and isinstance(owner["env_steps"], int)
        assert owner.snapshot() == {"env_steps": 5, "stop": 1, "loss": 0.25}
        assert child["stop"] == 1
        with pytest.raises(KeyError, match="nope"):
            owner["nope"]
    finally:
        child.detach()
        owner.unlink()


def test_shared_weights_are_never_torn(prefix: str) -> None:
    size = 1 << 21  # 8 MiB: a copy takes long enough for reads and writes to overlap
    weights = SharedWeights.create(prefix, size)
    counters = SharedCounters.create(prefix, ints=("go", "published", "done"))
    proc = spawn(publish_versions, weights.spec, counters.spec)
    try:
        out = np.empty(size, np.float32)
        versions = []
        counters["go"] = 1
        deadline = time.monotonic() + JOIN_TIMEOUT
        while time.monotonic() < deadline:
            done = counters["done"]
            version = weights.read_into(out, timeout=JOIN_TIMEOUT)
            # Every element equals the returned version: the copy is one publish, whole.
            assert out.min() == out.max() == version, (version, out.min(), out.max())
            versions.append(version)
            if done and version == 50:
                break
        assert versions[-1] == 50
        assert versions == sorted(versions)
        assert counters["published"] == 50
        assert weights.version == 50
        assert join(proc) == 0
    finally:
        if proc.is_alive():
            proc.kill()
        weights.unlink()
        counters.unlink()


def test_flatten_and_load_round_trip() -> None:
    import torch

    torch.manual_seed(0)

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                                   torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(12, 2))

    src, dst = make(), make()
    src.train()
    for _ in range(3):  # moves running stats and num_batches_tracked away from defaults
        src(torch.randn(4, 2, 4, 4))
    flat = flatten_state(src.state_dict())
    assert flat.dtype == np.float32
    assert flat.size == sum(t.numel() for t in src.state_dict().values())
    params_before = [p.data_ptr() for p in dst.parameters()]
    load_flat(dst, flat)
    assert [p.data_ptr() for p in dst.parameters()] == params_before  # loaded in place
    for (key, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert a.dtype == b.dtype, key
        assert torch.equal(a, b), key
    assert int(dst[1].num_batches_tracked) == 3
    x = torch.randn(2, 2, 4, 4)
    src.eval()
    dst.eval()
    assert torch.equal(src(x), dst(x))
    with pytest.raises(ValueError, match="state values"):
        load_flat(dst, flat[:-1])


def test_publish_state_round_trip(prefix: str) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(5, 3))
    flat = flatten_state(model.state_dict())
    weights = SharedWeights.create(prefix, flat.size)
    try:
        publish_state(weights, model.state_dict(), version=7)
        version, read = weights.read()
        assert version == 7
        np.testing.assert_array_equal(read, flat)
    finally:
        weights.unlink()
