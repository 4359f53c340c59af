"""The collector role: steps its environments with the self-play weights the timetable
names (or the model owner's searches) and sends every transition record (the transport
logs it first)."""

from __future__ import annotations

import numpy as np

from ezengine.collector import Collector
from ezengine.envs import VectorEnv
from ezengine.pipeline.spec import PipelineSpec
from ezengine.pipeline.transport import (
    CpuClock,
    Timeout,
    Transport,
)
from ezengine.recipe import (
    build_network,
    collector_budget,
    collector_options,
    collector_seed,
    record_env_steps,
    selfplay_weights_step,
    visit_temperature,
)
from ezengine.search import BatchedSearch, SearchResult


class OwnerSearches:
    """A collector's searches run by the model owner (run.collector_inference: learner)."""

    def __init__(self, transport: Transport, index: int) -> None:
        self.transport = transport
        self.index = index

    def search(self, obs: np.ndarray) -> SearchResult:
        return self.transport.search(self.index, obs)


def run_collector(spec: PipelineSpec, index: int, transport: Transport) -> None:
    """Step this collector's environments; log and send every transition record."""
    cfg = spec.cfg()
    counters = transport.counters
    start_steps = transport.logged_env_steps(index)
    n = cfg.env.num_envs
    seed = collector_seed(cfg, index, start_steps)
    envs = VectorEnv(cfg.env, seed=seed, train=True)
    search = BatchedSearch.for_config(cfg, spec.env.num_actions, seed)
    collector = Collector(envs, search, clip_rewards=cfg.env.clip_rewards,
                          frame_stack=cfg.env.frame_stack, seed=seed, env_steps=start_steps,
                          **collector_options(cfg, n))
    remote = (OwnerSearches(transport, index) if cfg.run.collector_inference == "learner"
              else None)
    model = build_network(cfg, spec.env)
    loaded: int | None = None
    c = spec.num_collectors
    share, warmup_share = collector_budget(cfg, c)
    clock = CpuClock(counters, "collector")
    while not counters["stop"] and collector.env_steps < share:
        clock.tick()
        # The replay's size when this record enters it fixes the temperature and, after the
        # warm-up, the weights that act (recipe.py's timetable); waiting for those weights
        # is what keeps collection at the replay ratio.
        replay_steps = record_env_steps(collector.env_steps, index, c, n)
        warmup = collector.env_steps < warmup_share
        if not warmup and remote is None:
            step = selfplay_weights_step(cfg, replay_steps)
            transport.wait_for_training(step)
            loaded = transport.load("selfplay", model, step, loaded)
        temperature = visit_temperature(cfg, replay_steps)
        policy = None if warmup else (remote or model)
        try:
            with transport.record_slot(index, timeout=1.0) as slot:
                collector.step(policy, temperature, out=slot)
        except Timeout:
            continue
    envs.close()
    transport.end_records(index)
