"""The evaluator role: evaluates each model the learner publishes for evaluation, appends
the record to eval.jsonl, and says when the evaluations end the run early."""

from __future__ import annotations

import time
from pathlib import Path

from ezengine.evaluate import evaluate
from ezengine.metrics import MetricsWriter
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transport import CpuClock, Transport
from ezengine.recipe import (
    batch_env_steps,
    build_network,
    evaluation_episodes,
    evaluation_seed,
    solved_at,
)
from ezengine.scores import read_evaluations


def run_evaluator(spec: PipelineSpec, transport: Transport) -> None:
    """Evaluate each model the learner publishes for evaluation; append to eval.jsonl; set
    the counter solved_at at the evaluation that ends the run early."""
    cfg = spec.cfg()
    counters = transport.counters
    # The evaluations a stop streak counts: a resumed run's earlier ones, up to its
    # checkpoint, then each new one (none is skipped while the stop rule is on: the learner
    # publishes the next only once this one is done).
    trained = counters["train_steps"]
    history = [row for row in read_evaluations(Path(spec.run_dir))
               if row["train_steps"] <= trained]
    model = build_network(cfg, spec.env)
    loaded: int | None = None
    start = time.perf_counter()
    metrics = MetricsWriter(Path(spec.run_dir))
    clock = CpuClock(counters, "evaluator")
    while not counters["stop"]:
        clock.tick()
        learner_done = counters["learner_done"]  # read before the weights: no lost final eval
        steps = transport.load("eval", model, 0, loaded)  # published under its training step
        if steps == loaded:
            if learner_done:
                break
            time.sleep(0.05)
            continue
        loaded = steps
        env_steps = batch_env_steps(cfg, steps, spec.num_collectors)  # not the replay's now
        # The clock ticks every game step: a long evaluation (Freeway's 2,500 steps take
        # minutes) shows in the progress lines' cores while it runs, not only after.
        result = evaluate(model, cfg, evaluation_episodes(cfg, history),
                          seed=evaluation_seed(cfg, steps), on_step=clock.tick)
        row = {"train_steps": steps, "env_steps": env_steps,
               "wall_s": round(time.perf_counter() - start, 1), **result.record()}
        metrics.evaluation(row)
        history.append(row)
        solved = solved_at(cfg, history)
        if solved and not counters["solved_at"]:
            counters["solved_at"] = solved  # before eval_done: the learner reads them so
        counters["eval_done"] = steps
