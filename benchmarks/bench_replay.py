"""Replay sum-tree benchmark: batches of 256 drawn from 1,000,000 priorities, with a priority
update of each drawn batch interleaved (as the learner does). Prints one JSON line.

    python benchmarks/bench_replay.py [--capacity 1000000] [--batch 256] [--seconds 3]
"""
import argparse
import json
import time

import numpy as np

from ezengine_core.sumtree import SumTree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tree = SumTree(args.capacity, alpha=0.6)
    tree.update(np.arange(args.capacity), rng.uniform(0.01, 10.0, args.capacity))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        idx, p_alpha = tree.sample(rng.random(args.batch))
        weights = (args.capacity * p_alpha / tree.total) ** -0.4
        weights /= (args.capacity * tree.min / tree.total) ** -0.4
        tree.update(idx, rng.uniform(0.01, 10.0, args.batch))
        n += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({
        "capacity": args.capacity, "batch": args.batch,
        "samples_per_s": round(n * args.batch / elapsed),
        "us_per_batch_sample_and_update": round(elapsed / n * 1e6, 2),
    }))


if __name__ == "__main__":
    main()
