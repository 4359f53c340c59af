"""EfficientZero networks: representation, dynamics (with value-prefix LSTM), prediction,
and the SimSiam projection used by the consistency loss, as in the EfficientZero paper.

Two bodies share one interface, :class:`EfficientZeroNet`:

- ``kind="conv"`` for image observations: the paper's Atari network, layer for layer
  (about 8.4M parameters with 18 actions and the default sizes).
- ``kind="mlp"`` for vector observations (CartPole and other gymnasium tasks): the same
  roles, heads, LSTM and projection with fully connected bodies.

The tree search and the learner only use ``initial_inference`` and
``recurrent_inference`` (plus ``project`` for the consistency loss). Value and
value-prefix outputs are logits over the support -S..S; convert them with
:func:`ezengine.support.support_to_scalar`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LSTMState = tuple[Tensor, Tensor]


class InitialOutput(NamedTuple):
    """Result of :meth:`EfficientZeroNet.initial_inference` for a batch of B observations.

    latent: [B, C, H', W'] (conv) or [B, latent_dim] (mlp), float32.
    value_logits: [B, 2S+1]; policy_logits: [B, A].
    """

    latent: Tensor
    value_logits: Tensor
    policy_logits: Tensor


class RecurrentOutput(NamedTuple):
    """Result of :meth:`EfficientZeroNet.recurrent_inference` for a batch of B states.

    latent: next latent, shaped as in :class:`InitialOutput`.
    lstm_state: (h, c), each [1, B, lstm_hidden], after this step.
    value_prefix_logits, value_logits: [B, 2S+1]; policy_logits: [B, A].
    """

    latent: Tensor
    lstm_state: LSTMState
    value_prefix_logits: Tensor
    value_logits: Tensor
    policy_logits: Tensor


# --------------------------------------------------------------------------- building blocks


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _down(n: int) -> int:
    # Spatial size after a 3x3 stride-2 pad-1 conv or pool: floor((n - 1) / 2) + 1.
    return (n - 1) // 2 + 1


class ResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + skip, ReLU. [B, in, H, W] -> [B, out, H/stride, W/stride].

    When the shape changes, the skip path is a bias-free strided conv3x3 (no BN), which
    is what the paper's down-sampling block uses.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, stride: int = 1) -> None:
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.skip: nn.Module = (
            _conv3x3(in_ch, out_ch, stride) if (stride != 1 or in_ch != out_ch) else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.skip(x))


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, *, zero_last: bool) -> nn.Sequential:
    """Linear-BN-ReLU for each hidden size, then a plain Linear to ``out_dim``.

    ``zero_last`` zero-initialises the final Linear (weights and bias) so a fresh head
    outputs all-zero logits: a uniform policy and a value of exactly 0.
    """
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.BatchNorm1d(h), nn.ReLU()]
        in_dim = h
    last = nn.Linear(in_dim, out_dim)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _normalize_min_max(x: Tensor) -> Tensor:
    # Per-sample min-max scaling to [0, 1] (MuZero's trick): keeps MLP latents bounded
    # through long unrolls, where a residual dynamics could otherwise drift without limit.
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-5)


class ValuePrefixHead(nn.Module):
    """One LSTM step over a flattened state feature, then BN1d-ReLU-MLP to 2S+1 logits.

    feature: [B, in_dim]; lstm_state (h, c) each [1, B, hidden].
    """

    def __init__(self, in_dim: int, lstm_hidden: int, head_hidden: Sequence[int],
                 support_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=in_dim, hidden_size=lstm_hidden)
        self.bn = nn.BatchNorm1d(lstm_hidden)
        self.fc = mlp(lstm_hidden, head_hidden, 2 * support_size + 1, zero_last=True)

    def forward(self, feature: Tensor, lstm_state: LSTMState) -> tuple[Tensor, LSTMState]:
        out, new_state = self.lstm(feature.unsqueeze(0), lstm_state)
        logits = self.fc(F.relu(self.bn(out.squeeze(0))))
        return logits, new_state


# --------------------------------------------------------------------------- conv body


class ConvRepresentation(nn.Module):
    """[B, C*stack, H, W] uint8 (or float already in [0, 1]) -> [B, channels, H/16, W/16]
    (the Atari body), or [B, channels, H, W] with ``small`` (frames like MinAtar's 10x10,
    which 16x downsampling would leave a pixel of): a stem conv and `blocks` ResBlocks."""

    def __init__(self, in_ch: int, channels: int, small: bool = False, blocks: int = 2
                 ) -> None:
        super().__init__()
        if small:
            self.stem = nn.Sequential(_conv3x3(in_ch, channels), nn.BatchNorm2d(channels),
                                      nn.ReLU())
            self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
            return
        half = channels // 2
        self.stem = nn.Sequential(_conv3x3(in_ch, half, stride=2), nn.BatchNorm2d(half), nn.ReLU())
        self.body = nn.Sequential(
            ResBlock(half),
            ResBlock(half, channels, stride=2),
            ResBlock(channels),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
            ResBlock(channels),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
            ResBlock(channels),
        )

    def forward(self, obs: Tensor) -> Tensor:
        # Observations travel as uint8 (4x less memory and transfer); scaling happens here
        # so every caller gets the same convention.
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()
        return self.body(self.stem(x))


class ConvDynamics(nn.Module):
    """(state [B, C, h, w], actions [B], lstm_state) -> (next state, lstm_state, vp logits)."""

    def __init__(self, channels: int, reduced_channels: int, spatial: int, num_actions: int,
                 lstm_hidden: int, head_hidden: Sequence[int], support_size: int) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.conv = _conv3x3(channels + 1, channels)
        self.bn = nn.BatchNorm2d(channels)
        self.res = ResBlock(channels)
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, reduced_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(reduced_channels),
            nn.ReLU(),
        )
        self.value_prefix = ValuePrefixHead(reduced_channels * spatial, lstm_hidden,
                                            head_hidden, support_size)

    def forward(self, state: Tensor, lstm_state: LSTMState, actions: Tensor
                ) -> tuple[Tensor, LSTMState, Tensor]:
        b, _, h, w = state.shape
        # A single plane holding a / |A| encodes the action without |A| extra channels.
        plane = (actions.reshape(b, 1, 1, 1).to(state.dtype) / self.num_actions).expand(b, 1, h, w)
        x = self.bn(self.conv(torch.cat([state, plane], dim=1)))
        next_state = self.res(F.relu(x + state))
        logits, lstm_state = self.value_prefix(self.reduce(next_state).flatten(1), lstm_state)
        return next_state, lstm_state, logits


class ConvPrediction(nn.Module):
    """state [B, C, h, w] -> (value logits [B, 2S+1], policy logits [B, A])."""

    def __init__(self, channels: int, reduced_channels: int, spatial: int, num_actions: int,
                 head_hidden: Sequence[int], support_size: int) -> None:
        super().__init__()
        self.res = ResBlock(channels)
        flat = reduced_channels * spatial

        def reduce() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, reduced_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduced_channels),
                nn.ReLU(),
                nn.Flatten(),
            )

        self.value_reduce = reduce()
        self.policy_reduce = reduce()
        self.value_fc = mlp(flat, head_hidden, 2 * support_size + 1, zero_last=True)
        self.policy_fc = mlp(flat, head_hidden, num_actions, zero_last=True)

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        x = self.res(state)
        return self.value_fc(self.value_reduce(x)), self.policy_fc(self.policy_reduce(x))


# --------------------------------------------------------------------------- mlp body


class MLPRepresentation(nn.Module):
    """[B, D*stack] float -> [B, latent_dim], min-max normalised to [0, 1] per sample."""

    def __init__(self, in_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
        )

    def forward(self, obs: Tensor) -> Tensor:
        return _normalize_min_max(self.net(obs.float()))


class MLPDynamics(nn.Module):
    """(latent [B, L], actions [B], lstm_state) -> (next latent, lstm_state, vp logits).

    next = minmax(latent + Linear(ReLU(BN(Linear([latent, onehot(a)]))))); the value-prefix
    LSTM reads the next latent directly (input size L).
    """

    def __init__(self, latent_dim: int, hidden_dim: int, num_actions: int, lstm_hidden: int,
                 head_hidden: Sequence[int], support_size: int) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.net = nn.Sequential(
            nn.Linear(latent_dim + num_actions, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
        )
        self.value_prefix = ValuePrefixHead(latent_dim, lstm_hidden, head_hidden, support_size)

    def forward(self, latent: Tensor, lstm_state: LSTMState, actions: Tensor
                ) -> tuple[Tensor, LSTMState, Tensor]:
        onehot = F.one_hot(actions.reshape(-1).long(), self.num_actions).to(latent.dtype)
        next_latent = _normalize_min_max(latent + self.net(torch.cat([latent, onehot], dim=1)))
        logits, lstm_state = self.value_prefix(next_latent, lstm_state)
        return next_latent, lstm_state, logits


class MLPPrediction(nn.Module):
    """latent [B, L] -> (value logits [B, 2S+1], policy logits [B, A]); heads read the
    latent directly through ``head_hidden`` Linear-BN-ReLU layers."""

    def __init__(self, latent_dim: int, num_actions: int, head_hidden: Sequence[int],
                 support_size: int) -> None:
        super().__init__()
        self.value_fc = mlp(latent_dim, head_hidden, 2 * support_size + 1, zero_last=True)
        self.policy_fc = mlp(latent_dim, head_hidden, num_actions, zero_last=True)

    def forward(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        return self.value_fc(latent), self.policy_fc(latent)


# --------------------------------------------------------------------------- the network


class EfficientZeroNet(nn.Module):
    """The full EfficientZero model; build it with :func:`build_model`.

    Attributes ``num_actions``, ``support_size`` (S) and ``lstm_hidden`` describe the
    output shapes. Value-like outputs are logits over 2S+1 bins.

    BatchNorm layers need batches of at least 2 in train mode; run the search with the
    model in eval mode.
    """

    def __init__(self, representation: nn.Module, dynamics: nn.Module, prediction: nn.Module,
                 latent_flat_dim: int, num_actions: int, support_size: int, lstm_hidden: int,
                 projection_hidden: int, projection_dim: int, projection_head_hidden: int
                 ) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.support_size = support_size
        self.lstm_hidden = lstm_hidden
        self.representation_net = representation
        self.dynamics_net = dynamics
        self.prediction_net = prediction
        # SimSiam projector and predictor; the target branch skips the head.
        self.projection = nn.Sequential(
            nn.Linear(latent_flat_dim, projection_hidden), nn.BatchNorm1d(projection_hidden),
            nn.ReLU(),
            nn.Linear(projection_hidden, projection_hidden), nn.BatchNorm1d(projection_hidden),
            nn.ReLU(),
            nn.Linear(projection_hidden, projection_dim), nn.BatchNorm1d(projection_dim),
        )
        self.projection_head = nn.Sequential(
            nn.Linear(projection_dim, projection_head_hidden),
            nn.BatchNorm1d(projection_head_hidden), nn.ReLU(),
            nn.Linear(projection_head_hidden, projection_dim),
        )

    def represent(self, obs: Tensor) -> Tensor:
        """obs (see :func:`build_model`) -> latent [B, C, h, w] or [B, latent_dim]."""
        return self.representation_net(obs)

    def dynamics(self, latent: Tensor, lstm_state: LSTMState, actions: Tensor
                 ) -> tuple[Tensor, LSTMState, Tensor]:
        """One model step: (next latent, next (h, c), value-prefix logits [B, 2S+1]).

        actions: int64 [B] in 0..A-1. lstm_state: (h, c) each [1, B, lstm_hidden]; pass
        :meth:`initial_lstm_state` at horizon resets.
        """
        return self.dynamics_net(latent, lstm_state, actions)

    def predict(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """latent -> (value logits [B, 2S+1], policy logits [B, A])."""
        return self.prediction_net(latent)

    def project(self, latent: Tensor, with_head: bool = True) -> Tensor:
        """latent -> [B, projection_dim] float32.

        ``with_head=True`` adds the predictor (online branch of the consistency loss);
        the target branch calls ``with_head=False`` under ``torch.no_grad()``.
        """
        z = self.projection(latent.flatten(1))
        return self.projection_head(z) if with_head else z

    def initial_inference(self, obs: Tensor) -> InitialOutput:
        """Root inference: representation then prediction."""
        latent = self.represent(obs)
        value_logits, policy_logits = self.predict(latent)
        return InitialOutput(latent, value_logits, policy_logits)

    def recurrent_inference(self, latent: Tensor, lstm_state: LSTMState, actions: Tensor
                            ) -> RecurrentOutput:
        """Dynamics step from ``latent`` with ``actions`` [B], then prediction on the result."""
        next_latent, next_state, value_prefix_logits = self.dynamics(latent, lstm_state, actions)
        value_logits, policy_logits = self.predict(next_latent)
        return RecurrentOutput(next_latent, next_state, value_prefix_logits, value_logits,
                               policy_logits)

    def initial_lstm_state(self, batch_size: int, device: torch.device | str | None = None
                           ) -> LSTMState:
        """Zero (h, c), each [1, batch_size, lstm_hidden] float32."""
        shape = (1, batch_size, self.lstm_hidden)
        return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))


def use_layer_norm(module: nn.Module) -> None:
    """Replace every BatchNorm1d inside `module` by a LayerNorm of the same width.

    BatchNorm's running statistics are a moving average over the unroll steps of training
    batches (the last steps dominate), while the search evaluates one depth at a time: on
    CartPole this made eval-mode value-prefix predictions about 4x too large and flattened
    the values the search saw. LayerNorm has no running statistics, so train and eval
    agree.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            setattr(module, name, nn.LayerNorm(child.num_features))
        else:
            use_layer_norm(child)


def model_kind(kind: str, observation_shape: tuple[int, ...]) -> str:
    """'conv' or 'mlp': model.kind, with 'auto' following the observations (images: conv)."""
    if kind != "auto":
        return kind
    return "conv" if len(observation_shape) == 3 else "mlp"


def conv_body(body: str, observation_shape: tuple[int, ...]) -> str:
    """'atari' or 'small': model.conv_body, with 'auto' taking 'small' up to 32x32 frames."""
    if body != "auto":
        return body
    return "small" if max(observation_shape[1:]) <= 32 else "atari"


def build_model(cfg: Any, observation_shape: tuple[int, ...], num_actions: int,
                frame_stack: int) -> EfficientZeroNet:
    """Build the network described by a ``ModelConfig`` (``cfg.kind`` "conv", "mlp", or
    "auto": conv for (C, H, W) frames, mlp for (D,) vectors).

    conv: ``observation_shape`` is one frame (C, H, W); the model takes
    [B, C*frame_stack, H, W] uint8 (scaled by 1/255 inside) or float already in [0, 1].
    The latent is [B, channels, ceil(H/16), ceil(W/16)] (64x6x6 for 96x96 frames) with the
    'atari' body, [B, channels, H, W] with the 'small' one.

    mlp: ``observation_shape`` is (D,); the model takes [B, D*frame_stack] float32 and the
    latent is [B, latent_dim] in [0, 1] (min-max normalised per sample in both
    representation and dynamics). Dynamics: concat(latent, one-hot action) ->
    Linear(hidden_dim)-BN-ReLU-Linear(latent_dim), plus the input latent as residual.
    Value and policy heads are MLPs on the latent; the value-prefix LSTM reads the next
    latent.
    """
    head_hidden = list(cfg.head_hidden)
    s = int(cfg.support_size)
    kind = model_kind(cfg.kind, observation_shape)
    if kind == "conv":
        if len(observation_shape) != 3:
            raise ValueError(f"model.kind 'conv' needs image observations, got observations "
                             f"of shape {observation_shape}; use model.kind 'mlp' or 'auto'")
        c, h, w = observation_shape
        small = conv_body(cfg.conv_body, observation_shape) == "small"
        if not small:
            for _ in range(4):  # stem conv, strided ResBlock, two average pools
                h, w = _down(h), _down(w)
        spatial = h * w
        representation: nn.Module = ConvRepresentation(c * frame_stack, cfg.channels, small,
                                                        cfg.blocks)
        dynamics: nn.Module = ConvDynamics(cfg.channels, cfg.reduced_channels, spatial,
                                           num_actions, cfg.lstm_hidden, head_hidden, s)
        prediction: nn.Module = ConvPrediction(cfg.channels, cfg.reduced_channels, spatial,
                                               num_actions, head_hidden, s)
        flat = cfg.channels * spatial
    elif kind == "mlp":
        if len(observation_shape) != 1:
            raise ValueError(f"model.kind 'mlp' needs vector observations, got observations "
                             f"of shape {observation_shape}; use model.kind 'conv' or 'auto'")
        in_dim = math.prod(observation_shape) * frame_stack
        representation = MLPRepresentation(in_dim, cfg.hidden_dim, cfg.latent_dim)
        dynamics = MLPDynamics(cfg.latent_dim, cfg.hidden_dim, num_actions, cfg.lstm_hidden,
                               head_hidden, s)
        prediction = MLPPrediction(cfg.latent_dim, num_actions, head_hidden, s)
        flat = cfg.latent_dim
    else:
        raise ValueError(f"unknown model kind {cfg.kind!r}; expected 'conv' or 'mlp'")
    net = EfficientZeroNet(
        representation, dynamics, prediction, latent_flat_dim=flat, num_actions=num_actions,
        support_size=s, lstm_hidden=cfg.lstm_hidden, projection_hidden=cfg.projection_hidden,
        projection_dim=cfg.projection_dim, projection_head_hidden=cfg.projection_head_hidden,
    )
    if cfg.norm == "layer":
        use_layer_norm(net)
    return net
