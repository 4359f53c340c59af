"""The `ezengine` command line."""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ezengine.config import ConfigError, load_config

if TYPE_CHECKING:
    from ezengine.agent import Agent
    from ezengine.config import Config
    from ezengine.play import VideoWriter, Window


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ezengine")
def main() -> None:
    """ezengine trains EfficientZero agents (MuZero Reanalyse with a self-supervised
    consistency loss, value prefix and off-policy correction) on Atari and gymnasium
    environments, and plays and evaluates them.

    \b
    Examples:
      ezengine train configs/cartpole.yaml            # minutes on a CPU
      ezengine eval runs/cartpole-20261201-120000 --episodes 20
      ezengine play --render                          # the most recent run
      ezengine train --help                           # each command's options
    """


def _echo_flush(message: str) -> None:
    """Print a progress line at once, also when stdout is a file or a pipe."""
    click.echo(message)
    sys.stdout.flush()


def _default_run_dir(config_path: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config_path.stem}-{stamp}"


@main.command()
@click.argument("config", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value (repeatable), e.g. --set learner.lr=0.1.")
@click.option("--env-steps", type=click.IntRange(min=1), default=None,
              help="Environment-step budget (run.env_steps).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where the model runs (run.device); auto picks CUDA when present.")
@click.option("--seed", type=int, default=None, help="Random seed (run.seed).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write config, checkpoints and metrics "
                   "[default: runs/<config>-<timestamp>].")
@click.option("--resume", "resume_dir", default=None,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Continue the run in this directory (its config, latest checkpoint and "
                   "replay logs); CONFIG is then not needed.")
@click.option("--collectors", type=click.IntRange(min=1), default=None,
              help="Collector processes or actors (run.collectors) [default: 1].")
@click.option("--serial", is_flag=True,
              help="Run collection, reanalyse and learning in one process (debugging, "
                   "profiling).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default=None,
              help="How the roles run (run.backend): local processes, or Ray actors "
                   "[default: local].")
@click.option("--address", default=None,
              help="With --backend ray: the Ray cluster to join (run.ray_address), e.g. "
                   "'auto'; without it a local Ray instance is started.")
def train(config: Path | None, overrides: tuple[str, ...], env_steps: int | None,
          device: str | None, seed: int | None, run_dir: Path | None, resume_dir: Path | None,
          collectors: int | None, serial: bool, backend: str | None, address: str | None) -> None:
    """Train an agent from a YAML CONFIG (for example configs/cartpole.yaml).

    By default collectors, a replay + reanalyse worker, the learner and an evaluator run as
    separate processes exchanging data through shared memory; Ctrl-C stops them all after a
    final checkpoint, and `--resume RUN_DIR` continues from there.

    \b
    Examples:
      ezengine train configs/cartpole.yaml --seed 3
      ezengine train configs/ms_pacman.yaml --run-dir runs/pacman-s0 --device cuda
      ezengine train configs/cartpole.yaml --set learner.lr=0.001 --env-steps 20000
      ezengine train --resume runs/pacman-s0
      ezengine train configs/cartpole.yaml --backend ray            # Ray actors, local instance
      ezengine train configs/ms_pacman.yaml --backend ray --address auto   # a Ray cluster
    """
    extra = list(overrides)
    if env_steps is not None:
        extra.append(f"run.env_steps={env_steps}")
    if device is not None:
        extra.append(f"run.device={device}")
    if seed is not None:
        extra.append(f"run.seed={seed}")
    if collectors is not None:
        extra.append(f"run.collectors={collectors}")
    if backend is not None:
        extra.append(f"run.backend={backend}")
    if address is not None:
        extra.append(f"run.ray_address={address}")
    if resume_dir is not None:
        if config is not None or run_dir is not None:
            raise click.UsageError("--resume takes the config and run dir from RUN_DIR; "
                                   "do not pass CONFIG or --run-dir with it")
        if serial:
            raise click.UsageError("--resume works in multiprocessing mode, not with --serial")
        config, run_dir = resume_dir / "config.yaml", resume_dir
        if not config.is_file():
            raise click.UsageError(f"{resume_dir} is not a run directory: no config.yaml")
    elif config is None:
        raise click.UsageError("give a CONFIG file (for example configs/cartpole.yaml) or "
                               "--resume RUN_DIR")
    try:
        cfg = load_config(config, extra)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if address is not None and cfg.run.backend != "ray":
        raise click.UsageError("--address joins a Ray cluster: add --backend ray")
    if serial and cfg.run.backend == "ray":
        raise click.UsageError("--serial runs every role in this process: leave out "
                               "--backend ray (or set run.backend: local)")
    run_dir = run_dir or _default_run_dir(config)
    # torch and the trainers are imported here, not at the top: --help stays fast.
    from ezengine.atomic import DiskFullError
    from ezengine.rundir import RunDirError

    _check_runnable(cfg, config)
    try:
        if serial:
            from ezengine.trainer import SerialTrainer

            SerialTrainer(cfg, run_dir, echo=_echo_flush,
                          num_collectors=cfg.run.collectors).run()
            return
        from ezengine.pipeline import PipelineTrainer

        trainer = PipelineTrainer
        if cfg.run.backend == "ray":
            from ezengine.pipeline.ray_backend import RayTrainer

            trainer = RayTrainer
        code = trainer(cfg, run_dir, echo=_echo_flush, resume=resume_dir is not None,
                       num_collectors=cfg.run.collectors).run()
    except (RunDirError, DiskFullError) as exc:
        raise click.ClickException(str(exc)) from None
    if code != 0:
        raise SystemExit(code)


def _check_runnable(cfg: Config, source: Path) -> None:
    """One clear line, before anything is created, when the run cannot start: the device
    is not there or the environment cannot be made."""
    from ezengine.device import resolve_device
    from ezengine.envs import describe_env
    from ezengine.model import build_model

    try:
        resolve_device(cfg.run.device)
        if cfg.run.backend == "ray":
            from ezengine.pipeline.ray_backend import import_ray

            import_ray()
        env = describe_env(cfg.env)
        build_model(cfg.model, env.frame_shape, env.num_actions, cfg.env.frame_stack)
    except ValueError as exc:
        raise click.ClickException(f"{source}: {exc}") from None


@main.command("config", short_help="Show a resolved config with every field's help.")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value (repeatable), as for `train`.")
def config_command(config: Path, overrides: tuple[str, ...]) -> None:
    """Print CONFIG as `train` would run it: every field with its help, its value, where
    the value came from (file, a file it extends, --set, or the default) and the default
    where the value differs. The output is YAML that loads back as the same config.

    \b
    Examples:
      ezengine config configs/cartpole.yaml
      ezengine config configs/ms_pacman.yaml --set learner.lr=0.1 | less
      ezengine config runs/cartpole-s0/config.yaml
    """
    from ezengine.config import explain_config, resolve_config

    try:
        cfg, origins = resolve_config(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"# {config}" + (f" with --set {' '.join(overrides)}" if overrides else ""))
    click.echo(explain_config(cfg, origins), nl=False)


# ---------------------------------------------------------------------------------------
# Evaluating, watching and plotting trained agents. Heavy imports (torch, the agent) are
# deferred into the commands so `--help` stays fast.


def _load_agent(target: Path, model: str, device: str, overrides: list[str]) -> Agent:
    """Agent.load with its errors turned into one-line CLI errors."""
    from ezengine.agent import Agent

    try:
        return Agent.load(target, model=model, device=device, overrides=overrides)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        raise click.ClickException(str(exc)) from exc


_MODEL_HELP = ("Which model of a run directory: 'final' (checkpoints/latest.pt) or 'best' "
               "(checkpoints/best.pt, when the run has one).")


@main.command("eval", short_help="Evaluate a checkpoint, or summarise a suite of runs.")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--suite", type=click.Choice(["atari100k", "minatar"]), default=None,
              help="Report a whole suite instead: TARGET is a runs root; every run's final "
                   "evaluation (last row of its eval.jsonl) is averaged over seeds per game "
                   "and compared with the published figures (Atari 100k: the paper's "
                   "EfficientZero; MinAtar: DQN at 5M frames). Plays no games.")
@click.option("--episodes", type=click.IntRange(min=1), default=32, show_default=True,
              help="Evaluation episodes, played in parallel.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the environments (episode i uses seed + i).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON record here.")
@click.option("--out-prefix", type=click.Path(path_type=Path), default=None,
              help="With --suite: write PREFIX.csv and PREFIX.md "
                   "[default: TARGET/SUITE-suite].")
@click.option("--model", "which", type=click.Choice(["final", "best"]), default="final",
              show_default=True, help=_MODEL_HELP)
@click.option("--max-episode-steps", type=click.IntRange(min=0), default=None,
              help="Evaluation cap in agent steps (env.eval_max_episode_steps; 0 = none), "
                   "e.g. for quick smoke tests.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a value of the checkpoint's config, e.g. "
                   "--set search.num_simulations=100.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the model runs.")
def evaluate_command(target: Path, suite: str | None, episodes: int, seed: int,
                     out: Path | None, out_prefix: Path | None, which: str,
                     max_episode_steps: int | None, overrides: tuple[str, ...],
                     device: str) -> None:
    """Evaluate the checkpoint of TARGET (a run directory or a checkpoint file) with the
    evaluation settings (raw score, no noise, most visited action, evaluation cap), or
    with --suite summarise every run under TARGET.

    \b
    Examples:
      ezengine eval runs/cartpole-s0 --episodes 20 --seed 7
      ezengine eval runs/cartpole-s0/checkpoints/latest.pt --out score.json
      ezengine eval runs/ --suite atari100k
      ezengine eval runs/minatar --suite minatar
    """
    if suite is not None:
        if out is not None:
            raise click.UsageError("--out is for one checkpoint; --suite writes --out-prefix")
        _suite_report(suite, target, out_prefix or target / f"{suite}-suite")
        return
    if out_prefix is not None:
        raise click.UsageError("--out-prefix only applies with --suite")
    extra = list(overrides)
    if max_episode_steps is not None:
        extra.append(f"env.eval_max_episode_steps={max_episode_steps}")
    agent = _load_agent(target, which, device, extra)
    record = agent.evaluate(episodes, seed)
    if out is not None:
        import json

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    hns = "" if record["hns"] is None else f", HNS {record['hns']:.3f}"
    where = f" -> {out}" if out is not None else ""
    click.echo(f"{record['env_id']} {record['model']} model ({record['train_steps']:,} "
               f"training steps, {record['env_steps']:,} env steps): mean return "
               f"{record['mean_return']:.1f} +- {record['std_return']:.1f} over "
               f"{record['episodes']} episodes{hns}{where}")


def _suite_report(suite: str, root: Path, prefix: Path) -> None:
    """Write the --suite table of the runs under `root` and echo its summary."""
    from ezengine import scores

    build, write = {"atari100k": (scores.suite_report, scores.write_suite_report),
                    "minatar": (scores.minatar_report, scores.write_minatar_report)}[suite]
    try:
        report = build(root)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    for run, why in report.skipped:
        click.echo(f"skipped {run}: {why}", err=True)
    for r in report.incomplete:
        click.echo(f"warning: {r.run_dir} stopped at {r.env_steps:,} of "
                   f"{r.env_step_budget:,} env steps; using its latest evaluation", err=True)
    csv_path, md_path = write(report, prefix)
    agg = report.aggregate
    if suite == "minatar":
        summary = f"{agg['beats_dqn']} beat DQN's 5M-frame return"
    else:
        summary = (f"mean HNS {agg['mean_hns']:.3f} (paper {agg['paper_mean_hns']:.3f}), "
                   f"median {agg['median_hns']:.3f} (paper {agg['paper_median_hns']:.3f}), "
                   f"{agg['games_above_human']} at or above human (paper "
                   f"{agg['paper_games_above_human']})")
    click.echo(f"{agg['games']} games, {sum(map(len, report.runs.values()))} runs: "
               f"{summary} -> {csv_path}, {md_path}")


@main.command(short_help="Watch a trained agent play (window or video).")
@click.argument("target", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--runs-root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs"), show_default=True,
              help="Where to look for the most recent run.")
@click.option("--model", "which", type=click.Choice(["final", "best"]), default="final",
              show_default=True, help=_MODEL_HELP)
@click.option("--render", is_flag=True,
              help="Show the game in a window; without a display (or with a headless "
                   "OpenCV) write a video instead and print its path.")
@click.option("--video", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also record the games to this .mp4 (or .gif) file.")
@click.option("--episodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Episodes to play, one after another.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the first episode (episode i uses seed + i).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop each episode after this many agent steps.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the model runs.")
def play(target: Path | None, runs_root: Path, which: str, render: bool, video: Path | None,
         episodes: int, seed: int, max_steps: int | None, device: str) -> None:
    """Watch the agent of TARGET (a run directory or a checkpoint file, as for `eval`;
    default: the most recent run under --runs-root) play with the evaluation policy; the
    frames show score, step and the search's root value.

    \b
    Examples:
      ezengine play --render
      ezengine play runs/cartpole-s0 --episodes 3 --video cartpole.mp4
    """
    from ezengine.agent import latest_run
    from ezengine.play import VideoWriter, Window, display_available
    from ezengine.play import play as play_games

    if target is None:
        try:
            target = latest_run(runs_root)
        except FileNotFoundError as exc:
            raise click.ClickException(str(exc)) from exc
    agent = _load_agent(target, which, device, [])
    click.echo(f"{agent.config.env.id}: {agent.label} model of {agent.checkpoint} "
               f"({agent.train_steps:,} training steps, {agent.env_steps:,} env steps)")
    fps = 15.0 if agent.config.env.kind == "atari" else 30.0  # Atari: 60 Hz / 4-frame steps
    sinks: list[VideoWriter | Window] = []
    if render and display_available():
        sinks.append(Window(f"ezengine: {agent.config.env.id}", fps))
    elif render and video is None:
        ckpt = agent.checkpoint.resolve()
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        video = run_dir / "videos" / f"play-{agent.label}-seed{seed}.mp4"
        click.echo("no display available: recording a video instead")
    if video is not None:
        sinks.append(VideoWriter(video, fps, echo=_echo_flush))
    results = play_games(agent, episodes=episodes, seed=seed, max_steps=max_steps,
                         sinks=tuple(sinks), echo=_echo_flush)
    for sink in sinks:
        path = sink.close()
        if path is not None:
            click.echo(f"video: {path}")
    if len(results) > 1:
        scores = [r.score for r in results]
        click.echo(f"mean score {sum(scores) / len(scores):g} over {len(scores)} episodes")


@main.command(short_help="Plot learning curves of runs to a PNG.")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("curve.png"), show_default=True, help="PNG file to write.")
def plot(target: Path, out: Path) -> None:
    """Plot learning curves (evaluation mean return vs environment steps) of the run
    TARGET or of every run under it, one line per run, with the paper's EfficientZero
    score as a reference on Atari 100k games.

    \b
    Examples:
      ezengine plot runs/cartpole-s0
      ezengine plot runs/ --out all-runs.png
    """
    from ezengine.plot import plot_learning_curves

    try:
        path = plot_learning_curves(target, out)
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"learning curves: {path}")
