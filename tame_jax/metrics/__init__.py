"""Evaluation metrics for explanation maps: AD/IC, ROAD, insertion/deletion, localisation.

Everything is pure JAX, batched and jit-compilable: fractions and step counts are static Python
values, shapes are static. A classifier is passed as `classify(images) -> logits`, mapping
images (B, H, W, 3) in [0, 1] to logits (B, K) (it normalises inside). Maps are (B, H, W) at
image resolution, higher = more relevant; classes are (B,) ints.

Jit usage: close over the classifier, e.g.
`jax.jit(lambda x, m, c: ad_ic(classify, x, m, c))`, or pass it as a static argument. The ROAD
imputation solver lives in `metrics.imputation`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tame_jax.metrics.imputation import road_impute

Classifier = Callable[[jax.Array], jax.Array]



# ----------------------------------------------------------------------------------------------
# Thresholding


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}; use 0.15 for 15%.")


def _num_kept(fraction: float, num_pixels: int) -> int:
    """Returns ceil(fraction * num_pixels), robust to float noise such as 0.7 * 100 = 70.0000001."""
    _check_fraction(fraction)
    return min(num_pixels, max(0, math.ceil(fraction * num_pixels - 1e-6)))


def _ranks(maps: jax.Array) -> jax.Array:
    """Returns (B, H*W) int ranks: 0 for the largest value, ties ordered by lower flat index."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1)  # (B, N)
    order = jnp.argsort(-flat, axis=1, stable=True)  # (B, N), descending, ties by index
    n = flat.shape[1]
    ranks = jnp.zeros_like(order)
    return jax.vmap(lambda r, o: r.at[o].set(jnp.arange(n, dtype=o.dtype)))(ranks, order)


@functools.partial(jax.jit, static_argnames=("fraction",))
def top_fraction_mask(maps: jax.Array, fraction: float) -> jax.Array:
    """Returns a bool (B, H, W) mask of the ceil(fraction*H*W) largest pixels of each map.

    Exactly that many pixels are True per image; ties are broken by flat index (lower first).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {maps.shape}; squeeze channels.")
    b, h, w = maps.shape
    k = _num_kept(fraction, h * w)
    return (_ranks(maps) < k).reshape(b, h, w)


def threshold_maps(maps: jax.Array, fraction: float) -> jax.Array:
    """Returns maps (B, H, W) kept on their top `fraction` of pixels and 0 elsewhere."""
    return jnp.where(top_fraction_mask(maps, fraction), maps, jnp.zeros_like(maps))


# ----------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence


def _class_probs(classify: Classifier, x: jax.Array, classes: jax.Array) -> jax.Array:
    """Returns the (B,) softmax probability of `classes` for images x (B, H, W, 3)."""
    logits = classify(x)  # (B, K)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probs, classes[:, None].astype(jnp.int32), axis=1)[:, 0]


def _percent_key(fraction: float) -> str:
    return f"{fraction * 100:g}"


def ad_ic_terms(base_probs: jax.Array, masked_probs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns per-image (drop, increase), (B,) each: max(0, Y-O)/Y and 1[O > Y] as floats."""
    y = base_probs.astype(jnp.float32)
    o = masked_probs.astype(jnp.float32)
    drop = jnp.maximum(y - o, 0.0) / jnp.maximum(y, jnp.finfo(jnp.float32).tiny)
    return drop, (o > y).astype(jnp.float32)


def ad_ic(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    fractions: Sequence[float] = (1.0, 0.5, 0.15),
) -> dict[str, jax.Array]:
    """Returns per-image AD/IC terms (B,) under keys "ad_100", "ic_100", "ad_50", ... .

    Y is the class probability on x, O on x * E where E keeps the map's values on its top
    fraction of pixels (soft values, zero elsewhere); AD and IC are 100 x their means.
    """
    y = _class_probs(classify, x, classes)  # (B,)
    out = {}
    for fraction in fractions:
        e = threshold_maps(maps, fraction).astype(x.dtype)  # (B, H, W)
        o = _class_probs(classify, x * e[..., None], classes)  # (B,)
        drop, inc = ad_ic_terms(y, o)
        key = _percent_key(fraction)
        out[f"ad_{key}"] = drop
        out[f"ic_{key}"] = inc
    return out


# ----------------------------------------------------------------------------------------------
# ROAD


def road(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    key: jax.Array,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
    order: str = "morf",
    noise_std: float = 0.01,
    num_iters: int = 100,
) -> jax.Array:
    """Returns (B, len(fractions)) bool: is the top-1 class still `classes` after ROAD removal?

    MoRF removes the most relevant fraction of pixels (top of the map), LeRF the least relevant
    (top of -map); removed pixels are filled by `road_impute`. The mean over images is the
    fraction of unchanged predictions that ROAD reports per removal level.
    """
    return road_orders(classify, x, maps, classes, key, fractions, (order,), noise_std,
                       num_iters)[0]


def road_orders(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    key: jax.Array,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
    orders: Sequence[str] = ("morf", "lerf"),
    noise_std: float = 0.01,
    num_iters: int = 100,
) -> jax.Array:
    """Returns (len(orders), B, len(fractions)) bool: `road` for each order in one pass.

    The (order, fraction) levels run one after another in a `lax.map`: one copy of the solver
    and the classifier in the compiled program (compiling is slower than solving on a CPU), the
    memory of one level at a time, and each level stops iterating as soon as it has converged.
    Level i uses noise key fold_in(key, i).
    """
    for order in orders:
        if order not in ("morf", "lerf"):
            raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}.")
    removed = jnp.stack([top_fraction_mask(maps if order == "morf" else -maps, fr)
                         for order in orders for fr in fractions])  # (O*F, B, H, W)

    def level(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        i, removed_i = args
        imputed = road_impute(x, removed_i, jax.random.fold_in(key, i), noise_std=noise_std,
                              num_iters=num_iters)
        return jnp.argmax(classify(imputed), axis=-1) == classes  # (B,)

    kept = jax.lax.map(level, (jnp.arange(removed.shape[0]), removed))  # (O*F, B)
    return jnp.moveaxis(kept.reshape(len(orders), len(fractions), -1), 2, 1)


# ----------------------------------------------------------------------------------------------
# Insertion / deletion


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("sigma",))
def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Returns x (B, H, W, C) blurred by a separable Gaussian (std sigma, cut at 3 sigma).

    Borders use half-sample symmetric padding (scipy.ndimage `mode="reflect"`), so a constant
    image stays constant.
    """
    k = jnp.asarray(_gaussian_kernel(sigma))
    r = (k.shape[0] - 1) // 2
    _, h, w, _ = x.shape
    if r >= h or r >= w:
        raise ValueError(f"blur radius {r} (3 sigma) must be smaller than the image {h}x{w}.")
    xf = x.astype(jnp.float32)
    p = jnp.pad(xf, ((0, 0), (r, r), (0, 0), (0, 0)), mode="symmetric")
    xf = sum(k[i] * p[:, i : i + h] for i in range(k.shape[0]))
    p = jnp.pad(xf, ((0, 0), (0, 0), (r, r), (0, 0)), mode="symmetric")
    xf = sum(k[i] * p[:, :, i : i + w] for i in range(k.shape[0]))
    return xf.astype(x.dtype)


def insertion_deletion(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    num_steps: int = 32,
    blur_sigma: float = 5.0,
    chunk: int = 8,
) -> dict[str, jax.Array]:
    """Returns per-image AUCs {"insertion": (B,), "deletion": (B,)} (Petsiuk et al., RISE).

    Pixels are ordered by decreasing map value (ties by lower flat index). At step t of
    0..num_steps the first floor(t*H*W/num_steps) pixels are set to 0 (deletion) or copied from
    x into a blurred copy of x (insertion, `gaussian_blur` with std `blur_sigma`). The score is
    the softmax probability of the class; the AUC is the trapezoid rule over the removed
    fraction in [0, 1]. The num_steps + 1 points are classified `chunk` at a time, B * chunk
    images per call, to bound memory.
    """
    if num_steps < 1 or chunk < 1:
        raise ValueError(f"num_steps and chunk must be >= 1, got {num_steps}, {chunk}.")
    b, h, w, _ = x.shape
    n = h * w
    ranks = _ranks(maps).reshape(b, 1, h, w, 1)  # (B, 1, H, W, 1)
    blurred = gaussian_blur(x, blur_sigma)
    num_chunks = -(-(num_steps + 1) // chunk)

    def probs_for_chunk(ci: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.minimum(ci * chunk + jnp.arange(chunk), num_steps)  # (chunk,)
        count = (t * n) // num_steps  # pixels removed / inserted at each step
        first = ranks < count.reshape(1, chunk, 1, 1, 1)  # (B, chunk, H, W, 1)
        xs = x[:, None]  # (B, 1, H, W, C)
        deleted = jnp.where(first, jnp.zeros_like(xs), xs)
        inserted = jnp.where(first, xs, blurred[:, None])
        cls = jnp.repeat(classes, chunk)
        p_del = _class_probs(classify, deleted.reshape(b * chunk, *x.shape[1:]), cls)
        p_ins = _class_probs(classify, inserted.reshape(b * chunk, *x.shape[1:]), cls)
        return p_ins.reshape(b, chunk), p_del.reshape(b, chunk)

    p_ins, p_del = jax.lax.map(probs_for_chunk, jnp.arange(num_chunks))  # (chunks, B, chunk)
    steps = np.arange(num_steps + 1)
    frac = jnp.asarray((steps * n) // num_steps / n, jnp.float32)  # (num_steps + 1,)

    def auc(p: jax.Array) -> jax.Array:
        p = jnp.moveaxis(p, 0, 1).reshape(b, -1)[:, : num_steps + 1]  # (B, num_steps + 1)
        return jnp.sum(0.5 * (p[:, 1:] + p[:, :-1]) * jnp.diff(frac), axis=1)

    return {"insertion": auc(p_ins), "deletion": auc(p_del)}


# ----------------------------------------------------------------------------------------------
# Localisation


def _box_masks(boxes: jax.Array, h: int, w: int, tolerance: float = 0) -> jax.Array:
    """Returns (B, N, H, W) bool masks of boxes (B, N, 4) inclusive, enlarged by `tolerance`."""
    ymin, xmin, ymax, xmax = (boxes[..., i, None, None] for i in range(4))  # (B, N, 1, 1)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    valid = (ymax >= ymin) & (xmax >= xmin)
    inside = ((rows >= ymin - tolerance) & (rows <= ymax + tolerance)
              & (cols >= xmin - tolerance) & (cols <= xmax + tolerance))  # fmt: skip
    return inside & valid


def _as_box_sets(boxes: jax.Array) -> jax.Array:
    boxes = jnp.asarray(boxes)
    if boxes.ndim == 2 and boxes.shape[-1] == 4:
        return boxes[:, None, :]
    if boxes.ndim == 3 and boxes.shape[-1] == 4:
        return boxes
    raise ValueError(f"boxes must be (B, 4) or (B, N, 4) as (ymin, xmin, ymax, xmax); "
                     f"got {boxes.shape}.")


def pointing_game(maps: jax.Array, boxes: jax.Array, tolerance: int = 15) -> jax.Array:
    """Returns (B,) bool: does the map's maximum lie within `tolerance` pixels of a box?

    Boxes are (B, 4) or (B, N, 4) pixel indices (ymin, xmin, ymax, xmax), inclusive; a box is
    enlarged by `tolerance` on every side (Zhang et al.). With N boxes any hit counts; boxes
    with ymax < ymin or xmax < xmin are padding and never hit. Ties in the maximum go to the
    lowest flat index.
    """
    b, h, w = maps.shape
    hits = _box_masks(_as_box_sets(boxes), h, w, tolerance).any(axis=1)  # (B, H, W)
    idx = jnp.argmax(maps.reshape(b, -1), axis=1)  # (B,)
    return jnp.take_along_axis(hits.reshape(b, -1), idx[:, None], axis=1)[:, 0]


def energy_in_box(maps: jax.Array, boxes: jax.Array) -> jax.Array:
    """Returns (B,) the share of the map's positive mass inside the box(es); 0 for an empty map.

    Negative map values are clipped to 0. Boxes as in `pointing_game` (union of N boxes).
    """
    b, h, w = maps.shape
    inside = _box_masks(_as_box_sets(boxes), h, w).any(axis=1)  # (B, H, W)
    pos = jnp.maximum(maps.astype(jnp.float32), 0.0)
    total = pos.sum(axis=(1, 2))
    return jnp.where(total > 0, (pos * inside).sum(axis=(1, 2)) / jnp.where(total > 0, total, 1),
                     0.0)
