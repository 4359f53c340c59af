"""The collector process: steps its environments with the latest self-play weights (or
the model owner's searches), logs and publishes every transition record."""

from __future__ import annotations

import time
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
    POLL_S,
    Stopped,
    attach,
    refresh,
    wait_for_version,
    write_unless_stopped,
)
from ezengine.recipe import (
    build_network,
    collector_seed,
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
    weights = attach(SharedWeights, spec.selfplay_weights)
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
    flat = np.empty(weights.spec.size, dtype=np.float32)
    loaded = 0
    run = cfg.run
    per_collector = spec.num_collectors * n
    share = -(-run.env_steps // per_collector) * n  # this collector's budget
    # This collector's part of the random warm-up, counted at the collector: a count of what
    # the replay has ingested would lag by the ring's contents at start-up.
    warmup_share = -(-run.start_transitions // per_collector) * n
    while not counters["stop"] and collector.env_steps < share:
        total = counters["replay_env_steps"]
        warmup = collector.env_steps < warmup_share
        if not warmup:
            # Pacing: stay within one vector step of the replay ratio.
            allowed = (counters["train_steps"] + 1) / run.replay_ratio
            if total >= allowed + n * spec.num_collectors:
                time.sleep(POLL_S)
                continue
            if remote is None:
                wait_for_version(weights, counters)
                loaded = refresh(model, weights, flat, loaded)
        temperature = visit_temperature(cfg, total)
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
