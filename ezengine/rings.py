"""Shared-memory rings, counters and weights: how pipeline processes exchange data.

(One module of about 800 lines on purpose: the three block types share the segment
lifecycle and the memory-ordering argument below, which hold only together.)

Every block lives in one POSIX shared-memory segment whose name starts with a run prefix
(``run_prefix()`` gives ``ez-<pid>-``), so a run's segments are identifiable in /dev/shm and
``unlink_segments(prefix)`` can remove leftovers after a crash.

Lifetime: the supervisor *creates* every block (it is the owner and the only process that
unlinks); children *attach* from a small picklable spec (``block.spec``) and ``detach()``
when done. Python < 3.13 registers even an attached segment with the resource tracker,
which then unlinks it (with a "leaked shared_memory" warning) when that tracker shuts
down, i.e. when an unrelated attaching process exits, or, for multiprocessing children
that share the parent's tracker, it lets a child's unregister drop the owner's own crash
registration. Attaching therefore never registers (see ``_attach_segment``); only the
owner's segment is tracked, so the tracker still cleans up if the supervisor itself dies.

- ``Ring``: single-producer single-consumer ring of fixed-layout slots (``SlotLayout``).
  The producer writes numpy views in place, the consumer reads read-only views of the same
  memory (no copy, no pickling); a full ring blocks its producer (backpressure).
- ``SharedCounters``: named int64/float64 scalars (env steps, train steps, stop flag...).
- ``SharedWeights``: a versioned flat float32 parameter vector behind a seqlock
  (``ezengine.pipeline.weights`` moves a torch state_dict in and out of it).

Memory ordering: counters and flags are aligned 8-byte words read and written through numpy
views; each such access is a single load/store. A producer writes slot data before it bumps
the write counter and a consumer reads the counter before the data. On x86 (TSO: stores are
not reordered with stores, loads not with loads) that makes publication safe without
fences; the calls in between are opaque C calls, so the compiler cannot reorder across them
either. Weakly ordered CPUs (ARM) would need explicit barriers.
"""

from __future__ import annotations

import _posixshmem  # the C module behind SharedMemory: shm_unlink without a mapping
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any, NoReturn

import numpy as np

__all__ = [
    "SLEEP_MIN",
    "CountersSpec",
    "Field",
    "Ring",
    "RingClosed",
    "RingSpec",
    "RingTimeout",
    "SharedCounters",
    "SharedWeights",
    "SlotLayout",
    "SlotViews",
    "WeightsSpec",
    "backoff",
    "run_prefix",
    "unlink_orphaned_segments",
    "unlink_segments",
]

ALIGN = 64  # cache line: fields start on their own line, and slots never share one
DEFAULT_TIMEOUT = 60.0  # seconds a blocked call waits before naming the stuck side
SLEEP_MIN = 50e-6  # first poll interval: short so a busy pipeline sees little latency
_SLEEP_MAX = 2e-3  # back-off cap: an idle waiter costs ~nothing on a 2-core machine
_SHM_DIR = "/dev/shm"  # where Linux (glibc) keeps POSIX shared-memory segments


class RingTimeout(TimeoutError):
    """A blocked ring (or weights) operation waited longer than its timeout."""


class RingClosed(Exception):
    """The ring was closed: a producer may not write, and a drained consumer gets no more."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def backoff(sleep: float, cap: float = _SLEEP_MAX) -> float:
    """Sleep `sleep` seconds; the next, doubled, poll interval (at most `cap`, 2 ms unless
    the caller can wait longer)."""
    time.sleep(sleep)
    return min(sleep * 2.0, cap)


# --------------------------------------------------------------------------- segments

def run_prefix(tag: str = "ez") -> str:
    """Segment-name prefix for this process's run: ``"<tag>-<pid>-"``.

    The trailing dash keeps the prefix of pid 12 from matching pid 123's segments.
    """
    return f"{tag}-{os.getpid()}-"


def _check_prefix(prefix: str) -> None:
    # An empty prefix would make unlink_segments remove every segment on the machine.
    if not prefix or "/" in prefix or not re.fullmatch(r"[A-Za-z0-9._\-]+", prefix):
        raise ValueError(
            f"shared-memory prefix must be non-empty and use only letters, digits, '.', '_' "
            f"and '-', got {prefix!r}")


def _segment_name(prefix: str, label: str) -> str:
    _check_prefix(prefix)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:32] or "seg"
    # The random suffix keeps two blocks with the same label apart.
    return f"{prefix}{slug}-{secrets.token_hex(3)}"


def _create_segment(prefix: str, label: str, nbytes: int) -> shared_memory.SharedMemory:
    """Create and zero-fill a new segment (registered with the resource tracker)."""
    while True:
        try:
            shm = shared_memory.SharedMemory(
                name=_segment_name(prefix, label), create=True, size=max(nbytes, 1))
            break
        except FileExistsError:  # random suffix collided; draw another
            continue
    # /dev/shm pages are already zero, but zero the header explicitly: correctness of the
    # counters must not rest on an OS detail.
    shm.buf[:min(nbytes, ALIGN * 4)] = bytes(min(nbytes, ALIGN * 4))
    return shm


_attach_lock = threading.Lock()


def _attach_segment(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with the resource tracker.

    Python 3.13 has ``track=False``. Before that, ``SharedMemory(name=...)`` always
    registers; unregistering afterwards is not enough, because multiprocessing children
    share their parent's tracker, whose registry is a set: the child's unregister would
    erase the owner's registration. So the register call is suppressed while attaching.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    with _attach_lock:
        register = resource_tracker.register

        def _skip_shm(res_name: str, rtype: str) -> None:
            if rtype != "shared_memory":
                register(res_name, rtype)

        resource_tracker.register = _skip_shm
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def unlink_segments(prefix: str) -> list[str]:
    """Remove every leftover ``/dev/shm/<prefix>*`` segment; return the names removed.

    For cleanup after a crash (Linux only; elsewhere returns ``[]``). Do not call it on a
    prefix whose blocks are still in use by a live owner: their owner's ``unlink`` then
    finds them gone (harmless), but readers lose nothing already mapped.
    """
    _check_prefix(prefix)
    try:
        entries = os.listdir(_SHM_DIR)
    except FileNotFoundError:
        return []
    removed = []
    for entry in sorted(entries):
        if entry.startswith(prefix):
            try:
                os.unlink(os.path.join(_SHM_DIR, entry))  # what shm_unlink does on Linux
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def unlink_orphaned_segments(tag: str = "ez") -> list[str]:
    """Remove ``/dev/shm/<tag>-<pid>-*`` segments whose creating process (``pid``) no
    longer exists; return the names removed.

    Such leftovers only appear when a whole run was killed at once (``kill -9`` of the
    process group, the OOM killer), so that no process of it could clean up.
    """
    _check_prefix(f"{tag}-")
    try:
        entries = os.listdir(_SHM_DIR)
    except FileNotFoundError:
        return []
    pattern = re.compile(rf"{re.escape(tag)}-(\d+)-")
    dead = {int(m.group(1)) for m in map(pattern.match, entries)
            if m and not _process_exists(int(m.group(1)))}
    return [name for pid in sorted(dead) for name in unlink_segments(f"{tag}-{pid}-")]


class _SharedBlock:
    """One shared-memory segment with owner/attacher lifetime rules."""

    _shm: shared_memory.SharedMemory | None
    _owner: bool
    _unlinked: bool

    def _init_block(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self._owner = owner
        self._unlinked = False

    @property
    def segment(self) -> str:
        """The segment's name in /dev/shm (without the leading slash)."""
        return self._segment_name

    def _drop_views(self) -> None:
        """Forget every numpy view into the mapping (subclasses)."""

    def detach(self) -> None:
        """Close this process's mapping. Idempotent; the block is unusable afterwards.

        Views handed out earlier may still be referenced (a ``with ... as slot`` name stays
        bound after its block). Those keep the memory mapped, and valid, until they are
        garbage-collected; nothing is left for the caller to release.
        """
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._drop_views()
        try:
            shm.close()
        except BufferError:
            # Live views export the mapping, so it cannot be unmapped now. Let go of it:
            # the views own the last references and the mmap unmaps itself when they die.
            # Clearing these also stops SharedMemory.__del__ from retrying (and warning).
            shm._buf = None  # type: ignore[attr-defined]
            shm._mmap = None  # type: ignore[attr-defined]
            shm.close()  # now only closes the file descriptor

    def unlink(self) -> None:
        """Owner only: remove the segment's name, then detach. Idempotent; never raises
        if the segment is already gone (e.g. removed by ``unlink_segments``).

        Processes that still have it mapped keep working; the memory is freed when the
        last mapping closes.
        """
        if not self._owner:
            raise RuntimeError(f"{self!r}: only the owner (the creating process) unlinks")
        if not self._unlinked:
            self._unlinked = True
            with suppress(FileNotFoundError):
                _posixshmem.shm_unlink(self._tracked_name)
            # Unregister even if it was already gone, so the tracker does not warn about
            # (or try to unlink) a segment it believes leaked.
            resource_tracker.unregister(self._tracked_name, "shared_memory")
        self.detach()

    @property
    def _tracked_name(self) -> str:
        # The tracker knows the segment by its POSIX name, with a leading slash.
        return "/" + self._segment_name

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} objects are not picklable: pass `.spec` to the child "
            f"process and call {type(self).__name__}.attach(spec) there")


# --------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class Field:
    """One named array in a slot: ``shape`` and ``dtype`` are fixed for every record."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


FieldLike = Field | tuple[str, Sequence[int] | int, Any]


@dataclass(frozen=True, init=False)
class SlotLayout:
    """The record type of a ring: a sequence of ``(name, shape, dtype)`` fields.

    Each field starts at a 64-byte-aligned offset in the slot; ``slot_nbytes`` is a
    multiple of 64 so slots never share a cache line. Picklable (sent to children).

    Example: ``SlotLayout([("obs", (4, 96, 96), np.uint8), ("reward", (), np.float32)])``.
    """

    fields: tuple[Field, ...]
    offsets: tuple[int, ...]
    slot_nbytes: int

    def __init__(self, fields: Iterable[FieldLike]) -> None:
        parsed: list[Field] = []
        for item in fields:
            if isinstance(item, Field):
                parsed.append(item)
                continue
            name, shape, dtype = item
            shape_t = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
            parsed.append(Field(str(name), shape_t, np.dtype(dtype)))
        names = [f.name for f in parsed]
        if not parsed:
            raise ValueError("a slot layout needs at least one field")
        if len(set(names)) != len(names):
            raise ValueError(f"slot layout field names must be unique, got {names}")
        offsets, pos = [], 0
        for f in parsed:
            if not f.name:
                raise ValueError("slot layout field names must be non-empty")
            if any(s < 0 for s in f.shape):
                raise ValueError(f"field {f.name!r}: negative dimension in shape {f.shape}")
            if f.dtype.hasobject:
                raise ValueError(f"field {f.name!r}: dtype {f.dtype} holds Python objects, "
                                 "which cannot live in shared memory")
            offsets.append(pos)
            pos = _align(pos + f.nbytes)
        object.__setattr__(self, "fields", tuple(parsed))
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "slot_nbytes", max(pos, ALIGN))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in slot layout {self.names}")

    def views(self, buf: memoryview, offset: int) -> SlotViews:
        """Numpy views of every field of the slot starting at byte ``offset`` of ``buf``
        (read-only iff ``buf`` is)."""
        # frombuffer keeps ``buf`` itself as the base (np.ndarray(buffer=...) would reach
        # through to the writable mmap), so a read-only view cannot be made writable again.
        return SlotViews({
            f.name: np.frombuffer(buf, f.dtype, count=int(np.prod(f.shape, dtype=np.int64)),
                                  offset=offset + off).reshape(f.shape)
            for f, off in zip(self.fields, self.offsets, strict=True)})


class SlotViews(dict):
    """``{name: ndarray}`` views into one slot. The arrays are the slot's memory, so write
    *into* them (``slot["obs"][...] = obs``); rebinding a key would silently write nothing,
    hence item assignment raises."""

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("slot views are fixed: write in place, e.g. slot['obs'][...] = value")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]


# --------------------------------------------------------------------------- ring

@dataclass(frozen=True)
class RingSpec:
    """What a child needs to attach to a ring (picklable)."""

    segment: str
    layout: SlotLayout
    num_slots: int
    name: str  # human-readable, e.g. "batches: reanalyse-0 -> learner"


# Header: uint64 words. The producer's and the consumer's counters sit on separate cache
# lines so the two sides do not bounce one line between cores on every operation.
_W = 0  # write counter: slots published so far (producer writes it)
_R = 8  # read counter: slots released so far (consumer writes it)
_CLOSED = 16  # nonzero once closed
_NUM_SLOTS, _SLOT_NBYTES = 17, 18  # geometry, checked on attach against the spec
_HEADER_NBYTES = 3 * ALIGN


class Ring(_SharedBlock):
    """Single-producer single-consumer ring of fixed-layout slots in shared memory.

    Owner (supervisor): ``ring = Ring.create(prefix, layout, num_slots, name=...)``, pass
    ``ring.spec`` to children, ``ring.unlink()`` at the end. Children:
    ``ring = Ring.attach(spec)`` ... ``ring.detach()``.

    Producer::

        with ring.write(timeout=30) as slot:   # blocks while full; RingTimeout names ring
            slot["obs"][...] = obs             # write in place
        # published here, unless the block raised (then the slot stays free)

    Consumer::

        with ring.read(timeout=30) as slot:    # blocks while empty
            learn(slot["obs"])                 # read-only views, valid inside the block
        # released here (also if the block raised)

    ``try_read()`` is the non-blocking variant: it yields ``None`` when the ring is empty.
    ``close()`` tells the consumer no more data will come: reads drain what is published,
    then raise ``RingClosed``; writes raise ``RingClosed`` at once (a supervisor may close a
    ring to unblock its producer at shutdown).
    """

    def __init__(self, spec: RingSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec = spec
        self.name = spec.name
        self.layout = spec.layout
        self.num_slots = spec.num_slots
        self._segment_name = spec.segment
        self._init_block(shm, owner)
        self._hdr = np.ndarray((_HEADER_NBYTES // 8,), np.uint64, buffer=shm.buf)
        # Views are built once: a ring is used millions of times, views are cheap to keep.
        self._ro_buf = shm.buf.toreadonly()
        starts = [_HEADER_NBYTES + i * self.layout.slot_nbytes for i in range(self.num_slots)]
        self._write_views = [self.layout.views(shm.buf, s) for s in starts]
        self._read_views = [self.layout.views(self._ro_buf, s) for s in starts]
        self._writing = self._reading = False
        self.blocked_reads = 0  # this process's reads that found it empty

    @classmethod
    def create(cls, name_prefix: str, layout: SlotLayout, num_slots: int, *,
               name: str | None = None) -> Ring:
        """Create a ring (this process becomes its owner).

        Args:
            name_prefix: segment-name prefix of the run, e.g. ``run_prefix()``.
            layout: the record type.
            num_slots: capacity in records (>= 1).
            name: human-readable ring name for messages; defaults to the segment name.
        """
        if num_slots < 1:
            raise ValueError(f"a ring needs at least one slot, got num_slots={num_slots}")
        label = name or "ring"
        shm = _create_segment(name_prefix, label, _HEADER_NBYTES + num_slots * layout.slot_nbytes)
        spec = RingSpec(shm.name, layout, int(num_slots), name or shm.name)
        ring = cls(spec, shm, owner=True)
        ring._hdr[_NUM_SLOTS] = num_slots
        ring._hdr[_SLOT_NBYTES] = layout.slot_nbytes
        return ring

    @classmethod
    def attach(cls, spec: RingSpec) -> Ring:
        """Attach to a ring created by another process (or this one) from its ``spec``."""
        shm = _attach_segment(spec.segment)
        hdr = np.ndarray((_HEADER_NBYTES // 8,), np.uint64, buffer=shm.buf)
        geometry = (int(hdr[_NUM_SLOTS]), int(hdr[_SLOT_NBYTES]))
        del hdr
        if geometry != (spec.num_slots, spec.layout.slot_nbytes):
            shm.close()
            raise ValueError(
                f"ring {spec.name!r}: segment {spec.segment} holds {geometry[0]} slots of "
                f"{geometry[1]} bytes, the spec says {spec.num_slots} of "
                f"{spec.layout.slot_nbytes}")
        return cls(spec, shm, owner=False)

    def _drop_views(self) -> None:
        self._write_views = []
        self._read_views = []
        self._hdr = None  # type: ignore[assignment]
        with suppress(BufferError):  # read views still alive: they hold it until they die
            self._ro_buf.release()
        self._ro_buf = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ring({self.name!r}, segment={self._segment_name!r}, slots={self.num_slots})"

    # -- state ---------------------------------------------------------------------------

    def fill(self) -> int:
        """Published, unread slots (0..num_slots)."""
        return int(self._hdr[_W]) - int(self._hdr[_R])

    @property
    def closed(self) -> bool:
        return bool(self._hdr[_CLOSED])

    def close(self) -> None:
        """Mark the ring closed: no more writes; readers drain, then get ``RingClosed``."""
        self._hdr[_CLOSED] = 1

    # -- producer ------------------------------------------------------------------------

    def _closed_error(self) -> RingClosed:
        return RingClosed(f"ring {self.name!r} is closed")

    def _acquire_write(self, timeout: float | None) -> int:
        hdr = self._hdr
        w = int(hdr[_W])  # only this process writes it
        if not hdr[_CLOSED] and w - int(hdr[_R]) < self.num_slots:
            return w
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = SLEEP_MIN
        while True:
            if hdr[_CLOSED]:
                raise self._closed_error()
            if w - int(hdr[_R]) < self.num_slots:
                return w
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout(
                    f"ring {self.name!r} (segment {self._segment_name}) has been full "
                    f"({self.num_slots}/{self.num_slots} slots) for {timeout:g} s: its "
                    "consumer is not reading")
            sleep = backoff(sleep)

    @contextmanager
    def write(self, timeout: float | None = DEFAULT_TIMEOUT) -> Iterator[SlotViews]:
        """Yield writable views of the next free slot; publish it on a clean exit.

        Blocks while the ring is full; raises ``RingTimeout`` after ``timeout`` seconds
        (``None``: wait forever) and ``RingClosed`` if the ring is or becomes closed.
        """
        if self._writing:
            raise RuntimeError(f"ring {self.name!r}: write() is not re-entrant")
        w = self._acquire_write(timeout)
        self._writing = True
        try:
            yield self._write_views[w % self.num_slots]
            # Data first, counter last: the consumer never sees a half-written slot.
            self._hdr[_W] = w + 1
        finally:
            self._writing = False

    # -- consumer ------------------------------------------------------------------------

    def _poll_read(self) -> int | None:
        """Index of the oldest published slot, None if empty; RingClosed if drained."""
        hdr = self._hdr
        r = int(hdr[_R])  # only this process writes it
        if int(hdr[_W]) > r:
            return r
        # The producer publishes before it closes, so re-reading the write counter after
        # seeing the flag cannot miss a last record.
        if hdr[_CLOSED] and int(hdr[_W]) == r:
            raise self._closed_error()
        return None

    def _acquire_read(self, timeout: float | None) -> int:
        r = self._poll_read()
        if r is not None:
            return r
        self.blocked_reads += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = SLEEP_MIN
        while True:
            sleep = backoff(sleep)
            r = self._poll_read()
            if r is not None:
                return r
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout(
                    f"ring {self.name!r} (segment {self._segment_name}) has been empty for "
                    f"{timeout:g} s: its producer is not writing")

    @contextmanager
    def _reading_slot(self, r: int) -> Iterator[SlotViews]:
        if self._reading:
            raise RuntimeError(f"ring {self.name!r}: read() is not re-entrant")
        self._reading = True
        try:
            yield self._read_views[r % self.num_slots]
        finally:
            # Released even if the block raised: re-reading a record that broke the
            # consumer would only break it again.
            self._hdr[_R] = r + 1
            self._reading = False

    @contextmanager
    def read(self, timeout: float | None = DEFAULT_TIMEOUT) -> Iterator[SlotViews]:
        """Yield read-only views of the oldest published slot; release it on exit.

        The views alias the slot: copy what must outlive the ``with`` block. Blocks while
        empty; ``RingTimeout`` after ``timeout`` seconds (``None``: forever);
        ``RingClosed`` once the ring is closed and drained.
        """
        with self._reading_slot(self._acquire_read(timeout)) as slot:
            yield slot

    @contextmanager
    def try_read(self) -> Iterator[SlotViews | None]:
        """Like ``read`` but never blocks: yields ``None`` when the ring is empty (nothing
        is released then). Raises ``RingClosed`` once closed and drained."""
        r = self._poll_read()
        if r is None:
            yield None
            return
        with self._reading_slot(r) as slot:
            yield slot


# --------------------------------------------------------------------------- counters

@dataclass(frozen=True)
class CountersSpec:
    """What a child needs to attach to a ``SharedCounters`` block (picklable)."""

    segment: str
    ints: tuple[str, ...]
    floats: tuple[str, ...]


class SharedCounters(_SharedBlock):
    """Named int64 and float64 scalars in shared memory, all starting at 0.

    ``c["env_steps"]`` reads a Python int/float, ``c["env_steps"] = n`` writes, and
    ``c.add("env_steps", n)`` increments. Each 8-byte value is read and written whole, but
    ``add`` is read-modify-write: give every name a single writing process.
    """

    def __init__(self, spec: CountersSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec = spec
        self._segment_name = spec.segment
        self._init_block(shm, owner)
        ni = len(spec.ints)
        self._ints = np.ndarray((ni,), np.int64, buffer=shm.buf)
        self._floats = np.ndarray((len(spec.floats),), np.float64, buffer=shm.buf, offset=8 * ni)
        self._index: dict[str, tuple[np.ndarray, int]] = {
            **{n: (self._ints, i) for i, n in enumerate(spec.ints)},
            **{n: (self._floats, i) for i, n in enumerate(spec.floats)}}

    @classmethod
    def create(cls, name_prefix: str, *, ints: Sequence[str] = (), floats: Sequence[str] = (),
               name: str = "counters") -> SharedCounters:
        """Create the block (this process owns it). ``ints``/``floats``: scalar names."""
        names = [*ints, *floats]
        if len(set(names)) != len(names):
            raise ValueError(f"counter names must be unique, got {names}")
        shm = _create_segment(name_prefix, name, 8 * len(names))
        return cls(CountersSpec(shm.name, tuple(ints), tuple(floats)), shm, owner=True)

    @classmethod
    def attach(cls, spec: CountersSpec) -> SharedCounters:
        return cls(spec, _attach_segment(spec.segment), owner=False)

    def _drop_views(self) -> None:
        self._index = {}
        self._ints = self._floats = None  # type: ignore[assignment]

    def _slot(self, name: str) -> tuple[np.ndarray, int]:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no shared counter {name!r}; have {sorted(self._index)}") from None

    def __getitem__(self, name: str) -> int | float:
        arr, i = self._slot(name)
        return arr[i].item()

    def __setitem__(self, name: str, value: float) -> None:
        arr, i = self._slot(name)
        arr[i] = value

    def add(self, name: str, delta: float = 1) -> int | float:
        """Increment ``name`` by ``delta`` and return the new value (single writer only)."""
        arr, i = self._slot(name)
        arr[i] += delta
        return arr[i].item()

    def snapshot(self) -> dict[str, int | float]:
        """All values, e.g. for a progress line."""
        return {n: arr[i].item() for n, (arr, i) in self._index.items()}

    def __repr__(self) -> str:
        return f"SharedCounters(segment={self._segment_name!r})"


# --------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class WeightsSpec:
    """What a child needs to attach to a ``SharedWeights`` block (picklable)."""

    segment: str
    size: int


_SEQ, _VERSION, _SIZE = 0, 1, 2  # header words: seqlock counter, model version, size
_WEIGHTS_HEADER = ALIGN


class SharedWeights(_SharedBlock):
    """A flat float32 parameter vector [size] with a version, one writer, many readers.

    Seqlock: the writer makes the sequence word odd, writes data and version, makes it
    even again; a reader copies the data between two reads of the sequence word and
    retries unless both were the same even value, so it never returns a torn vector.
    Version 0 means nothing was published yet (the data are zeros).
    """

    def __init__(self, spec: WeightsSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec = spec
        self.size = spec.size
        self._segment_name = spec.segment
        self._init_block(shm, owner)
        self._hdr = np.ndarray((3,), np.uint64, buffer=shm.buf)
        self._data = np.ndarray((spec.size,), np.float32, buffer=shm.buf, offset=_WEIGHTS_HEADER)

    @classmethod
    def create(cls, name_prefix: str, size: int, *, name: str = "weights") -> SharedWeights:
        """Create the block for ``size`` float32 values (this process owns it)."""
        if size < 1:
            raise ValueError(f"weights size must be >= 1, got {size}")
        shm = _create_segment(name_prefix, name, _WEIGHTS_HEADER + 4 * size)
        weights = cls(WeightsSpec(shm.name, int(size)), shm, owner=True)
        weights._hdr[_SIZE] = size
        return weights

    @classmethod
    def attach(cls, spec: WeightsSpec) -> SharedWeights:
        shm = _attach_segment(spec.segment)
        size = int(np.ndarray((3,), np.uint64, buffer=shm.buf)[_SIZE])
        if size != spec.size:
            shm.close()
            raise ValueError(f"weights segment {spec.segment} holds {size} values, "
                             f"the spec says {spec.size}")
        return cls(spec, shm, owner=False)

    def _drop_views(self) -> None:
        self._hdr = self._data = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SharedWeights(segment={self._segment_name!r}, size={self.size})"

    @property
    def version(self) -> int:
        """The last published version (a cheap peek to decide whether to read)."""
        return int(self._hdr[_VERSION])

    @contextmanager
    def publishing(self, version: int) -> Iterator[np.ndarray]:
        """Write the data array in place inside the block; it is published as `version`
        when the block ends (readers never see it half-written)."""
        if version < 0:
            raise ValueError(f"weights version must be >= 0, got {version}")
        seq = int(self._hdr[_SEQ])
        if seq & 1:
            raise RuntimeError(f"{self!r}: a publish is already in progress (one writer only)")
        self._hdr[_SEQ] = seq + 1  # odd: readers that overlap will retry
        try:
            yield self._data
            self._hdr[_VERSION] = version
        finally:
            # Even again (also on error: the data may be mixed then, but the version is the
            # old one and the next publish overwrites everything).
            self._hdr[_SEQ] = seq + 2

    def publish(self, flat: np.ndarray, version: int) -> None:
        """Write ``flat`` (float32-castable [size]) as ``version``."""
        flat = np.asarray(flat)
        if flat.shape != (self.size,):
            raise ValueError(f"{self!r}: expected a flat vector of shape ({self.size},), "
                             f"got {flat.shape}")
        with self.publishing(version) as data:
            np.copyto(data, flat, casting="same_kind")

    def read_into(self, out: np.ndarray, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Copy a consistent snapshot into ``out`` (float32 [size]); return its version.

        Raises ``RingTimeout`` if no consistent copy succeeded within ``timeout`` seconds
        (the writer died mid-publish or publishes back to back faster than a copy).
        """
        if out.shape != (self.size,) or out.dtype != np.float32:
            raise ValueError(f"{self!r}: out must be float32 of shape ({self.size},), "
                             f"got {out.dtype} {out.shape}")
        hdr, deadline, sleep = self._hdr, None, SLEEP_MIN
        while True:
            seq = int(hdr[_SEQ])
            if not seq & 1:
                np.copyto(out, self._data)
                version = int(hdr[_VERSION])
                if int(hdr[_SEQ]) == seq:
                    return version
            now = time.monotonic()
            if deadline is None:
                deadline = now + (float("inf") if timeout is None else timeout)
            elif now >= deadline:
                raise RingTimeout(f"{self!r}: no consistent read in {timeout:g} s; the writer "
                                  "is stuck mid-publish or publishing continuously")
            sleep = backoff(sleep)

    def read(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, np.ndarray]:
        """Return ``(version, a new float32 [size] copy)``."""
        out = np.empty(self.size, np.float32)
        return self.read_into(out, timeout=timeout), out
