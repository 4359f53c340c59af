"""The multiprocessing pipeline: collectors, a replay + reanalyse worker and the learner
around one model, exchanging data through shared-memory rings.

    collector-i --transitions ring--> reanalyse (owns the replay) --batches ring--> learner
         ^                                  ^                                          |
         |                                  +-------------- priorities ring -----------+
         +------------ self-play weights (versioned, shared memory) <------------------+
                       target weights -> reanalyse;  evaluation weights -> evaluator

The same pieces as the serial trainer (Collector, ReplayBuffer, Reanalyser, Learner) run in
separate processes, one module per role. Only the learner touches the training device;
collectors, the reanalyser and the evaluator run CPU copies of versioned weights published
by the learner.
The supervisor (the ``ezengine train`` process) creates every shared-memory block, starts
and watches the children, prints progress and writes metrics; on Ctrl-C or SIGTERM it stops
them (the learner writes a final checkpoint), and on a child's crash it stops the run with
the child's traceback and a non-zero exit. Every segment is unlinked at exit.

Nothing collected is lost: each collector appends every transition record to
``replay/collector-<i>.bin`` before publishing it, and a resumed run rebuilds its replay
from those logs (trajectories open at the stop are closed as cut, so they bootstrap).

Modules: ``supervisor`` (PipelineTrainer), ``child`` (what every child does around its
role), one per role (``collector_role``, ``replay_role``, ``learner_role``,
``evaluator_role``), ``transport`` (attaching blocks, versioned weights, stoppable ring
writes), ``layouts`` (what the rings carry, derived from the dataclasses), ``spec`` (what
each child is handed) and ``transition_log`` (the replay logs).
"""

from ezengine.pipeline.supervisor import PipelineTrainer

__all__ = ["PipelineTrainer"]
