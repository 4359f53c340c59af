"""ReplayBuffer: trajectory links, frame stacks, sampleability, wrap-around and PER weights."""

from __future__ import annotations

import numpy as np
import pytest

from ezengine.collector import Collector, store_transition
from ezengine.config import Config
from ezengine.envs import VectorStep
from ezengine.replay import ReplayBuffer, initial_allocation

A = 3  # actions
UNIFORM = np.full(A, 1.0 / A, dtype=np.float32)


def make_buffer(capacity: int = 64, *, writers: int = 1, stack: int = 1, lookahead: int = 2,
                alpha: float = 1.0) -> ReplayBuffer:
    return ReplayBuffer(capacity, (2,), np.float32, A, num_writers=writers, alpha=alpha,
                        frame_stack=stack, lookahead=lookahead)


def frame(value: float) -> np.ndarray:
    """A 2-float frame tagged with `value` (first entry) so positions can be identified."""
    return np.array([value, -value], dtype=np.float32)


def put(rb: ReplayBuffer, writer: int, value: float, action: int = 0, reward: float = 0.0,
        env_step: int = 0) -> int:
    """Append one step and return its global index."""
    g = rb.head
    rb.append(writer, frame(value), action, reward, 0.0, UNIFORM, env_step)
    return g


def end(rb: ReplayBuffer, writer: int, value: float, terminated: bool = True) -> int:
    g = rb.head
    rb.close(writer, frame(value), terminated, 0)
    return g


def sampled_set(rb: ReplayBuffer, n: int = 4000, seed: int = 0) -> set[int]:
    return set(rb.sample(n, 1.0, np.random.default_rng(seed)).positions.tolist())


# --------------------------------------------------------------------------- links


def test_interleaved_writers_link_their_own_positions():
    rb = make_buffer(writers=2, lookahead=1)
    # Global order: w0 g0, w1 g1, w0 g2, w1 g3, w0 g4, w1 g5, w0 closes (g6),
    # w1 g7, w0 starts a new trajectory at g8, w1 closes (g9, truncated).
    for step in range(3):
        assert put(rb, 0, 10 + step) == 2 * step
        assert put(rb, 1, 20 + step) == 2 * step + 1
    assert end(rb, 0, 13) == 6
    assert put(rb, 1, 23) == 7
    assert put(rb, 0, 30) == 8
    assert end(rb, 1, 24, terminated=False) == 9

    got = rb.unroll_positions(np.array([0, 1, 8, 4]), 4)
    np.testing.assert_array_equal(got, [
        [0, 2, 4, 6, -1],   # w0: three actions then its final observation, then nothing
        [1, 3, 5, 7, 9],    # w1: the chain skips every w0 position
        [8, -1, -1, -1, -1],  # w0's new trajectory: nothing after its (open) first step
        [4, 6, -1, -1, -1],
    ])
    # The new trajectory does not link back to the previous one's final observation.
    assert rb.pred[8] == -1
    assert rb.pred[2] == 0 and rb.pred[3] == 1 and rb.pred[9] == 7
    # Final observations: no action; `terminal` records terminated vs truncated.
    assert rb.actions[6] == -1 and rb.terminal[6]
    assert rb.actions[9] == -1 and not rb.terminal[9]
    # Frames really come from the chained positions.
    np.testing.assert_array_equal(rb.frames[got[1], 0], [20, 21, 22, 23, 24])


def test_close_without_open_trajectory_is_an_error():
    rb = make_buffer()
    with pytest.raises(ValueError, match="writer 0"):
        rb.close(0, frame(0), True, 0)


# --------------------------------------------------------------------------- frame stacks


class ScriptedVectorEnv:
    """A stand-in VectorEnv: env i plays episodes of scripted lengths; every observation is
    unique, [1000 i + 100 episode + t + 1, i] so a frame identifies its position."""

    def __init__(self, lengths: list[list[int]], terminated: list[list[bool]]) -> None:
        self.lengths = lengths
        self.term = terminated
        self.num_envs = len(lengths)
        self.num_actions = A
        self.observation_shape = (2,)
        self.observation_dtype = np.dtype(np.float32)
        self.episode = [0] * self.num_envs
        self.t = [0] * self.num_envs

    def _obs(self, i: int) -> np.ndarray:
        return np.array([1000 * i + 100 * self.episode[i] + self.t[i] + 1, i], dtype=np.float32)

    def reset(self) -> np.ndarray:
        return np.stack([self._obs(i) for i in range(self.num_envs)])

    def step(self, actions: np.ndarray) -> VectorStep:
        n = self.num_envs
        obs, final = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
        terminated, truncated = np.zeros(n, bool), np.zeros(n, bool)
        for i in range(n):
            self.t[i] += 1
            final[i] = self._obs(i)
            ep = self.episode[i]
            if self.t[i] == self.lengths[i][ep % len(self.lengths[i])]:
                is_term = self.term[i][ep % len(self.term[i])]
                terminated[i], truncated[i] = is_term, not is_term
                self.episode[i] += 1
                self.t[i] = 0
            obs[i] = self._obs(i)
        return VectorStep(obs=obs, final_obs=final, reward=np.ones(n, np.float32),
                          terminated=terminated, truncated=truncated,
                          game_over=terminated | truncated, completed_games=[])


def test_stacked_frames_match_the_collectors_stacks_at_every_step():
    stack = 4
    # Episodes shorter than, equal to and longer than the stack; both end kinds.
    env = ScriptedVectorEnv(lengths=[[2, 5, 1, 4], [6, 3, 4, 1]],
                            terminated=[[True, False], [False, True, True]])
    rb = ReplayBuffer(1000, (2,), np.float32, A, num_writers=2, alpha=1.0, frame_stack=stack,
                      lookahead=3)
    col = Collector(env, search=None, clip_rewards=False, frame_stack=stack, seed=0)
    expected: dict[float, np.ndarray] = {}  # frame tag -> the model input the collector used
    for _ in range(30):
        inputs = col.stacks.model_input().copy()  # [N, stack * 2]
        prev_stacks = col.stacks.frames.copy()     # [N, stack, 2]
        store_transition(rb, col.step(None, 1.0))  # the trainer's path into the replay
        for i in range(env.num_envs):
            expected[float(inputs[i, -2])] = inputs[i]  # newest frame's tag
            # A final observation is never a collector input, but it is a replay position:
            # its stack is what FrameStacks would hold after appending it without a reset.
        finals = np.flatnonzero(rb.actions[:rb.head] < 0)
        for g in finals:
            tag = float(rb.frames[g, 0])
            if tag not in expected:
                i = int(rb.frames[g, 1])
                expected[tag] = np.concatenate([prev_stacks[i, 1:].reshape(-1), rb.frames[g]])
    positions = np.arange(rb.head)
    assert len(expected) == rb.head  # every stored position was checked
    got = rb.stacked_frames(positions)
    for g in positions:
        np.testing.assert_array_equal(got[g], expected[float(rb.frames[g, 0])],
                                      err_msg=f"position {g}")
    # Sanity: some stacks were padded (a trajectory's first step repeats its first frame).
    firsts = [g for g in positions if rb.pred[g] < 0]
    assert len(firsts) >= 6
    for g in firsts:
        np.testing.assert_array_equal(got[g], np.tile(rb.frames[g], stack))


# --------------------------------------------------------------------------- sampleability


def test_position_becomes_sampleable_after_lookahead_successors_or_close():
    rb = make_buffer(writers=2, lookahead=3)
    g0, g1, g2 = put(rb, 0, 0), put(rb, 0, 1), put(rb, 0, 2)
    assert rb.num_sampleable == 0
    with pytest.raises(ValueError, match="no sampleable"):
        rb.sample(1, 1.0, np.random.default_rng(0))
    # Another writer's steps are not successors of writer 0's positions.
    for v in range(10):
        put(rb, 1, 100 + v)
    # Writer 1 has 10 steps: its first 10 - 3 = 7 are sampleable; writer 0's none.
    assert rb.num_sampleable == 7
    assert not {g0, g1, g2} & sampled_set(rb)
    g3 = put(rb, 0, 3)  # g0 now has 3 successors (g1, g2, g3)
    assert rb.num_sampleable == 8
    assert g0 in sampled_set(rb) and g1 not in sampled_set(rb)
    g_final = end(rb, 0, 4)  # closing makes g1, g2, g3 sampleable, never the final obs
    assert rb.num_sampleable == 11
    s = sampled_set(rb)
    assert {g0, g1, g2, g3} <= s
    assert g_final not in s
    assert rb.tree.get(np.array([g_final]))[0] == 0.0


# --------------------------------------------------------------------------- wrap-around


def test_wraparound_never_samples_overwritten_positions():
    cap = 10
    rb = make_buffer(cap, writers=2, lookahead=2)
    rng = np.random.default_rng(1)
    became: list[int] = []  # every position that became sampleable, in order

    def in_tree() -> set[int]:  # global indices of the slots with a priority
        return {int(rb.global_index[s]) for s in np.flatnonzero(rb.tree.get(np.arange(cap)))}

    for step in range(60):
        for w in (0, 1):
            before = in_tree()
            put(rb, w, 1000 * w + step)
            if (step + w) % 7 == 6:
                end(rb, w, 1000 * w + step + 0.5, terminated=bool(step % 2))
            became += sorted(in_tree() - before)
        alive_sampleable = {g for g in became if g >= rb.head - cap}
        assert rb.num_sampleable == len(alive_sampleable)
        if rb.num_sampleable:
            s = rb.sample(64, 0.5, rng)
            assert set(s.positions.tolist()) <= alive_sampleable
            assert (s.positions >= rb.head - cap).all()
    assert rb.head > 5 * cap  # it wrapped several times
    assert rb.size == cap


def test_chain_crossing_the_physical_end_of_the_arrays():
    cap = 8
    rb = make_buffer(cap, stack=3, lookahead=2)
    for v in range(5):  # g0..g4: an old trajectory, closed at g5
        put(rb, 0, v)
    end(rb, 0, 5)
    # New trajectory g6..g11 occupies slots 6, 7, 0, 1, 2, 3 (overwriting g0..g3).
    gs = [put(rb, 0, 60 + k, reward=float(k)) for k in range(6)]
    assert gs == [6, 7, 8, 9, 10, 11]
    np.testing.assert_array_equal(rb.unroll_positions(np.array([6]), 5)[0], gs)
    # g9 lives in slot 1 but its stack is g7 (slot 7), g8 (slot 0), g9 (slot 1).
    np.testing.assert_array_equal(rb.stacked_frames(np.array([9]))[0],
                                  np.concatenate([frame(61), frame(62), frame(63)]))
    # g6's predecessors never existed in its trajectory: padded with its own frame.
    np.testing.assert_array_equal(rb.stacked_frames(np.array([6]))[0], np.tile(frame(60), 3))
    np.testing.assert_array_equal(rb.rewards[rb.slot(np.array(gs))], [0, 1, 2, 3, 4, 5])
    # g0..g3 are gone: not alive, no successors, not sampleable.
    assert not rb.alive(np.array([0, 1, 2, 3])).any()
    np.testing.assert_array_equal(rb.successors(np.array([0, 3, 4])), [-1, -1, 5])
    s = sampled_set(rb)
    assert s == {4, 6, 7, 8, 9}  # g4 (closed); g10, g11 wait for 2 successors


def test_no_self_link_when_a_writers_previous_position_was_just_overwritten():
    rb = make_buffer(2, writers=2, lookahead=1)
    put(rb, 0, 0)   # g0, slot 0
    put(rb, 1, 1)   # g1, slot 1
    g2 = put(rb, 0, 2)  # g2 overwrites slot 0, which held writer 0's previous position g0
    assert rb.successors(np.array([g2]))[0] == -1


# --------------------------------------------------------------------------- growth


def test_capacity_zero_grows_and_keeps_every_position():
    # Three writers in random order, trajectories of about 3 steps, random priority updates;
    # the arrays start at 8 slots and grow many times. A fixed buffer too large to wrap sees
    # the same writes and is the reference.
    rng = np.random.default_rng(3)
    kw = {"num_writers": 3, "alpha": 0.6, "frame_stack": 3, "lookahead": 2}
    rb = ReplayBuffer(0, (2,), np.float32, A, initial_capacity=8, **kw)
    ref = ReplayBuffer(10_000, (2,), np.float32, A, **kw)
    open_: list[list[int]] = [[], [], []]  # each writer's open trajectory, global indices
    done: list[list[int]] = []
    growths = 0
    for step in range(1500):
        w = int(rng.integers(3))
        g, cap, before = rb.head, rb.capacity, rb.tree.get(np.arange(rb.capacity))
        if open_[w] and rng.random() < 0.3:
            terminated = bool(rng.random() < 0.5)
            for b in (rb, ref):
                b.close(w, frame(g), terminated, step)
            done.append(open_[w] + [g])
            open_[w] = []
        else:
            action = int(rng.integers(A))
            for b in (rb, ref):
                b.append(w, frame(g), action, float(step), 0.0, UNIFORM, step)
            open_[w].append(g)
        if rb.capacity > cap:  # this write grew the arrays
            growths += 1
            after = rb.tree.get(np.arange(cap))
            set_before = before > 0  # the only other change: new entries at the top priority
            np.testing.assert_array_equal(after[set_before], before[set_before])
        if step % 50 == 49:
            s = ref.sample(16, 1.0, rng)
            priorities = rng.uniform(0.1, 10.0, 16)
            for b in (rb, ref):
                b.update_priorities(s.positions, priorities)
    for w in range(3):  # cut the open trajectories
        if open_[w]:
            g = rb.head
            done.append(open_[w] + [g])
            for b in (rb, ref):
                b.close(w, frame(g), False, 1500)
    assert growths >= 8 and rb.capacity >= rb.head > 180 * 8

    g = np.arange(rb.head)
    assert rb.size == rb.head and rb.alive(g).all()
    np.testing.assert_array_equal(rb.slot(g), g)
    np.testing.assert_array_equal(rb.global_index[g], g)
    np.testing.assert_array_equal(rb.frames[g, 0], g)  # every frame is tagged with its index
    for name in ("frames", "actions", "rewards", "root_values", "policies", "collected_at",
                 "terminal", "pred", "succ"):
        np.testing.assert_array_equal(getattr(rb, name)[g], getattr(ref, name)[g], name)
    for traj in done:
        np.testing.assert_array_equal(rb.unroll_positions(np.array([traj[0]]), len(traj))[0],
                                      [*traj, -1])
    np.testing.assert_array_equal(rb.stacked_frames(g), ref.stacked_frames(g))
    np.testing.assert_array_equal(rb.tree.get(g), ref.tree.get(g))
    assert rb.tree.total == pytest.approx(ref.tree.total, rel=1e-12)
    assert rb.num_sampleable == ref.num_sampleable == sum(len(t) - 1 for t in done)
    sampled = rb.sample(4000, 1.0, rng).positions
    assert (rb.tree.get(sampled) > 0).all() and (rb.actions[sampled] >= 0).all()
    assert sampled.min() < 8  # positions from before the first growth are still drawn


def test_default_config_keeps_every_transition_of_a_budget():
    # Spec section 3, decision 4: keep every transition. The default budget in 3-step
    # trajectories is 4/3 as many positions (one final observation per trajectory); a buffer
    # the size of the budget would have overwritten the oldest of them.
    cfg = Config()
    n, lc = cfg.env.num_envs, cfg.learner
    rb = ReplayBuffer(  # as the trainer builds it
        cfg.replay.capacity, (2,), np.float32, A, num_writers=n, alpha=cfg.replay.alpha,
        frame_stack=cfg.env.frame_stack, lookahead=lc.unroll_steps + lc.td_steps,
        initial_capacity=initial_allocation(cfg.run.env_steps, n))
    transitions = []
    for step in range(cfg.run.env_steps // n):
        for w in range(n):
            transitions.append(put(rb, w, len(transitions), env_step=step * n))
            if (step + w) % 3 == 2:
                end(rb, w, -1.0, terminated=False)
    for w in range(n):
        if rb._last[w] >= 0:
            end(rb, w, -1.0, terminated=False)
    t = np.array(transitions)
    assert t.size == cfg.run.env_steps and rb.head > 1.3 * cfg.run.env_steps
    assert rb.size == rb.head and rb.alive(t).all()
    np.testing.assert_array_equal(rb.frames[rb.slot(t), 0], np.arange(t.size))
    assert (rb.actions[rb.slot(t)] == 0).all()
    assert rb.num_sampleable == cfg.run.env_steps


# --------------------------------------------------------------------------- priorities


def test_importance_weights_by_hand_for_three_items():
    rb = make_buffer(writers=1, lookahead=5, alpha=0.6)
    for v in range(3):
        put(rb, 0, v)
    end(rb, 0, 3)
    rng = np.random.default_rng(0)
    # New data enters at the max priority (1.0 initially): all weights 1.
    s = rb.sample(30, 0.4, rng)
    np.testing.assert_allclose(s.weights, 1.0)
    rb.update_priorities(np.array([0, 1, 2]), np.array([1.0, 2.0, 4.0]))
    # p^alpha = 1, 2^0.6, 4^0.6 = 1, 1.515717, 2.297397; sum 4.813113
    # P = 0.207766, 0.314914, 0.477320; N P (N = 3) = 0.623297, 0.944742, 1.431961
    # (N P)^-0.4 = 1.208153, 1.022998, 0.866219; / max -> 1, 0.846745, 0.716978
    expected_w = {0: 1.0, 1: 0.84674531, 2: 0.71697762}
    s = rb.sample(3000, 0.4, rng)
    for g, w in zip(s.positions, s.weights, strict=True):
        assert w == pytest.approx(expected_w[int(g)], rel=1e-6)
    # Stratified draws: frequencies follow P closely.
    freq = np.bincount(s.positions, minlength=3) / 3000
    np.testing.assert_allclose(freq, [0.20776573, 0.31491396, 0.47732031], atol=0.01)
    # beta = 1: w = (p^alpha / min p^alpha)^-1 = 1, 1 / 1.515717, 1 / 2.297397
    s = rb.sample(60, 1.0, rng)
    for g, w in zip(s.positions, s.weights, strict=True):
        assert w == pytest.approx([1.0, 0.65975396, 0.43527528][int(g)], rel=1e-6)
    # Data written now enters at the largest priority stored (4): p^alpha = 4^0.6.
    put(rb, 0, 10)  # g4
    end(rb, 0, 11)  # g5 (final)
    assert rb.tree.get(np.array([4]))[0] == pytest.approx(4.0 ** 0.6)
    # "Largest stored" follows the priorities down: with g2 and g4 lowered to 0.5 the
    # largest is g1's 2, so the next new position (g6) enters at 2^0.6.
    rb.update_priorities(np.array([2, 4]), np.array([0.5, 0.5]))
    put(rb, 0, 12)  # g6
    end(rb, 0, 13)
    assert rb.tree.get(np.array([6]))[0] == pytest.approx(2.0 ** 0.6)


def test_importance_weights_are_normalised_by_the_samples_largest_weight():
    # A position with a tiny priority that is (practically) never sampled must not shrink
    # the weights of the others: the max weight is taken over the sample.
    rb = make_buffer(writers=1, lookahead=10, alpha=0.6)
    for v in range(4):
        put(rb, 0, v)
    end(rb, 0, 4)
    rb.update_priorities(np.array([0, 1, 2, 3]), np.array([1e-6, 1.0, 1.0, 4.0]))
    s = rb.sample(64, 0.5, np.random.default_rng(0))
    assert 0 not in s.positions.tolist()
    # Sample max: p = 1 -> w = 1; p = 4 -> (4^0.6 / 1^0.6)^-0.5 = 4^-0.3 = 0.659754.
    # (Normalised by the buffer's min priority 1e-6 they would be 1e-6^0.3 = 0.0158 and
    # 0.0105.)
    for g, w in zip(s.positions, s.weights, strict=True):
        assert w == pytest.approx(1.0 if g in (1, 2) else 4.0 ** -0.3, rel=1e-6)


def test_update_priorities_ignores_evicted_positions():
    cap = 4
    rb = make_buffer(cap, lookahead=1, alpha=1.0)
    for v in range(3):
        put(rb, 0, v)
    end(rb, 0, 3)               # g0..g2 sampleable, g3 final
    put(rb, 0, 4)               # g4 overwrites slot 0 (g0): g0 leaves the tree
    put(rb, 0, 5)               # g5 -> slot 1 (g1 evicted); g4 becomes sampleable
    assert rb.num_sampleable == 2  # g2 and g4
    before = rb.tree.get(np.arange(cap)).copy()
    np.testing.assert_allclose(before, [1.0, 0.0, 1.0, 0.0])
    rb.update_priorities(np.array([0, 1]), np.array([100.0, 50.0]))  # both evicted
    np.testing.assert_array_equal(rb.tree.get(np.arange(cap)), before)
    # Mixed: only the live one (g4 in slot 0) changes.
    rb.update_priorities(np.array([0, 4]), np.array([100.0, 3.0]))
    np.testing.assert_allclose(rb.tree.get(np.arange(cap)), [3.0, 0.0, 1.0, 0.0])
    # The ignored 100 does not leak into the priority of new data: g6 evicts g2 (slot 2)
    # and makes g5 (slot 1) sampleable at the largest stored priority, 3 (g4's).
    put(rb, 0, 6)
    np.testing.assert_allclose(rb.tree.get(np.arange(cap)), [3.0, 3.0, 0.0, 0.0])
    assert rb.num_sampleable == 2  # g4, g5
