"""The evaluator process: evaluates each model the learner publishes for evaluation and
appends the record to eval.jsonl."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ezengine.evaluate import evaluate
from ezengine.metrics import MetricsWriter
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transport import (
    attach,
    refresh,
)
from ezengine.recipe import (
    build_network,
    evaluation_seed,
)
from ezengine.rings import (
    SharedCounters,
    SharedWeights,
)


def run_evaluator(spec: PipelineSpec) -> None:
    """Evaluate each model the learner publishes for evaluation; append to eval.jsonl."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    weights = attach(SharedWeights, spec.eval_weights)
    model = build_network(cfg, spec.env)
    flat = np.empty(weights.spec.size, dtype=np.float32)
    loaded = 0
    start = time.perf_counter()
    metrics = MetricsWriter(Path(spec.run_dir))
    while not counters["stop"]:
        learner_done = counters["learner_done"]  # read before the version: no lost final eval
        if weights.version == loaded:
            if learner_done:
                break
            time.sleep(0.05)
            continue
        loaded = refresh(model, weights, flat, loaded)
        steps = loaded  # published under its training step
        env_steps = counters["replay_env_steps"]
        result = evaluate(model, cfg, cfg.run.eval_episodes, seed=evaluation_seed(cfg))
        row = {"train_steps": steps, "env_steps": env_steps,
               "wall_s": round(time.perf_counter() - start, 1), **result.record()}
        metrics.evaluation(row)
        counters["eval_done"] = steps
