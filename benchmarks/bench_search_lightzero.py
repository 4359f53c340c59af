"""The search benchmark (shared/search-benchmark.md) run through LightZero's EfficientZero ctree.

Runs the same seeded workload as bench_search.py through LightZero 0.2.0's compiled tree
(lzero.mcts.ctree.ctree_efficientzero.ez_tree), making the tree calls the way LightZero's own
driver (EfficientZeroMCTSCtree.search) makes them, with the network replaced by the
pre-generated leaf outputs: Roots + prepare (noise), then per simulation a fresh
ResultsWrapper, batch_traverse, is_reset = search_len % horizon == 0, batch_backpropagate with
latent index s + 1; then get_distributions, get_values, and freeing. Inputs are converted with
.tolist() inside the timed part, as LightZero's driver does; `us_per_root_sim_prelisted` is
the same with all lists built beforehand (tree calls only).

The extension module is loaded straight from the installed package, so that only the wheel is
needed (`pip install --no-deps LightZero==0.2.0 "numpy<2"`): importing `lzero.mcts` would
pull in torch and DI-engine, which the tree itself does not use.

    python benchmarks/bench_search_lightzero.py [--batches 8 64 256] [--repeats 7]
"""
import importlib.metadata
import importlib.util
import pathlib
import sys

import numpy as np

# Run as a script, this file's folder is on sys.path: reuse bench_search's workload.
from bench_search import A, S, make_workload, median_seconds, run_cli, sanity_figures

C_BASE, C_INIT, DISCOUNT, DELTA_MAX, NOISE_WEIGHT, HORIZON = 19652, 1.25, 0.997, 0.01, 0.25, 5
MODULE = "lzero.mcts.ctree.ctree_efficientzero.ez_tree"


def load_ez_tree():
    """LightZero's compiled EfficientZero tree, or exit saying why it cannot be had."""
    try:
        spec = importlib.util.find_spec("lzero")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        sys.exit("lzero is not importable: install it with `pip install LightZero==0.2.0` "
                 "(or `pip install --no-deps LightZero==0.2.0 'numpy<2'`) in this interpreter")
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "mcts/ctree/ctree_efficientzero"
    found = sorted(folder.glob("ez_tree*.so")) + sorted(folder.glob("ez_tree*.pyd"))
    if not found:
        sys.exit(f"lzero is installed but has no compiled ez_tree extension in {folder}")
    try:
        mod_spec = importlib.util.spec_from_file_location(MODULE, found[0])
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except ImportError as exc:
        sys.exit(f"lzero's ez_tree extension {found[0]} does not load: {exc}")
    return module


ez = load_ez_tree()


def as_lists(w: dict) -> dict:
    """The workload as the Python lists the ctree takes."""
    return {k: [row.tolist() for row in v] if k.startswith("leaf") else v.tolist()
            for k, v in w.items()}


def one_search(B: int, w: dict, lists: bool = False) -> tuple[list, list, list]:
    """One search of B roots; `lists`: w is already as_lists(w). Returns counts, values, lens."""
    tolist = (lambda x: x) if lists else (lambda x: x.tolist())
    to_play = [-1] * B  # single player ('not_board_games')
    roots = ez.Roots(B, [list(range(A))] * B)
    roots.prepare(NOISE_WEIGHT, tolist(w["root_noise"]), [0.0] * B, tolist(w["root_logits"]),
                  to_play)
    min_max = ez.MinMaxStatsList(B)
    min_max.set_delta(DELTA_MAX)
    vp, v, lg = w["leaf_value_prefix"], w["leaf_value"], w["leaf_logits"]
    all_lens = []
    for s in range(S):
        results = ez.ResultsWrapper(num=B)
        _ix, _iy, _last_actions, virtual_to_play = ez.batch_traverse(
            roots, C_BASE, C_INIT, DISCOUNT, min_max, results, to_play)
        search_lens = results.get_search_len()
        is_reset = (np.array(search_lens) % HORIZON == 0).astype(np.int32).tolist()
        ez.batch_backpropagate(s + 1, DISCOUNT, tolist(vp[s]), tolist(v[s]), tolist(lg[s]),
                               min_max, results, is_reset, virtual_to_play)
        all_lens.append(search_lens)
    counts, values = roots.get_distributions(), roots.get_values()
    del roots, min_max, results
    return counts, values, all_lens


def bench(B: int, repeats: int, min_seconds: float) -> dict:
    w = make_workload(B)
    counts, values, lens = (np.asarray(x) for x in one_search(B, w))
    seconds = median_seconds(lambda: one_search(B, w), repeats, min_seconds)
    listed = as_lists(w)
    seconds_pre = median_seconds(lambda: one_search(B, listed, True), repeats, min_seconds)
    return {
        "batch": B, "actions": A, "simulations": S,
        "us_per_root_sim": round(seconds / (B * S) * 1e6, 3),
        **sanity_figures(counts, values, lens),
        "engine": f"lightzero-{importlib.metadata.version('LightZero')}",
        "us_per_root_sim_prelisted": round(seconds_pre / (B * S) * 1e6, 3),
    }


if __name__ == "__main__":
    run_cli(bench, __doc__)
