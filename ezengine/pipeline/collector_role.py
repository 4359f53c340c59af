"""The collector process: steps its environments with the self-play weights the timetable
names (or the model owner's searches), logs and publishes every transition record."""

from __future__ import annotations

from typing import Any

import numpy as np

from ezengine.collector import Collector
from ezengine.envs import VectorEnv
from ezengine.pipeline.layouts import transition_layout
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transition_log import (
    TransitionLog,
    log_path,
)
from ezengine.pipeline.transport import (
    Stopped,
    attach,
    load_published,
    wait_for_training,
    write_unless_stopped,
)
from ezengine.pipeline.weights import WeightHistory
from ezengine.recipe import (
    build_network,
    collector_budget,
    collector_seed,
    record_env_steps,
    selfplay_weights_step,
    visit_temperature,
)
from ezengine.rings import (
    Ring,
    RingTimeout,
    SharedCounters,
    SharedWeights,
)
from ezengine.search import BatchedSearch, SearchResult


def run_collector(spec: PipelineSpec, index: int) -> None:
    """Step this collector's environments and publish every transition record."""
    cfg = spec.cfg()
    counters = attach(SharedCounters, spec.counters)
    ring = attach(Ring, spec.transitions[index])
    weights = WeightHistory([attach(SharedWeights, s) for s in spec.selfplay_weights])
    log = TransitionLog(log_path(spec.run_dir, index), transition_layout(cfg, spec.env))
    start_steps = log.last_env_steps()
    n = cfg.env.num_envs
    seed = collector_seed(cfg, index, start_steps)
    envs = VectorEnv(cfg.env, seed=seed, train=True)
    search = BatchedSearch.for_config(cfg, spec.env.num_actions, seed)
    collector = Collector(envs, search, clip_rewards=cfg.env.clip_rewards,
                          frame_stack=cfg.env.frame_stack, seed=seed, env_steps=start_steps)
    remote = (SearchClient(attach(Ring, spec.search_requests[index]),
                           attach(Ring, spec.search_results[index]), counters)
              if spec.search_requests else None)
    model = build_network(cfg, spec.env)
    flat = np.empty(weights.size, dtype=np.float32)
    loaded: int | None = None
    c = spec.num_collectors
    share, warmup_share = collector_budget(cfg, c)
    while not counters["stop"] and collector.env_steps < share:
        # The replay's size when this record enters it fixes the temperature and, after the
        # warm-up, the weights that act (recipe.py's timetable); waiting for those weights
        # is what keeps collection at the replay ratio.
        replay_steps = record_env_steps(collector.env_steps, index, c, n)
        warmup = collector.env_steps < warmup_share
        if not warmup and remote is None:
            step = selfplay_weights_step(cfg, replay_steps)
            wait_for_training(counters, step)
            loaded = load_published(model, weights, step, flat, loaded)
        temperature = visit_temperature(cfg, replay_steps)
        policy = None if warmup else (remote or model)
        try:
            with ring.write(timeout=1.0) as slot:
                collector.step(policy, temperature, out=slot)
                log.append(slot)
        except RingTimeout:
            continue
    envs.close()
    ring.close()


class SearchClient:
    """A collector's searches run by the model owner (run.collector_inference: learner): the
    stacked observations go out through a request ring, the visit counts come back."""

    def __init__(self, requests: Ring, results: Ring, counters: SharedCounters) -> None:
        self.requests = requests
        self.results = results
        self.counters = counters

    def search(self, obs: np.ndarray) -> SearchResult:
        """Search from stacked observations [N, ...]; raises Stopped if the run stops."""
        def fill(slot: Any) -> None:
            slot["obs"][...] = obs
        if not write_unless_stopped(self.requests, self.counters, fill):
            raise Stopped("the run stopped while a search was pending")
        while True:
            try:
                with self.results.read(timeout=1.0) as slot:
                    return SearchResult(np.array(slot["visit_counts"]),
                                        np.array(slot["root_values"]),
                                        np.array(slot["predicted_values"]))
            except RingTimeout:
                if self.counters["stop"]:
                    raise Stopped("the run stopped while a search was pending") from None
