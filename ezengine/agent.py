"""A trained agent loaded from a run directory or checkpoint: the public API for scripts.

    from ezengine.agent import Agent, latest_run

    agent = Agent.load(latest_run())           # runs/<newest>/checkpoints/latest.pt
    record = agent.evaluate(episodes=32, seed=0)
    print(record["mean_return"], record["hns"])

The agent acts like the evaluation policy: search without root noise, most visited
action. ``checkpoints/latest.pt`` holds the final model ("final"); a ``best.pt`` beside it
(label "best") is only loaded when asked for by name, so the two are never mixed up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ezengine.checkpoint import load_checkpoint
from ezengine.config import Config, config_from_dict
from ezengine.device import configure_torch_for, resolve_device
from ezengine.envs import describe_env
from ezengine.evaluate import evaluate
from ezengine.frames import stacked_shape
from ezengine.model import EfficientZeroNet, build_model
from ezengine.scores import human_normalized_score, is_atari100k
from ezengine.search import BatchedSearch, SearchResult, select_actions

__all__ = ["Agent", "checkpoint_path", "latest_run", "train_hint"]

def train_hint() -> str:
    """How to train a first run, with a config path that works from any folder."""
    cartpole = Path(__file__).resolve().parents[1] / "configs" / "cartpole.yaml"
    config = (str(cartpole) if cartpole.is_file()
              else "configs/cartpole.yaml (from the ezengine repository)")
    return f"train one with `ezengine train {config}` (minutes on a CPU)"


# Checkpoint file name in a run's checkpoints/ folder -> the model label in records.
_FILES = {"final": "latest.pt", "best": "best.pt"}


def checkpoint_path(target: str | Path, model: str = "final") -> Path:
    """The checkpoint file for ``target``: a run directory (its ``checkpoints/latest.pt``
    for ``model="final"``, ``checkpoints/best.pt`` for ``"best"``) or a checkpoint file."""
    if model not in _FILES:
        raise ValueError(f"model must be one of {', '.join(_FILES)}, got {model!r}")
    target = Path(target)
    if target.is_dir():
        path = target / "checkpoints" / _FILES[model]
        if not path.is_file():
            raise FileNotFoundError(
                f"no {model} checkpoint in run directory {target} (expected {path}); "
                + ("the trainer writes it at its first checkpoint interval"
                   if model == "final" else "this run has no best model"))
        return path
    if not target.exists():
        raise FileNotFoundError(f"no run directory or checkpoint file at {target}")
    return target


def _label(path: Path) -> str:
    """'final' for latest.pt, 'best' for best.pt, else the file's stem."""
    for label, name in _FILES.items():
        if path.name == name:
            return label
    return path.stem


def latest_run(runs_root: str | Path = "runs") -> Path:
    """The run directory under ``runs_root`` (at any depth) whose ``checkpoints/latest.pt``
    was written most recently. FileNotFoundError, with how to train one, if there is none."""
    root = Path(runs_root)
    found = list(root.rglob("checkpoints/latest.pt")) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no trained run under {root.resolve()} (no "
                                f"*/checkpoints/latest.pt); name one (a run directory or a "
                                f"checkpoint file), or {train_hint()}")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return newest.parent.parent


class Agent:
    """A model with its config, acting with the evaluation policy.

    Build one with :meth:`load`. Attributes: ``model`` (eval mode), ``config``,
    ``checkpoint`` (the file), ``label`` ("final", "best" or the file stem),
    ``train_steps`` and ``env_steps`` at which the checkpoint was written,
    ``observation_shape`` (one frame) and ``num_actions``.
    """

    def __init__(self, model: EfficientZeroNet, config: Config, *, checkpoint: Path,
                 label: str, train_steps: int, env_steps: int,
                 observation_shape: tuple[int, ...], seed: int = 0) -> None:
        self.model = model.eval()
        self.config = config
        self.checkpoint = checkpoint
        self.label = label
        self.train_steps = train_steps
        self.env_steps = env_steps
        self.observation_shape = observation_shape
        self.num_actions = model.num_actions
        self.device = next(model.parameters()).device
        self._search = BatchedSearch.for_config(config, self.num_actions, seed)
        self._rng = np.random.default_rng(seed)

    @classmethod
    def load(cls, path: str | Path, *, model: str = "final", device: str = "cpu",
             overrides: Sequence[str] = (), seed: int = 0) -> Agent:
        """Load a run directory (``checkpoints/latest.pt``, or ``best.pt`` with
        ``model="best"``) or a checkpoint file.

        The network is rebuilt from the config stored in the checkpoint, with
        ``overrides`` ("section.key=value", e.g. "env.eval_max_episode_steps=100") applied.
        FileNotFoundError if there is no checkpoint; ValueError, naming the file, if it is
        not an ezengine trainer checkpoint or its weights do not fit its config.
        ``device``: "cpu", "cuda" or "auto"; on CPU the process's torch then runs one
        intra-op thread, as training does (``ezengine.device.configure_torch_for``).
        """
        file = checkpoint_path(path, model)
        state = load_checkpoint(file)
        if not isinstance(state, dict) or "config" not in state or "learner" not in state:
            raise ValueError(f"{file} is not an ezengine trainer checkpoint (it needs the "
                             f"'learner' and 'config' entries SerialTrainer.checkpoint writes)")
        cfg = config_from_dict(state["config"], source=f"{file} (stored config)",
                               overrides=overrides)
        # The environment tells the frame shape and action count the network was built for.
        env = describe_env(cfg.env)
        shape, num_actions = env.frame_shape, env.num_actions
        net = build_model(cfg.model, shape, num_actions, cfg.env.frame_stack)
        try:
            net.load_state_dict(state["learner"]["model"])
        except (RuntimeError, KeyError) as exc:
            # PyTorch lists every mismatching tensor; the first few say enough.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")
            raise ValueError(
                f"{file}: the saved weights do not match the network its config describes "
                f"(model.kind={cfg.model.kind!r} for {cfg.env.id} with {num_actions} actions). "
                f"The checkpoint's stored config must be the one the model was trained with "
                f"(was the config or a model.* override changed?). PyTorch says: {detail}"
            ) from None
        where = resolve_device(device)
        configure_torch_for(where)
        net.to(where)
        return cls(net, cfg, checkpoint=file, label=_label(file),
                   train_steps=int(state["learner"].get("steps", 0)),
                   env_steps=int(state.get("env_steps", 0)), observation_shape=shape, seed=seed)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input without the batch axis: frames stacked on the first axis."""
        return stacked_shape(self.observation_shape, self.config.env.frame_stack)

    def search(self, observations: np.ndarray | torch.Tensor) -> SearchResult:
        """Search without root noise from a batch of model inputs [B, *input_shape]
        (uint8 frames for Atari, float32 vectors otherwise)."""
        obs = torch.as_tensor(observations)
        if tuple(obs.shape[1:]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"observations must have shape [B, {want}], got {list(obs.shape)}")
        return self._search.run(self.model, obs.to(self.device), add_noise=False)

    def step(self, observations: np.ndarray | torch.Tensor
             ) -> tuple[np.ndarray, SearchResult]:
        """Actions int64 [B] for model inputs [B, *input_shape] and the search behind them
        (its ``root_values`` are what the agent expects to earn from here)."""
        result = self.search(observations)
        return select_actions(result.visit_counts, 0.0, self._rng), result

    def act(self, observations: np.ndarray | torch.Tensor) -> np.ndarray:
        """int64 [B] actions for model inputs [B, *input_shape]: the most visited action of
        a noise-free search, as in evaluation."""
        return self.step(observations)[0]

    def describe(self) -> dict[str, Any]:
        """Which checkpoint this is: env id, checkpoint path, model label, steps."""
        return {"env_id": self.config.env.id, "checkpoint": str(self.checkpoint.resolve()),
                "model": self.label, "train_steps": self.train_steps,
                "env_steps": self.env_steps}

    def evaluate(self, episodes: int = 32, seed: int = 0) -> dict[str, Any]:
        """Play ``episodes`` games in parallel with the evaluation settings (raw score,
        ``env.eval_max_episode_steps`` cap, no noise) and return the record that
        ``ezengine eval`` writes: :meth:`describe`, the settings, per-episode returns and
        lengths, mean/std, and ``hns`` (mean human-normalised score; None outside the
        Atari 100k games)."""
        result = evaluate(self.model, self.config, episodes, seed)
        env_id = self.config.env.id
        hns = (human_normalized_score(env_id, result.mean)
               if self.config.env.kind == "atari" and is_atari100k(env_id) else None)
        return {**self.describe(), "seed": seed,
                "num_simulations": self.config.search.num_simulations,
                "max_episode_steps": self.config.env.eval_max_episode_steps,
                **result.record(), "hns": hns}
