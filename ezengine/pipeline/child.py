"""What every child process does around its role: quiet Ctrl-C, stop with the supervisor,
one torch thread, and report a crash to the supervisor."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from typing import Any

from ezengine.atomic import DiskFullError
from ezengine.device import configure_torch
from ezengine.pipeline.collector_role import run_collector
from ezengine.pipeline.evaluator_role import run_evaluator
from ezengine.pipeline.learner_role import run_learner
from ezengine.pipeline.replay_role import run_reanalyse, run_reanalyse_helper
from ezengine.pipeline.shared_memory import ATTACHED, SharedMemoryTransport
from ezengine.pipeline.spec import PipelineSpec, role_name
from ezengine.pipeline.transport import Stopped, Transport
from ezengine.rings import (
    SharedCounters,
    unlink_segments,
)


def run_role(role: str, index: int, spec: PipelineSpec, transport: Transport) -> None:
    """Run role `role` number `index` (see PipelineTrainer.roles) through `transport`."""
    if role == "collector":
        run_collector(spec, index, transport)
    elif role == "reanalyse" and index > 0:
        run_reanalyse_helper(spec, index, transport)
    else:
        {"learner": run_learner, "reanalyse": run_reanalyse,
         "evaluator": run_evaluator}[role](spec, transport)


def set_process_name(name: str) -> None:
    """Show `name` in ps/top (Linux; a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _stop_run(signum: int, _frame: Any) -> None:
    """SIGTERM in a child (sent by a user, or by the kernel when the supervisor died): stop
    the whole run the orderly way, through the shared stop flag (the learner writes its
    final checkpoint); before the counters are attached there is nothing to save."""
    counters = [b for b in ATTACHED if isinstance(b, SharedCounters)]
    if counters:
        counters[0]["stop"] = 1
    if not counters or _INTERRUPTIBLE:
        raise Stopped(signal.Signals(signum).name)


# Whether SIGTERM may end this child at once (the evaluator: an evaluation in progress is
# worth nothing to a stopped run) instead of at its next check of the stop flag.
_INTERRUPTIBLE = False


def follow_supervisor(supervisor_pid: int) -> None:
    """Have the kernel send this child SIGTERM when the supervisor dies (Linux's
    PR_SET_PDEATHSIG), so a killed ``ezengine train`` leaves no orphans."""
    signal.signal(signal.SIGTERM, _stop_run)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor_pid:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(role: str, index: int, spec: PipelineSpec, errors: Any) -> None:
    """Entry point of every child: quiet Ctrl-C (the supervisor handles it), stop with the
    supervisor, one torch thread, flushed denormals; a crash sends its traceback to the
    supervisor. The last act of a child that outlived the supervisor is to unlink the run's
    shared memory (the supervisor would have)."""
    global _INTERRUPTIBLE
    _INTERRUPTIBLE = role == "evaluator"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follow_supervisor(spec.supervisor_pid)
    name = role_name(role, index)
    set_process_name(f"ez-{name}")
    configure_torch(threads=1)
    try:
        run_role(role, index, spec, SharedMemoryTransport(spec))
    except Stopped:
        pass
    except DiskFullError as exc:  # the user's to fix: one line, no traceback
        errors.put((name, str(exc)))
        sys.exit(1)
    except BaseException:
        errors.put((name, traceback.format_exc()))
        sys.exit(1)
    finally:
        for block in ATTACHED:
            block.detach()
        if os.getppid() != spec.supervisor_pid:
            unlink_segments(spec.prefix)
