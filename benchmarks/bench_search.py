"""Tree-only search benchmark: the workload of shared/search-benchmark.md exactly.

The network is replaced by pre-generated outputs; the timed part builds the roots with noise,
runs S x (select, expand + back-propagate), reads visit counts and root values, and frees the
forest. Prints one JSON line per batch size.

    python benchmarks/bench_search.py [--batches 8 64 256] [--repeats 7]
"""
import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

A, S = 18, 50


def make_workload(B: int) -> dict:
    """Seeded leaf outputs, drawn in the order the workload specifies."""
    rng = np.random.default_rng(20240601 + B)
    return {
        "root_logits": rng.standard_normal((B, A)).astype(np.float32),
        "root_noise": rng.dirichlet([0.3] * A, size=B).astype(np.float32),
        "leaf_value_prefix": rng.uniform(-1, 1, size=(S, B)).astype(np.float32),
        "leaf_value": rng.uniform(-1, 1, size=(S, B)).astype(np.float32),
        "leaf_logits": rng.standard_normal((S, B, A)).astype(np.float32),
    }


def one_search(B: int, w: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Imported here so that bench_search_lightzero.py can reuse this file's workload and
    # timing in an environment without ezengine.
    from ezengine_core.mcts import Forest

    forest = Forest(B, A, S, discount=0.997, c_init=1.25, c_base=19652.0,
                    value_delta_floor=0.01, horizon=5, seed=0)
    forest.reset_roots(w["root_logits"], None, w["root_noise"], noise_fraction=0.25)
    vp, v, lg = w["leaf_value_prefix"], w["leaf_value"], w["leaf_logits"]
    for s in range(S):
        forest.select()
        forest.expand(vp[s], v[s], lg[s])
    counts, values, depths = forest.visit_counts(), forest.root_values(), forest.node_depths()
    del forest
    return counts, values, depths


def median_seconds(call: Callable[[], object], repeats: int, min_seconds: float) -> float:
    """Median seconds per call over `repeats` runs of at least `min_seconds` each."""
    per_call = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            call()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        per_call.append(elapsed / n)
    return statistics.median(per_call)


def sanity_figures(counts: np.ndarray, values: np.ndarray, depths: np.ndarray) -> dict:
    """Figures that depend on the tree rules, not on speed."""
    assert (counts.sum(axis=1) == S).all(), "every root's child visits must sum to S"
    return {
        "mean_leaf_depth": round(float(depths.mean()), 3),
        "max_leaf_depth": int(depths.max()),
        "mean_root_children_visited": round(float((counts > 0).sum(axis=1).mean()), 3),
        "mean_root_value": round(float(values.mean()), 5),
    }


def bench(B: int, repeats: int, min_seconds: float) -> dict:
    w = make_workload(B)
    seconds = median_seconds(lambda: one_search(B, w), repeats, min_seconds)
    return {"batch": B, "actions": A, "simulations": S,
            "us_per_root_sim": round(seconds / (B * S) * 1e6, 3),
            **sanity_figures(*one_search(B, w))}


def run_cli(bench_one: Callable[[int, int, float], dict], doc: str) -> None:
    """Parse --batches/--repeats/--min-seconds and print one JSON line per batch size."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    args = parser.parse_args()
    for B in args.batches:
        print(json.dumps(bench_one(B, args.repeats, args.min_seconds)), flush=True)


def main() -> None:
    run_cli(bench, __doc__)


if __name__ == "__main__":
    main()
