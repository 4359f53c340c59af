"""Learner: learning-rate schedule, gradient scaling, stop-gradient, masks, PER weights,
priorities, image augmentation and checkpoint round trips."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ezengine.batch import TrainingBatch
from ezengine.checkpoint import load_checkpoint, save_checkpoint
from ezengine.config import Config
from ezengine.learner import METRICS, Learner, augment_images, learning_rate, scale_gradient
from ezengine.model import build_model
from ezengine.support import support_to_scalar

A = 3
OBS = 4
K = 3
B = 4


def make_cfg(**learner) -> Config:
    model = dict(kind="mlp", latent_dim=8, hidden_dim=16, lstm_hidden=8, head_hidden=(8,),
                 support_size=5, projection_hidden=16, projection_dim=16,
                 projection_head_hidden=8)
    # value_prefix_horizon 2 exercises the LSTM reset inside the unroll.
    return Config().replace(env={"kind": "gym"}, model=model, learner={
        "unroll_steps": K, "value_prefix_horizon": 2, "augmentation": False,
        "mixed_precision": False, **learner})


def make_learner(cfg: Config, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    model = build_model(cfg.model, (OBS,), A, frame_stack=1)
    with torch.no_grad():  # move the zero-initialised last layers: targets must matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return Learner(cfg, model, torch.device("cpu"))


def make_batch(seed: int = 0, weights=None) -> TrainingBatch:
    rng = np.random.default_rng(seed)
    return TrainingBatch(
        frames=rng.normal(size=(B, K + 1, OBS)).astype(np.float32),  # frame stack 1
        actions=rng.integers(0, A, size=(B, K)).astype(np.int64),
        value_targets=rng.uniform(-5, 5, size=(B, K + 1)).astype(np.float32),
        value_prefix_targets=rng.uniform(-3, 3, size=(B, K)).astype(np.float32),
        policy_targets=rng.dirichlet(np.ones(A), size=(B, K + 1)).astype(np.float32),
        masks=np.ones((B, K + 1), np.float32),
        weights=(np.ones(B, np.float32) if weights is None
                 else np.asarray(weights, np.float32)),
        positions=np.arange(B, dtype=np.int64),
        target_version=0,
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- schedule


def test_learning_rate_warmup_and_decay_by_hand():
    cfg = make_cfg(lr=0.2, lr_warmup_steps=1000, lr_decay_steps=[101_000], lr_decay_factor=0.1)
    # Warm-up: lr * (step + 1) / 1000.
    assert learning_rate(0, cfg) == pytest.approx(0.2 * 1 / 1000)
    assert learning_rate(499, cfg) == pytest.approx(0.1)
    assert learning_rate(998, cfg) == pytest.approx(0.1998)
    assert learning_rate(999, cfg) == pytest.approx(0.2)
    # Flat, then x0.1 from step 101,000 on.
    assert learning_rate(1000, cfg) == pytest.approx(0.2)
    assert learning_rate(100_999, cfg) == pytest.approx(0.2)
    assert learning_rate(101_000, cfg) == pytest.approx(0.02)
    assert learning_rate(500_000, cfg) == pytest.approx(0.02)
    # No warm-up, two decay steps, factor 0.5: 1, 1, 0.5, 0.5, 0.25.
    cfg = make_cfg(lr=1.0, lr_warmup_steps=0, lr_decay_steps=[10, 20], lr_decay_factor=0.5)
    assert [learning_rate(s, cfg) for s in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_train_step_uses_the_schedule():
    cfg = make_cfg(lr=0.1, lr_warmup_steps=4, lr_decay_steps=[5])
    learner = make_learner(cfg)
    lrs = [learner.train_step(make_batch(i))[0]["lr"] for i in range(6)]
    # 0.1 * 1/4, 2/4, 3/4, 4/4, then 0.1 at step 4, x0.1 at step 5.
    np.testing.assert_allclose(lrs, [0.025, 0.05, 0.075, 0.1, 0.1, 0.01])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert learner.steps == 6


# --------------------------------------------------------------------------- gradients


def test_scale_gradient_identity_forward_scaled_backward():
    x = torch.randn(5, 3, requires_grad=True)
    c = torch.randn(5, 3)
    y = scale_gradient(x, 0.5)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-7)
    (y * c).sum().backward()
    torch.testing.assert_close(x.grad, 0.5 * c)  # d/dx sum(c * y) = 0.5 c
    x.grad = None
    (scale_gradient(x, 0.0) * c).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(c))
    # Scaling composes through a chain: 0.5 * 0.5 = 0.25.
    x.grad = None
    (scale_gradient(scale_gradient(x, 0.5) * 2.0, 0.5) * c).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * 2.0 * c)


def manual_consistency(model, batch: TrainingBatch, stop_gradient: bool) -> torch.Tensor:
    """Per-sample sum_k m_k * -cos(pred(proj(s_hat_k)), proj(repr(o_{t+k})))."""
    b = batch.frames.shape[0]
    nxt = torch.from_numpy(batch.frames[:, 1:].reshape(b * K, -1))
    target = model.project(model.represent(nxt), with_head=False).reshape(b, K, -1)
    if stop_gradient:
        target = target.detach()
    latent = model.represent(torch.from_numpy(batch.frames[:, 0]))
    lstm = model.initial_lstm_state(b)
    actions = torch.from_numpy(batch.actions)
    m = torch.from_numpy(batch.masks)
    total = torch.zeros(b)
    for k in range(1, K + 1):
        latent, lstm, _ = model.dynamics(latent, lstm, actions[:, k - 1])
        latent = scale_gradient(latent, 0.5)
        online = model.project(latent, with_head=True)
        total = total + m[:, k] * -F.cosine_similarity(online, target[:, k - 1], dim=-1)
    return total


def test_no_gradient_through_the_consistency_target_branch():
    cfg = make_cfg(value_prefix_loss_weight=0.0, value_loss_weight=0.0, policy_loss_weight=0.0,
                   consistency_loss_weight=1.0)
    learner = make_learner(cfg)
    model = learner.model.eval()  # eval: BN is per-sample, so batching cannot matter
    batch = make_batch(1)
    batch.masks[2, 2:] = 0.0

    seen_target_outputs = []
    original_project = model.project

    def recording_project(latent, with_head=True):
        out = original_project(latent, with_head)
        if not with_head:
            seen_target_outputs.append(out)
        return out

    model.project = recording_project
    per_sample, _, _ = learner.losses(batch)
    del model.project
    assert seen_target_outputs and not any(t.requires_grad for t in seen_target_outputs)
    model.zero_grad()
    per_sample.sum().backward()
    g_learner = grads(model)

    model.zero_grad()
    with_stop = manual_consistency(model, batch, stop_gradient=True)
    torch.testing.assert_close(per_sample, with_stop)  # same loss values
    with_stop.sum().backward()
    g_stop = grads(model)
    model.zero_grad()
    manual_consistency(model, batch, stop_gradient=False).sum().backward()
    g_nostop = grads(model)

    for name in g_learner:
        torch.testing.assert_close(g_learner[name], g_stop[name], rtol=1e-4, atol=1e-6)
    # Without the stop-gradient the representation and projector get extra gradient:
    # the comparison above would have failed.
    diff = sum(float((g_nostop[n] - g_learner[n]).abs().sum()) for n in g_learner
               if n.startswith(("representation_net", "projection.")))
    assert diff > 1e-3


def test_consistency_targets_are_encoded_one_unroll_step_at_a_time():
    # BatchNorm statistics per step: the target of step 1 must not depend on
    # the observations at step 2. With steps 2.. masked, the consistency loss is step 1's
    # alone; moving o_{t+2} far away must leave it unchanged (a pooled batch of B x K
    # observations would shift step 1's normalisation).
    cfg = make_cfg()
    assert cfg.model.norm == "batch"
    learner = make_learner(cfg)
    learner.model.train()
    batch = make_batch(3)
    batch.masks[:, 2:] = 0.0
    moved = copy.deepcopy(batch)
    moved.frames[:, 2] += 50.0
    _, parts, _ = learner.losses(batch)
    _, parts_moved, _ = learner.losses(moved)
    assert parts["loss_consistency"] != 0
    torch.testing.assert_close(parts_moved["loss_consistency"], parts["loss_consistency"])


def test_masked_steps_contribute_nothing():
    learner = make_learner(make_cfg())
    learner.model.eval()  # train-mode BN would couple samples through batch statistics
    batch = make_batch(2)
    batch.masks[1] = [1, 1, 0, 0]  # sample 1: steps k = 2, 3 masked
    batch.masks[2] = [1, 0, 0, 0]  # sample 2: everything after k = 0 masked
    with torch.no_grad():
        base, _, _ = learner.losses(batch)
    wild = copy.deepcopy(batch)
    rng = np.random.default_rng(99)
    # Term k uses value_targets[:, k], policy_targets[:, k], value_prefix_targets[:, k-1],
    # actions[:, k-1] and frames[:, k]; change all of them wildly where m_k = 0.
    for i, first_masked in ((1, 2), (2, 1)):
        wild.value_targets[i, first_masked:] = rng.uniform(-900, 900, K + 1 - first_masked)
        wild.policy_targets[i, first_masked:] = rng.dirichlet([0.1] * A, K + 1 - first_masked)
        wild.value_prefix_targets[i, first_masked - 1:] = 777.0
        wild.actions[i, first_masked - 1:] = (wild.actions[i, first_masked - 1:] + 1) % A
        wild.frames[i, first_masked:] = 50.0 * rng.normal(size=(K + 1 - first_masked, OBS))
    with torch.no_grad():
        after, _, _ = learner.losses(wild)
    torch.testing.assert_close(after, base, rtol=1e-6, atol=1e-5)
    # The same changes at unmasked steps do change the loss (the test is not vacuous) ...
    batch.masks[:] = 1.0
    wild.masks[:] = 1.0
    with torch.no_grad():
        base, _, _ = learner.losses(batch)
        after, _, _ = learner.losses(wild)
    assert (after[1:3] - base[1:3]).abs().min() > 1e-2
    torch.testing.assert_close(after[[0, 3]], base[[0, 3]])
    # ... and the k = 0 terms always count (m_0 = 1).
    batch.masks[2] = [1, 0, 0, 0]
    with torch.no_grad():
        before0, _, _ = learner.losses(batch)
        batch.value_targets[2, 0] += 30.0
        after0, _, _ = learner.losses(batch)
    assert abs(float(after0[2] - before0[2])) > 1e-2


def test_per_weights_scale_per_sample_losses_and_gradient_is_divided_by_k():
    cfg = make_cfg(lr=0.1, lr_warmup_steps=0, momentum=0.9, weight_decay=0.0, grad_clip=1e9)
    learner = make_learner(cfg)
    w = np.array([0.1, 1.0, 0.5, 0.25], np.float32)
    batch = make_batch(3, weights=w)
    # Reference: an identical copy, loss = mean(w * L), gradient of loss / K.
    ref = copy.deepcopy(learner.model).train()
    ref_learner = Learner(cfg, ref, torch.device("cpu"))
    per_sample, _, _ = ref_learner.losses(batch)
    loss = (torch.from_numpy(w) * per_sample).mean()
    (loss / K).backward()
    expected = grads(ref)
    assert abs(float(loss.detach() - per_sample.detach().mean())) > 1e-3  # weights matter here

    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    metrics, _ = learner.train_step(batch)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert set(metrics) == set(METRICS)  # what the pipeline's counters sum
    # First SGD step with momentum and no weight decay: p <- p - lr * grad.
    for n, p in learner.model.named_parameters():
        got = (before[n] - p.detach()) / 0.1
        torch.testing.assert_close(got, expected[n], rtol=1e-3, atol=1e-6)


def test_priorities_are_value_error_plus_eps():
    cfg = make_cfg()
    learner = make_learner(cfg)
    batch = make_batch(4)
    batch.value_targets[:, 0] = [3.0, -2.0, 0.5, 10.0]
    ref = copy.deepcopy(learner.model).train()  # the learner predicts in train mode
    with torch.no_grad():
        out = ref.initial_inference(torch.from_numpy(batch.frames[:, 0]))
        v = support_to_scalar(out.value_logits, 5).numpy()
    assert np.abs(v).max() > 0.05  # a non-trivial prediction
    _, priorities = learner.train_step(batch)
    assert priorities.shape == (B,) and priorities.dtype == np.float64
    expected = np.abs(v - np.array([3.0, -2.0, 0.5, 10.0])) + cfg.replay.priority_eps
    np.testing.assert_allclose(priorities, expected, rtol=1e-5)


# --------------------------------------------------------------------------- augmentation


def test_augment_images_shift_and_intensity():
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = 24, 12, 16, 16
    x = torch.rand(b, c, h, w, generator=gen) * 0.8 + 0.1  # in [0.1, 0.9], no zeros
    out = augment_images(x, generator=gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Intensity factor 1 + 0.05 * clip(N, -2, 2) is in [0.9, 1.1]; the shift only moves
    # (replicated) pixels.
    assert out.min() >= 0.9 * x.min() - 1e-6 and out.max() <= 1.1 * x.max() + 1e-6
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    shifts, factors = [], []
    for i in range(b):
        found = []
        for dy in range(9):  # offsets 0..8 in the padded image: shifts of -4..4 pixels
            for dx in range(9):
                crop = padded[i, :, dy:dy + h, dx:dx + w]
                ratio = out[i] / crop
                # One intensity draw for the whole sample: all 12 stacked channels share it.
                if float(ratio.max() - ratio.min()) < 1e-5:
                    found.append((dy - 4, dx - 4, float(ratio.mean())))
        assert len(found) == 1, f"sample {i}: {found}"
        dy, dx, f = found[0]
        assert 0.9 - 1e-6 <= f <= 1.1 + 1e-6
        shifts.append((dy, dx))
        factors.append(f)
    # Draws are per sample, not per batch.
    assert len(set(shifts)) > 5
    assert len({round(f, 6) for f in factors}) > 5


def test_learner_augments_only_image_observations():
    cfg = make_cfg(augmentation=True)
    learner = make_learner(cfg)
    x = np.random.default_rng(0).normal(size=(2, K + 1, OBS)).astype(np.float32)
    obs, next_obs = learner._inputs(x, augment=True)
    torch.testing.assert_close(obs, torch.from_numpy(x[:, 0]))
    torch.testing.assert_close(next_obs, torch.from_numpy(x[:, 1:]))
    # Images, frame stack 2: input k stacks frames k and k + 1, scaled to [0, 1].
    img = np.random.default_rng(0).integers(0, 256, size=(2, K + 2, 3, 8, 8), dtype=np.uint8)
    obs, next_obs = learner._inputs(img, augment=False)
    scaled = torch.from_numpy(img).float() / 255.0
    torch.testing.assert_close(obs, scaled[:, 0:2].reshape(2, 6, 8, 8))
    torch.testing.assert_close(next_obs[:, K - 1],
                               scaled[:, K:K + 2].reshape(2, 6, 8, 8))


# --------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_through_checkpoint(tmp_path):
    cfg = make_cfg(lr_warmup_steps=0, target_update_interval=2)
    learner = make_learner(cfg, seed=0)
    for i in range(3):
        learner.train_step(make_batch(i))
    path = tmp_path / "ck" / "latest.pt"
    save_checkpoint({"learner": learner.state_dict(), "env_steps": 123}, path)
    state = load_checkpoint(path)
    assert state["env_steps"] == 123
    other = make_learner(cfg, seed=5)  # different weights before loading
    other.load_state_dict(state["learner"])
    # Refreshed at step 2 with the snapshot of step 0; the step-2 weights wait for step 4.
    assert other.steps == 3 and other.target_version == 0 and other.snapshot_version == 2
    for (n, p), q in zip(learner.model.named_parameters(), other.model.parameters(),
                         strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)
    for p, q in zip(learner.target.parameters(), other.target.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    for p, q in zip(learner.model.parameters(), other.model.parameters(), strict=True):
        m1 = learner.optimizer.state[p]["momentum_buffer"]
        m2 = other.optimizer.state[q]["momentum_buffer"]
        assert m1.abs().sum() > 0 or p.grad is None
        torch.testing.assert_close(m2, m1, rtol=0, atol=0)
    # Training continues identically (momentum, BN statistics and step count restored).
    batch = make_batch(10)
    m_a, p_a = learner.train_step(batch)
    m_b, p_b = other.train_step(batch)
    assert m_a == m_b
    np.testing.assert_array_equal(p_a, p_b)
    for p, q in zip(learner.model.parameters(), other.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    # Step 4 refreshed both targets from the restored snapshot (the step-2 weights).
    assert learner.target_version == other.target_version == 2
    for p, q in zip(learner.target.parameters(), other.target.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_target_model_lags_one_to_two_refresh_intervals():
    # The reference reanalyses with the snapshot of the previous refresh: with interval 2,
    # the target is the initial model until step 4, then the step-2 weights until step 6.
    cfg = make_cfg(lr_warmup_steps=0, target_update_interval=2)
    learner = make_learner(cfg)
    weights = {0: copy.deepcopy(learner.model.state_dict())}
    seen = {}
    for step in range(1, 7):
        learner.train_step(make_batch(step))
        weights[step] = copy.deepcopy(learner.model.state_dict())
        seen[step] = learner.target_version
        for name, t in learner.target.state_dict().items():
            torch.testing.assert_close(t, weights[learner.target_version][name], rtol=0,
                                       atol=0, msg=f"step {step}: {name}")
    assert seen == {1: 0, 2: 0, 3: 0, 4: 2, 5: 2, 6: 4}
    # Lag (steps - target_version) runs from one interval to just under two once the
    # first snapshot has been used (today's copy of the current weights gave 0-1).
    assert [s - v for s, v in seen.items() if s >= 4] == [2, 3, 2]


def test_a_checkpoint_without_a_target_snapshot_resumes_with_the_target_as_it():
    cfg = make_cfg(lr_warmup_steps=0, target_update_interval=2)
    learner = make_learner(cfg)
    for i in range(4):
        learner.train_step(make_batch(i))
    state = learner.state_dict()
    del state["snapshot"], state["snapshot_version"]  # as written before the lag fix
    other = make_learner(cfg, seed=3)
    other.load_state_dict(state)
    assert other.snapshot_version == other.target_version == 2
    for name, t in other.target.state_dict().items():
        torch.testing.assert_close(other.snapshot[name], t, rtol=0, atol=0)


class CodeRunningPayload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": CodeRunningPayload(str(marker))}, path)
    # The payload is live: an unsafe load would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="corrupt or not an ezengine checkpoint") as info:
        load_checkpoint(path)
    assert not marker.exists()
    # torch's advice to load it unsafely is never passed on.
    assert "weights_only" not in str(info.value)
    # An arbitrary class instance (no code in __reduce__) is refused as well.
    torch.save({"cfg": dataclasses.replace(make_cfg().learner)}, tmp_path / "obj.pt")
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "obj.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
