"""The training recipe: every rule a run follows, whichever runner runs it.

Budgets and pacing, the temperature and importance-weight schedules, the seed streams, the
builders of the replay and the network, what a checkpoint holds and the progress line (a
search comes from `BatchedSearch.for_config`). The serial trainer and the pipeline's roles
call these and write none of them again.

Pacing: after `run.start_transitions` steps of uniformly random play, training steps keep
pace with collection so that training steps = replay_ratio x env steps (the first
replay_ratio x start_transitions of them train on the random play, as in the reference);
after the environment-step budget, `run.extra_training_steps` more training steps run
without new data.

The timetable: what each piece of work sees is fixed by the step counts alone, never by
which process got there first, so a run's result does not depend on the machine's speed or
load, and the serial runner reproduces the pipeline. Records enter the replay in turn (the
collector with the fewest records next, the lowest index on a tie); batch s is sampled once
the records allow it and before any further record enters, with the priorities of training
steps up to s - BATCH_LEAD applied and the target weights the learner had after that step;
self-play at a given replay size acts with the newest weights published at or before
`selfplay_weights_step` of it.

Ending early (`solved_at`): with run.stop_evaluations set, the run ends at the evaluation
that makes that many in a row at run.stop_return or better, and the weights evaluated there
are its final ones; evaluations are part of the timetable, so this step too is the same on
any machine.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ezengine.config import Config, config_to_dict
from ezengine.envs import EnvDescription
from ezengine.metrics import Eta
from ezengine.model import EfficientZeroNet, build_model
from ezengine.replay import ReplayBuffer, SampledPositions, initial_allocation

# ------------------------------------------------------------------ budgets and schedules


def paced_training_steps(cfg: Config, env_steps: int) -> int:
    """Training steps allowed once `env_steps` environment steps are collected:
    replay_ratio x env_steps from the end of the random warm-up on (the warm-up's share
    included), then the extra ones once the budget is collected (100k + 20k at the paper's
    settings)."""
    run = cfg.run
    if env_steps < run.start_transitions:
        return 0
    paced = int(run.replay_ratio * min(env_steps, run.env_steps))
    return paced + (run.extra_training_steps if env_steps >= run.env_steps else 0)


# Batches sampled ahead of the learner: batch s sees the priorities and the target of
# training step s - BATCH_LEAD (the pipeline's batch ring has this many slots).
BATCH_LEAD = 2


def selfplay_weights_step(cfg: Config, env_steps: int) -> int:
    """Training step whose weights (the newest self-play publish at or before it) act on
    the record that enters the replay when it holds `env_steps` env steps: one self-play
    interval behind what the pacing allows, so that collection and training overlap."""
    return max(paced_training_steps(cfg, env_steps) - cfg.run.selfplay_update_interval, 0)


def published_step(steps: list[int], step: int) -> int:
    """Which of the training `steps` at which weights were published a reader of step
    `step` takes: the newest at or before it (the first publish if all came later, as after
    a resume)."""
    before = [s for s in steps if s <= step]
    return max(before) if before else min(steps)


def collector_budget(cfg: Config, num_collectors: int) -> tuple[int, int]:
    """(env steps each collector collects, of them uniformly random warm-up steps): the
    budget and the warm-up shared evenly, in whole vector steps."""
    per_step = num_collectors * cfg.env.num_envs
    def share(steps: int) -> int:
        return -(-steps // per_step) * cfg.env.num_envs
    return share(cfg.run.env_steps), share(cfg.run.start_transitions)


def record_env_steps(collector_steps: int, index: int, num_collectors: int,
                     num_envs: int) -> int:
    """Env steps in the replay when collector `index`'s record, made after it collected
    `collector_steps` steps, enters it (records enter in turn)."""
    return num_collectors * collector_steps + index * num_envs


def batch_env_steps(cfg: Config, train_steps: int, num_collectors: int = 1) -> int:
    """Env steps in the replay when the batch of training step `train_steps` was built:
    the first record count the pacing allows it at (records of env.num_envs steps enter one
    at a time, and a due batch is built before the next record enters). What an evaluation
    of that step's weights is reported at, the same on any machine and backend. (The
    first batch also needs a sampleable position: with a warm-up of fewer steps per
    environment than the unroll and TD lookahead, it comes a few records later.)"""
    if train_steps <= 0:
        return 0
    n = cfg.env.num_envs
    budget = num_collectors * collector_budget(cfg, num_collectors)[0]
    need = max(cfg.run.start_transitions, math.ceil(train_steps / cfg.run.replay_ratio))
    steps = min(-(-need // n) * n, budget)
    while steps < budget and paced_training_steps(cfg, steps) < train_steps:
        steps += n
    return steps


def total_training_steps(cfg: Config) -> int:
    """Training steps of a whole run: paced ones during collection plus the extra ones."""
    return paced_training_steps(cfg, cfg.run.env_steps)


def solved_at(cfg: Config, evaluations: Sequence[Mapping[str, Any]]) -> int:
    """The training step of the evaluation that ends the run early (0: none does): the
    first that makes run.stop_evaluations in a row with a mean return of at least
    run.stop_return. `evaluations`: eval.jsonl rows in training-step order."""
    need = cfg.run.stop_evaluations
    if need <= 0:
        return 0
    streak = 0
    for row in evaluations:
        streak = streak + 1 if row["mean_return"] >= cfg.run.stop_return else 0
        if streak >= need:
            return int(row["train_steps"])
    return 0


def evaluation_episodes(cfg: Config, evaluations: Sequence[Mapping[str, Any]]) -> int:
    """Episodes of the next evaluation, after `evaluations` (eval.jsonl rows in
    training-step order): run.stop_eval_episodes when it can end the run early (the
    run.stop_evaluations - 1 before it all reached run.stop_return), else
    run.eval_episodes. Twenty games at the limit say little about a policy that fails one
    start in twelve (0.92^20 = 0.19); sixty say more (0.92^60 = 0.007)."""
    run = cfg.run
    if run.stop_evaluations <= 0 or run.stop_eval_episodes <= 0:
        return run.eval_episodes
    streak = 0  # evaluations at run.stop_return or better at the end of the history
    for row in evaluations:
        streak = streak + 1 if row["mean_return"] >= run.stop_return else 0
    return run.stop_eval_episodes if streak >= run.stop_evaluations - 1 else run.eval_episodes


def stop_rule(cfg: Config) -> str:
    """How a run ends early, as the start line's ending: ' (ends early at ...)', or ''
    when it trains the whole budget."""
    if cfg.run.stop_evaluations <= 0:
        return ""
    episodes = (f", the last over {cfg.run.stop_eval_episodes} episodes"
                if cfg.run.stop_eval_episodes > 0 else "")
    return (f" (ends early at {cfg.run.stop_evaluations} evaluations in a row with a mean "
            f"return of at least {cfg.run.stop_return:g}{episodes})")


def solved_line(cfg: Config, step: int) -> str:
    """The line that says a run ended early at training step `step`."""
    return (f"solved: {cfg.run.stop_evaluations} evaluations in a row reached a mean return "
            f"of {cfg.run.stop_return:g}; the run ends at training step {step:,} with its "
            f"weights")


def greedy_envs(cfg: Config, num_envs: int) -> int:
    """How many of a collector's `num_envs` environments act on the most visited action
    (its first ones): run.greedy_env_fraction of them, rounded."""
    return round(cfg.run.greedy_env_fraction * num_envs)


def selfplay_noise_roots(cfg: Config, num_envs: int) -> np.ndarray:
    """bool [num_envs]: which of a collector's environments search with root noise: all,
    except the greedy ones when run.greedy_env_noise is off."""
    noisy = np.ones(num_envs, dtype=bool)
    if not cfg.run.greedy_env_noise:
        noisy[:greedy_envs(cfg, num_envs)] = False
    return noisy


def collector_options(cfg: Config, num_envs: int) -> dict[str, Any]:
    """The action-choice arguments of a `Collector` of `num_envs` environments: its greedy
    environments, which searches take root noise, and the repeat exploration."""
    return {"greedy_envs": greedy_envs(cfg, num_envs),
            "noise_roots": selfplay_noise_roots(cfg, num_envs),
            "repeat_prob": cfg.run.repeat_explore_prob,
            "repeat_mu": cfg.run.repeat_explore_mu}


def visit_temperature(cfg: Config, env_steps: int) -> float:
    """Self-play temperature, stepping down at run.temperature_milestones (fractions of the
    environment-step budget)."""
    progress = env_steps / cfg.run.env_steps
    passed = sum(progress >= m for m in cfg.run.temperature_milestones)
    return cfg.run.visit_temperatures[passed]


def importance_exponent(cfg: Config, train_steps: int) -> float:
    """PER beta, annealed linearly from replay.beta_start to replay.beta_end over training."""
    progress = min(train_steps / max(total_training_steps(cfg), 1), 1.0)
    return cfg.replay.beta_start + (cfg.replay.beta_end - cfg.replay.beta_start) * progress


# ------------------------------------------------------------------ seed streams


def model_seed(cfg: Config) -> int:
    """torch's seed for the initial weights."""
    return cfg.run.seed


def collector_seed(cfg: Config, index: int, env_steps: int = 0) -> int:
    """Environments, root noise and action sampling of collector `index`; a resumed
    collector (`env_steps` already collected) takes a fresh stream, so resumed episodes do
    not repeat old ones."""
    return cfg.run.seed + 1000 * (index + 1) + env_steps


def reanalysis_part_seed(cfg: Config, part: int) -> int:
    """Root noise of part `part` of every batch's re-searched policy targets; part 0's
    (the replay owner's) also seeds the padding actions."""
    return cfg.run.seed + 1 if part == 0 else cfg.run.seed + 100 + part


def sampling_seed(cfg: Config) -> int:
    """Replay sampling."""
    return cfg.run.seed + 2


def evaluation_seed(cfg: Config, train_steps: int) -> int:
    """The first episode seed of the evaluation at training step `train_steps` (its
    episodes take this seed and the next run.eval_episodes - 1): new episodes at every
    evaluation, so evaluations in a row are independent samples of the policy (an early
    stop on the same episodes each time can trust a policy that only handles those), and
    apart from `ezengine eval`'s seeds (below 10,000 unless given). An evaluation of
    run.stop_eval_episodes takes the seeds after these; they stay apart from the next
    evaluation's while run.stop_eval_episodes <= run.eval_interval x run.eval_episodes."""
    return cfg.run.seed + 10_000 + train_steps * cfg.run.eval_episodes


# ------------------------------------------------------------------ builders


def build_replay(cfg: Config, env: EnvDescription, writers: int) -> ReplayBuffer:
    """The prioritised replay for `writers` environments in all; it keeps
    every transition unless replay.capacity sets a window."""
    lc = cfg.learner
    return ReplayBuffer(
        cfg.replay.capacity, env.frame_shape, np.dtype(env.frame_dtype), env.num_actions,
        num_writers=writers, alpha=cfg.replay.alpha, frame_stack=cfg.env.frame_stack,
        lookahead=lc.unroll_steps + lc.td_steps,
        initial_capacity=initial_allocation(cfg.run.env_steps, writers))


def sample_batch_positions(cfg: Config, replay: ReplayBuffer, train_steps: int,
                           rng: np.random.Generator) -> SampledPositions:
    """Positions of the next training batch, with importance weights at the current beta."""
    return replay.sample(cfg.learner.batch_size, importance_exponent(cfg, train_steps), rng)


# ------------------------------------------------------------------ what a run writes


def recent_returns() -> deque[float]:
    """The finished training games whose mean the progress line shows: the last 20."""
    return deque(maxlen=20)


def checkpoint_state(cfg: Config, learner_state: dict[str, Any],
                     selfplay_state: dict[str, Any], env_steps: int) -> dict[str, Any]:
    """What checkpoints/latest.pt holds: the learner (model, target, optimizer, steps),
    the self-play weights, the env steps collected and the resolved config."""
    return {"learner": learner_state, "selfplay": selfplay_state, "env_steps": env_steps,
            "config": config_to_dict(cfg)}


def progress_line(cfg: Config, row: dict[str, Any], eta: Eta, extra: str = "") -> str:
    """The console line of a progress row (the row itself goes to metrics.jsonl). The ETA
    is the whole budget's, an upper bound ('ETA <= ...') when the run may end early."""
    ret = "-" if row.get("recent_return") is None else f"{row['recent_return']:.1f}"
    loss = f" | loss {row['loss']:.3f}" if row.get("loss") is not None else ""
    total_train = total_training_steps(cfg)
    return (f"env {row['env_steps']:,}/{cfg.run.env_steps:,} | train "
            f"{row['train_steps']:,}/{total_train:,} | return {ret}{loss} | "
            f"{row['env_steps_per_s']:.0f} env/s {row['train_steps_per_s']:.1f} train/s | "
            + (f"{extra} | " if extra else "")
            + eta.text(row["env_steps"], cfg.run.env_steps, row["train_steps"], total_train,
                       train_from=paced_training_steps(cfg, cfg.run.start_transitions),
                       at_most=cfg.run.stop_evaluations > 0))


def build_network(cfg: Config, env: EnvDescription) -> EfficientZeroNet:
    """A fresh network for `env` on the CPU, in eval mode (seed torch first for a given
    initialisation)."""
    return build_model(cfg.model, env.frame_shape, env.num_actions, cfg.env.frame_stack).eval()
