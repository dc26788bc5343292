"""Evaluation metrics for explanation maps: AD/IC, ROAD, insertion/deletion, localisation.

Everything is pure JAX, batched and jit-compilable: fractions and step counts are static Python
values, shapes are static. A classifier is passed as `classify(x) -> logits`, mapping a batch
x (B, H, W, 3) to logits (B, K). The metrics that their authors defined on the model's input
(ROAD, insertion/deletion) take x in whatever space the classifier reads: the evaluation passes
the normalised input and the backbone on it (`Model.normalize`, `Model.apply_backbone`); AD/IC
act on [0, 1] images and a classifier that normalises them (`Model.classify`). Maps are
(B, H, W) at image resolution, higher = more relevant; classes are (B,) ints.

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


ROAD_SELECTIONS = ("percentile", "ceil")


def _percentile_threshold(sorted_v: jax.Array, q: float) -> jax.Array:
    """Returns numpy.percentile(v, q) (method 'linear', float32) of each row of sorted v (B, N)."""
    n = sorted_v.shape[1]
    pos = (n - 1) * (q / 100)  # numpy's virtual index, in float64 as numpy computes it
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    t = pos - lo  # numpy's gamma, a Python float that meets float32 values as float32
    a, b = sorted_v[:, lo], sorted_v[:, hi]
    diff = b - a  # numpy's _lerp, one rounding per operation
    return b - diff * np.float32(1 - t) if t >= 0.5 else a + diff * np.float32(t)


def road_removal_mask(maps: jax.Array, fraction: float, order: str = "morf",
                      selection: str = "percentile") -> jax.Array:
    """Returns the bool (B, H, W) mask of the pixels ROAD removes at `fraction`.

    selection "percentile" (pytorch-grad-cam's ROAD): MoRF removes the pixels whose map value is
    at or above the map's 100 (1 - fraction) percentile (numpy's linear interpolation), LeRF
    those whose 1 - map value is (pytorch-grad-cam's `RemoveMostRelevantFirst(100(1 - f))` and
    `RemoveLeastRelevantFirst(100(1 - f))`); with distinct values that is the most (least)
    relevant N - ceil((N - 1)(1 - f)) pixels, and ties at the threshold are all removed.
    "ceil" (this package before): exactly ceil(fraction * H * W) pixels, ties to the lower flat
    index (`top_fraction_mask` of the map, or of minus the map for LeRF).
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}.")
    if selection not in ROAD_SELECTIONS:
        raise ValueError(f"ROAD selection {selection!r}: choose one of {ROAD_SELECTIONS}.")
    _check_fraction(fraction)
    if selection == "ceil":
        return top_fraction_mask(maps if order == "morf" else -maps, fraction)
    b = maps.shape[0]
    v = maps.astype(jnp.float32)
    v = v if order == "morf" else 1.0 - v  # float32, as pytorch-grad-cam's `1 - mask`
    q = round(100 * (1 - fraction), 10)
    thr = _percentile_threshold(jnp.sort(v.reshape(b, -1), axis=1), q)  # (B,)
    return ~(v < thr[:, None, None])


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
    selection: str = "percentile",
) -> jax.Array:
    """Returns (B, len(fractions)) bool: is the top-1 class still `classes` after ROAD removal?

    MoRF removes the most relevant fraction of pixels, LeRF the least relevant
    (`road_removal_mask`); removed pixels are filled by `road_impute` in the space of x (the
    normalised input, as pytorch-grad-cam's ROAD does) and the result is classified. The mean
    over images is the fraction of unchanged predictions that ROAD reports per removal level.
    """
    return road_orders(classify, x, maps, classes, key, fractions, (order,), noise_std,
                       num_iters, selection)[0]


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
    selection: str = "percentile",
    index: jax.Array | None = None,
) -> jax.Array:
    """Returns (len(orders), B, len(fractions)) bool: `road` for each order in one pass
    (`road_levels` of every (order, fraction), orders outermost)."""
    kept = road_levels(classify, x, maps, classes, key,
                       [(order, fr) for order in orders for fr in fractions], noise_std,
                       num_iters, selection, index)  # (B, O*F)
    return jnp.moveaxis(kept.reshape(-1, len(orders), len(fractions)), 0, 1)


def road_levels(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    key: jax.Array,
    levels: Sequence[tuple[str, float]],
    noise_std: float = 0.01,
    num_iters: int = 100,
    selection: str = "percentile",
    index: jax.Array | None = None,
) -> jax.Array:
    """Returns (B, len(levels)) bool: is the top-1 class kept at each (order, fraction) level?

    The levels run one after another in a `lax.map`: one copy of the solver and the classifier
    in the compiled program (compiling is slower than solving on a CPU), the memory of one
    level at a time, and each level stops iterating as soon as it has converged. Level i uses
    noise key fold_in(key, i); index (B,): each image's noise from its own index as well
    (`road_impute`), the same on any split of the batch over devices.
    """
    for order, _ in levels:
        if order not in ("morf", "lerf"):
            raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}.")
    removed = jnp.stack([road_removal_mask(maps, fr, order, selection)
                         for order, fr in levels])  # (L, B, H, W)

    def level(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        i, removed_i = args
        imputed = road_impute(x, removed_i, jax.random.fold_in(key, i), noise_std=noise_std,
                              num_iters=num_iters, index=index)
        return jnp.argmax(classify(imputed), axis=-1) == classes  # (B,)

    kept = jax.lax.map(level, (jnp.arange(removed.shape[0]), removed))  # (L, B)
    return kept.T


# ----------------------------------------------------------------------------------------------
# Insertion / deletion

INSERTION_SUBSTRATES = ("rise", "gaussian")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _separable(x: jax.Array, k: jax.Array, mode: str) -> jax.Array:
    """Returns x (B, H, W, C) correlated with the 1-D kernel k along H, then W (padding mode)."""
    r = (k.shape[0] - 1) // 2
    _, h, w, _ = x.shape
    p = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode=mode)
    x = sum(k[i] * p[:, i : i + h] for i in range(k.shape[0]))
    p = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode=mode)
    return sum(k[i] * p[:, :, i : i + w] for i in range(k.shape[0]))


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
    return _separable(x.astype(jnp.float32), k, "symmetric").astype(x.dtype)


def rise_kernel(size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """Returns the 1-D factor k of RISE's blur kernel `gkern(size, sigma)`: the 2-D kernel is
    outer(k, k).

    RISE's evaluation code makes its kernel by `scipy.ndimage.gaussian_filter` of a size x size
    delta (reflected borders, truncated at 4 sigma): a Gaussian folded back into the window at
    its edges, summing to 1. Gaussian filtering is separable and so is the delta, hence the
    outer product of the filtered 1-D delta, computed here without scipy.
    """
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    centre, k = size // 2, np.zeros(size)
    for j in range(size):
        for tt, wt in zip(t.astype(int), w, strict=True):
            i = (j + tt) % (2 * size)  # reflect: d c b a | a b c d | d c b a, period 2 size
            k[j] += wt * ((i if i < size else 2 * size - 1 - i) == centre)
    return k.astype(np.float32)


@jax.jit
def rise_blur(x: jax.Array) -> jax.Array:
    """Returns x (B, H, W, C) blurred as RISE's insertion substrate: each channel convolved with
    `gkern(11, 5)` (`rise_kernel`) with zero padding of 5 pixels (its `conv2d(padding=5)`)."""
    return _separable(x.astype(jnp.float32), jnp.asarray(rise_kernel()), "constant"
                      ).astype(x.dtype)


def insertion_deletion(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    step: int,
    substrate: str = "rise",
    blur_sigma: float = 5.0,
    chunk: int = 8,
) -> dict[str, jax.Array]:
    """Returns per-image AUCs {"insertion": (B,), "deletion": (B,)} (Petsiuk et al., RISE).

    As RISE's evaluation code (`CausalMetric`): pixels are ordered by decreasing map value (ties:
    lower flat index first; RISE's `np.argsort` leaves their order unspecified), and `step`
    pixels change per step, n = ceil(H*W / step) steps, so the curve has n + 1 points: point t
    has min(t * step, H*W) pixels replaced. Deletion replaces them with zeros of x; insertion
    starts from a blurred x and puts them back. x is the tensor the classifier reads (RISE:
    the normalised input, so deletion writes the zeros of the normalised tensor, the mean
    colour). The score is the softmax probability of the class, and
    AUC = (sum - first / 2 - last / 2) / n, RISE's `auc`.
    substrate "rise": `rise_blur` (11x11 kernel of sigma 5, zero padding); "gaussian": the
    `gaussian_blur` with std `blur_sigma` (this package's variant on [0, 1] pixels). The points
    are classified at most `chunk` at a time, B * chunk images per call, to bound memory.
    """
    if step < 1 or chunk < 1:
        raise ValueError(f"step and chunk must be >= 1, got {step}, {chunk}.")
    if substrate not in INSERTION_SUBSTRATES:
        raise ValueError(f"insertion substrate {substrate!r}: choose one of "
                         f"{INSERTION_SUBSTRATES}.")
    b, h, w, _ = x.shape
    n_pixels = h * w
    num_steps = -(-n_pixels // step)
    ranks = _ranks(maps).reshape(b, 1, h, w, 1)  # (B, 1, H, W, 1)
    blurred = rise_blur(x) if substrate == "rise" else gaussian_blur(x, blur_sigma)
    num_chunks = -(-(num_steps + 1) // chunk)
    chunk = -(-(num_steps + 1) // num_chunks)  # as even as can be: little padding classified

    def probs_for_chunk(ci: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.minimum(ci * chunk + jnp.arange(chunk), num_steps)  # (chunk,)
        count = jnp.minimum(t * step, n_pixels)  # pixels removed / inserted at each point
        first = ranks < count.reshape(1, chunk, 1, 1, 1)  # (B, chunk, H, W, 1)
        xs = x[:, None]  # (B, 1, H, W, C)
        deleted = jnp.where(first, jnp.zeros_like(xs), xs)
        inserted = jnp.where(first, xs, blurred[:, None])
        cls = jnp.repeat(classes, chunk)
        p_del = _class_probs(classify, deleted.reshape(b * chunk, *x.shape[1:]), cls)
        p_ins = _class_probs(classify, inserted.reshape(b * chunk, *x.shape[1:]), cls)
        return p_ins.reshape(b, chunk), p_del.reshape(b, chunk)

    p_ins, p_del = jax.lax.map(probs_for_chunk, jnp.arange(num_chunks))  # (chunks, B, chunk)

    def auc(p: jax.Array) -> jax.Array:
        p = jnp.moveaxis(p, 0, 1).reshape(b, -1)[:, : num_steps + 1]  # (B, n + 1)
        return (p.sum(axis=1) - p[:, 0] / 2 - p[:, -1] / 2) / num_steps

    return {"insertion": auc(p_ins), "deletion": auc(p_del)}


# ----------------------------------------------------------------------------------------------
# Localisation

BOX_EDGES = ("exclusive", "inclusive")


def _box_rows(boxes: jax.Array, max_edge: str) -> tuple[jax.Array, ...]:
    """Returns (top, left, bottom, right) inclusive pixel indices of boxes (..., 4).

    max_edge "exclusive": (ymin, xmin, ymax, xmax) are pixel-edge coordinates, a pixel is in the
    box when its centre is (rows ymin .. ymax - 1 for integer edges; synthetic_shapes' boxes);
    "inclusive": they are the first and last pixel indices inside.
    """
    if max_edge not in BOX_EDGES:
        raise ValueError(f"max_edge={max_edge!r}: choose one of {BOX_EDGES}.")
    boxes = boxes.astype(jnp.float32)
    ymin, xmin, ymax, xmax = (boxes[..., i] for i in range(4))
    if max_edge == "exclusive":
        return (jnp.ceil(ymin - 0.5), jnp.ceil(xmin - 0.5),
                jnp.floor(ymax - 0.5), jnp.floor(xmax - 0.5))
    return jnp.ceil(ymin), jnp.ceil(xmin), jnp.floor(ymax), jnp.floor(xmax)


def _as_box_sets(boxes: jax.Array) -> jax.Array:
    boxes = jnp.asarray(boxes)
    if boxes.ndim == 2 and boxes.shape[-1] == 4:
        return boxes[:, None, :]
    if boxes.ndim == 3 and boxes.shape[-1] == 4:
        return boxes
    raise ValueError(f"boxes must be (B, 4) or (B, N, 4) as (ymin, xmin, ymax, xmax); "
                     f"got {boxes.shape}.")


def pointing_game(maps: jax.Array, boxes: jax.Array, tolerance: float = 15,
                  max_edge: str = "exclusive") -> jax.Array:
    """Returns (B,) bool: does the map's maximum lie within `tolerance` pixels of a box?

    Zhang et al. (ECCV 2016): a hit when the maximum point is in the object or within 15 pixels
    of it, in Euclidean distance (a disk around the point, as TorchRay's implementation: some
    pixel of the box lies at distance <= tolerance from it). Boxes are (B, 4) or (B, N, 4)
    (ymin, xmin, ymax, xmax) in pixels, max edges as `max_edge` says (`_box_rows`); with N boxes
    any hit counts; empty boxes (padding) never hit. Ties in the maximum go to the lowest flat
    index.
    """
    b, h, w = maps.shape
    top, left, bottom, right = _box_rows(_as_box_sets(boxes), max_edge)  # (B, N) each
    idx = jnp.argmax(maps.reshape(b, -1), axis=1)  # (B,)
    py, px = (idx // w).astype(jnp.float32)[:, None], (idx % w).astype(jnp.float32)[:, None]
    dy = jnp.maximum(jnp.maximum(top - py, py - bottom), 0.0)  # rows to the box (B, N)
    dx = jnp.maximum(jnp.maximum(left - px, px - right), 0.0)
    valid = (bottom >= top) & (right >= left)
    return jnp.any(valid & (dy * dy + dx * dx <= float(tolerance) ** 2), axis=1)


def box_masks(boxes: jax.Array, h: int, w: int, max_edge: str = "exclusive") -> jax.Array:
    """Returns (B, H, W) bool: the pixels inside any of the boxes (B, 4) or (B, N, 4)."""
    top, left, bottom, right = (v[..., None, None] for v in
                                _box_rows(_as_box_sets(boxes), max_edge))  # (B, N, 1, 1)
    rows = jnp.arange(h, dtype=jnp.float32)[:, None]
    cols = jnp.arange(w, dtype=jnp.float32)[None, :]
    inside = (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
    return inside.any(axis=1)


def energy_in_box(maps: jax.Array, boxes: jax.Array, max_edge: str = "exclusive") -> jax.Array:
    """Returns (B,) the share of the map's positive mass inside the box(es); 0 for an empty map.

    Negative map values are clipped to 0. Boxes as in `pointing_game` (union of N boxes).
    """
    b, h, w = maps.shape
    inside = box_masks(boxes, h, w, max_edge)  # (B, H, W)
    pos = jnp.maximum(maps.astype(jnp.float32), 0.0)
    total = pos.sum(axis=(1, 2))
    return jnp.where(total > 0, (pos * inside).sum(axis=(1, 2)) / jnp.where(total > 0, total, 1),
                     0.0)
