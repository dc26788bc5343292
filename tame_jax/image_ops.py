"""Small image operations shared by the model, the losses, the metrics and the explainer."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Returns (x - mean) / std per channel; x is (B, H, W, 3) in [0, 1]."""
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Returns x (B, h, w, C) resized to (B, *size, C) like PyTorch bilinear, align_corners=False.

    Half-pixel centres and no antialiasing, so downsampling matches `F.interpolate` too.
    """
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear", antialias=False)


def _corner_weights(n_in: int, n_out: int) -> np.ndarray:
    """Returns the (n_out, n_in) linear-interpolation matrix with aligned corners."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    i0 = np.minimum(np.floor(src).astype(int), max(n_in - 2, 0))
    t = src - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - t
    m[np.arange(n_out), np.minimum(i0 + 1, n_in - 1)] += t
    return m


def resize_bilinear_aligned(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Returns x (B, h, w, C) resized to (B, *size, C) like PyTorch bilinear, align_corners=True
    (`nn.UpsamplingBilinear2d`, which pytorch-grad-cam's Score-CAM uses)."""
    mh = jnp.asarray(_corner_weights(x.shape[1], size[0]), x.dtype)
    mw = jnp.asarray(_corner_weights(x.shape[2], size[1]), x.dtype)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", mh, x, mw)


def minmax_normalize(maps: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Returns maps (B, H, W) scaled per image to [0, 1]; a constant map becomes all zeros."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    return (maps - lo) / jnp.maximum(hi - lo, eps)
