"""Environment wrappers on the real ALE and CartPole: preprocessing, episodic life, caps,
vector auto-reset."""

from __future__ import annotations

import ale_py
import cv2
import gymnasium
import numpy as np
import pytest

from ezengine.config import EnvConfig
from ezengine.envs import (
    EnvDescription,
    EpisodicLife,
    MaxAndSkip,
    NoopReset,
    VectorEnv,
    clip_reward,
    describe_env,
    image_layout,
    make_env,
)

gymnasium.register_envs(ale_py)


def _find(env: gymnasium.Env, cls: type) -> gymnasium.Env:
    """The wrapper of type ``cls`` in ``env``'s chain."""
    while not isinstance(env, cls):
        env = env.env
    return env


def _has(env: gymnasium.Env, cls: type) -> bool:
    while isinstance(env, gymnasium.Wrapper):
        if isinstance(env, cls):
            return True
        env = env.env
    return False


def _raw(game: str) -> gymnasium.Env:
    return gymnasium.make(game, frameskip=1, repeat_action_probability=0.0,
                          full_action_space=False)


def _atari(game: str = "ALE/Breakout-v5", **kw: object) -> EnvConfig:
    return EnvConfig(id=game, kind="atari", **kw)


def _cartpole(**kw: object) -> EnvConfig:
    return EnvConfig(id="CartPole-v1", kind="gym", frame_stack=1, **kw)


def test_clip_reward() -> None:
    out = clip_reward(np.array([-7.0, -0.5, 0.0, 0.2, 300.0]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-1, -1, 0, 1, 1])


@pytest.mark.parametrize("train", [True, False])
def test_atari_observation_shape_and_dtype(train: bool) -> None:
    env = make_env(_atari(), seed=0, train=train)
    obs, info = env.reset()
    assert obs.shape == (3, 96, 96) and obs.dtype == np.uint8
    assert env.observation_space.shape == (3, 96, 96)
    assert env.observation_space.dtype == np.uint8
    assert info["game_over"] is False
    obs, _, _, _, info = env.step(1)
    assert obs.shape == (3, 96, 96) and obs.dtype == np.uint8 and obs.flags.c_contiguous
    assert info["game_over"] is False
    assert _has(env, EpisodicLife) == train  # life loss matters in training only
    env.close()


def test_noops_are_random_in_range_and_seeded() -> None:
    counts = []
    for seed in range(6):
        first = make_env(_atari(), seed=seed, train=True)
        second = make_env(_atari(), seed=seed, train=True)
        obs1, _ = first.reset()
        obs2, _ = second.reset()
        n1 = _find(first, NoopReset).last_noops
        assert n1 == _find(second, NoopReset).last_noops
        np.testing.assert_array_equal(obs1, obs2)
        assert 1 <= n1 <= 30
        counts.append(n1)
        first.close()
        second.close()
    assert len(set(counts)) > 1  # the seed changes the count


def test_pipeline_matches_raw_frames() -> None:
    """Noops, frame-skip max-pooling, reward summing and resizing against a raw copy of
    the emulator driven with the same seed and actions."""
    game, seed = "ALE/MsPacman-v5", 3
    env = make_env(_atari(game), seed=seed, train=False)
    obs, _ = env.reset()
    skip = _find(env, MaxAndSkip)
    raw = _raw(game)
    frame, _ = raw.reset(seed=seed)
    for _ in range(_find(env, NoopReset).last_noops):
        frame = raw.step(0)[0]

    def small(f: np.ndarray) -> np.ndarray:
        return cv2.resize(f, (96, 96), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)

    np.testing.assert_array_equal(obs, small(frame))
    rng = np.random.default_rng(0)
    pooled_differs = False
    total_reward = 0.0
    for _ in range(150):
        action = int(rng.integers(env.action_space.n))
        obs, reward, *_ = env.step(action)
        frames, rewards = [], []
        for _ in range(4):
            f, r, *_ = raw.step(action)
            frames.append(f)
            rewards.append(r)
        assert len(skip.last_frames) == 4
        for ours, theirs in zip(skip.last_frames, frames, strict=False):
            np.testing.assert_array_equal(ours, theirs)
        expected = np.maximum(frames[-2], frames[-1])
        np.testing.assert_array_equal(obs, small(expected))
        assert reward == sum(rewards)
        total_reward += reward
        pooled_differs |= not np.array_equal(expected, frames[-1])
    assert total_reward > 0  # rewards were actually summed over something
    assert pooled_differs  # Ms. Pac-Man flickers, so pooling mattered at least once
    env.close()
    raw.close()


def test_skip_stops_when_the_game_ends() -> None:
    """The last step of a game stops inside the skip; its observation pools only the frames
    really played."""
    env = MaxAndSkip(_raw("ALE/Breakout-v5"), 4)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    while True:
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(4)))
        frames = env.last_frames
        assert 1 <= len(frames) <= 4
        if terminated or truncated:
            break
        assert len(frames) == 4
    want = frames[-1] if len(frames) == 1 else np.maximum(frames[-2], frames[-1])
    np.testing.assert_array_equal(obs, want)
    env.close()


def test_episodic_life_in_training() -> None:
    env = make_env(_atari(), seed=1, train=True)
    ale = env.unwrapped.ale
    env.reset()
    rng = np.random.default_rng(0)
    lives = [ale.lives()]
    frame_numbers = [ale.getEpisodeFrameNumber()]
    life_losses = 0
    for _ in range(3000):
        _, _, terminated, truncated, info = env.step(int(rng.integers(4)))
        assert not truncated
        if info["game_over"]:
            assert terminated and ale.lives() == 0
            break
        if terminated:
            # A life loss: the episode ends but not the game.
            life_losses += 1
            assert ale.lives() == lives[-1] - 1
            env.reset()
            # No restart: the lives and the emulator's episode clock carry on.
            assert ale.lives() == lives[-1] - 1
            assert ale.getEpisodeFrameNumber() > frame_numbers[-1]
            lives.append(ale.lives())
            frame_numbers.append(ale.getEpisodeFrameNumber())
    else:
        pytest.fail("the game did not end")
    assert life_losses == 4  # Breakout has 5 lives
    # After the game the next reset is a true one.
    env.reset()
    assert ale.lives() == 5 and ale.getEpisodeFrameNumber() < 4 * 31
    env.close()


def test_evaluation_ignores_life_loss() -> None:
    env = make_env(_atari(), seed=1, train=False)
    ale = env.unwrapped.ale
    env.reset()
    rng = np.random.default_rng(0)
    seen_lives = {ale.lives()}
    for _ in range(3000):
        _, _, terminated, truncated, info = env.step(int(rng.integers(4)))
        seen_lives.add(ale.lives())
        assert info["game_over"] == (terminated or truncated)
        if terminated:
            assert ale.lives() == 0
            break
    else:
        pytest.fail("the game did not end")
    assert seen_lives == {5, 4, 3, 2, 1, 0}
    env.close()


@pytest.mark.parametrize("train", [True, False])
def test_step_cap_truncates(train: bool) -> None:
    cap = {"max_episode_steps": 40} if train else {"eval_max_episode_steps": 40}
    env = make_env(_atari(**cap), seed=0, train=train)
    env.reset()
    # NOOP in Breakout never launches the ball, so no life is lost before the cap.
    for t in range(1, 41):
        _, _, terminated, truncated, info = env.step(0)
        assert not terminated
        assert truncated == (t == 40)
        assert info["game_over"] == (t == 40)
    env.reset()
    assert _find(env, NoopReset).last_noops >= 1  # a true reset after the cap
    env.close()


def test_atari_vector_env_scores_whole_games() -> None:
    vec = VectorEnv(_atari(), seed=5, train=True, num_envs=2)
    assert (vec.num_envs, vec.num_actions) == (2, 4)
    assert vec.observation_shape == (3, 96, 96) and vec.observation_dtype == np.uint8
    obs = vec.reset()
    assert obs.shape == (2, 3, 96, 96) and obs.dtype == np.uint8
    rng = np.random.default_rng(0)
    score = np.zeros(2)
    steps = np.zeros(2, dtype=int)
    life_losses = np.zeros(2, dtype=int)
    games = []
    while not games:
        out = vec.step(rng.integers(4, size=2))
        score += out.reward
        steps += 1
        life_losses += out.terminated & ~out.game_over
        for i in np.flatnonzero(out.game_over):
            games.append((i, score[i], steps[i]))
        assert len(out.completed_games) == int(out.game_over.sum())
        for (i, s, n), done in zip(games, out.completed_games, strict=False):
            assert done == (i, s, n)
    i = games[0][0]
    assert life_losses[i] == 4  # one game across all five lives
    vec.close()


def test_gym_kind_checks_spaces() -> None:
    with pytest.raises(ValueError, match=r"'Pendulum-v1'.*Discrete actions"):
        make_env(EnvConfig(id="Pendulum-v1", kind="gym"), seed=0, train=True)
    with pytest.raises(ValueError, match=r"'FrozenLake-v1'.*Box observations \(vectors or images"):
        make_env(EnvConfig(id="FrozenLake-v1", kind="gym"), seed=0, train=True)


def test_cartpole_observations_and_time_limit() -> None:
    env = make_env(_cartpole(), seed=0, train=True)
    obs, info = env.reset()
    assert obs.shape == (4,) and obs.dtype == np.float32 and info["game_over"] is False
    assert env.observation_space.dtype == np.float32
    # Our 3000-step cap is above gymnasium's own 500-step TimeLimit, which stays.
    assert env.spec is not None and env.spec.max_episode_steps == 500
    env.close()
    env = make_env(_cartpole(max_episode_steps=5), seed=0, train=True)
    env.reset()
    for t in range(1, 6):
        _, _, terminated, truncated, _ = env.step(t % 2)  # alternate: stays up for 5 steps
        assert not terminated and truncated == (t == 5)
    env.close()


def test_cartpole_vector_auto_reset() -> None:
    vec = VectorEnv(_cartpole(), seed=0, train=True, num_envs=3)
    assert vec.observation_shape == (4,) and vec.observation_dtype == np.float32
    assert vec.num_actions == 2
    obs = vec.reset()
    assert obs.shape == (3, 4) and obs.dtype == np.float32
    lengths = np.zeros(3, dtype=int)
    finished = 0
    for _ in range(40):
        prev = obs
        out = vec.step(np.zeros(3, dtype=np.int64))  # always push left: falls in ~10 steps
        lengths += 1
        assert out.obs.shape == out.final_obs.shape == (3, 4)
        assert out.reward.dtype == np.float32 and out.terminated.dtype == bool
        np.testing.assert_array_equal(out.reward, 1.0)
        ended = out.terminated | out.truncated
        np.testing.assert_array_equal(out.game_over, ended)
        # Not ended: obs and final_obs are the same step result.
        np.testing.assert_array_equal(out.obs[~ended], out.final_obs[~ended])
        # Ended: final_obs is the falling pole, obs a fresh start near zero.
        for i in np.flatnonzero(ended):
            assert abs(out.final_obs[i, 2]) > 0.2  # pole angle past the threshold
            assert np.all(np.abs(out.obs[i]) <= 0.05)
            assert not np.allclose(out.final_obs[i], prev[i])
        assert sorted(out.completed_games) == sorted(
            (i, float(lengths[i]), int(lengths[i])) for i in np.flatnonzero(ended))
        finished += int(ended.sum())
        lengths[ended] = 0
        obs = out.obs
    assert finished >= 6
    vec.close()


def test_vector_env_rejects_bad_actions() -> None:
    vec = VectorEnv(_cartpole(), seed=0, train=True, num_envs=2)
    with pytest.raises(RuntimeError, match="before reset"):
        vec.step(np.zeros(2, dtype=int))
    vec.reset()
    with pytest.raises(ValueError, match=r"actions must have shape \(2,\)"):
        vec.step(np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 2\)"):
        vec.step(np.array([0, 2]))
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 2\)"):
        vec.step(np.array([-1, 0]))
    with pytest.raises(ValueError, match="actions must be integers"):
        vec.step(np.array([0.0, 1.0]))
    vec.step([0, 1])  # plain lists are fine
    vec.close()


def test_minatar_frames_come_as_chw_uint8_through_the_real_package() -> None:
    pytest.importorskip("minatar")
    cfg = EnvConfig(id="MinAtar/Breakout-v1", kind="gym", max_episode_steps=0,
                    eval_max_episode_steps=0, episodic_life=False, clip_rewards=False)
    env = make_env(cfg, seed=3, train=True)
    obs, _ = env.reset()
    # MinAtar's bool (10, 10, 4) HWC frame, as 4 x 10 x 10 uint8 with True at 255.
    assert obs.shape == (4, 10, 10) and obs.dtype == np.uint8
    assert set(np.unique(obs)) <= {0, 255} and obs.any()
    raw = env.unwrapped.game.state()  # MinAtar's own HWC bool state
    np.testing.assert_array_equal(obs, raw.transpose(2, 0, 1).astype(np.uint8) * 255)
    assert env.action_space.n == 3  # the -v1 ids use the minimal action set
    env.close()
    assert describe_env(cfg) == EnvDescription((4, 10, 10), np.dtype(np.uint8).str, 3)


@pytest.mark.parametrize("shape, layout, expected", [
    ((10, 10, 4), "auto", "hwc"), ((84, 84, 3), "auto", "hwc"), ((3, 84, 84), "auto", "chw"),
    ((10, 10, 10), "auto", "hwc"), ((4, 10, 10), "hwc", "hwc"), ((10, 10, 4), "chw", "chw"),
])
def test_image_layout_of_gym_observations(shape, layout, expected) -> None:
    assert image_layout(shape, layout) == expected
