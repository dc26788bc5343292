"""Baseline explanation methods in JAX: Grad-CAM, Grad-CAM++, Score-CAM, Ablation-CAM, RISE.

Every method takes a `tame_jax.model.Model` (any registered backbone) and a layer name; the
backbone taps that layer (`Model.with_taps`), and its 'perturbations' collection gives the
gradient w.r.t. the feature map (of a zero perturbation) and ablates a channel (by adding minus
itself). Images are in [0, 1]; the methods normalise them with the model's mean and std.

All maps come back at image resolution (B, H, W), raw (not min-max normalised). The CAM maps
are computed at feature resolution, ReLU'd, and upsampled bilinearly (half-pixel centres).
Conventions follow the papers and the `grad-cam` PyTorch package (jacobgil):
- Grad-CAM: w_k = mean_ij dy^c/dA_ij^k (y^c = pre-softmax logit); map = ReLU(sum_k w_k A^k).
- Grad-CAM++: closed form with g = dy^c/dA (no exponential), alpha = g^2 / (2 g^2 +
  sum_ab A_ab g^3 + 1e-6), alpha = 0 where g = 0; w_k = sum_ij alpha ReLU(g).
- Score-CAM: each channel upsampled to image size and min-max normalised (eps 1e-8) masks the
  normalised input; w = softmax over channels of the target logit of the masked inputs. The
  upsampling has half-pixel centres as in the Score-CAM authors' code; `align_corners=True`
  gives pytorch-grad-cam's (`UpsamplingBilinear2d`).
- Ablation-CAM: w_k = (y^c - y^c_k) / y^c, where y^c_k is the logit with channel k set to 0.
- RISE: saliency = sum_i P(c | norm(x) * m_i) m_i / (N p), masks as in Petsiuk et al. 2018.

`make_cam_fn(method, layer=...)` gives a jitted fn(model, x, classes, key) for one method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tame_jax.backbones import perturb_name
from tame_jax.image_ops import resize_bilinear, resize_bilinear_aligned
from tame_jax.model import Model

METHODS = ("gradcam", "gradcampp", "scorecam", "ablationcam", "rise")


# ----------------------------------------------------------------------------- plumbing


def _forward(model: Model, xn: jax.Array, layer: str, delta: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Returns (logits (B, K), fmap (B, h, w, C) of layer); delta is added to that fmap."""
    tapped = model.with_taps((layer,))
    perturbations = None if delta is None else {perturb_name(layer): delta}
    logits, feats = tapped.apply_backbone(xn, perturbations=perturbations)
    return logits, feats[layer]


def _activations_and_grads(model: Model, xn: jax.Array, classes: jax.Array, layer: str
                           ) -> tuple[jax.Array, jax.Array]:
    """Returns (A, dy^c/dA), both (B, h, w, C); y^c is the pre-softmax logit of classes."""
    shape = jax.eval_shape(lambda x: _forward(model, x, layer)[1], xn)

    def score(delta):
        logits, fmap = _forward(model, xn, layer, delta)
        y = jnp.take_along_axis(logits, classes[:, None], axis=1)  # (B, 1)
        return y.sum(), fmap  # images are independent (eval mode): the sum separates them

    grads, fmap = jax.grad(score, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
    return jax.lax.stop_gradient(fmap), grads


def _weighted_map(fmap: jax.Array, weights: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Returns ReLU(sum_k w_k A_k) upsampled to size: (B, H, W) from (B, h, w, C), (B, C)."""
    m = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", fmap, weights))  # (B, h, w)
    return resize_bilinear(m[..., None], size)[..., 0]


def _chunked_map(fn: Callable[[jax.Array], jax.Array], total: int, chunk: int) -> jax.Array:
    """Returns fn over indices 0..total-1 in chunks (lax.map), concatenated: (total, ...)."""
    chunk = max(1, min(chunk, total))
    n = math.ceil(total / chunk)
    idx = jnp.arange(n * chunk).reshape(n, chunk)
    idx = jnp.minimum(idx, total - 1)  # padding repeats the last item; dropped below
    out = jax.lax.map(fn, idx)  # (n, chunk, ...)
    return out.reshape((n * chunk,) + out.shape[2:])[:total]


def _prepare(model: Model, x: jax.Array, classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (normalised x (B, H, W, 3), classes (B,) int32)."""
    return model.normalize(jnp.asarray(x)), jnp.asarray(classes, jnp.int32).reshape(-1)


# ----------------------------------------------------------------------------- gradient CAMs


def gradcam(model: Model, x: jax.Array, classes: jax.Array, *, layer: str) -> jax.Array:
    """Returns Grad-CAM maps (B, H, W) for classes (B,) of images x (B, H, W, 3) in [0, 1]."""
    xn, classes = _prepare(model, x, classes)
    fmap, grads = _activations_and_grads(model, xn, classes, layer)
    weights = grads.mean(axis=(1, 2))  # (B, C)
    return _weighted_map(fmap, weights, x.shape[1:3])


def gradcampp(
    model: Model,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    eps: float = 1e-6,
) -> jax.Array:
    """Returns Grad-CAM++ maps (B, H, W) for classes (B,) of images x (B, H, W, 3) in [0, 1]."""
    xn, classes = _prepare(model, x, classes)
    fmap, g = _activations_and_grads(model, xn, classes, layer)
    g2 = g * g
    sum_a = fmap.sum(axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
    alpha = g2 / (2.0 * g2 + sum_a * g2 * g + eps)
    alpha = jnp.where(g != 0, alpha, 0.0)
    weights = (alpha * jax.nn.relu(g)).sum(axis=(1, 2))  # (B, C)
    return _weighted_map(fmap, weights, x.shape[1:3])


# ----------------------------------------------------------------------------- perturbation CAMs


def scorecam(
    model: Model,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    batch_chunk: int = 32,
    align_corners: bool = False,
) -> jax.Array:
    """Returns Score-CAM maps (B, H, W); batch_chunk masked images go through each forward."""
    xn, classes = _prepare(model, x, classes)
    _, fmap = _forward(model, xn, layer)  # (B, h, w, C)
    b, _, _, c = fmap.shape
    size = x.shape[1:3]

    def scores(items):  # items (n,) index (image, channel) pairs as image * C + channel
        bi, ki = items // c, items % c
        act = fmap[bi, :, :, ki]  # (n, h, w)
        resize = resize_bilinear_aligned if align_corners else resize_bilinear
        up = resize(act[..., None], size)  # (n, H, W, 1)
        lo = up.min(axis=(1, 2, 3), keepdims=True)
        hi = up.max(axis=(1, 2, 3), keepdims=True)
        mask = (up - lo) / (hi - lo + 1e-8)
        logits, _ = _forward(model, xn[bi] * mask, layer)
        return jnp.take_along_axis(logits, classes[bi][:, None], axis=1)[:, 0]  # (n,)

    s = _chunked_map(scores, b * c, batch_chunk).reshape(b, c)
    weights = jax.nn.softmax(s, axis=-1)  # (B, C)
    return _weighted_map(fmap, weights, size)


def ablationcam(
    model: Model,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    channel_chunk: int = 32,
) -> jax.Array:
    """Returns Ablation-CAM maps (B, H, W); channel_chunk ablated copies go through a forward."""
    xn, classes = _prepare(model, x, classes)
    logits, fmap = _forward(model, xn, layer)  # (B, K), (B, h, w, C)
    b, _, _, c = fmap.shape
    y = jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]  # (B,)

    def ablated(items):  # items (n,) index (image, channel) pairs as image * C + channel
        bi, ki = items // c, items % c
        a = fmap[bi]  # (n, h, w, C)
        delta = -a * jax.nn.one_hot(ki, c, dtype=a.dtype)[:, None, None, :]
        out, _ = _forward(model, xn[bi], layer, delta)
        return jnp.take_along_axis(out, classes[bi][:, None], axis=1)[:, 0]  # (n,)

    y_k = _chunked_map(ablated, b * c, channel_chunk).reshape(b, c)
    weights = (y[:, None] - y_k) / y[:, None]  # (B, C)
    return _weighted_map(fmap, weights, x.shape[1:3])


# ----------------------------------------------------------------------------- RISE


def rise_masks(
    key: jax.Array, indices: jax.Array, size: tuple[int, int], mask_cells: int, p: float
) -> jax.Array:
    """Returns RISE masks (n, H, W) in [0, 1]; mask i depends only on (key, indices[i])."""
    h, w = size
    cell_h, cell_w = math.ceil(h / mask_cells), math.ceil(w / mask_cells)
    up_h, up_w = (mask_cells + 1) * cell_h, (mask_cells + 1) * cell_w

    def one(i):
        k_grid, k_dy, k_dx = jax.random.split(jax.random.fold_in(key, i), 3)
        grid = jax.random.bernoulli(k_grid, p, (1, mask_cells, mask_cells, 1))
        up = resize_bilinear(grid.astype(jnp.float32), (up_h, up_w))[0, ..., 0]
        dy = jax.random.randint(k_dy, (), 0, cell_h)
        dx = jax.random.randint(k_dx, (), 0, cell_w)
        return jax.lax.dynamic_slice(up, (dy, dx), (h, w))

    return jax.vmap(one)(indices)


def rise(
    model: Model,
    x: jax.Array,
    classes: jax.Array,
    *,
    key: jax.Array,
    num_masks: int = 4000,
    mask_cells: int = 7,
    p: float = 0.5,
    chunk: int = 100,
    layer: str | None = None,
) -> jax.Array:
    """Returns RISE saliency (B, H, W); the same masks for every image, chunk masks a forward."""
    del layer  # RISE is black-box; the argument is accepted for a uniform API
    if key is None:
        raise ValueError("rise needs a PRNG key")
    xn, classes = _prepare(model, x, classes)
    size = x.shape[1:3]
    chunk = max(1, min(chunk, num_masks))
    n_chunks = math.ceil(num_masks / chunk)

    def step(sal, ci):  # sal (B, H, W)
        idx = ci * chunk + jnp.arange(chunk)
        masks = rise_masks(key, idx, size, mask_cells, p)  # (n, H, W)
        masks = masks * (idx < num_masks)[:, None, None]  # padded masks weigh nothing

        def per_image(args):  # one image against the chunk of masks
            xi, ci_ = args  # (H, W, 3), ()
            logits, _ = model.apply_backbone(xi[None] * masks[..., None])
            return jax.nn.softmax(logits, axis=-1)[:, ci_]  # (n,)

        probs = jax.lax.map(per_image, (xn, classes))  # (B, n)
        return sal + jnp.einsum("bn,nhw->bhw", probs, masks), None

    sal0 = jnp.zeros((xn.shape[0],) + tuple(size), xn.dtype)
    sal, _ = jax.lax.scan(step, sal0, jnp.arange(n_chunks))
    return sal / (num_masks * p)


# ----------------------------------------------------------------------------- dispatch

_FUNCS: dict[str, Callable[..., jax.Array]] = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "scorecam": scorecam,
    "ablationcam": ablationcam,
    "rise": rise,
}


def cam(
    method: str,
    model: Model,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> jax.Array:
    """Returns raw maps (B, H, W) of method for classes (B,) of images x (B, H, W, 3) in [0, 1]."""
    if method not in _FUNCS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "rise":
        return rise(model, x, classes, key=key, layer=layer, **kwargs)
    return _FUNCS[method](model, x, classes, layer=layer, **kwargs)


def make_cam_fn(method: str, *, layer: str, **kwargs: Any) -> Callable[..., jax.Array]:
    """Returns jitted fn(model, x, classes, key=None) -> raw maps (B, H, W) of one method."""

    def fn(model: Model, x: jax.Array, classes: jax.Array, key: jax.Array | None = None):
        return cam(method, model, x, classes, layer=layer, key=key, **kwargs)

    return jax.jit(fn)
