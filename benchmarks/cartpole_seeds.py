"""CartPole learning over seeds and machine conditions: runs the real `ezengine train`
one run at a time, scores each run with `ezengine eval --episodes 20`, and appends one JSON
line per run to the output file (so a long study can be stopped and continued).

    python benchmarks/cartpole_seeds.py --out docs/cartpole_seeds.jsonl \
        [--seeds 0 1 2 3 4] [--modes pipeline one-core neighbour serial] [--set KEY=VALUE ...]
        [--keep RUNS_DIR] [--cpu N]

Modes: `pipeline` (the default run, alone on the machine), `one-core` (the pipeline confined
to one CPU with `taskset -c N`), `neighbour` (the pipeline beside a process that keeps one
core busy), `serial` (`--serial` pinned to CPU N). N is `--cpu` (1 by default). With
`--beside TEXT` the neighbour is a CPU-heavy process already running (TEXT names it, in the
row), not a busy loop. A run's result does not depend on timing (the timetable,
docs/architecture.md), so two serial or one-core runs may share the machine, one per CPU;
only their times then say nothing. A run already in the output file (same seed, mode and
overrides) is skipped. Each row records the commit it ran with and the run's CPU seconds
(`cpu_s`: a cost that runs sharing the machine stretch far less than its wall clock); rows
carried over from an earlier study with `"timed_at": COMMIT` have their times marked in the
table. `--table` prints the file as a Markdown table instead (`--by-seed`: one line per
seed, the modes side by side).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EZ = [sys.executable, "-c", "from ezengine.cli import main; main()"]
MODES = ("pipeline", "one-core", "neighbour", "serial")
BUSY_LOOP = "while True: pass"


def train_command(mode: str, seed: int, run_dir: Path, overrides: list[str],
                  serial_cpu: int = 1) -> list[str]:
    cmd = [*EZ, "train", "configs/cartpole.yaml", "--seed", str(seed), "--run-dir",
           str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    if mode == "serial":
        # One process, pinned to one CPU (--cpu, 1 by default); a run's result does not
        # depend on timing, so two may run at once, one per CPU.
        cmd = ["taskset", "-c", str(serial_cpu), *cmd, "--serial"]
    if mode == "one-core":
        cmd = ["taskset", "-c", str(serial_cpu), *cmd]
    return cmd


def current_commit() -> str:
    """The checked-out commit (short hash) the runs are made with; "+" if files differ."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+" if dirty else "")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process, theirs included: a
    run's CPU cost, which the machine's load stretches far less than its wall clock."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(mode: str, seed: int, overrides: list[str], keep: Path | None,
            serial_cpu: int = 1, beside: str | None = None) -> dict:
    """Train, then score with `ezengine eval --episodes 20`; the run's own record. The run
    directory is kept under `keep` (if given) for a closer look."""
    with tempfile.TemporaryDirectory(prefix="cartpole-") as tmp:
        name = "-".join([mode, f"seed{seed}", *overrides]).replace("/", "_")
        run_dir = (keep / name) if keep else Path(tmp) / "run"
        neighbour = (subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                     if mode == "neighbour" and beside is None else None)
        try:
            t0, cpu0 = time.perf_counter(), children_cpu_s()
            proc = subprocess.run(train_command(mode, seed, run_dir, overrides, serial_cpu),
                                  cwd=ROOT, capture_output=True, text=True)
            wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        if proc.returncode != 0:
            return {"error": proc.stdout[-2000:] + proc.stderr[-2000:]}
        done = re.search(r"done in (\d+)s", proc.stdout)
        evals = read_jsonl(run_dir / "eval.jsonl")
        scored = subprocess.run([*EZ, "eval", str(run_dir), "--episodes", "20", "--seed", "7",
                                 "--out", str(run_dir / "score.json")], cwd=ROOT,
                                capture_output=True, text=True)
        score = json.loads((run_dir / "score.json").read_text()) if scored.returncode == 0 \
            else {"error": scored.stderr[-2000:]}
        first = next((e for e in evals if e["mean_return"] >= 475), None)
        return {
            "done_in_s": int(done.group(1)) if done else None,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "evals": [[e["env_steps"], round(e["mean_return"], 1)] for e in evals],
            "first_475_env_steps": first["env_steps"] if first else None,
            "final_eval": round(evals[-1]["mean_return"], 2) if evals else None,
            "eval_20": round(score.get("mean_return", float("nan")), 2),
            "eval_20_at_500": sum(r >= 500 for r in score.get("returns", [])),
        }


def table(rows: list[dict]) -> str:
    lines = ["| mode | seed | evaluations (env steps: mean return) | final | `eval --episodes 20` "
             "| first >= 475 | done in |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["overrides"], r["seed"])):
        mode = " ".join([r["mode"], *(f"`{o}`" for o in r["overrides"])])
        if "error" in r:
            lines.append(f"| {mode} | {r['seed']} | error | | | | |")
            continue
        ev = " / ".join(f"{s // 1000}k: {v:g}" for s, v in r["evals"][:-1])
        if r.get("neighbour", "busy loop") != "busy loop":
            mode += f" ({r['neighbour']})"
        first = f"{r['first_475_env_steps']:,}" if r["first_475_env_steps"] else "never"
        lines.append(f"| {mode} | {r['seed']} | {ev} | {r['final_eval']:g} | "
                     f"**{r['eval_20']:g}** ({r['eval_20_at_500']}/20 at 500) | {first} | "
                     f"{r['done_in_s']} s |")
    return "\n".join(lines)


def table_by_seed(rows: list[dict]) -> str:
    """One line per seed: its evaluations (the same in every mode, or each mode's own where
    they differ), first >= 475, and per mode `eval --episodes 20` and the time taken."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    # Rows carried over from an earlier study keep their old times ("timed_at": the
    # commit they ran with): marked, since a time depends on the code.
    older = {r["timed_at"] for r in rows if "timed_at" in r}

    def mark(row: dict) -> str:
        return "\u2020" if "timed_at" in row else ""

    def cpu(row: dict) -> str:  # the CPU a run took: its own cost on a shared machine
        return f" ({row['cpu_s']:,.0f} CPU-s)" if "cpu_s" in row else ""

    lines = ["| seed | evaluations every 1,000 env steps (mean return) | first >= 475 | "
             + " | ".join(f"{m}: `eval --episodes 20`, done in" for m in modes) + " |",
             "|---|---|---|" + "---|" * len(modes)]
    for seed in sorted({r["seed"] for r in rows}):
        mine = {r["mode"]: r for r in rows if r["seed"] == seed and "error" not in r}
        curves = {tuple(v for _, v in r["evals"]) for r in mine.values()}
        firsts = {r["first_475_env_steps"] for r in mine.values()}
        if len(curves) == 1:
            curve = " / ".join(f"{v:g}" for v in next(iter(curves)))
        else:
            curve = "; ".join(f"{m}: " + " / ".join(f"{v:g}" for _, v in r["evals"])
                              for m, r in mine.items())
        first = " / ".join(f"{f:,}" if f else "never" for f in sorted(firsts, key=str))
        cells = [f"**{mine[m]['eval_20']:g}** ({mine[m]['eval_20_at_500']}/20), "
                 f"{mine[m]['done_in_s']} s{cpu(mine[m])}{mark(mine[m])}" if m in mine else ""
                 for m in modes]
        lines.append(f"| {seed} | {curve} | {first} | " + " | ".join(cells) + " |")
    if older:
        lines += ["", "\u2020 timed with the code of commit " + ", ".join(sorted(older))
                  + ": the same training and evaluations as the other rows of its seed, a "
                  "time taken with other code."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each run directory under this folder")
    parser.add_argument("--cpu", "--serial-cpu", dest="serial_cpu", type=int, default=1,
                        help="the CPU a serial or one-core run is pinned to")
    parser.add_argument("--beside", default=None, metavar="TEXT",
                        help="neighbour mode beside a CPU-heavy process already running "
                             "(TEXT says which) instead of a busy loop started per run")
    parser.add_argument("--table", action="store_true", help="print the file as Markdown")
    parser.add_argument("--by-seed", action="store_true",
                        help="with --table: one line per seed, the modes side by side")
    args = parser.parse_args()
    if args.table:
        rows = read_jsonl(args.out)
        print(table_by_seed(rows) if args.by_seed else table(rows))
        return
    done = {(r["mode"], r["seed"], tuple(r["overrides"])) for r in read_jsonl(args.out)}
    for mode in args.modes:
        for seed in args.seeds:
            if (mode, seed, tuple(args.overrides)) in done:
                continue
            row = {"mode": mode, "seed": seed, "overrides": args.overrides,
                   "commit": current_commit(),
                   "load_before": Path("/proc/loadavg").read_text().split()[0],
                   **({"neighbour": args.beside or "busy loop"} if mode == "neighbour"
                      else {}),
                   **one_run(mode, seed, args.overrides, args.keep, args.serial_cpu,
                             args.beside)}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
