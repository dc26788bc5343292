"""Baseline explanation methods in JAX: Grad-CAM, Grad-CAM++, Score-CAM, Ablation-CAM, RISE.

Every method takes a backbone that follows the `tame_jax.backbones` contract,
`module.apply(variables, norm(x), train=False) -> (logits (B, K), {layer: fmap (B, h, w, C)})`,
where every returned feature map passes through `self.perturb(perturb_name(layer), fmap)`.
Gradients w.r.t. a feature map are gradients w.r.t. a zero perturbation, and a channel is
ablated by adding minus itself. Images are in [0, 1]; the methods normalise them.

All maps come back at image resolution (B, H, W), raw (not min-max normalised). The CAM maps
are computed at feature resolution, ReLU'd, and upsampled bilinearly (half-pixel centres).
Conventions follow the papers and the `grad-cam` PyTorch package (jacobgil):
- Grad-CAM: w_k = mean_ij dy^c/dA_ij^k (y^c = pre-softmax logit); map = ReLU(sum_k w_k A^k).
- Grad-CAM++: closed form with g = dy^c/dA (no exponential), alpha = g^2 / (2 g^2 +
  sum_ab A_ab g^3 + 1e-6), alpha = 0 where g = 0; w_k = sum_ij alpha ReLU(g).
- Score-CAM: each channel upsampled to image size and min-max normalised (eps 1e-8) masks the
  normalised input; w = softmax over channels of the target logit of the masked inputs.
- Ablation-CAM: w_k = (y^c - y^c_k) / y^c, where y^c_k is the logit with channel k set to 0.
- RISE: saliency = sum_i P(c | norm(x) * m_i) m_i / (N p), masks as in Petsiuk et al. 2018.

Wrap a method with `functools.partial` (method, module, layer and chunk sizes bound) and
`jax.jit` it, or use `make_cam_fn`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tame_jax.image_ops import normalize, resize_bilinear

try:  # the backbone package exports the canonical name mapping
    from tame_jax.backbones import perturb_name
except ImportError:  # pragma: no cover - fallback while the backbones package is absent

    def perturb_name(layer: str) -> str:
        """Returns the Flax perturbation name of a torchvision-style layer name."""
        return layer.replace(".", "_")


METHODS = ("gradcam", "gradcampp", "scorecam", "ablationcam", "rise")

Variables = Mapping[str, Any]


# ----------------------------------------------------------------------------- plumbing


def _base(variables: Variables) -> dict[str, Any]:
    """Returns the variables without any 'perturbations' collection."""
    return {k: v for k, v in variables.items() if k != "perturbations"}


def _zero_perturbations(module: Any, variables: Variables, xn: jax.Array) -> dict[str, Any]:
    """Returns zeros for every perturbation the module makes on inputs shaped like xn."""
    # Flax refuses a 'perturbations' collection that lacks any of the module's perturbations,
    # so every forward pass gets a full set (shapes found by abstract evaluation, no compute).
    def init(v, x):
        return module.apply(v, x, train=False, mutable=["perturbations"])

    _, state = jax.eval_shape(init, _base(variables), xn)
    shapes = dict(state.get("perturbations", {}))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _forward(
    module: Any, variables: Variables, xn: jax.Array, layer: str, delta: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Returns (logits (B, K), fmap (B, h, w, C) of layer); delta is added to that fmap."""
    if delta is None:
        logits, feats = module.apply(_base(variables), xn, train=False)
    else:
        pert = _zero_perturbations(module, variables, xn)
        name = perturb_name(layer)
        if name not in pert:
            raise ValueError(
                f"layer {layer!r}: no perturbation {name!r} in the module; it has {sorted(pert)}"
            )
        pert[name] = delta
        logits, feats = module.apply({**_base(variables), "perturbations": pert}, xn, train=False)
    if layer not in feats:
        raise ValueError(f"layer {layer!r} not returned by the backbone; it has {sorted(feats)}")
    return logits, feats[layer]


def _activations_and_grads(
    module: Any, variables: Variables, xn: jax.Array, classes: jax.Array, layer: str
) -> tuple[jax.Array, jax.Array]:
    """Returns (A, dy^c/dA), both (B, h, w, C); y^c is the pre-softmax logit of classes."""
    shape = jax.eval_shape(lambda v, x: _forward(module, v, x, layer, None)[1], variables, xn)

    def score(delta):
        logits, fmap = _forward(module, variables, xn, layer, delta)
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


def _prepare(x: jax.Array, classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (norm(x) (B, H, W, 3), classes (B,) int32)."""
    return normalize(jnp.asarray(x)), jnp.asarray(classes, jnp.int32).reshape(-1)


# ----------------------------------------------------------------------------- gradient CAMs


def gradcam(
    module: Any, variables: Variables, x: jax.Array, classes: jax.Array, *, layer: str
) -> jax.Array:
    """Returns Grad-CAM maps (B, H, W) for classes (B,) of images x (B, H, W, 3) in [0, 1]."""
    xn, classes = _prepare(x, classes)
    fmap, grads = _activations_and_grads(module, variables, xn, classes, layer)
    weights = grads.mean(axis=(1, 2))  # (B, C)
    return _weighted_map(fmap, weights, x.shape[1:3])


def gradcampp(
    module: Any,
    variables: Variables,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    eps: float = 1e-6,
) -> jax.Array:
    """Returns Grad-CAM++ maps (B, H, W) for classes (B,) of images x (B, H, W, 3) in [0, 1]."""
    xn, classes = _prepare(x, classes)
    fmap, g = _activations_and_grads(module, variables, xn, classes, layer)
    g2 = g * g
    sum_a = fmap.sum(axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
    alpha = g2 / (2.0 * g2 + sum_a * g2 * g + eps)
    alpha = jnp.where(g != 0, alpha, 0.0)
    weights = (alpha * jax.nn.relu(g)).sum(axis=(1, 2))  # (B, C)
    return _weighted_map(fmap, weights, x.shape[1:3])


# ----------------------------------------------------------------------------- perturbation CAMs


def scorecam(
    module: Any,
    variables: Variables,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    batch_chunk: int = 32,
) -> jax.Array:
    """Returns Score-CAM maps (B, H, W); batch_chunk masked images go through each forward."""
    xn, classes = _prepare(x, classes)
    _, fmap = _forward(module, variables, xn, layer, None)  # (B, h, w, C)
    b, _, _, c = fmap.shape
    size = x.shape[1:3]

    def scores(items):  # items (n,) index (image, channel) pairs as image * C + channel
        bi, ki = items // c, items % c
        act = fmap[bi, :, :, ki]  # (n, h, w)
        up = resize_bilinear(act[..., None], size)  # (n, H, W, 1)
        lo = up.min(axis=(1, 2, 3), keepdims=True)
        hi = up.max(axis=(1, 2, 3), keepdims=True)
        mask = (up - lo) / (hi - lo + 1e-8)
        logits, _ = _forward(module, variables, xn[bi] * mask, layer, None)
        return jnp.take_along_axis(logits, classes[bi][:, None], axis=1)[:, 0]  # (n,)

    s = _chunked_map(scores, b * c, batch_chunk).reshape(b, c)
    weights = jax.nn.softmax(s, axis=-1)  # (B, C)
    return _weighted_map(fmap, weights, size)


def ablationcam(
    module: Any,
    variables: Variables,
    x: jax.Array,
    classes: jax.Array,
    *,
    layer: str,
    channel_chunk: int = 32,
) -> jax.Array:
    """Returns Ablation-CAM maps (B, H, W); channel_chunk ablated copies go through a forward."""
    xn, classes = _prepare(x, classes)
    logits, fmap = _forward(module, variables, xn, layer, None)  # (B, K), (B, h, w, C)
    b, _, _, c = fmap.shape
    y = jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]  # (B,)

    def ablated(items):  # items (n,) index (image, channel) pairs as image * C + channel
        bi, ki = items // c, items % c
        a = fmap[bi]  # (n, h, w, C)
        delta = -a * jax.nn.one_hot(ki, c, dtype=a.dtype)[:, None, None, :]
        out, _ = _forward(module, variables, xn[bi], layer, delta)
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
    module: Any,
    variables: Variables,
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
    xn, classes = _prepare(x, classes)
    size = x.shape[1:3]
    chunk = max(1, min(chunk, num_masks))
    n_chunks = math.ceil(num_masks / chunk)

    def step(sal, ci):  # sal (B, H, W)
        idx = ci * chunk + jnp.arange(chunk)
        masks = rise_masks(key, idx, size, mask_cells, p)  # (n, H, W)
        masks = masks * (idx < num_masks)[:, None, None]  # padded masks weigh nothing

        def per_image(args):  # one image against the chunk of masks
            xi, ci_ = args  # (H, W, 3), ()
            logits, _ = module.apply(_base(variables), xi[None] * masks[..., None], train=False)
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
    module: Any,
    variables: Variables,
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
        return rise(module, variables, x, classes, key=key, layer=layer, **kwargs)
    return _FUNCS[method](module, variables, x, classes, layer=layer, **kwargs)


def make_cam_fn(
    method: str, module: Any, *, layer: str, **kwargs: Any
) -> Callable[..., jax.Array]:
    """Returns jitted fn(variables, x, classes, key=None) -> maps (B, H, W) for one method."""
    return jax.jit(functools.partial(cam, method, module, layer=layer, **kwargs))
