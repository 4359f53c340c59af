"""Shapes, size, initialisation and gradient flow of the EfficientZero networks."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest
import torch

from ezengine.model import EfficientZeroNet, InitialOutput, RecurrentOutput, build_model

# The attribute names build_model reads from a ModelConfig.
MODEL_FIELDS = (
    "kind", "channels", "reduced_channels", "latent_dim", "hidden_dim", "lstm_hidden",
    "head_hidden", "support_size", "projection_hidden", "projection_dim",
    "projection_head_hidden", "norm", "conv_body", "blocks",
)


def _cfg(**overrides: object) -> SimpleNamespace:
    # Stand-in for ezengine.config.ModelConfig with the paper's defaults.
    base: dict[str, object] = {
        "kind": "conv", "channels": 64, "reduced_channels": 16, "latent_dim": 64,
        "hidden_dim": 128, "lstm_hidden": 512, "head_hidden": [32], "support_size": 300,
        "projection_hidden": 1024, "projection_dim": 1024, "projection_head_hidden": 512,
        "norm": "batch", "conv_body": "auto", "blocks": 2,
    }
    base.update(overrides)
    return SimpleNamespace(**base)


def _mlp_cfg() -> SimpleNamespace:
    return _cfg(kind="mlp", latent_dim=32, hidden_dim=64, lstm_hidden=64, support_size=10,
                projection_hidden=64, projection_dim=64, projection_head_hidden=32)


@pytest.fixture(scope="module")
def conv_net() -> EfficientZeroNet:
    torch.manual_seed(0)
    return build_model(_cfg(), (3, 96, 96), num_actions=18, frame_stack=4)


@pytest.fixture(scope="module")
def mlp_net() -> EfficientZeroNet:
    torch.manual_seed(0)
    return build_model(_mlp_cfg(), (4,), num_actions=2, frame_stack=1)


def _obs(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch, 12, 96, 96), dtype=torch.uint8, generator=g)


def _randomise_last_layers(net: EfficientZeroNet) -> None:
    # The zero-initialised output layers block gradients and make every logit 0; tests of
    # the recurrence and of gradient flow need them non-zero.
    g = torch.Generator().manual_seed(2)
    for seq in (net.dynamics_net.value_prefix.fc, net.prediction_net.value_fc,
                net.prediction_net.policy_fc):
        last = seq[-1]
        with torch.no_grad():
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.1)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.1)


def test_conv_shapes(conv_net: EfficientZeroNet) -> None:
    conv_net.eval()
    with torch.no_grad():
        out = conv_net.initial_inference(_obs())
        assert isinstance(out, InitialOutput)
        assert out.latent.shape == (2, 64, 6, 6)
        assert out.value_logits.shape == (2, 601)
        assert out.policy_logits.shape == (2, 18)
        state = conv_net.initial_lstm_state(2, "cpu")
        assert state[0].shape == state[1].shape == (1, 2, 512)
        rec = conv_net.recurrent_inference(out.latent, state, torch.tensor([0, 17]))
        assert isinstance(rec, RecurrentOutput)
        assert rec.latent.shape == (2, 64, 6, 6)
        assert rec.lstm_state[0].shape == rec.lstm_state[1].shape == (1, 2, 512)
        assert rec.value_prefix_logits.shape == (2, 601)
        assert rec.value_logits.shape == (2, 601)
        assert rec.policy_logits.shape == (2, 18)
        assert conv_net.project(out.latent, with_head=True).shape == (2, 1024)
        assert conv_net.project(out.latent, with_head=False).shape == (2, 1024)
    assert (conv_net.num_actions, conv_net.support_size, conv_net.lstm_hidden) == (18, 300, 512)


def test_conv_accepts_float_in_unit_range(conv_net: EfficientZeroNet) -> None:
    conv_net.eval()
    obs = _obs()
    with torch.no_grad():
        a = conv_net.represent(obs)
        b = conv_net.represent(obs.float() / 255.0)
    torch.testing.assert_close(a, b)


def test_conv_parameter_count(conv_net: EfficientZeroNet) -> None:
    n = sum(p.numel() for p in conv_net.parameters())
    # Spec: about 8.4M with 18 actions. Our layer-by-layer count is 8,350,660.
    assert abs(n - 8.4e6) / 8.4e6 < 0.03, n
    # The projection input is derived from the frame size: 64 * 6 * 6 = 2304.
    assert conv_net.projection[0].in_features == 2304


def test_projection_input_follows_frame_size() -> None:
    # 84x84 -> 42 -> 21 -> 11 -> 6; 64x64 -> 32 -> 16 -> 8 -> 4.
    small = _cfg(channels=8, reduced_channels=4, lstm_hidden=16, support_size=5,
                 projection_hidden=16, projection_dim=16, projection_head_hidden=8)
    for size, side in ((84, 6), (64, 4)):
        net = build_model(small, (3, size, size), num_actions=4, frame_stack=2).eval()
        with torch.no_grad():
            out = net.initial_inference(torch.zeros(2, 6, size, size, dtype=torch.uint8))
            rec = net.recurrent_inference(out.latent, net.initial_lstm_state(2),
                                          torch.tensor([1, 3]))
        assert out.latent.shape == (2, 8, side, side)
        assert net.project(rec.latent).shape == (2, 16)


def test_zero_init_heads_uniform_policy_zero_value(conv_net: EfficientZeroNet) -> None:
    net = build_model(_cfg(), (3, 96, 96), num_actions=18, frame_stack=4)
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            out = net.initial_inference(_obs())
            rec = net.recurrent_inference(out.latent, net.initial_lstm_state(2),
                                          torch.tensor([3, 4]))
        for logits in (out.value_logits, out.policy_logits, rec.value_prefix_logits,
                       rec.value_logits, rec.policy_logits):
            assert torch.count_nonzero(logits) == 0
        probs = torch.softmax(out.policy_logits, dim=-1)
        torch.testing.assert_close(probs, torch.full((2, 18), 1 / 18))


def test_lstm_state_changes_value_prefix() -> None:
    torch.manual_seed(0)
    net = build_model(_cfg(), (3, 96, 96), num_actions=18, frame_stack=4).eval()
    _randomise_last_layers(net)
    actions = torch.tensor([5, 9])
    with torch.no_grad():
        latent = net.represent(_obs())
        zero = net.initial_lstm_state(2)
        nonzero = (torch.full_like(zero[0], 0.5), torch.full_like(zero[1], -0.5))
        a = net.recurrent_inference(latent, zero, actions)
        b = net.recurrent_inference(latent, nonzero, actions)
    # The latent and its predictions do not depend on the LSTM; the value prefix does.
    torch.testing.assert_close(a.latent, b.latent)
    assert not torch.allclose(a.lstm_state[0], b.lstm_state[0])
    assert not torch.allclose(a.value_prefix_logits, b.value_prefix_logits)
    # The LSTM does advance from a zero state.
    assert a.lstm_state[0].abs().sum() > 0 and a.lstm_state[1].abs().sum() > 0


def test_action_changes_next_latent(conv_net: EfficientZeroNet, mlp_net: EfficientZeroNet
                                    ) -> None:
    for net, obs in ((conv_net, _obs()), (mlp_net, torch.randn(2, 4))):
        net.eval()
        with torch.no_grad():
            latent = net.represent(obs)
            state = net.initial_lstm_state(2)
            a = net.recurrent_inference(latent, state, torch.tensor([0, 0])).latent
            b = net.recurrent_inference(latent, state, torch.tensor([1, 1])).latent
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_gradients_flow_through_unroll(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "conv":
        net = build_model(_cfg(), (3, 96, 96), num_actions=18, frame_stack=4)
        obs: torch.Tensor = _obs()
        first = net.representation_net.stem[0].weight
    else:
        net = build_model(_mlp_cfg(), (4,), num_actions=2, frame_stack=1)
        obs = torch.randn(2, 4)
        first = net.representation_net.net[0].weight
    net.train()
    out = net.initial_inference(obs)
    latent, state = out.latent, net.initial_lstm_state(2)
    loss = out.value_logits.sum() + out.policy_logits.sum()
    for k in range(5):
        rec = net.recurrent_inference(latent, state, torch.tensor([k % net.num_actions, 1]))
        latent, state = rec.latent, rec.lstm_state
        # At initialisation only the consistency branch reaches the representation (the
        # output layers are zero), which is exactly what the learner relies on.
        loss = loss + net.project(latent, with_head=True).pow(2).mean()
        loss = loss + rec.value_prefix_logits.sum() + rec.value_logits.sum()
    loss.backward()
    assert first.grad is not None and torch.isfinite(first.grad).all()
    assert first.grad.abs().sum() > 0
    # The zero output layers themselves still learn from the first step.
    vp_last = net.dynamics_net.value_prefix.fc[-1].weight
    assert vp_last.grad is not None and vp_last.grad.abs().sum() > 0


def test_gradients_reach_representation_through_heads() -> None:
    torch.manual_seed(0)
    net = build_model(_mlp_cfg(), (4,), num_actions=2, frame_stack=1).train()
    _randomise_last_layers(net)
    out = net.initial_inference(torch.randn(4, 4))
    latent, state = out.latent, net.initial_lstm_state(4)
    for _ in range(5):
        rec = net.recurrent_inference(latent, state, torch.tensor([0, 1, 1, 0]))
        latent, state = rec.latent, rec.lstm_state
    rec.value_prefix_logits.logsumexp(-1).sum().backward()
    first = net.representation_net.net[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    lstm_w = net.dynamics_net.value_prefix.lstm.weight_ih_l0
    assert lstm_w.grad is not None and lstm_w.grad.abs().sum() > 0
    dyn_w = net.dynamics_net.net[0].weight
    assert dyn_w.grad is not None and dyn_w.grad.abs().sum() > 0


def test_eval_mode_deterministic_and_batch_independent(conv_net: EfficientZeroNet) -> None:
    torch.manual_seed(0)
    net = build_model(_cfg(), (3, 96, 96), num_actions=18, frame_stack=4)
    _randomise_last_layers(net)
    net.eval()
    obs = _obs()
    actions = torch.tensor([2, 7])
    with torch.no_grad():
        o1 = net.initial_inference(obs)
        o2 = net.initial_inference(obs)
        r1 = net.recurrent_inference(o1.latent, net.initial_lstm_state(2), actions)
        r2 = net.recurrent_inference(o2.latent, net.initial_lstm_state(2), actions)
        single = net.initial_inference(obs[:1])
    for a, b in zip(o1, o2, strict=False):
        assert torch.equal(a, b)
    for a, b in zip((r1.latent, r1.value_prefix_logits, r1.policy_logits),
                    (r2.latent, r2.value_prefix_logits, r2.policy_logits), strict=False):
        assert torch.equal(a, b)
    torch.testing.assert_close(single.value_logits, o1.value_logits[:1], rtol=1e-4, atol=1e-5)


def test_mlp_shapes_and_bounded_latent(mlp_net: EfficientZeroNet) -> None:
    mlp_net.eval()
    with torch.no_grad():
        out = mlp_net.initial_inference(torch.randn(2, 4))
        assert out.latent.shape == (2, 32)
        assert out.value_logits.shape == (2, 21)
        assert out.policy_logits.shape == (2, 2)
        state = mlp_net.initial_lstm_state(2, torch.device("cpu"))
        latent = out.latent
        for _ in range(5):
            rec = mlp_net.recurrent_inference(latent, state, torch.tensor([0, 1]))
            latent, state = rec.latent, rec.lstm_state
            # Min-max normalisation keeps every latent inside [0, 1].
            assert latent.min() >= 0.0 and latent.max() <= 1.0 + 1e-6
        assert rec.value_prefix_logits.shape == (2, 21)
        assert rec.lstm_state[0].shape == (1, 2, 64)
        assert mlp_net.project(latent, with_head=True).shape == (2, 64)
        assert mlp_net.project(latent, with_head=False).shape == (2, 64)


def test_mlp_frame_stack_input_width() -> None:
    net = build_model(_mlp_cfg(), (4,), num_actions=3, frame_stack=3).eval()
    with torch.no_grad():
        assert net.initial_inference(torch.randn(2, 12)).policy_logits.shape == (2, 3)


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError):
        build_model(_cfg(kind="transformer"), (3, 96, 96), 18, 4)
    with pytest.raises(ValueError):
        build_model(_cfg(), (4,), 2, 1)
    with pytest.raises(ValueError):
        build_model(_cfg(kind="mlp"), (3, 96, 96), 2, 1)


def test_conv_forward_is_fast(conv_net: EfficientZeroNet) -> None:
    conv_net.eval()
    obs = _obs()
    with torch.no_grad():
        conv_net.initial_inference(obs)  # warm-up
        start = time.perf_counter()
        out = conv_net.initial_inference(obs)
        conv_net.recurrent_inference(out.latent, conv_net.initial_lstm_state(2),
                                     torch.tensor([0, 1]))
        elapsed = time.perf_counter() - start
    # ~0.05 s on a 2-core CPU; the bound only catches something pathological.
    assert elapsed < 2.0, elapsed


def test_real_model_config_has_the_fields_if_present() -> None:
    config = pytest.importorskip("ezengine.config")
    model_config = getattr(config, "ModelConfig", None)
    if model_config is None:
        pytest.skip("ezengine.config.ModelConfig not written yet")
    names = {f.name for f in dataclasses.fields(model_config)}
    missing = [f for f in MODEL_FIELDS if f not in names]
    assert not missing, f"ModelConfig lacks fields build_model reads: {missing}"
    # Its defaults are the paper's network.
    net = build_model(model_config(), (3, 96, 96), num_actions=18, frame_stack=4)
    assert sum(p.numel() for p in net.parameters()) == 8_350_660
    net = build_model(model_config(kind="mlp"), (4,), num_actions=2, frame_stack=1).eval()
    with torch.no_grad():
        assert net.initial_inference(torch.randn(2, 4)).value_logits.shape == (2, 601)


def test_layer_norm_option_removes_every_batchnorm1d_and_train_eval_agree() -> None:
    torch.manual_seed(0)
    net = build_model(_cfg(kind="mlp", latent_dim=32, hidden_dim=64, lstm_hidden=64,
                           support_size=10, projection_hidden=64, projection_dim=64,
                           projection_head_hidden=32, norm="layer"), (4,), 2, 1)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in net.modules())
    for m in net.modules():  # non-zero heads, so the comparison means something
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    obs = torch.randn(6, 4)
    outputs = []
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            root = net.initial_inference(obs)
            step = net.recurrent_inference(root.latent, net.initial_lstm_state(6),
                                           torch.tensor([0, 1, 0, 1, 1, 0]))
        outputs.append(step.value_prefix_logits)
    # No batch statistics: the search (eval mode) sees what training (train mode) saw.
    torch.testing.assert_close(outputs[0], outputs[1])


def test_the_small_conv_body_keeps_minatar_frames_at_full_resolution() -> None:
    # MinAtar Breakout: 4 bool channels of 10x10, 3 actions. The Atari body would
    # downsample to 1x1; the small one keeps 10x10.
    torch.manual_seed(0)
    net = build_model(_cfg(kind="auto", channels=16, lstm_hidden=32, support_size=10,
                           projection_hidden=32, projection_dim=32, projection_head_hidden=16),
                      (4, 10, 10), num_actions=3, frame_stack=2).eval()
    out = net.initial_inference(torch.randint(0, 2, (5, 8, 10, 10), dtype=torch.uint8) * 255)
    assert out.latent.shape == (5, 16, 10, 10)
    assert out.policy_logits.shape == (5, 3) and out.value_logits.shape == (5, 21)
    atari = build_model(_cfg(conv_body="atari", lstm_hidden=32, support_size=10), (4, 10, 10),
                        num_actions=3, frame_stack=2).eval()
    assert atari.initial_inference(torch.zeros(1, 8, 10, 10)).latent.shape[-2:] == (1, 1)
