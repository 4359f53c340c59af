"""Pipeline throughput: runs the real `ezengine train` for a fixed time, stops it with
Ctrl-C (SIGINT), and prints one JSON line per config with environment steps/s, training
steps/s and the fraction of time the learner waited for data, measured after warm-up
(from the first progress row with training steps to the last).

    python benchmarks/bench_pipeline.py [--seconds 120] [--serial]
                                        [--only cartpole|atari|minatar]
                                        [--set section.key=value ...]

Pipeline runs also print `cores_by_role`: the cores each role (all collectors together,
reanalyse, learner, evaluator) kept busy, from the CPU seconds the roles count.

`--set` applies to every run, for example `--set run.collector_inference=learner` to measure
the collectors' searches answered by the model owner instead of run on CPU weight copies.

The Atari-shaped run is Ms. Pac-Man with the paper's network and 96x96x12 inputs; on a CPU
it uses a smaller batch and fewer simulations (override with --atari-set) so that it trains
at all within the time.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "cartpole": ["configs/cartpole.yaml", "--set", "run.eval_interval=1000000"],
    "atari": ["configs/ms_pacman.yaml", "--set", "run.eval_interval=1000000",
              "--set", "run.start_transitions=400"],
    "minatar": ["configs/minatar/breakout.yaml", "--set", "run.eval_interval=1000000",
                "--set", "run.start_transitions=1000"],
}
ROLES = ("collector", "reanalyse", "learner", "evaluator")
ATARI_CPU = ["learner.batch_size=32", "search.num_simulations=8", "env.num_envs=4"]


def run_for(args: list[str], seconds: float, run_dir: Path) -> dict:
    cmd = [sys.executable, "-c", "from ezengine.cli import main; main()", "train", *args,
           "--run-dir", str(run_dir), "--set", "run.log_interval_s=5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["train_steps"] > 0]
    if len(trained) < 2:
        return {"error": "no training progress within the time", "output_tail": out[-2000:]}
    first, last = trained[0], trained[-1]
    span = last["wall_s"] - first["wall_s"]
    result = {
        "seconds_measured": round(span, 1),
        "env_steps_per_s": round((last["env_steps"] - first["env_steps"]) / span, 2),
        "train_steps_per_s": round((last["train_steps"] - first["train_steps"]) / span, 3),
        "train_steps_per_hour": round((last["train_steps"] - first["train_steps"]) / span * 3600),
    }
    waits = [r["learner_wait_fraction"] for r in trained[1:] if "learner_wait_fraction" in r]
    if waits:
        result["learner_wait_fraction"] = round(sum(waits) / len(waits), 3)
    # Where the CPU time goes: the cores each role kept busy, averaged over the rows.
    cores = {role: [r[f"cores_{role}"] for r in trained[1:] if f"cores_{role}" in r]
             for role in ROLES}
    if all(cores.values()):
        result["cores_by_role"] = {role: round(sum(v) / len(v), 2) for role, v in cores.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--serial", action="store_true", help="measure --serial instead")
    parser.add_argument("--only", choices=sorted(RUNS), default=None)
    parser.add_argument("--atari-set", nargs="*", default=ATARI_CPU,
                        help="overrides for the Atari-shaped run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every run")
    args = parser.parse_args()
    for name, run_args in RUNS.items():
        if args.only and name != args.only:
            continue
        extra = ["--serial"] if args.serial else []
        for item in args.overrides:
            extra += ["--set", item]
        if name == "atari":
            for item in args.atari_set:
                extra += ["--set", item]
        with tempfile.TemporaryDirectory() as tmp:
            result = run_for(run_args + extra, args.seconds, Path(tmp) / "run")
        print(json.dumps({"config": name, "mode": "serial" if args.serial else "pipeline",
                          "overrides": args.overrides, **result}), flush=True)


if __name__ == "__main__":
    main()
