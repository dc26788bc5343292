"""SGD with Nesterov momentum, two parameter groups, and the one-cycle schedule of the paper.

The reference runs used PyTorch's `SGD(nesterov=True, weight_decay=5e-4)` with `OneCycleLR`
(cosine annealing, `pct_start=0.3`, `div_factor=25`, `final_div_factor=1e4`, momentum cycled
between 0.85 and 0.95). This module reproduces that arithmetic step for step:

- schedules follow OneCycleLR's phase boundaries exactly (the peak is at step
  `pct_start * total_steps - 1`, the last value at step `total_steps - 1`);
- weight decay is added to the gradient before momentum (classic, coupled L2), on kernels and
  BatchNorm scales only; biases get twice the learning rate (`bias_lr_factor`) and no decay;
- the momentum buffer follows torch: `buf = m * buf + g`, `update = g + m * buf`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

WEIGHT_DECAY = 5e-4
BIAS_LR_FACTOR = 2.0
DIV_FACTOR = 25.0
FINAL_DIV_FACTOR = 1e4
PCT_START = 0.3
MAX_MOMENTUM = 0.95
BASE_MOMENTUM = 0.85

Schedule = Callable[[jax.Array | int], jax.Array]


def _cos_anneal(start: float, end: float, pct: jax.Array) -> jax.Array:
    """Returns the cosine interpolation from start (pct=0) to end (pct=1)."""
    # (cos(pi p) + 1) / 2 written as cos^2(pi p / 2): no float32 cancellation near p = 1.
    return end + (start - end) * jnp.cos(0.5 * math.pi * pct) ** 2


def _one_cycle(
    total_steps: int, start: float, peak: float, end: float, pct_start: float
) -> Schedule:
    """Returns a schedule start -> peak (cosine) until the warm-up end, then peak -> end."""
    if total_steps < 2:
        raise ValueError(f"one-cycle needs 2 steps or more, got total_steps={total_steps}")
    warmup_end = float(pct_start * total_steps) - 1.0
    last = float(total_steps - 1)
    # Very short runs (pct_start * total_steps <= 1) have no warm-up: like OneCycleLR, the
    # annealing phase then starts at the (non-positive) warm-up end.

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        up = _cos_anneal(start, peak, jnp.clip(step / max(warmup_end, 1e-9), 0.0, 1.0))
        down = _cos_anneal(peak, end, jnp.clip((step - warmup_end) / (last - warmup_end), 0.0, 1.0))
        return jnp.where(step <= warmup_end, up, down)

    return schedule


def one_cycle_lr(total_steps: int, max_lr: float, pct_start: float = PCT_START) -> Schedule:
    """Returns the learning-rate schedule: max_lr/25 -> max_lr -> max_lr/25/1e4."""
    initial = max_lr / DIV_FACTOR
    return _one_cycle(total_steps, initial, max_lr, initial / FINAL_DIV_FACTOR, pct_start)


def one_cycle_momentum(total_steps: int, pct_start: float = PCT_START) -> Schedule:
    """Returns the momentum schedule, inverse to the learning rate: 0.95 -> 0.85 -> 0.95."""
    return _one_cycle(total_steps, MAX_MOMENTUM, BASE_MOMENTUM, MAX_MOMENTUM, pct_start)


def param_group(path: tuple, _leaf: jax.Array) -> str:
    """Returns 'bias' for biases (conv and BatchNorm), 'decay' for kernels and BatchNorm scales."""
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "bias":
        return "bias"
    if name in ("kernel", "scale"):
        return "decay"
    where = jax.tree_util.keystr(path)
    raise ValueError(f"parameter {where} is neither a kernel, a scale nor a bias")


def _sgd(learning_rate: Schedule, momentum: Schedule) -> optax.GradientTransformation:
    """Returns torch-style Nesterov SGD whose learning rate and momentum follow the schedules."""

    def make(learning_rate, momentum):
        return optax.chain(
            optax.trace(decay=momentum, nesterov=True), optax.scale_by_learning_rate(learning_rate)
        )

    return optax.inject_hyperparams(make)(learning_rate=learning_rate, momentum=momentum)


def make_optimizer(
    learning_rate: float | Schedule,
    total_steps: int | None = None,
    *,
    momentum: float | Schedule | None = None,
    weight_decay: float = WEIGHT_DECAY,
    bias_lr_factor: float = BIAS_LR_FACTOR,
) -> optax.GradientTransformation:
    """Returns the two-group Nesterov SGD; a float learning rate gets the one-cycle schedules.

    A callable `learning_rate` (used by the LR finder) is taken as the schedule of the kernel
    group; biases always get `bias_lr_factor` times it (TAME 2; T-TAME's ViT recipe 1).
    """
    if callable(learning_rate):
        lr = learning_rate
    else:
        if total_steps is None:
            raise ValueError("make_optimizer needs total_steps for the one-cycle schedule")
        lr = one_cycle_lr(total_steps, learning_rate)
    if momentum is None:
        if total_steps is None:
            raise ValueError("make_optimizer needs total_steps for the momentum schedule")
        momentum = one_cycle_momentum(total_steps)
    mom = momentum if callable(momentum) else (lambda _: jnp.asarray(momentum, jnp.float32))
    bias_lr = lambda step: bias_lr_factor * lr(step)
    decayed = optax.chain(optax.add_decayed_weights(weight_decay), _sgd(lr, mom))
    return optax.multi_transform(
        {"decay": decayed, "bias": _sgd(bias_lr, mom)},
        lambda params: jax.tree_util.tree_map_with_path(param_group, params),
    )
