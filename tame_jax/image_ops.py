"""Small image operations shared by the model, the losses, the metrics and the explainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: jax.Array) -> jax.Array:
    """Returns ImageNet mean/std normalised images; x is (B, H, W, 3) in [0, 1]."""
    mean = jnp.asarray(IMAGENET_MEAN, dtype=x.dtype)
    std = jnp.asarray(IMAGENET_STD, dtype=x.dtype)
    return (x - mean) / std


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Returns x (B, h, w, C) resized to (B, *size, C) like PyTorch bilinear, align_corners=False.

    Half-pixel centres and no antialiasing, so downsampling matches `F.interpolate` too.
    """
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear", antialias=False)


def minmax_normalize(maps: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Returns maps (B, H, W) scaled per image to [0, 1]; a constant map becomes all zeros."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    return (maps - lo) / jnp.maximum(hi - lo, eps)
