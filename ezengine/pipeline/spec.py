"""What the supervisor hands every child: the counters' names, the ring sizes and the
specs of every shared-memory block (picklable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ezengine.config import Config, config_from_dict
from ezengine.envs import EnvDescription
from ezengine.learner import METRICS
from ezengine.recipe import BATCH_LEAD
from ezengine.rings import (
    CountersSpec,
    RingSpec,
    WeightsSpec,
)

# solved_at: the evaluation that ends the run early (recipe.solved_at), set by the
# evaluator; final_step: the training step of the final weights, set by the learner as it
# finishes (before learner_done).
INT_COUNTERS = ("stop", "replay_env_steps", "replay_positions", "train_steps",
                "target_version", "batches", "games", "learner_done", "eval_done",
                "solved_at", "final_step")


# The learner adds each training step's metrics to these sums; a progress row of
# metrics.jsonl shows their means over its window (per training step), as the serial
# trainer's rows do.
METRIC_SUMS = tuple(f"{name}_sum" for name in METRICS)

# CPU seconds each role has used (all collectors together): the progress rows show how the
# machine's cores are split between collection, reanalysis, learning and evaluation.
ROLES = ("collector", "reanalyse", "learner", "evaluator")
CPU_COUNTERS = tuple(f"cpu_{role}_s" for role in ROLES)
FLOAT_COUNTERS = ("recent_return", "learner_wait_s", *METRIC_SUMS, *CPU_COUNTERS)


def role_name(role: str, index: int) -> str:
    """A process's name: collector-i, reanalyse (the replay's owner), reanalyse-p (helper
    p), learner, evaluator."""
    return f"{role}-{index}" if role == "collector" or index > 0 else role


# Slots per ring: transitions (per collector; a full ring blocks its collector), batches
# (how far reanalysis may build ahead of the learner), priorities (learner -> reanalyse).
RING_SLOTS = {"transitions": 64, "batches": BATCH_LEAD, "priorities": 16}


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """Everything a child process needs (picklable)."""

    config: dict[str, Any]
    run_dir: str
    env: EnvDescription
    num_collectors: int
    resume: bool
    transitions: list[RingSpec]
    batches: RingSpec
    priorities: RingSpec
    counters: CountersSpec
    selfplay_weights: list[WeightsSpec]  # a WeightHistory's blocks
    target_weights: list[WeightsSpec]
    eval_weights: WeightsSpec
    search_requests: list[RingSpec]  # per collector; empty unless collector_inference=learner
    search_results: list[RingSpec]
    reanalysis_jobs: list[RingSpec]  # per reanalyse helper (run.reanalysers - 1)
    reanalysis_results: list[RingSpec]
    prefix: str  # every segment's name starts with it
    supervisor_pid: int

    def cfg(self) -> Config:
        return config_from_dict(self.config, source=f"{self.run_dir}/config.yaml")
