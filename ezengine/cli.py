"""The `ezengine` command line."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import click

from ezengine.config import ConfigError, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ezengine")
def main() -> None:
    """ezengine trains EfficientZero agents (MuZero Reanalyse with a self-supervised
    consistency loss, value prefix and off-policy correction) on Atari and gymnasium
    environments, and plays and evaluates them."""


def _default_run_dir(config_path: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config_path.stem}-{stamp}"


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
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
@click.option("--serial", is_flag=True,
              help="Run collection, reanalyse and learning in one process (debugging, "
                   "profiling).")
def train(config: Path, overrides: tuple[str, ...], env_steps: int | None, device: str | None,
          seed: int | None, run_dir: Path | None, serial: bool) -> None:
    """Train an agent from a YAML CONFIG (for example configs/cartpole.yaml)."""
    extra = list(overrides)
    if env_steps is not None:
        extra.append(f"run.env_steps={env_steps}")
    if device is not None:
        extra.append(f"run.device={device}")
    if seed is not None:
        extra.append(f"run.seed={seed}")
    try:
        cfg = load_config(config, extra)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if not serial:
        click.echo("the multiprocessing pipeline is not built yet; running --serial", err=True)
    from ezengine.trainer import SerialTrainer  # torch import deferred: fast --help

    SerialTrainer(cfg, run_dir or _default_run_dir(config), echo=click.echo).run()
