"""The learner: EfficientZero loss, optimisation and priorities.

Owns the online model, its target copy and the optimizer. ``train_step`` takes a
:class:`~ezengine.batch.TrainingBatch` and returns metrics and new priorities.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ezengine.batch import TrainingBatch
from ezengine.config import Config
from ezengine.frames import model_inputs
from ezengine.model import EfficientZeroNet
from ezengine.support import scalar_to_support, support_to_scalar

# What train_step reports for every training step: the loss and its parts, the learning
# rate and gradient norm, the target model's lag, and what a failing run is read from (PER
# weights, predicted and target values, priorities).
METRICS = ("loss", "loss_value", "loss_policy", "loss_value_prefix", "loss_consistency", "lr",
           "grad_norm", "target_lag", "is_weight_mean", "value_mean", "value_target_mean",
           "priority_mean")


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity forward; multiplies the gradient flowing back through x by `scale`."""
    return x * scale + x.detach() * (1.0 - scale)


def cross_entropy(target: Tensor, logits: Tensor) -> Tensor:
    """-sum target * log_softmax(logits) over the last axis: [..., N] -> [...]."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def augment_images(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random shift then intensity jitter for a batch of stacked frames (EfficientZero paper).

    x: float [B, C, H, W] in [0, 1]. Replicate-pad by 4, crop back to H x W at a random
    offset, then multiply by 1 + 0.05 * clip(N(0, 1), -2, 2); one draw per sample,
    shared by all its stacked frames.
    """
    b, _, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # [B, W]
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    shifted = shifted.permute(0, 3, 1, 2)
    noise = torch.randn((b, 1, 1, 1), device=x.device, generator=generator).clamp(-2, 2)
    return shifted * (1.0 + 0.05 * noise)


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up to learner.lr, then x lr_decay_factor at each of lr_decay_steps."""
    lc = cfg.learner
    if step < lc.lr_warmup_steps:
        return lc.lr * (step + 1) / lc.lr_warmup_steps
    return lc.lr * lc.lr_decay_factor ** sum(step >= s for s in lc.lr_decay_steps)


class Learner:
    """Online model + target model + SGD.

    Args:
        cfg: the full config.
        model: the online network (moved to `device`).
        device: where training runs.
    """

    def __init__(self, cfg: Config, model: EfficientZeroNet, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.target = copy.deepcopy(self.model).eval()
        self.target.requires_grad_(False)
        lc = cfg.learner
        self.optimizer: torch.optim.Optimizer
        if lc.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lc.lr,
                                              weight_decay=lc.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lc.lr,
                                             momentum=lc.momentum, weight_decay=lc.weight_decay)
        self.use_amp = lc.mixed_precision and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.steps = 0
        self.target_version = 0
        # The weights the target model takes at the next refresh, and their training step.
        self.snapshot = copy.deepcopy(self.model.state_dict())
        self.snapshot_version = 0

    def _inputs(self, frames: np.ndarray, augment: bool) -> tuple[Tensor, Tensor]:
        """Model inputs from a batch's frame windows: at t [B, ...] and at t+1..t+K
        [B, K, ...], images scaled to [0, 1] and (if `augment`) randomly shifted."""
        K = self.cfg.learner.unroll_steps
        t = torch.from_numpy(frames).to(self.device, non_blocking=True)
        b = t.shape[0]
        x = model_inputs(t, t.shape[1] - K)  # [B, K+1, stack*C, ...]
        x = x.reshape(b * (K + 1), *x.shape[2:])
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            if augment:
                x = augment_images(x)
        x = x.reshape(b, K + 1, *x.shape[1:])
        return x[:, 0].contiguous(), x[:, 1:]

    def losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Per-sample loss [B] (before PER weights), its parts (batch means) and the
        predicted values at k = 0 [B]."""
        lc = self.cfg.learner
        model = self.model
        K = lc.unroll_steps
        S = model.support_size
        dev = self.device
        obs, next_obs = self._inputs(batch.frames, lc.augmentation)
        b = obs.shape[0]
        actions = torch.from_numpy(batch.actions).to(dev)
        z = torch.from_numpy(batch.value_targets).to(dev)
        g = torch.from_numpy(batch.value_prefix_targets).to(dev)
        pi = torch.from_numpy(batch.policy_targets).to(dev)
        m = torch.from_numpy(batch.masks).to(dev)

        with torch.no_grad():  # target branch of the consistency loss: stop-gradient
            # Each step's observations are encoded as a batch of their own, as in the
            # reference: BatchNorm statistics per unroll step, not pooled over all K.
            target_proj = [model.project(model.represent(next_obs[:, k].contiguous()),
                                         with_head=False).float() for k in range(K)]

        latent = model.represent(obs)
        value_logits, policy_logits = model.predict(latent)
        values0 = support_to_scalar(value_logits.detach(), S)
        value_loss = cross_entropy(scalar_to_support(z[:, 0], S), value_logits)
        policy_loss = cross_entropy(pi[:, 0], policy_logits)
        vp_loss = torch.zeros(b, device=dev)
        consistency = torch.zeros(b, device=dev)
        lstm = model.initial_lstm_state(b, dev)
        for k in range(1, K + 1):
            latent, lstm, vp_logits = model.dynamics(latent, lstm, actions[:, k - 1])
            latent = scale_gradient(latent, 0.5)
            value_logits, policy_logits = model.predict(latent)
            mk = m[:, k]
            online_proj = model.project(latent, with_head=True).float()
            consistency = consistency + mk * -F.cosine_similarity(
                online_proj, target_proj[k - 1], dim=-1)
            vp_loss = vp_loss + mk * cross_entropy(scalar_to_support(g[:, k - 1], S), vp_logits)
            value_loss = value_loss + mk * cross_entropy(scalar_to_support(z[:, k], S),
                                                         value_logits)
            policy_loss = policy_loss + mk * cross_entropy(pi[:, k], policy_logits)
            if lc.value_prefix_horizon > 0 and k % lc.value_prefix_horizon == 0:
                lstm = model.initial_lstm_state(b, dev)
        per_sample = (lc.consistency_loss_weight * consistency
                      + lc.policy_loss_weight * policy_loss
                      + lc.value_loss_weight * value_loss
                      + lc.value_prefix_loss_weight * vp_loss)
        parts = {"loss_consistency": consistency.mean(), "loss_policy": policy_loss.mean(),
                 "loss_value": value_loss.mean(), "loss_value_prefix": vp_loss.mean()}
        return per_sample, parts, values0

    def train_step(self, batch: TrainingBatch) -> tuple[dict[str, float], np.ndarray]:
        """One SGD step. Returns scalar metrics and new priorities float64 [B]
        (|v_pred(o_t) - z_t| + eps from the online model at k = 0)."""
        lc = self.cfg.learner
        self.model.train()
        lr = learning_rate(self.steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            per_sample, parts, values0 = self.losses(batch)
        weights = torch.from_numpy(batch.weights).to(self.device)
        loss = (weights * per_sample).mean()
        self.optimizer.zero_grad(set_to_none=True)
        # The whole loss gradient is scaled by 1/K, as in the EfficientZero reference code.
        self.scaler.scale(loss / lc.unroll_steps).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), lc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps += 1
        if self.steps % lc.target_update_interval == 0:
            self.update_target()
        z0 = torch.from_numpy(batch.value_targets[:, 0]).to(self.device)
        priorities = ((values0 - z0).abs() + self.cfg.replay.priority_eps).double().cpu().numpy()
        metrics = {name: float(v.detach()) for name, v in parts.items()}
        metrics.update(loss=float(loss.detach()), lr=lr, grad_norm=float(grad_norm),
                       target_lag=self.steps - batch.target_version,
                       # What a failing run is read from: PER weights, values, targets.
                       is_weight_mean=float(batch.weights.mean()),
                       value_mean=float(values0.mean()), value_target_mean=float(z0.mean()),
                       priority_mean=float(priorities.mean()))
        return metrics, priorities

    def update_target(self) -> None:
        """Refresh the target model, as the reference does: it takes the snapshot made at the
        previous refresh, and the online weights become the next snapshot, so targets come
        from weights 1-2 refresh intervals old (200-400 steps at the paper's settings)."""
        self.target.load_state_dict(self.snapshot)
        self.target_version = self.snapshot_version
        self.snapshot = copy.deepcopy(self.model.state_dict())
        self.snapshot_version = self.steps

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume learning (tensors and plain values only)."""
        return {"model": self.model.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "steps": self.steps, "target_version": self.target_version,
                "snapshot": self.snapshot, "snapshot_version": self.snapshot_version,
                # Augmentation draws from torch's generator: resume it where it was.
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.model.load_state_dict(state["model"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state["steps"])
        self.target_version = int(state["target_version"])
        # Checkpoints written before the snapshot existed resume with the target as it.
        self.snapshot = copy.deepcopy(state.get("snapshot", state["target"]))
        self.snapshot_version = int(state.get("snapshot_version", self.target_version))
        torch.set_rng_state(state["torch_rng"].cpu())
