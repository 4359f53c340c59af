"""Watch an agent play: a window when a display is available, else a video file.

Frames shown or recorded are the game as a person sees it, with a strip above it giving
the score, the agent step and the search's root value:

- Atari: the raw 210x160 ALE screen (``ale.getScreenRGB()``), scaled up 3x.
- Other gymnasium tasks: ``env.render()`` of an env made with ``render_mode="rgb_array"``
  (CartPole through pygame, MinAtar's 10x10 boards upscaled); where that cannot render, the
  observation itself: an image observation with one colour per channel, a vector as bars.

Videos are MP4 (MPEG-4, written frame by frame through OpenCV's bundled FFmpeg) or, when
that writer cannot open or the path ends in .gif, GIF through imageio/Pillow (kept in
memory, so long episodes are cut at :data:`GIF_MAX_FRAMES`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ezengine.agent import Agent
from ezengine.envs import make_env
from ezengine.frames import FrameStacks

__all__ = ["GIF_MAX_FRAMES", "EpisodeResult", "VideoWriter", "Window", "display_available",
           "play"]

GIF_MAX_FRAMES = 3000
_HEADER = 40  # pixels of the text strip above the frame
_MIN_WIDTH = 480  # frames are scaled up (nearest) to at least this width


def display_available() -> bool:
    """Whether a window can be shown: a display is set and OpenCV has a GUI backend
    (opencv-python-headless has none)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        cv2.namedWindow("ezengine")
        cv2.destroyWindow("ezengine")
    except cv2.error:
        return False
    return True


class Window:
    """Shows RGB frames in an OpenCV window at about ``fps`` frames per second."""

    def __init__(self, title: str, fps: float) -> None:
        self.title = title
        self.delay_ms = max(1, int(1000 / fps))

    def write(self, frame: np.ndarray) -> None:
        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        cv2.waitKey(self.delay_ms)

    def close(self) -> None:
        cv2.destroyWindow(self.title)


class VideoWriter:
    """Writes RGB uint8 frames [H, W, 3] (all the same size) to ``path``.

    MP4 streams to disk; if OpenCV cannot open an MP4 writer the video becomes a GIF with
    the same stem. ``path`` after :meth:`close` is the file actually written.
    """

    def __init__(self, path: str | Path, fps: float,
                 echo: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.fps = fps
        self.echo = echo
        self._mp4: cv2.VideoWriter | None = None
        self._gif: list[np.ndarray] | None = None
        if self.path.suffix.lower() == ".gif":
            self._gif = []

    def _open(self, frame: np.ndarray) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        h, w = frame.shape[:2]
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                 (w, h))
        if writer.isOpened():
            self._mp4 = writer
            return
        self.path = self.path.with_suffix(".gif")
        self.echo(f"OpenCV cannot write MP4 here; writing a GIF instead ({self.path})")
        self._gif = []

    def write(self, frame: np.ndarray) -> None:
        if self._mp4 is None and self._gif is None:
            self._open(frame)
        if self._mp4 is not None:
            self._mp4.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        elif self._gif is not None:
            if len(self._gif) == GIF_MAX_FRAMES:
                self.echo(f"GIF cut at {GIF_MAX_FRAMES} frames (use an .mp4 path for more)")
            if len(self._gif) <= GIF_MAX_FRAMES:
                self._gif.append(frame)

    def close(self) -> Path:
        """Finish the file; returns its path."""
        if self._mp4 is not None:
            self._mp4.release()
        elif self._gif:
            import imageio.v3 as iio  # only the GIF fallback needs it

            self.path.parent.mkdir(parents=True, exist_ok=True)
            frames = self._gif[:GIF_MAX_FRAMES]
            iio.imwrite(self.path, np.stack(frames), duration=1000 / self.fps, loop=0)
        return self.path


# ---------------------------------------------------------------------------------------
# Frames


def _upscale(frame: np.ndarray) -> np.ndarray:
    factor = max(1, -(-_MIN_WIDTH // frame.shape[1]))
    if factor == 1:
        return frame
    return cv2.resize(frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)


def _with_header(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame scaled up under a black strip holding ``text``."""
    frame = _upscale(np.ascontiguousarray(frame[..., :3], dtype=np.uint8))
    out = np.zeros((frame.shape[0] + _HEADER, frame.shape[1], 3), dtype=np.uint8)
    out[_HEADER:] = frame
    cv2.putText(out, text, (8, 27), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def _vector_panel(obs: np.ndarray, size: tuple[int, int] = (240, 480)) -> np.ndarray:
    """A picture of an observation vector: one bar per entry, centred at zero, scaled by
    the largest magnitude (for tasks that cannot render themselves)."""
    h, w = size
    panel = np.full((h, w, 3), 32, dtype=np.uint8)
    values = np.asarray(obs, dtype=np.float64).ravel()
    scale = max(float(np.abs(values).max(initial=0.0)), 1e-6)
    row = h / max(len(values), 1)
    mid = w // 2
    cv2.line(panel, (mid, 0), (mid, h), (128, 128, 128), 1)
    for i, v in enumerate(values):
        y0, y1 = int(i * row + 0.2 * row), int((i + 1) * row - 0.2 * row)
        x = int(mid + (w // 2 - 10) * v / scale)
        cv2.rectangle(panel, (min(mid, x), y0), (max(mid, x), y1), (90, 170, 250), -1)
        cv2.putText(panel, f"obs[{i}] {v:+.3f}", (8, y1), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def _image_panel(obs: np.ndarray) -> np.ndarray:
    """A picture of a CHW image observation: RGB as it is, other channel counts with one
    colour per channel (the brightest channel wins where several are on)."""
    frame = np.asarray(obs, dtype=np.float32)
    frame = frame / 255.0 if obs.dtype == np.uint8 else frame
    if frame.shape[0] == 3:
        return (np.clip(frame.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    hues = np.linspace(0, 179, frame.shape[0], endpoint=False).astype(np.uint8)
    palette = cv2.cvtColor(np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 255)],
                                    axis=-1)[None], cv2.COLOR_HSV2RGB)[0]
    strongest = frame.argmax(axis=0)
    lit = frame.max(axis=0, keepdims=True).transpose(1, 2, 0)
    return (palette[strongest] * np.clip(lit, 0, 1)).astype(np.uint8)


class _Game:
    """One evaluation-settings environment plus a way to picture its current state."""

    def __init__(self, agent: Agent, seed: int) -> None:
        cfg = agent.config.env
        self.atari = cfg.kind == "atari"
        self.env = make_env(cfg, seed=seed, train=False,
                            render_mode=None if self.atari else "rgb_array")
        self.seed = seed
        self._can_render = not self.atari

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self.seed)
        return self._obs(obs)

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return self._obs(obs), float(reward), bool(terminated or truncated)

    def _obs(self, obs: Any) -> np.ndarray:
        return np.asarray(obs)

    def picture(self, obs: np.ndarray) -> np.ndarray:
        """RGB uint8 [H, W, 3] of the current state."""
        if self.atari:
            return self.env.unwrapped.ale.getScreenRGB()
        if self._can_render:
            try:
                frame = self.env.render()
                if isinstance(frame, np.ndarray) and frame.ndim == 3:
                    if frame.dtype != np.uint8:  # MinAtar: float RGB in [0, 1]
                        frame = (np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
                    return frame
            except Exception:  # e.g. gymnasium's DependencyNotInstalled (no pygame)
                pass
            self._can_render = False
        return _image_panel(obs) if obs.ndim == 3 else _vector_panel(obs)

    def close(self) -> None:
        self.env.close()


def _show(sinks: tuple[VideoWriter | Window, ...], game: _Game, obs: np.ndarray,
          text: str) -> None:
    if sinks:  # drawing costs more than the search on small tasks: only when watched
        frame = _with_header(game.picture(obs), text)
        for sink in sinks:
            sink.write(frame)


@dataclass
class EpisodeResult:
    """Raw score and length (agent steps) of one played episode."""

    score: float
    length: int


def play(agent: Agent, *, episodes: int = 1, seed: int = 0, max_steps: int | None = None,
         sinks: tuple[VideoWriter | Window, ...] = (),
         echo: Callable[[str], None] = print, log_every: int = 250) -> list[EpisodeResult]:
    """Play ``episodes`` games one after another (episode ``i`` seeded ``seed + i``) with
    the evaluation policy, sending annotated frames to ``sinks``.

    An episode ends when the game does, at the config's evaluation cap
    (``env.eval_max_episode_steps``) or at ``max_steps``, whichever is first. Every
    ``log_every`` steps and at each episode end a line goes to ``echo``.
    """
    cap = agent.config.env.eval_max_episode_steps or None
    if max_steps is not None:
        cap = max_steps if cap is None else min(cap, max_steps)
    results = []
    for episode in range(episodes):
        game = _Game(agent, seed + episode)
        obs = game.reset()
        stacks = FrameStacks(obs[None], agent.config.env.frame_stack)
        score, steps, done = 0.0, 0, False
        while not done:
            actions, result = agent.step(stacks.model_input())
            value = float(result.root_values[0])
            _show(sinks, game, obs,
                  f"ep {episode + 1}  step {steps}  score {score:g}  root value {value:.2f}")
            obs, reward, done = game.step(int(actions[0]))
            score += reward
            steps += 1
            done = done or (cap is not None and steps >= cap)
            stacks.advance(obs[None], np.array([False]))
            if log_every and steps % log_every == 0:
                echo(f"episode {episode + 1} step {steps}: score {score:g}, "
                     f"root value {value:.2f}")
        _show(sinks, game, obs, f"ep {episode + 1}  step {steps}  score {score:g}  "
              "(end)")
        game.close()
        echo(f"episode {episode + 1}: score {score:g} in {steps} steps")
        results.append(EpisodeResult(score, steps))
    return results
