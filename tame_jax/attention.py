"""The TAME attention module and its ablation variants (DESIGN.md §1, "Attention module").

Feature maps come in NHWC, largest first; the module returns class logits maps `c`
(B, S, S, N) for the N requested classes (class-selective fusion) or (B, S, S, K) for all.
Parameter names mirror the reference PyTorch checkpoints (`convs.{i}`, `bns.{i}`, `fuser`),
so `tame_jax.weights.tame_variables_from_state_dict` is a direct mapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tame_jax.image_ops import resize_bilinear

VARIANTS = ("tame", "noskip", "noskip_nobn", "sigmoid_branch", "lcam_img")


def torch_default_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Returns a kernel (kh, kw, C_in, C_out) drawn like PyTorch's default Conv2d init.

    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kh * kw * C_in.
    """
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _bias_init(fan_in: int):
    """Returns a bias initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Conv2d default)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm as torch.nn.BatchNorm2d: biased variance to normalise, unbiased to track.

    In training the batch statistics are taken over every axis but the last and, inside
    shard_map (or vmap), over `axis_name` too: the global batch. The running variance is
    updated with the unbiased batch variance var * n / (n - 1), n = global batch x H x W, as
    PyTorch does (flax's nn.BatchNorm tracks the biased one), so that eval-mode outputs agree
    with checkpoints of the reference implementation. `momentum` is PyTorch's (0.1 = 10% new).
    Variables: params `scale`, `bias`; batch_stats `mean`, `var` (flax's names).
    """

    use_running_average: bool
    axis_name: str | None = None
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns x (..., C) normalised per channel, scaled and shifted."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = xf.mean(axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.square(xf - mean).mean(axes)  # two passes: no E[x^2] - E[x]^2 cancellation
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
                n = n * jax.lax.axis_size(self.axis_name)  # a Python int
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        y = (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def _conv1x1(features: int, in_features: int, dtype: Any, name: str) -> nn.Conv:
    """Returns a 1x1 convolution with bias, float32 params, PyTorch default initialisation."""
    return nn.Conv(
        features,
        (1, 1),
        use_bias=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_init,
        bias_init=_bias_init(in_features),
        name=name,
    )


class ClassFuser(nn.Module):
    """1x1 convolution C -> K that can compute only the output channels of chosen classes."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, classes: jax.Array | None = None,
                 per_image: bool = False) -> jax.Array:
        """Returns (B, S, S, N) logits for classes (N,) int, or (B, S, S, K) when None.

        With per_image, classes is (B,) and the result is (B, S, S): image b's map of class b.

        z: (B, S, S, C). Params: kernel (1, 1, C, K), bias (K,), as an nn.Conv 1x1 would have.
        """
        c_in = z.shape[-1]
        kernel = self.param("kernel", torch_default_init, (1, 1, c_in, self.num_classes))
        bias = self.param("bias", _bias_init(c_in), (self.num_classes,))
        w = kernel[0, 0]  # (C, K)
        if classes is not None:
            classes = jnp.asarray(classes, jnp.int32)
            w = jnp.take(w, classes, axis=1)  # (C, N)
            bias = jnp.take(bias, classes, axis=0)  # (N,)
        if per_image:
            out = jnp.einsum("bhwc,cb->bhw", z.astype(self.dtype), w.astype(self.dtype))
            return out + bias.astype(self.dtype)[:, None, None]
        out = jnp.einsum("bhwc,cn->bhwn", z.astype(self.dtype), w.astype(self.dtype))
        return out + bias.astype(self.dtype)


class TAMEAttention(nn.Module):
    """TAME attention: per-layer branches, resize to S x S, concat, class fusion.

    Variants (VARIANTS): `tame` (conv C->C, BN, + skip, ReLU), `sigmoid_branch` (sigmoid instead
    of ReLU), `noskip` (conv C->K, BN(K), ReLU; fusion n*K -> K), `noskip_nobn` (conv C->C,
    ReLU), `lcam_img` (last feature map only, a single 1x1 conv C->K named `fuser`).
    BatchNorm follows PyTorch (eps 1e-5, momentum 0.1, running variance unbiased; `BatchNorm`);
    in training its statistics are taken over `axis_name` too (global-batch BN in shard_map).
    """

    num_classes: int
    variant: str = "tame"
    max_size: int = 56  # S = min(spatial size of the first (largest) feature map, max_size)
    axis_name: str | None = None
    dtype: Any = jnp.float32  # computation dtype; params stay float32, output is float32

    @nn.compact
    def __call__(
        self,
        features: Sequence[jax.Array],
        classes: jax.Array | None = None,
        train: bool = False,
        per_image: bool = False,
    ) -> jax.Array:
        """Returns class logits maps c: (B, S, S, N) for classes (N,) int, or (B, S, S, K).

        per_image=True with classes (B,): returns (B, S, S), image b's map of classes[b] only
        (the explanation path: one fusion row per image).

        features: sequence of (B, h_i, w_i, C_i) square maps, largest first.
        """
        if self.variant not in VARIANTS:
            raise ValueError(
                f"Unknown attention variant {self.variant!r}; choose one of {VARIANTS}."
            )
        if not features:
            raise ValueError("TAMEAttention needs at least one feature map.")
        features = [jnp.asarray(f) for f in features]
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[1] != f.shape[2]:
                raise ValueError(
                    f"Feature map {i} has shape {f.shape}; expected square NHWC (B, h, h, C)."
                )
        fuser = ClassFuser(self.num_classes, dtype=self.dtype, name="fuser")

        if self.variant == "lcam_img":
            f = features[-1].astype(self.dtype)  # (B, s, s, C), S = s
            return fuser(f, classes, per_image).astype(jnp.float32)

        size = min(features[0].shape[1], self.max_size)
        branches = []
        for i, f in enumerate(features):
            f = f.astype(self.dtype)  # (B, h_i, h_i, C_i)
            c_i = f.shape[-1]
            width = self.num_classes if self.variant == "noskip" else c_i
            y = _conv1x1(width, c_i, self.dtype, f"convs_{i}")(f)
            if self.variant != "noskip_nobn":
                y = BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                              dtype=self.dtype, name=f"bns_{i}")(y)
            if self.variant in ("tame", "sigmoid_branch"):
                y = y + f
            y = jax.nn.sigmoid(y) if self.variant == "sigmoid_branch" else jax.nn.relu(y)
            branches.append(resize_bilinear(y, (size, size)))  # (B, S, S, width)
        z = jnp.concatenate(branches, axis=-1)  # (B, S, S, sum of widths)
        return fuser(z, classes, per_image).astype(jnp.float32)
