"""Environments: the paper's Atari preprocessing, plain gymnasium tasks, and a vector env.

Every env made here returns SINGLE observations (frame stacking happens elsewhere), raw
rewards (see :func:`clip_reward`), and ``info["game_over"]`` on every step: True when the
game is finished and the next ``reset()`` starts a new one, i.e. the game really ended
(terminated without episodic life, or the last life lost) or a step cap cut it off
(truncated). A life loss under episodic life is ``terminated=True`` with
``game_over=False``.

Atari wrapper order (inner to outer):
raw ALE (frameskip 1, no sticky actions) -> :class:`NoopReset` -> :class:`MaxAndSkip` ->
:class:`ResizeObservation` -> :class:`StepCap` -> :class:`EpisodicLife` (training only).
The cap sits below episodic life so it counts agent steps over the whole game, not per
life, and a capped game always ends with a true reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, SupportsFloat

import cv2
import gymnasium
import numpy as np
from gymnasium import spaces

from ezengine.config import EnvConfig

__all__ = [
    "EpisodicLife",
    "GameOverInfo",
    "MaxAndSkip",
    "NoopReset",
    "ResizeObservation",
    "StepCap",
    "VectorEnv",
    "VectorStep",
    "clip_reward",
    "make_env",
]

_StepResult = tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]


def clip_reward(r: np.ndarray | float) -> np.ndarray:
    """Sign-clip rewards to {-1, 0, 1} for training targets; float32, same shape as ``r``."""
    return np.sign(np.asarray(r, dtype=np.float32))


# ---------------------------------------------------------------------------------------
# Atari wrappers


class NoopReset(gymnasium.Wrapper):
    """On every (true) reset, take 1..noop_max no-op raw frames, the count drawn from a
    generator seeded with ``seed`` (re-seeded by ``reset(seed=...)``).

    Randomising the start state is what keeps a deterministic emulator from replaying one
    trajectory. ``last_noops`` holds the count used by the latest reset.
    """

    def __init__(self, env: gymnasium.Env, noop_max: int, seed: int) -> None:
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()
        assert meanings[0] == "NOOP", f"action 0 must be NOOP, got {meanings[0]!r}"
        self.noop_max = noop_max
        self.last_noops = 0
        self._rng = np.random.default_rng(seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        while True:
            n = int(self._rng.integers(1, self.noop_max + 1)) if self.noop_max > 0 else 0
            self.last_noops = n
            for _ in range(n):
                obs, _, terminated, truncated, info = self.env.step(0)
                if terminated or truncated:
                    break
            else:
                return obs, info
            # The game ended during the no-ops (only possible in odd games): start over.
            obs, info = self.env.reset(options=options)


class MaxAndSkip(gymnasium.Wrapper):
    """Repeat an action for ``skip`` raw frames, summing rewards; the observation is the
    pixel-wise max of the last two raw frames of the step (Atari sprites flicker between
    frames). Stops early when the episode ends inside the skip; if that happens on the
    first frame, that single frame is the observation.

    ``last_frames`` holds the raw frames [n, H, W, 3] uint8 of the latest step (n <= skip),
    so tests can check the pooling.
    """

    def __init__(self, env: gymnasium.Env, skip: int) -> None:
        super().__init__(env)
        self.skip = skip
        self.last_frames: list[np.ndarray] = []

    def step(self, action: Any) -> _StepResult:
        total = 0.0
        frames: list[np.ndarray] = []
        terminated = truncated = False
        info: dict[str, Any] = {}
        for _ in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            frames.append(obs)
            if terminated or truncated:
                break
        self.last_frames = frames
        pooled = frames[-1] if len(frames) == 1 else np.maximum(frames[-2], frames[-1])
        return pooled, total, terminated, truncated, info


class ResizeObservation(gymnasium.ObservationWrapper):
    """Resize HWC RGB frames to size x size with cv2.INTER_AREA and return CHW uint8
    [3, size, size] (channels-first, as the network wants)."""

    def __init__(self, env: gymnasium.Env, size: int) -> None:
        super().__init__(env)
        self.size = size
        self.observation_space = spaces.Box(0, 255, (3, size, size), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        small = cv2.resize(observation, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(small.transpose(2, 0, 1))


class StepCap(gymnasium.Wrapper):
    """Truncate (``truncated=True``, never ``terminated``) after ``max_steps`` steps since
    the last reset."""

    def __init__(self, env: gymnasium.Env, max_steps: int) -> None:
        super().__init__(env)
        self.max_steps = max_steps
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        self._steps = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> _StepResult:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        if self._steps >= self.max_steps:
            truncated = True
        return obs, reward, terminated, truncated, info


class EpisodicLife(gymnasium.Wrapper):
    """Training only: a life loss ends the episode (``terminated=True``,
    ``info["game_over"]=False``); the following ``reset()`` continues the same game with
    one no-op step instead of restarting it. Only a finished game (terminated or truncated
    by an inner wrapper) leads to a true reset. Sets ``info["game_over"]``.

    Ending episodes at life loss gives the value function a clear signal that losing a
    life is bad, without the agent losing the rest of the game's data.
    """

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        self._lives = 0
        self._game_over = True

    def _ale_lives(self) -> int:
        return int(self.env.unwrapped.ale.lives())

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        if self._game_over or seed is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:
            # The no-op step's reward is dropped, as in the usual life-loss wrapper.
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(options=options)
        self._game_over = False
        self._lives = self._ale_lives()
        info["game_over"] = False
        return obs, info

    def step(self, action: Any) -> _StepResult:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._game_over = bool(terminated or truncated)
        lives = self._ale_lives()
        if 0 < lives < self._lives:
            terminated = True
        self._lives = lives
        info["game_over"] = self._game_over
        return obs, reward, terminated, truncated, info


class GameOverInfo(gymnasium.Wrapper):
    """Sets ``info["game_over"] = terminated or truncated`` for envs without episodic life,
    where every episode end is the end of the game."""

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        obs, info = self.env.reset(seed=seed, options=options)
        info["game_over"] = False
        return obs, info

    def step(self, action: Any) -> _StepResult:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["game_over"] = bool(terminated or truncated)
        return obs, reward, terminated, truncated, info


class _Float32Observation(gymnasium.ObservationWrapper):
    """Vector observations as float32 [D]."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        box = env.observation_space
        self.observation_space = spaces.Box(
            box.low.astype(np.float32), box.high.astype(np.float32), box.shape, np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation, dtype=np.float32)


class _SeedFirstReset(gymnasium.Wrapper):
    """Seeds the env on its first ``reset()`` so ``make_env(seed=...)`` alone makes it
    reproducible; later resets continue the seeded streams unless given a new seed."""

    def __init__(self, env: gymnasium.Env, seed: int) -> None:
        super().__init__(env)
        self._pending_seed: int | None = seed

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


# ---------------------------------------------------------------------------------------
# Construction


def _make_atari(cfg: EnvConfig, seed: int, train: bool) -> gymnasium.Env:
    import ale_py  # imported here so vector-only users never load the emulator

    gymnasium.register_envs(ale_py)
    env = _gym_make(cfg.id, frameskip=1, repeat_action_probability=0.0,
                    full_action_space=False)
    env = NoopReset(env, cfg.noop_max, seed)
    env = MaxAndSkip(env, cfg.frame_skip)
    env = ResizeObservation(env, cfg.frame_size)
    cap = cfg.max_episode_steps if train else cfg.eval_max_episode_steps
    if cap > 0:
        env = StepCap(env, cap)
    return EpisodicLife(env) if (train and cfg.episodic_life) else GameOverInfo(env)


def _register_minatar() -> None:
    """MinAtar's ids (``MinAtar/Breakout-v1``, ...) exist only once the package registers
    them; gymnasium 1.x does not load its entry point by itself."""
    try:
        import minatar.gym
    except ImportError:
        raise ValueError("MinAtar environments need the minatar package: "
                         "pip install 'ezengine[minatar]'") from None
    if "MinAtar/Breakout-v1" not in gymnasium.registry:
        minatar.gym.register_envs()


def _gym_make(env_id: str, **kwargs: Any) -> gymnasium.Env:
    """gymnasium.make with an unknown or unsuitable id reported as one ValueError line."""
    if env_id.startswith("MinAtar/"):
        _register_minatar()
    try:
        return gymnasium.make(env_id, **kwargs)
    except gymnasium.error.Error as exc:
        raise ValueError(f"env.id {env_id!r}: {exc}") from None
    except TypeError as exc:  # e.g. Atari arguments given to a non-Atari environment
        raise ValueError(f"env.id {env_id!r} does not take env.kind "
                         f"{'atari' if kwargs else 'gym'}'s settings ({exc}); is env.kind "
                         f"right?") from None


def image_layout(shape: tuple[int, ...], layout: str) -> str:
    """'hwc' or 'chw' for an image observation of `shape` under env.image_layout: 'auto'
    takes gymnasium's usual HWC unless the first axis is the smallest (CHW, as (3, 84, 84))."""
    if layout != "auto":
        return layout
    return "chw" if shape[0] < min(shape[1], shape[2]) else "hwc"


class _ImageObservation(gymnasium.ObservationWrapper):
    """Image observations as one CHW frame: uint8 kept, bool as 0/255 uint8 (the model
    scales uint8 by 1/255), any other dtype as float32."""

    def __init__(self, env: gymnasium.Env, layout: str) -> None:
        super().__init__(env)
        box = env.observation_space
        self.hwc = image_layout(box.shape, layout) == "hwc"
        h_w_c = box.shape if self.hwc else (box.shape[1], box.shape[2], box.shape[0])
        shape = (h_w_c[2], h_w_c[0], h_w_c[1])
        if box.dtype == np.uint8 or box.dtype == np.bool_:
            self.dtype = np.dtype(np.uint8)
            self.observation_space = spaces.Box(0, 255, shape, np.uint8)
        else:
            self.dtype = np.dtype(np.float32)
            self.observation_space = spaces.Box(-np.inf, np.inf, shape, np.float32)
        self.scale = 255 if box.dtype == np.bool_ else 1

    def observation(self, observation: np.ndarray) -> np.ndarray:
        obs = np.asarray(observation)
        if self.hwc:
            obs = obs.transpose(2, 0, 1)
        return np.ascontiguousarray(obs * self.scale if self.scale != 1 else obs,
                                    dtype=self.dtype)


def _make_gym(cfg: EnvConfig, train: bool, render_mode: str | None) -> gymnasium.Env:
    env = _gym_make(cfg.id, **({"render_mode": render_mode} if render_mode else {}))
    act, obs = env.action_space, env.observation_space
    problem = None
    if not isinstance(act, spaces.Discrete):
        problem = f"Discrete actions, got action space {act}"
    elif not (isinstance(obs, spaces.Box) and len(obs.shape) in (1, 3)):
        problem = f"Box observations (vectors or images), got observation space {obs}"
    if problem is not None:
        env.close()
        raise ValueError(f"env {cfg.id!r}: env.kind 'gym' needs {problem}")
    env = _Float32Observation(env) if len(obs.shape) == 1 else _ImageObservation(
        env, cfg.image_layout)
    # Gymnasium's own TimeLimit (500 for CartPole-v1) stays underneath this cap.
    cap = cfg.max_episode_steps if train else cfg.eval_max_episode_steps
    if cap > 0:
        env = StepCap(env, cap)
    return GameOverInfo(env)


def make_env(cfg: EnvConfig, *, seed: int, train: bool, render_mode: str | None = None
             ) -> gymnasium.Env:
    """Make one environment with single-frame observations and raw rewards.

    - ``kind="atari"``: uint8 [3, frame_size, frame_size] observations (CHW RGB), the
      paper's preprocessing; episodic life only when ``train`` and ``cfg.episodic_life``.
    - ``kind="gym"``: float32 [D] vector observations, or image observations as one CHW
      frame (uint8 for uint8 and bool images, float32 otherwise); Discrete actions
      required.

    The step cap is ``cfg.max_episode_steps`` when ``train`` else
    ``cfg.eval_max_episode_steps`` (0 = none). The env is seeded with ``seed`` on its first
    ``reset()`` (its action space right away). ``info["game_over"]`` is set on every step.
    ``render_mode`` is passed to a 'gym' environment (``play`` asks for "rgb_array").
    """
    if cfg.kind == "atari":
        env = _make_atari(cfg, seed, train)
    elif cfg.kind == "gym":
        env = _make_gym(cfg, train, render_mode)
    else:
        raise ValueError(f"env.kind must be 'atari' or 'gym', got {cfg.kind!r}")
    env.action_space.seed(seed)
    return _SeedFirstReset(env, seed)


@dataclass(frozen=True)
class EnvDescription:
    """What a config's environments look like: one frame's shape and dtype, and |A|."""

    frame_shape: tuple[int, ...]
    frame_dtype: str
    num_actions: int


def describe_env(cfg: EnvConfig) -> EnvDescription:
    """Make one training environment of `cfg` and describe it (ValueError, one line, when
    it cannot be made)."""
    env = make_env(cfg, seed=0, train=True)
    try:
        space = env.observation_space
        return EnvDescription(tuple(space.shape), np.dtype(space.dtype).str,
                              int(env.action_space.n))
    finally:
        env.close()


# ---------------------------------------------------------------------------------------
# Vector env


@dataclass
class VectorStep:
    """Result of :meth:`VectorEnv.step` for N environments."""

    obs: np.ndarray
    """[N, *obs_shape]: next observation; for an env whose episode ended, the first
    observation of its new (auto-reset) episode."""
    final_obs: np.ndarray
    """[N, *obs_shape]: the observation the step produced, before any auto-reset (equal to
    ``obs`` where the episode did not end)."""
    reward: np.ndarray
    """float32 [N]: raw rewards."""
    terminated: np.ndarray
    """bool [N]: episode ended by the MDP (including a life loss under episodic life)."""
    truncated: np.ndarray
    """bool [N]: episode cut off by a step cap (bootstrap through it)."""
    game_over: np.ndarray
    """bool [N]: the game finished (really ended or was truncated); see the module doc."""
    completed_games: list[tuple[int, float, int]]
    """(env index, raw score, agent steps) of every game that finished at this step, summed
    over all its lives when episodic life is on."""


class VectorEnv:
    """N environments from :func:`make_env` (seeds ``seed + i``) stepped together in this
    process, with auto-reset and per-game score tracking."""

    def __init__(self, cfg: EnvConfig, *, seed: int, train: bool,
                 num_envs: int | None = None) -> None:
        """``num_envs`` defaults to ``cfg.num_envs``."""
        self.num_envs = cfg.num_envs if num_envs is None else num_envs
        if self.num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {self.num_envs}")
        self.envs = [make_env(cfg, seed=seed + i, train=train) for i in range(self.num_envs)]
        space = self.envs[0].observation_space
        self.observation_shape: tuple[int, ...] = tuple(space.shape)
        self.observation_dtype = np.dtype(space.dtype)
        self.num_actions = int(self.envs[0].action_space.n)
        # Per-game running totals, kept across life-loss episode boundaries.
        self._scores = np.zeros(self.num_envs, dtype=np.float64)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._started = False

    @property
    def description(self) -> EnvDescription:
        """What these environments look like (frame shape and dtype, |A|)."""
        return EnvDescription(self.observation_shape, self.observation_dtype.str,
                              self.num_actions)

    def reset(self) -> np.ndarray:
        """Start new games in every env; returns observations [N, *observation_shape]."""
        obs = np.stack([env.reset()[0] for env in self.envs])
        self._scores[:] = 0.0
        self._lengths[:] = 0
        self._started = True
        return obs

    def _check_actions(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"actions must be integers, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= self.num_actions:
            raise ValueError(f"actions must lie in [0, {self.num_actions}), got {a.tolist()}")
        return a

    def step(self, actions: np.ndarray) -> VectorStep:
        """Step every env with ``actions`` (int [N], each in [0, num_actions)); envs whose
        episode ended are reset automatically."""
        if not self._started:
            raise RuntimeError("VectorEnv.step() called before reset()")
        a = self._check_actions(actions)
        n = self.num_envs
        obs = np.empty((n, *self.observation_shape), dtype=self.observation_dtype)
        final_obs = np.empty_like(obs)
        reward = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        game_over = np.zeros(n, dtype=bool)
        completed: list[tuple[int, float, int]] = []
        for i, env in enumerate(self.envs):
            o, r, term, trunc, info = env.step(int(a[i]))
            reward[i] = float(r)
            terminated[i], truncated[i] = term, trunc
            game_over[i] = bool(info["game_over"])
            final_obs[i] = o
            self._scores[i] += float(r)
            self._lengths[i] += 1
            if game_over[i]:
                completed.append((i, float(self._scores[i]), int(self._lengths[i])))
                self._scores[i] = 0.0
                self._lengths[i] = 0
            if term or trunc:
                o, _ = env.reset()
            obs[i] = o
        return VectorStep(obs, final_obs, reward, terminated, truncated, game_over, completed)

    def close(self) -> None:
        """Close every env."""
        for env in self.envs:
            env.close()
