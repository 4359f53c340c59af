"""Run directories: claimed by one process at a time, never overwritten, never half-made.

A run directory is everything one training run owns (config.yaml, checkpoints/, replay/,
metrics.jsonl, eval.jsonl, tb/). :func:`claim_run_dir` is the only way a trainer gets one:

- a new run refuses a directory that already holds a run (``--resume`` continues it);
- a resumed run needs one that does;
- an exclusive lock (``flock`` on ``.lock``, released by the kernel when the process ends,
  however it ends) makes a second process on the same directory refuse at once;
- a resume checks the stored checkpoint against the config before anything runs;
- a start-up error removes what the claim created, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ezengine.atomic import remove_leftover_temporaries
from ezengine.checkpoint import load_checkpoint
from ezengine.config import Config, config_to_dict

LOCK_FILE = ".lock"

# What makes a directory a run: any of these, written by a trainer.
RUN_MARKERS = ("config.yaml", "checkpoints", "replay", "metrics.jsonl", "eval.jsonl")


class RunDirError(Exception):
    """A run directory cannot be used as asked; the message says why and what to do."""


def holds_run(path: Path) -> bool:
    """Whether `path` holds (part of) a training run."""
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def _lock(path: Path) -> int:
    """Exclusive, non-blocking lock on path/.lock; the fd stays open for the process."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"cannot lock run directory {path}: {exc.strerror}; is it "
                          "writable?") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"{path} is in use by another ezengine process (pid {holder}); wait for it to "
            f"end or stop it, or train into another --run-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def has_progress(path: Path) -> bool:
    """Whether the run in `path` has got anywhere: a checkpoint, a replay record or a
    metrics row."""
    if (path / "checkpoints" / "latest.pt").exists():
        return True
    written = [*(path / "replay").glob("*.bin"), path / "metrics.jsonl"]
    return any(f.is_file() and f.stat().st_size > 0 for f in written)


@dataclass
class Claim:
    """A claimed run directory; set `failed` when the run ends in failure without raising."""

    path: Path
    failed: bool = False


@contextlib.contextmanager
def claim_run_dir(path: str | Path, *, resume: bool) -> Iterator[Claim]:
    """Hold `path` for one training run for the duration of the ``with`` block.

    RunDirError, with nothing created or changed, when a new run would go into a directory
    that holds a run, a resume names one that does not, or another process holds it. When
    the block raises or marks the claim failed before a new run has any progress (see
    `has_progress`), what the claim made is removed again.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory; choose another --run-dir")
    if resume and not holds_run(path):
        raise RunDirError(f"{path} is not a run directory (no config.yaml); give the "
                          f"directory a `ezengine train` run wrote")
    if not resume and holds_run(path):
        raise RunDirError(
            f"{path} already holds a run; continue it with `ezengine train --resume {path}` "
            f"or give a new --run-dir")
    created = not path.exists()
    existing = set() if created else {p.name for p in path.iterdir()}
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {path}: {exc.strerror}") from None
    try:
        fd = _lock(path)
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    claim = Claim(path)
    try:
        yield claim
    except BaseException:
        claim.failed = True
        raise
    finally:
        if claim.failed and not resume and not has_progress(path):
            _undo_start(path, created, existing)
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a waiter)


def _undo_start(path: Path, created: bool, existing: set[str]) -> None:
    """Remove what a failed start made: the directory if the claim created it, else only
    the entries that were not there before (a user's own files are never touched)."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.name not in existing and child.name != LOCK_FILE:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


# Sections a resume may change: budgets, intervals, device. Everything else shapes the
# network, the stored data or the targets the checkpoint was trained on.
RESUMABLE_SECTIONS = ("run",)


def checkpoint_mismatch(stored: Mapping[str, Mapping[str, Any]],
                        current: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """'section.key: checkpoint X, config Y' for every field outside RESUMABLE_SECTIONS
    where the config a run resumes with differs from the one its checkpoint stored."""
    out = []
    for section, fields in current.items():
        if section in RESUMABLE_SECTIONS:
            continue
        old = stored.get(section, {})
        for key, value in fields.items():
            if key in old and old[key] != value:
                out.append(f"{section}.{key}: checkpoint {old[key]!r}, config {value!r}")
    return out


def resume_point(run_dir: Path, cfg: Config) -> int:
    """Training steps of the run's latest checkpoint (0 when it has none yet), after
    checking that it loads and that `cfg` still describes it. RunDirError otherwise."""
    ckpt = run_dir / "checkpoints" / "latest.pt"
    remove_leftover_temporaries(ckpt)
    if not ckpt.exists():
        return 0
    try:
        state = load_checkpoint(ckpt)
        stored, steps = state["config"], int(state["learner"]["steps"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(str(exc) if isinstance(exc, ValueError) else
                          f"{ckpt} is not an ezengine trainer checkpoint") from None
    diff = checkpoint_mismatch(stored, config_to_dict(cfg))
    if diff:
        raise RunDirError(
            f"{run_dir}: the config no longer matches the checkpoint ({'; '.join(diff[:3])}"
            f"{' ...' if len(diff) > 3 else ''}); restore {run_dir / 'config.yaml'} or drop "
            f"the --set, or start a new run")
    return steps


def stopped_line(run_dir: Path, *, resumable: bool = True) -> str:
    """The last line of a run stopped early: which training step is saved, and how to go
    on from it."""
    ckpt = run_dir / "checkpoints" / "latest.pt"
    try:
        saved = f"training step {int(load_checkpoint(ckpt)['learner']['steps']):,} is saved " \
                f"in {ckpt}"
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        saved = "no checkpoint was written yet"
    if resumable:
        return f"stopped: {saved}; continue with `ezengine train --resume {run_dir}`"
    return (f"stopped: {saved} (a --serial run keeps no replay logs, so it cannot be "
            f"resumed; evaluate it with `ezengine eval {run_dir}`)")
